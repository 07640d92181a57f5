"""The vLLM checks of docs/serving.md, run in vLLM's own environment (scripts/install_vllm.sh) by
`bash scripts/vllm_check.sh`, not by pytest (vLLM pins transformers <5.20, older than the test environment's):

1. greedy tokens of vLLM's offline `LLM` equal ours (generate() with our code) on 5 prompts, on our folder and on its
   `convert_glm.py --to native` conversion;
2. vLLM's own parser machinery with the folder's tool_parser_glm.py loaded as its tool-parser plugin "glm" (as
   `--tool-parser-plugin` loads it): every reply case of serving_helpers, whole and streamed character by
   character, gives parse_tool_call's arguments and process_response's content;
3. the OpenAI server that scripts/serve.sh starts (vLLM with that plugin) answers through the openai client:
   content without the format's "\\n", a tool call whose ChatGLM3 arguments hold Python-only literals in a list
   (`flags=[True, None]`) as typed tool_calls with finish_reason "tool_calls", streamed too, the turn after the tool
   result, a named tool_choice (forced by vLLM) and tool_choice="none" (the call as text); it stops at the family's stop ids without the client passing any;
4. 8 concurrent requests each return what they return alone.

Each check prints PASS or raises; the exit status is 0 only when all passed.
    python tests/vllm_check.py WORKDIR --only prepare          # in the test environment: folders, our tokens
    python tests/vllm_check.py WORKDIR [--only offline|plugin|server]  # in vLLM's environment
"""

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_helpers import (ANSWER, ASK, CONTENTS, GLM3_CALLS, GLM3_REFUSED, GLM4_CALLS,  # noqa: E402
                             GLM4_REFUSED, GREETING, HELLO, NESTED_CALL, OPENAI_TOOLS, RESULT, start_serve,
                             train_served_model)

PROMPTS = [HELLO, ASK, "hello", "天气 北京 你好", "GLM"]


def ours_greedy(model, tokenizer, max_new_tokens=16):
    import torch

    out = []
    for prompt in PROMPTS:
        ids = tokenizer.build_chat_input(prompt)["input_ids"]
        with torch.no_grad():
            generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=max_new_tokens)
        out.append(generated[0, ids.shape[1]:].tolist())
    return [ids for ids in out], [tokenizer.build_chat_input(p)["input_ids"][0].tolist() for p in PROMPTS]


def vllm_greedy(folder, prompts_ids, max_new_tokens=16):
    """In a child process, so each engine's memory and threads go away with it."""
    code = f"""
import json, sys
from vllm import LLM, SamplingParams
llm = LLM(model={str(folder)!r}, trust_remote_code=True, dtype="float32", max_model_len=512, seed=0)
params = SamplingParams(temperature=0, max_tokens={max_new_tokens})
outputs = llm.generate([{{"prompt_token_ids": ids}} for ids in json.loads(sys.argv[1])], params)
print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outputs]))
"""
    result = subprocess.run([sys.executable, "-c", code, json.dumps(prompts_ids)], capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode or not lines:
        raise RuntimeError(f"vLLM failed on {folder}:\n{result.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def prepare(work):
    """In the test environment (our model code runs on transformers 5.25 and 4.57; vLLM's 5.19 names
    create_causal_mask's arguments differently): the tiny model as our folder and its native conversion, and our
    greedy tokens for PROMPTS (expected.json)."""
    from convert_glm import convert_checkpoint

    model, tokenizer = train_served_model(work / "glm-tiny", head_dim=32, steps=800, call=NESTED_CALL)
    convert_checkpoint(work / "glm-tiny", work / "glm-tiny-native", to="native")
    expected, prompts_ids = ours_greedy(model.eval(), tokenizer)
    (work / "expected.json").write_text(json.dumps({"prompts_ids": prompts_ids, "expected": expected,
                                                     "stops": tokenizer.stop_token_ids}))
    print(f"prepared {work}", flush=True)


def check_offline(work):
    saved = json.loads((work / "expected.json").read_text())
    for folder in (work / "glm-tiny", work / "glm-tiny-native"):
        got = vllm_greedy(folder, saved["prompts_ids"])
        for prompt, ours, theirs in zip(PROMPTS, saved["expected"], got):
            # both end with the stop id that ended generation, or at max_tokens
            assert theirs == ours, (folder.name, prompt, ours, theirs)
        ended = sum(1 for ids in got if ids and ids[-1] in saved["stops"])
        print(f"PASS greedy tokens equal ours on {len(PROMPTS)} of {len(PROMPTS)} prompts: {folder.name} "
              f"({ended} ended at a stop id)", flush=True)


def check_plugin(work):
    """vLLM's composed parser (ParserManager, as the server builds it per request) with the folder's plugin."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.parser.parser_manager import ParserManager
    from vllm.tokenizers import get_tokenizer
    from vllm.tool_parsers import ToolParserManager

    from local_glm import glm

    replies = sys.modules["glm_hf.tool_parser_glm"]
    folder = work / "glm-tiny"
    ToolParserManager.import_tool_parser(str(folder / "tool_parser_glm.py"))
    tokenizer = get_tokenizer(str(folder), trust_remote_code=True)
    parser_class = ParserManager.get_parser(tool_parser_name="glm", enable_auto_tools=True, tokenizer=tokenizer)
    assert parser_class.tool_parser_cls.__module__ == "tool_parser_glm", parser_class.tool_parser_cls
    messages = [{"role": "user", "content": ASK}]

    def parse(text, tools):
        request = ChatCompletionRequest(model="m", messages=messages, tools=tools)
        whole = parser_class(tokenizer, request.tools)
        request = whole.adjust_request(request)
        assert request.skip_special_tokens is False
        _, content, calls = whole.parse(text, request, enable_auto_tools=True)
        streaming, deltas = parser_class(tokenizer, request.tools), []
        for i, char in enumerate(text):
            delta = streaming.parse_delta(char, [0], request, prompt_token_ids=[0], finished=i == len(text) - 1)
            deltas += [delta] if delta is not None else []
        streamed = "".join(d.content or "" for d in deltas)
        streamed_calls = [(c.function.name, c.function.arguments) for d in deltas for c in d.tool_calls or []]
        assert streamed_calls == [(c.name, c.arguments) for c in calls or []], (text, streamed_calls, calls)
        assert streamed == (content or ""), (text, streamed, content)
        return content, [(c.name, json.loads(c.arguments)) for c in calls or []]

    bodies = [body for body, _ in GLM3_CALLS + GLM4_CALLS]
    for body in bodies:
        expected = replies.parse_tool_call("get_weather", body)["parameters"]
        for text in ("get_weather\n" + body, "get_weather\n " + body + "<|observation|>"):
            assert parse(text, OPENAI_TOOLS) == (None, [("get_weather", expected)]), (text, expected)
            assert parse(text, None) == (text.replace("<|observation|>", "").strip(), [])  # no tools: the text
    for body, _ in GLM3_REFUSED + GLM4_REFUSED:
        text = "get_weather\n" + body
        assert parse(text, OPENAI_TOOLS) == (text.strip(), []), (text, parse(text, OPENAI_TOOLS))
    for content in CONTENTS:
        for text in ("\n" + content, " \n " + content + "<|user|>"):
            assert parse(text, None) == (replies.process_response("\n" + content, [])[0], [])
    # vLLM's hf parser (serve.sh --tool-parser hf) on the same tokenizer's response_template: JSON-spelled ChatGLM3
    # values exact; vLLM 0.32's older parser copy retypes the top-level Python constants (docs/serving.md).
    hf_class = ParserManager.get_parser(tool_parser_name="hf", enable_auto_tools=True, tokenizer=tokenizer)

    def hf_parse(body):
        request = ChatCompletionRequest(model="m", messages=messages, tools=OPENAI_TOOLS)
        parser = hf_class(tokenizer, request.tools)
        _, content, calls = parser.parse("get_weather\n " + body, parser.adjust_request(request),
                                         enable_auto_tools=True)
        return [(c.name, json.loads(c.arguments)) for c in calls or []]

    spelled = ['```python\ntool_call(city="北京", days=3)\n```', "tool_call()", '```python\ntool_call(symbol="10111")',
               '```python\ntool_call(q=["a", 1.5, {"k": 2}], o={"x": {"y": []}}, s="😀𠀋")\n```',
               glm.tokenization.format_tool_call("get_weather", NESTED_CALL)[1]]
    got = [hf_parse(body) for body in spelled]
    expected = [[("get_weather", replies.parse_tool_call("get_weather", body)["parameters"])] for body in spelled]
    assert got[:4] == expected[:4], (got, expected)
    assert got[4] == [("get_weather", {"city": "北京", "days": 3, "flags": "[True, None]"})], got[4]
    assert hf_parse("tool_call(d=True)") == [("get_weather", {"d": "True"})]
    assert hf_parse("tool_call(city='北京')") == [("get_weather", {"city": "'北京'"})]
    assert hf_parse("tool_call(f=None)") == []
    print("PASS vLLM's hf parser: JSON-spelled ChatGLM3 arguments exact; flags=[True, None] as text, top-level True "
          "as \"True\", a single-quoted string with its quotes, a call with a top-level None dropped "
          "(docs/serving.md)", flush=True)
    print(f"PASS vLLM's parser with the glm plugin: {len(bodies)} tool calls equal parse_tool_call (Python-only "
          f"literals in lists included), whole and streamed; {len(GLM3_REFUSED + GLM4_REFUSED)} refused calls and "
          f"{len(CONTENTS)} contents as process_response", flush=True)


def check_server(work, port=8123):
    from openai import OpenAI

    folder = work / "glm-tiny"
    server = start_serve(folder, "vllm", port, work / "vllm-server.log", VLLM_CPU_KVCACHE_SPACE="1",
                         engine_args=["--max-model-len", "512", "--dtype", "float32", "--seed", "0"])
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        name = folder.name
        greedy = dict(model=name, temperature=0, max_tokens=40)
        reply = client.chat.completions.create(messages=[{"role": "user", "content": HELLO}], **greedy)
        assert reply.choices[0].message.content == GREETING, reply
        assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens < 40, reply
        print("PASS chat: content without the format's leading newline, stopped by the family's stop ids", flush=True)
        stream = client.chat.completions.create(messages=[{"role": "user", "content": HELLO}], stream=True, **greedy)
        chunks = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
        assert "".join(chunks) == GREETING and len(chunks) > 1, chunks
        print("PASS streamed chat", flush=True)
        messages = [{"role": "user", "content": ASK}]
        reply = client.chat.completions.create(messages=messages, tools=OPENAI_TOOLS, **greedy)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1, reply
        call = choice.message.tool_calls[0]
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == NESTED_CALL, call
        print(f"PASS tool call: {call.function.name}({call.function.arguments}), finish_reason tool_calls",
              flush=True)
        stream = client.chat.completions.create(messages=messages, tools=OPENAI_TOOLS, stream=True, **greedy)
        calls = [tc for c in stream if c.choices for tc in c.choices[0].delta.tool_calls or []]
        assert [json.loads(tc.function.arguments) for tc in calls] == [NESTED_CALL], calls
        print("PASS streamed tool call", flush=True)
        messages += [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": RESULT}]
        follow = client.chat.completions.create(messages=messages, tools=OPENAI_TOOLS, **greedy)
        assert follow.choices[0].message.content == ANSWER, follow
        print("PASS the turn after the tool result", flush=True)
        named = client.chat.completions.create(messages=messages[:1], tools=OPENAI_TOOLS, model=name, temperature=0,
                                               max_tokens=16, tool_choice={"type": "function",
                                                                           "function": {"name": "get_weather"}})
        (forced,) = named.choices[0].message.tool_calls
        assert forced.function.name == "get_weather", named
        plain = client.chat.completions.create(messages=messages[:1], tools=OPENAI_TOOLS, tool_choice="none", **greedy)
        text = plain.choices[0].message.content
        assert not plain.choices[0].message.tool_calls and text.startswith("get_weather\n") and "tool_call(" in text
        print("PASS a named tool_choice is forced by vLLM's guided decoding (its JSON form, not the GLM one); "
              "tool_choice=\"none\" returns the call as text", flush=True)

        prompts = PROMPTS + ["北京", "晴", "hello world"]
        ask = lambda prompt: client.chat.completions.create(  # noqa: E731
            messages=[{"role": "user", "content": prompt}], model=name, temperature=0, max_tokens=24
        ).choices[0].message.content
        alone = [ask(prompt) for prompt in prompts]
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(ask, prompts))
        assert together == alone, (alone, together)
        print("PASS 8 concurrent requests each return what they return alone", flush=True)
    finally:
        server.terminate()
        server.wait(60)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--only", choices=["prepare", "offline", "plugin", "server"])
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.only == "prepare":
        return prepare(args.workdir)
    if args.only in (None, "offline"):
        check_offline(args.workdir)
    if args.only in (None, "plugin"):
        check_plugin(args.workdir)
    if args.only in (None, "server"):
        check_server(args.workdir)


if __name__ == "__main__":
    main()
