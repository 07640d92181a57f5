"""train.py's throughput against the bare model training step, side by side in one process.

The bare step is the least any training loop must do: forward with labels, backward, AdamW step, on a batch that is
already a tensor. train.py adds data loading, the global-token loss, clipping, the scheduler, logging and metrics.
Its tokens/s should be at least 90% of the bare step's at the same config and batch.

    python benchmarks/bench_train.py                         # tiny preset, CPU
    python benchmarks/bench_train.py --config_name small --batch_size 8 --block_size 512 --steps 30   # on a GPU
"""

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def corpus(path: Path, lines: int, seed: int = 0):
    rng = random.Random(seed)
    words = ["the", "model", "learns", "数据", "训练", "quickly", "from", "text", "并且", "numbers", "42", "7"]
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(30)) for _ in range(lines)) + "\n")


def bare_tokens_per_s(model_dir: Path, batch_size: int, block_size: int, steps: int, lr: float, device: str):
    """The model's own training step on a fixed batch: forward(labels) + backward + AdamW + zero_grad."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=True).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), fused=device == "cuda")
    ids = torch.randint(0, config.padded_vocab_size, (batch_size, block_size), device=device)

    def step():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(3):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.item()
    if device == "cuda":
        torch.cuda.synchronize()
    return batch_size * block_size * steps / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_name", default="tiny", help="Preset or config path (as train.py).")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40, help="Timed steps of each side.")
    parser.add_argument("--rounds", type=int, default=2, help="Alternate the two sides this many times.")
    args = parser.parse_args()

    import torch

    import train

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus(tmp / "train.txt", lines=max(2000, args.batch_size * args.block_size * (args.steps + 10) // 40))
        common = ["--config_name", args.config_name, "--train_file", str(tmp / "train.txt"),
                  "--per_device_train_batch_size", str(args.batch_size), "--block_size", str(args.block_size),
                  "--learning_rate", "1e-3", "--eval_steps", "100000", "--max_eval_samples", "8",
                  "--tokenizer_vocab_size", "2000"]
        results = {"train.py": [], "bare step": []}
        for round_index in range(args.rounds):
            out = tmp / f"run{round_index}"
            if round_index:  # reuse the first round's tokenizer
                common += ["--tokenizer_name", str(tmp / "run0")]
            # Warmup steps are logged in the first window; the second window is the timed one.
            train.main([*common, "--output_dir", str(out), "--max_train_steps", str(2 * args.steps),
                        "--logging_steps", str(args.steps)])
            records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            windows = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
            results["train.py"].append(windows[-1])
            results["bare step"].append(bare_tokens_per_s(out, args.batch_size, args.block_size, args.steps, 1e-3,
                                                          device))
    best = {name: max(values) for name, values in results.items()}
    print(f"device {device}, config {args.config_name}, batch {args.batch_size} x {args.block_size} tokens")
    for name, values in results.items():
        print(f"  {name:10s} tokens/s: " + ", ".join(f"{v:,.0f}" for v in values) + f"  (best {best[name]:,.0f})")
    # Each round measures both sides back to back, so its ratio is the least disturbed by other load on the machine.
    ratios = sorted(t / b for t, b in zip(results["train.py"], results["bare step"]))
    print("per-round ratios: " + ", ".join(f"{r:.3f}" for r in ratios))
    print(f"ratio train.py / bare step: median {ratios[len(ratios) // 2]:.3f}, best-of {best['train.py'] / best['bare step']:.3f}"
          " (target >= 0.90)")


if __name__ == "__main__":
    main()
