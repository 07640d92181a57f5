"""This repository's GLM against transformers' native GlmForCausalLM, side by side in one run; prints ratios.

    python benchmarks/bench_model.py --quick                   # the ~50M config only, a few minutes on 2 CPU cores
    python benchmarks/bench_model.py --configs small,large     # the table in docs/performance.md
    python benchmarks/bench_model.py --device cuda             # bf16 on a GPU (adds the ~1B config by default)

Both models get the same weights (ours converted with convert_glm.py), dtype, attention backend (sdpa) and inputs.
Runs alternate between the two models (ABBA order) and every figure is the median of --repeats runs after a warm-up.
What is measured, per config:
  train    forward + backward + AdamW step on batch 4 x 512 (labels = inputs): tokens/s and MFU
  memory   peak memory of that training step, each model alone in a fresh subprocess (see `memory_child`)
  prefill  one forward over 2048 tokens with a cache and only the last logits, as generate() runs it: tokens/s
  gen1/8   greedy generate() of 256 new tokens after a 32-token prompt, batch 1 and 8, each model with its own
           default generation settings (native: DynamicCache): new tokens/s, and the share of the weight-streaming
           bound (every weight matrix read once per decoding step at the measured bandwidth)
  compiled greedy batch 1 and 8 with a static cache and torch.compile(fullgraph=True) through generate()'s
           compile_config, ours against native compiled the same way and against native's default eager generate();
           the first call's extra seconds as compile time (--compiled-new-tokens new tokens, default 64)
  longctx  compiled greedy batch 1 after a --long-context prompt (default 2048), decode-only tokens/s (two generate()
           lengths, differenced), against native compiled and native eager: attention over the whole cache each step
  packing  SFT training (forward + backward + AdamW) on the built-in skill conversations, one per padded row against
           train.py --packing rows (preprocess.pack_sft): real tokens/s
and the machine's own limits in the same run: dense matmul FLOP/s (a 2048^2 fp32 product on CPU) and matrix-vector
bandwidth (a 256 MB fp32 / 1 GB bf16 weight times one vector, as a decoding step reads its weights). Both are measured
once at the start (the header) and again between the training steps and the generate() calls, in the same
alternation: MFU and the share of the weight-streaming bound divide figures taken under the same machine load.
"""

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import convert_glm  # noqa: E402
from local_glm import glm  # noqa: E402

CONFIGS = {
    # ~55M parameters: the 50M config.
    "small": dict(num_layers=8, hidden_size=512, num_attention_heads=8, multi_query_group_num=2, kv_channels=64,
                  ffn_hidden_size=1376, padded_vocab_size=32000),
    # ~3.5x small.
    "large": dict(num_layers=12, hidden_size=1024, num_attention_heads=16, multi_query_group_num=2, kv_channels=64,
                  ffn_hidden_size=2752, padded_vocab_size=32000),
    # ~1B, for GPUs: chatglm3's head layout and vocabulary at a quarter of its depth and half its width.
    "1b": dict(num_layers=16, hidden_size=2048, num_attention_heads=16, multi_query_group_num=2, kv_channels=128,
               ffn_hidden_size=5632, padded_vocab_size=65024),
}
TRAIN_BATCH, TRAIN_LEN = 4, 512
PREFILL_LEN = 2048
PROMPT_LEN = 32
SECTIONS = ("train", "memory", "prefill", "gen1", "gen8", "compiled", "longctx", "packing")


def build_pair(name, device, dtype, which=("ours", "native")):
    """Our model and the native one with the same (converted) weights, both on sdpa."""
    from transformers import GlmForCausalLM

    config = glm.ChatGLMConfig(**CONFIGS[name], seq_length=4096, pad_token_id=0, eos_token_id=2,
                               attn_implementation="sdpa")
    torch.manual_seed(0)
    ours = glm.ChatGLMForConditionalGeneration(config)
    models = {}
    if "native" in which:
        native_config = convert_glm.glm_config_to_native(config)
        native_config._attn_implementation = "sdpa"
        native = GlmForCausalLM(native_config)
        native.load_state_dict(convert_glm.glm_to_native_state_dict(ours.state_dict(), config), strict=True)
        models["native"] = native.to(device=device, dtype=dtype)
    if "ours" in which:
        models["ours"] = ours.to(device=device, dtype=dtype)
    for model in models.values():
        assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    return config, models


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def alternate(functions, repeats, device, warmup=1):
    """Median seconds of each function, run in ABBA order so that drifting machine load hits both alike."""
    names = list(functions)
    for _ in range(warmup):
        for name in names:
            functions[name]()
    times = {name: [] for name in names}
    for index in range(repeats):
        for name in (names if index % 2 == 0 else names[::-1]):
            synchronize(device)
            start = time.perf_counter()
            functions[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _matmul_probe(device, dtype):
    """One dense square matmul; returns (function, FLOPs per call)."""
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return (lambda: torch.mm(a, b)), 2 * n ** 3


def _matvec_probe(device, dtype):
    """One vector times a weight far larger than the caches, as a decoding step reads its weights; (function, bytes)."""
    rows, cols = (8192, 8192) if device.type == "cpu" else (32768, 16384)
    weight = torch.randn(rows, cols, device=device, dtype=dtype)
    vector = torch.randn(1, cols, device=device, dtype=dtype)
    return (lambda: F.linear(vector, weight)), weight.numel() * weight.element_size()


def matmul_peak(device, dtype, repeats):
    """Dense matmul FLOP/s (median of repeats)."""
    probe, flops = _matmul_probe(device, dtype)
    return flops / alternate({"mm": probe}, repeats, device)["mm"]


def matvec_bandwidth(device, dtype, repeats):
    """Bytes/s of weight streaming (median of repeats)."""
    probe, size = _matvec_probe(device, dtype)
    return size / alternate({"mv": probe}, max(repeats, 10), device)["mv"]


def matmul_parameters(model):
    """Parameters in matrix products: every 2-D weight except the token embedding (read one row per token)."""
    embedding = model.get_input_embeddings().weight
    return sum(p.numel() for p in model.parameters() if p.dim() == 2 and p is not embedding)


def training_flops_per_token(config):
    """6 per matmul parameter (forward + backward), plus causal attention: 6 * layers * q width * seq / 2 * 2."""
    attention_width = config.num_attention_heads * config.kv_channels
    return 6 * config.num_layers * attention_width * TRAIN_LEN  # matmul parameters added by the caller


def train_step(model, ids, optimizer):
    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def make_optimizer(model):
    # The same optimizer for both; fused is the fastest AdamW on CPU and GPU alike.
    return torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)


# ---------------------------------------------------------------------------------------------------------------
# Memory: one model, one fresh process


