"""The chat API (chat_glm.py, chat.py): chat/stream_chat, tool calls, the standard transformers ways, quantize."""

import base64
import copy
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from benchmarks.bench_quantize import agreement, trained_small_model, weight_bytes
from conftest import ROOT, glm, import_extra, tiny_config, train_to_replay
from transformers import (AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList,
                          TextIteratorStreamer, pipeline)

quantization_glm = sys.modules["glm_hf.quantization_glm"]
replies = sys.modules["glm_hf.tool_parser_glm"]
parse_tool_call = replies.parse_tool_call
process_response = replies.process_response


# ---------------------------------------------------------------------------------------------------------------
# Tool-call parsing (docs/architecture.md section 5)

TOOLS = [{"name": "get_weather", "description": "天气", "parameters": {"type": "object",
          "properties": {"city": {"type": "string"}}, "required": ["city"]}}]


@pytest.mark.parametrize(
    "text, parameters",
    [
        ('```python\ntool_call(city="北京", days=3)\n```', {"city": "北京", "days": 3}),
        ("```python\ntool_call(x=-1.5, flags=[True, None], opts={'a': (1, 2)})\n```",
         {"x": -1.5, "flags": [True, None], "opts": {"a": [1, 2]}}),  # a tuple is a JSON array
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

    # Without tools a first line is another channel: kept as metadata, with the text as content.
    response, new_history = process_response("interpreter\n```python\nprint(1)\n```", history[1:])
    assert response == {"name": "interpreter", "content": "```python\nprint(1)\n```"}
    assert new_history[-1]["metadata"] == "interpreter"

    response, new_history = process_response(["\n先算一下", "interpreter\nprint(2)"], history[1:])
    assert response == {"name": "interpreter", "content": "print(2)"}
    assert [m["content"] for m in new_history[1:]] == ["先算一下", "print(2)"]

    response, new_history = process_response("\n你好", [])
    assert (response, new_history) == ("你好", [{"role": "assistant", "metadata": "", "content": "你好"}])
    response, new_history = process_response("\n 你好 \n", [])  # stripped, as the original's process_response
    assert (response, new_history) == ("你好", [{"role": "assistant", "metadata": "", "content": "你好"}])


# ---------------------------------------------------------------------------------------------------------------
# quantize(): memory of the block matrices and agreement with full precision on a trained small model

@pytest.fixture(scope="module")
def trained_model():
    """The benchmark's small GLM trained on a low-entropy Markov chain (its logits have real margins, unlike
    random weights), with held-out sequences."""
    model, held_out = trained_small_model(60, held_out_rows=8)
    with torch.no_grad():
        loss = model(held_out, labels=held_out).loss.item()
    assert loss < 1.6  # the chain's entropy is 1.03 nats; untrained is ln(128) = 4.85
    return model, held_out


def _matrix_bytes(model):
    blocks = sum(weight_bytes(module.weight) for name, module in model.named_modules()
                 if name.endswith(quantization_glm.QUANTIZED_MATRICES))
    others = (weight_bytes(model.transformer.output_layer.weight)
              + weight_bytes(model.transformer.embedding.word_embeddings.weight))
    return blocks, others


# (bits, dtype) -> least memory factor of the block matrices; scales and zero points cost the rest.
QUANTIZE_CASES = [(8, torch.float32, 3.8), (4, torch.float32, 7.0), (8, torch.bfloat16, 1.9), (4, torch.bfloat16, 3.7)]


@pytest.mark.parametrize("bits, dtype, factor", QUANTIZE_CASES)
def test_quantize_cuts_block_memory_and_keeps_greedy_outputs(trained_model, bits, dtype, factor):
    import_extra("torchao")
    model, held_out = trained_model
    full = copy.deepcopy(model).to(dtype)
    quantized = copy.deepcopy(full).quantize(bits)
    assert quantized.config.quantization_bit == bits

    full_blocks, full_others = _matrix_bytes(full)
    blocks, others = _matrix_bytes(quantized)
    assert full_blocks / blocks >= factor
    assert others == full_others  # embeddings and output layer untouched
    assert type(quantized.transformer.output_layer.weight) is torch.nn.Parameter

    # Logits on held-out sequences, and greedy decoding: at each step of the quantized model's own continuation,
    # full precision picks the same token.
    top1, max_diff, _, greedy = agreement(full, quantized, held_out)
    assert top1 >= (0.99 if bits == 8 else 0.95), top1
    assert max_diff <= (0.15 if bits == 8 else 1.0), max_diff
    assert greedy >= (0.99 if bits == 8 else 0.95), greedy


def test_quantize_rejects_other_bit_widths():
    model = glm.ChatGLMForConditionalGeneration(tiny_config())
    with pytest.raises(ValueError, match="4 or 8"):
        model.quantize(3)


# ---------------------------------------------------------------------------------------------------------------
# chat / stream_chat on a tiny model and a tiny trained tokenizer

CORPUS = ["hello world, the quick brown fox jumps over the lazy dog", "你好，世界！今天天气很好。",
          "get_weather tool_call(city='北京') interpreter print"]
# Not in the corpus, so they encode as byte-fallback pieces: a 4-byte emoji and a 4-byte CJK Extension B character.
RARE = "😀𠀋"


def glm4_tokenizer(folder):
    """A GLM-4-style tokenizer (byte-level BPE from a tiktoken ranks file, no dummy prefix) on a tiny vocabulary:
    the 256 bytes and a few words."""
    words = ["你好", " fox", " the", "get", "_weather", "北京", "天气"]
    ranks = [bytes([byte]) for byte in range(256)] + [word.encode() for word in words]
    path = folder / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(token).decode()} {rank}\n" for rank, token in enumerate(ranks)))
    return glm.ChatGLMTokenizer(vocab_file=str(path))


@pytest.fixture(scope="module", params=["chatglm3", "glm4"])
def tokenizer(request, tmp_path_factory):
    if request.param == "glm4":
        return glm4_tokenizer(tmp_path_factory.mktemp("glm4_tokenizer"))
    return glm.tokenization.train_glm_tokenizer(CORPUS * 20, vocab_size=400)


def tool_call_text(tokenizer, parameters):
    """The content a model of this family writes for a tool call: ChatGLM3's tool_call(...), GLM-4's JSON."""
    return glm.tokenization.format_tool_call("get_weather", parameters, glm4=tokenizer.is_glm4)[1]


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return glm.ChatGLMForConditionalGeneration(tiny_config(padded_vocab_size=416)).eval()


class ForceTokens(LogitsProcessor):
    """Makes generate() emit `ids` after the prompt, then repeat the last one."""

    def __init__(self, ids):
        self.ids, self.start = list(ids), None

    def __call__(self, input_ids, scores):
        self.start = input_ids.shape[1] if self.start is None else self.start
        forced = self.ids[min(input_ids.shape[1] - self.start, len(self.ids) - 1)]
        return torch.full_like(scores, float("-inf")).index_fill_(-1, torch.tensor([forced]), 0.0)


def reply_ids(tokenizer, content, metadata=""):
    """The ids the model writes for an assistant message (what follows its <|assistant|>)."""
    return tokenizer.build_single_message("assistant", metadata, content)[1:]


def forced(tokenizer, content, metadata="", stop="<|user|>", then=()):
    ids = reply_ids(tokenizer, content, metadata) + [tokenizer.get_command(stop)] + list(then)
    return dict(logits_processor=LogitsProcessorList([ForceTokens(ids)]), max_new_tokens=len(ids))


@pytest.mark.parametrize("stop", ["<eos>", "<|user|>", "<|observation|>"])
def test_chat_stops_at_every_stop_token_and_returns_history(tokenizer, model, stop):
    assert tokenizer.get_command(stop) in tokenizer.stop_token_ids
    junk = tokenizer.encode("lazy dog", add_special_tokens=False)
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "metadata": "", "content": "hello"}]
    response, new_history = model.chat(tokenizer, "你好", history, **forced(tokenizer, "你好" + RARE, stop=stop,
                                                                           then=junk))
    assert response == "你好" + RARE
    assert history == [{"role": "user", "content": "hi"}, {"role": "assistant", "metadata": "", "content": "hello"}]
    assert new_history == history + [{"role": "user", "content": "你好"},
                                      {"role": "assistant", "metadata": "", "content": "你好" + RARE}]


