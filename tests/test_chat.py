"""The chat API (chat_glm.py, chat.py): chat/stream_chat, tool calls, the standard transformers ways, quantize."""

import copy
import json
import os
import subprocess
import sys
import threading

import pytest
import torch
from conftest import ROOT, glm, tiny_config

chat_glm = sys.modules["glm_hf.chat_glm"]
parse_tool_call = chat_glm.parse_tool_call
process_response = chat_glm.process_response


# ---------------------------------------------------------------------------------------------------------------
# Tool-call parsing (GLM_SPEC section 5)

TOOLS = [{"name": "get_weather", "description": "天气", "parameters": {"type": "object",
          "properties": {"city": {"type": "string"}}, "required": ["city"]}}]


@pytest.mark.parametrize(
    "text, parameters",
    [
        ('```python\ntool_call(city="北京", days=3)\n```', {"city": "北京", "days": 3}),
        ("```python\ntool_call(x=-1.5, flags=[True, None], opts={'a': (1, 2)})\n```",
         {"x": -1.5, "flags": [True, None], "opts": {"a": (1, 2)}}),
        ("tool_call()", {}),
        ('```python\ntool_call(symbol="10111")', {"symbol": "10111"}),  # closing fence cut off
        ('{"city": "北京", "days": [1, 2]}', {"city": "北京", "days": [1, 2]}),  # GLM-4: JSON arguments
        ('```json\n{"city": "Paris"}\n```', {"city": "Paris"}),
    ],
)
def test_tool_call_parses_literals_and_json(text, parameters):
    assert parse_tool_call(" get_weather ", text) == {"name": "get_weather", "parameters": parameters}


PWNED = "/tmp/glm_chat_test_pwned"

