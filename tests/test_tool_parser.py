"""tool_parser_glm.py (docs/serving.md, "Exact tool calls on vLLM"): a served reply, whole (`reply_message`) or in
pieces (`ReplyStream`), becomes the OpenAI message `process_response` / `parse_tool_call` make of it, on every
reply case of tests/serving_helpers.py, from text and from the real tokenizers' decoded ids. vLLM itself drives the
same file in tests/vllm_check.py."""

import json
import random
import sys

import pytest
from conftest import glm

from serving_helpers import CONTENTS, GLM3_CALLS, GLM3_REFUSED, GLM4_CALLS, GLM4_REFUSED
from text_helpers import glm3, glm4, glm4_folder, sp_model  # noqa: F401  (fixtures)

replies = sys.modules["glm_hf.tool_parser_glm"]
CALLS = [body for body, _ in GLM3_CALLS + GLM4_CALLS]
REFUSED = [body for body, _ in GLM3_REFUSED + GLM4_REFUSED]


def _streamed(text, tools_enabled, seed):
    """The content and calls ReplyStream gives for `text` cut into random pieces (1 to 4 characters)."""
    rng, stream, sent, start = random.Random(seed), replies.ReplyStream(tools_enabled), [], 0
    while start < len(text):
        end = start + rng.randint(1, 4)
        sent.append(stream.feed(text[start:end]))
        start = end
    rest = stream.finish()
    return "".join(sent) + (rest["content"] or ""), rest["tool_calls"]


@pytest.mark.parametrize("body", CALLS)
def test_tool_calls_equal_parse_tool_call(body):
    """Every argument kind our parser accepts, typed exactly: Python-only literals nested in lists and dicts, tuples,
    Python escapes and number spellings included (where the response_template gives source text)."""
    expected = replies.parse_tool_call("get_weather", body)["parameters"]
    assert expected is not None
    for text in ("get_weather\n" + body, "get_weather\n " + body):  # GLM-4; ChatGLM3's dummy-prefix space
        message = replies.reply_message(text, tools_enabled=True)
        assert message["content"] is None and len(message["tool_calls"]) == 1
        call = message["tool_calls"][0]
        assert call["name"] == "get_weather" and json.loads(call["arguments"]) == expected
        for seed in range(3):
            assert _streamed(text, True, seed) == ("", message["tool_calls"])


def test_nested_python_literals_are_typed():
    """The cases the response_template returns as source text (docs/serving.md) come back as JSON values."""
    text = "get_weather\n ```python\ntool_call(x=-1.5, flags=[True, None], opts={'a': (1, 2)}, s='it\\'s', n=0x1F)\n```"
    (call,) = replies.reply_message(text, tools_enabled=True)["tool_calls"]
    assert json.loads(call["arguments"]) == {"x": -1.5, "flags": [True, None], "opts": {"a": [1, 2]}, "s": "it's",
                                             "n": 31}


@pytest.mark.parametrize("body", REFUSED)
def test_refused_calls_come_back_whole_as_content(body):
    """A call parse_tool_call refuses is no tool call: the message comes back as generated, nothing evaluated."""
    assert replies.parse_tool_call("get_weather", body)["error"]
    text = " get_weather\n " + body + "\n"
    assert replies.reply_message(text, tools_enabled=True) == {"content": text.strip(), "tool_calls": []}
    assert _streamed(text, True, 0) == (text.strip(), [])


@pytest.mark.parametrize("content", CONTENTS + ["  padded  \n", "a\n\n", "79<|user|>"])
def test_content_equals_process_response(content):
    for text in ("\n" + content, " \n " + content):  # GLM-4; ChatGLM3 as decoded (dummy-prefix spaces)
        expected, _ = replies.process_response(text.replace("<|user|>", ""), [])
        assert replies.reply_message(text, tools_enabled=False) == {"content": expected, "tool_calls": []}
        assert replies.reply_message(text, tools_enabled=True)["content"] == expected
        for seed in range(5):
            assert _streamed(text, False, seed) == (expected, [])


