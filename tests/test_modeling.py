"""The GLM model against the original code's golden outputs, transformers' native GlmForCausalLM and the spec."""

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, glm, reference_file, tiny_config
from model_helpers import left_padded_batch, static_cache
from train_helpers import fake_finished_run, snapshot
from transformers import GlmForCausalLM
from transformers.cache_utils import DynamicCache

import convert_glm
import train

modeling = glm.modeling


# ---------------------------------------------------------------------------------------------------------------
# Golden outputs of the original THUDM code (docs/architecture.md section 7)

GOLDEN_WEIGHTS = [
    ("embedding.word_embeddings.weight", (5, 32)),
    ("encoder.layers.0.input_layernorm.weight", (32,)),
    ("encoder.layers.0.self_attention.query_key_value.weight", (48, 32)),
    ("encoder.layers.0.self_attention.query_key_value.bias", (48,)),
    ("encoder.layers.0.self_attention.dense.weight", (32, 32)),
    ("encoder.layers.0.post_attention_layernorm.weight", (32,)),
    ("encoder.layers.0.mlp.dense_h_to_4h.weight", (96, 32)),
    ("encoder.layers.0.mlp.dense_4h_to_h.weight", (32, 48)),
    ("encoder.final_layernorm.weight", (32,)),
]


class _Reader:
    def __init__(self, raw):
        self.raw, self.offset = raw, 0

    def take(self, dtype, shape):
        count = int(np.prod(shape))
        array = np.frombuffer(self.raw, dtype=dtype, count=count, offset=self.offset).reshape(shape)
        self.offset += count * np.dtype(dtype).itemsize
        return torch.from_numpy(array.copy())


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize(
    "name, eps, ptuning, tolerance",
    [("glm3_model.data", 1e-5, False, 1e-5), ("glm4_model.data", 1.5625e-7, False, 1e-5),
     # The prefix is stored in float16 while the original ran it in float32: ~1e-4 of rounding.
     ("glm3_ptuning_v2_model.data", 1e-5, True, 2e-4)],
)
def test_golden_outputs_of_original_code(name, eps, ptuning, tolerance, implementation):
    reader = _Reader(reference_file("golden", name).read_bytes())
    config = glm.ChatGLMConfig(padded_vocab_size=5, hidden_size=32, num_attention_heads=8, multi_query_group_num=2,
                               kv_channels=4, ffn_hidden_size=48, num_layers=1, layernorm_epsilon=eps,
                               pre_seq_len=5 if ptuning else None, attn_implementation=implementation)
    model = glm.ChatGLMModel(config).eval()
    params = dict(model.named_parameters())
    if ptuning:
        prefix = reader.take(np.float16, (2, 2, 5, 4)).float()  # [layers * 2, groups, pre_seq_len, kv_channels]
        params["prefix_encoder.embedding.weight"].data = prefix.permute(2, 0, 1, 3).reshape(5, -1)
    for key, shape in GOLDEN_WEIGHTS:
        params[key].data = reader.take(np.float32, shape)
    cache = DynamicCache()
    for ids_len, out_len in ((3, 3), (1, 1), (1, 1)):
        ids = reader.take(np.int32, (ids_len,)).long()[None]
        expected = reader.take(np.float32, (out_len, 32))
        with torch.no_grad():
            hidden = model(input_ids=ids, past_key_values=cache, use_cache=True).last_hidden_state[0]
        torch.testing.assert_close(hidden, expected, atol=tolerance, rtol=0)
    assert reader.offset == len(reader.raw), "the golden file holds more than the spec's layout"


# ---------------------------------------------------------------------------------------------------------------
# Against transformers' GlmForCausalLM with converted weights

PARITY_CONFIGS = [
    dict(),
    dict(multi_query_group_num=1, kv_channels=12, rope_ratio=50.0),  # kv_channels != hidden / heads
    dict(multi_query_group_num=4, num_attention_heads=4, kv_channels=20, hidden_size=48, add_qkv_bias=False),
    dict(multi_query_group_num=8, num_layers=3, rope_ratio=0.5, layernorm_epsilon=1.5625e-7),  # plain MHA groups
]


