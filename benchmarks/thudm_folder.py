"""A THUDM-format checkpoint folder at chatglm3-6b's real width with a chosen number of layers and random weights:
what tests/test_convert.py and benchmarks/bench_cpu_6b.py convert, load and run.

    >>> build_thudm_folder(Path("/tmp/glm3-2l"), num_layers=2)   # about 1.9 GB of fp16 .bin shards

The layout is THUDM/chatglm3-6b's: fp16 `pytorch_model-0000i-of-0000n.bin` shards filled in module order up to
`max_shard_size` (THUDM's are about 1.8 GB: 2 GB shards), `pytorch_model.bin.index.json`, the saved
`rotary_pos_emb.inv_freq`, the published config.json (auto_map naming THUDM's files) and tokenizer files.
"""

import json
import shutil
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "fixtures" / "reference" / "chatglm3-6b"


def thudm_config(num_layers: int) -> dict:
    """The published chatglm3-6b config.json with `num_layers` layers."""
    config = json.loads((REFERENCE / "config.json").read_text())
    config["num_layers"] = num_layers
    return config


def thudm_tensors(config: dict):
    """(name, shape, kind) of every tensor of a chatglm3-6b checkpoint, in the order THUDM's files hold them."""
    hidden, heads, head_dim = config["hidden_size"], config["num_attention_heads"], config["kv_channels"]
    qkv = heads * head_dim + 2 * config["multi_query_group_num"] * head_dim
    vocab, ffn = config["padded_vocab_size"], config["ffn_hidden_size"]
    yield "transformer.embedding.word_embeddings.weight", (vocab, hidden), "weight"
    yield "transformer.rotary_pos_emb.inv_freq", (head_dim // 4,), "inv_freq"
    for index in range(config["num_layers"]):
        prefix = f"transformer.encoder.layers.{index}."
        yield prefix + "input_layernorm.weight", (hidden,), "norm"
        yield prefix + "self_attention.query_key_value.weight", (qkv, hidden), "weight"
        yield prefix + "self_attention.query_key_value.bias", (qkv,), "bias"
        yield prefix + "self_attention.dense.weight", (hidden, heads * head_dim), "weight"
        yield prefix + "post_attention_layernorm.weight", (hidden,), "norm"
        yield prefix + "mlp.dense_h_to_4h.weight", (2 * ffn, hidden), "weight"
        yield prefix + "mlp.dense_4h_to_h.weight", (hidden, ffn), "weight"
    yield "transformer.encoder.final_layernorm.weight", (hidden,), "norm"
    yield "transformer.output_layer.weight", (vocab, hidden), "weight"


def _random_tensor(shape, kind, generator, head_dim):
    if kind == "inv_freq":
        return (1.0 / (10000 ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float32) / (head_dim // 2)))).half()
    if kind == "norm":
        return (1 + 0.1 * torch.randn(shape, generator=generator)).half()
    std = 0.02 if kind == "weight" else 0.1
    return torch.empty(shape, dtype=torch.float16).normal_(0, std, generator=generator)


def build_thudm_folder(folder: Path, num_layers: int, max_shard_size: int = 2 * 10**9, seed: int = 0) -> Path:
    """Write the folder (see the module docstring); one shard is in memory at a time. Returns `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    config = thudm_config(num_layers)
    generator = torch.Generator().manual_seed(seed)
    shards, current, size = [], {}, 0
    for name, shape, kind in thudm_tensors(config):
        tensor = _random_tensor(shape, kind, generator, config["kv_channels"])
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_size:
            shards.append(current)
            _save_shard(folder, len(shards), current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    shards.append(current)
    _save_shard(folder, len(shards), current)
    total = len(shards)
    weight_map, total_size = {}, 0
    for number, shard in enumerate(shards, start=1):
        final = folder / f"pytorch_model-{number:05d}-of-{total:05d}.bin"
        (folder / f"part-{number}.bin").rename(final)
        weight_map.update({name: final.name for name in shard})
        total_size += sum(t.numel() * t.element_size() for t in shard.values())
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(REFERENCE / "tokenizer_config.json", folder / "tokenizer_config.json")
    shutil.copy(ROOT / "tokenizer.model", folder / "tokenizer.model")
    return folder


def _save_shard(folder: Path, number: int, shard: dict) -> None:
    torch.save(shard, folder / f"part-{number}.bin")
    for name in shard:  # only the names stay: the shard's memory goes before the next one is made
        shard[name] = shard[name].to("meta")
