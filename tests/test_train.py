"""train.py end to end on tiny models (glm_train/loop.py, model.py): multi-process equivalence, pretraining and SFT,
gradient checkpointing and accumulation, LoRA and P-tuning, the NaN stop, bad input before training, the built-in
run's log."""

import json
import math
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, glm
from safetensors.torch import load_file
from train_helpers import (ACCELERATE, CPU_DDP, CPU_ONE, ENV, assert_same_weights, common, losses, metrics, run_script,
                           weights, write_jsonl)

import train
from glm_train import checkpoint
from glm_train.errors import InputError
from glm_train.model import LORA_TARGETS


def _pretrain_args(workspace, out, batch):
    return common(workspace, out, "--train_file", str(workspace / "train.txt"), "--validation_file",
                  str(workspace / "validation.txt"), "--max_train_steps", "6", "--per_device_train_batch_size",
                  str(batch), "--checkpointing_steps", "6")


@pytest.fixture(scope="module")
def one_process_run(workspace):
    out = workspace / "one_process"
    one = run_script(_pretrain_args(workspace, out, 8), launcher=[ACCELERATE, "launch", "--num_processes", "1"])
    assert one.returncode == 0, one.stderr[-3000:]
    return out


def test_two_processes_match_one(workspace, one_process_run, tmp_path):
    two = run_script(_pretrain_args(workspace, tmp_path / "two", 4), launcher=CPU_DDP)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "engine DDP: a full replica on each of 2 process(es) on cpu" in two.stdout
    first, second = losses(one_process_run), losses(tmp_path / "two")
    assert first.keys() == second.keys() == set(range(1, 7))
    for step in first:
        assert first[step] == pytest.approx(second[step], rel=1e-5), step
    # The key half of the QKV bias has an exactly-zero true gradient (softmax ignores a per-query constant); Adam
    # scales the rounding noise of a different reduction order up to ~1e-5 there. Everything else agrees to 1e-7.
    assert_same_weights(weights(one_process_run), weights(tmp_path / "two"), atol=5e-5)