def test_chat_length_defaults_to_the_model_context(tokenizer, model):
    # Without max_length or max_new_tokens, prompt + reply stop at config.seq_length (256), not at 8192.
    never_stops = tokenizer.encode(" fox", add_special_tokens=False)
    prompt = tokenizer.build_chat_input("你好")["input_ids"].shape[1]
    steps = []
    model.chat(tokenizer, "你好", do_sample=False, logits_processor=LogitsProcessorList([_Force(never_stops, steps)]))
    assert len(steps) == model.config.seq_length - prompt
    for chat in (model.chat, lambda *a, **k: list(model.stream_chat(*a, **k))):
        steps.clear()
        with pytest.raises(ValueError, match=r"prompt \(query and history\) is \d+ tokens.*max_length=256 \(the "
                                             r"model context, seq_length\)"):
            chat(tokenizer, "fox " * 300, do_sample=False, logits_processor=LogitsProcessorList([_Force([5], steps)]))
        assert not steps  # refused before generating
    # max_new_tokens past the context: generated, with a warning.
    with pytest.warns(UserWarning, match=r"the prompt is \d+ tokens, longer than the model's context"):
        model.chat(tokenizer, "fox " * 300, do_sample=False, max_new_tokens=2)


@pytest.mark.parametrize("text, code", [("a\ud800b", "U+D800"), ("\udfff", "U+DFFF")])
def test_chat_refuses_lone_surrogates_naming_them(tokenizer, model, text, code):
    with pytest.raises(ValueError, match=re.escape(f"message 0: content holds a lone surrogate {code}")):
        model.chat(tokenizer, text, do_sample=False, max_new_tokens=2)
    with pytest.raises(ValueError, match=re.escape(f"message 0: content holds a lone surrogate {code}")):
        next(model.stream_chat(tokenizer, "hi", [{"role": "user", "content": text}], max_new_tokens=2))
    with pytest.raises(ValueError, match=re.escape(f"text holds a lone surrogate {code}")):
        tokenizer(text)


