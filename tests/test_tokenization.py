"""tokenization_glm.py: ids identical to SentencePiece (ChatGLM3) and tiktoken (GLM-4), the chat format, streaming,
training, and save/load through AutoTokenizer on the installed transformers (4.57 and 5.x)."""

import json
import random
import re
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, glm, reference_file
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from benchmarks.bench_tokenizer import mixed_text, vocabulary_words
from text_helpers import BILINGUAL, glm3, glm4, glm4_folder, sp, sp_model, trained  # noqa: F401  (fixtures)

tg = glm.tokenization
GLM3_PROMPT = [64790, 64792, 64795, 30910, 13, 36474, 54591, 64796]  # [gMASK]sop<|user|>\n 你好<|assistant|>
EDGE_TEXTS = [
    "", " ", "  ", "\n", "\n\n", "\t", "\r\n", " \n ", "a", " hello", "hello ", "  x = 1234\t\n", "3.14159 2024年",
    "😀", "👨‍👩‍👧 family", "𠀋", "𪚥 and 𠀋", "Ελληνικά русский العربية 日本語 한국어", "\x00\x01\x7f", "\u200b\ufeff",
    "def f(x):\n    return x ** 2\n\n\tpass", "<|user|>", "[gMASK]sop", "Aesop sops", "<s></s><unk>", "<0x41>",
    "▁", "a▁b", "   leading spaces", "trailing\n\n\n", "混合mixed文本text123", "a" * 3000, "中" * 3000,
]
FRAGMENTS = [" ", "  ", "\n", "\t", "\r", "a", "Z", "hello", "1", "42", "中", "文字", "，", "。", "😀", "𠀋", "𪚥", "é",
             "<|user|>", "<|assistant|>", "[gMASK]", "sop", "\ue000", "<0x0A>", "▁", "\u0301", "!"]
ANY_TEXT = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=40),
    st.lists(st.sampled_from(FRAGMENTS), max_size=30).map("".join),
)


# ---------------------------------------------------------------------------------------------------------------
# tiktoken over text_helpers' GLM-4 ranks file, the oracle of the GLM-4 tests


