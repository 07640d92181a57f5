"""The vLLM checks of docs/serving.md, run in vLLM's own environment (scripts/install_vllm.sh) by
`bash scripts/vllm_check.sh`, not by pytest (vLLM pins transformers <5.20, older than the test environment's):

1. greedy tokens of vLLM's offline `LLM` equal ours (generate() with our code) on 5 prompts, on our folder and on its
   `convert_glm.py --to native` conversion;
2. the OpenAI server that scripts/serve.sh starts (vLLM, `--tool-call-parser hf` reading our response_template)
   answers through the openai client: content without the format's "\\n", a tool call as typed tool_calls with
   finish_reason "tool_calls", streamed too, and the turn after the tool result; it stops at the family's stop ids
   without the client passing any;
3. 8 concurrent requests each return what they return alone.

Each check prints PASS or raises; the exit status is 0 only when all passed.
    python tests/vllm_check.py WORKDIR --only prepare          # in the test environment: folders, our tokens
    python tests/vllm_check.py WORKDIR [--only offline|server]  # in vLLM's environment
"""

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_helpers import (ANSWER, ASK, CALL, GREETING, HELLO, OPENAI_TOOLS, RESULT,  # noqa: E402
                             start_serve, train_served_model)

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

    model, tokenizer = train_served_model(work / "glm-tiny", head_dim=32)
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
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == CALL, call
        print(f"PASS tool call: {call.function.name}({call.function.arguments}), finish_reason tool_calls",
              flush=True)
        stream = client.chat.completions.create(messages=messages, tools=OPENAI_TOOLS, stream=True, **greedy)
        calls = [tc for c in stream if c.choices for tc in c.choices[0].delta.tool_calls or []]
        assert [json.loads(tc.function.arguments) for tc in calls] == [CALL], calls
        print("PASS streamed tool call", flush=True)
        messages += [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": RESULT}]
        follow = client.chat.completions.create(messages=messages, tools=OPENAI_TOOLS, **greedy)
        assert follow.choices[0].message.content == ANSWER, follow
        print("PASS the turn after the tool result", flush=True)

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
    parser.add_argument("--only", choices=["prepare", "offline", "server"])
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.only == "prepare":
        return prepare(args.workdir)
    if args.only != "server":
        check_offline(args.workdir)
    if args.only != "offline":
        check_server(args.workdir)


if __name__ == "__main__":
    main()