def test_stream_chat_grows_in_whole_characters(tokenizer, model):
    text = "你好" + RARE + " fox" + RARE
    ids = reply_ids(tokenizer, text)
    # The rare characters arrive as single bytes (ChatGLM3's <0xNN> pieces at ids 3..258, GLM-4's byte tokens).
    single_bytes = range(256) if tokenizer.is_glm4 else range(3, 259)
    assert sum(i in single_bytes for i in ids) >= 16
    items = list(model.stream_chat(tokenizer, "hi", [], **forced(tokenizer, text)))
    responses = [response for response, _ in items]
    assert len(responses) > 5 and responses[-1] == text
    assert not any("\ufffd" in response for response in responses)
    assert all(b.startswith(a) for a, b in zip(responses, responses[1:]))
    assert items[-1][1] == [{"role": "user", "content": "hi"}, {"role": "assistant", "metadata": "", "content": text}]
    assert model.chat(tokenizer, "hi", [], **forced(tokenizer, text)) == items[-1]


def test_tool_call_observation_and_channel(tokenizer, model):
    system = {"role": "system", "content": "Answer with tools:", "tools": TOOLS}
    call = tool_call_text(tokenizer, {"city": "北京"})
    response, history = model.chat(tokenizer, "北京天气", [system],
                                   **forced(tokenizer, call, metadata="get_weather", stop="<|observation|>"))
    assert response == {"name": "get_weather", "parameters": {"city": "北京"}}
    assert history[-1] == {"role": "assistant", "metadata": "get_weather", "content": call}

    # The tool's result goes back as an observation: the prompt is the first one, the call as the model wrote it,
    # then the observation message.
    observation = json.dumps({"weather": "晴"}, ensure_ascii=False)
    prompt = tokenizer.build_chat_input(observation, history, role="observation")["input_ids"][0].tolist()
    first = tokenizer.build_chat_input("北京天气", [system])["input_ids"][0].tolist()
    assert prompt == first + reply_ids(tokenizer, call, "get_weather") + tokenizer.build_single_message(
        "observation", "", observation) + [tokenizer.get_command("<|assistant|>")]
    response, history = model.chat(tokenizer, observation, history, role="observation",
                                   **forced(tokenizer, "北京今天晴"))
    assert response == "北京今天晴"
    assert [m["role"] for m in history] == ["system", "user", "assistant", "observation", "assistant"]

    # Hostile arguments: reported, not run; the reply text is kept.
    if os.path.exists(PWNED):
        os.remove(PWNED)
    evil = f"```python\ntool_call(x=__import__('os').system('touch {PWNED}'))\n```"
    response, history = model.chat(tokenizer, "北京天气", [system],
                                   **forced(tokenizer, evil, metadata="get_weather", stop="<|observation|>"))
    assert not os.path.exists(PWNED)
    assert response["parameters"] is None and "not a literal" in response["error"] and response["content"] == evil
    truncated = tool_call_text(tokenizer, {"city": "北京"})[:-5]
    response, history = model.chat(tokenizer, "北京天气", [system],
                                   **forced(tokenizer, truncated, metadata="get_weather", stop="<|observation|>"))
    assert response["parameters"] is None and response["error"] and response["content"] == truncated

    # Without tools, a first line is another channel (ChatGLM3's code interpreter).
    response, history = model.chat(tokenizer, "算一下", [], **forced(tokenizer, "print(1)", metadata="interpreter"))
    assert response == {"name": "interpreter", "content": "print(1)"}
    assert history[-1] == {"role": "assistant", "metadata": "interpreter", "content": "print(1)"}

    # Streaming a tool call: the channel form while it grows, the parsed call at the end.
    items = list(model.stream_chat(tokenizer, "北京天气", [system],
                                   **forced(tokenizer, call, metadata="get_weather", stop="<|observation|>")))
    assert items[-1][0] == {"name": "get_weather", "parameters": {"city": "北京"}}
    assert items[-2][0] == {"name": "get_weather", "content": call}


