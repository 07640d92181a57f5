"""llama.cpp's quantizer (what its `llama-quantize` tool runs) through the llama-cpp-python that
scripts/install_engines.sh builds: an f16 GGUF in, a q8_0 or q4_0 GGUF out.

    PYTHONPATH=~/.cache/glm-hf-engines/llama-cpp-python-0.3.36 bash scripts/run.sh python scripts/quantize_gguf.py \\
        chatglm3-6b-f16.gguf chatglm3-6b-q4_0.gguf q4_0
"""

import argparse
import os


def quantize_gguf(source, target, kind: str, threads: int = 0) -> None:
    """Write `target`, the GGUF `source` quantized to `kind` ("q8_0" or "q4_0") by llama_model_quantize."""
    import llama_cpp

    types = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}
    if kind not in types:
        raise ValueError(f"kind must be one of {sorted(types)}, got {kind!r}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = types[kind]
    params.nthread = threads or os.cpu_count()
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if code != 0:
        raise RuntimeError(f"llama_model_quantize {source} -> {target} ({kind}) returned {code}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="an f16 (or f32) GGUF, from llama.cpp's convert_hf_to_gguf.py")
    parser.add_argument("target", help="the GGUF to write")
    parser.add_argument("kind", choices=("q8_0", "q4_0"))
    args = parser.parse_args()
    quantize_gguf(args.source, args.target, args.kind)
    print(f"wrote {args.target}")
