"""The main job's own check: held-out exact match of greedy replies from the saved folder (loaded back through
AutoModelForCausalLM, as a user would), then a short chat through AutoModel."""

from pathlib import Path

from .data import builtin


def heldout_prompts(tokenizer, heldout):
    """(prompt ids, expected reply ids without the stop token) for each held-out conversation."""
    pairs = []
    for row in heldout:
        encoded = tokenizer.tokenize_conversation(row["conversations"])
        ids, labels = encoded["input_ids"], encoded["labels"]
        start = next(i for i, label in enumerate(labels) if label != -100)
        end = start
        while end < len(labels) and labels[end] != -100:
            end += 1
        # The label after a reply is the stop token; a held-out conversation ends at the reply, so it is </s> even
        # where the model rightly stops a tool call with <|observation|>: any stop token counts.
        pairs.append((ids[:start], ids[start:end - 1]))
    return pairs


def generate_replies(model, tokenizer, prompts, max_new_tokens, batch_size=64):
    """Greedy continuations of left-padded prompts, each cut after its first stop token."""
    import torch

    stop = set(tokenizer.stop_token_ids)
    pad = tokenizer.pad_token_id
    replies = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        width = max(len(p) for p in chunk)
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=list(stop), pad_token_id=pad)
        for row in out[:, width:].tolist():
            reply = []
            for token in row:
                reply.append(token)
                if token in stop:
                    break
            replies.append(reply)
    return replies


def report_skills(output_dir: Path, heldout) -> float:
    """Held-out exact match of greedy replies from the saved folder; then a short chat through AutoModel."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(output_dir, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(output_dir, trust_remote_code=True).eval()
    pairs = heldout_prompts(tokenizer, heldout)
    replies = generate_replies(model, tokenizer, [p for p, _ in pairs], max(len(e) for _, e in pairs) + 3)
    stop = set(tokenizer.stop_token_ids)
    replies = [reply[:-1] if reply and reply[-1] in stop else reply + [None] for reply in replies]  # unstopped: wrong
    by_kind = {}
    for row, (_, expected), reply in zip(heldout, pairs, replies):
        by_kind.setdefault(row["kind"], []).append(reply == expected)
    correct = sum(sum(v) for v in by_kind.values())
    accuracy = correct / len(heldout)
    details = ", ".join(f"{kind} {sum(v)}/{len(v)}" for kind, v in sorted(by_kind.items()))
    print(f"held-out exact match: {accuracy:.1%} ({details})")
    # Reply and expectation decoded alike (a tool call's metadata line included).
    misses = [(row, tokenizer.decode([t for t in reply if t is not None]), tokenizer.decode(expected))
              for row, (_, expected), reply in zip(heldout, pairs, replies) if reply != expected]
    for row, text, expected in misses[:3]:
        print(f"  miss: {row['conversations'][-2]['content']!r} -> {text!r} (expected {expected!r})")

    chat_model = AutoModel.from_pretrained(output_dir, trust_remote_code=True).eval()
    for query in ("What is 23 plus 58?", "41+17等于多少？"):
        print(f"chat> {query}\n  {chat_reply(chat_model, tokenizer, query)}")
    tools_history = [{"role": "system", "content": builtin.SYSTEM_PROMPT, "tools": [builtin.WEATHER_TOOL]}]
    print(f"chat> 杭州今天天气如何？ (with the weather tool)\n  "
          f"{chat_reply(chat_model, tokenizer, '杭州今天天气如何？', tools_history)}")
    return accuracy, details


def chat_reply(model, tokenizer, query, history=None):
    """model.chat when the chat API is present (chat_glm.py), else the prompt and a greedy generate."""
    if hasattr(model, "chat"):
        try:
            response, _ = model.chat(tokenizer, query, history=list(history or []), do_sample=False,
                                     max_new_tokens=64)
            return response
        except Exception as error:  # say so, then answer through the plain prompt below
            print(f"  (model.chat failed: {type(error).__name__}: {error}; using build_chat_input + generate)")
    inputs = tokenizer.build_chat_input(query, history=history or [], role="user")
    prompt = inputs["input_ids"][0].tolist()
    reply = generate_replies(model, tokenizer, [prompt], 64)[0]
    if reply and reply[-1] in set(tokenizer.stop_token_ids):
        reply = reply[:-1]
    return tokenizer.decode(reply)
