"""Every kind of folder we write converts with the stock converters of llama.cpp (convert_hf_to_gguf.py, pinned to
llama-cpp-python 0.3.36's vendored copy) and chatglm.cpp (0.4.2's convert.py), fetched from PyPI into a cache
(tests/engine_converters.py). The GGUF is read back with the `gguf` package and compared with our weights and with
SentencePiece itself; chatglm.cpp's file is parsed by its documented layout. Running both engines on each folder
kind is scripts/engines_check.py, over the builds of scripts/install_engines.sh (CI builds them once into a cache)."""

import base64
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, glm, tiny_config, train_to_replay
from safetensors.torch import load_file

import engine_converters

tg = glm.tokenization
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
# Our weight names -> llama.cpp's (its ChatGLM tensor map), the independent side of the tensor comparison.
GGUF_NAMES = {
    "transformer.embedding.word_embeddings.weight": "token_embd.weight",
    "transformer.encoder.final_layernorm.weight": "output_norm.weight",
    "transformer.output_layer.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "self_attention.query_key_value.weight": "attn_qkv.weight",
    "self_attention.query_key_value.bias": "attn_qkv.bias",
    "self_attention.dense.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.dense_h_to_4h.weight": "ffn_up.weight",
    "mlp.dense_4h_to_h.weight": "ffn_down.weight",
}


def converter(get):
    try:
        return get()
    except engine_converters.Unavailable as error:
        pytest.skip(f"the package registry is unreachable, so the stock converter cannot be fetched: {error}")


@pytest.fixture(scope="module")
def llama_cpp():
    return converter(engine_converters.llama_cpp_converter)


@pytest.fixture(scope="module")
def chatglm_cpp():
    return converter(engine_converters.chatglm_cpp_converter)


def to_gguf(llama_cpp, folder, out, answer="", outtype="f32"):
    """Run the converter; `answer` is typed at its prompts (its GPT-2 vocabulary path loads the tokenizer without
    trust_remote_code, so transformers asks whether to run the folder's code, as it asks a user)."""
    result = subprocess.run([sys.executable, str(llama_cpp), str(folder), "--outfile", str(out), "--outtype", outtype],
                            env=ENV, capture_output=True, text=True, timeout=600, input=answer)
    return result.returncode, result.stdout + result.stderr


def state_dict(folder):
    files = sorted(Path(folder).glob("*.safetensors")) or sorted(Path(folder).glob("*.bin"))
    state = {}
    for file in files:
        state.update(load_file(str(file)) if file.suffix == ".safetensors" else torch.load(file))
    return {k: v.float() for k, v in state.items() if not k.endswith("inv_freq")}


def gguf_name(name):
    if name in GGUF_NAMES:
        return GGUF_NAMES[name]
    layer, rest = name.removeprefix("transformer.encoder.layers.").split(".", 1)
    return f"blk.{layer}.{GGUF_NAMES[rest]}"


def check_gguf(path, folder, tokenizer):
    """Architecture, hyperparameters, every tensor (name, shape, values), the token list against SentencePiece,
    and the prompt metadata of a GGUF converted from `folder`."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    config = json.loads((Path(folder) / "config.json").read_text())
    assert field("general.architecture") == "chatglm"
    assert field("chatglm.block_count") == config["num_layers"]
    assert field("chatglm.embedding_length") == config["hidden_size"]
    assert field("chatglm.feed_forward_length") == config["ffn_hidden_size"]
    assert field("chatglm.attention.head_count") == config["num_attention_heads"]
    assert field("chatglm.attention.head_count_kv") == config["multi_query_group_num"]
    assert field("chatglm.context_length") == config["seq_length"]
    assert field("chatglm.rope.dimension_count") == config["kv_channels"] // 2  # half of each head rotates
    assert field("chatglm.rope.freq_base") == pytest.approx(10000 * config.get("rope_ratio", 1))
    assert field("chatglm.attention.layer_norm_rms_epsilon") == pytest.approx(config["layernorm_epsilon"])

    weights = state_dict(folder)
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {gguf_name(name) for name in weights}
    for name, value in weights.items():
        tensor = tensors[gguf_name(name)]
        assert list(tensor.shape)[::-1] == list(value.shape), name  # GGUF lists dims innermost first
        np.testing.assert_array_equal(np.asarray(tensor.data).reshape(value.shape), value.numpy(), err_msg=name)

    # The vocabulary: SentencePiece's pieces (llama.cpp spells ids 1, 2 <bos> <eos>), the control tokens, padding.
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(Path(folder) / "tokenizer.model"))
    tokens = field("tokenizer.ggml.tokens")
    n = sp.vocab_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    pieces[1:3] = ["<bos>", "<eos>"]
    padding = [f"[PAD{i}]" for i in range(n + len(tg.GLM3_CONTROL_TOKENS), config["padded_vocab_size"])]
    assert tokens == pieces + list(tg.GLM3_CONTROL_TOKENS) + padding
    types = field("tokenizer.ggml.token_type")
    assert [types[i] for i in range(n, n + 9)] == [3] * 9  # CONTROL: llama.cpp parses them in prompt text
    assert types[3:259] == [6] * 256  # BYTE: byte fallback
    assert field("tokenizer.ggml.model") == "llama" and field("tokenizer.ggml.pre") == "chatglm-spm"
    assert field("tokenizer.ggml.scores")[300] == pytest.approx(sp.get_score(300))
    # llama.cpp adds at most one BOS token: the GGUF must not claim [gMASK] alone; the chat template writes the
    # whole [gMASK]sop prefix, and control-token text in a prompt becomes those tokens.
    assert field("tokenizer.ggml.add_bos_token") is False
    assert field("tokenizer.ggml.eos_token_id") == 2
    assert field("tokenizer.chat_template") == tokenizer.chat_template
    assert "{{- '[gMASK]sop' -}}" in field("tokenizer.chat_template")


# ---------------------------------------------------------------------------------------------------------------
# The folder kinds


@pytest.fixture(scope="module")
def thudm_folder(tmp_path_factory):
    """A tiny THUDM/chatglm3-6b-style checkpoint with our code beside it (convert_glm.py --to code)."""
    from text_helpers import _thudm_folder

    folder = tmp_path_factory.mktemp("thudm") / "chatglm3"
    _thudm_folder(folder, "tokenizer_config.json")
    subprocess.run([sys.executable, str(ROOT / "convert_glm.py"), "--to", "code", str(folder), str(folder)],
                   check=True, capture_output=True, timeout=300, env=ENV)
    return folder


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    from glm_train.data import builtin

    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    rows, _ = builtin.skill_splits(n_train=200, n_heldout=1, seed=0)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def finetune_folder(thudm_folder, chats, tmp_path_factory):
    """train.py's fine-tune of the THUDM-style folder (the real ChatGLM3 tokenizer.model)."""
    import train

    out = tmp_path_factory.mktemp("finetune") / "out"
    train.main(["--model_name_or_path", str(thudm_folder), "--train_file", str(chats), "--output_dir", str(out),
                "--max_train_steps", "1", "--per_device_train_batch_size", "2", "--block_size", "128"])
    return out


@pytest.fixture(scope="module")
def scratch_folder(chats, tmp_path_factory):
    """The main job's kind of folder: train.py from scratch, its tokenizer trained on the data (the chat files
    instead of the built-in set, whose held-out report and chat demo cost a minute; the folder is written alike)."""
    import train

    out = tmp_path_factory.mktemp("scratch") / "out"
    train.main(["--config_name", str(ROOT / "presets" / "tiny.json"), "--train_file", str(chats), "--output_dir",
                str(out), "--max_train_steps", "1", "--tokenizer_vocab_size", "600", "--block_size", "128",
                "--per_device_train_batch_size", "4"])
    return out


def test_fine_tune_config_names_its_base_and_has_engine_values(finetune_folder, thudm_folder):
    config = json.loads((finetune_folder / "config.json").read_text())
    assert config["_name_or_path"] == "THUDM/chatglm3-6b"  # read from the base folder's config.json
    assert config["eos_token_id"] == 2 and config["vocab_size"] == config["padded_vocab_size"] == 65024
    assert json.loads((finetune_folder / "generation_config.json").read_text())["eos_token_id"] == [2, 64795, 64797]
    card = (finetune_folder / "README.md").read_text()
    assert "base_model: THUDM/chatglm3-6b\n" in card and str(thudm_folder) not in card  # the Hub id, no local path


def test_scratch_folder_has_a_sentencepiece_model_with_the_same_ids(scratch_folder):
    import random

    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(scratch_folder / "tokenizer.model"))
    tokenizer = tg.ChatGLMTokenizer.from_pretrained(scratch_folder)
    rng = random.Random(0)
    alphabet = list("abcdefghij XYZ 天气北京上海 0123456789 \t\n,.?！😀𪚥▁") + ["<|user|>", "sop"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        # split_special_tokens=True: control strings as text, as SentencePiece sees them
        assert tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True) == sp.encode(text), text
    config = json.loads((scratch_folder / "config.json").read_text())
    assert config["eos_token_id"] == 2 and "THUDM/chatglm3-6b" in config["_name_or_path"]
    assert "base_model:" not in (scratch_folder / "README.md").read_text()


@pytest.mark.parametrize("kind", ["thudm_folder", "finetune_folder", "scratch_folder"])
def test_llama_cpp_converts_each_chatglm3_folder_kind(kind, request, llama_cpp, tmp_path):
    folder = request.getfixturevalue(kind)
    code, log = to_gguf(llama_cpp, folder, tmp_path / "model.gguf")
    assert code == 0, log[-3000:]
    check_gguf(tmp_path / "model.gguf", folder, tg.ChatGLMTokenizer.from_pretrained(folder))


