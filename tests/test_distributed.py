"""train.py under each distributed engine, as users launch it with the shipped accelerate configs, on 2 CPU processes
(gloo): DDP, FSDP2, DeepSpeed ZeRO-2 and ZeRO-3. Each run must really engage its engine (the per-process shard sizes
train.py records at its first step), match the DDP run at the same global batch, write an output folder equal to the
engine's own consolidation of its sharded checkpoint, and resume exactly after a SIGKILL. Also: 2 "machines" on
localhost, and the refused `--cpu --num_processes 2` launch."""

import socket
import subprocess

import pytest
import torch
from conftest import ROOT, glm
from safetensors.torch import load_file
from train_helpers import ACCELERATE, ENV, assert_same_weights, common, losses, metrics, run_script, weights

from glm_train.engine import deepspeed_plugin

CONFIGS = ROOT / "accelerate_configs"
STEPS, CHECKPOINT_EVERY, KILL_AT = 6, 2, 4
# Weights: Adam turns the rounding noise of a different reduction order into ~1e-5 on the key half of the QKV bias,
# whose true gradient is exactly zero (see test_train.py); losses agree to 1e-5 relative.
WEIGHT_ATOL, LOSS_REL = 5e-5, 1e-5
FULL_QKV = 2 * 32 * 32  # TINY: query_key_value.weight is [(4 + 2 * 2) * 8, 32]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(engine, processes=2):
    common_flags = ["--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
                    "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    if engine == "ddp":
        return [ACCELERATE, "launch", "--multi_gpu", *common_flags]
    config = {"fsdp": "fsdp.yaml", "zero2": "deepspeed_zero2.yaml", "zero3": "deepspeed_zero3.yaml"}[engine]
    return [ACCELERATE, "launch", "--config_file", str(CONFIGS / config), *common_flags]


def pretrain_args(ws, out, *extra):
    return common(ws, out, "--model_name_or_path", str(ws / "base"), "--train_file", str(ws / "train.txt"),
                  "--validation_file", str(ws / "validation.txt"), "--max_train_steps", str(STEPS),
                  "--per_device_train_batch_size", "4", "--checkpointing_steps", str(CHECKPOINT_EVERY), *extra)


def engine_records(out):
    return [r for r in metrics(out) if "engine" in r]


def consolidated(engine, checkpoint, tmp_path):
    """The full weights of a sharded checkpoint, gathered by the engine's own tool (not by train.py)."""
    if engine in ("zero2", "zero3"):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="pytorch_model")
    if engine == "fsdp":
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(checkpoint / "pytorch_model_fsdp_0", tmp_path / "full.pt")
        return torch.load(tmp_path / "full.pt")["model"]
    return load_file(str(checkpoint / "model.safetensors"))