@pytest.mark.parametrize("stopped", [True, False], ids=["stop-token", "max-new-tokens"])
def test_stream_chat_cache_continuation_equals_reencoding(tokenizer, model, stopped):
    turn = forced(tokenizer, "你好" + RARE, stop="<|user|>")
    if not stopped:  # the reply ends on a plain token, which generate() never ran through the model
        turn["max_new_tokens"] -= 1
    *_, (response, history, past) = model.stream_chat(tokenizer, "hi", [], do_sample=False,
                                                      return_past_key_values=True, **turn)
    assert response == "你好" + RARE
    assert past.cache.get_seq_length() == past.token_ids.shape[1] - (0 if stopped else 1)

    greedy = dict(do_sample=False, max_new_tokens=10, return_past_key_values=True)
    *_, (cached_response, cached_history, cached) = model.stream_chat(tokenizer, "fox", history,
                                                                      past_key_values=past, **greedy)
    *_, (response, new_history, reencoded) = model.stream_chat(tokenizer, "fox", history, **greedy)
    assert torch.equal(cached.token_ids, reencoded.token_ids)  # prompt and reply tokens alike
    assert (cached_response, cached_history) == (response, new_history)
    assert cached.cache is past.cache  # continued in place


def test_stream_chat_stops_generation_when_abandoned(tokenizer, model):
    force = ForceTokens(reply_ids(tokenizer, "fox " * 100))
    steps = []
    counting = LogitsProcessorList([force, lambda input_ids, scores: steps.append(1) or scores])
    stream = model.stream_chat(tokenizer, "hi", [], do_sample=False, max_new_tokens=200, logits_processor=counting)
    next(stream)
    stream.close()  # sets the stopping criterion and joins the generate() thread
    assert len(steps) < 50  # 200 steps had it run on


