"""glm_train/publish.py: the finished folder is a complete Hub repository that loads in a fresh process; the
upload sends the model folder only."""

import json
import subprocess
from unittest import mock

from conftest import glm
from train_helpers import ENV, PYTHON, TINY, metrics

import train
from glm_train import publish


def test_output_folder_loads_through_automodel_in_a_fresh_process(workspace, tmp_path):
    out = tmp_path / "card"
    train.main(["--config_name", str(workspace / "tiny.json"), "--output_dir", str(out), "--max_train_steps", "3",
                "--builtin_train_examples", "200", "--builtin_heldout_examples", "3", "--tokenizer_vocab_size", "800",
                "--block_size", "128",
                "--per_device_train_batch_size", "8"])
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "configuration_glm.py", "modeling_glm.py", "chat_glm.py",
            "tokenization_glm.py", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md",
            "tokenizer.model",  # the trained SentencePiece model: llama.cpp's and chatglm.cpp's converters read it
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


def test_push_to_hub_uploads_the_model_folder(tmp_path):
    api = mock.Mock()
    publish.push_to_hub(tmp_path, "me/glm-tiny", private=True, api=api)
    api.create_repo.assert_called_once_with("me/glm-tiny", private=True, exist_ok=True)
    kwargs = api.upload_folder.call_args.kwargs
    assert kwargs["repo_id"] == "me/glm-tiny" and kwargs["folder_path"] == str(tmp_path)
    assert "checkpoints/*" in kwargs["ignore_patterns"]