def test_content_streams_before_the_reply_ends():
    stream = replies.ReplyStream(tools_enabled=False)
    assert [stream.feed(piece) for piece in [" \n", " 你好", "，", " 世界 ", "\n"]] == ["", "你好", "，", " 世界", ""]
    assert stream.finish() == {"content": "", "tool_calls": []}


def test_without_tools_a_call_is_text():
    """A request without tools (or tool_choice "none") gets the call as the text the model wrote."""
    text = ' get_weather\n ```python\ntool_call(city="北京")\n```'
    assert replies.reply_message(text, tools_enabled=False) == {"content": text.strip(), "tool_calls": []}
    assert _streamed(text, False, 1) == (text.strip(), [])


def test_the_last_message_is_the_reply():
    """As model.chat: a generation that opened another assistant message is answered by the last one."""
    text = '\n 想一想<|assistant|>get_weather\n ```python\ntool_call(city="北京")\n```<|observation|>'
    (call,) = replies.reply_message(text, tools_enabled=True)["tool_calls"]
    assert json.loads(call["arguments"]) == {"city": "北京"}
    sent, calls = _streamed(text, True, 2)
    assert sent == "想一想" and calls == [call]  # content already streamed stays sent
    assert replies.reply_message("\n 一<|assistant|>\n 二", tools_enabled=False)["content"] == "二"


@pytest.mark.parametrize("family", ["glm3", "glm4"])
def test_decoded_reply_ids_parse_as_process_response(family, request):
    """What a server parses: the reply's ids (as the model generates them, build_single_message) decoded with their
    special tokens, whole and token by token."""
    tokenizer = request.getfixturevalue(family)
    cases = [("", content) for content in CONTENTS] + [("get_weather", body) for body in CALLS]
    for metadata, content in cases:
        ids = tokenizer.build_single_message("assistant", metadata, content)[1:] + [tokenizer.stop_token_ids[2]]
        text = tokenizer.decode(ids, skip_special_tokens=False)
        message = replies.reply_message(text, tools_enabled=True)
        if metadata:
            expected = replies.parse_tool_call(metadata, content)["parameters"]
            assert json.loads(message["tool_calls"][0]["arguments"]) == expected, (family, content)
        else:
            assert message["content"] == replies.process_response("\n" + content, [])[0], (family, content)
        stream, pieces, decoded = replies.ReplyStream(tools_enabled=True), [], ""
        for end in range(1, len(ids) + 1):  # as a server detokenizes: a character's bytes wait until complete
            now = tokenizer.decode(ids[:end], skip_special_tokens=False)
            if not now.endswith("\ufffd"):
                pieces.append(stream.feed(now[len(decoded):]))
                decoded = now
        rest = stream.finish()
        assert "".join(pieces) + (rest["content"] or "") == (message["content"] or "")
        assert rest["tool_calls"] == message["tool_calls"]


def test_stop_texts_are_the_tokenizers_stop_tokens(glm3, glm4):
    """tool_parser_glm stands alone (vLLM loads it by path), so it names the stop tokens itself: the real tokenizers'
    stop tokens of both families, and <|assistant|>, are what it strips and splits at."""
    stops = {token for tokenizer in (glm3, glm4) for token in tokenizer.convert_ids_to_tokens(tokenizer.stop_token_ids)}
    assert stops == set(replies.STOP_TEXTS)
    assert {glm3.convert_ids_to_tokens(glm3.get_command(replies.ASSISTANT)),
            glm4.convert_ids_to_tokens(glm4.get_command(replies.ASSISTANT))} == {replies.ASSISTANT}


def test_every_saved_folder_carries_the_plugin(tmp_path):
    """save_pretrained copies tool_parser_glm.py (chat_glm.py imports it), so `--tool-parser-plugin
    FOLDER/tool_parser_glm.py` works on any folder saved with our classes."""
    config = glm.ChatGLMConfig(num_layers=1, hidden_size=32, num_attention_heads=2, kv_channels=16,
                               ffn_hidden_size=64, padded_vocab_size=64, multi_query_group_num=1)
    glm.ChatGLMForConditionalGeneration(config).save_pretrained(tmp_path)
    from conftest import ROOT

    assert (tmp_path / "tool_parser_glm.py").read_bytes() == (ROOT / "tool_parser_glm.py").read_bytes()
