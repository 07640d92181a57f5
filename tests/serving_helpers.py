"""A tiny GLM that answers like a served model, shared by tests/test_serving.py (transformers serve, in the test
environment) and tests/vllm_check.py (vLLM, in its own environment): no pytest, only the repository's code."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from local_glm import glm  # noqa: E402

tg = glm.tokenization
OPENAI_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "天气", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]
CALL = {"city": "北京", "days": 3}
# A call whose ChatGLM3 form holds Python-only literals inside a list (flags=[True, None]): exact through the glm
# tool-parser plugin (vLLM), source text through the response_template (docs/serving.md).
NESTED_CALL = {"city": "北京", "days": 3, "flags": [True, None]}
ASK, RESULT, ANSWER, HELLO, GREETING = "北京天气", '{"weather": "晴"}', "北京今天晴", "你好", "你好，我是 GLM"

ARGUMENTS = [{"city": "北京"}, {"city": "Paris", "days": 3, "metric": True, "note": None}, {},
             {"q": ["a", 1.5, {"k": False}]}]

# ChatGLM3 tool-call bodies from tests/test_chat.py, the docs and format_tool_call, each with the arguments the
# response_template gives. `None` marks agreement with parse_tool_call; a dict marks a documented difference
# (docs/serving.md, "What the response schema cannot express"): a value that is no JSON text and no top-level
# True/False/None or plain single-quoted string comes back as its source text. tool_parser_glm.py (vLLM's glm
# plugin) gives parse_tool_call's arguments on every one (tests/test_tool_parser.py, tests/vllm_check.py).
GLM3_CALLS = [
    ('```python\ntool_call(city="北京", days=3)\n```', None),
    ("```python\ntool_call(city='北京')\n```", None),
    ("tool_call()", None),
    ('```python\ntool_call(symbol="10111")', None),  # closing fence cut off
    ('```python\ntool_call(a=1, b="x,)=", c=-2.5e3, d=True, e=False, f=None, g="\\"q\\" \\\\ \\n \\u4e2d")\n```', None),
    ('```python\ntool_call(q=["a", 1.5, {"k": 2}], o={"x": {"y": []}}, s="😀𠀋")\n```', None),
    *[(tg.format_tool_call("get_weather", arguments)[1], None) for arguments in ARGUMENTS[:3]],
    # Python literals that are no JSON: nested True/False/None, tuples, single-quoted keys
    (tg.format_tool_call("get_weather", ARGUMENTS[3])[1], {"q": '["a", 1.5, {"k": False}]'}),
    ("```python\ntool_call(x=-1.5, flags=[True, None], opts={'a': (1, 2)})\n```",
     {"x": -1.5, "flags": "[True, None]", "opts": "{'a': (1, 2)}"}),
    ("tool_call(a=(1, 'x'))", {"a": "(1, 'x')"}),
    ("tool_call(s='it\\'s')", {"s": "'it\\'s'"}),
    ("tool_call(n=0x1F)", {"n": "0x1F"}),
]
# Replies parse_tool_call refuses (it returns the text with an error): the schema has no error result, so the call
# still comes back, with each value's source text; nothing is evaluated either way.
GLM3_REFUSED = [
    ("tool_call(x=__import__('os').system('true'))", {"x": "__import__"}),  # up to the first bracket
    ("tool_call(x=a)", {"x": "a"}),
    ("tool_call(a={1, 2})", {"a": "{1, 2}"}),
]
GLM4_CALLS = [
    ('{"city": "北京"}', None),
    ('{"city": "Paris", "days": 3, "metric": true, "note": null, "q": ["a", 1.5, {"k": false}]}', None),
    ("{}", None),
    ('{"s": "\\"q\\" \\n 😀"}', None),
    *[(tg.format_tool_call("get_weather", arguments, glm4=True)[1], None) for arguments in ARGUMENTS],
    ('```json\n{"city": "Paris"}\n```', None),
    ('{"city": "北京", "days": [1, 2]}', None),
]
# GLM-4 replies parse_tool_call refuses: the schema returns the text as the arguments string (OpenAI's API may send
# arguments that are no JSON), or, for JSON that is no object, that value.
GLM4_REFUSED = [('{"city": ', '{"city":'), ("[1, 2]", [1, 2]), ("some plain words", "some plain words")]
CONTENTS = ["79", "你好，世界", "line one\n\nline two\n  indented", "😀𠀋 mixed 中文 text", "x = 1\n\ty = 2"]


def served_conversations(call=CALL):
    """What the model learns to replay, in OpenAI's form (as a server renders it): a tool call with typed
    arguments `call`, its result and the answer; and a greeting."""
    call = {"type": "function", "function": {"name": "get_weather", "arguments": call}}
    return [([{"role": "user", "content": ASK}, {"role": "assistant", "content": None, "tool_calls": [call]},
              {"role": "tool", "content": RESULT}, {"role": "assistant", "content": ANSWER}], OPENAI_TOOLS),
            ([{"role": "user", "content": HELLO}, {"role": "assistant", "content": GREETING}], None)]


def train_served_model(folder, head_dim=8, steps=200, call=CALL):
    """A tiny GLM trained until greedy decoding replays served_conversations(call), saved in `folder` as our folder (code,
    tokenizer with its response_template, generation_config.json with every stop id). vLLM's CPU attention needs
    head_dim >= 32."""
    from conftest import train_to_replay  # the test environment's (pytest)

    corpus = [ASK, RESULT, ANSWER, HELLO, GREETING, json.dumps(OPENAI_TOOLS, indent=4, ensure_ascii=False),
              tg.format_tool_call("get_weather", call)[1]]
    tokenizer = tg.train_glm_tokenizer(corpus * 20, vocab_size=400)
    config = glm.ChatGLMConfig(num_layers=2, hidden_size=8 * head_dim, num_attention_heads=8, multi_query_group_num=2,
                               kv_channels=head_dim, ffn_hidden_size=96, padded_vocab_size=416, seq_length=512,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model = train_to_replay(served_conversations(call), tokenizer, config, steps, 0.02)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(folder, engine, port, log, engine_args=(), timeout=300, **env):
    """`bash scripts/serve.sh folder --engine engine --port port -- engine_args`, with its output in `log`, once its
    /health answers; raises with the log's tail if it exits or does not come up in `timeout` seconds."""
    env = dict(os.environ, PYTHON=sys.executable, HF_HUB_OFFLINE="1", **env)
    extra = ["--", *engine_args] if engine_args else []
    with open(log, "w") as out:
        server = subprocess.Popen(["bash", str(ROOT / "scripts" / "serve.sh"), str(folder), "--engine", engine,
                                   "--port", str(port), *extra], env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return server
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(f"serve.sh --engine {engine} exited:\n" + Path(log).read_text()[-4000:])
            time.sleep(0.5)
    server.terminate()
    raise RuntimeError(f"serve.sh --engine {engine} did not come up in {timeout} s:\n" + Path(log).read_text()[-4000:])