@pytest.fixture(scope="module")
def glm4_folder(tmp_path_factory):
    """A GLM-4-style folder: a small byte-level ranks file in tiktoken's format (we do not have the real 151,329-rank
    one), GLM-4's special tokens and config values, written by train.py's engine-config step. Returns (folder,
    ranks)."""
    from text_helpers import train_ranks

    from benchmarks.bench_tokenizer import mixed_text

    folder = tmp_path_factory.mktemp("glm4") / "glm4"
    folder.mkdir()
    ranks = train_ranks([mixed_text(300, seed=i) for i in range(100)], vocab_size=600)
    (folder / "tokenizer.model").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    tokenizer = tg.ChatGLMTokenizer(vocab_file=str(folder / "tokenizer.model"))
    config = tiny_config(padded_vocab_size=640, eos_token_id=tokenizer.stop_token_ids,
                         pad_token_id=tokenizer.pad_token_id, rope_ratio=500, layernorm_epsilon=1.5625e-07)
    glm.ChatGLMForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    from glm_train import publish

    publish.write_engine_config(folder / "config.json", tokenizer)
    assert json.loads((folder / "config.json").read_text())["eos_token_id"] == tokenizer.stop_token_ids  # GLM-4's
    import tiktoken

    assert isinstance(tokenizer.tokenizer, tiktoken.Encoding)  # what chatglm.cpp checks
    assert tokenizer.tokenizer.encode("hello 世界") == tokenizer.encode("hello 世界", add_special_tokens=False)
    return folder, ranks


def test_glm4_folder_is_refused_by_the_pre_tokenizer_hash_and_otherwise_converts(glm4_folder, llama_cpp, tmp_path):
    """llama.cpp recognises GLM-4's byte-level vocabulary by the sha256 of the ids of a fixed text; only the real
    151,329-rank file gives a known hash ("chatglm-bpe"). A small ranks file (we do not have the real one) must be
    refused with that reason, after the config and tokenizer were read through our code; past the hash, the GGUF
    has our byte-level vocabulary, GLM-4's stop tokens, no BOS and every weight."""
    folder, ranks = glm4_folder
    code, log = to_gguf(llama_cpp, folder, tmp_path / "glm4.gguf")
    assert code != 0 and "trust_remote_code=True" in log  # nobody answered transformers' prompt
    code, log = to_gguf(llama_cpp, folder, tmp_path / "glm4.gguf", answer="y\n" * 4)
    assert code != 0 and "BPE pre-tokenizer was not recognized" in log, log[-3000:]
    assert "chkhsh" in log and "KeyError" not in log  # got as far as hashing: config and tokenizer were read

    # The rest of the path, as the real vocabulary would take it: the same converter with its hash lookup answering
    # "chatglm-bpe" (the name the real glm-4-9b-chat hash maps to; a test-only patch, not a user option).
    argv = [str(llama_cpp), str(folder), "--outfile", str(tmp_path / "p.gguf"), "--outtype", "f32"]
    patched = (f"import runpy, sys; sys.argv = {argv!r}\n"
               f"sys.path[:0] = [{str(llama_cpp.parent)!r}, {str(llama_cpp.parent / 'gguf-py')!r}]\n"
               "import conversion.base\n"
               "conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'chatglm-bpe'\n"
               f"runpy.run_path({str(llama_cpp)!r}, run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", patched], env=ENV, capture_output=True, text=True, timeout=600,
                            input="y\n" * 4)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    from gguf import GGUFReader

    reader = GGUFReader(str(tmp_path / "p.gguf"))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert (field("tokenizer.ggml.model"), field("tokenizer.ggml.pre")) == ("gpt2", "chatglm-bpe")
    byte_char = tg._bytes_to_unicode()
    ranked = ["".join(byte_char[b] for b in token) for token in sorted(ranks, key=ranks.get)]
    padding = [f"[PAD{i}]" for i in range(len(ranks) + len(tg.GLM4_SPECIAL_TOKENS), 640)]
    assert field("tokenizer.ggml.tokens") == ranked + list(tg.GLM4_SPECIAL_TOKENS) + padding
    specials = {token: len(ranks) + i for i, token in enumerate(tg.GLM4_SPECIAL_TOKENS)}
    assert field("tokenizer.ggml.eos_token_id") == specials["<|endoftext|>"]
    assert field("tokenizer.ggml.eot_token_id") == specials["<|user|>"]
    assert field("tokenizer.ggml.add_bos_token") is False  # llama.cpp asserts on a missing BOS otherwise
    assert field("tokenizer.chat_template") == tg.chat_template(glm4=True)
    weights = state_dict(folder)
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {gguf_name(name) for name in weights}
    for name, value in weights.items():
        np.testing.assert_array_equal(np.asarray(tensors[gguf_name(name)].data).reshape(value.shape), value.numpy())