HOSTILE = [
    f"```python\ntool_call(x=__import__('os').system('touch {PWNED}'))\n```",
    f"tool_call(x=open('{PWNED}', 'w'))",
    "tool_call(x=().__class__.__bases__[0].__subclasses__())",
    "tool_call(x=a)",
    "tool_call(x=1 if True else 2)",
    "tool_call(x=[i for i in range(10)])",
    "tool_call(x=lambda: 1)",
    "tool_call(x=9**9**9)",
    "tool_call(**{'x': 1})",
    "tool_call(1, 2)",
    "tool_call(x=1, x=2)",
    f"__import__('os').system('touch {PWNED}')",
    "eval('1')",
    "tool_call(x=1); import os",
    "tool_call(x=1",
    "tool_call(x=" + "[" * 100000 + "]" * 100000 + ")",
    '{"city": ',
    "[1, 2]",
    "",
    "some plain words",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_tool_call_rejects_hostile_and_malformed_without_running_them(text):
    if os.path.exists(PWNED):
        os.remove(PWNED)
    result = parse_tool_call("get_weather", text)
    assert not os.path.exists(PWNED)
    assert result["name"] == "get_weather" and result["parameters"] is None
    assert result["content"] == text  # the reply is kept
    assert isinstance(result["error"], str) and result["error"]


def test_process_response_tool_call_channel_and_text():
    system = {"role": "system", "content": "可用工具", "tools": TOOLS}
    history = [system, {"role": "user", "content": "北京天气"}]
    reply = 'get_weather\n```python\ntool_call(city="北京")\n```'
    response, new_history = process_response(reply, history)
    assert response == {"name": "get_weather", "parameters": {"city": "北京"}}
    assert new_history[:2] == history and len(history) == 2  # a new list; the caller's is untouched
    assert new_history[2] == {"role": "assistant", "metadata": "get_weather",
                              "content": '```python\ntool_call(city="北京")\n```'}

    bad, _ = process_response("get_weather\n```python\ntool_call(city=北京)\n```", history)
    assert bad["parameters"] is None and "city" in bad["error"]

    # Without tools a first line is another channel: kept as metadata, the reply is text.
    response, new_history = process_response("interpreter\n```python\nprint(1)\n```", history[1:])
    assert response == "```python\nprint(1)\n```"
    assert new_history[-1]["metadata"] == "interpreter"

    response, new_history = process_response(["\n 先算一下", "interpreter\nprint(2)"], history[1:])
    assert response == "print(2)"
    assert [m["content"] for m in new_history[1:]] == ["先算一下", "print(2)"]

    response, new_history = process_response("\n 你好 ", [])
    assert (response, new_history) == ("你好", [{"role": "assistant", "metadata": "", "content": "你好"}])


# ---------------------------------------------------------------------------------------------------------------
# quantize(): memory of the block matrices and agreement with full precision on a trained small model

VOCAB = 128


def _markov_batch(successors, rows, length, generator):
    """Sequences of a low-entropy Markov chain: each token has three successors, taken with p .5/.3/.2."""
    tokens = torch.empty(rows, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(3, VOCAB, (rows,), generator=generator)
    choice = torch.multinomial(torch.tensor([0.5, 0.3, 0.2]), rows * length, replacement=True,
                               generator=generator).view(rows, length)
    for t in range(1, length):
        tokens[:, t] = successors[tokens[:, t - 1], choice[:, t]]
    return tokens


@pytest.fixture(scope="module")
def trained_model():
    """A small GLM trained until it predicts the chain well (its logits have real margins, unlike random
    weights); returned with held-out sequences."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    successors = torch.randint(3, VOCAB, (VOCAB, 3), generator=generator)
    config = tiny_config(hidden_size=128, ffn_hidden_size=256, kv_channels=16, padded_vocab_size=VOCAB)
    model = glm.ChatGLMForConditionalGeneration(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        batch = _markov_batch(successors, 8, 48, generator)
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 1.6  # the chain's entropy is 1.03 nats; untrained is ln(128) = 4.85
    return model.eval(), _markov_batch(successors, 8, 48, generator)


def _bytes(tensor) -> int:
    """Storage of a weight, summing the inner tensors of a torchao quantized tensor."""
    names = getattr(tensor, "tensor_data_names", None)
    if names:
        return sum(_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def _matrix_bytes(model):
    blocks = sum(_bytes(module.weight) for name, module in model.named_modules()
                 if name.endswith(chat_glm.QUANTIZED_MATRICES))
    others = _bytes(model.transformer.output_layer.weight) + _bytes(model.transformer.embedding.word_embeddings.weight)
    return blocks, others


# (bits, dtype) -> least memory factor of the block matrices; scales and zero points cost the rest.
QUANTIZE_CASES = [(8, torch.float32, 3.8), (4, torch.float32, 7.0), (8, torch.bfloat16, 1.9), (4, torch.bfloat16, 3.7)]


@pytest.mark.parametrize("bits, dtype, factor", QUANTIZE_CASES)
def test_quantize_cuts_block_memory_and_keeps_greedy_outputs(trained_model, bits, dtype, factor):
    pytest.importorskip("torchao")
    model, held_out = trained_model
    full = copy.deepcopy(model).to(dtype)
    quantized = copy.deepcopy(full).quantize(bits)
    assert quantized.config.quantization_bit == bits

    full_blocks, full_others = _matrix_bytes(full)
    blocks, others = _matrix_bytes(quantized)
    assert full_blocks / blocks >= factor
    assert others == full_others  # embeddings and output layer untouched
    assert type(quantized.transformer.output_layer.weight) is torch.nn.Parameter

    with torch.no_grad():
        reference = full(held_out).logits.float()
        logits = quantized(held_out).logits.float()
    agreement = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    max_diff = (logits - reference).abs().max().item()
    assert agreement >= (0.99 if bits == 8 else 0.95), agreement
    assert max_diff <= (0.15 if bits == 8 else 1.0), max_diff

    # Greedy decoding: at each step of the quantized model's own continuation, full precision picks the same token.
    prompts = held_out[:, :8]
    ids = quantized.generate(prompts, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        full_choice = full(ids).logits[:, prompts.shape[1] - 1:-1].argmax(-1)
    greedy_agreement = (full_choice == ids[:, prompts.shape[1]:]).float().mean().item()
    assert greedy_agreement >= (0.99 if bits == 8 else 0.95), greedy_agreement


def test_quantize_rejects_other_bit_widths():
    model = glm.ChatGLMForConditionalGeneration(tiny_config())
    with pytest.raises(ValueError, match="4 or 8"):
        model.quantize(3)