@pytest.fixture(scope="module")
def tiktoken_encoding(glm4_folder):
    import tiktoken

    _, ranks = glm4_folder
    specials = {token: len(ranks) + i for i, token in enumerate(tg.GLM4_SPECIAL_TOKENS)}
    return tiktoken.Encoding("glm4-test", pat_str=tg.GLM4_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


# ---------------------------------------------------------------------------------------------------------------
# ChatGLM3: the spec's ids and SentencePiece as the oracle


def test_chatglm3_spec_ids(glm3, sp):
    assert glm3.encode("你好") == [64790, 64792, 36474, 54591]
    assert glm3.encode("\n", add_special_tokens=False) == [30910, 13]
    assert glm3.encode("") == [64790, 64792]
    assert glm3.encode("a", "b") == [64790, 64792] + sp.encode("a") + sp.encode("b") + [2]  # eos ends a pair
    assert len(glm3) == 64798 and not glm3.is_glm4
    assert glm3.convert_tokens_to_ids(list(tg.GLM3_CONTROL_TOKENS)) == list(range(64789, 64798))
    assert (glm3.eos_token, glm3.eos_token_id, glm3.pad_token, glm3.pad_token_id) == ("</s>", 2, "<unk>", 0)
    assert glm3.unk_token_id == 0
    assert glm3.padding_side == "left"
    assert glm3.stop_token_ids == [2, 64795, 64797]
    assert [glm3.get_command(t) for t in ("<|user|>", "sop", "<eos>", "<pad>", "<bos>")] == [64795, 64792, 2, 0, 1]
    with pytest.raises(KeyError):
        glm3.get_command("hello")
    assert glm3.get_prefix_tokens() == [64790, 64792]
    prompt = glm3.build_chat_input("你好")
    assert prompt["input_ids"].tolist() == [GLM3_PROMPT] and prompt["attention_mask"].tolist() == [[1] * 8]
    assert glm3.decode(glm3.encode("你好"), skip_special_tokens=True) == "你好"


def test_edge_texts_match_sentencepiece(glm3, sp):
    # split_special_tokens=True: control-token strings are text, as SentencePiece sees them
    ours = glm3(EDGE_TEXTS, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    for text, ids in zip(EDGE_TEXTS, ours):
        assert ids == sp.encode(text), text
        if "▁" not in text:  # SentencePiece reads U+2581 as a space
            assert glm3.decode(glm3.encode(text, split_special_tokens=True), skip_special_tokens=True) == text


def test_mixed_corpus_matches_sentencepiece(glm3, sp):
    words = vocabulary_words(sp)
    rng = random.Random(0)
    docs = [mixed_text(rng.randint(1, 3000), seed=i, words=words) for i in range(300)]
    ours = glm3(docs)["input_ids"]
    for doc, ids in zip(docs, ours):
        assert ids == [64790, 64792] + sp.encode(doc), doc[:200]
    assert glm3.batch_decode(ours, skip_special_tokens=True) == docs
    # The offset-free batch path gives the same ids; split_special_tokens=True keeps control strings as text.
    docs.append("<|assistant|> typed [gMASK] sop")
    assert glm3.encode_batch_ids(docs, split_special_tokens=True) == [[64790, 64792] + sp.encode(d) for d in docs]
    assert glm3.encode_batch_ids(docs, add_special_tokens=False, split_special_tokens=True) == \
        [sp.encode(doc) for doc in docs]
    assert glm3.encode_batch_ids(docs) == glm3(docs)["input_ids"]  # the defaults: control strings are controls
    assert glm3.encode_batch_ids(docs)[-1][2] == glm3.get_command("<|assistant|>")


@settings(max_examples=300, deadline=None)
@given(text=ANY_TEXT)
def test_fuzz_matches_sentencepiece_and_round_trips(glm3, sp, text):
    assert glm3.encode(text, add_special_tokens=False, split_special_tokens=True) == sp.encode(text)
    if "▁" not in text:
        assert glm3.decode(glm3.encode(text, split_special_tokens=True), skip_special_tokens=True) == text


def test_large_text_is_cut_into_short_words(glm3, sp):
    # BPE must never see a multi-megabyte word: the pre-tokenizer cuts before spaces and at newlines and digits,
    # where SentencePiece can't merge, so the time stays linear (timings: benchmarks/bench_tokenizer.py).
    text = mixed_text(1_000_000, seed=7, words=vocabulary_words(sp)) + ("中文句子没有空格" * 50 + "\n") * 500
    backend = glm3.backend_tokenizer
    words = backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))
    assert max(len(word) for word, _ in words) < 1000  # of 1.2 million characters
    assert glm3.encode(text, add_special_tokens=False) == sp.encode(text)


def test_control_token_strings_in_text(glm3, sp):
    text = "<|user|>[gMASK]sop Aesop <|assistant|>"
    # split_special_tokens=True: text is text, as SentencePiece encodes it
    assert glm3.encode(text, split_special_tokens=True) == [64790, 64792] + sp.encode(text)
    assert glm3.decode(glm3.encode(text, split_special_tokens=True), skip_special_tokens=True) == text
    # The default, as engines assume: a rendered prompt encodes to the prompt's ids ...
    assert glm3.split_special_tokens is False
    rendered = glm3.apply_chat_template([{"role": "user", "content": "你好"}], add_generation_prompt=True,
                                        tokenize=False)
    assert rendered == "[gMASK]sop<|user|>\n 你好<|assistant|>"
    assert glm3.encode(rendered, add_special_tokens=False) == GLM3_PROMPT
    # ... where "sop" still only matches as a whole word
    assert glm3.encode("Aesop", add_special_tokens=False) == sp.encode("Aesop")


def test_non_strings_raise_type_error_naming_the_type(trained):
    for value, name in ((123, "int"), (None, "NoneType"), (b"ab", "bytes"), (["a", 1], "int")):
        with pytest.raises(TypeError, match=name):
            trained.encode(value)
        with pytest.raises(TypeError, match=name):
            trained(value)


