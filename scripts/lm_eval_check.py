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
is not. In the two right settings it also runs lm-eval's `generate_until` (generation tasks) and compares the
replies with our greedy generate() cut at the same stop strings.
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
        if meant_right:
            failures += not generate_until(lm, tokenizer, model, mode, model_args)
    sys.exit(1 if failures else 0)


def generate_until(lm, tokenizer, model, mode, model_args, until=("\n\n",), max_gen_toks=24):
    """lm-eval's generate_until (generation tasks such as GSM8K: greedy, cut at the task's stop strings and eos) in
    a setting whose prompts are right, against our greedy generate() from the same ids, decoded and cut the same
    way (left-padded batches there, one row at a time here). Prints one line; True when all replies are equal."""
    from lm_eval.api.instance import Instance

    requests, expected = [], []
    for i, (context, _) in enumerate(PAIRS):
        if mode == "chat":
            ids = tokenizer.build_chat_input(context)["input_ids"]
            context = lm.apply_chat_template([{"role": "user", "content": context}])
        else:
            ids = torch.tensor([tokenizer.encode(context)])
        gen_kwargs = {"until": list(until), "max_gen_toks": max_gen_toks, "do_sample": False}
        requests.append(Instance("generate_until", {}, (context, gen_kwargs), i))
        with torch.no_grad():
            new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_gen_toks,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]
        text = tokenizer.decode(new, skip_special_tokens=True)
        for stop in (*until, tokenizer.decode([tokenizer.eos_token_id], skip_special_tokens=False)):
            text = text.split(stop)[0]
        expected.append(text)
    replies = lm.generate_until(requests)
    right = replies == expected
    print(f"{'OK ' if right else 'DIFF'} generate_until {mode} {model_args or 'defaults'}: lm-eval {replies}, "
          f"ours {expected}", flush=True)
    return right


if __name__ == "__main__":
    main()
