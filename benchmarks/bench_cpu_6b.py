"""chatglm3-6b at its real width on a CPU: every route to chat with it, side by side in one run, extrapolated to the
28 layers of the published model.

    flock /tmp/glm-cpu.lock python benchmarks/bench_cpu_6b.py --layers 2,4            # ~10 minutes on 2 cores
    python benchmarks/bench_cpu_6b.py --layers 2,4 --routes ours-fp32,llama-q4_0       # a few routes

For each layer count it builds a THUDM-format folder (benchmarks/thudm_folder.py: random fp16 weights in 2 GB .bin
shards with their index, hidden 4096, ffn 13696, vocab 65024, 2 K/V groups), `convert_glm.py --to code` in place,
`--to native` beside it, and llama.cpp GGUFs (its convert_hf_to_gguf.py to f16, then llama.cpp's own quantizer to
q8_0 and q4_0: scripts/quantize_gguf.py, through the cached llama-cpp-python). Then each route runs alone in a
fresh process:

  ours-<dtype>     AutoModelForCausalLM with our code, dtype fp32, bf16 or fp16 (fp16 is what dtype="auto" gives)
  ours-int8/int4   the same in bf16 with transformers' TorchAoConfig (weight-only int8 / int4 applied while loading)
  native-<dtype>   transformers' GlmForCausalLM on the --to native folder
  llama-<type>     llama.cpp (llama-cpp-python) on the f16 / q8_0 / q4_0 GGUF

and reports: load seconds; peak RSS of the load (VmHWM, what the machine must have) and RSS after it; prefill
tokens/s of a --prompt-token forward; decode ms/token (the difference of two greedy generations, so the prefill
cancels) against the weight-streaming bound (the bytes of every matrix a step reads, at the matrix-vector
bandwidth measured in this run); and the greedy tokens' agreement with ours-fp32. The last table extrapolates each
figure linearly in the layer count to 28 layers and prints the ratios ours/native and route/llama.cpp.

Before each route it estimates the route's peak memory and refuses to start one that would not fit in the
machine's available memory (MemAvailable, less --reserve-gib), saying so with the numbers.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_model import _proc_status as proc_status  # noqa: E402
from benchmarks.bench_quantize import weight_bytes  # noqa: E402
from benchmarks.thudm_folder import build_thudm_folder  # noqa: E402

LAYERS_6B = 28
ENGINE = Path(os.environ.get("GLM_ENGINES_CACHE", Path.home() / ".cache" / "glm-hf-engines")) / \
    "llama-cpp-python-0.3.36"
CONVERTERS = Path(os.environ.get("GLM_CONVERTERS_CACHE", Path.home() / ".cache" / "glm-hf-converters"))
ROUTES = ("ours-fp32", "ours-bf16", "ours-fp16", "ours-int8", "ours-int4", "native-fp32", "native-bf16",
          "native-fp16", "llama-f16", "llama-q8_0", "llama-q4_0")
# Peak RSS of each route as a multiple of the fp16 checkpoint's bytes (measured in this script's first runs, rounded
# up), plus a fixed 1 GiB: what the refusal compares with the available memory.
PEAK_PER_CHECKPOINT = {"fp32": 3.3, "bf16": 2.3, "fp16": 1.3, "int8": 2.3, "int4": 2.3,
                       "f16": 1.2, "q8_0": 0.7, "q4_0": 0.45}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def mem_available():
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise KeyError("MemAvailable")


def matvec_bandwidth(repeats=10):
    """Bytes/s of an fp32 256 MB weight times one vector (what a decoding step does), median of repeats."""
    weight, vector = torch.randn(8192, 8192), torch.randn(1, 8192)
    F.linear(vector, weight)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        F.linear(vector, weight)
        times.append(time.perf_counter() - start)
    return weight.numel() * 4 / sorted(times)[len(times) // 2]


# ---------------------------------------------------------------- the folders


def prepare(workdir: Path, layers: int, routes):
    """The THUDM folder with our code, and the native folder and GGUFs the routes need (made once, reused)."""
    folder = workdir / f"chatglm3-{layers}l"
    if not (folder / "modeling_glm.py").exists():
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        build_thudm_folder(folder, num_layers=layers)
        run([sys.executable, str(ROOT / "convert_glm.py"), "--to", "code", str(folder), str(folder)])
    native = workdir / f"chatglm3-{layers}l-native"
    if any(r.startswith("native") for r in routes) and not (native / "config.json").exists():
        run([sys.executable, str(ROOT / "convert_glm.py"), "--to", "native", str(folder), str(native),
             "--overwrite"])
    ggufs = {}
    if any(r.startswith("llama") for r in routes):
        f16 = workdir / f"chatglm3-{layers}l-f16.gguf"
        if not f16.exists():
            converter = CONVERTERS / "llama-cpp-python-0.3.36" / "convert_hf_to_gguf.py"
            if not converter.exists():
                raise SystemExit(f"{converter} is missing: python tests/engine_converters.py fetches it")
            run([sys.executable, str(converter), str(folder), "--outfile", str(f16) + ".tmp", "--outtype", "f16"])
            os.replace(str(f16) + ".tmp", f16)
        ggufs["f16"] = f16
        for kind in ("q8_0", "q4_0"):
            target = workdir / f"chatglm3-{layers}l-{kind}.gguf"
            if not target.exists():
                run([sys.executable, str(ROOT / "scripts" / "quantize_gguf.py"), str(f16), str(target), kind],
                    pythonpath=ENGINE)
            ggufs[kind] = target
    return folder, native, ggufs


def run(command, pythonpath=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"PYTHONPATH": str(pythonpath)} if pythonpath else {})}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, command))} failed:\n{(result.stdout + result.stderr)[-3000:]}")
    return result.stdout


# ---------------------------------------------------------------- one route, in its own process


def child_transformers(route, folder, native_folder, prompt_len, new_tokens):
    kind, which = route.split("-")[1], route.split("-")[0]
    extras = os.environ.get("GLM_EXTRAS")  # scripts/test.sh keeps the optional torchao outside site-packages
    if extras and extras not in sys.path:
        sys.path.append(extras)
    from transformers import AutoModelForCausalLM, GlmForCausalLM, TorchAoConfig

    extra = {}
    if kind in ("int8", "int4"):
        from quantization_glm import torchao_config

        extra["quantization_config"] = TorchAoConfig(torchao_config(int(kind[3:]), "cpu"))
    dtype = DTYPES.get(kind, torch.bfloat16)
    before = proc_status("VmRSS")
    start = time.perf_counter()
    if which == "ours":
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=dtype, **extra)
    else:
        model = GlmForCausalLM.from_pretrained(native_folder, dtype=dtype)
    load = time.perf_counter() - start
    figures = {"load_s": load, "peak_load": proc_status("VmHWM"), "rss_loaded": proc_status("VmRSS"),
               "before": before}
    model.eval()
    embedding = model.get_input_embeddings().weight
    figures["step_bytes"] = sum(weight_bytes(m.weight) for m in model.modules()
                                if isinstance(m, torch.nn.Linear) and m.weight is not embedding)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 60000, (1, prompt_len), generator=generator)
    short = prompt[:, :8]
    settings = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        model(short)  # warm-up
        start = time.perf_counter()
        model(prompt)
        figures["prefill_s"] = time.perf_counter() - start
        times = {}
        for count in (1, 1 + new_tokens):
            start = time.perf_counter()
            ids = model.generate(short, max_new_tokens=count, min_new_tokens=count, **settings)
            times[count] = time.perf_counter() - start
    figures["decode_s"] = (times[1 + new_tokens] - times[1]) / new_tokens
    figures["tokens"] = ids[0, short.shape[1]:].tolist()  # the 1 + new_tokens greedy tokens after 8 prompt ids
    figures["peak_run"] = proc_status("VmHWM")
    return figures


def child_llama(route, gguf, prompt_len, new_tokens):
    sys.path.insert(0, str(ENGINE))
    import llama_cpp
    import numpy
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf))
    step_bytes = sum(int(t.n_bytes) for t in reader.tensors if t.name != "token_embd.weight" and
                     len(t.shape) == 2)
    del reader
    before = proc_status("VmRSS")
    start = time.perf_counter()
    # use_mmap off: the weights are read into memory as a user's chat would have them (and RSS shows it)
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=512, n_threads=torch.get_num_threads(), n_batch=512,
                          verbose=False, use_mmap=False)
    load = time.perf_counter() - start
    figures = {"load_s": load, "peak_load": proc_status("VmHWM"), "rss_loaded": proc_status("VmRSS"),
               "before": before, "step_bytes": step_bytes}
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 60000, (prompt_len,), generator=generator).tolist()
    short = prompt[:8]
    llm.eval(short)  # warm-up
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    figures["prefill_s"] = time.perf_counter() - start
    times, tokens = {}, []
    for count in (1, 1 + new_tokens):
        llm.reset()
        start = time.perf_counter()
        llm.eval(short)
        tokens = []
        for _ in range(count):
            # the last position's logits (Llama.scores holds them only with logits_all, which slows the prefill)
            logits = numpy.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
            token = int(logits.argmax())
            tokens.append(token)
            if len(tokens) < count:
                llm.eval([token])
        times[count] = time.perf_counter() - start
    figures["decode_s"] = (times[1 + new_tokens] - times[1]) / new_tokens
    figures["tokens"] = tokens
    figures["peak_run"] = proc_status("VmHWM")
    return figures


def measure(route, folder, native, ggufs, args):
    """Run one route in a fresh process (its own threads, its own peak RSS); its figures, or None if refused."""
    kind = route.split("-")[1]
    checkpoint = sum(p.stat().st_size for p in folder.glob("*.bin"))
    need = PEAK_PER_CHECKPOINT[kind] * checkpoint + 2**30
    available = mem_available() - args.reserve_gib * 2**30
    if need > available:
        print(f"  {route}: refused: it needs about {need / 2**30:.1f} GiB ({PEAK_PER_CHECKPOINT[kind]}x the "
              f"{checkpoint / 2**30:.2f} GiB checkpoint + 1 GiB), and {mem_available() / 2**30:.1f} GiB is "
              f"available less the {args.reserve_gib} GiB reserve; give fewer --layers", flush=True)
        return None
    command = [sys.executable, __file__, "--child", route, str(folder), str(native),
               str(ggufs.get(kind, "")), str(args.prompt), str(args.new), str(args.threads)]
    return json.loads(run(command).strip().splitlines()[-1])


# ---------------------------------------------------------------- the report


def extrapolate(by_layers: dict, key, layers=LAYERS_6B):
    """A figure at `layers` layers from its values at the measured layer counts (the line through the first and
    last)."""
    counts = sorted(by_layers)
    low, high = counts[0], counts[-1]
    a, b = by_layers[low][key], by_layers[high][key]
    return b + (b - a) / (high - low) * (layers - high)


def rows_of(figures, prompt):
    """The reported figures of one route at one layer count. Peak RSS is the process's high-water mark over load
    and generation (an fp16 load maps the checkpoint and reads it in at the first forward)."""
    row = {"load s": figures["load_s"], "peak RSS GiB": figures["peak_run"] / 2**30,
           "prefill tok/s": prompt / figures["prefill_s"], "decode ms/tok": figures["decode_s"] * 1000,
           "bound ms/tok": figures["step_bytes"] / figures["bandwidth"] * 1000, "prefill s": figures["prefill_s"],
           "checkpoint": figures["checkpoint"]}
    row["% of bound"] = 100 * row["bound ms/tok"] / row["decode ms/tok"]
    return row


def print_rows(title, rows, columns):
    print(f"\n{title}")
    print(f"| route | {' | '.join(columns)} |")
    print("|---|" + "---:|" * len(columns))
    for route, row in rows.items():
        cells = [f"{row[c]:.2f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        print(f"| {route} | {' | '.join(cells)} |")


def report(results: dict, prompt: int, full_checkpoint: int):
    """Tables per layer count, the 28-layer extrapolation and the ratios, from {route: {layers: figures}}."""
    layer_counts = sorted({n for by_layers in results.values() for n in by_layers})
    reference = results.get("ours-fp32", {})
    columns = ["load s", "peak RSS GiB", "prefill tok/s", "decode ms/tok", "bound ms/tok", "% of bound",
               "greedy = ours-fp32"]
    for layers in layer_counts:
        rows = {}
        for route, by_layers in results.items():
            if layers in by_layers:
                rows[route] = rows_of(by_layers[layers], prompt)
                if layers in reference:
                    same = sum(a == b for a, b in zip(by_layers[layers]["tokens"], reference[layers]["tokens"]))
                    rows[route]["greedy = ours-fp32"] = f"{same}/{len(reference[layers]['tokens'])}"
        print_rows(f"{layers} layers (measured)", rows, columns)
    extrapolated = {}
    for route, by_layers in results.items():
        if len(by_layers) < 2:
            continue
        per_count = {n: rows_of(f, prompt) for n, f in by_layers.items()}
        row = {c: extrapolate(per_count, c) for c in ("peak RSS GiB", "decode ms/tok", "bound ms/tok", "prefill s")}
        largest = per_count[max(per_count)]
        # Load time scales with the bytes read (a line through two short loads is mostly noise of the page cache).
        row["load s"] = largest["load s"] * full_checkpoint / largest["checkpoint"]
        row["prefill tok/s"] = prompt / row.pop("prefill s")
        row["% of bound"] = 100 * row["bound ms/tok"] / row["decode ms/tok"]
        row["fits 16 GB"] = "yes" if row["peak RSS GiB"] * 2**30 < 16e9 - 1.5 * 2**30 else "no"
        extrapolated[route] = row
    print_rows(f"extrapolated to {LAYERS_6B} layers (chatglm3-6b; load time scaled by checkpoint bytes; fits 16 GB: "
               "peak RSS under 16 GB less 1.5 GiB for the system)", extrapolated, columns[:6] + ["fits 16 GB"])
    print("\nratios at 28 layers (decode time per token, prefill tokens/s, peak RSS):")
    for route, row in extrapolated.items():
        which, kind = route.split("-")
        for other in ([f"native-{kind}"] if which == "ours" else []) + ["llama-q4_0", "llama-q8_0"]:
            if other in extrapolated and other != route:
                o = extrapolated[other]
                print(f"  {route} / {other}: decode time {row['decode ms/tok'] / o['decode ms/tok']:.2f}x, prefill "
                      f"{row['prefill tok/s'] / o['prefill tok/s']:.2f}x, peak RSS "
                      f"{row['peak RSS GiB'] / o['peak RSS GiB']:.2f}x")
    return extrapolated


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="2,4", help="layer counts to build and measure (two or more: the 28-layer "
                        "figures are extrapolated from them)")
    parser.add_argument("--routes", default=",".join(ROUTES), help=f"comma-separated, of {', '.join(ROUTES)}")
    parser.add_argument("--prompt", type=int, default=64, help="prefill tokens")
    parser.add_argument("--new", type=int, default=8, help="decoded tokens timed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/glm-bench-cpu-6b", help="where the folders are built (kept)")
    parser.add_argument("--reserve-gib", type=float, default=2.0, help="memory left to the rest of the machine")
    parser.add_argument("--json", help="write every figure here")
    parser.add_argument("--report", nargs="+", metavar="JSON", help="print the tables of earlier runs' --json files "
                        "instead of measuring (a later file's routes replace an earlier one's)")
    args = parser.parse_args(argv)
    full_checkpoint = json.loads((ROOT / "tests" / "fixtures" / "reference" / "chatglm3-6b" /
                                  "pytorch_model.bin.index.json").read_text())["metadata"]["total_size"]
    if args.report:
        results = {}
        for file in args.report:
            saved = json.loads(Path(file).read_text())
            print(f"{file}: load average {saved['load'][0]} before, {saved['load'][1]} after")
            for route, by_layers in saved["results"].items():
                results[route] = {int(n): figures for n, figures in by_layers.items()}
        report(results, saved["prompt"], full_checkpoint)
        return
    torch.set_num_threads(args.threads)
    layer_counts = [int(n) for n in args.layers.split(",")]
    routes = [r for r in args.routes.split(",") if r]
    unknown = set(routes) - set(ROUTES)
    if unknown or len(layer_counts) < 2:
        parser.error(f"unknown routes {sorted(unknown)}" if unknown else "--layers needs two or more counts")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with open("/proc/loadavg") as f:
        load_before = " ".join(f.read().split()[:3])
    bandwidth = matvec_bandwidth()
    print(f"torch {torch.__version__}, {args.threads} threads, load average before {load_before}; "
          f"fp32 matrix-vector bandwidth {bandwidth / 1e9:.1f} GB/s; MemAvailable {mem_available() / 2**30:.1f} GiB",
          flush=True)
    results = {}
    for layers in layer_counts:
        folder, native, ggufs = prepare(workdir, layers, routes)
        checkpoint = sum(p.stat().st_size for p in folder.glob("*.bin"))
        print(f"\n{layers} layers: {folder} ({checkpoint / 2**30:.2f} GiB of fp16 .bin shards)", flush=True)
        for route in routes:
            figures = measure(route, folder, native, ggufs, args)
            if figures is not None:
                figures.update(bandwidth=bandwidth, checkpoint=checkpoint)
                results.setdefault(route, {})[layers] = figures
                print(f"  {route}: {json.dumps({k: v for k, v in figures.items() if k != 'tokens'})}", flush=True)
    with open("/proc/loadavg") as f:
        load_after = " ".join(f.read().split()[:3])
    report(results, args.prompt, full_checkpoint)
    print(f"\nload average before {load_before}, after {load_after}")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "load": [load_before, load_after],
                                               "prompt": args.prompt, "new": args.new}, indent=1))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        route, folder, native, gguf, prompt, new, threads = sys.argv[2:9]
        torch.set_num_threads(int(threads))
        if route.startswith("llama"):
            result = child_llama(route, gguf, int(prompt), int(new))
        else:
            result = child_transformers(route, folder, native, int(prompt), int(new))
        print(json.dumps(result))
    else:
        main()