def test_batches_pad_on_the_left(trained):
    batch = trained(["你好", "hello world 123"], padding=True, return_tensors="pt")
    short = trained.encode("你好")
    assert trained.pad_token == "<unk>" and trained.padding_side == "left"
    width = batch["input_ids"].shape[1]
    assert batch["input_ids"][0].tolist() == [0] * (width - len(short)) + short
    assert batch["attention_mask"][0].tolist() == [0] * (width - len(short)) + [1] * len(short)
    assert batch["attention_mask"][1].tolist() == [1] * width


# ---------------------------------------------------------------------------------------------------------------
# The chat format

TOOLS = [{"name": "get_weather", "description": "查询天气 <|system|>", "parameters": {"city": {"type": "string"}}}]
CALL = {"name": "get_weather", "parameters": {"city": "北京", "days": 3}}


def message_ids(sp, role, metadata, content):
    """The oracle: <|role|> + sp.encode(metadata + "\\n") + sp.encode(content)."""
    return [64794 + tg.ROLES.index(role)] + sp.encode(metadata + "\n") + sp.encode(content)


def test_build_chat_input_renders_history_like_the_original(glm3, sp):
    history = [
        {"role": "system", "content": "你是助手", "tools": TOOLS},
        {"role": "user", "content": "北京天气"},
        {"role": "assistant", "metadata": "get_weather", "content": CALL},
        {"role": "observation", "content": '{"temperature": 20}'},
        {"role": "assistant", "content": "北京 20 度"},
    ]
    expected = [64790, 64792]
    expected += message_ids(sp, "system", "", "你是助手\n" + json.dumps(TOOLS, indent=4, ensure_ascii=False))
    expected += message_ids(sp, "user", "", "北京天气")
    expected += message_ids(sp, "assistant", "get_weather", '```python\ntool_call(city="北京", days=3)\n```')
    expected += message_ids(sp, "observation", "", '{"temperature": 20}')
    expected += message_ids(sp, "assistant", "", "北京 20 度")
    expected += message_ids(sp, "user", "", "谢谢") + [64796]
    assert glm3.build_chat_input("谢谢", history=history)["input_ids"][0].tolist() == expected
    assert glm3.build_single_message("user", "", "你好") == [64795, 30910, 13, 36474, 54591]


def test_format_tool_call():
    assert tg.format_tool_call("f", {"a": 1, "b": "x", "c": [None, True], "d": {"k": 0.5}}) == (
        "f", '```python\ntool_call(a=1, b="x", c=[None, True], d={"k": 0.5})\n```')
    assert tg.format_tool_call("f", {"city": "北京"}, glm4=True) == ("f", '{"city": "北京"}')
    assert tg.format_tool_call("f", {}) == ("f", "```python\ntool_call()\n```")
    assert tg.format_tool_call("f", '{"a": 1}') == ("f", "```python\ntool_call(a=1)\n```")  # OpenAI's string form
    assert tg.format_tool_call("f", '{"a":1}', glm4=True) == ("f", '{"a":1}')  # kept as written
    for name, parameters in (("", {}), ("f", [1]), ("f", {"not valid": 1}), ("f", {"x": {1, 2}}), ("f", "{bad"),
                             ("f", {"x": float("nan")})):
        with pytest.raises(ValueError):
            tg.format_tool_call(name, parameters)


CONTENTS = ["", " ", "  two leading", "\nnewline first", "\n", "trailing  ", "你好", "😀𠀋", "x = 1\n\ty = 2",
            "<|assistant|> typed", "[gMASK]sop", "Aesop", "\ue000<|user|>\ue000", "\u2581"]


