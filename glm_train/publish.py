"""The finished run as a Hub model repository: weights (or a LoRA adapter), config.json with auto_map and the code
files, the tokenizer, generation_config.json with every stop token, a model card with its loss curve; and the upload.
"""

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import TOKENIZER_COPY

# llama.cpp's converter takes ChatGLM3's SentencePiece vocabulary only when config.json's _name_or_path contains
# "THUDM/chatglm3-6b". A folder without a Hub base records this: it names the format, and is no Hub id (the space).
GLM3_FORMAT_NAME = "THUDM/chatglm3-6b tokenizer format"


@dataclass
class RunFacts:
    """What the model card says about the run."""

    base: str = None  # --model_name_or_path: a Hub id or a local folder; None from scratch
    config_name: str = None
    data: str = ""
    method: str = "full"  # full, LoRA or P-tuning v2
    mode: str = "sft"
    batch: str = ""
    learning_rate: str = ""
    name: str = None  # the Hub repository name (default: the folder's)
    lora: bool = False
    merged: bool = False


def save_output(accelerator, model, tokenizer, output_dir: Path, facts: RunFacts, summary: dict,
                max_shard_size="5GB"):
    """The model folder: every process's part of the weights gathered and written by the main process, with config,
    code files, tokenizer, generation config and model card. A LoRA run writes its adapter (and with
    `facts.merged` the merged weights too)."""
    lora, merge_lora = facts.lora, facts.merged
    output_dir = Path(output_dir)
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)
    if not lora:
        unwrapped = savable_model(unwrapped)
    save = dict(is_main_process=accelerator.is_main_process, save_function=accelerator.save,
                max_shard_size=max_shard_size)
    if lora:
        # The adapter alone (small, loads with peft on top of the base), and with --merge_lora full weights.
        adapter_dir = output_dir / "adapter" if merge_lora else output_dir
        unwrapped.save_pretrained(adapter_dir, state_dict=state_dict, **save)
        if merge_lora and accelerator.is_main_process:
            merged = unwrapped.merge_and_unload()
            merged.save_pretrained(output_dir, max_shard_size=max_shard_size)
    else:
        unwrapped.save_pretrained(output_dir, state_dict=state_dict, **save)
    if accelerator.is_main_process:
        finish_folder(output_dir, tokenizer, unwrapped.config.seq_length, facts.base)
        write_model_card(output_dir, facts, summary)


def finish_folder(output_dir: Path, tokenizer, seq_length: int, base=None):
    """What a model folder needs beside the weights (main process): the config values engines read, the tokenizer
    (its model_max_length the model's context) and the generation config with every stop token."""
    from transformers import GenerationConfig

    if (output_dir / "config.json").exists():  # not for a LoRA adapter alone
        write_engine_config(output_dir / "config.json", base, tokenizer)
    tokenizer.model_max_length = seq_length  # so truncation=True means the model's context
    tokenizer.save_pretrained(output_dir)
    # The working copy a from-scratch run kept for resumes; the folder's own tokenizer files replace it.
    shutil.rmtree(output_dir / TOKENIZER_COPY, ignore_errors=True)
    GenerationConfig(eos_token_id=list(tokenizer.stop_token_ids), pad_token_id=tokenizer.pad_token_id,
                     do_sample=False).save_pretrained(output_dir)


def savable_model(model):
    """The model as its own class for save_pretrained. FSDP2 turns it into a subclass FSDP<Class> defined in torch,
    whose source files transformers would copy as the model's code; a meta-device instance of the real class (the
    weights come from the gathered state dict) saves the folder instead."""
    import torch

    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return model
    if not isinstance(model, FSDPModule):
        return model
    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        return cls(model.config)


def base_hub_id(base):
    """The base model's Hub id ("org/name"), or None: a Hub id given as --model_name_or_path, else the
    `_name_or_path` that a local base folder's config.json records (THUDM's files carry theirs)."""
    if base is None:
        return None
    if (Path(base) / "config.json").exists():
        base = json.loads((Path(base) / "config.json").read_text()).get("_name_or_path") or ""
    is_hub_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", base) and not Path(base).exists()
    return base if is_hub_id else None


def write_engine_config(path: Path, base, tokenizer):
    """config.json values that serving engines' converters read (docs/architecture.md section 8, docs/engines.md):
    `eos_token_id` one int (chatglm.cpp packs it as one; the stop list is in generation_config.json), `vocab_size`
    (llama.cpp's converter reads it), and `_name_or_path`: the base's Hub id, or for a ChatGLM3-format tokenizer
    without one GLM3_FORMAT_NAME (llama.cpp reads the SentencePiece vocabulary only then)."""
    config = json.loads(path.read_text())
    if isinstance(config.get("eos_token_id"), list) and not tokenizer.is_glm4:
        config["eos_token_id"] = tokenizer.eos_token_id  # GLM-4's published config keeps its list
    name = base_hub_id(base) or (None if tokenizer.is_glm4 else GLM3_FORMAT_NAME)
    if name:
        config["_name_or_path"] = name
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def plot_loss(metrics_path: Path, picture: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    figure, axes = plt.subplots(figsize=(6, 3.5))
    if train:
        axes.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        axes.plot(*zip(*evals), "o-", label="validation loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_yscale("log")
    axes.legend()
    figure.tight_layout()
    figure.savefig(picture, dpi=100)
    plt.close(figure)


def write_model_card(output_dir: Path, facts: RunFacts, summary: dict):
    """README.md with Hub metadata, what was trained on, the final numbers and the loss curve."""
    plot_loss(output_dir / "metrics.jsonl", output_dir / "loss_curve.png")
    base = base_hub_id(facts.base)  # never a local path in the card
    tags = ["glm", "chatglm", "text-generation", facts.mode] + (["lora", "peft"] if facts.lora else []) + \
        (["p-tuning-v2"] if facts.method == "P-tuning v2" else [])
    header = ["---", "license: mit", "library_name: " + ("peft" if facts.lora and not facts.merged
                                                         else "transformers"),
              "pipeline_tag: text-generation", "tags:"] + [f"- {t}" for t in tags]
    if base:
        header.append(f"base_model: {base}")
    header.append("---")

    def number(value):
        return "n/a" if value is None else f"{value:.4g}"

    name = facts.name or output_dir
    origin = ("fine-tuned from " + (base or "a local model") if facts.base
              else "trained from scratch with config " + str(facts.config_name))
    body = f"""
# {facts.name or output_dir.name}

A GLM model ({origin})
by this repository's `train.py` ({facts.method} training, {facts.mode} mode).

| | |
|---|---|
| data | {facts.data} |
| steps | {summary['steps']} |
| batch | {facts.batch} |
| learning rate | {facts.learning_rate} |
| final training loss | {number(summary['final_loss'])} |
| validation loss | {number(summary['eval_loss'])} |
| validation perplexity | {number(summary['perplexity'])} |

![loss curve](loss_curve.png)

## Use

```python
from transformers import AutoModel, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("{name}", trust_remote_code=True)
model = AutoModel.from_pretrained("{name}", trust_remote_code=True)
```
"""
    (output_dir / "README.md").write_text("\n".join(header) + "\n" + body)


def push_to_hub(output_dir: Path, repo_id: str, token=None, private=False, api=None):
    """Upload the model folder (not checkpoints, logs or the resume copy of the tokenizer)."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(output_dir), commit_message="Upload model trained by train.py",
                      ignore_patterns=["checkpoints/*", "runs/*", "tokenizer/*"])
    return url
