"""What a run measures and where it goes: metrics.jsonl in the output folder (and accelerate's trackers), tokens/s
and model FLOPs utilisation (MFU) over each logging window.
"""

import json
import time
from pathlib import Path

from .engine import param_numel


class MetricsLog:
    """Records ({"step": N, ...}) appended to `path` by the main process and sent to accelerate's trackers. A new
    run starts the file afresh; a resumed one keeps the records up to its step."""

    def __init__(self, accelerator, path: Path, start_step: int, report_to: str = "none", hyperparameters=None):
        self.accelerator, self.path = accelerator, Path(path)
        if accelerator.is_main_process and self.path.exists():
            if start_step:
                kept = [line for line in self.path.read_text().splitlines()
                        if json.loads(line).get("step", 0) <= start_step]
                self.path.write_text("".join(line + "\n" for line in kept))
            else:
                self.path.unlink()
        if report_to != "none":
            accelerator.init_trackers("glm-train", config={k: v for k, v in (hyperparameters or {}).items()
                                                           if isinstance(v, (int, float, str, bool))})

    def __call__(self, record: dict):
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class Throughput:
    """Tokens and estimated FLOPs since the window started: tokens/s and MFU at each logging step."""

    def __init__(self, model, config, peak_flops_per_s: float):
        self.params, self.config, self.peak = matmul_params(model), config, peak_flops_per_s
        self.restart()

    def restart(self):
        """A new window (after logging, and after evaluation or a checkpoint: throughput counts training only)."""
        self.tokens, self.flops, self.start = 0, 0.0, time.time()

    def add(self, shapes, num_processes: int):
        """The (rows, seq) shapes of this process's micro-batches of one step, as every process has them."""
        self.tokens += sum(rows * seq for rows, seq in shapes) * num_processes
        self.flops += sum(batch_flops(self.params, self.config, shape) for shape in shapes) * num_processes

    def rates(self) -> dict:
        elapsed = max(time.time() - self.start, 1e-9)
        return {"tokens_per_s": self.tokens / elapsed, "mfu": self.flops / elapsed / self.peak}


def peak_flops(device, peak_tflops=None, threads=None) -> float:
    """Peak FLOP/s of one device: `peak_tflops` when given, known GPUs' bf16 peak, or for a CPU an estimate."""
    import torch

    if peak_tflops:
        return peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in (("H200", 989), ("H100", 989), ("A100", 312), ("L40", 181), ("A10", 125),
                            ("4090", 165), ("V100", 125), ("T4", 65)):
            if key in name:
                return tflops * 1e12
        return 312e12
    # An estimate: fp32 FMA lanes per cycle (AVX-512: 2 units x 16 lanes x 2 FLOPs; AVX2: half) at 2.5 GHz.
    wide = "avx512f" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False
    return (threads or torch.get_num_threads()) * (64 if wide else 32) * 2.5e9


def matmul_params(model) -> int:
    """Parameters that take part in matrix products (the embedding lookup does not)."""
    return sum(param_numel(p) for n, p in model.named_parameters() if "word_embeddings" not in n)


def batch_flops(params: int, config, batch_shape) -> float:
    """nanoGPT's estimate of a training step's FLOPs: 6 * params + 12 * layers * width * seq per token."""
    rows, seq = batch_shape
    attention = 12 * config.num_layers * config.num_attention_heads * config.kv_channels * seq
    return rows * seq * (6 * params + attention)
