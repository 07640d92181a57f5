"""What the training tests share: a tiny workspace (config, text and chat files, a saved base model), train.py in a
fresh process (optionally killed mid-write), and readers of what a run wrote."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import ROOT
from safetensors.torch import load_file


PYTHON = sys.executable
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
TINY = dict(model_type="chatglm", num_layers=2, hidden_size=32, ffn_hidden_size=64, kv_channels=8,
            num_attention_heads=4, multi_query_group_num=2, padded_vocab_size=512, seq_length=128)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
       "PYTHONWARNINGS": "ignore"}


# Two processes on CPU: accelerate's `--cpu` multi-process launch needs MPI, so torchrun's path (--multi_gpu) is used;
# train.py then runs DDP over gloo on the CPU.
CPU_DDP = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no"]


# One process as scripts/main.sh starts it (every launcher value given, so accelerate prints no notice).
CPU_ONE = [ACCELERATE, "launch", "--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--num_cpu_threads_per_process", "2"]


def sentences(n, seed=0):
    import random

    rng = random.Random(seed)
    animals, places = ["cat", "dog", "bird", "fish"], ["mat", "box", "tree", "pond"]
    return [f"the {rng.choice(animals)} sat on the {rng.choice(places)} number {rng.randrange(10)}." for _ in range(n)]


def common(ws, out, *extra):
    return ["--config_name", str(ws / "tiny.json"), "--tokenizer_name", str(ws / "base"), "--output_dir", str(out),
            "--learning_rate", "1e-2", "--num_warmup_steps", "2", "--block_size", "32", "--eval_steps", "1000",
            "--logging_steps", "1", *extra]


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def losses(out):
    return {r["step"]: r["loss"] for r in metrics(out) if "loss" in r}


def weights(out):
    return load_file(str(Path(out) / "model.safetensors"))


def run_script(argv, launcher=(), env=None, kill=None):
    """train.py in a fresh process (under `launcher`, e.g. accelerate launch); `kill=("checkpoint", 4)` or
    `("tokenizer", 1)` runs it through tests/crashing_train.py, which SIGKILLs it at that point of a write."""
    script = [str(ROOT / "train.py")] if kill is None else \
        [str(ROOT / "tests" / "crashing_train.py"), kill[0], str(kill[1]), "--"]
    command = [*(launcher or [PYTHON]), *script, *argv]
    result = subprocess.run(command, cwd=ROOT, env={**ENV, **(env or {})}, capture_output=True, text=True,
                            timeout=600)
    return result


def assert_same_weights(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-4, msg=key)


def snapshot(folder: Path) -> dict:
    """Every file under `folder` (relative name -> bytes); {} for a folder that does not exist."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_jsonl(path: Path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def fake_finished_run(folder: Path):
    """What a finished run leaves (config, weights, card, metrics, tokenizer files), with recognisable bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "README.md", "metrics.jsonl", "tokenizer_config.json"):
        (folder / name).write_text(f"old {name}\n")
    (folder / "model.safetensors").write_bytes(b"old weights")