@pytest.fixture(scope="module")
def ddp_run(workspace):
    out = workspace / "ddp"
    result = run_script(pretrain_args(workspace, out), launcher=launcher("ddp"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "engine DDP: a full replica on each of 2 process(es) on cpu" in result.stdout
    return out


def test_ddp_replicates_everything(ddp_run):
    record, = engine_records(ddp_run)
    assert record["distributed_type"] == "MULTI_CPU" and record["num_processes"] == 2
    assert record["block_weight_numel_per_rank"] == [FULL_QKV, FULL_QKV]
    trainable = sum(v.numel() for v in weights(ddp_run).values())
    assert record["adam_state_numel_per_rank"] == [trainable, trainable]


@pytest.mark.parametrize("engine", ["fsdp", "zero2", "zero3"])
def test_engine_shards_matches_ddp_and_resumes_after_sigkill(workspace, ddp_run, tmp_path, engine):
    out = tmp_path / engine
    # The same global batch as the DDP run (2 processes x 4 rows) as 2 x 2 rows x 2 accumulation steps: the
    # engines' own accumulation boundaries (DeepSpeed's) must give the same update.
    split = ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"]
    killed = run_script(pretrain_args(workspace, out, *split), launcher=launcher(engine),
                        kill=("checkpoint", KILL_AT))
    assert killed.returncode != 0
    assert (out / "checkpoints" / f"tmp-step-{KILL_AT:07d}").is_dir(), killed.stderr[-3000:]
    resumed = run_script(pretrain_args(workspace, out, *split, "--resume_from_checkpoint", "latest"),
                         launcher=launcher(engine))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'step-{KILL_AT - CHECKPOINT_EVERY:07d}'}" in resumed.stdout

    # The engine really ran: its name on the start-up line and what each process held during training.
    words = {"fsdp": "engine FSDP2: parameters, gradients and optimizer states sharded, one unit per GLMBlock",
             "zero2": "engine DeepSpeed ZeRO-2: optimizer states and gradients sharded over 2 process(es)",
             "zero3": "engine DeepSpeed ZeRO-3: parameters, gradients and optimizer states sharded over 2"}[engine]
    assert words in killed.stdout and words in resumed.stdout
    ddp_record, = engine_records(ddp_run)
    records = engine_records(out)
    assert [r["step"] for r in records] == [1, KILL_AT - CHECKPOINT_EVERY + 1]  # the first run's, the resumed one's
    for record in records:
        assert record["distributed_type"] == ("FSDP" if engine == "fsdp" else "DEEPSPEED")
        # glm_train/engine.py engages FSDP on CPU processes itself because accelerate (up to 1.16) does not: once
        # accelerate does, this fails, and engage_fsdp_on_cpu is to be deleted.
        assert record["fsdp_on_cpu_patched"] == (engine == "fsdp"), "accelerate now engages FSDP on CPU by itself"
        assert record["num_processes"] == 2 and record["block_weight_numel"] == FULL_QKV
        held = record["block_weight_numel_per_rank"]
        assert held == ([FULL_QKV, FULL_QKV] if engine == "zero2" else [FULL_QKV // 2, FULL_QKV // 2])
        # AdamW moments: each process keeps about half of DDP's full copy, together exactly all of it.
        states = record["adam_state_numel_per_rank"]
        assert sum(states) == ddp_record["adam_state_numel_per_rank"][0] and max(states) < sum(states) * 0.6

    # Same losses and weights as the uninterrupted DDP run at the same global batch (2 x 4).
    expected, got = losses(ddp_run), losses(out)
    assert got.keys() == expected.keys() == set(range(1, STEPS + 1))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=LOSS_REL), step
    assert_same_weights(weights(out), weights(ddp_run), atol=WEIGHT_ATOL)

    # The output folder is the final sharded checkpoint, gathered by the engine's own tool; AutoModel loads it.
    gathered = consolidated(engine, out / "checkpoints" / f"step-{STEPS:07d}", tmp_path)
    saved = weights(out)
    assert saved.keys() == gathered.keys()
    for key in saved:
        torch.testing.assert_close(saved[key], gathered[key].float(), atol=0, rtol=0, msg=key)
    from transformers import AutoModel

    model = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    reference = glm.ChatGLMForConditionalGeneration(model.config).eval()
    reference.load_state_dict(gathered, strict=False)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-6, rtol=1e-6)


def test_fsdp_with_lora_and_activation_checkpointing_matches_one_process(workspace, tmp_path):
    import train

    data = ["--model_name_or_path", str(workspace / "base"), "--train_file", str(workspace / "chats.jsonl"),
            "--lora_r", "4", "--gradient_checkpointing", "--max_train_steps", "3", "--learning_rate", "1e-2",
            "--block_size", "128", "--logging_steps", "1", "--eval_steps", "1000"]
    result = run_script([*data, "--output_dir", str(tmp_path / "fsdp"), "--per_device_train_batch_size", "4"],
                        launcher=launcher("fsdp"))
    assert result.returncode == 0, result.stderr[-3000:]
    record, = engine_records(tmp_path / "fsdp")
    assert record["distributed_type"] == "FSDP" and "lora" not in record["block_weight"]
    assert record["block_weight_numel_per_rank"] == [FULL_QKV // 2, FULL_QKV // 2]
    train.main([*data, "--output_dir", str(tmp_path / "one"), "--per_device_train_batch_size", "8"])
    expected, got = losses(tmp_path / "one"), losses(tmp_path / "fsdp")
    assert got.keys() == expected.keys() == {1, 2, 3}
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=LOSS_REL), step
    adapter = "adapter_model.safetensors"
    assert_same_weights(load_file(str(tmp_path / "fsdp" / adapter)), load_file(str(tmp_path / "one" / adapter)),
                        atol=WEIGHT_ATOL)


@pytest.mark.parametrize("engine", ["ddp", "fsdp", "zero3"])
def test_two_machines_on_localhost_match_one_machine(workspace, ddp_run, tmp_path, engine):
    out, port = tmp_path / "nodes", free_port()
    how = {"ddp": ["--multi_gpu"], "fsdp": ["--config_file", str(CONFIGS / "fsdp.yaml")],
           # torchrun on each machine, as the DDP and FSDP launches (accelerate's default for DeepSpeed is pdsh)
           "zero3": ["--config_file", str(CONFIGS / "deepspeed_zero3.yaml"), "--deepspeed_multinode_launcher",
                     "standard"]}[engine]
    commands = [[ACCELERATE, "launch", *how, "--num_machines", "2", "--num_processes", "2",
                 "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                 "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "train.py"),
                 *pretrain_args(workspace, out)] for rank in (0, 1)]
    machines = [subprocess.Popen(c, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for c in commands]
    outputs = [m.communicate(timeout=600) for m in machines]
    for machine, (_, stderr) in zip(machines, outputs):
        assert machine.returncode == 0, stderr[-3000:]
    record, = engine_records(out)
    assert record["num_processes"] == 2
    assert record["distributed_type"] == {"ddp": "MULTI_CPU", "fsdp": "FSDP", "zero3": "DEEPSPEED"}[engine]
    expected, got = losses(ddp_run), losses(out)
    assert got.keys() == expected.keys()
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=LOSS_REL), step
    assert_same_weights(weights(out), weights(ddp_run), atol=WEIGHT_ATOL)


