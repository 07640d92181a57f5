"""Shared test helpers: the repository's code as a package, the reference folder, tiny configs."""

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from local_glm import glm  # noqa: E402

REFERENCE = Path(os.environ.get("GLM_REFERENCE_DIR", ROOT.parent / "shared" / "reference"))
# The same artifacts shipped with the repository (small files), so a plain clone runs every test; the real
# tokenizer.model is the repository root's own (byte-identical to the published one).
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "reference"
SHIPPED = {("chatglm3-6b", "tokenizer.model"): ROOT / "tokenizer.model"}


def pytest_configure(config):
    config.addinivalue_line("markers", "real_width: builds a chatglm3-6b-width folder (about 1.9 GB, a minute); CI "
                                       "runs these once, in the current-transformers leg")


def reference_file(*parts) -> Path:
    """A file of the reference artifacts (GLM_REFERENCE_DIR or ../shared/reference, else the copy under
    tests/fixtures), or skip the test saying where it was looked for."""
    for path in (REFERENCE.joinpath(*parts), SHIPPED.get(parts), FIXTURES.joinpath(*parts)):
        if path is not None and path.exists():
            return path
    pytest.skip(f"reference artifact {'/'.join(parts)} is absent from {REFERENCE} and {FIXTURES}")


def import_extra(name):
    """An optional dependency (torchao) that scripts/test.sh installs outside site-packages, in GLM_EXTRAS; skips
    the test naming the install command when it is absent."""
    extras = os.environ.get("GLM_EXTRAS")
    if extras and extras not in sys.path:
        sys.path.append(extras)
    return pytest.importorskip(name, reason=f"{name} is not installed: pip install -r requirements-quantize.txt "
                                            "(scripts/test.sh installs it into GLM_EXTRAS)")


def tiny_config(**overrides):
    """A small random-weight GLM config; any ChatGLMConfig key can be overridden."""
    values = dict(num_layers=2, hidden_size=64, num_attention_heads=8, multi_query_group_num=2, kv_channels=8,
                  ffn_hidden_size=96, padded_vocab_size=128, seq_length=256, pad_token_id=0, eos_token_id=2)
    values.update(overrides)
    return glm.ChatGLMConfig(**values)


def train_to_replay(conversations, tokenizer, config, steps, stop_loss):
    """A GLM trained on `conversations` until greedy decoding replays them (loss under `stop_loss`, or `steps`).
    A conversation is a message list, or a (messages, tools) pair rendered with `tools=` as a server does."""
    import torch

    pairs = [item if isinstance(item, tuple) else (item, None) for item in conversations]
    rows = [tokenizer.tokenize_conversation(messages, tools=tools) for messages, tools in pairs]
    torch.manual_seed(0)
    model = glm.ChatGLMForConditionalGeneration(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = sum(model(torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]])).loss for row in rows)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if loss.item() < stop_loss:
            break
    model.generation_config.eos_token_id = tokenizer.stop_token_ids
    return model


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """For train.py's tests: a tiny config file, text and conversation files, and a saved tiny base model with its
    tokenizer (one per test module)."""
    from train_helpers import TINY, sentences

    from glm_train.data import builtin, sources

    root = tmp_path_factory.mktemp("train")
    config_path = root / "tiny.json"
    config_path.write_text(json.dumps(TINY))
    (root / "train.txt").write_text("\n".join(sentences(600)) + "\n")
    (root / "validation.txt").write_text("\n".join(sentences(60, seed=1)) + "\n")
    rows, _ = builtin.skill_splits(n_train=96, n_heldout=3, seed=0)
    with open(root / "chats.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    texts = sentences(600) + list(sources.conversation_texts(rows))
    tokenizer = glm.tokenization.train_glm_tokenizer(texts, vocab_size=500)
    config = glm.ChatGLMConfig(**{k: v for k, v in TINY.items() if k != "model_type"},
                               eos_token_id=tokenizer.stop_token_ids, pad_token_id=tokenizer.pad_token_id)
    import torch

    torch.manual_seed(0)
    base = root / "base"
    glm.ChatGLMForConditionalGeneration(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    return root


# chatglm3-6b's real width, 2 of its 28 layers, in THUDM's .bin shards of at most 700 MB (about 1.9 GB in all).
REAL_WIDTH_SHARD = 700 * 10**6


@pytest.fixture(scope="session")
def real_width_folder(tmp_path_factory):
    """A THUDM-format chatglm3-6b folder at real width with 2 layers and random weights (benchmarks/thudm_folder.py),
    built once per session (about 10 s); tests marked real_width use it and must not change it."""
    from benchmarks.thudm_folder import build_thudm_folder

    return build_thudm_folder(tmp_path_factory.mktemp("real-width") / "chatglm3-2l", num_layers=2,
                              max_shard_size=REAL_WIDTH_SHARD)
