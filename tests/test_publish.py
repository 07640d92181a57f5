"""glm_train/publish.py: the finished folder is a complete Hub repository that loads in a fresh process; its model
card's metadata is what huggingface_hub's own classes read back; the upload sends the model folder, and the repository
it makes loads with trust_remote_code."""

import base64
import gzip
import json
import math
import re
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from unittest import mock

import pytest
from conftest import glm
from train_helpers import ENV, PYTHON, TINY, metrics

import train
from glm_train import publish

LOAD_SCRIPT = (
    "import json, sys\n"
    "from transformers import AutoModel, AutoTokenizer\n"
    "path = sys.argv[1]\n"
    "tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)\n"
    "model = AutoModel.from_pretrained(path, trust_remote_code=True)\n"
    "ids = tok.build_chat_input('What is 1 plus 2?')\n"
    "out = model.generate(**ids, max_new_tokens=3, do_sample=False)\n"
    "print(json.dumps({'cls': type(model).__name__, 'stop': tok.stop_token_ids, 'n': out.shape[1]}))\n"
)


def load_in_fresh_process(folder, cwd):
    result = subprocess.run([PYTHON, "-c", LOAD_SCRIPT, str(folder)], cwd=cwd, env=ENV, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def scratch_out(workspace, tmp_path_factory):
    """train.py from scratch on the built-in data (with its held-out exact match)."""
    out = tmp_path_factory.mktemp("card") / "card"
    train.main(["--config_name", str(workspace / "tiny.json"), "--output_dir", str(out), "--max_train_steps", "3",
                "--builtin_train_examples", "200", "--builtin_heldout_examples", "3", "--tokenizer_vocab_size", "800",
                "--block_size", "128", "--per_device_train_batch_size", "8", "--eval_steps", "3"])
    return out


def test_output_folder_loads_through_automodel_in_a_fresh_process(scratch_out, tmp_path):
    out = scratch_out
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "configuration_glm.py", "modeling_glm.py", "chat_glm.py",
            "tokenization_glm.py", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md",
            "tokenizer.model",  # the trained SentencePiece model: llama.cpp's and chatglm.cpp's converters read it
            "loss_curve.png", "metrics.jsonl"} <= names
    assert "tokenizer" not in names  # the from-scratch working copy is not left in the Hub folder
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_glm.ChatGLMForConditionalGeneration"
    assert config["_name_or_path"] == glm.configuration.GLM3_FORMAT_NAME  # no Hub base: llama.cpp's SentencePiece path
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["model_max_length"] == config["seq_length"] == TINY["seq_length"]
    assert tokenizer_config["split_special_tokens"] is False
    assert not set(tokenizer_config) & set(glm.tokenization.LOAD_TIME_KEYS)  # a Hub folder holds no load options
    generation = json.loads((out / "generation_config.json").read_text())
    card = (out / "README.md").read_text()
    assert "![loss curve](loss_curve.png)" in card and "| steps | 3 |" in card
    assert any("heldout_exact_match" in r for r in metrics(out))
    loaded = load_in_fresh_process(out, tmp_path)
    assert loaded["cls"] == "ChatGLMForConditionalGeneration"
    assert generation["eos_token_id"] == loaded["stop"]


def read_card(folder):
    """The card through huggingface_hub: ModelCard.load parses the metadata into ModelCardData (model-index into
    EvalResults, raising on a malformed one); the data must also rebuild itself from its own dict unchanged."""
    from huggingface_hub import ModelCard, ModelCardData
    from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

    card = ModelCard.load(Path(folder) / "README.md", ignore_metadata_errors=False)
    values = card.data.to_dict()
    assert ModelCardData(**values).to_dict() == values
    if card.data.eval_results:
        index = eval_results_to_model_index(card.data.model_name, card.data.eval_results)
        assert index == values["model-index"]
        name, results = model_index_to_eval_results(index)
        assert name == card.data.model_name and results == card.data.eval_results
    return card.data


def results(data):
    return {r.metric_type: (r.metric_value, r.dataset_split, r.dataset_type) for r in data.eval_results}


def test_scratch_card_metadata_is_read_back_by_huggingface_hub(scratch_out):
    data = read_card(scratch_out)
    assert data.license == "mit"  # trained from scratch with this repository's MIT code
    assert (data.library_name, data.pipeline_tag) == ("transformers", "text-generation")
    assert {"custom_code", "glm", "chatglm"} <= set(data.tags)
    assert data.language == ["en", "zh"]  # the built-in data's languages
    assert data.base_model is None and data.datasets is None and data.get("base_model_relation") is None
    records = metrics(scratch_out)
    eval_loss = [r["eval_loss"] for r in records if "eval_loss" in r][-1]
    exact = [r["heldout_exact_match"] for r in records if "heldout_exact_match" in r][-1]
    measured = results(data)
    assert measured["loss"][:2] == (pytest.approx(eval_loss, abs=1e-6), "validation")
    assert measured["perplexity"][0] == pytest.approx(math.exp(eval_loss), rel=1e-5)
    assert measured["exact_match"][:2] == (pytest.approx(exact), "test")
    assert data.model_name == scratch_out.name
    assert "Held-out exact match of greedy replies" in (scratch_out / "README.md").read_text()


