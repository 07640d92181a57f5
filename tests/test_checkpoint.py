"""glm_train/checkpoint.py: the output folder's policy (nothing replaced without --overwrite_output_dir, only our
files with it), atomic checkpoints and tokenizer copy under SIGKILL, and exact resume (dropout, P-tuning)."""

import json
import math
import re
import shutil
from unittest import mock

import pytest
import torch
from conftest import glm
from safetensors.torch import load_file
from train_helpers import (TINY, assert_same_weights, common, fake_finished_run, losses, run_script, snapshot, weights,
                           write_jsonl)

import train
from glm_train import checkpoint
from glm_train.errors import InputError
from glm_train.data import sources


def test_resume_after_sigkill_during_checkpoint_write(workspace, tmp_path):
    data = ["--train_file", str(workspace / "chats.jsonl"), "--max_train_steps", "8", "--checkpointing_steps", "3",
            "--per_device_train_batch_size", "8", "--checkpoints_total_limit", "5", "--block_size", "128"]
    full = run_script(common(workspace, tmp_path / "full", *data))
    assert full.returncode == 0, full.stderr[-3000:]

    out = tmp_path / "crashed"
    killed = run_script(common(workspace, out, *data), kill=("checkpoint", 6))
    assert killed.returncode == -9
    checkpoints = out / "checkpoints"
    assert (checkpoints / "tmp-step-0000006").is_dir()  # the interrupted write is there, unmarked
    assert [p.name for p in checkpoint.complete_checkpoints(checkpoints)] == ["step-0000003"]

    resumed = run_script(common(workspace, out, *data, "--resume_from_checkpoint", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr and "step-0000003" in resumed.stdout + resumed.stderr
    assert not (checkpoints / "tmp-step-0000006").exists()
    assert [p.name for p in checkpoint.complete_checkpoints(checkpoints)] == ["step-0000003", "step-0000006"]
    expected, got = losses(tmp_path / "full"), losses(out)
    assert got.keys() == expected.keys() == set(range(1, 9))
    for step in range(4, 9):
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step
    assert_same_weights(weights(tmp_path / "full"), weights(out))


def test_a_full_disk_says_so_and_keeps_the_complete_checkpoints(workspace, tmp_path):
    """The output folder on a filesystem with room for one checkpoint and a half: the second checkpoint's write
    fails (torch says "unexpected pos", safetensors "IoError"), train.py says "No space left on device" in one line
    with the checkpoint to continue from, the half-written one is gone and the first stays complete."""
    import subprocess

    data = ["--train_file", str(workspace / "chats.jsonl"), "--max_train_steps", "4", "--checkpointing_steps", "1",
            "--per_device_train_batch_size", "4", "--checkpoints_total_limit", "2", "--block_size", "128"]
    train.main(common(workspace, tmp_path / "probe", *data[:3], "2", *data[4:]))
    size = sum(p.stat().st_size for p in (tmp_path / "probe" / "checkpoints" / "step-0000001").rglob("*"))
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size * 3 // 2 // 4096 * 4096 + 65536}", "tmpfs",
                              str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        out = disk / "run"
        result = run_script(common(workspace, out, *data))
        assert result.returncode == 1, result.stderr[-3000:]
        last = result.stderr.strip().splitlines()[-1]
        assert re.fullmatch(rf"train.py: No space left on device in {re.escape(str(out))} \(\d+\.\d MiB left; .*\)\. "
                            rf"The last complete checkpoint is {re.escape(str(out / 'checkpoints' / 'step-0000001'))}; "
                            r"free some space, then continue with --resume_from_checkpoint latest", last), last
        assert "Traceback" not in result.stderr
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001"]
        assert [p.name for p in checkpoint.complete_checkpoints(out / "checkpoints")] == ["step-0000001"]
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("case", ["finished", "foreign", "checkpoint", "stray_tmp_file", "user_tmp_folder"])
def test_occupied_output_dir_is_refused_unchanged(workspace, tmp_path, case):
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
        (out / "checkpoints" / "step-0000003" / checkpoint.CHECKPOINT_MARKER).write_text("{}")
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
    with pytest.raises(checkpoint.OutputDirError) as error:
        train.main(argv + (["--overwrite_output_dir"] if case == "user_tmp_folder" else []))
    assert str(out) in str(error.value)
    for name in named:
        assert name in str(error.value)
    assert snapshot(out) == before


def test_overwrite_replaces_only_our_files_and_retrains_the_tokenizer(workspace, tmp_path):
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
            "--tokenizer_vocab_size", "400", "--max_train_steps", "2", "--block_size", "128",
            "--per_device_train_batch_size", "8", "--overwrite_output_dir"]
    train.main(argv)
    assert (out / "notes.txt").read_text() == "mine" and (out / ".git" / "HEAD").exists()
    assert not (out / "model-00001-of-00002.safetensors").exists()
    assert (out / "README.md").read_text().startswith("---\n")
    assert not (out / "tokenizer").exists()
    from transformers import AutoTokenizer

    rows, _ = sources.read_json_rows(str(chats))
    for size in (400, 480):
        if size == 480:  # again, another vocabulary size: a new run trains its own tokenizer, never the folder's
            train.main([a if a != "400" else "480" for a in argv])
        expected = glm.tokenization.train_glm_tokenizer(sources.conversation_texts(rows), vocab_size=size)
        assert AutoTokenizer.from_pretrained(out, trust_remote_code=True).get_vocab() == expected.get_vocab()
    assert (out / "notes.txt").read_text() == "mine"


def _kill_and_resume(workspace, tmp_path, extra):
    data = ["--train_file", str(workspace / "chats.jsonl"), "--max_train_steps", "6", "--checkpointing_steps", "2",
            "--per_device_train_batch_size", "8", "--checkpoints_total_limit", "5", "--block_size", "128", *extra]
    full = run_script(common(workspace, tmp_path / "full", *data))
    assert full.returncode == 0, full.stderr[-3000:]
    out = tmp_path / "crashed"
    killed = run_script(common(workspace, out, *data), kill=("checkpoint", 4))
    assert killed.returncode == -9
    assert [p.name for p in checkpoint.complete_checkpoints(out / "checkpoints")] == ["step-0000002"]
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


def test_resume_with_dropout_is_exact(workspace, tmp_path):
    config = dict(TINY, hidden_dropout=0.2, attention_dropout=0.2)
    (tmp_path / "dropout.json").write_text(json.dumps(config))
    copy = _kill_and_resume(workspace, tmp_path, ["--config_name", str(tmp_path / "dropout.json")])
    # The same killed run, its RNG state made unreadable: resuming stops naming the file, before any write.
    rng = copy / "checkpoints" / "step-0000002" / "random_states_0.pkl"
    rng.write_bytes(b"garbage")
    before = snapshot(copy)
    data = ["--config_name", str(tmp_path / "dropout.json"), "--train_file", str(workspace / "chats.jsonl"),
            "--max_train_steps", "6", "--checkpointing_steps", "2", "--per_device_train_batch_size", "8",
            "--block_size", "128", "--resume_from_checkpoint", "latest"]
    with pytest.raises(ValueError, match=re.escape(f"the RNG state {rng} is unreadable")):
        train.main(common(workspace, copy, *data))
    assert snapshot(copy) == before


def test_resume_with_ptuning_is_exact(workspace, tmp_path):
    # P-tuning v2's prefix dropout (0.1) draws from the RNG on every step.
    _kill_and_resume(workspace, tmp_path, ["--model_name_or_path", str(workspace / "base"), "--pre_seq_len", "4"])


def test_kill_while_writing_the_tokenizer_copy_needs_no_cleanup(workspace, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    argv = ["--config_name", str(workspace / "tiny.json"), "--train_file", str(workspace / "chats.jsonl"),
            "--output_dir", str(out), "--tokenizer_vocab_size", "400", "--max_train_steps", "3", "--block_size", "128",
            "--per_device_train_batch_size", "8", "--checkpointing_steps", "1", "--checkpoints_total_limit", "5"]
    killed = run_script(argv, kill=("tokenizer", 1))
    assert killed.returncode == -9
    assert (out / checkpoint.TOKENIZER_TEMPORARY).is_dir() and not (out / checkpoint.TOKENIZER_COPY).exists()
    # The next start needs no hand cleanup (the interrupted copy is train.py's and is replaced); killed again
    # inside the second checkpoint, it leaves the renamed working copy that a resume must use.
    killed = run_script(argv, kill=("checkpoint", 2))
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (out / checkpoint.TOKENIZER_TEMPORARY).exists()
    vocab = AutoTokenizer.from_pretrained(out / checkpoint.TOKENIZER_COPY, trust_remote_code=True).get_vocab()
    train.main(argv + ["--resume_from_checkpoint", "latest"])
    assert (out / "model.safetensors").exists() and not (out / checkpoint.TOKENIZER_COPY).exists()
    assert AutoTokenizer.from_pretrained(out, trust_remote_code=True).get_vocab() == vocab
    # Resuming a finished run (its working copy gone) for more steps uses the folder's own tokenizer.
    train.main([a if a != "3" else "4" for a in argv] + ["--resume_from_checkpoint", "latest"])
    assert max(losses(out)) == 4
    assert AutoTokenizer.from_pretrained(out, trust_remote_code=True).get_vocab() == vocab


def test_nan_stop_names_a_checkpoint_with_finite_weights(workspace, tmp_path):
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
        with pytest.raises(checkpoint.NonFiniteLoss, match=r"weights are not finite after step 2 \(.*\).*The last good "
                                                      r"checkpoint is .*step-0000001"):
            train.main(argv)
    assert math.isfinite(losses(out)[2])  # the loss alone would not have stopped it
    kept = checkpoint.complete_checkpoints(out / "checkpoints")
    assert [p.name for p in kept] == ["step-0000001"]
    for name, tensor in load_file(str(kept[0] / "model.safetensors")).items():
        assert torch.isfinite(tensor).all(), name


@pytest.mark.parametrize("where", ["base", "inside_base", "holding_base"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_the_model_being_fine_tuned_is_never_the_output_folder(workspace, tmp_path, where, overwrite):
    """docs/train.md's fine-tune, pointed at the base folder (or into it, or at a folder holding it): refused with
    both paths named, even with --overwrite_output_dir, and the base stays byte for byte (it used to lose its
    tokenizer.model when the refusal's own advice was followed)."""
    holder = tmp_path / "models"
    base = holder / "base"
    shutil.copytree(workspace / "base", base)
    (base / "tokenizer.model").write_bytes(b"the base's sentencepiece model")  # a file train.py would not rewrite
    out = {"base": base, "inside_base": base / "finetune", "holding_base": holder}[where]
    before = snapshot(holder)
    argv = ["--model_name_or_path", str(base), "--train_file", str(workspace / "chats.jsonl"), "--output_dir",
            str(out), "--max_train_steps", "1", "--block_size", "128", *(["--overwrite_output_dir"] * overwrite)]
    with pytest.raises(checkpoint.OutputDirError) as error:
        train.main(argv)
    message = str(error.value)
    assert f"--output_dir {out}" in message and f"--model_name_or_path {base}" in message
    assert "--overwrite_output_dir" in message and "base-finetuned" in message  # the way on is a new folder
    assert snapshot(holder) == before


def test_a_fine_tune_without_output_dir_writes_a_new_folder_named_after_the_base(workspace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = tmp_path / "glm-skills"
    shutil.copytree(workspace / "base", base)
    before = snapshot(base)
    train.main(["--model_name_or_path", str(base), "--train_file", str(workspace / "chats.jsonl"),
                "--max_train_steps", "1", "--block_size", "128", "--per_device_train_batch_size", "8"])
    assert (tmp_path / "output" / "glm-skills-finetuned" / "model.safetensors").is_file()
    assert snapshot(base) == before


@pytest.fixture(scope="module")
def lora_run(workspace):
    """A finished 2-step LoRA fine-tune with its step-2 checkpoint, to resume under changed settings."""
    out = workspace / "lora-resume"
    train.main(lora_argv(workspace, out))
    return out


def lora_argv(workspace, out, *extra):
    return ["--model_name_or_path", str(workspace / "base"), "--train_file", str(workspace / "chats.jsonl"),
            "--output_dir", str(out), "--lora_r", "4", "--max_train_steps", "2", "--checkpointing_steps", "2",
            "--per_device_train_batch_size", "8", "--block_size", "128", *extra]


@pytest.mark.parametrize("change, named", [
    (["--per_device_train_batch_size", "4"], "--per_device_train_batch_size: 8 in the checkpoint, 4 now"),
    (["--gradient_accumulation_steps", "2"], "--gradient_accumulation_steps: 1 in the checkpoint, 2 now"),
    (["--train_file", "OTHER"], "data: '{chats}' in the checkpoint, '{other}' now"),
    (["--lora_r", "8"], "adapter: 'LoRA r=4 alpha=8 dropout=0.0' in the checkpoint, 'LoRA r=8 alpha=16"),
    (["--lora_r", None], "adapter: 'LoRA r=4 alpha=8 dropout=0.0' in the checkpoint, 'full' now"),
    (["--block_size", "96"], "--block_size: 128 in the checkpoint, 96 now"),
])
def test_resume_under_other_step_settings_is_refused_naming_them(workspace, lora_run, tmp_path, change, named):
    """A step means its rows and what they update: a resume that would count steps in another batch size, train on
    other data or another adapter stops before any write, naming each difference (it used to go on silently, or
    end in 17 lines of state_dict size mismatches)."""
    other = write_jsonl(tmp_path / "other.jsonl", [json.loads(line) for line in
                                                  (workspace / "chats.jsonl").read_text().splitlines()[:40]])
    argv = lora_argv(workspace, lora_run, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    flag, value = change
    position = argv.index(flag) if flag in argv else None
    if value is None:
        del argv[position:position + 2]
    elif position is not None:
        argv[position + 1] = str(other) if value == "OTHER" else value
    else:
        argv += [flag, value]
    before = snapshot(lora_run)
    with pytest.raises(InputError, match="cannot resume from .*step-0000002: this run's settings differ") as error:
        train.main(argv)
    assert named.format(chats=workspace / "chats.jsonl", other=other) in str(error.value)
    assert snapshot(lora_run) == before
    # The same settings resume (for more steps).
    if change == ["--block_size", "96"]:
        train.main(lora_argv(workspace, lora_run, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"))
        assert max(losses(lora_run)) == 3


def test_every_code_file_a_folder_carries_counts_as_train_pys_own():
    """--overwrite_output_dir replaces train.py's files and leaves a user's: the code files save_pretrained copies
    are train.py's (a file missing here would be kept as a user's, and the folder listed as foreign)."""
    from local_glm import CODE_FILES

    assert set(CODE_FILES) <= checkpoint.OWN_FILES