def test_a_folder_llama_cpp_would_refuse_is_named_with_its_fix_first(resaved_folder, llama_cpp, tmp_path):
    """A ChatGLM3 folder whose config.json lacks the name (written by older code) and one without tokenizer.model:
    convert_glm.llama_cpp_refusals names each cause and its fix, engines_check says it instead of the converter's
    own error (which is about remote code), and the fix it names makes the folder convert."""
    import shutil

    import convert_glm

    old = tmp_path / "old"
    shutil.copytree(resaved_folder, old)
    config = json.loads((old / "config.json").read_text())
    del config["_name_or_path"]
    (old / "config.json").write_text(json.dumps(config))
    (refusal,) = convert_glm.llama_cpp_refusals(old)
    assert refusal.endswith(f"run python convert_glm.py --to code {old} {old}") and "_name_or_path None" in refusal
    code, log = to_gguf(llama_cpp, old, tmp_path / "x.gguf")
    assert code != 0 and "trust_remote_code=True" in log  # what the converter alone says
    if (ENGINES["llama.cpp"] / ".complete").exists():
        code, out, lines = run_engines_check(old, "--engines", "llama.cpp")
        assert code == 1 and lines == [f"DIFF llama.cpp converts the folder: {refusal}"], out[-3000:]

    subprocess.run([sys.executable, str(ROOT / "convert_glm.py"), "--to", "code", str(old), str(old)], check=True,
                   capture_output=True, timeout=300, env=ENV)
    assert convert_glm.llama_cpp_refusals(old) == []
    code, log = to_gguf(llama_cpp, old, tmp_path / "model.gguf")
    assert code == 0, log[-3000:]
    check_gguf(tmp_path / "model.gguf", old, tg.ChatGLMTokenizer.from_pretrained(old))

    (old / "tokenizer.model").unlink()
    assert convert_glm.llama_cpp_refusals(old) == [f"{old} has no tokenizer.model, the vocabulary the converter "
                                                   "reads: save the tokenizer beside the model "
                                                   "(tokenizer.save_pretrained(folder))"]
    (old / "adapter_config.json").write_text("{}")
    (old / "config.json").unlink()
    assert "a LoRA adapter alone; convert the merged model" in convert_glm.llama_cpp_refusals(old)[0]


# ---------------------------------------------------------------------------------------------------------------
# chatglm.cpp


def read_chatglm_cpp(path):
    """chatglm.cpp's GGML file (convert.py's layout): magic, model type, config, tokenizer blob, tensors."""
    data = Path(path).read_bytes()
    assert data[:4] == b"ggml"
    (model_type,) = struct.unpack_from("i", data, 4)
    version, *values = struct.unpack_from("iiiiiiiififiii", data, 8)  # version, then the config values
    offset = 8 + struct.calcsize("iiiiiiiififiii")
    (size,) = struct.unpack_from("i", data, offset)
    blob = data[offset + 4: offset + 4 + size]
    offset += 4 + size
    tensors = {}
    while offset < len(data):
        (length,) = struct.unpack_from("i", data, offset)
        name = data[offset + 4: offset + 4 + length].decode()
        offset += 4 + length
        (ndim,) = struct.unpack_from("i", data, offset)
        *shape, dtype = struct.unpack_from("i" * (ndim + 1), data, offset + 4)
        assert dtype == 0, "f32 was asked for"
        offset = (offset + 4 * (ndim + 2) + 15) // 16 * 16
        count = int(np.prod(shape))
        tensors[name] = np.frombuffer(data, np.float32, count, offset).reshape(shape)
        offset += 4 * count
    return model_type, version, values, blob, tensors