def _proc_status(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def memory_child(which, name, device, dtype):
    """Peak memory of one training step of one model, in this (fresh) process.

    CUDA: torch's allocator peak. CPU: the kernel's resident high-water mark (VmHWM), reset through
    /proc/self/clear_refs after a warm-up step, with glibc's mmap threshold pinned low (set by the parent) so that
    every tensor is its own mapping and freed memory leaves the process at once. Returns bytes above the process
    before the model existed: `total` (weights + gradients + AdamW state + activations at the step's peak) and `step`
    (the peak above what the model holds between steps: activations, gradients, transients).
    """
    ids = torch.randint(3, CONFIGS[name]["padded_vocab_size"], (TRAIN_BATCH, TRAIN_LEN), device=device)
    gc.collect()
    cuda = device.type == "cuda"
    base = torch.cuda.memory_allocated() if cuda else _proc_status("VmRSS")
    _, models = build_pair(name, device, dtype, which=(which,))
    model = models[which].train()
    optimizer = make_optimizer(model)
    step = train_step(model, ids, optimizer)
    step()  # creates the AdamW state
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM to the current RSS
        before = _proc_status("VmRSS")
    step()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _proc_status("VmHWM")
    return {"total": peak - base, "step": peak - before}


def measure_memory(name, device, dtype, threads):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", PYTHONPATH=str(ROOT))
    results = {}
    for which in ("native", "ours"):
        command = [sys.executable, __file__, "--memory-child", which, "--configs", name, "--device", device.type,
                   "--dtype", str(dtype).split(".")[-1], "--threads", str(threads)]
        output = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if output.returncode != 0:
            raise RuntimeError(f"memory child {which} failed:\n{output.stderr[-3000:]}")
        results[which] = json.loads(output.stdout.strip().splitlines()[-1])
    return results


# ---------------------------------------------------------------------------------------------------------------


def run_config(name, args, device, dtype, limits):
    config, models = build_pair(name, device, dtype)
    ours, native = models["ours"], models["native"]
    matmul_params = matmul_parameters(ours)
    assert matmul_params == matmul_parameters(native)
    weight_bytes = matmul_params * torch.finfo(dtype).bits // 8
    total_params = sum(p.numel() for p in ours.parameters())
    vocab = config.padded_vocab_size
    rows = []  # (metric, native, ours, ratio, note)
    generator = torch.Generator().manual_seed(1)

    if "train" in args.sections:
        ids = torch.randint(3, vocab, (TRAIN_BATCH, TRAIN_LEN), generator=generator).to(device)
        steps = {key: train_step(model.train(), ids, make_optimizer(model)) for key, model in models.items()}
        # The matmul peak is measured between the steps too, so that MFU divides figures taken under the same load.
        probe, probe_flops = _matmul_probe(device, dtype)
        steps["peak"] = lambda: [probe() for _ in range(3)]
        seconds = alternate(steps, args.repeats, device)
        peak = 3 * probe_flops / seconds.pop("peak")
        del steps
        # Training moved the weights, differently for each model: the inference sections start again from equal ones.
        del models, ours, native
        gc.collect()
        _, models = build_pair(name, device, dtype)
        gc.collect()
        tokens = TRAIN_BATCH * TRAIN_LEN
        flops = (6 * matmul_params + training_flops_per_token(config)) * tokens
        speed = {key: tokens / s for key, s in seconds.items()}
        rows.append(("train tokens/s", speed["native"], speed["ours"], speed["ours"] / speed["native"], ""))
        mfu = {key: flops / s / peak for key, s in seconds.items()}
        rows.append(("train MFU (% of matmul peak)", 100 * mfu["native"], 100 * mfu["ours"],
                     mfu["ours"] / mfu["native"], f"peak {peak / 1e9:.0f} GFLOP/s between the steps"))

    if "memory" in args.sections:
        memory = measure_memory(name, device, dtype, args.threads)
        for key, label in (("total", "train peak MB (total)"), ("step", "train peak MB (above state)")):
            a, b = memory["native"][key] / 2 ** 20, memory["ours"][key] / 2 ** 20
            rows.append((label, a, b, b / a, "lower is better"))

    for model in models.values():
        model.eval()

    if "prefill" in args.sections:
        ids = torch.randint(3, vocab, (1, PREFILL_LEN), generator=generator).to(device)

        def prefill(model):
            def run():
                with torch.no_grad():
                    model(input_ids=ids, use_cache=True, logits_to_keep=1)
            return run

        seconds = alternate({key: prefill(model) for key, model in models.items()}, args.repeats, device)
        speed = {key: PREFILL_LEN / s for key, s in seconds.items()}
        rows.append((f"prefill {PREFILL_LEN} tokens/s", speed["native"], speed["ours"],
                     speed["ours"] / speed["native"], ""))

    for batch in (1, 8):
        if f"gen{batch}" not in args.sections:
            continue
        ids = torch.randint(3, vocab, (batch, PROMPT_LEN), generator=generator).to(device)
        mask = torch.ones_like(ids)
        outputs = {}

        def generate(key, model):
            def run():
                outputs[key] = model.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                              min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0,
                                              eos_token_id=None)
            return run

        runs = {key: generate(key, model) for key, model in models.items()}
        probe, probe_bytes = _matvec_probe(device, dtype)
        runs["bandwidth"] = lambda: [probe() for _ in range(10)]
        seconds = alternate(runs, args.repeats, device)
        bandwidth = 10 * probe_bytes / seconds.pop("bandwidth")
        same = (outputs["ours"] == outputs["native"]).float().mean().item()
        new_tokens = batch * args.new_tokens
        speed = {key: new_tokens / s for key, s in seconds.items()}
        rows.append((f"generate b{batch} tokens/s", speed["native"], speed["ours"], speed["ours"] / speed["native"],
                     f"tokens identical: {100 * same:.1f}%"))
        bound = batch * bandwidth / weight_bytes  # tokens/s if only weight reads took time
        rows.append((f"generate b{batch} % of weight-streaming bound", 100 * speed["native"] / bound,
                     100 * speed["ours"] / bound, speed["ours"] / speed["native"],
                     f"bound {bound:.0f} tokens/s: {weight_bytes / 2 ** 20:.0f} MB/step at {bandwidth / 1e9:.1f} GB/s"))
    if "compiled" in args.sections:
        rows.extend(compiled_rows(models, vocab, args, device, weight_bytes, generator))
    if "longctx" in args.sections:
        rows.extend(long_context_rows(models, vocab, args, device, generator))
    if "packing" in args.sections:
        rows.extend(packing_rows(config, models["ours"], args, device, dtype))
    return {"config": name, "parameters": total_params, "rows": rows}


