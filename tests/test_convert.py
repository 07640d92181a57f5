"""A checkpoint folder as THUDM published it loads with our code after `convert_glm.py --to code`, and the
native round trip through the command line keeps every weight."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ROOT, glm, tiny_config
from safetensors.torch import load_file, save_file
from train_helpers import snapshot

import convert_glm
from text_helpers import _thudm_folder


@pytest.mark.parametrize("tokenizer_config_name", ["tokenizer_config.json", "tokenizer_config.latest.json"])
def test_thudm_folder_loads_unchanged_with_our_code(tmp_path, tokenizer_config_name):
    model, published = _thudm_folder(tmp_path / "chatglm3", tokenizer_config_name)
    weights_before = {p.name: p.read_bytes() for p in (tmp_path / "chatglm3").glob("*.bin")}
    subprocess.run([sys.executable, str(ROOT / "convert_glm.py"), "--to", "code", str(tmp_path / "chatglm3"),
                    str(tmp_path / "chatglm3")], check=True, capture_output=True, timeout=300)
    folder = tmp_path / "chatglm3"
    assert {p.name: p.read_bytes() for p in folder.glob("*.bin")} == weights_before
    adopted = json.loads((folder / "config.json").read_text())
    assert {k: v for k, v in adopted.items() if k not in ("auto_map", "vocab_size")} == {
        k: v for k, v in published.items() if k != "auto_map"}, "config keys must stay as published"
    assert adopted["vocab_size"] == published["padded_vocab_size"]  # added for llama.cpp's converter
    ids = torch.tensor([[64790, 64792, 64795, 30910, 13, 36474, 54591, 64796]])
    with torch.no_grad():
        expected = model(ids).logits
    torch.save({"ids": ids, "logits": expected}, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import torch
        from transformers import AutoModel, AutoTokenizer
        path = {str(folder)!r}
        data = torch.load({str(tmp_path / "expected.pt")!r})
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        assert tokenizer.build_chat_input("你好")["input_ids"].tolist() == data["ids"].tolist()
        model, info = AutoModel.from_pretrained(path, trust_remote_code=True, dtype=torch.float32,
                                                output_loading_info=True)
        assert not info["missing_keys"], info
        assert set(info["unexpected_keys"]) <= {{"transformer.rotary_pos_emb.inv_freq"}}, info
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(data["ids"]).logits, data["logits"])
        response, history = model.chat(tokenizer, "你好", max_new_tokens=3, do_sample=False)
        assert history[0] == {{"role": "user", "content": "你好"}}, history
        print("ADOPTED", type(model).__name__, type(tokenizer).__name__)
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ADOPTED ChatGLMForConditionalGeneration ChatGLMTokenizer" in result.stdout


def test_native_round_trip_through_the_command_line(tmp_path):
    config = tiny_config()
    torch.manual_seed(1)
    model = glm.ChatGLMForConditionalGeneration(config)
    model.save_pretrained(tmp_path / "glm")
    for to, src, dst in (("native", "glm", "native"), ("glm", "native", "back")):
        subprocess.run([sys.executable, str(ROOT / "convert_glm.py"), "--to", to, str(tmp_path / src),
                        str(tmp_path / dst)], check=True, capture_output=True, timeout=300)
    from transformers import GlmForCausalLM

    native = GlmForCausalLM.from_pretrained(tmp_path / "native")
    ids = torch.randint(3, config.padded_vocab_size, (1, 7))
    back = glm.ChatGLMForConditionalGeneration.from_pretrained(tmp_path / "back")
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(native(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
    assert (tmp_path / "back" / "modeling_glm.py").exists()


def test_adopting_a_folder_that_is_not_glm_fails_clearly(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type"):
        convert_glm.adopt_code(tmp_path, tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        convert_glm.adopt_code(tmp_path / "missing", tmp_path / "out")


@pytest.mark.parametrize("case, message", [
    ("wrong_shape", r"wrong shape: transformer\.encoder\.layers\.0\.mlp\.dense_4h_to_h\.weight \(64, 95\)"),
    ("missing_tensor", r"missing: transformer\.encoder\.layers\.1\.input_layernorm\.weight"),
    ("missing_output_layer", r"missing: transformer\.output_layer\.weight"),
    ("layer_count", r"the weights hold 2 layers .* num_layers 3"),
])
def test_convert_refuses_a_checkpoint_that_disagrees_with_config(tmp_path, case, message):
    src = tmp_path / "src"
    torch.manual_seed(0)
    glm.ChatGLMForConditionalGeneration(tiny_config()).save_pretrained(src)
    state = load_file(str(src / "model.safetensors"))
    if case == "wrong_shape":
        state["transformer.encoder.layers.0.mlp.dense_4h_to_h.weight"] = torch.zeros(64, 95)
    elif case == "missing_tensor":
        del state["transformer.encoder.layers.1.input_layernorm.weight"]
    elif case == "missing_output_layer":
        del state["transformer.output_layer.weight"]
    else:
        config = json.loads((src / "config.json").read_text())
        config["num_layers"] = config["num_hidden_layers"] = 3
        (src / "config.json").write_text(json.dumps(config))
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    before = snapshot(src)
    for to in ("native", "code"):
        dst = tmp_path / f"dst-{to}"
        with pytest.raises(ValueError, match=message):
            convert_glm.main(["--to", to, str(src), str(dst)])
        assert not dst.exists()
    assert snapshot(src) == before


def test_a_truncated_shard_is_named_before_anything_is_written(tmp_path):
    src = tmp_path / "src"
    glm.ChatGLMForConditionalGeneration(tiny_config()).save_pretrained(src)
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    dst = tmp_path / "dst"
    with pytest.raises(ValueError, match=re.escape(str(weights)) + r" is truncated: \d+ bytes where its header needs"):
        convert_glm.main(["--to", "native", str(src), str(dst)])
    assert not dst.exists()


def test_a_conversion_never_writes_over_its_source_or_a_users_files(tmp_path, capsys):
    """convert_glm.py --to native DIR DIR used to overwrite DIR's config.json and weights and then fail, leaving a
    folder that loads as neither model; an occupied dst lost its config.json silently. Both are refused before
    anything is read, naming the folder; --overwrite (or a new folder) converts."""
    src = tmp_path / "glm"
    glm.ChatGLMForConditionalGeneration(tiny_config()).save_pretrained(src)
    before = snapshot(src)
    for dst, why in ((src, "is src"), (src / "native", "is inside src")):
        with pytest.raises(SystemExit) as exit_info:
            convert_glm.main(["--to", "native", str(src), str(dst)])
        assert exit_info.value.code == 2 and f"dst {dst} {why} {src}" in capsys.readouterr().err
        assert snapshot(src) == before
    occupied = tmp_path / "mine"
    occupied.mkdir()
    (occupied / "config.json").write_text("my own config")
    with pytest.raises(SystemExit):
        convert_glm.main(["--to", "native", str(src), str(occupied)])
    assert "already holds files (config.json); give a new or empty folder, or --overwrite" in capsys.readouterr().err
    assert (occupied / "config.json").read_text() == "my own config"
    convert_glm.main(["--to", "native", str(src), str(occupied), "--overwrite"])
    assert json.loads((occupied / "config.json").read_text())["model_type"] == "glm"
    convert_glm.main(["--to", "code", str(src), str(src)])  # in place is what --to code is for


def test_the_functions_refuse_what_the_command_refuses(tmp_path):
    """convert_checkpoint and adopt_code hold the destination rules themselves (scripts and tests call them
    directly): the same refusals, before anything is written, and overwrite=True as --overwrite."""
    src = tmp_path / "glm"
    glm.ChatGLMForConditionalGeneration(tiny_config()).save_pretrained(src)
    before = snapshot(src)
    with pytest.raises(convert_glm.DestinationError, match=re.escape(f"dst {src} is src {src}")):
        convert_glm.convert_checkpoint(src, src, "native")
    with pytest.raises(convert_glm.DestinationError, match="is inside src"):
        convert_glm.adopt_code(src, src / "sub")
    assert snapshot(src) == before
    occupied = tmp_path / "mine"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    for call in (lambda **kw: convert_glm.convert_checkpoint(src, occupied, "native", **kw),
                 lambda **kw: convert_glm.adopt_code(src, occupied, **kw)):
        with pytest.raises(convert_glm.DestinationError, match=r"already holds files \(notes.txt\)"):
            call()
        assert sorted(p.name for p in occupied.iterdir()) == ["notes.txt"]
    convert_glm.convert_checkpoint(src, occupied, "native", overwrite=True)
    assert json.loads((occupied / "config.json").read_text())["model_type"] == "glm"
    assert (occupied / "notes.txt").read_text() == "mine"


def _todays_conversion(src, dst, to, max_shard_size):
    """What convert_glm.py wrote before it streamed: the whole state dict read, converted, and saved by
    huggingface_hub's save_torch_state_dict (the reference the streamed files must equal)."""
    from huggingface_hub import save_torch_state_dict

    state = {}
    for file in sorted(src.glob("*.safetensors")):
        state.update(load_file(str(file)))
    for file in sorted(src.glob("pytorch_model*.bin")):
        state.update(torch.load(file, map_location="cpu", weights_only=True))
    config = json.loads((src / "config.json").read_text())
    if to == "native":
        glm_config = glm.ChatGLMConfig(**{k: v for k, v in config.items() if k not in ("auto_map", "architectures")})
        converted = convert_glm.glm_to_native_state_dict(state, glm_config)
    else:
        converted = convert_glm.native_to_glm_state_dict(state, config["num_hidden_layers"])
    dst.mkdir()
    save_torch_state_dict(converted, str(dst), max_shard_size=max_shard_size, metadata={"format": "pt"})


