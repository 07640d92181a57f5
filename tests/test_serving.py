"""Serving (docs/serving.md): the response-parsing schema every saved tokenizer carries, read by transformers'
`parse_response` / `get_response_parser` (text, token ids, streamed), against tool_parser_glm.parse_tool_call and
process_response; and `transformers serve` on a `convert_glm.py --to native` folder, driven by the openai client."""

import json
import sys

import pytest
import transformers
from conftest import glm

from serving_helpers import (ANSWER, ASK, CALL, CONTENTS, GLM3_CALLS, GLM3_REFUSED, GLM4_CALLS, GLM4_REFUSED,
                             GREETING, HELLO, OPENAI_TOOLS, RESULT, free_port, start_serve, train_served_model)
from text_helpers import glm3, glm4, glm4_folder, sp_model  # noqa: F401  (fixtures)

replies = sys.modules["glm_hf.tool_parser_glm"]
tg = glm.tokenization
pytestmark = pytest.mark.skipif(transformers.__version__.startswith("4."),
                                reason="transformers 4.57 has no response parsing (parse_response, response_template)")



@pytest.fixture(params=["glm3", "glm4"])
def tokenizer(request):
    return request.getfixturevalue(request.param)


def _reply_ids(tokenizer, metadata, content, stop=True):
    """The ids a model of this family generates for one reply: metadata + "\\n" and the content encoded apart (as
    build_single_message does), then a stop token."""
    ids = tokenizer.build_single_message("assistant", metadata, content)[1:]
    return ids + [tokenizer.stop_token_ids[1]] if stop else ids


def _prompt_ids(tokenizer):
    return tokenizer.build_chat_input("北京天气如何？", history=[])["input_ids"][0].tolist()


def _parse_all_ways(tokenizer, metadata, content):
    """The message parse_response makes of a reply from its text, from its token ids, and streamed id by id."""
    text = metadata + "\n" + (" " + content if not tokenizer.is_glm4 and content else content)
    prompt = _prompt_ids(tokenizer)
    ids = _reply_ids(tokenizer, metadata, content)
    from_text = tokenizer.parse_response(text, prefix=tokenizer.decode(prompt))
    from_ids = tokenizer.parse_response(ids, prefix=prompt)
    parser = tokenizer.get_response_parser(prefix=prompt, token_ids=True)
    events = [event for token in ids for event in parser.feed([token])]
    streamed, final_events = parser.finalize()
    events += final_events
    chunks = "".join(event["text"] for event in events if event["type"] == "region_chunk"
                     and event["field"] == "content")
    closed = [event["value"] for event in events if event["type"] == "region_close" and event["field"] == "tool_calls"]
    assert from_ids == from_text == streamed
    return from_text, chunks, closed


def test_every_saved_tokenizer_carries_the_response_template(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "tokenizer_config.json").read_text())
    assert saved["response_template"] == tg.response_template(tokenizer.is_glm4)
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "ours", trust_remote_code=True)
    assert again.response_template == tokenizer.response_template
    # a plain tokenizer (no remote code) reads it too: what transformers serve and vLLM load
    plain = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path / "ours")
    assert plain.parse_response("\n hi", prefix="") == {"role": "assistant", "content": "hi"}


@pytest.mark.parametrize("content", CONTENTS)
def test_content_equals_process_response(tokenizer, content):
    message, chunks, closed = _parse_all_ways(tokenizer, "", content)
    expected, _ = replies.process_response("\n" + content, [])
    assert message == {"role": "assistant", "content": expected} and not closed
    assert chunks == expected  # streamed without the format's leading "\n" (and ChatGLM3's dummy-prefix space)