def _pair(seed, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(**overrides)
    model = glm.ChatGLMForConditionalGeneration(config).eval()
    native = GlmForCausalLM(convert_glm.glm_config_to_native(config)).eval()
    native.load_state_dict(convert_glm.glm_to_native_state_dict(model.state_dict(), config), strict=True)
    return config, model, native


@pytest.mark.parametrize("overrides", PARITY_CONFIGS)
def test_logits_and_loss_match_native_glm(overrides):
    config, model, native = _pair(0, **overrides)
    ids, mask = left_padded_batch(config.padded_vocab_size, [11, 7, 3])
    # Pads carry no context, so a row's first real token is not a target either.
    labels = ids.masked_fill((mask == 0) | (mask.cumsum(-1) == 1), -100)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, labels=labels)
        theirs = native(ids, attention_mask=mask, labels=labels)
    real = mask.bool()
    torch.testing.assert_close(ours.logits[real], theirs.logits[real], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=0)


@pytest.mark.parametrize("overrides", PARITY_CONFIGS[:2])
def test_greedy_generate_matches_native_and_rows_alone(overrides):
    config, model, native = _pair(1, **overrides)
    ids, mask = left_padded_batch(config.padded_vocab_size, [9, 4])
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    ours = model.generate(ids, attention_mask=mask, **kwargs)
    theirs = native.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(ours, theirs)
    for row in range(2):
        alone = ids[row:row + 1, mask[row].bool()]
        single = model.generate(alone, attention_mask=torch.ones_like(alone), **kwargs)
        assert torch.equal(single[0, alone.shape[1]:], ours[row, ids.shape[1]:])