@pytest.mark.parametrize("kind", ["finetune_folder", "scratch_folder"])
def test_chatglm_cpp_converts_chatglm3_folders(kind, request, chatglm_cpp, tmp_path):
    pytest.importorskip("tabulate", reason="chatglm.cpp's convert.py imports tabulate (requirements-test.txt)")
    folder = request.getfixturevalue(kind)
    out = tmp_path / "model.bin"
    result = subprocess.run([sys.executable, str(chatglm_cpp), "-i", str(folder), "-o", str(out), "-t", "f32"],
                            env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    model_type, version, values, blob, tensors = read_chatglm_cpp(out)
    config = json.loads((folder / "config.json").read_text())
    assert (model_type, version) == (3, 2)  # CHATGLM3: the "<|system|>" control token was found
    assert tuple(values[1:7]) == (config["padded_vocab_size"], config["hidden_size"], config["num_attention_heads"],
                           config["multi_query_group_num"], config["num_layers"], config["ffn_hidden_size"])
    assert tuple(values[-3:]) == (config["seq_length"], 2, 0)  # eos 2 (one int), pad 0
    assert blob == (folder / "tokenizer.model").read_bytes()
    weights = state_dict(folder)
    assert set(tensors) == set(weights)
    for name, value in weights.items():
        np.testing.assert_array_equal(tensors[name], value.numpy(), err_msg=name)


def test_train_warns_when_engines_would_compute_another_head_size():
    from glm_train import model

    model.register_auto_classes()  # as train.py does
    tokenizer = tg.train_glm_tokenizer(["hello world"] * 20, 300)
    with pytest.warns(UserWarning, match="kv_channels 16 != hidden_size 64 / num_attention_heads 8"):
        model.build_model(tiny_config(kv_channels=16), tokenizer, seed=0, attn_implementation=None)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model.build_model(tiny_config(kv_channels=8), tokenizer, seed=0, attn_implementation=None)  # 64 / 8: no warning


ENGINE_CACHE = Path(os.environ.get("GLM_ENGINES_CACHE", Path.home() / ".cache" / "glm-hf-engines"))
ENGINES = {"llama.cpp": ENGINE_CACHE / "llama-cpp-python-0.3.36", "chatglm.cpp": ENGINE_CACHE / "chatglm-cpp-0.4.2"}


def engines_check():
    sys.path.insert(0, str(ROOT / "scripts"))
    import engines_check

    return engines_check


REPLIES = ("你好！有什么可以帮你？", "12 + 30 = 42。", "我查不到实时天气。")  # to engines_check.PROMPTS


def replay_conversations():
    check = engines_check()
    replies = dict(zip(check.PROMPTS, REPLIES))
    # each ends with a user turn, so the model learns to end its reply with <|user|> (as ChatGLM3 does; a finished
    # conversation would teach </s>, which llama.cpp knows as end of generation anyway)
    return [history + [{"role": "user", "content": query}, {"role": "assistant", "content": replies[query]},
                       {"role": "user", "content": "谢谢"}] for history, query in check.CONVERSATIONS], check.SYSTEM


def save_replay_folder(folder, tokenizer, padded_vocab_size):
    """Train a tiny model on replay_conversations() until greedy decoding gives each reply and then ends the turn
    with <|user|>, and save it with `tokenizer` as train.py writes a folder."""
    from glm_train import publish

    conversations, _ = replay_conversations()
    model = train_to_replay(conversations, tokenizer, tiny_config(padded_vocab_size=padded_vocab_size,
                                                                  eos_token_id=tokenizer.stop_token_ids), 300, 0.01)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    publish.write_engine_config(folder / "config.json", tokenizer)
    loaded = glm.ChatGLMForConditionalGeneration.from_pretrained(folder).eval()
    for conversation in conversations:  # the premise: real replies, ended by the model itself
        *history, query, reply, _ = conversation
        ids = tokenizer.build_chat_input(query["content"], history=history)["input_ids"]
        out = loaded.generate(ids, max_new_tokens=30, do_sample=False, eos_token_id=tokenizer.stop_token_ids)
        assert out[0, -1].item() == tokenizer.convert_tokens_to_ids("<|user|>"), query
        assert loaded.chat(tokenizer, query["content"], history=history, do_sample=False)[0] == reply["content"]
    return folder


@pytest.fixture(scope="module")
def replay_folder(tmp_path_factory):
    """A from-scratch ChatGLM3-format folder (SentencePiece tokenizer.model) whose model gives real replies to
    engines_check's conversations and ends them with <|user|>: the stop handling and reply stripping of each engine
    are then exercised, which random weights never reach."""
    conversations, system = replay_conversations()
    corpus = [m["content"] for c in conversations for m in c] + [system]
    tokenizer = tg.train_glm_tokenizer(corpus * 20, vocab_size=400)
    return save_replay_folder(tmp_path_factory.mktemp("replay") / "out", tokenizer, 416)


@pytest.fixture(scope="module")
def glm4_replay_folder(tmp_path_factory):
    """The same replies from a GLM-4-style folder: a byte-level ranks file trained on them (tiktoken's format)."""
    from text_helpers import train_ranks

    conversations, system = replay_conversations()
    ranks = train_ranks([m["content"] for c in conversations for m in c] + [system], vocab_size=400)
    folder = tmp_path_factory.mktemp("glm4_replay") / "out"
    folder.mkdir()
    (folder / "tokenizer.model").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    tokenizer = tg.ChatGLMTokenizer(vocab_file=str(folder / "tokenizer.model"))
    assert tokenizer.is_glm4
    return save_replay_folder(folder, tokenizer, (len(tokenizer.get_vocab()) + 63) // 64 * 64)


def run_engines_check(folder, *args):
    """scripts/engines_check.py on `folder` with both engine builds on the path: (returncode, stdout, lines)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, ENGINES.values())), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "engines_check.py"), str(folder), *args],
                            env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith(("OK", "DIFF", "SKIP"))]
    return result.returncode, result.stdout + result.stderr[-2000:], lines


def need_engines():
    missing = [name for name, path in ENGINES.items() if not (path / ".complete").exists()]
    if missing:
        pytest.skip(f"{', '.join(missing)} not built in {ENGINE_CACHE}: bash scripts/install_engines.sh "
                    "(about 7 + 4.5 minutes once)")


# ---------------------------------------------------------------------------------------------------------------
# Folders users make without train.py: save_pretrained, TRL's SFTTrainer, peft's merge_and_unload. Each starts from
# the THUDM-format folder loaded from its local path (whose config.json transformers would save without any
# _name_or_path); ChatGLMConfig's own serialisation makes them convertible.


def user_loaded(folder):
    """The model and tokenizer as a user loads a local folder: Auto classes with trust_remote_code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32),
            AutoTokenizer.from_pretrained(folder, trust_remote_code=True))