def _weight_files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.name.startswith("model") and ".safetensors" in p.name}


@pytest.mark.parametrize("source_format", ["safetensors", "bin"])
def test_streamed_conversion_writes_the_files_the_whole_state_dict_gave(tmp_path, source_format):
    """Both directions, tensor by tensor, write byte for byte the shards and index that converting the whole state
    dict in memory wrote: several output shards, mixed dtypes (fp16 weights, fp32 norms), qkv biases."""
    torch.manual_seed(0)
    model = glm.ChatGLMForConditionalGeneration(tiny_config(add_qkv_bias=True)).half()
    for name, module in model.named_modules():
        if name.endswith("layernorm"):
            module.float()
    src = tmp_path / "glm"
    if source_format == "safetensors":
        model.save_pretrained(src, max_shard_size="30KB")
    else:  # THUDM's layout: .bin shards
        src.mkdir()
        model.config.save_pretrained(src)
        state, names = model.state_dict(), sorted(model.state_dict())
        for number, keys in enumerate((names[:9], names[9:]), start=1):
            torch.save({key: state[key].clone() for key in keys}, src / f"pytorch_model-0000{number}-of-00002.bin")
    assert len(list(src.glob("*.safetensors")) or list(src.glob("*.bin"))) >= 2
    for to, source, name in (("native", src, "native"), ("glm", tmp_path / "native", "back")):
        convert_glm.main(["--to", to, str(source), str(tmp_path / name), "--max_shard_size", "20KB"])
        _todays_conversion(source, tmp_path / f"{name}-reference", to, "20KB")
        streamed, reference = _weight_files(tmp_path / name), _weight_files(tmp_path / f"{name}-reference")
        assert len(streamed) >= 3 and "model.safetensors.index.json" in streamed
        assert streamed.keys() == reference.keys()
        for file in streamed:
            assert streamed[file] == reference[file], f"{name}/{file} differs from the whole-state-dict output"
    dtypes = {t.dtype for file in (tmp_path / "back").glob("*.safetensors") for t in load_file(str(file)).values()}
    assert dtypes == {torch.float16, torch.float32}


