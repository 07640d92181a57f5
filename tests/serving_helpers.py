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
ASK, RESULT, ANSWER, HELLO, GREETING = "北京天气", '{"weather": "晴"}', "北京今天晴", "你好", "你好，我是 GLM"


def served_conversations():
    """What the model learns to replay, in OpenAI's form (as a server renders it): a tool call with typed
    arguments, its result and the answer; and a greeting."""
    call = {"type": "function", "function": {"name": "get_weather", "arguments": CALL}}
    return [([{"role": "user", "content": ASK}, {"role": "assistant", "content": None, "tool_calls": [call]},
              {"role": "tool", "content": RESULT}, {"role": "assistant", "content": ANSWER}], OPENAI_TOOLS),
            ([{"role": "user", "content": HELLO}, {"role": "assistant", "content": GREETING}], None)]


def train_served_model(folder, head_dim=8, steps=200):
    """A tiny GLM trained until greedy decoding replays served_conversations, saved in `folder` as our folder (code,
    tokenizer with its response_template, generation_config.json with every stop id). vLLM's CPU attention needs
    head_dim >= 32."""
    from conftest import train_to_replay  # the test environment's (pytest)

    corpus = [ASK, RESULT, ANSWER, HELLO, GREETING, json.dumps(OPENAI_TOOLS, indent=4, ensure_ascii=False),
              tg.format_tool_call("get_weather", CALL)[1]]
    tokenizer = tg.train_glm_tokenizer(corpus * 20, vocab_size=400)
    config = glm.ChatGLMConfig(num_layers=2, hidden_size=8 * head_dim, num_attention_heads=8, multi_query_group_num=2,
                               kv_channels=head_dim, ffn_hidden_size=96, padded_vocab_size=416, seq_length=512,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model = train_to_replay(served_conversations(), tokenizer, config, steps, 0.02)
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