@pytest.fixture(scope="module")
def resaved_folder(thudm_folder, tmp_path_factory):
    """save_pretrained of the model and tokenizer loaded from the local THUDM-format folder."""
    out = tmp_path_factory.mktemp("resaved") / "out"
    model, tokenizer = user_loaded(thudm_folder)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def trl_folder(thudm_folder, chats, tmp_path_factory):
    """TRL SFTTrainer's output (trainer.save_model) after two steps on chat rows, from the local THUDM folder."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    out = tmp_path_factory.mktemp("trl") / "out"
    model, tokenizer = user_loaded(thudm_folder)
    conversations = [json.loads(line)["conversations"] for line in chats.read_text().splitlines()]
    rows = [{"messages": c} for c in conversations if {m["role"] for m in c} == {"user", "assistant"}][:8]
    args = SFTConfig(output_dir=str(out), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                     report_to="none", save_strategy="no", use_cpu=True, bf16=False, dataloader_num_workers=0,
                     max_length=64)
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(out))
    return out


@pytest.fixture(scope="module")
def peft_merged_folder(thudm_folder, tmp_path_factory):
    """peft's merge_and_unload() of a LoRA on the local THUDM folder (B initialised non-zero, so the merge changes
    every query_key_value weight), saved with save_pretrained."""
    from peft import LoraConfig, get_peft_model

    out = tmp_path_factory.mktemp("peft") / "out"
    model, tokenizer = user_loaded(thudm_folder)
    before = model.transformer.encoder.layers[0].self_attention.query_key_value.weight.clone()
    torch.manual_seed(0)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value"],
                                            init_lora_weights=False))
    merged = lora.merge_and_unload()
    assert not torch.equal(merged.transformer.encoder.layers[0].self_attention.query_key_value.weight, before)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


USER_KINDS = ["resaved_folder", "trl_folder", "peft_merged_folder"]


@pytest.mark.parametrize("kind", USER_KINDS)
def test_llama_cpp_runs_folders_users_save_like_our_model(kind, request):
    """The stock converter takes each folder's ChatGLM3 SentencePiece vocabulary without the user editing
    config.json, and llama.cpp (llama-cpp-python 0.3.36) gives our prompt ids and 20 greedy tokens for plain
    prompts and chats (scripts/engines_check.py --engines llama.cpp: an OK line per comparison)."""
    need_engines()
    folder = request.getfixturevalue(kind)
    config = json.loads((folder / "config.json").read_text())
    assert config["_name_or_path"] == glm.configuration.GLM3_FORMAT_NAME  # loaded from a local path: the format
    assert str(folder.parent) not in json.dumps(config)  # no local path
    code, out, lines = run_engines_check(folder, "--engines", "llama.cpp")
    # 3 plain prompts x (ids, greedy), the template pick, stop ids, 4 chats x 5
    assert code == 0 and len(lines) == 28 and all(line.startswith("OK ") for line in lines), out[-5000:]
    assert sum("greedy" in line for line in lines) == 7


@pytest.mark.parametrize("kind", ["thudm_folder", "finetune_folder", "scratch_folder", "replay_folder"])
def test_engines_run_each_folder_kind_like_our_model(kind, request, llama_cpp):
    """llama.cpp (llama-cpp-python 0.3.36) and chatglm.cpp (chatglm-cpp 0.4.2) themselves, built by
    scripts/install_engines.sh: each converted folder's prompt ids (plain and chat, through our template,
    llama.cpp's built-in formatter, create_chat_completion, chatglm.cpp's apply_chat_template), greedy tokens and
    chat replies equal ours (scripts/engines_check.py prints one OK line per comparison)."""
    need_engines()
    code, out, lines = run_engines_check(request.getfixturevalue(kind))
    # llama.cpp: 3 plain prompts x 2, template, stop ids, 4 chats x 5; chatglm.cpp: config, 3 plain, 4 chats x 3
    # (a SKIP line stands for a chat's greedy and reply comparisons)
    assert code == 0 and len(lines) + sum(line.startswith("SKIP") for line in lines) == 44, out[-5000:]
    assert all(line.startswith("OK ") or line.startswith("SKIP chatglm.cpp") and kind != "replay_folder"
               for line in lines), out[-5000:]
    if kind == "replay_folder":  # the replies are the trained ones, ended by the stop handling
        assert "create_chat_completion reply, stripped: '12 + 30 = 42。'" in out
        assert "note: default handler: finish 'length'" in out  # llama.cpp alone runs past <|user|>
        assert "chatglm.cpp chat 4 messages, last 'What is 12 + 30?': reply: '12 + 30 = 42。'" in out


def test_chatglm_cpp_runs_glm4_folders_like_our_model(glm4_folder, glm4_replay_folder):
    """chatglm.cpp takes GLM-4 folders (its own tiktoken-style BPE over the ranks file; no hash check): model type
    ChatGLM4, plain and chat prompt ids equal ours on a random-weight folder, and greedy tokens and replies too on
    one trained to reply (llama.cpp refuses a vocabulary that is not the real GLM-4 one, see above)."""
    need_engines()
    for folder, replies in ((glm4_folder[0], False), (glm4_replay_folder, True)):
        code, out, lines = run_engines_check(folder, "--engines", "chatglm.cpp")
        assert code == 0 and len(lines) + sum(line.startswith("SKIP") for line in lines) == 16, out[-5000:]
        assert "OK  chatglm.cpp model type and stop ids: ChatGLM4" in out
        assert all(line.startswith("OK ") or line.startswith("SKIP") and not replies for line in lines), out[-5000:]
        if replies:
            assert "chatglm.cpp chat 1 messages, last '你好': reply: '你好！有什么可以帮你？'" in out
    code, out, lines = run_engines_check(glm4_replay_folder)  # both engines: llama.cpp's refusal, said as such
    assert code == 1 and lines[0] == ("DIFF llama.cpp converts the folder: convert_hf_to_gguf.py refused it: "
                                      "NotImplementedError: BPE pre-tokenizer was not recognized - update "
                                      "get_vocab_base_pre()"), out[-3000:]
    assert sum(line.startswith("OK  chatglm.cpp") for line in lines) == 16, out[-3000:]


@pytest.mark.parametrize("document", ["docs/engines.md", "README.md"])
def test_docs_llama_cpp_python_chat_snippet(replay_folder, llama_cpp, tmp_path, document):
    """docs/engines.md's create_chat_completion snippet, and the README's CPU chat, run as printed on a GGUF of the
    replay folder (under the file name the snippet opens): the reply is the trained one, ended at <|user|> by the
    stop ids it gives the handler."""
    import re

    need_engines()
    (snippet,) = [block for block in re.findall(r"```python\n(.*?)```", (ROOT / document).read_text(), re.S)
                  if "create_chat_completion" in block]
    snippet = "\n".join(line.removeprefix("  ") for line in snippet.splitlines())  # it sits in a list item
    code, log = to_gguf(llama_cpp, replay_folder, tmp_path / re.search(r'Llama\("([^"]+)"', snippet).group(1))
    assert code == 0, log[-2000:]
    result = subprocess.run([sys.executable, "-c", snippet + "\nprint(repr(reply))"], cwd=tmp_path, text=True,
                            capture_output=True, timeout=300, env={**ENV, "PYTHONPATH": str(ENGINES["llama.cpp"])})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[-1] == repr("你好！有什么可以帮你？")


RENDERER = ENGINE_CACHE / "llama-jinja-render-0.3.36"
OPENAI_TOOLS = [{"type": "function", "function": tool} for tool in (
    {"name": "get_weather", "description": "查询天气",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},)]


def openai_requests(glm4, n, seed=0):
    """Random chats as an OpenAI client sends them to llama-server: standard fields only (tools in `tools`, calls in
    `tool_calls` with JSON-string or object arguments, results as role `tool`), ending with a user, assistant or
    tool turn."""
    import random

    from text_helpers import random_conversation

    rng, requests = random.Random(seed), []
    while len(requests) < n:
        end = ["user", "assistant", "tool"][len(requests) % 3]
        messages, tools, _ = random_conversation(rng, glm4, end=end, forms=("openai", "openai-json-string"))
        if any("metadata" in m or "tools" in m for m in messages):
            continue  # our own extensions, which the server's message structs do not carry
        requests.append((messages, OPENAI_TOOLS if tools else None))
    return requests


@pytest.mark.parametrize("family", ["glm3", "glm4"])
def test_llama_cpp_jinja_engine_renders_our_template_like_transformers(family, request, tmp_path):
    """llama-server renders chat templates with llama.cpp's own Jinja engine (common/jinja), after probing the
    template's capabilities and adjusting the messages for them (common/chat.cpp). scripts/llama_jinja_render.cpp
    does the same with that engine, built from llama-cpp-python 0.3.36's sources: for 60 random OpenAI-style
    requests, the text equals transformers' rendering of our template, and the probe finds tools, tool calls,
    object arguments and a system role."""
    if not (RENDERER / ".complete").exists():
        pytest.skip(f"llama.cpp's Jinja renderer is not built in {RENDERER}: bash scripts/install_engines.sh")
    from conftest import reference_file

    vocab = (reference_file("chatglm3-6b", "tokenizer.model") if family == "glm3"  # the real ChatGLM3 model
             else request.getfixturevalue("glm4_folder")[0] / "tokenizer.model")
    tokenizer = tg.ChatGLMTokenizer(vocab_file=str(vocab))
    (tmp_path / "template.jinja").write_text(tokenizer.chat_template)
    for i, (messages, tools) in enumerate(openai_requests(tokenizer.is_glm4, 60)):
        prompt = messages[-1]["role"] != "assistant"
        ours = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=prompt, tokenize=False)
        context = {"messages": messages, "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token}
        if tools:
            context["tools"] = tools
        if prompt:
            context["add_generation_prompt"] = True
        (tmp_path / "context.json").write_text(json.dumps(context, ensure_ascii=False))
        result = subprocess.run([str(RENDERER / "llama_jinja_render"), str(tmp_path / "template.jinja"),
                                 str(tmp_path / "context.json")], capture_output=True, timeout=60)
        assert result.returncode == 0, result.stderr.decode()[-2000:]
        assert result.stdout.decode() == ours, (i, messages)
    caps = json.loads(result.stderr.decode().splitlines()[0])
    assert {key: caps[key] for key in ("supports_tools", "supports_tool_calls", "supports_object_arguments",
                                       "supports_system_role", "supports_string_content")} == dict.fromkeys(
        ("supports_tools", "supports_tool_calls", "supports_object_arguments", "supports_system_role",
         "supports_string_content"), True), caps


def test_lm_eval_scores_our_folder_like_our_model(replay_folder):
    """lm-eval 0.4.13's HF backend (HFLM, `--model hf`) on a trained folder: loglikelihoods equal our model's for
    the original API's ids with its defaults on plain prompts, and with add_bos_token=False under
    --apply_chat_template (scripts/lm_eval_check.py; the two other settings must be off, as docs/engines.md says);
    in those two settings generate_until's replies equal our greedy generate() cut at the same stop strings."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (requirements-test.txt)")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "lm_eval_check.py"), str(replay_folder)],
                            env=ENV, capture_output=True, text=True, timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith(("OK", "DIFF"))]
    assert result.returncode == 0 and len(lines) == 6 and all(line.startswith("OK ") for line in lines), \
        result.stdout[-3000:] + result.stderr[-3000:]
    assert "plain defaults" in lines[0] and "(equal; meant to be equal)" in lines[0]
    assert "generate_until plain defaults" in lines[1]
    assert "chat {'add_bos_token': False}" in lines[4] and "(equal; meant to be equal)" in lines[4]
    assert "generate_until chat {'add_bos_token': False}" in lines[5]


