"""The finished run as a Hub model repository: weights (or a LoRA adapter), config.json with auto_map and the code
files, the tokenizer, generation_config.json with every stop token, a model card with its loss curve; and the upload.
"""

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import TOKENIZER_COPY

# datasets' packaged builders: a --dataset_name that names one reads local files, not a Hub dataset.
PACKAGED_BUILDERS = {"json", "csv", "text", "parquet", "arrow", "pandas", "sql", "xml", "webdataset", "imagefolder",
                     "audiofolder", "videofolder"}


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
    language: list = field(default_factory=list)  # ISO 639-1 codes of the data, where known
    dataset: str = None  # --dataset_name


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
    # What config.json records as _name_or_path follows from this (ChatGLMConfig.saved_name_or_path): the base's Hub
    # id, or for a ChatGLM3-format model without a THUDM/chatglm3-6b one the format's name llama.cpp reads.
    unwrapped.config.name_or_path = base_hub_id(facts.base) or ""
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
        finish_folder(output_dir, tokenizer, unwrapped.config.seq_length)
        write_model_card(output_dir, facts, summary)


def finish_folder(output_dir: Path, tokenizer, seq_length: int):
    """What a model folder needs beside the weights (main process): the config values engines read, the tokenizer
    (its model_max_length the model's context) and the generation config with every stop token."""
    from transformers import GenerationConfig

    if (output_dir / "config.json").exists():  # not for a LoRA adapter alone
        write_engine_config(output_dir / "config.json", tokenizer)
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
    """The base model's Hub id ("org/name"), or None: a Hub id given as --model_name_or_path; for a local base folder
    the Hub id its config.json records as `_name_or_path` (THUDM's files carry theirs), else the `base_model` its
    model card names. Never a local path."""
    from local_glm import glm

    is_hub_id = glm.configuration.is_hub_id
    if base is None or is_hub_id(base):
        return base
    folder = Path(base)
    config = folder / "config.json"
    name = json.loads(config.read_text()).get("_name_or_path") if config.exists() else None
    if is_hub_id(name):
        return name
    card = local_card(folder)
    named = card.data.base_model if card else None
    named = named[0] if isinstance(named, list) and len(named) == 1 else named
    return named if is_hub_id(named) else None


def local_card(folder: Path):
    """A local model folder's card (README.md) as a huggingface_hub ModelCard, or None when it has none."""
    from huggingface_hub import ModelCard

    readme = Path(folder) / "README.md"
    return ModelCard.load(readme) if readme.exists() else None


def write_engine_config(path: Path, tokenizer):
    """config.json values that serving engines' converters read beyond what ChatGLMConfig writes itself
    (docs/architecture.md section 8, docs/engines.md): `eos_token_id` one int for ChatGLM3 (chatglm.cpp packs it as
    one; the stop list is in generation_config.json). `_name_or_path`, which llama.cpp reads, is the config's own
    (ChatGLMConfig.saved_name_or_path), as on every save path."""
    config = json.loads(path.read_text())
    if isinstance(config.get("eos_token_id"), list) and not tokenizer.is_glm4:
        config["eos_token_id"] = tokenizer.eos_token_id  # GLM-4's published config keeps its list
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


def hub_dataset(dataset_name):
    """--dataset_name as the Hub dataset id the card lists, or None for local files and datasets' packaged
    builders ("json", "csv", ...)."""
    if not dataset_name or os.path.exists(dataset_name) or dataset_name in PACKAGED_BUILDERS:
        return None
    return dataset_name if re.fullmatch(r"([A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*", dataset_name) else None


def base_license(base, hub_id):
    """The licence metadata a fine-tune inherits: {"license", "license_name", "license_link"} from the base's card
    (a local base folder's README.md, else the Hub base's card, from the cache when offline), and the reason when no
    card could be read (the card then says `other`: the base's terms apply)."""
    from huggingface_hub import ModelCard
    from huggingface_hub.errors import HfHubHTTPError

    card, reason = local_card(Path(base)) if Path(base).is_dir() else None, None
    if (card is None or not card.data.license) and hub_id:
        try:
            card = ModelCard.load(hub_id)
        except (OSError, ValueError, HfHubHTTPError) as error:  # offline, not cached, no card: said in the card
            reason = f"{hub_id}'s model card could not be read ({type(error).__name__})"
    if card is None or not card.data.license:
        return {"license": "other"}, reason or f"the base model ({hub_id or 'a local folder'}) names no licence"
    return {key: card.data.get(key) for key in ("license", "license_name", "license_link")
            if card.data.get(key)}, None


