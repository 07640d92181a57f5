"""Convert a checkpoint between the GLM (THUDM) layout and transformers' native `GlmForCausalLM` layout.

The weight mapping lives here once; the tests and benchmarks import it.

    python convert_glm.py --to native path/to/chatglm3-6b path/to/chatglm3-6b-native   # drop trust_remote_code
    python convert_glm.py --to glm path/to/glm-native path/to/glm-remote-code             # back again
    python convert_glm.py --to code path/to/chatglm3-6b path/to/chatglm3-6b               # THUDM weights, our code

--to native and --to glm go tensor by tensor: one source shard open and one output tensor made at a time, so a
conversion needs the memory of the largest source shard, not of the model (at chatglm3-6b's width with 615 MiB
shards: 640 MiB above the imports, where the whole model is 1794 MiB; tests/test_convert.py measures it). The
files written are those that save_pretrained writes for the whole state dict, byte for byte.

The native model computes the same function (docs/architecture.md section 3): split q/k/v projections instead of the
fused query_key_value, the same gate-then-up fused MLP, partial_rotary_factor 0.5 and rope_theta = 10000 * rope_ratio.
"""

import argparse
import json
import math
import re
import shutil
from pathlib import Path

import torch

GLM_PREFIX = "transformer."
NATIVE_LAYER = "model.layers.{}."
GLM_LAYER = "transformer.encoder.layers.{}."

# Per-layer keys that only change their names (GLM name -> native name).
LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
TOP_RENAMES = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}


def _check_convertible(config) -> None:
    problems = [
        (not config.rmsnorm, "rmsnorm must be true"),
        (not config.post_layer_norm, "post_layer_norm must be true"),
        (config.add_bias_linear, "add_bias_linear must be false"),
        (config.apply_residual_connection_post_layernorm, "apply_residual_connection_post_layernorm must be false"),
        (config.pre_seq_len is not None, "pre_seq_len (P-tuning v2) has no native counterpart"),
    ]
    for bad, message in problems:
        if bad:
            raise ValueError(f"cannot convert to GlmForCausalLM: ChatGLMConfig.{message}")


def glm_config_to_native(config):
    """A `transformers.GlmConfig` equal in function to a ChatGLMConfig."""
    from transformers import GlmConfig

    _check_convertible(config)
    eos = config.eos_token_id
    return GlmConfig(
        vocab_size=config.padded_vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.kv_channels,
        max_position_embeddings=config.seq_length,
        rms_norm_eps=config.layernorm_epsilon,
        attention_bias=config.add_qkv_bias,
        attention_dropout=config.attention_dropout,
        rope_theta=10000.0 * config.rope_ratio,
        partial_rotary_factor=0.5,
        tie_word_embeddings=False,
        pad_token_id=config.pad_token_id,
        eos_token_id=eos,
        initializer_range=config.initializer_range,
    )