LLAMA_GREEDY = """
import json, sys
import numpy as np
import llama_cpp
gguf, prompt, new, out = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
llm = llama_cpp.Llama(model_path=gguf, n_ctx=128, n_threads=2, logits_all=True, verbose=False)
llm.eval(prompt)
logits = np.array(llm.scores[:len(prompt)])
tokens = []
for _ in range(new):
    tokens.append(int(llm.scores[llm.n_tokens - 1].argmax()))
    llm.eval([tokens[-1]])
np.save(out, logits)
print(json.dumps(tokens))
"""


@pytest.mark.real_width
def test_cpu_chat_route_through_llama_cpp_at_real_width(real_width_folder, llama_cpp, tmp_path):
    """The README's CPU route on a chatglm3-6b-width THUDM folder (2 layers): `convert_glm.py --to code`,
    llama.cpp's converter to an f16 GGUF, llama.cpp's quantizer to q8_0 and q4_0 (scripts/quantize_gguf.py).
    f16 holds the checkpoint's own fp16 weights, so it is lossless: the same greedy tokens as our float32 model on a
    short chat prompt, logits within 0.02. q8_0 and q4_0 are not: their logits keep the agreement docs/performance.md
    states (random weights leave top-1 margins too thin for token agreement, so that is stated on the logits)."""
    if not (ENGINES["llama.cpp"] / ".complete").exists():
        pytest.skip(f"llama.cpp not built in {ENGINE_CACHE}: bash scripts/install_engines.sh (about 7 minutes once)")
    import convert_glm

    folder = tmp_path / "chatglm3"
    folder.mkdir()
    for file in real_width_folder.iterdir():  # the shards shared, the JSON files our own
        (folder / file.name).symlink_to(file) if file.suffix == ".bin" else shutil.copy(file, folder / file.name)
    convert_glm.adopt_code(folder, folder)
    f16 = tmp_path / "f16.gguf"
    code, log = to_gguf(llama_cpp, folder, f16, outtype="f16")
    assert code == 0, log[-2000:]
    for kind in ("q8_0", "q4_0"):
        result = subprocess.run([sys.executable, str(ROOT / "scripts" / "quantize_gguf.py"), str(f16),
                                 str(tmp_path / f"{kind}.gguf"), kind], capture_output=True, text=True, timeout=600,
                                env={**ENV, "PYTHONPATH": str(ENGINES["llama.cpp"])})
        assert result.returncode == 0, result.stderr[-2000:]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    prompt = tokenizer.build_chat_input("你好")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        ours_logits = model(prompt).logits[0].numpy()
        ours_tokens = model.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None)[0, prompt.shape[1]:]
    del model
    agreement = {}
    for kind in ("f16", "q8_0", "q4_0"):
        result = subprocess.run([sys.executable, "-c", LLAMA_GREEDY, str(tmp_path / f"{kind}.gguf"),
                                 json.dumps(prompt[0].tolist()), "8", str(tmp_path / f"{kind}.npy")],
                                capture_output=True, text=True, timeout=300,
                                env={**ENV, "PYTHONPATH": str(ENGINES["llama.cpp"])})
        assert result.returncode == 0, result.stderr[-2000:]
        tokens, logits = json.loads(result.stdout.splitlines()[-1]), np.load(tmp_path / f"{kind}.npy")
        correlation = min(np.corrcoef(a, b)[0, 1] for a, b in zip(ours_logits, logits))
        agreement[kind] = (tokens == ours_tokens.tolist(), float(np.abs(logits - ours_logits).max()), correlation)
    print(agreement)
    assert agreement["f16"][0] and agreement["f16"][1] < 0.02, agreement
    assert agreement["q8_0"][2] >= Q8_0_LOGIT_CORRELATION and agreement["q4_0"][2] >= Q4_0_LOGIT_CORRELATION, agreement


# Least per-position correlation of q8_0 / q4_0 logits with our float32 ones at chatglm3-6b's width, 2 layers,
# random weights, on the chat prompt for "你好" (measured 0.9992 / 0.908; docs/performance.md).
Q8_0_LOGIT_CORRELATION, Q4_0_LOGIT_CORRELATION = 0.998, 0.88