def random_conversation(rng, glm4):
    """A conversation ending with a user or observation message, as build_chat_input takes it."""
    messages = [{"role": "system", "content": rng.choice(CONTENTS), "tools": TOOLS}] if rng.random() < 0.3 else []
    for _ in range(rng.randint(0, 4)):
        messages.append({"role": "user", "content": rng.choice(CONTENTS)})
        if rng.random() < 0.3:
            messages.append({"role": "assistant", "metadata": "get_weather", "content": CALL})
            messages.append({"role": "observation", "content": rng.choice(CONTENTS)})
        reply = {"role": "assistant", "content": rng.choice(CONTENTS)}
        messages.append(reply | {"metadata": rng.choice(["", "interpreter"])} if rng.random() < 0.3 else reply)
    messages.append({"role": rng.choice(["user", "observation"]), "content": rng.choice(CONTENTS)})
    if glm4:
        # GLM-4 has no dummy prefix: as one text, "\n" + a content starting with a blank line merges, so its text
        # template (like the official one) can't give build_chat_input's ids there; documented in docs/tokenizer.md.
        for message in messages:
            if not isinstance(message["content"], str):
                continue
            content = message["content"] + ("\n" if "tools" in message else "")  # the tools JSON follows a newline
            if content.lstrip(" \t").startswith("\n"):
                message["content"] = "x" + message["content"]
    return messages


@pytest.mark.parametrize("family", ["glm3", "glm4", "trained"])
def test_apply_chat_template_gives_build_chat_input_ids(family, request):
    tokenizer = request.getfixturevalue(family)
    rng = random.Random(1)
    for _ in range(120):
        messages = random_conversation(rng, tokenizer.is_glm4)
        expected = tokenizer.build_chat_input(messages[-1]["content"], messages[:-1], messages[-1]["role"])
        expected = expected["input_ids"][0].tolist()
        assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False) == expected
        no_prompt = tokenizer.apply_chat_template(messages, return_dict=False)
        assert no_prompt == tokenizer.tokenize_conversation(messages)["input_ids"] == expected[:-1]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if not any(token in json.dumps(messages, ensure_ascii=False) for token in ("<|", "[gMASK]", "sop", "\ue000")):
            # The rendered text itself encodes to the same ids (what engines do) when users typed no control strings
            assert tokenizer.encode(text, add_special_tokens=False, split_special_tokens=False) == expected


def test_chat_template_survives_save_and_batches(glm3, tmp_path):
    glm3.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == tg.chat_template() == glm3.chat_template
    assert config["auto_map"] == {"AutoTokenizer": ["tokenization_glm.ChatGLMTokenizer", None]}
    assert {"tokenizer.json", "tokenization_glm.py", "tokenizer.model"} <= {p.name for p in tmp_path.iterdir()}
    chats = [[{"role": "user", "content": "你好"}], [{"role": "user", "content": "hello there, how are you?"}]]
    batch = glm3.apply_chat_template(chats, add_generation_prompt=True, padding=True, return_tensors="pt",
                                     return_dict=True)
    assert batch["input_ids"][0, -8:].tolist() == GLM3_PROMPT and batch["input_ids"][0, 0].item() == 0
    second = glm3.apply_chat_template(chats[1], add_generation_prompt=True, return_dict=False)
    assert batch["attention_mask"].sum(1).tolist() == [8, len(second)]
    assert batch["input_ids"][1].tolist() == second
    with pytest.raises(ValueError, match="tools are given twice"):
        glm3.apply_chat_template([{"role": "system", "content": "s", "tools": TOOLS}], tools=TOOLS)


@pytest.mark.parametrize("family", ["glm3", "glm4", "trained"])
def test_control_strings_in_messages_stay_text(family, request):
    tokenizer = request.getfixturevalue(family)
    typed = "x<|assistant|>y [gMASK] <|user|>\ue000<|observation|>"
    messages = [
        {"role": "system", "content": "s <|system|>", "tools": [{"name": "<|user|>", "description": typed}]},
        {"role": "user", "content": typed},
        {"role": "assistant", "metadata": "m<|observation|>", "content": typed},
        {"role": "user", "content": typed},
    ]
    ids = tokenizer.build_chat_input(typed, messages[:-1])["input_ids"][0].tolist()
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False) == ids
    structural = {"[gMASK]": 1, "<|system|>": 1, "<|user|>": 2, "<|assistant|>": 2, "<|observation|>": 0}
    for token, count in structural.items():
        assert ids.count(tokenizer.convert_tokens_to_ids(token)) == count, token
    assert typed in tokenizer.decode(ids, skip_special_tokens=True)


def test_glm4_prompt_format(glm4, tiktoken_encoding):
    n = len(tiktoken_encoding._mergeable_ranks)
    special = {token: n + i for i, token in enumerate(tg.GLM4_SPECIAL_TOKENS)}
    assert glm4.is_glm4 and len(glm4) == n + 14
    assert glm4.convert_tokens_to_ids(list(tg.GLM4_SPECIAL_TOKENS)) == list(special.values())
    assert glm4.stop_token_ids == [special["<|endoftext|>"], special["<|user|>"], special["<|observation|>"]]
    assert glm4.eos_token_id == glm4.pad_token_id == special["<|endoftext|>"]
    assert glm4.encode("你好") == [special["[gMASK]"], special["<sop>"]] + tiktoken_encoding.encode("你好")
    messages = [{"role": "user", "content": "你好"}]
    assert glm4.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        "[gMASK]<sop><|user|>\n你好<|assistant|>"
    expected = [special[t] for t in ("[gMASK]", "<sop>", "<|user|>")] + tiktoken_encoding.encode("\n")
    expected += tiktoken_encoding.encode("你好") + [special["<|assistant|>"]]
    assert glm4.build_chat_input("你好")["input_ids"][0].tolist() == expected
    call = glm4.build_single_message("assistant", "f", "") + glm4.encode('{"a": 1}', add_special_tokens=False)
    assert glm4.build_chat_input("ok", [{"role": "assistant", "content": {"name": "f", "parameters": {"a": 1}}}])[
        "input_ids"][0].tolist()[2:2 + len(call)] == call


def test_glm4_corpus_matches_tiktoken(glm4, tiktoken_encoding):
    docs = [mixed_text(random.Random(i).randint(1, 2000), seed=1000 + i) for i in range(200)] + EDGE_TEXTS
    for doc, ids in zip(docs, glm4(docs, add_special_tokens=False, split_special_tokens=True)["input_ids"]):
        assert ids == tiktoken_encoding.encode(doc, disallowed_special=()), doc[:200]
        assert glm4.decode(ids) == doc
    expected = [tiktoken_encoding.encode(doc, disallowed_special=()) for doc in docs]
    assert glm4.encode_batch_ids(docs, add_special_tokens=False, split_special_tokens=True) == expected


@settings(max_examples=300, deadline=None)
@given(text=ANY_TEXT)
def test_glm4_fuzz_matches_tiktoken_and_round_trips(glm4, tiktoken_encoding, text):
    ours = glm4.encode(text, add_special_tokens=False, split_special_tokens=True)
    assert ours == tiktoken_encoding.encode(text, disallowed_special=())
    assert glm4.decode(glm4.encode(text, split_special_tokens=True), skip_special_tokens=True) == text


# ---------------------------------------------------------------------------------------------------------------
# Fine-tuning labels and message checks


def test_tokenize_conversation_labels(trained):
    tokenizer, eos = trained, trained.eos_token_id
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "metadata": "get_weather", "content": CALL},
        {"role": "observation", "content": "{}"},
        {"role": "assistant", "content": "done"},
    ]
    out = tokenizer.tokenize_conversation(messages)
    rendered = [("", "sys"), ("", "hi"), tg.format_tool_call(**CALL), ("", "{}"), ("", "done")]
    parts = [tokenizer.get_prefix_tokens()] + [tokenizer.build_single_message(message["role"], metadata, content)
                                               for message, (metadata, content) in zip(messages, rendered)]
    ignore = lambda ids: [-100] * len(ids)  # noqa: E731
    assert out["input_ids"] == sum(parts, []) + [eos]
    assert out["labels"] == (ignore(parts[0]) + ignore(parts[1]) + ignore(parts[2])
                             + [-100] + parts[3][1:]  # the reply: metadata line and call, not its role token
                             + [parts[4][0]] + ignore(parts[4][1:])  # <|observation|> stops the reply
                             + [-100] + parts[5][1:] + [eos])  # the last reply, then eos
    truncated = tokenizer.tokenize_conversation(messages, max_length=10)
    assert truncated == {"input_ids": out["input_ids"][:10], "labels": out["labels"][:10]}
    ends_with_user = tokenizer.tokenize_conversation(messages[:2])
    assert set(ends_with_user["labels"]) == {-100} and ends_with_user["input_ids"][-1] != eos


