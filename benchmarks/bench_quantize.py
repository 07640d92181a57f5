"""model.quantize(8) / quantize(4) (torchao, weight-only) against full precision, side by side in one run.

    python benchmarks/bench_quantize.py            # ~4 minutes on 2 CPU cores
    python benchmarks/bench_quantize.py --layers 2 # more full-width blocks in the memory/speed model

Prints, for bf16 and fp32 weights:
  memory     bytes of the block matrices (query_key_value, dense, dense_h_to_4h, dense_4h_to_h) of blocks at
             ChatGLM3-6B width, the ratio to full precision, and what that makes of the whole 6B model (28 blocks,
             embeddings and output layer unquantized)
  decode     greedy generate() speed of that model (new tokens/s, batch 1), and the ratio to full precision
  agreement  on a small model trained on a Markov chain (so its logits have real margins): top-1 agreement of the
             logits with full precision on held-out sequences, the largest absolute logit difference, and the share of
             the quantized model's greedy tokens that full precision would also pick
"""

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from local_glm import glm  # noqa: E402

quantization_glm = sys.modules["glm_hf.quantization_glm"]
CHATGLM3 = dict(hidden_size=4096, ffn_hidden_size=13696, num_attention_heads=32, multi_query_group_num=2,
                kv_channels=128, padded_vocab_size=65024)
VOCAB = 128


def weight_bytes(tensor) -> int:
    """Storage of a weight, summing the inner tensors of a torchao quantized tensor."""
    names = getattr(tensor, "tensor_data_names", None)
    if names:
        return sum(weight_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def block_bytes(model) -> int:
    return sum(weight_bytes(module.weight) for name, module in model.named_modules()
               if name.endswith(quantization_glm.QUANTIZED_MATRICES))


def decode_speed(model, new_tokens=32) -> float:
    prompt = torch.randint(3, 1000, (1, 16))
    settings = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generate(prompt, max_new_tokens=4, **settings)  # warm-up
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **settings)
    return new_tokens / (time.perf_counter() - start)


def markov_batch(successors, rows, length, generator):
    """Sequences of a low-entropy Markov chain: each token has three successors, taken with p .5/.3/.2."""
    tokens = torch.empty(rows, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(3, VOCAB, (rows,), generator=generator)
    choice = torch.multinomial(torch.tensor([0.5, 0.3, 0.2]), rows * length, replacement=True,
                               generator=generator).view(rows, length)
    for t in range(1, length):
        tokens[:, t] = successors[tokens[:, t - 1], choice[:, t]]
    return tokens


def trained_small_model(steps, held_out_rows=32):
    """A small GLM trained on the chain (tests/test_chat.py uses it too), and held-out sequences."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    successors = torch.randint(3, VOCAB, (VOCAB, 3), generator=generator)
    config = glm.ChatGLMConfig(num_layers=2, hidden_size=128, num_attention_heads=8, multi_query_group_num=2,
                               kv_channels=16, ffn_hidden_size=256, padded_vocab_size=VOCAB, seq_length=256)
    model = glm.ChatGLMForConditionalGeneration(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        batch = markov_batch(successors, 8, 48, generator)
        model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), markov_batch(successors, held_out_rows, 48, generator)


def agreement(full, quantized, held_out):
    """Top-1 agreement of the logits, largest |logit difference|, logit range, and the share of the quantized
    model's greedy tokens that full precision also picks."""
    with torch.no_grad():
        reference, logits = full(held_out).logits.float(), quantized(held_out).logits.float()
    top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    prompts = held_out[:, :8]
    ids = quantized.generate(prompts, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        choice = full(ids).logits[:, prompts.shape[1] - 1:-1].argmax(-1)
    greedy = (choice == ids[:, prompts.shape[1]:]).float().mean().item()
    return top1, (logits - reference).abs().max().item(), reference.abs().max().item(), greedy


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=1, help="full-width blocks in the memory/speed model")
    parser.add_argument("--train-steps", type=int, default=100)
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    small, held_out = trained_small_model(args.train_steps)
    config = glm.ChatGLMConfig(num_layers=args.layers, **{**CHATGLM3, "padded_vocab_size": 1024})
    embedding_params = 2 * CHATGLM3["padded_vocab_size"] * CHATGLM3["hidden_size"]
    for dtype in (torch.bfloat16, torch.float32):
        torch.manual_seed(0)
        wide = glm.ChatGLMForConditionalGeneration(config).to(dtype).eval()
        full_bytes, full_speed = block_bytes(wide), decode_speed(wide)
        full_model_gb = (full_bytes / args.layers * 28 + embedding_params * wide.dtype.itemsize) / 1e9
        print(f"\n{str(dtype):15} block matrices {full_bytes / 1e6:9.1f} MB per {args.layers} block(s); "
              f"6B model {full_model_gb:5.1f} GB; decode {full_speed:6.2f} tok/s")
        full_small = copy.deepcopy(small).to(dtype)
        for bits in (8, 4):
            quantized = copy.deepcopy(wide).quantize(bits)
            size, speed = block_bytes(quantized), decode_speed(quantized)
            model_gb = (size / args.layers * 28 + embedding_params * wide.dtype.itemsize) / 1e9
            top1, max_diff, logit_range, greedy = agreement(full_small, copy.deepcopy(full_small).quantize(bits),
                                                            held_out)
            print(f"  int{bits}: block matrices {size / 1e6:9.1f} MB ({full_bytes / size:4.2f}x smaller); "
                  f"6B model {model_gb:5.1f} GB ({full_model_gb / model_gb:4.2f}x); decode {speed:6.2f} tok/s "
                  f"({speed / full_speed:4.2f}x)")
            print(f"        trained small model: top-1 agreement {top1:.4f}, max |logit diff| {max_diff:.3f} "
                  f"(logits up to {logit_range:.1f}), greedy-token agreement {greedy:.4f}")
            del quantized
        del wide


if __name__ == "__main__":
    main()
