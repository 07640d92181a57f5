"""The cost of parsing a streamed reply (tool_parser_glm.ReplyStream, what vLLM's glm plugin runs on every piece),
per piece, at three reply lengths side by side; flat means linear time in the reply's length.

    python benchmarks/bench_tool_parser.py        # docs/performance.md

A plain reply (streamed content) and a tool call (held until finish, then parsed whole) of N pieces of 5 characters
each (a token's worth of mixed Chinese and ASCII), fed one by one, then `finish()`; the median of --repeats runs.
Needs only this repository (the parser uses the standard library).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tool_parser_glm import ReplyStream  # noqa: E402


def per_piece(pieces, tools_enabled, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        stream = ReplyStream(tools_enabled)
        for piece in pieces:
            stream.feed(piece)
        stream.finish()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / len(pieces) * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    lengths = (256, 4096, 32768)
    print("| reply | " + " | ".join(f"{n} pieces (µs/piece)" for n in lengths) + f" | {lengths[-1]} vs {lengths[0]} |")
    print("|---|" + "---|" * (len(lengths) + 1))
    for kind in ("content", "tool call"):
        rates = []
        for n in lengths:
            if kind == "content":
                pieces = [" \n"] + ["词abc "] * n
            else:
                pieces = ["get_weather\n", " ```python\ntool_call(q=["] + ['"词ab", '] * n + ["])\n```"]
            rates.append(per_piece(pieces, kind == "tool call", args.repeats))
        print(f"| {kind} | " + " | ".join(f"{rate:.1f}" for rate in rates) + f" | {rates[-1] / rates[0]:.2f}x |")


if __name__ == "__main__":
    main()