def test_beam_search_and_sampling_match_native():
    config, model, native = _pair(2)
    ids, mask = left_padded_batch(config.padded_vocab_size, [6, 6])
    beams = dict(max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(model.generate(ids, attention_mask=mask, **beams),
                       native.generate(ids, attention_mask=mask, **beams))
    sample = dict(max_new_tokens=8, do_sample=True, top_p=0.8, temperature=0.8, pad_token_id=0, eos_token_id=None)
    torch.manual_seed(7)
    ours = model.generate(ids, attention_mask=mask, **sample)
    torch.manual_seed(7)
    theirs = native.generate(ids, attention_mask=mask, **sample)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_cached_decoding_equals_full_forward(implementation):
    config = tiny_config(attn_implementation=implementation)
    torch.manual_seed(3)
    model = glm.ChatGLMForConditionalGeneration(config).eval()
    ids, mask = left_padded_batch(config.padded_vocab_size, [12, 8])
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = DynamicCache()
        # Prefill 5 tokens, then a chunk of 3, then one token at a time.
        steps, start = [5, 3] + [1] * (ids.shape[1] - 8), 0
        pieces = []
        for length in steps:
            end = start + length
            out = model(ids[:, start:end], attention_mask=mask[:, :end], past_key_values=cache, use_cache=True)
            pieces.append(out.logits)
            start = end
    stepwise = torch.cat(pieces, dim=1)
    real = mask.bool()
    torch.testing.assert_close(stepwise[real], full[real], atol=1e-5, rtol=0)


def _decode_logits(model, ids, mask, cache):
    """Prefill all but the last 3 tokens, then one token at a time; the logits of the one-token steps."""
    with torch.no_grad():
        model(ids[:, :-3], attention_mask=mask[:, :-3], past_key_values=cache, use_cache=True)
        return torch.cat([model(ids[:, end - 1:end], attention_mask=mask[:, :end], past_key_values=cache,
                                use_cache=True).logits for end in range(ids.shape[1] - 2, ids.shape[1] + 1)], 1)


@pytest.mark.parametrize("cache_kind, pre_seq_len", [("dynamic", None), ("static", None), ("dynamic", 3)])
def test_grouped_single_query_attention_equals_repeated_kv(cache_kind, pre_seq_len, monkeypatch):
    """One-token sdpa steps attend each cached K/V group once, with the group's query heads as rows: the same logits
    as transformers' sdpa function, which repeats K/V for every query head, and as eager attention. Left-padded
    rows (a mask), a static cache (a mask longer than what is cached) and a P-tuning prefix."""
    def run(implementation, grouped):
        torch.manual_seed(5)
        model = glm.ChatGLMForConditionalGeneration(
            tiny_config(attn_implementation=implementation, pre_seq_len=pre_seq_len)).eval()
        ids, mask = left_padded_batch(model.config.padded_vocab_size, [10, 6])
        cache = static_cache(model, 2, 16) if cache_kind == "static" else DynamicCache()
        taken = []
        original = modeling._grouped_single_query

        def spy(*args):
            taken.append(original(*args) and grouped)
            return taken[-1]

        monkeypatch.setattr(modeling, "_grouped_single_query", spy)
        logits = _decode_logits(model, ids, mask, cache)
        monkeypatch.setattr(modeling, "_grouped_single_query", original)
        return logits, taken

    grouped, taken = run("sdpa", True)
    assert taken == [True] * 2 * 3  # tiny_config's 2 layers, 3 one-token steps: every one took the grouped path
    repeated, not_taken = run("sdpa", False)
    assert not_taken == [False] * 2 * 3
    eager, _ = run("eager", True)
    torch.testing.assert_close(grouped, repeated, atol=1e-5, rtol=0)
    torch.testing.assert_close(grouped, eager, atol=1e-5, rtol=0)


def test_grouped_single_query_attention_leaves_a_registered_sdpa_function_in_charge():
    """A user's own function registered as "sdpa" (transformers' AttentionInterface) is called for decoding steps too;
    the grouped path is only a rewrite of transformers' own function."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    calls = []

    def counting(module, query, *args, **kwargs):
        calls.append(query.shape[2])
        return sdpa_attention_forward(module, query, *args, **kwargs)

    torch.manual_seed(6)
    model = glm.ChatGLMForConditionalGeneration(tiny_config(attn_implementation="sdpa")).eval()
    ids, mask = left_padded_batch(model.config.padded_vocab_size, [8, 5])
    expected = _decode_logits(model, ids, mask, DynamicCache())
    AttentionInterface.register("sdpa", counting)
    try:
        logits = _decode_logits(model, ids, mask, DynamicCache())
    finally:
        AttentionInterface.register("sdpa", sdpa_attention_forward)
    assert calls.count(1) == 2 * 3 and len(calls) == 2 * 4  # every layer: the prefill and the three one-token steps
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_static_cache_generation_equals_dynamic():
    config, model, _ = _pair(4)
    ids, mask = left_padded_batch(config.padded_vocab_size, [7, 5])
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    dynamic = model.generate(ids, attention_mask=mask, **kwargs)
    static = model.generate(ids, attention_mask=mask, cache_implementation="static", **kwargs)
    assert torch.equal(dynamic, static)


def test_logits_to_keep_and_positions_from_mask():
    config, model, _ = _pair(5)
    ids, mask = left_padded_batch(config.padded_vocab_size, [10, 6])
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        last = model(ids, attention_mask=mask, logits_to_keep=1).logits
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        explicit = model(ids, attention_mask=mask, position_ids=positions).logits
    assert last.shape == (2, 1, config.padded_vocab_size)
    torch.testing.assert_close(last[:, 0], full[:, -1])
    torch.testing.assert_close(explicit, full)


def test_output_attentions_with_eager_sum_to_one_and_skip_pads():
    config = tiny_config(attn_implementation="eager")
    model = glm.ChatGLMModel(config).eval()
    ids, mask = left_padded_batch(config.padded_vocab_size, [5, 3])
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == config.num_layers and len(out.hidden_states) == config.num_layers + 1
    weights = out.attentions[0]
    torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)))
    assert weights[1, :, -1, :2].abs().max() == 0  # the last real token of row 1 never looks at its two pads


def _attention_available(implementation):
    if implementation == "flash_attention_2":
        import importlib.util

        return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
    return True


@pytest.mark.parametrize("implementation", ["sdpa", "flex_attention", "flash_attention_2"])
def test_attention_implementations_agree_with_eager(implementation):
    if not _attention_available(implementation):
        pytest.skip(f"{implementation} needs a CUDA GPU and the flash_attn package")
    ids, mask = left_padded_batch(128, [16, 11])
    results = {}
    for name in ("eager", implementation):
        torch.manual_seed(11)
        model = glm.ChatGLMForConditionalGeneration(tiny_config(attn_implementation=name)).eval()
        with torch.no_grad():
            logits = model(ids, attention_mask=mask).logits
            tokens = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, eos_token_id=None)
        results[name] = (logits, tokens)
    real = mask.bool()
    torch.testing.assert_close(results[implementation][0][real], results["eager"][0][real], atol=1e-5, rtol=0)
    assert torch.equal(results[implementation][1], results["eager"][1])


# ---------------------------------------------------------------------------------------------------------------
# Published checkpoints: config files and weight names


@pytest.mark.parametrize("name", ["chatglm3-6b", "chatglm3-6b-32k", "glm-4-9b-chat"])
def test_published_configs_load_and_save_back_with_original_keys(name, tmp_path):
    original = json.loads(reference_file(name, "config.json").read_text())
    config = glm.ChatGLMConfig(**original)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    for key, value in original.items():
        if key in ("auto_map", "transformers_version", "_name_or_path", "torch_dtype"):
            continue
        assert saved[key] == value, key
    assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_glm.ChatGLMForConditionalGeneration"
    assert saved["num_hidden_layers"] == original["num_layers"]
    # Standard names are aliases of the original keys.
    assert config.num_hidden_layers == original["num_layers"]
    assert config.vocab_size == original["padded_vocab_size"]
    assert config.num_key_value_heads == original["multi_query_group_num"]
    assert config.head_dim == original["kv_channels"]
    assert config.rope_ratio == original.get("rope_ratio", 1)


@pytest.mark.parametrize("loaded_from, eos, saved", [
    ("", 2, "THUDM/chatglm3-6b tokenizer format"),  # built in memory (from scratch)
    ("THUDM/chatglm3-6b", 2, "THUDM/chatglm3-6b"),  # the Hub id llama.cpp looks for: kept
    ("THUDM/chatglm3-6b-32k", [2, 64795, 64797], "THUDM/chatglm3-6b-32k"),
    ("THUDM/chatglm2-6b", 2, "THUDM/chatglm3-6b tokenizer format"),  # ChatGLM3 format, another Hub id
    ("LOCAL", 2, "THUDM/chatglm3-6b tokenizer format"),  # a local folder: never its path
    ("THUDM/glm-4-9b-chat", [151329, 151336, 151338], "THUDM/glm-4-9b-chat"),  # GLM-4: its Hub id, as before
    ("LOCAL", [151329, 151336, 151338], None),
])
def test_saved_config_names_what_llama_cpp_reads(loaded_from, eos, saved, tmp_path):
    """transformers (4.57 and 5.x) drops _name_or_path from a saved config.json; ours records the name llama.cpp's
    converter chooses ChatGLM3's SentencePiece vocabulary by (docs/architecture.md section 8), on every save."""
    local = tmp_path / "some" / "THUDM" / "chatglm3-6b"  # a local path, even one that contains the string
    local.mkdir(parents=True)
    config = glm.ChatGLMConfig(eos_token_id=eos, name_or_path=str(local) if loaded_from == "LOCAL" else loaded_from)
    config.save_pretrained(tmp_path / "saved")
    written = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert written.get("_name_or_path") == saved
    assert str(tmp_path) not in json.dumps(written)
    assert config.to_dict()["_name_or_path"] == config.name_or_path  # in memory unchanged (TRL reads it)
    again = glm.ChatGLMConfig.from_pretrained(tmp_path / "saved")
    again.save_pretrained(tmp_path / "again")  # saved again: the same name
    assert json.loads((tmp_path / "again" / "config.json").read_text()).get("_name_or_path") == saved


def test_chatglm3_6b_on_meta_has_published_keys_shapes_and_size():
    index = json.loads(reference_file("chatglm3-6b", "pytorch_model.bin.index.json").read_text())
    config = glm.ChatGLMConfig(**json.loads(reference_file("chatglm3-6b", "config.json").read_text()))
    with torch.device("meta"):
        model = glm.ChatGLMForConditionalGeneration(config)
    state = model.state_dict()
    published = {key for key in index["weight_map"] if not key.endswith("rotary_pos_emb.inv_freq")}
    assert set(state) == published
    assert sum(p.numel() for p in model.parameters()) == 6_243_584_000
    # fp16 bytes of every weight plus the 32-float inv_freq the original saved.
    assert sum(t.numel() for t in state.values()) * 2 + 32 * 2 == index["metadata"]["total_size"]
    spec_shapes = {
        "transformer.embedding.word_embeddings.weight": (65024, 4096),
        "transformer.encoder.layers.0.self_attention.query_key_value.weight": (4608, 4096),
        "transformer.encoder.layers.0.self_attention.query_key_value.bias": (4608,),
        "transformer.encoder.layers.0.self_attention.dense.weight": (4096, 4096),
        "transformer.encoder.layers.0.mlp.dense_h_to_4h.weight": (27392, 4096),
        "transformer.encoder.layers.0.mlp.dense_4h_to_h.weight": (4096, 13696),
        "transformer.output_layer.weight": (65024, 4096),
    }
    for key, shape in spec_shapes.items():
        assert tuple(state[key].shape) == shape, key


def test_thudm_state_dict_with_inv_freq_loads_without_missing_keys(tmp_path):
    from safetensors.torch import save_file

    config = tiny_config()
    model = glm.ChatGLMForConditionalGeneration(config)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["transformer.rotary_pos_emb.inv_freq"] = torch.ones(config.kv_channels // 4)
    model.save_pretrained(tmp_path)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded, info = glm.ChatGLMForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


# ---------------------------------------------------------------------------------------------------------------
# Loading a saved folder through the Auto classes, in a fresh process


def test_save_and_load_through_auto_classes_in_fresh_process(tmp_path):
    config = tiny_config(num_labels=3)
    torch.manual_seed(6)
    model = glm.ChatGLMForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert "configuration_glm.py" in written and "modeling_glm.py" in written and "model.safetensors" in written
    ids = torch.randint(3, config.padded_vocab_size, (1, 9))
    with torch.no_grad():
        expected = model(ids).logits
    torch.save({"ids": ids, "logits": expected}, tmp_path.parent / "expected.pt")
    script = textwrap.dedent(f"""
        import torch
        from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM,
                                  AutoModelForSequenceClassification)
        path = {str(tmp_path)!r}
        data = torch.load({str(tmp_path.parent / "expected.pt")!r})
        for auto in (AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM):
            model = auto.from_pretrained(path, trust_remote_code=True).eval()
            assert type(model).__name__ == "ChatGLMForConditionalGeneration", type(model)
            with torch.no_grad():
                torch.testing.assert_close(model(data["ids"]).logits, data["logits"])
        classifier = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True).eval()
        with torch.no_grad():
            assert classifier(data["ids"]).logits.shape == (1, 3)
        print("LOADED", type(classifier).__name__)
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path.parent, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOADED ChatGLMForSequenceClassification" in result.stdout


def test_root_config_json_is_chatglm3_6b_with_auto_map():
    config = json.loads((ROOT / "config.json").read_text())
    for key, value in json.loads(reference_file("chatglm3-6b", "config.json").read_text()).items():
        if key not in ("auto_map", "_name_or_path", "transformers_version"):
            assert config[key] == value, key
    for auto in ("AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForSeq2SeqLM",
                 "AutoModelForSequenceClassification"):
        module, _ = config["auto_map"][auto].split(".")
        assert (ROOT / f"{module}.py").exists(), auto


def test_root_generation_config_stops_at_every_chatglm3_stop_token():
    from transformers import GenerationConfig

    generation = GenerationConfig.from_pretrained(ROOT)
    # </s>, <|user|>, <|observation|> (docs/architecture.md section 5), and the original chat() sampling defaults.
    assert generation.eos_token_id == [2, 64795, 64797] and generation.pad_token_id == 0
    assert (generation.do_sample, generation.top_p, generation.temperature, generation.max_length) == (
        True, 0.8, 0.8, 8192)


# ---------------------------------------------------------------------------------------------------------------
# Training features


def _saved_activation_bytes(model, ids):
    """Bytes autograd keeps for the backward pass: the activation memory gradient checkpointing must cut."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids).loss
    loss.backward()
    return total, loss


def test_gradient_checkpointing_same_gradients_less_memory():
    config = tiny_config(num_layers=4)
    torch.manual_seed(8)
    model = glm.ChatGLMForConditionalGeneration(config).train()
    ids = torch.randint(3, config.padded_vocab_size, (2, 64))
    plain_bytes, plain_loss = _saved_activation_bytes(model, ids)
    plain_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name; 4.57 has only the old one
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert all(layer.gradient_checkpointing for layer in model.transformer.encoder.layers)
    ckpt_bytes, ckpt_loss = _saved_activation_bytes(model, ids)
    torch.testing.assert_close(ckpt_loss, plain_loss)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, plain_grads[name], atol=1e-6, rtol=1e-5, msg=name)
    assert ckpt_bytes < 0.6 * plain_bytes, (ckpt_bytes, plain_bytes)


def test_resize_token_embeddings():
    config = tiny_config()
    model = glm.ChatGLMForConditionalGeneration(config)
    old = model.get_input_embeddings().weight[:10].clone()
    model.resize_token_embeddings(160)
    assert model.config.padded_vocab_size == 160 and model.config.vocab_size == 160
    assert model.transformer.output_layer.weight.shape == (160, config.hidden_size)
    assert torch.equal(model.get_input_embeddings().weight[:10], old)
    ids = torch.tensor([[150, 5, 159]])
    with torch.no_grad():  # training calls with labels return the loss only (logits=None)
        assert model(ids, labels=ids).logits.shape == (1, 3, 160)


@pytest.mark.parametrize("projection", [False, True])
def test_ptuning_v2_trains_only_the_prefix(projection):
    config = tiny_config(pre_seq_len=4, prefix_projection=projection)
    torch.manual_seed(9)
    model = glm.ChatGLMForConditionalGeneration(config).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {"transformer.prefix_encoder.embedding.weight"}
    if projection:
        expected |= {f"transformer.prefix_encoder.trans.{i}.{k}" for i in (0, 2) for k in ("weight", "bias")}
    assert trainable == expected
    kv_size = config.num_layers * 2 * config.multi_query_group_num * config.kv_channels
    assert model.transformer.prefix_encoder.embedding.weight.shape == (4, kv_size)
    before = {n: p.clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = torch.randint(3, config.padded_vocab_size, (2, 12))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) != (name in expected), name
    # With and without a cache the prefix is attended the same way, positions starting at 0.
    model.eval()
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cached = model(ids, use_cache=True).logits
        greedy = model.generate(ids[:1], max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
        step_logits = model(greedy[:, :-1], use_cache=False).logits[:, -4:].argmax(-1)
    torch.testing.assert_close(full, cached)
    assert torch.equal(step_logits, greedy[:, -4:])


def test_ptuning_v2_stays_frozen_after_from_pretrained(tmp_path):
    glm.ChatGLMForConditionalGeneration(tiny_config(pre_seq_len=3)).save_pretrained(tmp_path)
    for auto in (glm.ChatGLMForConditionalGeneration, glm.ChatGLMModel):
        model = auto.from_pretrained(tmp_path)
        trainable = {n.removeprefix("transformer.") for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {"prefix_encoder.embedding.weight"}, auto


def test_sequence_classification_pools_last_real_token():
    config = tiny_config(num_labels=2)
    torch.manual_seed(10)
    model = glm.ChatGLMForSequenceClassification(config).eval()
    ids = torch.randint(3, config.padded_vocab_size, (1, 6))
    left = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    left_mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], 1)
    right = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    with torch.no_grad():
        alone = model(ids).logits
        left_logits = model(left, attention_mask=left_mask).logits
        right_logits = model(right, attention_mask=left_mask.flip(1)).logits
        right_no_mask = model(right).logits  # pads found by pad_token_id
    for logits in (left_logits, right_logits, right_no_mask):
        torch.testing.assert_close(logits, alone, atol=1e-5, rtol=0)
    out = model(ids, labels=torch.tensor([1]))
    assert out.loss.item() == pytest.approx(torch.nn.functional.cross_entropy(out.logits, torch.tensor([1])).item())


# ---------------------------------------------------------------------------------------------------------------
# Bad configurations


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(num_attention_heads=6, multi_query_group_num=4), "multi_query_group_num"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(num_layers=-1), "num_layers"),
        (dict(kv_channels=6), "kv_channels"),
        (dict(rope_ratio=0), "rope_ratio"),
        (dict(rope_ratio=-2.0), "rope_ratio"),
        (dict(padded_vocab_size=0), "padded_vocab_size"),
        (dict(attn_implementation="flash_attention_9"), "attn_implementation"),
    ],
)
def test_bad_configs_raise_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_legacy_tuple_cache_is_refused_clearly():
    model = glm.ChatGLMForConditionalGeneration(tiny_config())
    with pytest.raises(TypeError, match="Cache"):
        model(torch.tensor([[5, 6]]), past_key_values=((torch.zeros(1), torch.zeros(1)),))


