"""A tiny GLM that answers like a served model, shared by tests/test_serving.py (transformers serve, in the test
environment) and tests/vllm_check.py (vLLM, in its own environment): no pytest, only the repository's code."""

import json
import sys
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
    import torch

    corpus = [ASK, RESULT, ANSWER, HELLO, GREETING, json.dumps(OPENAI_TOOLS, indent=4, ensure_ascii=False),
              tg.format_tool_call("get_weather", CALL)[1]]
    tokenizer = tg.train_glm_tokenizer(corpus * 20, vocab_size=400)
    rows = [tokenizer.tokenize_conversation(messages, tools=tools) for messages, tools in served_conversations()]
    config = glm.ChatGLMConfig(num_layers=2, hidden_size=8 * head_dim, num_attention_heads=8, multi_query_group_num=2,
                               kv_channels=head_dim, ffn_hidden_size=96, padded_vocab_size=416, seq_length=512,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = glm.ChatGLMForConditionalGeneration(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = sum(model(torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]])).loss for row in rows)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if loss.item() < 0.02:
            break
    model.generation_config.eos_token_id = tokenizer.stop_token_ids
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer
