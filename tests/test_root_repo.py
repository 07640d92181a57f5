"""The repository root is a Hub model repository: config, code and tokenizer load from it with the Auto classes."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT, reference_file

CHATGLM3_TOKENIZER_SHA256 = "e7dc4c393423b76e4373e5157ddc34803a0189ba96b21ddbb40269d31468a6f2"


def test_root_tokenizer_model_is_the_published_chatglm3_file():
    assert hashlib.sha256((ROOT / "tokenizer.model").read_bytes()).hexdigest() == CHATGLM3_TOKENIZER_SHA256


def test_root_loads_through_auto_classes_in_a_fresh_process():
    """AutoConfig, AutoTokenizer and a meta-device AutoModel from the root folder, offline, with no oracle library."""
    script = textwrap.dedent(f"""
        import json, sys, torch
        sys.modules["sentencepiece"] = None  # loading tokenizer.json must not need the converter
        sys.modules["tiktoken"] = None
        from transformers import AutoConfig, AutoModel, AutoTokenizer, GenerationConfig
        root = {str(ROOT)!r}
        config = AutoConfig.from_pretrained(root, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained(root, trust_remote_code=True)
        with torch.device("meta"):
            model = AutoModel.from_config(config, trust_remote_code=True)
        prompt = tokenizer.build_chat_input("你好")["input_ids"][0].tolist()
        print(json.dumps({{
            "model": type(model).__name__,
            "params": sum(p.numel() for p in model.parameters()),
            "hello": tokenizer("你好")["input_ids"],
            "prompt": prompt,
            "stops": tokenizer.stop_token_ids,
            "eos": GenerationConfig.from_pretrained(root).eos_token_id,
            "padding_side": tokenizer.padding_side,
            "vocab": len(tokenizer),
        }}))
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    result = subprocess.run([sys.executable, "-c", script], cwd="/", env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["model"] == "ChatGLMForConditionalGeneration"
    assert out["params"] == 6_243_584_000
    assert out["hello"] == [64790, 64792, 36474, 54591]  # docs/architecture.md section 5
    assert out["prompt"] == [64790, 64792, 64795, 30910, 13, 36474, 54591, 64796]
    assert out["stops"] == out["eos"] == [2, 64795, 64797]
    assert out["padding_side"] == "left" and out["vocab"] == 64798


def test_root_tokenizer_matches_sentencepiece():
    sentencepiece = pytest.importorskip("sentencepiece")
    from transformers import AutoTokenizer

    oracle = sentencepiece.SentencePieceProcessor(model_file=str(reference_file("chatglm3-6b", "tokenizer.model")))
    tokenizer = AutoTokenizer.from_pretrained(ROOT, trust_remote_code=True)
    for text in ["Hello, 世界! 123 4567", "  two  spaces\tand\ttabs\n\nnew lines", "emoji 🤖👩‍💻 and 𠀋𪚥",
                 "def f(x):\n    return x ** 2  # code", "<|assistant|> stays text"]:
        ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert ids == oracle.encode(text), text


def test_root_config_and_readme_front_matter():
    config = json.loads((ROOT / "config.json").read_text())
    assert config["model_type"] == "chatglm" and config["auto_map"]["AutoConfig"] == "configuration_glm.ChatGLMConfig"
    tokenizer_config = json.loads((ROOT / "tokenizer_config.json").read_text())
    assert tokenizer_config["auto_map"]["AutoTokenizer"][0] == "tokenization_glm.ChatGLMTokenizer"
    readme = (ROOT / "README.md").read_text()
    front = readme.split("---")[1]
    for line in ("license: mit", "library_name: transformers", "pipeline_tag: text-generation", "- zh", "- en"):
        assert line in front, line


def test_root_tokenizer_files_are_what_save_pretrained_writes(tmp_path):
    from conftest import glm

    glm.ChatGLMTokenizer(vocab_file=str(ROOT / "tokenizer.model"), model_max_length=8192).save_pretrained(tmp_path)
    assert json.loads((ROOT / "tokenizer.json").read_text()) == json.loads((tmp_path / "tokenizer.json").read_text())
    root, saved = (json.loads((folder / "tokenizer_config.json").read_text()) for folder in (ROOT, tmp_path))
    # The root's were written by transformers 5 ("backend"); 4.57 writes added_tokens_decoder besides, and has no
    # response parsing, so it does not save response_template.
    import transformers

    skip = {"backend"} | ({"response_template"} if transformers.__version__.startswith("4.") else set())
    assert {k: v for k, v in root.items() if k not in skip} == {k: saved[k] for k in root if k not in skip}
    assert root["response_template"] == glm.tokenization.response_template(False)
    config = json.loads((ROOT / "tokenizer_config.json").read_text())
    assert config["split_special_tokens"] is False and config["model_max_length"] == 8192