# ---------------------------------------------------------------------------------------------------------------
# Fast paths (issue 6): custom autograd functions and the fused training loss give the same values and gradients


def _grads(model):
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


@pytest.mark.parametrize("overrides", PARITY_CONFIGS[:3])
def test_training_loss_and_gradients_match_native_glm(overrides):
    config, model, native = _pair(11, **overrides)
    model.train()
    native.train()
    ids, mask = left_padded_batch(config.padded_vocab_size, [10, 7, 4])
    labels = ids.masked_fill((mask == 0) | (mask.cumsum(-1) == 1), -100)
    ours = model(ids, attention_mask=mask, labels=labels)
    theirs = native(ids, attention_mask=mask, labels=labels)
    assert ours.logits is None  # training with labels returns the loss only (the logits are never built)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=0)
    ours.loss.backward()
    theirs.loss.backward()
    converted = convert_glm.glm_to_native_state_dict(_grads(model), config)
    native_grads = _grads(native)
    assert set(converted) == set(native_grads)
    for name, grad in converted.items():
        torch.testing.assert_close(grad, native_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("num_items", [None, 17])
def test_fused_loss_equals_plain_loss_and_gradients(num_items):
    torch.manual_seed(12)
    vocab, width = 50, 16
    hidden = torch.randn(3, 9, width, requires_grad=True)
    weight = torch.randn(vocab, width, requires_grad=True)
    labels = torch.randint(0, vocab, (3, 9))
    labels[0, :4] = -100
    original = modeling._LOSS_BLOCK_ELEMENTS
    modeling._LOSS_BLOCK_ELEMENTS = 4 * vocab  # blocks of 4 rows: several, and a partial last one
    try:
        fused = modeling.fused_causal_lm_loss(hidden, weight, labels, num_items)
        fused_grads = torch.autograd.grad(fused * 3, (hidden, weight))
    finally:
        modeling._LOSS_BLOCK_ELEMENTS = original
    plain = modeling.causal_lm_loss(hidden @ weight.t(), labels, num_items)
    torch.testing.assert_close(fused, plain)
    for a, b in zip(fused_grads, torch.autograd.grad(plain * 3, (hidden, weight))):
        torch.testing.assert_close(a, b)


def test_training_keeps_no_vocabulary_sized_tensor_and_eval_returns_logits():
    config = tiny_config(padded_vocab_size=1000)
    model = glm.ChatGLMForConditionalGeneration(config).train()
    ids = torch.randint(3, config.padded_vocab_size, (4, 64))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = model(ids, labels=ids)
    assert out.logits is None
    # The largest kept tensor is a weight matrix, nothing of tokens x vocab.
    assert max(saved) < ids.numel() * config.padded_vocab_size / 4, max(saved)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        evaluated = model(ids, labels=ids)
    assert evaluated.logits.shape == (4, 64, config.padded_vocab_size)
    torch.testing.assert_close(evaluated.loss, out.loss)
    # An adapter or hook on the output layer must not be bypassed: then the plain path runs, logits included.
    model.transformer.output_layer.register_forward_hook(lambda module, args, output: output)
    assert model(ids, labels=ids).logits.shape == (4, 64, config.padded_vocab_size)


def test_rmsnorm_rotary_and_swiglu_functions_gradcheck():
    torch.manual_seed(13)
    # RMSNorm computes in fp32 whatever the input (docs/architecture.md section 3): checked against plain autograd.
    x = torch.randn(2, 3, 8, requires_grad=True)
    weight = torch.randn(8, requires_grad=True)
    grad_output = torch.randn(2, 3, 8)
    fused = modeling._RMSNormFunction.apply(x, weight, 1e-5)
    plain = weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(fused, plain)
    for a, b in zip(torch.autograd.grad(fused, (x, weight), grad_output),
                    torch.autograd.grad(plain, (x, weight), grad_output)):
        torch.testing.assert_close(a, b)
    angles = torch.randn(2, 3, 1, 2, dtype=torch.float64)
    heads = torch.randn(2, 3, 4, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h: modeling._RotaryFunction.apply(h, angles.cos(), angles.sin()), (heads,))
    gate_up = torch.randn(2, 3, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(modeling._SwiGLUFunction.apply, (gate_up,))
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(modeling._SwiGLUFunction.apply(gate_up), torch.nn.functional.silu(gate) * up)


def _short_checkpoint(folder: Path, config_layers: int, keep_layers: int):
    model = glm.ChatGLMForConditionalGeneration(tiny_config(num_layers=keep_layers, padded_vocab_size=512))
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_layers"] = config_layers
    config.pop("num_hidden_layers", None)
    (folder / "config.json").write_text(json.dumps(config))
    return model


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json"])
def test_a_truncated_file_is_named(workspace, tmp_path, name):
    """A copy or download cut short: the libraries' errors ("incomplete metadata", "Expecting property name") name
    no file; ours name it. The whole folder loads, so the check cannot misfire."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path / "model"
    shutil.copytree(workspace / "base", folder)
    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[:len(data) // 2])
    load = AutoTokenizer.from_pretrained if name == "tokenizer.json" else AutoModelForCausalLM.from_pretrained
    with pytest.raises(OSError, match=re.escape(str(folder / name)) + r" is (truncated|damaged).*copy or download it "
                       "again"):
        load(folder, trust_remote_code=True)


def test_checkpoint_with_fewer_layers_than_config_is_refused(workspace, tmp_path):
    base = tmp_path / "short"
    _short_checkpoint(base, config_layers=4, keep_layers=2)
    for file in (workspace / "base").glob("tokeniz*"):
        shutil.copy(file, base)
    with pytest.raises(ValueError, match=r"lacks \d+ weight\(s\).*transformer\.encoder\.layers\.2\."):
        glm.ChatGLMForConditionalGeneration.from_pretrained(base)
    out = tmp_path / "out"
    fake_finished_run(out)
    before = snapshot(out)
    with pytest.raises(ValueError, match="transformer.encoder.layers.3"):
        train.main(["--model_name_or_path", str(base), "--train_file", str(workspace / "chats.jsonl"),
                    "--output_dir", str(out), "--max_train_steps", "1", "--block_size", "128",
                    "--overwrite_output_dir"])
    assert snapshot(out) == before  # even with --overwrite_output_dir: nothing goes before the model is built
    # New heads stay allowed: a P-tuning prefix added to a base model, a classifier on a causal-LM checkpoint.
    ok = tmp_path / "ok"
    _short_checkpoint(ok, config_layers=2, keep_layers=2)
    model = glm.ChatGLMForConditionalGeneration.from_pretrained(ok, pre_seq_len=3)
    assert model.transformer.prefix_encoder is not None
    assert glm.ChatGLMForSequenceClassification.from_pretrained(ok, num_labels=2).classifier_head.out_features == 2


def test_half_precision_on_a_cpu_says_once_which_dtype_is_faster():
    """dtype="auto" gives a published checkpoint's fp16; on a CPU the first forward of an fp16 or bf16 model says
    (once per model) that float32 or llama.cpp is faster there; float32 says nothing."""
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    modeling.logger.addHandler(handler)
    try:
        torch.manual_seed(0)
        model = glm.ChatGLMForConditionalGeneration(tiny_config()).eval()
        ids = torch.randint(3, 128, (1, 5))
        with torch.no_grad():
            model(ids)
            assert records == []
            for dtype, name in ((torch.float16, "float16"), (torch.bfloat16, "bfloat16")):
                half = copy.deepcopy(model).to(dtype)
                half(ids)
                half.generate(ids, max_new_tokens=2, do_sample=False)
                said = [record.getMessage() for record in records]
                assert len(said) == 1 and said[0].startswith(f"GLM runs in {name} on the CPU"), said
                assert "dtype=torch.float32" in said[0] and "llama.cpp" in said[0]
                records.clear()
    finally:
        modeling.logger.removeHandler(handler)
