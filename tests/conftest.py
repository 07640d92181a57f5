"""Shared test helpers: the repository's code as a package, the reference folder, tiny configs."""

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


def reference_file(*parts) -> Path:
    """A file of the reference artifacts, or skip the test saying where it was looked for."""
    path = REFERENCE.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference artifact {path} is absent (set GLM_REFERENCE_DIR to a copy of shared/reference)")
    return path


def tiny_config(**overrides):
    """A small random-weight GLM config; any ChatGLMConfig key can be overridden."""
    values = dict(num_layers=2, hidden_size=64, num_attention_heads=8, multi_query_group_num=2, kv_channels=8,
                  ffn_hidden_size=96, padded_vocab_size=128, seq_length=256, pad_token_id=0, eos_token_id=2)
    values.update(overrides)
    return glm.ChatGLMConfig(**values)