def test_batch_generation_matches_single(tokenizer, model):
    conversations = [[{"role": "user", "content": "你好"}],
                     [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "fox"},
                      {"role": "user", "content": "the lazy dog jumps"}],
                     [{"role": "system", "content": "Answer with tools:", "tools": TOOLS},
                      {"role": "user", "content": "北京天气"}]]
    batch = tokenizer.apply_chat_template(conversations, add_generation_prompt=True, padding=True,
                                          return_tensors="pt", return_dict=True)
    assert batch["attention_mask"][:, 0].tolist().count(0) >= 1  # left padding
    greedy = dict(do_sample=False, max_new_tokens=8, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    together = model.generate(**batch, **greedy)[:, batch["input_ids"].shape[1]:]
    for row, conversation in enumerate(conversations):
        *history, last = conversation
        single = tokenizer.build_chat_input(last["content"], history)
        assert torch.equal(single["input_ids"][0], batch["input_ids"][row][batch["attention_mask"][row].bool()])
        alone = model.generate(**single, **greedy)[0, single["input_ids"].shape[1]:]
        assert torch.equal(alone, together[row])


# ---------------------------------------------------------------------------------------------------------------
# A saved folder: the standard transformers ways and chat.py

SMALL_TOOLS = [{"name": "get_weather", "parameters": {"city": "string"}}]
TOOL_CALL = "```python\ntool_call(city='北京')\n```"
TRAINED_CONVERSATIONS = [
    [{"role": "system", "content": "工具", "tools": SMALL_TOOLS}, {"role": "user", "content": "北京天气"},
     {"role": "assistant", "metadata": "get_weather", "content": TOOL_CALL},
     {"role": "observation", "content": '{"weather": "晴"}'}, {"role": "assistant", "content": "北京今天晴"}],
    [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好" + RARE}],
]


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    """A tiny model trained until greedy decoding replays TRAINED_CONVERSATIONS, saved with its tokenizer and code
    as a Hub-style folder."""
    corpus = CORPUS + [json.dumps(SMALL_TOOLS, indent=4), TOOL_CALL, '{"weather": "晴"}', "北京今天晴"]
    tokenizer = glm.tokenization.train_glm_tokenizer(corpus * 20, vocab_size=400)
    model = train_to_replay(TRAINED_CONVERSATIONS, tokenizer, tiny_config(padded_vocab_size=416), 150, 0.02)
    folder = tmp_path_factory.mktemp("chat_model")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_saved_folder_chats_like_its_training(chat_folder):
    tokenizer = AutoTokenizer.from_pretrained(chat_folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(chat_folder, trust_remote_code=True).eval()
    greedy = dict(do_sample=False, max_new_tokens=40)
    system = TRAINED_CONVERSATIONS[0][0]
    response, history = model.chat(tokenizer, "北京天气", [system], **greedy)
    assert response == {"name": "get_weather", "parameters": {"city": "北京"}}
    response, history = model.chat(tokenizer, '{"weather": "晴"}', history, role="observation", **greedy)
    assert response == "北京今天晴"
    assert history == TRAINED_CONVERSATIONS[0][:4] + [{"role": "assistant", "metadata": "", "content": "北京今天晴"}]
    assert model.chat(tokenizer, "你好", **greedy)[0] == "你好" + RARE


def test_chat_template_generate_and_text_iterator_streamer(chat_folder):
    tokenizer = AutoTokenizer.from_pretrained(chat_folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(chat_folder, trust_remote_code=True).eval()
    messages = [{"role": "user", "content": "你好"}]
    input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                              return_dict=False)
    assert input_ids.tolist() == tokenizer.build_chat_input("你好")["input_ids"].tolist()
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                  max_new_tokens=40, streamer=streamer)
    thread = threading.Thread(target=model.generate, kwargs=kwargs)
    thread.start()
    chunks = list(streamer)
    thread.join()
    # The reply is the metadata line ("") and the content; generation_config's eos ids stopped it.
    assert "".join(chunks).strip() == "你好" + RARE
    assert not any("\ufffd" in chunk for chunk in chunks)


def test_text_generation_pipeline_with_chat_messages(chat_folder):
    generator = pipeline("text-generation", model=str(chat_folder), trust_remote_code=True)
    messages = [{"role": "user", "content": "你好"}]
    output = generator(messages, do_sample=False, max_new_tokens=40)
    conversation = output[0]["generated_text"]
    assert conversation[:-1] == messages and conversation[-1]["role"] == "assistant"
    assert conversation[-1]["content"].strip() == "你好" + RARE


def test_chat_script_through_a_pipe(chat_folder, tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(SMALL_TOOLS), encoding="utf-8")
    lines = ["北京天气", '{"weather": "晴"}', "clear", "stop", "never read"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "chat.py"), str(chat_folder), "--greedy", "--tools", str(tools),
         "--system", "工具", "--max-length", "200"],
        input="\n".join(lines) + "\n", capture_output=True, text=True, encoding="utf-8", timeout=300,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "[tool call] get_weather({\"city\": \"北京\"})" in out
    assert "Observation: " in out and "GLM: 北京今天晴" in out
    assert "(new conversation)" in out
    assert out.index("[tool call]") < out.index("北京今天晴") < out.index("(new conversation)")


@pytest.mark.parametrize("content, error", [
    ('[{"name": "f",}]', r"tools\.json line 1 column 15: malformed JSON: Expecting property name"),
    ('{"name": "f"}', r"tools\.json: expected a JSON list of tool descriptions, got a dict"),
    ('"f"', r"tools\.json: expected a JSON list of tool descriptions, got a str"),
    ("[1, 2]", r"tools\.json: .*tools\[0\] must be a JSON object"),
])
def test_chat_script_checks_tools_before_loading_the_model(chat_folder, tmp_path, content, error):
    (tmp_path / "tools.json").write_text(content, encoding="utf-8")
    weights = chat_folder / "model.safetensors"
    moved = tmp_path / "weights-elsewhere"
    weights.rename(moved)  # the model cannot load: an error about it means the tools were checked too late
    try:
        result = subprocess.run([sys.executable, str(ROOT / "chat.py"), str(chat_folder), "--tools",
                                 str(tmp_path / "tools.json")], input="hi\n", capture_output=True, text=True,
                                timeout=300)
    finally:
        moved.rename(weights)
    assert result.returncode == 2
    assert "--tools" in result.stderr and re.search(error, result.stderr), result.stderr
    assert "Traceback" not in result.stderr


def test_chat_script_history_and_clear(chat_folder):
    lines = ["你好", "你好", "clear", "你好"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "chat.py"), str(chat_folder), "--greedy", "--max-length", "120"],
        input="\n".join(lines) + "\n", capture_output=True, text=True, encoding="utf-8", timeout=300,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    assert result.returncode == 0, result.stderr
    replies = [part.split("\n")[0] for part in result.stdout.split("GLM: ")[1:]]
    assert len(replies) == 3
    # After clear the conversation starts over: the same greedy reply as the first turn.
    assert replies[0] == replies[2] == "你好" + RARE