def test_pretraining_on_text_files_lowers_validation_loss(workspace, tmp_path):
    out = tmp_path / "pretrain"
    train.main(common(workspace, out, "--train_file", str(workspace / "train.txt"), "--validation_file",
                      str(workspace / "validation.txt"), "--max_train_steps", "30", "--eval_steps", "30",
                      "--per_device_train_batch_size", "8"))
    evals = [r for r in metrics(out) if "eval_loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 30
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 1.0
    assert evals[-1]["perplexity"] == pytest.approx(math.exp(evals[-1]["eval_loss"]), rel=1e-6)
    record = next(r for r in metrics(out) if "tokens_per_s" in r)
    assert record["tokens_per_s"] > 0 and 0 < record["mfu"] < 1


def test_gradient_checkpointing_and_accumulation_keep_the_losses(workspace, tmp_path):
    data = ["--train_file", str(workspace / "train.txt"), "--validation_file", str(workspace / "validation.txt"),
            "--max_train_steps", "3"]
    train.main(common(workspace, tmp_path / "plain", *data, "--per_device_train_batch_size", "8"))
    train.main(common(workspace, tmp_path / "gc", *data, "--per_device_train_batch_size", "4",
                      "--gradient_accumulation_steps", "2", "--gradient_checkpointing"))
    plain, other = losses(tmp_path / "plain"), losses(tmp_path / "gc")
    for step in plain:
        assert other[step] == pytest.approx(plain[step], rel=1e-5), step
    assert_same_weights(weights(tmp_path / "plain"), weights(tmp_path / "gc"), atol=5e-5)


def test_lora_trains_only_adapters_and_reloads(workspace, tmp_path):
    import peft
    from transformers import AutoModel, AutoModelForCausalLM

    out = tmp_path / "lora"
    train.main(["--model_name_or_path", str(workspace / "base"), "--train_file", str(workspace / "chats.jsonl"),
                "--output_dir", str(out), "--lora_r", "4", "--merge_lora", "--max_train_steps", "4",
                "--learning_rate", "1e-2", "--per_device_train_batch_size", "8", "--block_size", "128"])
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    targets = {k.split(".lora_")[0].split(".")[-1] for k in adapter}
    assert targets == set(LORA_TARGETS)
    base = AutoModelForCausalLM.from_pretrained(workspace / "base", trust_remote_code=True)
    tuned = peft.PeftModel.from_pretrained(base, out / "adapter")
    assert any(float(v.abs().sum()) > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero
    merged = AutoModel.from_pretrained(out, trust_remote_code=True)
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(merged(ids).logits, tuned(ids).logits, atol=1e-4, rtol=1e-4)
    card = (out / "README.md").read_text()
    # The base is a local folder without a Hub id: the card names no base_model and no local path.
    assert "base_model:" not in card and str(workspace) not in card and "lora" in card  # nor the data file's


def test_ptuning_trains_only_the_prefix_encoder_and_reloads(workspace, tmp_path):
    from transformers import AutoModel

    out = tmp_path / "ptuning"
    train.main(["--model_name_or_path", str(workspace / "base"), "--train_file", str(workspace / "chats.jsonl"),
                "--output_dir", str(out), "--pre_seq_len", "4", "--max_train_steps", "4", "--learning_rate", "1e-2",
                "--per_device_train_batch_size", "8", "--block_size", "128"])
    before, after = weights(workspace / "base"), weights(out)
    assert set(after) - set(before) == {"transformer.prefix_encoder.embedding.weight"}
    for key in before:
        torch.testing.assert_close(after[key], before[key], atol=0, rtol=0, msg=key)
    model = AutoModel.from_pretrained(out, trust_remote_code=True)
    assert model.config.pre_seq_len == 4
    prefix = model.transformer.prefix_encoder.embedding.weight
    torch.testing.assert_close(prefix, after["transformer.prefix_encoder.embedding.weight"])


@pytest.mark.parametrize("case, message", [
    ("missing_column", "missing column: neither text column 'text' nor conversations column 'conversations'"),
    ("empty", "empty dataset"),
    ("malformed", "malformed conversation in {path} line 2: message 0: unknown role 'robot'"),
    ("block_size", "--block_size 4096 is beyond the model's seq_length 128"),
])
def test_bad_input_is_reported_before_training(workspace, tmp_path, case, message):
    path = tmp_path / "data.jsonl"
    good = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    rows = {"missing_column": [{"body": "some text"}], "empty": [],
            "malformed": [good, {"conversations": [{"role": "robot", "content": "x"}]}],
            "block_size": [good, good]}[case]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = common(workspace, tmp_path / "out", "--train_file", str(path), "--max_train_steps", "1")
    if case == "block_size":
        argv += ["--block_size", "4096"]
    with pytest.raises(ValueError, match=__import__("re").escape(message.format(path=path))):
        train.main(argv)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # nothing trained


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(workspace, tmp_path):
    out = tmp_path / "nan"
    argv = common(workspace, out, "--train_file", str(workspace / "train.txt"), "--max_train_steps", "20",
                  "--checkpointing_steps", "1", "--learning_rate", "1e30", "--num_warmup_steps", "0",
                  "--max_grad_norm", "0", "--per_device_train_batch_size", "8")
    with pytest.raises(checkpoint.NonFiniteLoss, match=r"loss is nan at step (\d+): stopping\. The last good checkpoint"):
        train.main(argv)
    kept = checkpoint.complete_checkpoints(out / "checkpoints")
    assert kept, "the checkpoints written before the NaN are kept"
    good = {r["step"] for r in metrics(out) if "loss" in r and math.isfinite(r["loss"])}
    assert all(int(p.name.split("-")[1]) in good for p in kept)


def test_fsdp_config_wraps_glm_blocks():
    # The configs name what the runs in test_distributed.py engage (FSDP2 and ZeRO-2/3 on CPU processes).
    import yaml

    config = yaml.safe_load((ROOT / "accelerate_configs" / "fsdp.yaml").read_text())
    assert config["distributed_type"] == "FSDP"
    assert config["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] == "GLMBlock"
    assert "GLMBlock" in glm.modeling.ChatGLMPreTrainedModel._no_split_modules
    for stage in (2, 3):
        yaml_config = yaml.safe_load((ROOT / "accelerate_configs" / f"deepspeed_zero{stage}.yaml").read_text())
        ds = json.loads((ROOT / yaml_config["deepspeed_config"]["deepspeed_config_file"]).read_text())
        assert ds["zero_optimization"]["stage"] == stage


OWN_LINES = [r"mode (sft|pretrain): ", r"checkpoints every \d+ steps", r"training: +\d+%", r"step \d+: loss ",
             r"held-out exact match: ", r"miss: ", r"chat> ", r"done in \d+s; the model folder is ",
             r"note: this run makes only \d+ optimizer step"]


def test_builtin_run_log_has_only_our_lines(tmp_path):
    """The main job as scripts/main.sh launches it, in a plain environment (no PYTHONWARNINGS, nothing extra on the
    path): our start-up summary, one progress bar, eval lines on their own lines, the result. Any third-party
    import notice, warning or other progress bar fails it."""
    import re

    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [*CPU_ONE, str(ROOT / "train.py"), "--output_dir", str(tmp_path / "skills"), "--max_train_steps", "6",
               "--eval_steps", "3", "--builtin_train_examples", "400", "--builtin_heldout_examples", "9"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.strip() for line in re.split(r"[\r\n]", result.stdout + result.stderr) if line.strip()]
    unexpected, after_chat = [], False
    for line in lines:
        if any(re.match(pattern, line) for pattern in OWN_LINES):
            after_chat = line.startswith("chat> ")
        elif not after_chat:  # a reply of the untrained model may span lines
            unexpected.append(line)
    assert not unexpected, unexpected[:10]
    assert [line.split(":")[0] for line in lines if line.startswith("step ")] == ["step 3", "step 6"]  # evals
    assert any(line.startswith("held-out exact match: ") for line in lines)


def test_data_smaller_than_one_step_names_the_flags_and_writes_nothing(workspace, tmp_path):
    """5 conversations from scratch (4 after the validation carve) at the default 8 per step: the refusal names the
    flags and the largest batch that fits, before the tokenizer copy or anything else is written."""
    data = write_jsonl(tmp_path / "five.jsonl", [json.loads(line) for line in
                                                 (workspace / "chats.jsonl").read_text().splitlines()[:5]])
    out = tmp_path / "out"
    with pytest.raises(InputError, match=re.escape(
            "4 training examples are fewer than one optimizer step's 8 rows (--per_device_train_batch_size 8 x "
            "--gradient_accumulation_steps 1 x 1 process(es)); the largest batch that fits: "
            "--per_device_train_batch_size 4")):
        train.main(["--config_name", str(workspace / "tiny.json"), "--train_file", str(data), "--output_dir",
                    str(out), "--tokenizer_vocab_size", "400", "--block_size", "128"])
    assert not out.exists()


def test_a_few_steps_are_announced_and_the_short_last_step_is_trained(workspace, tmp_path, capsys):
    """13 conversations (12 after the carve) at 8 per step: two steps, the second on the 4 rows left (they were
    dropped, leaving one step at lr 5e-5 logged as 0.0); the notice gives each step's learning rate and metrics.jsonl
    the rate each step used."""
    data = write_jsonl(tmp_path / "thirteen.jsonl", [json.loads(line) for line in
                                                     (workspace / "chats.jsonl").read_text().splitlines()[:13]])
    out = tmp_path / "out"
    train.main(["--model_name_or_path", str(workspace / "base"), "--train_file", str(data), "--output_dir", str(out),
                "--block_size", "128", "--logging_steps", "1"])
    printed = capsys.readouterr().out
    assert "note: this run makes only 2 optimizer step(s), 1 epoch(s) of 12 training examples at 8 a step; the " \
           "learning rate of each step: 5e-05, 2.5e-05." in printed
    assert [r["lr"] for r in metrics(out) if "lr" in r] == pytest.approx([5e-5, 2.5e-5])


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_a_stopped_run_says_in_one_line_which_checkpoint_to_continue_from(workspace, tmp_path, signal_name):
    """Ctrl-C (or a scheduler's SIGTERM) after the first checkpoint: one line naming it and how to continue, no
    KeyboardInterrupt traceback; the checkpoint resumes."""
    import signal
    import time

    out = tmp_path / "out"
    argv = common(workspace, out, "--train_file", str(workspace / "train.txt"), "--max_train_steps", "100000",
                  "--per_device_train_batch_size", "8", "--checkpointing_steps", "2")
    # As from a terminal, where Ctrl-C's SIGINT has its default action (a shell's background job, as CI may run
    # this suite, inherits SIGINT ignored, and Python then never raises KeyboardInterrupt).
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv], cwd=ROOT, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while not checkpoint.complete_checkpoints(out / "checkpoints") and time.time() < deadline:
        time.sleep(0.5)
    process.send_signal(getattr(signal, signal_name))
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    last = re.split(r"[\r\n]+", stderr.strip())[-1]  # after the progress bar's last redraw
    assert last.startswith("train.py: stopped before the end; the last complete checkpoint is ")
    assert last.endswith("; continue with --resume_from_checkpoint latest")
    named = Path(last.split("checkpoint is ")[1].split(";")[0])
    assert named in checkpoint.complete_checkpoints(out / "checkpoints")
