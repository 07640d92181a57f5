"""Run a model folder in llama.cpp (through llama-cpp-python) and compare with our code: prompt ids and greedy tokens.

llama-cpp-python builds llama.cpp from source (about 7 minutes on 2 cores the first time). Use
scripts/engines_check.sh, which installs it once into ~/.cache/glm-hf-engines and runs this file:

    bash scripts/engines_check.sh output/glm-skills

Exits non-zero when an id differs. tests/test_engines.py runs it on each folder kind (CI installs the engine).
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import engine_converters  # noqa: E402

PROMPTS = ["你好", "What is 12 + 30?", "北京今天天气怎么样？"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--new_tokens", type=int, default=20)
    args = parser.parse_args()
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(args.folder, trust_remote_code=True, dtype=torch.float32).eval()
    with tempfile.TemporaryDirectory() as tmp:
        gguf = Path(tmp) / "model.gguf"
        subprocess.run([sys.executable, str(engine_converters.llama_cpp_converter()), args.folder, "--outfile",
                        str(gguf), "--outtype", "f32"], check=True, input="y\n" * 4, text=True)
        llm = Llama(str(gguf), n_ctx=512, logits_all=False, verbose=False, type_k=0, type_v=0)  # f32 KV cache
        failures, prefix = 0, tokenizer.get_prefix_tokens()
        for query in PROMPTS:
            for kind, ours, text in (
                ("plain", tokenizer.encode(query), "".join(tokenizer.convert_ids_to_tokens(prefix)) + query),
                ("chat", tokenizer.build_chat_input(query)["input_ids"][0].tolist(),
                 tokenizer.apply_chat_template([{"role": "user", "content": query}], tokenize=False,
                                               add_generation_prompt=True)),
            ):
                theirs = llm.tokenize(text.encode(), add_bos=True, special=True)
                with torch.no_grad():
                    out = model.generate(torch.tensor([ours]), max_new_tokens=args.new_tokens, do_sample=False,
                                         eos_token_id=tokenizer.stop_token_ids)[0, len(ours):].tolist()
                llm.reset()
                generated = []
                for token in llm.generate(theirs, top_k=1, temp=0.0, reset=True):
                    if token in tokenizer.stop_token_ids or len(generated) == args.new_tokens:
                        break
                    generated.append(token)
                out = [t for t in out if t not in tokenizer.stop_token_ids][: len(generated) or None]
                same = theirs == ours and generated == out
                failures += not same
                print(f"{'OK ' if same else 'DIFF'} {kind} {query!r}: ids {theirs == ours}, greedy {generated == out}")
        sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
