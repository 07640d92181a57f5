"""Convert a checkpoint between the GLM (THUDM) layout and transformers' native `GlmForCausalLM` layout.

The weight mapping lives here once; the tests and benchmarks import it.

    python convert_glm.py --to native path/to/chatglm3-6b path/to/chatglm3-6b-native   # drop trust_remote_code
    python convert_glm.py --to glm path/to/glm-native path/to/glm-remote-code             # back again
    python convert_glm.py --to code path/to/chatglm3-6b path/to/chatglm3-6b               # THUDM weights, our code

The native model computes the same function (GLM_SPEC.md section 3): split q/k/v projections instead of the fused
query_key_value, the same gate-then-up fused MLP, partial_rotary_factor 0.5 and rope_theta = 10000 * rope_ratio.
"""

import argparse
import json
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


def glm_to_native_state_dict(state_dict, config):
    """Rename GLM keys to GlmForCausalLM keys and split query_key_value into q/k/v (weights and biases)."""
    _check_convertible(config)
    q_size = config.num_attention_heads * config.kv_channels
    kv_size = config.num_kv_heads * config.kv_channels
    out = {}
    for name, tensor in state_dict.items():
        if name in TOP_RENAMES:
            out[TOP_RENAMES[name]] = tensor
            continue
        if name.endswith("rotary_pos_emb.inv_freq"):
            continue  # recomputed from the config on both sides
        if not name.startswith("transformer.encoder.layers."):
            raise KeyError(f"unexpected GLM weight {name!r}")
        index, rest = name[len("transformer.encoder.layers."):].split(".", 1)
        prefix = NATIVE_LAYER.format(index)
        if rest in LAYER_RENAMES:
            out[prefix + LAYER_RENAMES[rest]] = tensor
        elif rest.startswith("self_attention.query_key_value."):
            kind = rest.rsplit(".", 1)[1]  # weight or bias
            q, k, v = tensor.split((q_size, kv_size, kv_size), dim=0)
            for proj, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[f"{prefix}self_attn.{proj}.{kind}"] = part.clone()  # own storage: safetensors refuses views
        else:
            raise KeyError(f"unexpected GLM weight {name!r}")
    return out


def native_to_glm_state_dict(state_dict, num_layers):
    """The inverse of glm_to_native_state_dict: fuse q/k/v back into query_key_value."""
    inverse_top = {v: k for k, v in TOP_RENAMES.items()}
    inverse_layer = {v: k for k, v in LAYER_RENAMES.items()}
    out = {}
    for name, tensor in state_dict.items():
        if name in inverse_top:
            out[inverse_top[name]] = tensor
            continue
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if not name.startswith("model.layers."):
            raise KeyError(f"unexpected GlmForCausalLM weight {name!r}")
        index, rest = name[len("model.layers."):].split(".", 1)
        if rest in inverse_layer:
            out[GLM_LAYER.format(index) + inverse_layer[rest]] = tensor
        elif not rest.startswith("self_attn.") or rest.split(".")[1] not in ("q_proj", "k_proj", "v_proj"):
            raise KeyError(f"unexpected GlmForCausalLM weight {name!r}")
    for index in range(num_layers):
        prefix = NATIVE_LAYER.format(index)
        for kind in ("weight", "bias"):
            parts = [state_dict.get(f"{prefix}self_attn.{proj}.{kind}") for proj in ("q_proj", "k_proj", "v_proj")]
            if all(part is not None for part in parts):
                out[GLM_LAYER.format(index) + f"self_attention.query_key_value.{kind}"] = torch.cat(parts, dim=0)
    return out


def _read_state_dict(folder: Path):
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    state_dict = {}
    if files:
        for file in files:
            state_dict.update(load_file(str(file)))
        return state_dict
    files = sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {folder}")
    for file in files:
        # weights_only refuses pickled code: published .bin files hold tensors only.
        state_dict.update(torch.load(file, map_location="cpu", weights_only=True))
    return state_dict