def test_remote_code_needs_only_torch_and_transformers():
    # transformers refuses to load remote code whose imports are missing; torchao is imported only by quantize().
    from transformers.dynamic_module_utils import get_imports

    third_party = set(get_imports(ROOT / "chat_glm.py")) - set(sys.stdlib_module_names)
    assert third_party == {"torch", "transformers"}
    for code in ("modeling_glm.py", "compat_glm.py", "quantization_glm.py"):
        assert set(get_imports(ROOT / code)) - set(sys.stdlib_module_names) <= {"torch", "transformers"}, code
    # the reply parser is also vLLM's plugin: the standard library only (vLLM itself is imported inside a function)
    assert set(get_imports(ROOT / "tool_parser_glm.py")) - set(sys.stdlib_module_names) == set()


@pytest.mark.parametrize("body, error", [
    ("tool_call(a={1, 2})", "set"), ("tool_call(a=b'x')", "bytes"), ("tool_call(a=1j)", "complex"),
    ("tool_call(a=...)", "ellipsis"), ("tool_call(a=[1, {2}])", "set"), ("tool_call(a={1: 2})", "non-string key"),
    ("tool_call(a=1e999)", "inf"), ('{"a": NaN}', "NaN"),
])
def test_tool_call_parameters_are_json_values_only(body, error):
    parsed = parse_tool_call("f", body)
    assert parsed["parameters"] is None and error in parsed["error"] and parsed["content"] == body


def test_tool_call_tuples_become_lists():
    parsed = parse_tool_call("f", "tool_call(a=(1, 'x'), b={'k': (None, True, 1.5)})")
    assert parsed["parameters"] == {"a": [1, "x"], "b": {"k": [None, True, 1.5]}}
    json.dumps(parsed["parameters"], allow_nan=False)  # serialisable as JSON