CONVERSION_MARGIN = 350 * 2**20  # above the largest shard: one output tensor (a 533 MB embedding is written
# straight from the mapped shard), the qkv split's copies (38 MB), the tokenizer's conversion


def _convert_in_a_process(args):
    """convert_glm.main(args) in a fresh process: (peak RSS, RSS before converting) in bytes, from /proc (VmHWM
    counts the mapped shards' resident pages too), with the libraries the conversion imports already imported."""
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(ROOT)!r})
        import huggingface_hub, safetensors, torch, transformers
        from transformers import GlmConfig, PreTrainedTokenizerFast
        import configuration_glm, convert_glm, local_glm
        def status(key):
            line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
            return int(line.split()[1]) * 1024
        before = status("VmRSS")
        convert_glm.main({args!r})
        print(json.dumps({{"peak": status("VmHWM"), "before": before}}))
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    return figures["peak"], figures["before"]


@pytest.mark.real_width
def test_real_width_conversion_memory_is_bounded_by_the_largest_shard(real_width_folder, tmp_path):
    """--to native and back at chatglm3-6b's width: each direction's peak RSS stays below its largest source shard
    plus CONVERSION_MARGIN (the whole-state-dict code held the model: 1.9 GB here, 1.16-1.24x it at 28 layers),
    the native files equal the whole-state-dict output byte for byte, and the round trip gives THUDM's tensors."""
    src, native, back = real_width_folder, tmp_path / "native", tmp_path / "back"
    model_bytes = sum(p.stat().st_size for p in src.glob("*.bin"))
    for to, source, dst in (("native", src, native), ("glm", native, back)):
        peak, before = _convert_in_a_process(["--to", to, str(source), str(dst), "--max_shard_size", "700MB"])
        largest = max(p.stat().st_size for p in list(source.glob("*.bin")) + list(source.glob("*.safetensors")))
        print(f"--to {to}: peak RSS {peak / 2**20:.0f} MiB, {(peak - before) / 2**20:.0f} MiB above the "
              f"imports; largest shard {largest / 2**20:.0f} MiB, model {model_bytes / 2**20:.0f} MiB")
        assert peak - before < largest + CONVERSION_MARGIN < model_bytes, (to, peak, before, largest)
    _todays_conversion(src, tmp_path / "native-reference", "native", "700MB")
    streamed, reference = _weight_files(native), _weight_files(tmp_path / "native-reference")
    assert streamed.keys() == reference.keys() and len(streamed) >= 4
    for file in streamed:
        assert streamed[file] == reference[file], file
    del streamed, reference
    index = json.loads((back / "model.safetensors.index.json").read_text())["weight_map"]
    original = json.loads((src / "pytorch_model.bin.index.json").read_text())["weight_map"]
    assert set(index) == set(original) - {"transformer.rotary_pos_emb.inv_freq"}
    from safetensors import safe_open

    for file in sorted(src.glob("*.bin")):
        for name, tensor in torch.load(file, map_location="cpu", weights_only=True, mmap=True).items():
            if name in index:
                with safe_open(str(back / index[name]), framework="pt") as f:
                    assert torch.equal(f.get_tensor(name), tensor), name