def _write_folder(state_dict, config, dst: Path, src: Path, max_shard_size="5GB"):
    from huggingface_hub import save_torch_state_dict

    dst.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict(state_dict, str(dst), max_shard_size=max_shard_size, metadata={"format": "pt"})
    config.save_pretrained(str(dst))
    # Tokenizer and generation files travel unchanged.
    for pattern in ("tokenizer*", "special_tokens_map.json", "generation_config.json", "*.jinja"):
        for file in src.glob(pattern):
            shutil.copy2(file, dst / file.name)


def convert_checkpoint(src, dst, to: str) -> None:
    """Convert the checkpoint folder `src` into `dst`; `to` is "native" (GlmForCausalLM) or "glm" (ours)."""
    src, dst = Path(src), Path(dst)
    config_dict = json.loads((src / "config.json").read_text())
    if to == "native":
        from configuration_glm import ChatGLMConfig

        config = ChatGLMConfig(**{k: v for k, v in config_dict.items() if k not in ("auto_map", "architectures")})
        native = glm_config_to_native(config)
        native.architectures = ["GlmForCausalLM"]
        _write_folder(glm_to_native_state_dict(_read_state_dict(src), config), native, dst, src)
    elif to == "glm":
        from transformers import GlmConfig

        from configuration_glm import ChatGLMConfig

        native = GlmConfig.from_pretrained(str(src))
        config = native_config_to_glm(native, ChatGLMConfig)
        config.architectures = ["ChatGLMForConditionalGeneration"]
        _write_folder(native_to_glm_state_dict(_read_state_dict(src), config.num_layers), config, dst, src)
        from local_glm import CODE_FILES, ROOT

        for code in CODE_FILES:
            if (ROOT / code).exists():
                shutil.copy2(ROOT / code, dst / code)
    else:
        raise ValueError(f"--to must be 'native' or 'glm', got {to!r}")


def adopt_code(src, dst) -> None:
    """Put this repository's code beside a THUDM checkpoint: weights and config keys unchanged, `auto_map` in
    config.json and tokenizer_config.json pointed at our files, `vocab_size` and our chat template added when
    missing (llama.cpp reads them). `dst` may be `src` (only the JSON files change)."""
    from configuration_glm import AUTO_MAP
    from local_glm import CODE_FILES, ROOT

    src, dst = Path(src), Path(dst)
    if not (src / "config.json").exists():
        raise FileNotFoundError(f"{src / 'config.json'} is missing: not a checkpoint folder")
    dst.mkdir(parents=True, exist_ok=True)
    if src.resolve() != dst.resolve():
        for file in src.iterdir():
            if file.is_file():
                shutil.copy2(file, dst / file.name)
    config = json.loads((dst / "config.json").read_text())
    if config.get("model_type") != "chatglm":
        raise ValueError(f"{dst / 'config.json'}: model_type is {config.get('model_type')!r}, expected 'chatglm'")
    config["auto_map"] = dict(AUTO_MAP)
    # llama.cpp's converter reads vocab_size (outside its chatglm3-6b path); THUDM's glm-4 configs lack it.
    config.setdefault("vocab_size", config["padded_vocab_size"])
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--to", required=True, choices=("native", "glm", "code"),
                        help="native = transformers GlmForCausalLM; glm = this repository's layout and code, from a "
                             "native checkpoint; code = a THUDM checkpoint as it is, with this repository's code "
                             "(src may equal dst)")
    parser.add_argument("src", help="checkpoint folder to read (config.json and weights)")
    parser.add_argument("dst", help="folder to write")
    args = parser.parse_args(argv)
    if args.to == "code":
        adopt_code(args.src, args.dst)
    else:
        convert_checkpoint(args.src, args.dst, args.to)
    print(f"wrote {args.dst}")


if __name__ == "__main__":
    main()