def write_card(folder, facts):
    """publish.write_model_card for a 2-step run's summary; returns the card data as huggingface_hub reads it."""
    folder.mkdir(exist_ok=True)
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.0, "eval_loss": 2.25}\n')
    summary = {"steps": 2, "final_loss": 2.0, "eval_loss": 2.25, "perplexity": math.exp(2.25)}
    publish.write_model_card(folder, publish.RunFacts(**facts), summary)
    return read_card(folder)


def cached_card(cache, repo_id, metadata):
    """A Hub model card in huggingface_hub's cache layout (models--org--name/refs/main -> snapshots/<commit>), as a
    user's cache holds it: read offline."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "README.md").write_text(f"---\n{metadata}---\n# {repo_id}\n")


def test_card_of_a_fine_tune_of_a_hub_id(tmp_path, monkeypatch):
    facts = dict(base="THUDM/chatglm3-6b", data="org/chats", dataset="org/chats", method="LoRA", lora=True)
    data = write_card(tmp_path / "adapter", facts)  # offline, the base's card not cached
    assert (data.base_model, data.get("base_model_relation")) == ("THUDM/chatglm3-6b", "adapter")
    assert data.library_name == "peft" and {"custom_code", "lora", "peft"} <= set(data.tags)
    assert data.license == "other" and data.datasets == ["org/chats"] and data.language is None
    assert "THUDM/chatglm3-6b's model card could not be read" in (tmp_path / "adapter" / "README.md").read_text()
    assert results(data) == {"loss": (2.25, "validation", "org/chats"),
                             "perplexity": (pytest.approx(math.exp(2.25)), "validation", "org/chats")}

    cached_card(tmp_path / "hub", "THUDM/chatglm3-6b", "license: other\nlicense_name: chatglm3-6b\n"
                "license_link: https://huggingface.co/THUDM/chatglm3-6b/blob/main/MODEL_LICENSE\n")
    facts.update(lora=False, method="full")
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # the user's cache
    data = write_card(tmp_path / "full", facts)
    assert (data.license, data.license_name) == ("other", "chatglm3-6b")  # the base's own licence, from its card
    assert data.license_link.endswith("/MODEL_LICENSE")
    assert (data.get("base_model_relation"), data.library_name) == ("finetune", "transformers")


def test_card_of_a_fine_tune_of_a_local_folder(tmp_path):
    # A local copy of THUDM's files: config.json names the Hub id; no card of its own.
    thudm = tmp_path / "chatglm3-6b"
    thudm.mkdir()
    (thudm / "config.json").write_text(json.dumps({"_name_or_path": "THUDM/chatglm3-6b", "eos_token_id": 2}))
    data = write_card(tmp_path / "a", dict(base=str(thudm), data="chats.jsonl"))
    text = (tmp_path / "a" / "README.md").read_text()
    assert data.base_model == "THUDM/chatglm3-6b" and str(tmp_path) not in text  # the Hub id, never the path
    assert data.license == "other" and "the base model's terms apply" in text

    # Our own earlier output: config.json holds the format's name (no Hub id), the card names its base and licence.
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "config.json").write_text(json.dumps({"_name_or_path": glm.configuration.GLM3_FORMAT_NAME}))
    (ours / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: someone/chatglm3-ft\n---\n# ours\n")
    data = write_card(tmp_path / "b", dict(base=str(ours), data="chats.jsonl"))
    assert (data.base_model, data.license, data.get("base_model_relation")) == ("someone/chatglm3-ft", "apache-2.0",
                                                                                "finetune")
    assert str(tmp_path) not in (tmp_path / "b" / "README.md").read_text()

    # A local folder that names no Hub base: no base_model at all, and the licence is still the base's.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    data = write_card(tmp_path / "c", dict(base=str(bare), data="chats.jsonl"))
    assert data.base_model is None and data.license == "other"


class FakeHub(ThreadingHTTPServer):
    """A local stand-in for the Hub's HTTP API, enough for huggingface_hub's create_repo and upload_folder: it
    creates repositories, accepts the README's metadata, answers every preupload "regular" and writes each commit's
    files into `root`/<repo id>. Any other request is answered 404 and recorded in `unknown`."""

    def __init__(self, root):
        self.root, self.unknown = root, []
        super().__init__(("127.0.0.1", 0), FakeHubHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


class FakeHubHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def answer(self, value, status=200):
        body = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802 (the http.server name)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        hub, path = self.server, self.path.split("?")[0]
        if path == "/api/repos/create":
            request = json.loads(body)
            repo = f"{request['organization']}/{request['name']}" if request.get("organization") else request["name"]
            (hub.root / repo).mkdir(parents=True, exist_ok=True)
            return self.answer({"url": f"https://huggingface.co/{repo}", "name": repo})  # the Hub's own answer
        if path == "/api/validate-yaml":
            return self.answer({"errors": [], "warnings": []})
        match = re.fullmatch(r"/api/models/(.+)/(preupload|commit)/main", path)
        if match and match[2] == "preupload":
            files = json.loads(body)["files"]
            return self.answer({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                          for f in files]})
        if match:
            for line in body.decode().splitlines():
                entry = json.loads(line)
                if entry["key"] == "file":
                    target = hub.root / match[1] / entry["value"]["path"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(base64.b64decode(entry["value"]["content"]))
                elif entry["key"] != "header":
                    hub.unknown.append(f"commit entry {entry['key']}")
            return self.answer({"commitUrl": f"https://huggingface.co/{match[1]}/commit/{'0' * 40}",
                                "commitOid": "0" * 40})
        hub.unknown.append(f"POST {self.path}")
        return self.answer({"error": "not faked"}, 404)

    def do_GET(self):  # noqa: N802
        self.server.unknown.append(f"GET {self.path}")
        return self.answer({"error": "not faked"}, 404)

    do_HEAD = do_GET


def test_push_to_hub_makes_a_repository_that_loads_with_remote_code(scratch_out, tmp_path):
    """publish.push_to_hub through huggingface_hub's real client (HfApi) against a local fake Hub; the repository
    it makes holds every file auto_map names and loads with trust_remote_code in a fresh process."""
    (scratch_out / "checkpoints" / "step_3").mkdir(parents=True, exist_ok=True)  # what a run may leave beside it
    (scratch_out / "checkpoints" / "step_3" / "state.pt").write_bytes(b"x")
    hub = FakeHub(tmp_path / "hub")
    script = ("import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path\n"
              "from huggingface_hub import HfApi\n"
              "from glm_train import publish\n"
              "print(publish.push_to_hub(Path(sys.argv[2]), 'me/glm-tiny', api=HfApi(endpoint=sys.argv[3], "
              "token='hf_fake')))\n")
    from conftest import ROOT

    try:  # the client may reach the fake (loopback only; nothing leaves the machine)
        result = subprocess.run([PYTHON, "-c", script, str(ROOT), str(scratch_out), hub.url], capture_output=True,
                                env={**ENV, "HF_HUB_OFFLINE": "0", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"},
                                text=True, timeout=120)
    finally:
        hub.shutdown()
    assert result.returncode == 0 and not hub.unknown, (hub.unknown, result.stderr[-3000:])
    assert result.stdout.strip().endswith("/me/glm-tiny")
    repo = tmp_path / "hub" / "me" / "glm-tiny"
    files = {str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file()}
    assert not any(f.startswith(("checkpoints/", "runs/", "tokenizer/")) for f in files)
    assert {p.name for p in scratch_out.iterdir() if p.is_file()} == files  # the rest, byte for byte below
    assert all((repo / f).read_bytes() == (scratch_out / f).read_bytes() for f in files)
    # every auto_map entry names a code file that the repository holds, and so do their relative imports
    config = json.loads((repo / "config.json").read_text())
    tokenizer_config = json.loads((repo / "tokenizer_config.json").read_text())
    targets = list(config["auto_map"].values()) + [t for t in tokenizer_config["auto_map"]["AutoTokenizer"] if t]
    assert {t.split(".")[0] + ".py" for t in targets} <= files
    for code in [f for f in files if f.endswith(".py")]:
        imported = re.findall(r"^\s*from \.(\w+) import", (repo / code).read_text(), re.M)
        assert {name + ".py" for name in imported} <= files, code
    assert read_card(repo).license == "mit"
    loaded = load_in_fresh_process(repo, tmp_path)
    assert loaded["cls"] == "ChatGLMForConditionalGeneration"


def test_push_to_hub_uploads_the_model_folder(tmp_path):
    api = mock.Mock()
    publish.push_to_hub(tmp_path, "me/glm-tiny", private=True, api=api)
    api.create_repo.assert_called_once_with("me/glm-tiny", private=True, exist_ok=True)
    kwargs = api.upload_folder.call_args.kwargs
    assert kwargs["repo_id"] == "me/glm-tiny" and kwargs["folder_path"] == str(tmp_path)
    assert "checkpoints/*" in kwargs["ignore_patterns"]
