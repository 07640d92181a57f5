"""Hostile inputs (issue 12): every bad flag, file, row, config and checkpoint stops with a message naming the
culprit, before any training or write (the output folder is compared byte for byte before and after); nothing is
overwritten without --overwrite_output_dir; resume is exact with dropout and with P-tuning; the tokenizer working
copy is atomic; the NaN stop names a checkpoint whose weights are finite."""

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import glm, tiny_config
from safetensors.torch import load_file, save_file
from train_helpers import fake_finished_run, snapshot
from transformers import LogitsProcessor, LogitsProcessorList

import convert_glm
import train


def _short_checkpoint(folder: Path, config_layers: int, keep_layers: int):
    model = glm.ChatGLMForConditionalGeneration(tiny_config(num_layers=keep_layers, padded_vocab_size=512))
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_layers"] = config_layers
    config.pop("num_hidden_layers", None)
    (folder / "config.json").write_text(json.dumps(config))
    return model


def test_checkpoint_with_fewer_layers_than_config_is_refused(workspace, tmp_path):
    base = tmp_path / "short"
    _short_checkpoint(base, config_layers=4, keep_layers=2)
    for file in (workspace / "base").glob("tokeniz*"):
        shutil.copy(file, base)
    with pytest.raises(ValueError, match=r"lacks \d+ weight\(s\).*transformer\.encoder\.layers\.2\."):
        glm.ChatGLMForConditionalGeneration.from_pretrained(base)
    out = tmp_path / "out"
    fake_finished_run(out)
    before = snapshot(out)
    with pytest.raises(ValueError, match="transformer.encoder.layers.3"):
        train.main(["--model_name_or_path", str(base), "--train_file", str(workspace / "chats.jsonl"),
                    "--output_dir", str(out), "--max_train_steps", "1", "--block_size", "64",
                    "--overwrite_output_dir"])
    assert snapshot(out) == before  # even with --overwrite_output_dir: nothing goes before the model is built
    # New heads stay allowed: a P-tuning prefix added to a base model, a classifier on a causal-LM checkpoint.
    ok = tmp_path / "ok"
    _short_checkpoint(ok, config_layers=2, keep_layers=2)
    model = glm.ChatGLMForConditionalGeneration.from_pretrained(ok, pre_seq_len=3)
    assert model.transformer.prefix_encoder is not None
    assert glm.ChatGLMForSequenceClassification.from_pretrained(ok, num_labels=2).classifier_head.out_features == 2


@pytest.mark.parametrize("case, message", [
    ("wrong_shape", r"wrong shape: transformer\.encoder\.layers\.0\.mlp\.dense_4h_to_h\.weight \(64, 95\)"),
    ("missing_tensor", r"missing: transformer\.encoder\.layers\.1\.input_layernorm\.weight"),
    ("missing_output_layer", r"missing: transformer\.output_layer\.weight"),
    ("layer_count", r"the weights hold 2 layers .* num_layers 3"),
])
def test_convert_refuses_a_checkpoint_that_disagrees_with_config(tmp_path, case, message):
    src = tmp_path / "src"
    torch.manual_seed(0)
    glm.ChatGLMForConditionalGeneration(tiny_config()).save_pretrained(src)
    state = load_file(str(src / "model.safetensors"))
    if case == "wrong_shape":
        state["transformer.encoder.layers.0.mlp.dense_4h_to_h.weight"] = torch.zeros(64, 95)
    elif case == "missing_tensor":
        del state["transformer.encoder.layers.1.input_layernorm.weight"]
    elif case == "missing_output_layer":
        del state["transformer.output_layer.weight"]
    else:
        config = json.loads((src / "config.json").read_text())
        config["num_layers"] = config["num_hidden_layers"] = 3
        (src / "config.json").write_text(json.dumps(config))
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    before = snapshot(src)
    for to in ("native", "code"):
        dst = tmp_path / f"dst-{to}"
        with pytest.raises(ValueError, match=message):
            convert_glm.main(["--to", to, str(src), str(dst)])
        assert not dst.exists()
    assert snapshot(src) == before


def test_encode_batch_ids_refuses_a_str():
    tokenizer = glm.tokenization.train_glm_tokenizer(["abc def"] * 50, vocab_size=300)
    with pytest.raises(TypeError, match="batch"):
        tokenizer.encode_batch_ids("abc")
    assert tokenizer.encode_batch_ids(["abc"]) == [tokenizer("abc")["input_ids"]]


@pytest.mark.parametrize("body, error", [
    ("tool_call(a={1, 2})", "set"), ("tool_call(a=b'x')", "bytes"), ("tool_call(a=1j)", "complex"),
    ("tool_call(a=...)", "ellipsis"), ("tool_call(a=[1, {2}])", "set"), ("tool_call(a={1: 2})", "non-string key"),
    ("tool_call(a=1e999)", "inf"), ('{"a": NaN}', "NaN"),
])
def test_tool_call_parameters_are_json_values_only(body, error):
    from glm_hf.chat_glm import parse_tool_call

    parsed = parse_tool_call("f", body)
    assert parsed["parameters"] is None and error in parsed["error"] and parsed["content"] == body


def test_tool_call_tuples_become_lists():
    from glm_hf.chat_glm import parse_tool_call

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