def test_cpu_launch_that_starts_fewer_processes_stops(workspace, tmp_path):
    out = tmp_path / "cpu"
    result = run_script(pretrain_args(workspace, out),
                        launcher=[ACCELERATE, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                                  "--mixed_precision", "no", "--dynamo_backend", "no"])
    assert result.returncode != 0
    # The launcher passes no count (reading its command line would be another process's business): the message
    # says why one process is all there is, and how to start several.
    assert "`accelerate launch --cpu` was asked for several processes but started 1" in result.stderr
    assert "accelerate launch --multi_gpu --num_processes N train.py" in result.stderr
    assert not (out / "metrics.jsonl").exists()  # nothing trained


def test_deepspeed_batch_accumulation_and_clipping_come_from_the_flags(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "accelerate_configs/deepspeed_zero2.json")
    # --per_device_train_batch_size 4 --gradient_accumulation_steps 3 --max_grad_norm 0.5
    config = deepspeed_plugin(4, 3, 0.5, world_size=2, on_cpu=True).deepspeed_config
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"], config["gradient_clipping"]) == (4, 3, 24, 0.5)
    assert config["zero_optimization"]["stage"] == 2
    # A number in the JSON that disagrees with the flags is an error naming the key and the flag, not a silent pick.
    shipped = json.loads((CONFIGS / "deepspeed_zero2.json").read_text())  # ZeRO-2: no zero.Init hook left behind
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**shipped, "train_micro_batch_size_per_gpu": 16}))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu is 16 but --per_device_train_batch_size "
                                         "gives 4"):
        deepspeed_plugin(4, 3, 0.5, world_size=2, on_cpu=True)