def eval_results(summary: dict, dataset_type: str, dataset_name: str):
    """huggingface_hub EvalResults of what the run measured: validation loss and perplexity, and the built-in run's
    held-out exact match (absent values are left out)."""
    from huggingface_hub import EvalResult

    measured = [("loss", "validation loss", summary.get("eval_loss"), "validation"),
                ("perplexity", "validation perplexity", summary.get("perplexity"), "validation"),
                ("exact_match", "held-out exact match", summary.get("heldout_exact_match"), "test")]
    return [EvalResult(task_type="text-generation", task_name="Text generation", dataset_type=dataset_type,
                       dataset_name=dataset_name, dataset_split=split, metric_type=metric, metric_name=name,
                       metric_value=round(float(value), 6))
            for metric, name, value, split in measured if value is not None]


def card_data(facts: RunFacts, summary: dict, model_name: str):
    """The model card's metadata as huggingface_hub's ModelCardData, and the licence note for the body (or None)."""
    from huggingface_hub import ModelCardData

    base = base_hub_id(facts.base)  # never a local path in the card
    adapter = facts.lora and not facts.merged
    tags = ["glm", "chatglm", "custom_code", "text-generation", facts.mode] + \
        (["lora", "peft"] if facts.lora else []) + (["p-tuning-v2"] if facts.method == "P-tuning v2" else [])
    dataset = hub_dataset(facts.dataset)
    values = dict(library_name="peft" if adapter else "transformers", pipeline_tag="text-generation", tags=tags,
                  language=facts.language or None, datasets=[dataset] if dataset else None, model_name=model_name,
                  eval_results=eval_results(summary, dataset or "custom", facts.data) or None)
    note = None
    if facts.base is None:
        values["license"] = "mit"  # trained from scratch with this repository's MIT-licensed code
    else:
        licence, note = base_license(facts.base, base)
        values.update(licence)
        if base:
            values.update(base_model=base, base_model_relation="adapter" if adapter else "finetune")
    return ModelCardData(**{k: v for k, v in values.items() if v is not None}), note


def write_model_card(output_dir: Path, facts: RunFacts, summary: dict):
    """README.md: Hub metadata (huggingface_hub's ModelCardData: library, pipeline, tags including custom_code,
    language, datasets, base model and relation, licence, the evaluation as model-index), what was trained on, the
    final numbers and the loss curve. Written again once the held-out score is known."""
    from huggingface_hub import ModelCard

    plot_loss(output_dir / "metrics.jsonl", output_dir / "loss_curve.png")
    name = facts.name or output_dir.name
    data, licence_note = card_data(facts, summary, name)
    base = data.base_model

    def number(value):
        return "n/a" if value is None else f"{value:.4g}"

    origin = ("fine-tuned from " + (base or "a local model") if facts.base
              else "trained from scratch with config " + str(facts.config_name))
    licence = (f"Licence: {data.license}, the base model's." if facts.base and not licence_note else
               f"Licence: the base model's terms apply ({licence_note})." if facts.base else
               "Licence: MIT, as this repository's code; the weights were trained from scratch.")
    heldout = ("" if summary.get("heldout_exact_match") is None else
               f"\nHeld-out exact match of greedy replies (questions never seen in training): "
               f"{summary['heldout_exact_match']:.1%} ({summary.get('heldout_details', '')}).\n")
    body = f"""
# {name}

A GLM model ({origin})
by this repository's `train.py` ({facts.method} training, {facts.mode} mode).

{licence}

| | |
|---|---|
| data | {facts.data} |
| steps | {summary['steps']} |
| batch | {facts.batch} |
| learning rate | {facts.learning_rate} |
| final training loss | {number(summary['final_loss'])} |
| validation loss | {number(summary['eval_loss'])} |
| validation perplexity | {number(summary['perplexity'])} |
{heldout}
![loss curve](loss_curve.png)

## Use

The model's code is in this repository (`custom_code`): load it with `trust_remote_code=True`.

```python
from transformers import AutoModel, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("{name}", trust_remote_code=True)
model = AutoModel.from_pretrained("{name}", trust_remote_code=True)
```
"""
    ModelCard(f"---\n{data.to_yaml()}\n---\n{body}").save(output_dir / "README.md")


def push_to_hub(output_dir: Path, repo_id: str, token=None, private=False, api=None):
    """Upload the model folder (not checkpoints, logs or the resume copy of the tokenizer)."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(output_dir), commit_message="Upload model trained by train.py",
                      ignore_patterns=["checkpoints/*", "runs/*", "tokenizer/*"])
    return url