class _Force(LogitsProcessor):
    def __init__(self, ids, steps):
        self.ids, self.start, self.steps = list(ids), None, steps

    def __call__(self, input_ids, scores):
        self.steps.append(1)
        self.start = input_ids.shape[1] if self.start is None else self.start
        forced = self.ids[min(input_ids.shape[1] - self.start, len(self.ids) - 1)]
        return torch.full_like(scores, float("-inf")).index_fill_(-1, torch.tensor([forced]), 0.0)


def test_abandoned_stream_stops_while_still_referenced():
    tokenizer = glm.tokenization.train_glm_tokenizer(["the quick brown fox jumps"] * 50, vocab_size=300)
    torch.manual_seed(0)
    model = glm.ChatGLMForConditionalGeneration(tiny_config(padded_vocab_size=320)).eval()
    steps = []
    reply = tokenizer.build_single_message("assistant", "", "fox " * 100)[1:]
    stream = model.stream_chat(tokenizer, "hi", [], do_sample=False, max_new_tokens=200,
                               logits_processor=LogitsProcessorList([_Force(reply, steps)]))
    next(stream)  # the loop breaks here; `stream` stays referenced and is not closed
    seen, quiet_since, deadline = len(steps), time.time(), time.time() + 60
    while time.time() - quiet_since < 2 and time.time() < deadline:  # until generate() makes no progress for 2 s
        time.sleep(0.1)
        if len(steps) != seen:
            seen, quiet_since = len(steps), time.time()
    assert len(steps) < 15  # 200 if it ran on; the bounded queue lets it run at most a few steps ahead
    threads = threading.active_count()
    stream.close()  # ends generate() and its thread
    assert threading.active_count() == threads - 1


@pytest.mark.parametrize("bits", [8, 4])
def test_quantization_while_loading_equals_quantize(trained_model, bits, tmp_path):
    """transformers' TorchAoConfig with quantization_glm.torchao_config quantizes our remote-code model while it
    loads (full precision is never held whole): the same block matrices as model.quantize(bits) on a bf16 load, the
    same logits, the output layer and embeddings untouched."""
    import_extra("torchao")
    import convert_glm

    model, held_out = trained_model
    model.save_pretrained(tmp_path / "full")
    convert_glm.adopt_code(tmp_path / "full", tmp_path / "full")
    torch.save(held_out, tmp_path / "held_out.pt")
    # A fresh process with torchao importable from the start, as a user's: transformers decides at import time.
    script = textwrap.dedent(f"""
        import json, sys
        import torch
        from transformers import AutoModelForCausalLM, TorchAoConfig
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "benchmarks")!r}]
        from bench_quantize import weight_bytes
        from quantization_glm import torchao_config
        path, held_out = {str(tmp_path / "full")!r}, torch.load({str(tmp_path / "held_out.pt")!r})
        plain = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.bfloat16).eval()
        full = sum(weight_bytes(m.weight) for n, m in plain.named_modules() if "encoder.layers" in n and
                   isinstance(m, torch.nn.Linear))
        quantized = plain.quantize({bits})
        config = TorchAoConfig(torchao_config({bits}))
        loaded = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.bfloat16,
                                                      quantization_config=config).eval()
        def sizes(model):
            return [weight_bytes(m.weight) for n, m in model.named_modules() if hasattr(m, "weight")]
        with torch.no_grad():
            same = torch.equal(loaded(held_out).logits, quantized(held_out).logits)
        blocks = sum(weight_bytes(m.weight) for n, m in loaded.named_modules() if "encoder.layers" in n and
                     isinstance(m, torch.nn.Linear))
        print(json.dumps({{"same_logits": same, "same_sizes": sizes(loaded) == sizes(quantized),
                          "factor": full / blocks,
                          "output_layer": type(loaded.transformer.output_layer.weight).__name__}}))
    """)
    extras = os.environ.get("GLM_EXTRAS", "")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": extras, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.splitlines()[-1])
    assert figures["same_logits"] and figures["same_sizes"], figures
    assert figures["factor"] >= (1.9 if bits == 8 else 3.7) and figures["output_layer"] == "Parameter", figures
