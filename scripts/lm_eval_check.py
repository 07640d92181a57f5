"""What lm-eval's HF backend scores on a model folder, against our model scored directly.

lm-eval (`lm_eval.models.huggingface.HFLM`, the `--model hf` of its CLI) loads the folder with trust_remote_code and
computes log P(continuation | context) for loglikelihood and multiple-choice tasks. This script runs its public
`loglikelihood` on a few (context, continuation) pairs, plain and through `apply_chat_template` (its
`--apply_chat_template` flag), with and without `add_bos_token=False`, and compares each with our model's log
probabilities for the ids the original API gives: `tokenizer.encode(context)` ([gMASK] sop + text) for plain
prompts, `build_chat_input` for chat prompts.

    pip install lm-eval==0.4.13        # in requirements-test.txt
    python scripts/lm_eval_check.py output/glm-skills

Measured with lm-eval 0.4.13 (docs/engines.md): plain prompts are scored right with lm-eval's defaults; with
--apply_chat_template they are right only with `add_bos_token=False` in model_args (by default lm-eval's encode
adds our [gMASK] sop prefix to a text that already starts with it). Exits non-zero when a setting meant to be right
is not.
"""

import argparse
import sys

import torch

PAIRS = [("Question: 12 + 30 = ?\nAnswer:", " 42"), ("北京今天天气怎么样？", "晴"), ("你好", "！")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    args = parser.parse_args(argv)
    try:
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM
    except ImportError as error:
        sys.exit(f"cannot import lm_eval ({error}): pip install lm-eval==0.4.13")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(args.folder, trust_remote_code=True, dtype=torch.float32).eval()

    def ours(context_ids, continuation_ids):
        with torch.no_grad():
            logp = model(torch.tensor([context_ids + continuation_ids])).logits[0].log_softmax(-1)
        return sum(logp[len(context_ids) - 1 + i, t].item() for i, t in enumerate(continuation_ids))

    def continuation(text, prefix_text, **kwargs):  # the continuation's ids as lm-eval splits them
        return tokenizer.encode(prefix_text + text, **kwargs)[len(tokenizer.encode(prefix_text, **kwargs)):]

    failures = 0
    for mode, model_args, meant_right in (("plain", {}, True), ("plain", {"add_bos_token": False}, False),
                                          ("chat", {}, False), ("chat", {"add_bos_token": False}, True)):
        lm = HFLM(pretrained=args.folder, trust_remote_code=True, dtype="float32", device="cpu", batch_size=2,
                  **model_args)
        requests, expected = [], []
        for i, (context, answer) in enumerate(PAIRS):
            if mode == "chat":
                context = lm.apply_chat_template([{"role": "user", "content": context}])
                ids = tokenizer.build_chat_input(PAIRS[i][0])["input_ids"][0].tolist()
                cont = continuation(answer, context, add_special_tokens=False)
            else:
                ids, cont = tokenizer.encode(context), continuation(answer, context)
            requests.append(Instance("loglikelihood", {}, (context, answer), i))
            expected.append(ours(ids, cont))
        scores = [score for score, _ in lm.loglikelihood(requests)]
        right = all(abs(a - b) < 1e-4 for a, b in zip(scores, expected))
        failures += meant_right and not right
        print(f"{'OK ' if right == meant_right else 'DIFF'} {mode} {model_args or 'defaults'}: lm-eval "
              f"{[round(s, 4) for s in scores]}, ours {[round(s, 4) for s in expected]} "
              f"({'equal' if right else 'not equal'}; meant to be {'equal' if meant_right else 'off'})", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