def _compile_config(args, device):
    from transformers import CompileConfig

    if args.compile_options:  # torch.compile takes a mode or options, not both
        compile_config = CompileConfig(fullgraph=True, mode=None, options=json.loads(args.compile_options))
    else:
        compile_config = CompileConfig(fullgraph=True, mode="default" if device.type == "cpu" else "reduce-overhead")
    compile_config._compile_all_devices = True  # generate() compiles only on GPUs unless told to (CPU runs)
    return compile_config


def long_context_rows(models, vocab, args, device, generator):
    """Compiled batch-1 decoding after a --long-context prompt, where every step's attention reads the whole cache.
    Decode-only tokens/s: the difference of two generate() lengths, so that the (eager) prefill cancels. Ours and
    native compiled the same way, each with one StaticCache of fixed length passed in (reset before every call, so
    both lengths run the same graph), and native's default eager generate() (DynamicCache)."""
    from transformers.cache_utils import StaticCache

    context, short = args.long_context, 8
    long = short + args.compiled_new_tokens
    ids = torch.randint(3, vocab, (1, context), generator=generator).to(device)
    compile_config = _compile_config(args, device)
    caches = {f"{key} compiled": StaticCache(config=models[key].config, max_cache_len=context + long)
              for key in ("native", "ours")}
    outputs = {}

    def generate(key, new):
        model = models[key.split()[0]]

        def run():
            extra = {}
            if key in caches:
                caches[key].reset()
                extra = {glm.modeling.CACHE_FIELD: caches[key], "compile_config": compile_config}
            outputs[key] = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                          min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None,
                                          **extra)
        return run

    keys = ("native eager", "native compiled", "ours compiled")
    runs = {(key, new): generate(key, new) for key in keys for new in (short, long)}
    seconds = alternate(runs, args.repeats, device, warmup=1)  # the warm-up compiles
    speed = {key: (long - short) / (seconds[(key, long)] - seconds[(key, short)]) for key in keys}
    same = (outputs["ours compiled"] == outputs["native eager"]).float().mean().item()
    print(f"# compiled b1 decode at {context} context: {speed} tokens/s", flush=True)
    return [
        (f"compiled b1 @{context} ctx vs native eager", speed["native eager"], speed["ours compiled"],
         speed["ours compiled"] / speed["native eager"], f"decode tokens/s; tokens identical: {100 * same:.1f}%"),
        (f"compiled b1 @{context} ctx vs native compiled", speed["native compiled"], speed["ours compiled"],
         speed["ours compiled"] / speed["native compiled"], "decode tokens/s"),
    ]


