"""Helpers and fixtures that several test files share: the tokenizers of the tokenization tests, random chats in
every accepted message form, and a checkpoint folder laid out as THUDM published it."""

import base64
import json
import shutil

import pytest
import torch
from conftest import glm, reference_file, tiny_config
from serving_helpers import ARGUMENTS

from benchmarks.bench_tokenizer import mixed_text

tg = glm.tokenization


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers: the real ChatGLM3 model, a small GLM-4 ranks file trained here, a trained ChatGLM3-style tokenizer


@pytest.fixture(scope="module")
def sp_model():
    return reference_file("chatglm3-6b", "tokenizer.model")


@pytest.fixture(scope="module")
def sp(sp_model):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(sp_model))


@pytest.fixture(scope="module")
def glm3(sp_model):
    return tg.ChatGLMTokenizer(vocab_file=str(sp_model))


def train_ranks(texts, vocab_size):
    """A tiny byte-level BPE in tiktoken's terms: bytes -> rank, ranks in merge order."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(tg.GLM4_SPLIT_PATTERN), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    byte_of = {char: byte for byte, char in tg._bytes_to_unicode().items()}
    return {bytes(byte_of[char] for char in token): rank for token, rank in bpe.get_vocab().items()}


@pytest.fixture(scope="module")
def glm4_folder(tmp_path_factory):
    ranks = train_ranks([mixed_text(500, seed=i) for i in range(400)], vocab_size=1200)
    folder = tmp_path_factory.mktemp("glm4")
    lines = [f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks.items()]
    (folder / "tokenizer.model").write_text("".join(lines))  # in rank order, as tiktoken writes it
    return folder, ranks


@pytest.fixture(scope="module")
def glm4(glm4_folder):
    return tg.ChatGLMTokenizer(vocab_file=str(glm4_folder[0] / "tokenizer.model"))


BILINGUAL = ["The quick brown fox jumps over the lazy dog.", "今天天气很好，我们去公园散步吧。",
             "def add(a, b):\n    return a + b  # 12345\n", "机器学习 machine learning 模型 model 😀"]


@pytest.fixture(scope="module")
def trained():
    import datasets

    column = datasets.Dataset.from_dict({"text": BILINGUAL * 30})["text"]  # a datasets column, as users pass it
    return tg.train_glm_tokenizer(column, vocab_size=500)


# ---------------------------------------------------------------------------------------------------------------
# Random conversations, in the GLM format and OpenAI's


TOOLS = [{"name": "get_weather", "description": "查询天气",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
# No control-token strings (nor the word "sop", ChatGLM3's control token): typed inside content, a rendered text
# can't tell them from the real ones.
CONTENTS = ["", " ", "  two leading", "\nnewline first", "trailing  ", "你好", "😀𠀋", "x = 1\n\ty = 2", "Aesop",
            "北京 20 度", "What is 2+2?", "a\n\nb"]


def _content(rng, glm4):
    text = rng.choice(CONTENTS)
    # GLM-4 has no dummy prefix: "\n" + a content starting with a blank line merges as one text, so the text
    # template (like GLM-4's own) can't give build_chat_input's ids there (docs/tokenizer.md).
    return "x" + text if glm4 and text.lstrip(" \t").startswith("\n") else text


def tool_call_turn(rng, glm4, forms=("glm", "openai", "openai-json-string")):
    """An assistant tool call and its result, in one of the accepted forms, plus the GLM-format equivalent."""
    arguments, name = rng.choice(ARGUMENTS), "get_weather"
    result = json.dumps({"temperature": rng.randrange(30)})
    glm_form = [{"role": "assistant", "metadata": name, "content": {"name": name, "parameters": arguments}},
                {"role": "observation", "content": result}]
    form = rng.choice(forms)
    if form == "glm":
        return glm_form, glm_form
    call = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if form == "openai-json-string":
        call["function"]["arguments"] = json.dumps(arguments, ensure_ascii=False)
    openai = [{"role": "assistant", "content": None, "tool_calls": [call]},
              {"role": "tool", "name": name, "tool_call_id": "call_0", "content": result}]
    return openai, glm_form


def random_conversation(rng, glm4, end, **forms):
    """(messages, tools=, the same conversation in the GLM format with tools in the system message)."""
    messages, same, tools = [], [], None
    kind = rng.choice(["system-tools", "tools=", "system", "system+tools=", "none"])
    if kind in ("system-tools", "system", "system+tools="):
        system = {"role": "system", "content": _content(rng, glm4) or "You are a helpful assistant."}
        messages.append(dict(system, tools=TOOLS) if kind == "system-tools" else system)
        same.append(dict(system, tools=TOOLS) if kind != "system" else system)
    if kind in ("tools=", "system+tools="):
        tools = TOOLS
    if kind == "tools=":
        same.append({"role": "system", "content": json.dumps(TOOLS, indent=4, ensure_ascii=False)})
    for turn in range(rng.randint(1, 3)):
        user = {"role": "user", "content": _content(rng, glm4)}
        messages.append(user)
        same.append(user)
        if turn == 0 and end in ("observation", "tool") or rng.random() < 0.4:
            given, glm_form = tool_call_turn(rng, glm4, **forms)
            messages += given
            same += glm_form
            if end in ("observation", "tool") and turn == 0:
                return messages, tools, same
        reply = {"role": "assistant", "content": _content(rng, glm4)}
        if rng.random() < 0.2:
            reply["metadata"] = "interpreter"
        messages.append(reply)
        same.append(reply)
    if end == "user":
        messages.append({"role": "user", "content": _content(rng, glm4)})
        same.append(messages[-1])
    return messages, tools, same


# ---------------------------------------------------------------------------------------------------------------
# A THUDM/chatglm3-6b-style checkpoint folder


def _thudm_folder(folder, tokenizer_config_name):
    """A tiny model laid out like THUDM/chatglm3-6b: fp16 .bin shards with the index, the saved inv_freq, the
    original auto_map naming THUDM's files, and the published tokenizer files."""
    folder.mkdir()
    config = tiny_config(padded_vocab_size=65024, num_layers=2, hidden_size=32, num_attention_heads=4,
                         kv_channels=8, ffn_hidden_size=48)
    torch.manual_seed(0)
    model = glm.ChatGLMForConditionalGeneration(config).half()
    state = dict(model.state_dict())
    state["transformer.rotary_pos_emb.inv_freq"] = torch.ones(config.kv_channels // 4, dtype=torch.float16)
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for shard, keys in shards.items():
        torch.save({key: state[key].clone() for key in keys}, folder / shard)
    index = {"metadata": {"total_size": sum(t.numel() * 2 for t in state.values())},
             "weight_map": {key: shard for shard, keys in shards.items() for key in keys}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    published = json.loads(reference_file("chatglm3-6b", "config.json").read_text())
    small = {k: config.to_dict()[k] for k in ("num_layers", "hidden_size", "num_attention_heads", "kv_channels",
                                              "ffn_hidden_size", "multi_query_group_num")}
    published.update(small)  # auto_map still names configuration_chatglm / modeling_chatglm
    (folder / "config.json").write_text(json.dumps(published))
    shutil.copy(reference_file("chatglm3-6b", tokenizer_config_name), folder / "tokenizer_config.json")
    shutil.copy(reference_file("chatglm3-6b", "tokenizer.model"), folder / "tokenizer.model")
    return model.float(), published