def native_config_to_glm(native, config_class):
    """A ChatGLMConfig (of `config_class`) equal in function to a `transformers.GlmConfig`."""
    # transformers 5.x keeps RoPE settings in rope_parameters; 4.57 has rope_theta / partial_rotary_factor.
    rope = dict(getattr(native, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(native, "rope_theta", 10000.0))
    factor = rope.get("partial_rotary_factor", getattr(native, "partial_rotary_factor", 0.5))
    if factor != 0.5:
        raise ValueError(f"cannot convert GlmConfig with partial_rotary_factor={factor}: GLM rotates half of each head")
    return config_class(
        padded_vocab_size=native.vocab_size,
        hidden_size=native.hidden_size,
        ffn_hidden_size=native.intermediate_size,
        num_layers=native.num_hidden_layers,
        num_attention_heads=native.num_attention_heads,
        multi_query_attention=True,
        multi_query_group_num=native.num_key_value_heads,
        kv_channels=native.head_dim,
        seq_length=native.max_position_embeddings,
        layernorm_epsilon=native.rms_norm_eps,
        add_qkv_bias=native.attention_bias,
        attention_dropout=native.attention_dropout,
        rope_ratio=theta / 10000.0,
        pad_token_id=native.pad_token_id,
        eos_token_id=native.eos_token_id,
        initializer_range=native.initializer_range,
    )


def glm_shapes(config) -> dict:
    """Every weight a GLM checkpoint of `config` holds, with its shape (docs/architecture.md section 2)."""
    hidden, q_size = config.hidden_size, config.num_attention_heads * config.kv_channels
    qkv = q_size + 2 * config.num_kv_heads * config.kv_channels
    shapes = {"transformer.embedding.word_embeddings.weight": (config.padded_vocab_size, hidden),
              "transformer.encoder.final_layernorm.weight": (hidden,),
              "transformer.output_layer.weight": (config.padded_vocab_size, hidden)}
    for index in range(config.num_layers):
        prefix = GLM_LAYER.format(index)
        shapes.update({prefix + "input_layernorm.weight": (hidden,),
                       prefix + "self_attention.query_key_value.weight": (qkv, hidden),
                       prefix + "self_attention.dense.weight": (hidden, q_size),
                       prefix + "post_attention_layernorm.weight": (hidden,),
                       prefix + "mlp.dense_h_to_4h.weight": (2 * config.ffn_hidden_size, hidden),
                       prefix + "mlp.dense_4h_to_h.weight": (hidden, config.ffn_hidden_size)})
        if config.add_qkv_bias:
            shapes[prefix + "self_attention.query_key_value.bias"] = (qkv,)
    return shapes


def native_shapes(native) -> dict:
    """Every weight a GlmForCausalLM checkpoint of the GlmConfig `native` holds, with its shape."""
    hidden, q_size = native.hidden_size, native.num_attention_heads * native.head_dim
    kv_size = native.num_key_value_heads * native.head_dim
    shapes = {"model.embed_tokens.weight": (native.vocab_size, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (native.vocab_size, hidden)}
    for index in range(native.num_hidden_layers):
        prefix = NATIVE_LAYER.format(index)
        shapes.update({prefix + "input_layernorm.weight": (hidden,), prefix + "post_attention_layernorm.weight":
                       (hidden,), prefix + "self_attn.q_proj.weight": (q_size, hidden),
                       prefix + "self_attn.k_proj.weight": (kv_size, hidden),
                       prefix + "self_attn.v_proj.weight": (kv_size, hidden),
                       prefix + "self_attn.o_proj.weight": (hidden, q_size),
                       prefix + "mlp.gate_up_proj.weight": (2 * native.intermediate_size, hidden),
                       prefix + "mlp.down_proj.weight": (hidden, native.intermediate_size)})
        if native.attention_bias:
            for proj, size in (("q_proj", q_size), ("k_proj", kv_size), ("v_proj", kv_size)):
                shapes[f"{prefix}self_attn.{proj}.bias"] = (size,)
    return shapes


def check_state_dict(shapes: dict, expected: dict, source, num_layers: int, skip=("inv_freq",)) -> None:
    """Refuse (ValueError naming the keys) a checkpoint whose tensors ({name: shape}) are not exactly those of its
    config.json: a missing tensor or output layer, an extra one, a wrong shape, or another layer count."""
    state_dict = {name: torch.Size(shape) for name, shape in shapes.items()}
    present = {name for name in state_dict if not name.endswith(skip)}
    missing, unexpected = sorted(set(expected) - present), sorted(present - set(expected))
    wrong = [f"{name} {tuple(state_dict[name])} (config.json: {expected[name]})" for name in sorted(present)
             if name in expected and tuple(state_dict[name]) != tuple(expected[name])]
    layers = {int(m.group(1)) for name in present if (m := re.search(r"\.layers\.(\d+)\.", name))}
    problems = []
    if layers and layers != set(range(num_layers)):
        problems.append(f"the weights hold {len(layers)} layers (indices {min(layers)}..{max(layers)}) but "
                        f"config.json says num_layers {num_layers}")
    for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if names:
            problems.append(f"{label}: " + ", ".join(names[:8]) + (f" and {len(names) - 8} more"
                                                                    if len(names) > 8 else ""))
    if problems:
        raise ValueError(f"{source}: the checkpoint does not match its config.json, nothing was written; "
                         + "; ".join(problems))


def glm_to_native_plan(names, config) -> dict:
    """How each GlmForCausalLM weight is made from GLM weights of the given names (in their order): {native name:
    (GLM name, rows)}, rows None for the whole tensor or (start, stop) for q, k or v out of query_key_value."""
    _check_convertible(config)
    q_size = config.num_attention_heads * config.kv_channels
    kv_size = config.num_kv_heads * config.kv_channels
    plan = {}
    for name in names:
        if name in TOP_RENAMES:
            plan[TOP_RENAMES[name]] = ((name, None),)
            continue
        if name.endswith("rotary_pos_emb.inv_freq"):
            continue  # recomputed from the config on both sides
        if not name.startswith("transformer.encoder.layers."):
            raise KeyError(f"unexpected GLM weight {name!r}")
        index, rest = name[len("transformer.encoder.layers."):].split(".", 1)
        prefix = NATIVE_LAYER.format(index)
        if rest in LAYER_RENAMES:
            plan[prefix + LAYER_RENAMES[rest]] = ((name, None),)
        elif rest.startswith("self_attention.query_key_value."):
            kind = rest.rsplit(".", 1)[1]  # weight or bias
            bounds = (0, q_size, q_size + kv_size, q_size + 2 * kv_size)
            for part, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                plan[f"{prefix}self_attn.{proj}.{kind}"] = ((name, (bounds[part], bounds[part + 1])),)
        else:
            raise KeyError(f"unexpected GLM weight {name!r}")
    return plan


def native_to_glm_plan(names, num_layers) -> dict:
    """The inverse of glm_to_native_plan: {GLM name: native names}, q/k/v fused back into query_key_value."""
    inverse_top = {v: k for k, v in TOP_RENAMES.items()}
    inverse_layer = {v: k for k, v in LAYER_RENAMES.items()}
    names, plan = list(names), {}
    for name in names:
        if name in inverse_top:
            plan[inverse_top[name]] = ((name, None),)
            continue
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if not name.startswith("model.layers."):
            raise KeyError(f"unexpected GlmForCausalLM weight {name!r}")
        index, rest = name[len("model.layers."):].split(".", 1)
        if rest in inverse_layer:
            plan[GLM_LAYER.format(index) + inverse_layer[rest]] = ((name, None),)
        elif not rest.startswith("self_attn.") or rest.split(".")[1] not in ("q_proj", "k_proj", "v_proj"):
            raise KeyError(f"unexpected GlmForCausalLM weight {name!r}")
    present = set(names)
    for index in range(num_layers):
        prefix = NATIVE_LAYER.format(index)
        for kind in ("weight", "bias"):
            parts = [f"{prefix}self_attn.{proj}.{kind}" for proj in ("q_proj", "k_proj", "v_proj")]
            if all(part in present for part in parts):
                plan[GLM_LAYER.format(index) + f"self_attention.query_key_value.{kind}"] = tuple(
                    (part, None) for part in parts)
    return plan


def _make_tensor(pieces, get):
    """One output tensor of a plan entry, from `get(name)` of the source tensors."""
    if len(pieces) == 1:
        name, rows = pieces[0]
        tensor = get(name)
        return tensor if rows is None else tensor[rows[0]:rows[1]].clone()  # own storage: safetensors refuses views
    return torch.cat([get(name) if rows is None else get(name)[rows[0]:rows[1]] for name, rows in pieces], dim=0)


def glm_to_native_state_dict(state_dict, config):
    """Rename GLM keys to GlmForCausalLM keys and split query_key_value into q/k/v (weights and biases)."""
    plan = glm_to_native_plan(state_dict, config)
    return {name: _make_tensor(pieces, state_dict.__getitem__) for name, pieces in plan.items()}


def native_to_glm_state_dict(state_dict, num_layers):
    """The inverse of glm_to_native_state_dict: fuse q/k/v back into query_key_value."""
    plan = native_to_glm_plan(state_dict, num_layers)
    return {name: _make_tensor(pieces, state_dict.__getitem__) for name, pieces in plan.items()}


# The safetensors format's dtype names (its header's "dtype").
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
# The order in which safetensors' save_file lays tensors out: by dtype in this order, then by name. Keeping it makes
# our files byte-identical to save_file's (tests/test_convert.py compares them).
_SAFETENSORS_ORDER = ("I64", "F64", "F32", "I32", "BF16", "F16", "I16", "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL")


def _safetensors_header(file: Path) -> dict:
    """The JSON header of a .safetensors file (8-byte little-endian length, then JSON): no tensor is read. A file
    shorter than its header says (a truncated copy) is refused naming it, before anything is written."""
    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(length))
        except ValueError as error:
            raise ValueError(f"{file} is damaged (truncated?): its header is not JSON ({error})") from None
    end = 8 + length + max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if file.stat().st_size < end:
        raise ValueError(f"{file} is truncated: {file.stat().st_size} bytes where its header needs {end}; copy or "
                         "download it again")
    return header


def _read_layout(folder: Path) -> dict:
    """{name: (file, shape, dtype)} of a folder's weights, in the order of the files (sorted) and of each file,
    without reading a tensor (safetensors headers, memory-mapped .bin)."""
    layout = {}
    files = sorted(folder.glob("*.safetensors"))
    for file in files:
        header = _safetensors_header(file)
        header.pop("__metadata__", None)
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
            layout[name] = (file, tuple(info["shape"]), SAFETENSORS_DTYPES[info["dtype"]])
    if not files:
        for file in sorted(folder.glob("pytorch_model*.bin")):
            # weights_only refuses pickled code: published .bin files hold tensors only. mmap: nothing is read.
            tensors = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            layout.update({name: (file, tuple(t.shape), t.dtype) for name, t in tensors.items()})
            del tensors
    if not layout:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {folder}")
    return layout


def _read_shapes_of(layout: dict) -> dict:
    return {name: shape for name, (_, shape, _) in layout.items()}


class _ShardReader:
    """Tensors of a checkpoint folder by name, with at most one shard open at a time: a converter holding this
    never holds more of the source than one shard (a .bin shard is memory-mapped whole; a safetensors file is read
    one tensor at a time)."""

    def __init__(self, layout: dict):
        self.layout, self.file, self.tensors = layout, None, None

    def __call__(self, name: str):
        file = self.layout[name][0]
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            self.file = self.tensors = None  # release a .bin shard
            with safe_open(str(file), framework="pt") as f:
                return f.get_tensor(name)
        if file != self.file:
            self.file, self.tensors = None, None  # the previous shard's mapping goes before the next one comes
            self.tensors = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            self.file = file
        return self.tensors[name]


def _tensor_bytes(tensor) -> memoryview:
    """A tensor's bytes as stored (little-endian, row-major), without a copy when it is contiguous."""
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def _write_safetensors(file: Path, names, out_layout: dict, make) -> None:
    """Write one .safetensors file of the tensors `names`, making and writing them one at a time (`make(name)`),
    so that only one output tensor is in memory; the bytes are those safetensors' save_file writes."""
    dtype_names = {dtype: label for label, dtype in SAFETENSORS_DTYPES.items()}
    order = sorted(names, key=lambda name: (_SAFETENSORS_ORDER.index(dtype_names[out_layout[name][1]]), name))
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in order:
        shape, dtype = out_layout[name]
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": dtype_names[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to a multiple of 8 bytes
    with open(file, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name in order:
            tensor = make(name)
            shape, dtype = out_layout[name]
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise RuntimeError(f"{name}: made {tuple(tensor.shape)} {tensor.dtype}, planned {shape} {dtype}")
            f.write(_tensor_bytes(tensor))
            del tensor


def _write_weights(plan: dict, layout: dict, dst: Path, max_shard_size="5GB") -> None:
    """The plan's tensors as safetensors shards in dst (model.safetensors, or model-0000i-of-0000n.safetensors and
    model.safetensors.index.json), shard by shard and tensor by tensor: the same files and index that
    huggingface_hub's save_torch_state_dict writes for the whole state dict, without holding it."""
    from huggingface_hub import split_torch_state_dict_into_shards

    out_layout = {}
    for name, pieces in plan.items():
        shapes = [layout[source][1] for source, _ in pieces]
        rows = [shape[0] if piece_rows is None else piece_rows[1] - piece_rows[0]
                for shape, (_, piece_rows) in zip(shapes, pieces)]
        dtype = layout[pieces[0][0]][2]
        for source, _ in pieces[1:]:
            dtype = torch.promote_types(dtype, layout[source][2])
        out_layout[name] = ((sum(rows), *shapes[0][1:]) if shapes[0] else (), dtype)
    # Shards planned on meta tensors by huggingface_hub's own splitter: the same split as for the real tensors.
    split = split_torch_state_dict_into_shards(
        {name: torch.empty(shape, dtype=dtype, device="meta") for name, (shape, dtype) in out_layout.items()},
        filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)
    for stale in dst.iterdir():  # as save_torch_state_dict: earlier weight files of these names go first
        if re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?", stale.name):
            stale.unlink()
    reader = _ShardReader(layout)
    for filename, names in split.filename_to_tensors.items():
        _write_safetensors(dst / filename, names, out_layout, lambda name: _make_tensor(plan[name], reader))
    if split.is_sharded:
        index = {"metadata": {**split.metadata, "format": "pt"}, "weight_map": split.tensor_to_filename}
        with open(dst / "model.safetensors.index.json", "w") as f:
            json.dump(index, f, indent=2)


def _write_folder(plan, layout, config, dst: Path, src: Path, max_shard_size):
    dst.mkdir(parents=True, exist_ok=True)
    _write_weights(plan, layout, dst, max_shard_size)
    config.save_pretrained(str(dst))
    # Tokenizer and generation files travel unchanged.
    for pattern in ("tokenizer*", "special_tokens_map.json", "generation_config.json", "*.jinja"):
        for file in src.glob(pattern):
            shutil.copy2(file, dst / file.name)


def _load_our_tokenizer(src: Path):
    """The GLM tokenizer of a folder (tokenizer.json, or the original tokenizer.model), or None if it has none."""
    from local_glm import glm

    files = {name: src / name for name in ("tokenizer.json", "tokenizer.model") if (src / name).exists()}
    if not files:
        return None
    return glm.ChatGLMTokenizer(tokenizer_file=str(files["tokenizer.json"]) if "tokenizer.json" in files else None,
                                vocab_file=str(files["tokenizer.model"]) if "tokenizer.model" in files else None)


def write_native_tokenizer(src: Path, dst: Path, seq_length: int) -> None:
    """dst's tokenizer as a plain `PreTrainedTokenizerFast` (tokenizer.json + tokenizer_config.json with the chat
    template), which `AutoTokenizer.from_pretrained(dst)` loads with no remote code and whose `apply_chat_template`
    gives our ids."""
    from transformers import PreTrainedTokenizerFast

    ours = _load_our_tokenizer(src)
    if ours is None:
        return
    for stale in ("tokenizer_config.json", "tokenizer.json", "tokenization_glm.py", "special_tokens_map.json"):
        (dst / stale).unlink(missing_ok=True)
    plain = PreTrainedTokenizerFast(
        tokenizer_object=ours.backend_tokenizer, eos_token=ours.eos_token, pad_token=ours.pad_token,
        unk_token=ours.unk_token, padding_side="left", chat_template=ours.chat_template, model_max_length=seq_length,
        clean_up_tokenization_spaces=False, split_special_tokens=False,
    )
    # The response-parsing schema (transformers 5.25 saves it; 4.57 has none), so servers return tool_calls.
    plain.response_template = getattr(ours, "response_template", None)
    plain.save_pretrained(str(dst))
    config_file = dst / "tokenizer_config.json"
    values = json.loads(config_file.read_text())
    values["tokenizer_class"] = "PreTrainedTokenizerFast"  # the name 4.x and 5.x both know (5.x also saves another)
    config_file.write_text(json.dumps(values, indent=2, ensure_ascii=False) + "\n")


def convert_checkpoint(src, dst, to: str, max_shard_size="5GB", overwrite=False) -> None:
    """Convert the checkpoint folder `src` into `dst`; `to` is "native" (GlmForCausalLM) or "glm" (ours).
    `dst` must be new or empty, or `overwrite=True` (check_destination, before anything is read or written).

    Tensor by tensor: at most one source shard is open and one output tensor made at a time, so the memory it takes
    is bounded by the largest source shard, not the model (tests/test_convert.py measures it at chatglm3-6b's width).
    The output is safetensors shards of at most `max_shard_size` with their index, as save_pretrained writes them."""
    src, dst = Path(src), Path(dst)
    check_destination(src, dst, to, overwrite)
    config_dict = json.loads((src / "config.json").read_text())
    if to == "native":
        from configuration_glm import ChatGLMConfig

        config = ChatGLMConfig(**{k: v for k, v in config_dict.items() if k not in ("auto_map", "architectures")})
        native = glm_config_to_native(config)
        native.architectures = ["GlmForCausalLM"]
        layout = _read_layout(src)
        check_state_dict(_read_shapes_of(layout), glm_shapes(config), src, config.num_layers)
        _write_folder(glm_to_native_plan(layout, config), layout, native, dst, src, max_shard_size)
        write_native_tokenizer(src, dst, config.seq_length)
    elif to == "glm":
        from transformers import GlmConfig

        from configuration_glm import ChatGLMConfig

        native = GlmConfig.from_pretrained(str(src))
        config = native_config_to_glm(native, ChatGLMConfig)
        config.architectures = ["ChatGLMForConditionalGeneration"]
        layout = _read_layout(src)
        check_state_dict(_read_shapes_of(layout), native_shapes(native), src, native.num_hidden_layers)
        _write_folder(native_to_glm_plan(layout, config.num_layers), layout, config, dst, src,
                      max_shard_size)
        tokenizer = _load_our_tokenizer(src)
        if tokenizer is not None:  # our tokenizer class again, with auto_map, for build_chat_input and chat()
            (dst / "tokenizer_config.json").unlink(missing_ok=True)
            tokenizer.model_max_length = config.seq_length
            tokenizer.save_pretrained(str(dst))
        from local_glm import CODE_FILES, ROOT

        for code in CODE_FILES:
            if (ROOT / code).exists():
                shutil.copy2(ROOT / code, dst / code)
    else:
        raise ValueError(f"--to must be 'native' or 'glm', got {to!r}")


def adopt_code(src, dst, overwrite=False) -> None:
    """Put this repository's code beside a THUDM checkpoint: weights and config keys unchanged, `auto_map` in
    config.json and tokenizer_config.json pointed at our files, `vocab_size` and our chat template added when
    missing, `_name_or_path` as every saved config records it (llama.cpp reads them). `dst` may be `src` (only the
    JSON files change; another `dst` must be new or empty, or `overwrite=True`)."""
    from configuration_glm import AUTO_MAP
    from local_glm import CODE_FILES, ROOT

    src, dst = Path(src), Path(dst)
    check_destination(src, dst, "code", overwrite)
    if not (src / "config.json").exists():
        raise FileNotFoundError(f"{src / 'config.json'} is missing: not a checkpoint folder")
    config = json.loads((src / "config.json").read_text())
    if config.get("model_type") != "chatglm":
        raise ValueError(f"{src / 'config.json'}: model_type is {config.get('model_type')!r}, expected 'chatglm'")
    from configuration_glm import ChatGLMConfig

    # Before anything is written: every tensor present with the shape config.json gives it.
    glm_config = ChatGLMConfig(**{k: v for k, v in config.items() if k not in ("auto_map", "architectures")})
    expected, shapes = glm_shapes(glm_config), _read_shapes_of(_read_layout(src))
    if glm_config.pre_seq_len:  # a P-tuning v2 checkpoint also holds its prefix encoder
        expected.update({k: v for k, v in shapes.items() if k.startswith("transformer.prefix_encoder.")})
    check_state_dict(shapes, expected, src, glm_config.num_layers)
    dst.mkdir(parents=True, exist_ok=True)
    if src.resolve() != dst.resolve():
        for file in src.iterdir():
            if file.is_file():
                shutil.copy2(file, dst / file.name)
    config["auto_map"] = dict(AUTO_MAP)
    # llama.cpp's converter reads vocab_size (outside its chatglm3-6b path); THUDM's glm-4 configs lack it.
    config.setdefault("vocab_size", config["padded_vocab_size"])
    # What every saved config records (ChatGLMConfig.saved_name_or_path): llama.cpp reads ChatGLM3's vocabulary only
    # under a name containing "THUDM/chatglm3-6b", which chatglm2-6b's own does not.
    name = glm_config.saved_name_or_path()
    if name:
        config["_name_or_path"] = name
    (dst / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    tokenizer_config = dst / "tokenizer_config.json"
    if tokenizer_config.exists():
        values = json.loads(tokenizer_config.read_text())
        values["auto_map"] = {"AutoTokenizer": ["tokenization_glm.ChatGLMTokenizer", None]}
        values["tokenizer_class"] = "ChatGLMTokenizer"
        if "chat_template" not in values and (dst / "tokenizer.model").exists():
            # Engines take the template from here (llama.cpp's GGUF); the early THUDM files have none.
            from tokenization_glm import _TIKTOKEN_FIRST_LINE, chat_template

            glm4 = bool(_TIKTOKEN_FIRST_LINE.match((dst / "tokenizer.model").read_bytes()[:200]))
            values["chat_template"] = chat_template(glm4)
        tokenizer_config.write_text(json.dumps(values, indent=2, ensure_ascii=False) + "\n")
    for code in CODE_FILES:
        shutil.copy2(ROOT / code, dst / code)


def llama_cpp_refusals(folder) -> list:
    """Why llama.cpp's stock converter (convert_hf_to_gguf.py) would refuse `folder`, each reason with its fix, or []
    (docs/engines.md). scripts/engines_check.py says them instead of running the converter, whose own errors name
    remote code or a tokenizer rather than the cause. Not covered: a GLM-4 byte-level vocabulary other than the
    published one, which only the converter's pre-tokenizer hash decides."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        adapter = (folder / "adapter_config.json").exists()
        return [f"{folder} has no config.json" + (": it is a LoRA adapter alone; convert the merged model "
                                                  "(train.py --merge_lora, or peft's merge_and_unload() then "
                                                  "save_pretrained)" if adapter else ": not a model folder")]
    from configuration_glm import GLM3_ENGINE_MARK, ChatGLMConfig

    values = json.loads((folder / "config.json").read_text())
    config = ChatGLMConfig(**{k: v for k, v in values.items() if k not in ("auto_map", "architectures")})
    reasons = []
    if not (folder / "tokenizer.model").exists():
        reasons.append(f"{folder} has no tokenizer.model, the vocabulary the converter reads: save the tokenizer "
                       "beside the model (tokenizer.save_pretrained(folder))")
    name = values.get("_name_or_path")
    if config.is_glm3_format and GLM3_ENGINE_MARK not in str(name or ""):
        reasons.append(f"{folder / 'config.json'}: _name_or_path {name!r} does not contain {GLM3_ENGINE_MARK!r}, so "
                       "the converter would not read the ChatGLM3 SentencePiece vocabulary (a config written by "
                       f"older code or by hand): run python convert_glm.py --to code {folder} {folder}")
    return reasons


class DestinationError(ValueError):
    """A conversion's destination that it may not write as asked."""


def check_destination(src, dst, to: str, overwrite: bool = False) -> None:
    """Before anything is read or written (convert_checkpoint and adopt_code call it first): a conversion never writes
    into its own source (a half-converted folder that loads as neither model), and never over a user's files without
    overwrite (--overwrite)."""
    source, target = Path(src).resolve(), Path(dst).resolve()
    in_place = target == source and to == "code"  # --to code changes only JSON keys and adds code files
    if not in_place and (target == source or source in target.parents):
        raise DestinationError(f"dst {dst} is {'src' if target == source else 'inside src'} {src}: --to {to} would "
                               "write over the checkpoint it reads; give a new folder")
    held = sorted(p.name for p in target.iterdir()) if target.is_dir() else []
    if not in_place and not overwrite and held:
        raise DestinationError(f"dst {dst} already holds files ({', '.join(held[:5])}{' ...' * (len(held) > 5)}); "
                               "give a new or empty folder, or --overwrite (overwrite=True) to replace files of the "
                               "same names")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--to", required=True, choices=("native", "glm", "code"),
                        help="native = transformers GlmForCausalLM; glm = this repository's layout and code, from a "
                             "native checkpoint; code = a THUDM checkpoint as it is, with this repository's code "
                             "(src may equal dst)")
    parser.add_argument("src", help="checkpoint folder to read (config.json and weights)")
    parser.add_argument("dst", help="folder to write: a new or empty one (with --to code also src itself)")
    parser.add_argument("--overwrite", action="store_true", help="write into a dst that already holds files (its "
                        "files of the same names are replaced)")
    parser.add_argument("--max_shard_size", default="5GB", help="--to native/glm: largest weight file written, as "
                        "save_pretrained's (default 5GB; THUDM publishes 2GB shards)")
    args = parser.parse_args(argv)
    try:
        check_destination(args.src, args.dst, args.to, args.overwrite)  # before any other check reads src
        if args.to == "code":
            adopt_code(args.src, args.dst, args.overwrite)
        else:
            convert_checkpoint(args.src, args.dst, args.to, args.max_shard_size, args.overwrite)
    except DestinationError as error:
        parser.error(str(error))
    print(f"wrote {args.dst}")


if __name__ == "__main__":
    main()