def compiled_rows(models, vocab, args, device, weight_bytes, generator):
    """Static cache + fullgraph compile for both models, and native's default eager generate()."""
    compile_config = _compile_config(args, device)
    new = args.compiled_new_tokens
    rows = []
    for batch in (1, 8):
        ids = torch.randint(3, vocab, (batch, PROMPT_LEN), generator=generator).to(device)
        outputs, compile_seconds = {}, {}

        def generate(key, model, compiled):
            extra = dict(cache_implementation="static", compile_config=compile_config) if compiled else {}

            def run():
                outputs[key] = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                              min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None,
                                              **extra)
            return run

        runs = {"native eager": generate("native eager", models["native"], False),
                "native compiled": generate("native compiled", models["native"], True),
                "ours compiled": generate("ours compiled", models["ours"], True)}
        for key in ("native compiled", "ours compiled"):  # the first call compiles
            torch._dynamo.reset()
            start = time.perf_counter()
            runs[key]()
            synchronize(device)
            compile_seconds[key] = time.perf_counter() - start
        seconds = alternate(runs, args.repeats, device, warmup=0)
        for key in compile_seconds:
            compile_seconds[key] -= seconds[key]
        speed = {key: batch * new / s for key, s in seconds.items()}
        same = (outputs["ours compiled"] == outputs["native eager"]).float().mean().item()
        bound = batch * limits_bandwidth(device, args) / weight_bytes
        rows.append((f"compiled b{batch} vs native eager tokens/s", speed["native eager"], speed["ours compiled"],
                     speed["ours compiled"] / speed["native eager"], f"tokens identical: {100 * same:.1f}%"))
        rows.append((f"compiled b{batch} vs native compiled tokens/s", speed["native compiled"],
                     speed["ours compiled"], speed["ours compiled"] / speed["native compiled"], ""))
        rows.append((f"compiled b{batch} % of weight-streaming bound", 100 * speed["native compiled"] / bound,
                     100 * speed["ours compiled"] / bound, speed["ours compiled"] / speed["native compiled"],
                     f"bound {bound:.0f} tokens/s"))
        print(f"# compiled b{batch}: {speed} tokens/s, compile {compile_seconds} s, bound {bound:.0f}", flush=True)
        rows.append((f"compiled b{batch} compile seconds", compile_seconds["native compiled"],
                     compile_seconds["ours compiled"],
                     compile_seconds["ours compiled"] / max(compile_seconds["native compiled"], 1e-9),
                     "first call minus a timed call"))
    return rows


def limits_bandwidth(device, args):
    return matvec_bandwidth(device, args.dtype_obj, 3)