@pytest.mark.parametrize(
    "message, problem",
    [
        ("hi", "expected a dict"),
        ({"role": "bot", "content": "x"}, "unknown role 'bot'"),
        ({"role": "user"}, "content must be a string, got NoneType"),
        ({"role": "user", "content": 5}, "content must be a string, got int"),
        ({"role": "user", "content": {"name": "f", "parameters": {}}}, "content must be a string, got dict"),
        ({"role": "user", "content": "x", "metadata": 1}, "metadata must be a string"),
        ({"role": "assistant", "content": {"name": "f", "parameters": [1]}}, "parameters must be a dict"),
        ({"role": "assistant", "content": {"name": "f"}}, "needs a 'name' and 'parameters' or 'content'"),
    ],
)
def test_bad_messages_name_index_and_problem(trained, message, problem):
    messages = [{"role": "user", "content": "ok"}, message]
    for call in (lambda: trained.tokenize_conversation(messages), lambda: trained.apply_chat_template(messages),
                 lambda: trained.build_chat_input("q", history=messages)):
        with pytest.raises(ValueError, match=rf"message 1: .*{problem}"):
            call()


def test_other_channel_reply_dict_is_rendered(trained):
    reply = {"role": "assistant", "content": {"name": "interpreter", "content": "print(1)"}}
    assert trained.tokenize_conversation([reply])["input_ids"][2:-1] == trained.build_single_message(
        "assistant", "interpreter", "print(1)")


# ---------------------------------------------------------------------------------------------------------------
# Streaming decode


@pytest.mark.parametrize("family", ["glm3", "glm4", "trained"])
def test_stream_decoder_emits_whole_characters(family, request):
    tokenizer = request.getfixturevalue(family)
    text = " 你好😀, 𠀋𪚥 rare 𰻞\n\tcode 👨‍👩‍👧 end"  # 𰻞 (U+30EDE) is in no vocabulary here: byte pieces
    ids = tokenizer.encode(text)
    stream = tokenizer.stream_decoder()
    pieces = [stream.push(token_id) for token_id in ids]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "" in pieces[2:]  # the bytes of a split character were held back
    assert "".join(pieces) + stream.flush() == tokenizer.decode(ids, skip_special_tokens=True) == text
    keep = tg.StreamDecoder(tokenizer, skip_special_tokens=False)
    assert keep.push(ids) == tokenizer.decode(ids, skip_special_tokens=False)
    cut = tokenizer.stream_decoder()
    assert cut.push(tokenizer.encode("𰻞", add_special_tokens=False)[:-1]) == "" and cut.flush() == "\ufffd"


# ---------------------------------------------------------------------------------------------------------------
# Training, and save/load through AutoTokenizer


def test_trained_tokenizer_conventions(trained, tmp_path):
    vocab = trained.convert_ids_to_tokens(list(range(len(trained))))
    assert len(trained) <= 500 and tuple(vocab[:259]) == tg.GLM3_RESERVED_PIECES
    assert tuple(vocab[-9:]) == tg.GLM3_CONTROL_TOKENS
    assert not any(re.search("[^▁]▁", piece) for piece in vocab)  # spaces only start pieces
    assert not any(len(piece) > 1 and any(c.isdigit() for c in piece) for piece in vocab[259:-9])  # split digits
    for text in BILINGUAL + ["unseen 文字 𪚥 99", "  spaces\n"]:
        assert trained.decode(trained.encode(text), skip_special_tokens=True) == text
    assert trained.encode("")[:2] == trained.get_prefix_tokens() == trained.convert_tokens_to_ids(["[gMASK]", "sop"])
    assert trained.tokenize("quick brown") == ["▁quick", "▁brown"]
    prompt = trained.build_chat_input("你好")["input_ids"][0].tolist()
    assert prompt[:3] == trained.convert_tokens_to_ids(["[gMASK]", "sop", "<|user|>"])
    assert prompt[-1] == trained.get_command("<|assistant|>")
    trained.save_pretrained(tmp_path)
    loaded = tg.ChatGLMTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == trained.get_vocab() and loaded.encode(BILINGUAL[3]) == trained.encode(BILINGUAL[3])
    with pytest.raises(TypeError, match="int"):
        tg.train_glm_tokenizer(["ok", 1], vocab_size=300)


