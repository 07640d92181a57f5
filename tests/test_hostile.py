"""Hostile inputs (issue 12): every bad flag, file, row, config and checkpoint stops with a message naming the
culprit, before any training or write (the output folder is compared byte for byte before and after); nothing is
overwritten without --overwrite_output_dir; resume is exact with dropout and with P-tuning; the tokenizer working
copy is atomic; the NaN stop names a checkpoint whose weights are finite."""

import json
import math
import re
import shutil
import threading
import time
import types
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import glm, tiny_config
from safetensors.torch import load_file, save_file
from test_train import TINY, common, losses, metrics, run_script, weights, workspace  # noqa: F401  (fixture)
from transformers import LogitsProcessor, LogitsProcessorList

import convert_glm
import data_glm
import train


def snapshot(folder: Path) -> dict:
    """Every file under `folder` (relative name -> bytes); {} for a folder that does not exist."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_jsonl(path: Path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


GOOD = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def fake_finished_run(folder: Path):
    """What a finished run leaves (config, weights, card, metrics, tokenizer files), with recognisable bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "README.md", "metrics.jsonl", "tokenizer_config.json"):
        (folder / name).write_text(f"old {name}\n")
    (folder / "model.safetensors").write_bytes(b"old weights")


# ---------------------------------------------------------------------------------------------------------------
# Flags: parse time, naming the flag

