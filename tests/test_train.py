"""train.py end to end on tiny models: multi-process equivalence, exact resume, crash safety, data modes, LoRA and
P-tuning, the output folder, and the errors for bad input."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import ROOT, glm
from safetensors.torch import load_file

import data_glm
import train

PYTHON = sys.executable
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
TINY = dict(model_type="chatglm", num_layers=2, hidden_size=32, ffn_hidden_size=64, kv_channels=8,
            num_attention_heads=4, multi_query_group_num=2, padded_vocab_size=512, seq_length=128)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
       "PYTHONWARNINGS": "ignore"}


# Two processes on CPU: accelerate's `--cpu` multi-process launch needs MPI, so torchrun's path (--multi_gpu) is used;
# train.py then runs DDP over gloo on the CPU.
CPU_DDP = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no"]


# One process as scripts/main.sh starts it (every launcher value given, so accelerate prints no notice).
CPU_ONE = [ACCELERATE, "launch", "--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--num_cpu_threads_per_process", "2"]


def sentences(n, seed=0):
    import random

    rng = random.Random(seed)
    animals, places = ["cat", "dog", "bird", "fish"], ["mat", "box", "tree", "pond"]
    return [f"the {rng.choice(animals)} sat on the {rng.choice(places)} number {rng.randrange(10)}." for _ in range(n)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny config file, text and conversation files, and a saved tiny base model with its tokenizer."""
    root = tmp_path_factory.mktemp("train")
    config_path = root / "tiny.json"
    config_path.write_text(json.dumps(TINY))
    (root / "train.txt").write_text("\n".join(sentences(600)) + "\n")
    (root / "validation.txt").write_text("\n".join(sentences(60, seed=1)) + "\n")
    rows, _ = data_glm.skill_splits(n_train=96, n_heldout=3, seed=0)
    with open(root / "chats.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    texts = sentences(600) + list(data_glm.conversation_texts(rows))
    tokenizer = glm.tokenization.train_glm_tokenizer(texts, vocab_size=500)
    config = glm.ChatGLMConfig(**{k: v for k, v in TINY.items() if k != "model_type"},
                               eos_token_id=tokenizer.stop_token_ids, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    base = root / "base"
    glm.ChatGLMForConditionalGeneration(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    return root


def common(ws, out, *extra):
    return ["--config_name", str(ws / "tiny.json"), "--tokenizer_name", str(ws / "base"), "--output_dir", str(out),
            "--learning_rate", "1e-2", "--num_warmup_steps", "2", "--block_size", "32", "--eval_steps", "1000",
            "--logging_steps", "1", *extra]


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def losses(out):
    return {r["step"]: r["loss"] for r in metrics(out) if "loss" in r}


def weights(out):
    return load_file(str(Path(out) / "model.safetensors"))


def run_script(argv, launcher=(), env=None):
    command = [*launcher, str(ROOT / "train.py"), *argv] if launcher else [PYTHON, str(ROOT / "train.py"), *argv]
    result = subprocess.run(command, cwd=ROOT, env={**ENV, **(env or {})}, capture_output=True, text=True,
                            timeout=600)
    return result


def assert_same_weights(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-4, msg=key)


# ---------------------------------------------------------------------------------------------------------------

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


def test_resume_after_sigkill_during_checkpoint_write(workspace, tmp_path):
    data = ["--train_file", str(workspace / "chats.jsonl"), "--max_train_steps", "8", "--checkpointing_steps", "3",
            "--per_device_train_batch_size", "8", "--checkpoints_total_limit", "5"]
    full = run_script(common(workspace, tmp_path / "full", *data))
    assert full.returncode == 0, full.stderr[-3000:]

    out = tmp_path / "crashed"
    killed = run_script(common(workspace, out, *data), env={"GLM_TRAIN_KILL_IN_CHECKPOINT": "6"})
    assert killed.returncode == -9
    checkpoints = out / "checkpoints"
    assert (checkpoints / "tmp-step-0000006").is_dir()  # the interrupted write is there, unmarked
    assert [p.name for p in train.complete_checkpoints(checkpoints)] == ["step-0000003"]

    resumed = run_script(common(workspace, out, *data, "--resume_from_checkpoint", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr and "step-0000003" in resumed.stdout + resumed.stderr
    assert not (checkpoints / "tmp-step-0000006").exists()
    assert [p.name for p in train.complete_checkpoints(checkpoints)] == ["step-0000003", "step-0000006"]
    expected, got = losses(tmp_path / "full"), losses(out)
    assert got.keys() == expected.keys() == set(range(1, 9))
    for step in range(4, 9):
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step
    assert_same_weights(weights(tmp_path / "full"), weights(out))


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


def test_sft_labels_are_exactly_the_replies_and_their_stop_tokens(workspace):
    tokenizer = glm.ChatGLMTokenizer.from_pretrained(workspace / "base")
    conversation = data_glm.weather_conversation(0, 0, "en", __import__("random").Random(0))
    dataset = __import__("datasets").Dataset.from_list([{"conversations": conversation}])
    row = data_glm.tokenize_sft(dataset, tokenizer, "conversations", block_size=256)[0]  # the whole conversation
    ids, labels = row["input_ids"], row["labels"]
    assistant, user, observation = (tokenizer.get_command(f"<|{r}|>") for r in ("assistant", "user", "observation"))
    # Expected from the spec: after each <|assistant|>, everything up to and including the next stop token.
    expected, inside = [], False
    for token in ids:
        if inside:
            expected.append(token)
            inside = token not in (tokenizer.eos_token_id, user, observation)
        else:
            expected.append(-100)
            inside = token == assistant
    assert labels == expected
    replies = [tokenizer.decode([t for t in labels if t != -100])]
    assert "tool_call(city='Beijing')" in replies[0] and "Beijing: " in replies[0]
    assert sum(t in (tokenizer.eos_token_id, observation) for t in labels) == 2
    # The loss counts exactly these targets (shifted by one).
    batch = data_glm.Collator(tokenizer.pad_token_id)([row, {"input_ids": ids[:5], "labels": labels[:5]}])
    assert int((batch["labels"][:, 1:] != -100).sum()) == sum(t != -100 for t in labels[1:])


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
    assert targets == set(train.LORA_TARGETS)
    base = AutoModelForCausalLM.from_pretrained(workspace / "base", trust_remote_code=True)
    tuned = peft.PeftModel.from_pretrained(base, out / "adapter")
    assert any(float(v.abs().sum()) > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero
    merged = AutoModel.from_pretrained(out, trust_remote_code=True)
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(merged(ids).logits, tuned(ids).logits, atol=1e-4, rtol=1e-4)
    card = (out / "README.md").read_text()
    # The base is a local folder without a Hub id: the card names no base_model and no local path.
    assert "base_model:" not in card and str(workspace / "base") not in card and "lora" in card


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


def test_output_folder_loads_through_automodel_in_a_fresh_process(workspace, tmp_path):
    out = tmp_path / "card"
    train.main(["--config_name", str(workspace / "tiny.json"), "--output_dir", str(out), "--max_train_steps", "3",
                "--builtin_train_examples", "200", "--builtin_heldout_examples", "3", "--tokenizer_vocab_size", "800",
                "--block_size", "128",
                "--per_device_train_batch_size", "8"])
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "configuration_glm.py", "modeling_glm.py", "chat_glm.py",
            "tokenization_glm.py", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md",
            "loss_curve.png", "metrics.jsonl"} <= names
    assert "tokenizer" not in names  # the from-scratch working copy is not left in the Hub folder
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_glm.ChatGLMForConditionalGeneration"
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["model_max_length"] == config["seq_length"] == TINY["seq_length"]
    assert tokenizer_config["split_special_tokens"] is False
    assert not set(tokenizer_config) & set(glm.tokenization.LOAD_TIME_KEYS)  # a Hub folder holds no load options
    generation = json.loads((out / "generation_config.json").read_text())
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense: mit\nlibrary_name: transformers\npipeline_tag: text-generation\n")
    assert "![loss curve](loss_curve.png)" in card and "| steps | 3 |" in card
    assert any("heldout_exact_match" in r for r in metrics(out))
    script = (
        "import json, sys\n"
        "from transformers import AutoModel, AutoTokenizer\n"
        f"path = {str(out)!r}\n"
        "tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)\n"
        "model = AutoModel.from_pretrained(path, trust_remote_code=True)\n"
        "ids = tok.build_chat_input('What is 1 plus 2?')\n"
        "out = model.generate(**ids, max_new_tokens=3, do_sample=False)\n"
        "print(json.dumps({'cls': type(model).__name__, 'stop': tok.stop_token_ids, 'n': out.shape[1]}))\n"
    )
    result = subprocess.run([PYTHON, "-c", script], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["cls"] == "ChatGLMForConditionalGeneration"
    assert generation["eos_token_id"] == loaded["stop"]


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
    with pytest.raises(train.NonFiniteLoss, match=r"loss is nan at step (\d+): stopping\. The last good checkpoint"):
        train.main(argv)
    kept = train.complete_checkpoints(out / "checkpoints")
    assert kept, "the checkpoints written before the NaN are kept"
    good = {r["step"] for r in metrics(out) if "loss" in r and math.isfinite(r["loss"])}
    assert all(int(p.name.split("-")[1]) in good for p in kept)


def test_push_to_hub_uploads_the_model_folder(tmp_path):
    api = mock.Mock()
    train.push_to_hub(tmp_path, "me/glm-tiny", private=True, api=api)
    api.create_repo.assert_called_once_with("me/glm-tiny", private=True, exist_ok=True)
    kwargs = api.upload_folder.call_args.kwargs
    assert kwargs["repo_id"] == "me/glm-tiny" and kwargs["folder_path"] == str(tmp_path)
    assert "checkpoints/*" in kwargs["ignore_patterns"]


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


def test_presets_load_through_autoconfig():
    args = train.parse_args(["--config_name", "chatglm3-6b", "--train_file", "x.txt"])
    config = train.load_config(args)
    assert (config.num_layers, config.padded_vocab_size, config.seq_length) == (28, 65024, 8192)
    args = train.parse_args(["--config_name", "glm-4-9b", "--train_file", "x.txt"])
    assert train.load_config(args).rope_ratio == 500


def test_builtin_heldout_is_disjoint_from_training():
    train_rows, heldout = data_glm.skill_splits(n_train=5000, n_heldout=150, seed=0)
    seen = {json.dumps(r["conversations"][:-1] if len(r["conversations"]) == 2 else r["conversations"][:2],
                       ensure_ascii=False) for r in train_rows}
    for row in heldout:
        assert json.dumps(row["conversations"][:-1], ensure_ascii=False) not in seen


def test_openai_format_rows_train_as_their_chatglm3_form(workspace, tmp_path):
    """A `messages` column with OpenAI's tool calls (content null, JSON-string arguments), role `tool` and a `tools`
    column trains exactly as the same conversations in the ChatGLM3 format."""
    import ast
    import re

    rows, _ = data_glm.skill_splits(n_train=48, n_heldout=3, seed=1, tool_fraction=0.5)
    files = {"glm": tmp_path / "glm.jsonl", "openai": tmp_path / "openai.jsonl"}
    with open(files["glm"], "w") as glm_file, open(files["openai"], "w") as openai_file:
        for row in rows:
            chatglm3, openai, tools = [], [], None
            for message in row["conversations"]:
                call = re.search(r"tool_call\(city=(.+)\)", message["content"])
                if message["role"] == "assistant" and call:
                    arguments = {"city": ast.literal_eval(call.group(1))}
                    chatglm3.append({"role": "assistant", "metadata": "get_weather",
                                     "content": glm.tokenization.format_tool_call("get_weather", arguments)[1]})
                    openai.append({"role": "assistant", "content": None, "tool_calls": [
                        {"type": "function", "function": {"name": "get_weather", "arguments": json.dumps(arguments)}}]})
                elif message["role"] == "observation":
                    chatglm3.append(message)
                    openai.append({"role": "tool", "tool_call_id": "call_0", "content": message["content"]})
                elif message["role"] == "system":
                    chatglm3.append(message)
                    openai.append({"role": "system", "content": message["content"]})
                    tools = json.dumps(message["tools"])
                else:
                    chatglm3.append(message)
                    openai.append(message)
            glm_file.write(json.dumps({"conversations": chatglm3}, ensure_ascii=False) + "\n")
            openai_file.write(json.dumps({"messages": openai, "tools": tools}, ensure_ascii=False) + "\n")
    for name, path in files.items():
        train.main(common(workspace, tmp_path / name, "--train_file", str(path), "--max_train_steps", "3",
                          "--per_device_train_batch_size", "8", "--block_size", "128"))
    assert losses(tmp_path / "glm") == losses(tmp_path / "openai") and len(losses(tmp_path / "glm")) == 3


# The lines a built-in run prints (the main job's log); a chat reply follows each "chat>" line.
OWN_LINES = [r"mode (sft|pretrain): ", r"checkpoints every \d+ steps", r"training: +\d+%", r"step \d+: loss ",
             r"held-out exact match: ", r"miss: ", r"chat> ", r"done in \d+s; the model folder is "]


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
