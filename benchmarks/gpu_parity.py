"""Ours against transformers' native GlmForCausalLM on one device, for the GPU checks (scripts/gpu_check.sh).

    python benchmarks/gpu_parity.py --device cuda        # a CPU dry run: --device cpu

Same (converted) weights, sdpa, a left-padded batch of two rows. Prints one OK or DIFF line per check and exits 1 if
any differs:
  fp32 (TF32 off)   logits within 1e-4 of native's; greedy tokens equal to native's with the default (dynamic) cache,
                    with a static cache, and with a static cache + torch.compile(fullgraph=True) (mode
                    reduce-overhead on CUDA: CUDA graphs), the path the benchmark times;
  bf16              the largest logit error against our own fp32 logits is at most 1.5x native's (both round
                    differently; neither is the reference), and the compiled greedy tokens agree with our eager ones
                    on at least 90% of positions (reported, since one rounding flip changes the rest of a row).
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_model import _compile_config, build_pair  # noqa: E402


def left_padded(vocab, lengths, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    total = max(lengths)
    ids = torch.zeros(len(lengths), total, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, total - length:] = torch.randint(3, vocab, (length,), generator=generator)
        mask[row, total - length:] = 1
    return ids.to(device), mask.to(device)


def generate(model, ids, mask, new_tokens, **extra):
    return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=0, eos_token_id=None, **extra)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--config", default="small")
    parser.add_argument("--new-tokens", type=int, default=24)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    compile_config = _compile_config(argparse.Namespace(compile_options=None), device)
    failures = 0

    def report(ok, what):
        nonlocal failures
        failures += not ok
        print(f"{'OK  ' if ok else 'DIFF'} {what}", flush=True)

    config, models = build_pair(args.config, device, torch.float32)
    ours, native = models["ours"].eval(), models["native"].eval()
    ids, mask = left_padded(config.padded_vocab_size, [40, 23], device)
    real = mask.bool()
    with torch.no_grad():
        reference = ours(ids, attention_mask=mask).logits.float()
        error = (reference - native(ids, attention_mask=mask).logits.float())[real].abs().max().item()
    report(error <= 1e-4, f"fp32 logits: max |ours - native| = {error:.2e} (limit 1e-4)")
    eager = generate(ours, ids, mask, args.new_tokens)
    report(torch.equal(eager, generate(native, ids, mask, args.new_tokens)), "fp32 greedy tokens: ours == native")
    report(torch.equal(generate(ours, ids, mask, args.new_tokens, cache_implementation="static"), eager),
           "fp32 greedy tokens, static cache == dynamic")
    torch._dynamo.reset()
    for _ in range(2):  # the first call compiles (and on CUDA records the graphs), the second replays them
        compiled = generate(ours, ids, mask, args.new_tokens, cache_implementation="static",
                            compile_config=compile_config)
    report(torch.equal(compiled, eager), "fp32 greedy tokens, static cache + fullgraph compile == eager")

    # Fresh bf16 models (the same seeded weights, cast): 4.57's generate() keeps a static cache on the model and
    # would hand the fp32 one to a model converted in place.
    del ours, native, models
    _, models = build_pair(args.config, device, torch.bfloat16)
    ours_bf16, native_bf16 = models["ours"].eval(), models["native"].eval()
    with torch.no_grad():
        errors = {name: (reference - model(ids, attention_mask=mask).logits.float())[real].abs().max().item()
                  for name, model in (("ours", ours_bf16), ("native", native_bf16))}
    report(errors["ours"] <= 1.5 * errors["native"],
           f"bf16 logits: max error against our fp32 logits, ours {errors['ours']:.3f}, native {errors['native']:.3f}")
    eager = generate(ours_bf16, ids, mask, args.new_tokens)
    torch._dynamo.reset()
    generate(ours_bf16, ids, mask, args.new_tokens, cache_implementation="static", compile_config=compile_config)
    compiled = generate(ours_bf16, ids, mask, args.new_tokens, cache_implementation="static",
                        compile_config=compile_config)
    same = (compiled[:, ids.shape[1]:] == eager[:, ids.shape[1]:]).float().mean().item()
    report(same >= 0.9, f"bf16 greedy tokens, static cache + fullgraph compile vs eager: {100 * same:.1f}% equal")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