CHAT = [{"role": "system", "content": "s", "tools": [{"name": "f"}]}, {"role": "user", "content": "你好 <|user|>"}]
LOAD_AND_PRINT = """
import json, sys
sys.modules["sentencepiece"] = sys.modules["tiktoken"] = sys.modules["google.protobuf"] = None  # must not be needed
from transformers import AutoTokenizer
chat, out = json.loads(sys.argv[1]), {}
for folder in sys.argv[2:]:
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    out[folder] = [type(tok).__name__, tok.padding_side, tok.stop_token_ids, tok.encode("你好 world\\n😀"),
                   tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=False),
                   tok.build_chat_input(chat[-1]["content"], chat[:-1])["input_ids"][0].tolist(), tok.chat_template]
print(json.dumps(out))
"""


def test_save_load_round_trip_through_auto_tokenizer(glm4_folder, trained, tmp_path):
    # Folders as the Hub repos have them: the original tokenizer.model, this file, a config naming it.
    originals = {"glm4": glm4_folder[0] / "tokenizer.model", "glm3": reference_file("chatglm3-6b", "tokenizer.model")}
    folders = []
    for name, model_file in originals.items():
        original = tmp_path / f"{name}-original"
        original.mkdir()
        shutil.copy(model_file, original / "tokenizer.model")
        shutil.copy(ROOT / "tokenization_glm.py", original)
        auto_map = {"AutoTokenizer": ["tokenization_glm.ChatGLMTokenizer", None]}
        (original / "tokenizer_config.json").write_text(json.dumps({"auto_map": auto_map}))
        tokenizer = AutoTokenizer.from_pretrained(original, trust_remote_code=True)
        tokenizer.save_pretrained(tmp_path / name)
        folders.append((tmp_path / name, tokenizer))
    trained.save_pretrained(tmp_path / "trained")
    folders.append((tmp_path / "trained", trained))

    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    command = [sys.executable, "-c", LOAD_AND_PRINT, json.dumps(CHAT), *(str(folder) for folder, _ in folders)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    for folder, tokenizer in folders:
        assert loaded[str(folder)] == [
            "ChatGLMTokenizer", "left", tokenizer.stop_token_ids, tokenizer.encode("你好 world\n😀"),
            tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False),
            tokenizer.build_chat_input(CHAT[-1]["content"], CHAT[:-1])["input_ids"][0].tolist(),
            tokenizer.chat_template,
        ]
        assert loaded[str(folder)][4] == loaded[str(folder)][5]  # the template gives build_chat_input's ids


def test_too_small_a_vocabulary_for_the_characters_names_the_setting():
    texts = ["".join(chr(0x4E00 + i + 40 * j) for i in range(40)) for j in range(20)] * 3  # 800 distinct characters
    with pytest.raises(ValueError, match=r"vocab_size 300 is too small for the training texts' characters: it needs "
                                         r"at least \d+ \(train.py: --tokenizer_vocab_size\)"):
        tg.train_glm_tokenizer(texts, vocab_size=300)


def test_encode_batch_ids_refuses_a_str():
    tokenizer = glm.tokenization.train_glm_tokenizer(["abc def"] * 50, vocab_size=300)
    with pytest.raises(TypeError, match="batch"):
        tokenizer.encode_batch_ids("abc")
    assert tokenizer.encode_batch_ids(["abc"]) == [tokenizer("abc")["input_ids"]]