def _check_call(tokenizer, body, difference):
    message, chunks, closed = _parse_all_ways(tokenizer, "get_weather", body)
    ours = replies.parse_tool_call("get_weather", body)
    arguments = ours["parameters"] if difference is None else difference
    call = {"type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    assert message == {"role": "assistant", "tool_calls": [call]} and closed == [call] and chunks == ""
    json.dumps(arguments, allow_nan=False)  # typed JSON: what the OpenAI API sends as the arguments string
    return ours


@pytest.mark.parametrize("body, difference", GLM3_CALLS)
def test_glm3_tool_calls_equal_parse_tool_call(glm3, body, difference):
    ours = _check_call(glm3, body, difference)
    assert ours["parameters"] is not None and (difference is None) == (ours["parameters"] == difference or
                                                                        difference is None)
    if difference is not None:
        assert ours["parameters"] != difference  # the documented difference is real


@pytest.mark.parametrize("body, difference", GLM3_REFUSED)
def test_glm3_refused_calls_come_back_as_text_values(glm3, body, difference):
    ours = _check_call(glm3, body, difference)
    assert ours["parameters"] is None and ours["error"]


@pytest.mark.parametrize("body, difference", GLM4_CALLS)
def test_glm4_tool_calls_equal_parse_tool_call(glm4, body, difference):
    ours = _check_call(glm4, body, difference)
    assert ours["parameters"] is not None


@pytest.mark.parametrize("body, difference", GLM4_REFUSED)
def test_glm4_refused_calls_come_back_as_text_arguments(glm4, body, difference):
    message, _, closed = _parse_all_ways(glm4, "get_weather", body)
    assert message["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": difference}
    assert closed == message["tool_calls"] and replies.parse_tool_call("get_weather", body)["error"]


def test_tools_schema_does_not_retype_exact_values(glm3):
    """parse_response(tools=...) casts strings by the tool's JSON schema; values the schema typed exactly stay."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}}}}}]
    text = 'get_weather\n ```python\ntool_call(city="3", days=3)\n```'
    message = glm3.parse_response(text, prefix="", tools=tools)
    assert message["tool_calls"][0]["function"]["arguments"] == {"city": "3", "days": 3}


# ---------------------------------------------------------------------------------------------------------------
# transformers serve on a native conversion, through scripts/serve.sh, driven by the openai client

@pytest.fixture(scope="module")
def served_folder(tmp_path_factory):
    """Our folder of a tiny GLM trained to replay serving_helpers.served_conversations."""
    folder = tmp_path_factory.mktemp("served") / "glm-tiny"
    train_served_model(folder)
    return folder


@pytest.fixture(scope="module")
def transformers_server(served_folder, tmp_path_factory):
    """scripts/serve.sh --engine transformers on our folder: it converts it to native (cached) and runs
    `transformers serve` there. Yields (openai client, model name, the native folder, the script's banner)."""
    from openai import OpenAI

    cache, port = tmp_path_factory.mktemp("serve-cache"), free_port()
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    server = start_serve(served_folder, "transformers", port, log, timeout=120, GLM_SERVE_CACHE=str(cache))
    try:
        native = next(p for p in cache.iterdir() if p.is_dir())
        yield OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none"), str(native), native, log.read_text()
    finally:
        server.terminate()
        server.wait(30)


def test_serve_script_prints_url_example_and_limits(served_folder, transformers_server):
    _, name, native, banner = transformers_server
    assert json.loads((native / "config.json").read_text())["architectures"] == ["GlmForCausalLM"]
    assert "http://127.0.0.1:" in banner and "from openai import OpenAI" in banner and "limits:" in banner
    saved = json.loads((native / "tokenizer_config.json").read_text())
    assert saved["response_template"] == tg.response_template(False)
    stops = tg.ChatGLMTokenizer.from_pretrained(served_folder).stop_token_ids
    assert json.loads((native / "generation_config.json").read_text())["eos_token_id"] == stops and len(stops) == 3


def test_served_prompt_ids_equal_build_chat_input(served_folder, transformers_server):
    """The server renders with the native folder's plain tokenizer: its ids are build_chat_input's; the usage it
    reports counts them."""
    client, name, native, _ = transformers_server
    ours = tg.ChatGLMTokenizer.from_pretrained(served_folder)
    plain = transformers.AutoTokenizer.from_pretrained(native)
    messages = [{"role": "user", "content": ASK}]
    expected = ours.build_chat_input(ASK, history=[{"role": "system", "content": json.dumps(
        OPENAI_TOOLS, indent=4, ensure_ascii=False)}])["input_ids"][0].tolist()
    assert plain.apply_chat_template(messages, tools=OPENAI_TOOLS, add_generation_prompt=True,
                                     return_dict=False) == expected
    reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": HELLO}], max_tokens=30)
    assert reply.usage.prompt_tokens == len(ours.build_chat_input(HELLO)["input_ids"][0])


def test_served_chat_and_stream_stop_where_ours_stops(transformers_server):
    client, name, _, _ = transformers_server
    reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": HELLO}], max_tokens=40)
    # stopped by the stop ids of generation_config.json (the client passed none), without the format's "\n "
    assert reply.choices[0].message.content == GREETING and reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens < 40
    stream = client.chat.completions.create(model=name, messages=[{"role": "user", "content": HELLO}], max_tokens=40,
                                            stream=True)
    chunks = [chunk.choices[0].delta.content for chunk in stream if chunk.choices and chunk.choices[0].delta.content]
    assert "".join(chunks) == GREETING and len(chunks) > 1


def test_served_tool_call_then_tool_result(transformers_server):
    client, name, _, _ = transformers_server
    messages = [{"role": "user", "content": ASK}]
    reply = client.chat.completions.create(model=name, messages=messages, tools=OPENAI_TOOLS, max_tokens=60)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == CALL  # days is an int
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": RESULT}]
    follow = client.chat.completions.create(model=name, messages=messages, tools=OPENAI_TOOLS, max_tokens=60)
    assert follow.choices[0].message.content == ANSWER and follow.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model=name, messages=messages[:1], tools=OPENAI_TOOLS, max_tokens=60,
                                            stream=True)
    calls = [call for chunk in stream if chunk.choices for call in chunk.choices[0].delta.tool_calls or []]
    assert [json.loads(call.function.arguments) for call in calls] == [CALL]


def test_serve_script_never_falls_back_to_another_engine(served_folder, tmp_path):
    """--engine vllm without vLLM stops with how to install it, instead of serving with transformers."""
    import os
    import subprocess

    from conftest import ROOT

    env = dict(os.environ, PYTHON=sys.executable, GLM_VLLM_ENV=str(tmp_path / "no-vllm"))
    result = subprocess.run(["bash", str(ROOT / "scripts" / "serve.sh"), str(served_folder), "--engine", "vllm"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "vLLM is not installed" in result.stderr and "install_vllm.sh" in result.stderr
    assert "serving" not in result.stderr
    # a vLLM parser asked of transformers serve is refused, not ignored
    result = subprocess.run(["bash", str(ROOT / "scripts" / "serve.sh"), str(served_folder), "--engine", "transformers",
                             "--tool-parser", "glm"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--tool-parser is vLLM's" in result.stderr and "http://" not in result.stderr