def packing_rows(config, model, args, device, dtype, batch=32, block=256):
    """Real (non-pad) training tokens/s on the built-in skill data: padded rows against packed rows."""
    import datasets

    from glm_train import loop
    from glm_train.data import batches, builtin, preprocess, sources

    conversations = args.packing_conversations
    rows_data, _ = builtin.skill_splits(n_train=conversations, n_heldout=2, seed=0)
    tokenizer = glm.tokenization.train_glm_tokenizer(list(sources.conversation_texts(rows_data)), vocab_size=800)
    tokenized, _ = preprocess.tokenize_sft(datasets.Dataset.from_list(rows_data), tokenizer, "conversations",
                                           block)
    packed = preprocess.pack_sft(tokenized, block)
    padded_batches = [batches.Collator(tokenizer.pad_token_id)(list(tokenized.select(range(i, min(i + batch,
                      len(tokenized)))))) for i in range(0, len(tokenized), batch)]
    # The same tokens in packed rows, at the padded run's tokens per step (rows of `block`).
    rows_per_step = max(1, sum(b["input_ids"].numel() for b in padded_batches) // len(padded_batches) // block)
    packed_batches = [batches.PackedCollator(tokenizer.pad_token_id)(list(packed.select(range(i, min(
                      i + rows_per_step, len(packed)))))) for i in range(0, len(packed), rows_per_step)]
    real = sum(len(r) for r in tokenized["input_ids"])
    model.train()
    optimizer = make_optimizer(model)

    def epoch(batches):
        def run():
            for b in batches:
                b = {k: v.to(device) for k, v in b.items()}
                loss, count = loop.token_loss_sum(model, b)
                (loss / count).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return run

    seconds = alternate({"padded": epoch(padded_batches), "packed": epoch(packed_batches)}, args.repeats, device)
    model.eval()
    padded_tokens = sum(b["input_ids"].numel() for b in padded_batches)
    packed_tokens = sum(b["input_ids"].numel() for b in packed_batches)
    return [("SFT train real tokens/s: padded | packed", real / seconds["padded"], real / seconds["packed"],
             seconds["padded"] / seconds["packed"],
             f"{conversations} conversations; padded {padded_tokens} / packed {packed_tokens} tokens for {real} "
             f"real; {len(padded_batches)} vs {len(packed_batches)} steps")]


def print_table(result, header):
    print(f"\n## {result['config']}: {result['parameters'] / 1e6:.1f}M parameters, {header}")
    print(f"| {'metric':<42} | {'native':>10} | {'ours':>10} | {'ours/native':>11} | note")
    print(f"|{'-' * 44}|{'-' * 12}|{'-' * 12}|{'-' * 13}|------")
    for metric, a, b, ratio, note in result["rows"]:
        print(f"| {metric:<42} | {a:>10.1f} | {b:>10.1f} | {ratio:>10.2f}x | {note}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=None, help=f"comma-separated, of {sorted(CONFIGS)} "
                        "(default small,large on CPU; small,1b on CUDA)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="default float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per model (default 5, --quick 3)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--compiled-new-tokens", type=int, default=64, help="new tokens of the compiled rows")
    parser.add_argument("--long-context", type=int, default=2048, help="prompt tokens of the longctx rows")
    parser.add_argument("--compile-options", default=None, help="inductor options for the compiled rows, as JSON "
                        "(e.g. '{\"cpp_wrapper\": true}'), instead of mode default (CPU) / reduce-overhead (CUDA)")
    parser.add_argument("--packing-conversations", type=int, default=128, help="built-in conversations of the "
                        "packing rows (padded: 32 per step)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="the small config only, 3 repeats")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--memory-child", choices=("ours", "native"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.configs, device, dtype)))
        return
    if args.configs is None:
        args.configs = "small" if args.quick else ("small,large" if device.type == "cpu" else "small,1b")
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.sections = set(args.sections.split(","))
    args.dtype_obj = dtype
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    import platform

    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    machine = torch.cuda.get_device_name() if device.type == "cuda" else f"{cpu}, {args.threads} threads"
    limits = {"flops": matmul_peak(device, dtype, args.repeats), "bandwidth": matvec_bandwidth(device, dtype,
                                                                                               args.repeats)}
    header = f"{str(dtype).split('.')[-1]}, {machine}, sdpa, torch {torch.__version__}, " \
             f"transformers {transformers.__version__}"
    print(f"# {header}")
    print(f"# measured limits: matmul {limits['flops'] / 1e9:.1f} GFLOP/s, matrix-vector "
          f"{limits['bandwidth'] / 1e9:.1f} GB/s; {args.repeats} alternating repeats, medians", flush=True)
    results = []
    for name in args.configs.split(","):
        start = time.time()
        result = run_config(name, args, device, dtype, limits)
        print_table(result, f"{time.time() - start:.0f} s")
        sys.stdout.flush()
        results.append(result)
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "limits": limits, "results": results}, indent=1))


if __name__ == "__main__":
    main()