@pytest.mark.parametrize("flags, named", [
    (["--block_size", "-5"], "--block_size -5"), (["--block_size", "0"], "--block_size 0"),
    (["--eval_steps", "0"], "--eval_steps 0"), (["--logging_steps", "0"], "--logging_steps 0"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps 0"),
    (["--checkpointing_steps", "-1"], "--checkpointing_steps -1"),
    (["--max_grad_norm", "nan"], "--max_grad_norm nan"), (["--learning_rate=-1e-3"], "--learning_rate -0.001"),
    (["--learning_rate", "inf"], "--learning_rate inf"), (["--adam_beta1", "-0.1"], "--adam_beta1 -0.1"),
    (["--adam_beta2", "1.5"], "--adam_beta2 1.5"), (["--num_train_epochs", "0"], "--num_train_epochs 0.0"),
    (["--tokenizer_vocab_size", "100"], "--tokenizer_vocab_size 100"),
    (["--validation_split_percentage", "0"], "--validation_split_percentage 0"),
    (["--prefix_projection"], "--prefix_projection needs --pre_seq_len"),
    (["--lora_dropout", "0.1"], "--lora_alpha / --lora_dropout need --lora_r"),
    (["--overwrite_output_dir", "--resume_from_checkpoint", "latest"], "--overwrite_output_dir"),
])
def test_bad_flag_is_refused_at_parse_time(flags, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--train_file", "x.txt", "--config_name", "tiny", *flags])
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


def test_min_tokenizer_vocab_matches_the_tokenizer():
    tokenization = glm.tokenization
    assert train.MIN_TOKENIZER_VOCAB == len(tokenization.GLM3_RESERVED_PIECES) + len(tokenization.GLM3_CONTROL_TOKENS) + 1
    with pytest.raises(ValueError):
        tokenization.train_glm_tokenizer(["a b"] * 10, vocab_size=train.MIN_TOKENIZER_VOCAB - 1)


# ---------------------------------------------------------------------------------------------------------------
# --output_dir: refused before any write, replaced only with --overwrite_output_dir, user files never deleted

@pytest.mark.parametrize("case", ["finished", "foreign", "checkpoint", "stray_tmp_file", "user_tmp_folder"])
def test_occupied_output_dir_is_refused_unchanged(workspace, tmp_path, case):  # noqa: F811
    out = tmp_path / "out"
    if case == "finished":
        fake_finished_run(out)
        named = ["config.json", "model.safetensors", "README.md", "metrics.jsonl", "--overwrite_output_dir"]
    elif case == "foreign":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        named = ["notes.txt", "--overwrite_output_dir"]
    elif case == "checkpoint":
        (out / "checkpoints" / "step-0000003").mkdir(parents=True)
        (out / "checkpoints" / "step-0000003" / train.CHECKPOINT_MARKER).write_text("{}")
        named = ["step-0000003", "--resume_from_checkpoint latest", "--overwrite_output_dir"]
    elif case == "stray_tmp_file":
        (out / "checkpoints").mkdir(parents=True)
        (out / "checkpoints" / "tmp-step-0000001").write_text("not a folder")
        named = ["checkpoints/tmp-step-0000001"]
    else:  # a user's folder that looks like an interrupted checkpoint: never deleted, even with the flag
        (out / "checkpoints" / "tmp-step-0000001").mkdir(parents=True)
        (out / "checkpoints" / "tmp-step-0000001" / "data.bin").write_bytes(b"precious")
        named = ["checkpoints/tmp-step-0000001"]
    before = snapshot(out)
    argv = common(workspace, out, "--train_file", str(workspace / "chats.jsonl"), "--max_train_steps", "1")
    with pytest.raises(train.OutputDirError) as error:
        train.main(argv + (["--overwrite_output_dir"] if case == "user_tmp_folder" else []))
    assert str(out) in str(error.value)
    for name in named:
        assert name in str(error.value)
    assert snapshot(out) == before


def test_overwrite_replaces_only_our_files_and_retrains_the_tokenizer(workspace, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    fake_finished_run(out)
    (out / "model-00001-of-00002.safetensors").write_bytes(b"stale shard of the old run")
    (out / "tokenizer").mkdir()  # an old working copy that must not be reused for the new corpus
    (out / "tokenizer" / "tokenizer_config.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    (out / ".git").mkdir()
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    chats = write_jsonl(tmp_path / "chats.jsonl", [json.loads(line) for line in
                                                   (workspace / "chats.jsonl").read_text().splitlines()])
    argv = ["--config_name", str(workspace / "tiny.json"), "--train_file", str(chats), "--output_dir", str(out),
            "--tokenizer_vocab_size", "400", "--max_train_steps", "2", "--block_size", "64",
            "--per_device_train_batch_size", "8", "--overwrite_output_dir"]
    train.main(argv)
    assert (out / "notes.txt").read_text() == "mine" and (out / ".git" / "HEAD").exists()
    assert not (out / "model-00001-of-00002.safetensors").exists()
    assert (out / "README.md").read_text().startswith("---\n")
    assert not (out / "tokenizer").exists()
    from transformers import AutoTokenizer

    rows, _ = data_glm.read_json_rows(str(chats))
    for size in (400, 480):
        if size == 480:  # again, another vocabulary size: a new run trains its own tokenizer, never the folder's
            train.main([a if a != "400" else "480" for a in argv])
        expected = glm.tokenization.train_glm_tokenizer(data_glm.conversation_texts(rows), vocab_size=size)
        assert AutoTokenizer.from_pretrained(out, trust_remote_code=True).get_vocab() == expected.get_vocab()
    assert (out / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------------------------
# Files and rows: named by file and line, before anything is written

@pytest.mark.parametrize("case, message", [
    ("malformed_line", r"data.jsonl line 2 column 2: malformed JSON line"),
    ("invalid_utf8", r"data.jsonl line 3: invalid UTF-8"),
    ("not_an_object", r"data.jsonl line 2: expected a JSON object"),
    ("content_int", r"malformed conversation in .*data.jsonl line 3: message 1: content must be a string, got int"),
    ("bad_role", r"data.jsonl line 2: message 0: unknown role 'robot'"),
    ("not_a_list", r"data.jsonl line 2: expected a non-empty list of messages"),
    ("no_assistant", r"data.jsonl line 2: no assistant message"),
    ("bad_tool_call", r"data.jsonl line 2: message 1: tool call parameters must be a dict, got list"),
    ("pretrain_number", r"data.jsonl line 2: text column 'text' must be a string, got int"),
])
def test_bad_file_or_row_is_named_before_any_write(workspace, tmp_path, case, message):  # noqa: F811
    path = tmp_path / "data.jsonl"
    line = {"malformed_line": "{bad json", "not_an_object": "[1, 2]",
            "bad_role": json.dumps({"conversations": [{"role": "robot", "content": "x"}]}),
            "not_a_list": json.dumps({"conversations": {"role": "user"}}),
            "no_assistant": json.dumps({"conversations": [{"role": "user", "content": "x"}]}),
            "bad_tool_call": json.dumps({"conversations": [{"role": "user", "content": "x"}, {
                "role": "assistant", "content": {"name": "get_weather", "parameters": ["北京"]}}]}),
            }.get(case)
    if case == "invalid_utf8":
        path.write_bytes((json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n").encode() + b'{"text": "\xff"}\n')
    elif case == "content_int":
        write_jsonl(path, [GOOD, GOOD, {"conversations": [{"role": "user", "content": "x"},
                                                          {"role": "assistant", "content": 146}]}])
    elif case == "pretrain_number":
        write_jsonl(path, [{"text": "fine"}, {"text": 146}])
    else:
        path.write_text(json.dumps(GOOD) + "\n" + line + "\n")
    out = tmp_path / "out"
    # From scratch (the tokenizer would be trained on these rows), so the check must come before that.
    argv = ["--config_name", str(workspace / "tiny.json"), "--train_file", str(path), "--output_dir", str(out),
            "--max_train_steps", "1", "--tokenizer_vocab_size", "400"]
    with pytest.raises(ValueError, match=message):
        train.main(argv)
    assert not out.exists()


def test_json_strings_stay_strings_and_dict_tool_calls_train(workspace, tmp_path):  # noqa: F811
    rows = [{"conversations": [{"role": "user", "content": '"quoted"'}, {"role": "assistant", "content": "146"}]},
            {"conversations": [{"role": "system", "content": "tools", "tools": [data_glm.WEATHER_TOOL]},
                               {"role": "user", "content": "北京天气"},
                               {"role": "assistant", "content": {"name": "get_weather",
                                                                 "parameters": {"city": "北京", "days": 3}}},
                               {"role": "observation", "content": "{\"weather\": \"sunny\"}"},
                               {"role": "assistant", "content": "sunny"}]}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows * 8)
    raw = data_glm.load_raw(types.SimpleNamespace(dataset_name=None, train_file=str(path), validation_file=None,
                                                  streaming=False))
    data_glm.check_rows(raw, "sft", "text", "conversations")
    # The conversations come back exactly as the file holds them (json.loads of each line is the reference).
    assert [data_glm.conversation_of(v) for v in raw["train"]["conversations"][:2]] == [r["conversations"] for r in rows]
    tokenizer = glm.ChatGLMTokenizer.from_pretrained(workspace / "base")
    tokenized = data_glm.tokenize_sft(raw["train"].select(range(2)), tokenizer, "conversations", block_size=256)
    for row, conversation in zip(tokenized, rows):
        assert row["input_ids"] == tokenizer.tokenize_conversation(conversation["conversations"])["input_ids"]
    texts = list(data_glm.conversation_texts(raw["train"].select(range(2))))
    assert '"quoted"' in texts and "146" in texts and '```python\ntool_call(city="北京", days=3)\n```' in texts
    # The dict form of a tool call trains a tokenizer from scratch end to end.
    out = tmp_path / "out"
    train.main(["--config_name", str(workspace / "tiny.json"), "--train_file", str(path), "--output_dir", str(out),
                "--max_train_steps", "1", "--tokenizer_vocab_size", "400", "--per_device_train_batch_size", "4",
                "--block_size", "128"])
    assert (out / "model.safetensors").exists()


def test_long_lines_are_cut_into_pieces_of_one_document():
    text = ("word " * 3000 + "\n") + "x" * 10000 + "中文" * 3000
    pieces = list(data_glm.text_pieces(text))
    assert "".join(pieces) == text and all(len(p) <= data_glm.TEXT_PIECE_CHARS for p in pieces)
    assert pieces[0].endswith(" ") is False and pieces[0].startswith("word")  # cut before a space
    assert any(p.endswith("\n") for p in pieces)  # cut after the newline
    split = data_glm.split_long_texts({"text": [text, "short"]}, "text")
    assert split["continues"] == [True] * (len(pieces) - 1) + [False, False]
    tokenizer = glm.tokenization.train_glm_tokenizer(["word x 中文"] * 50, vocab_size=300)
    docs = __import__("datasets").Dataset.from_dict({"input_ids": [[5, 6], [7], [8]],
                                                    "continues": [True, False, False]})
    packed = train.pack_docs(docs, tokenizer, 3, types.SimpleNamespace(streaming=False,
                                                                       preprocessing_num_workers=None))
    eos = tokenizer.eos_token_id
    assert packed["input_ids"] == [[5, 6, 7], [eos, 8, eos]]  # no eos inside the first document


# ---------------------------------------------------------------------------------------------------------------
# Configs and checkpoints

def _short_checkpoint(folder: Path, config_layers: int, keep_layers: int):
    model = glm.ChatGLMForConditionalGeneration(tiny_config(num_layers=keep_layers, padded_vocab_size=512))
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_layers"] = config_layers
    config.pop("num_hidden_layers", None)
    (folder / "config.json").write_text(json.dumps(config))
    return model


def test_checkpoint_with_fewer_layers_than_config_is_refused(workspace, tmp_path):  # noqa: F811
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


# ---------------------------------------------------------------------------------------------------------------
# Resume: exact after SIGKILL with dropout and with P-tuning; RNG state unreadable is an error

def _kill_and_resume(workspace, tmp_path, extra):  # noqa: F811
    data = ["--train_file", str(workspace / "chats.jsonl"), "--max_train_steps", "6", "--checkpointing_steps", "2",
            "--per_device_train_batch_size", "8", "--checkpoints_total_limit", "5", "--block_size", "64", *extra]
    full = run_script(common(workspace, tmp_path / "full", *data))
    assert full.returncode == 0, full.stderr[-3000:]
    out = tmp_path / "crashed"
    killed = run_script(common(workspace, out, *data), env={"GLM_TRAIN_KILL_IN_CHECKPOINT": "4"})
    assert killed.returncode == -9
    assert [p.name for p in train.complete_checkpoints(out / "checkpoints")] == ["step-0000002"]
    shutil.copytree(out, tmp_path / "copy")
    resumed = run_script(common(workspace, out, *data, "--resume_from_checkpoint", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = losses(tmp_path / "full"), losses(out)
    assert got.keys() == expected.keys() == set(range(1, 7))
    assert [got[s] for s in range(3, 7)] == [expected[s] for s in range(3, 7)]  # bit for bit
    a, b = weights(tmp_path / "full"), weights(out)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    return tmp_path / "copy"


def test_resume_with_dropout_is_exact(workspace, tmp_path):  # noqa: F811
    config = dict(TINY, hidden_dropout=0.2, attention_dropout=0.2)
    (tmp_path / "dropout.json").write_text(json.dumps(config))
    copy = _kill_and_resume(workspace, tmp_path, ["--config_name", str(tmp_path / "dropout.json")])
    # The same killed run, its RNG state made unreadable: resuming stops naming the file, before any write.
    rng = copy / "checkpoints" / "step-0000002" / "random_states_0.pkl"
    rng.write_bytes(b"garbage")
    before = snapshot(copy)
    data = ["--config_name", str(tmp_path / "dropout.json"), "--train_file", str(workspace / "chats.jsonl"),
            "--max_train_steps", "6", "--checkpointing_steps", "2", "--per_device_train_batch_size", "8",
            "--block_size", "64", "--resume_from_checkpoint", "latest"]
    with pytest.raises(ValueError, match=re.escape(f"the RNG state {rng} is unreadable")):
        train.main(common(workspace, copy, *data))
    assert snapshot(copy) == before


def test_resume_with_ptuning_is_exact(workspace, tmp_path):  # noqa: F811
    # P-tuning v2's prefix dropout (0.1) draws from the RNG on every step.
    _kill_and_resume(workspace, tmp_path, ["--model_name_or_path", str(workspace / "base"), "--pre_seq_len", "4"])


# ---------------------------------------------------------------------------------------------------------------
# The tokenizer working copy is atomic; the NaN stop names a finite checkpoint

def test_kill_while_writing_the_tokenizer_copy_needs_no_cleanup(workspace, tmp_path):  # noqa: F811
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    argv = ["--config_name", str(workspace / "tiny.json"), "--train_file", str(workspace / "chats.jsonl"),
            "--output_dir", str(out), "--tokenizer_vocab_size", "400", "--max_train_steps", "3", "--block_size", "64",
            "--per_device_train_batch_size", "8", "--checkpointing_steps", "1", "--checkpoints_total_limit", "5"]
    killed = run_script(argv, env={"GLM_TRAIN_KILL_IN_TOKENIZER": "1"})
    assert killed.returncode == -9
    assert (out / train.TOKENIZER_TEMPORARY).is_dir() and not (out / train.TOKENIZER_COPY).exists()
    # The next start needs no hand cleanup (the interrupted copy is train.py's and is replaced); killed again
    # inside the second checkpoint, it leaves the renamed working copy that a resume must use.
    killed = run_script(argv, env={"GLM_TRAIN_KILL_IN_CHECKPOINT": "2"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (out / train.TOKENIZER_TEMPORARY).exists()
    vocab = AutoTokenizer.from_pretrained(out / train.TOKENIZER_COPY, trust_remote_code=True).get_vocab()
    train.main(argv + ["--resume_from_checkpoint", "latest"])
    assert (out / "model.safetensors").exists() and not (out / train.TOKENIZER_COPY).exists()
    assert AutoTokenizer.from_pretrained(out, trust_remote_code=True).get_vocab() == vocab
    # Resuming a finished run (its working copy gone) for more steps uses the folder's own tokenizer.
    train.main([a if a != "3" else "4" for a in argv] + ["--resume_from_checkpoint", "latest"])
    assert max(losses(out)) == 4
    assert AutoTokenizer.from_pretrained(out, trust_remote_code=True).get_vocab() == vocab


def test_nan_stop_names_a_checkpoint_with_finite_weights(workspace, tmp_path):  # noqa: F811
    out = tmp_path / "nan"
    argv = common(workspace, out, "--train_file", str(workspace / "train.txt"), "--max_train_steps", "6",
                  "--checkpointing_steps", "1", "--per_device_train_batch_size", "8")
    # The second optimizer step overflows one weight (as a too-high learning rate does); that step's loss was
    # computed before the update and is finite, so only a look at the weights can catch it.
    real_step, calls = torch.optim.AdamW.step, []

    def overflowing_step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            self.param_groups[0]["params"][0].data.fill_(float("inf"))
        return result

    with mock.patch.object(torch.optim.AdamW, "step", overflowing_step):
        with pytest.raises(train.NonFiniteLoss, match=r"weights are not finite after step 2 \(.*\).*The last good "
                                                      r"checkpoint is .*step-0000001"):
            train.main(argv)
    assert math.isfinite(losses(out)[2])  # the loss alone would not have stopped it
    kept = train.complete_checkpoints(out / "checkpoints")
    assert [p.name for p in kept] == ["step-0000001"]
    for name, tensor in load_file(str(kept[0] / "model.safetensors")).items():
        assert torch.isfinite(tensor).all(), name


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and chat API

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
