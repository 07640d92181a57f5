"""The model and tokenizer a run trains: a config from a preset or a saved folder, a tokenizer (given, the model's,
or trained from scratch on the data), and the model built from them, with LoRA or a P-tuning prefix where asked.
"""

import json
import os
import warnings
from pathlib import Path

from .errors import InputError

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "presets"
LORA_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


def resolve_config_path(name: str) -> str:
    """A preset name (presets/<name>.json) or a path to a config file / folder."""
    preset = PRESETS / f"{name}.json"
    if preset.exists():
        return str(preset)
    if os.path.exists(name):
        return name
    available = sorted(p.stem for p in PRESETS.glob("*.json"))
    raise InputError(f"--config_name {name!r} is neither a preset ({', '.join(available)}) nor a path")


def register_auto_classes():
    """Let AutoConfig / AutoModel* build our classes from a preset (model_type 'chatglm'); saved folders then get
    auto_map and the code files, because local_glm registers the classes for trust_remote_code."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from local_glm import glm

    AutoConfig.register("chatglm", glm.ChatGLMConfig, exist_ok=True)
    AutoModel.register(glm.ChatGLMConfig, glm.ChatGLMForConditionalGeneration, exist_ok=True)
    AutoModelForCausalLM.register(glm.ChatGLMConfig, glm.ChatGLMForConditionalGeneration, exist_ok=True)


def load_config(model_name_or_path=None, config_name=None, pre_seq_len=None, prefix_projection=False):
    """The config of the model to fine-tune (`model_name_or_path`), or of a new one (`config_name`: a preset or a
    path), with the P-tuning prefix settings applied."""
    from transformers import AutoConfig

    register_auto_classes()
    overrides = dict(pre_seq_len=pre_seq_len, prefix_projection=prefix_projection) if pre_seq_len else {}
    if model_name_or_path:
        return AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=True, **overrides)
    path = resolve_config_path(config_name)
    if os.path.isdir(path):
        return AutoConfig.from_pretrained(path, trust_remote_code=True, **overrides)
    with open(path) as f:
        values = json.load(f)
    values.pop("auto_map", None)  # presets carry no code: our registered classes build them
    values.update(overrides)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def load_tokenizer(name_or_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=True)


def train_tokenizer(corpus, vocab_size: int):
    """A new ChatGLM3-format tokenizer (SentencePiece BPE with byte fallback, as THUDM's) learned from `corpus`."""
    from local_glm import glm

    return glm.tokenization.train_glm_tokenizer(corpus, vocab_size=vocab_size)


def shared_tokenizer(accelerator, train):
    """A tokenizer trained once (`train()`, on the main process) and loaded by every process, without writing to the
    output folder (nothing goes there before every check has passed): its saved files travel to the other processes
    through the process group. Returns (tokenizer, files): the files ({name: bytes}) are what a copy is written from
    (the folder it was loaded from is gone, and save_pretrained would then leave tokenizer.model out)."""
    import tempfile

    from accelerate.utils import broadcast_object_list

    files = [None]
    with tempfile.TemporaryDirectory() as folder:
        if accelerator.is_main_process:
            train().save_pretrained(folder)
            files = [{p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}]
        if accelerator.num_processes > 1:
            broadcast_object_list(files)
        for name, content in files[0].items():
            (Path(folder) / name).write_bytes(content)
        return load_tokenizer(folder), files[0]


def round_up(n: int, multiple: int = 64) -> int:
    return (n + multiple - 1) // multiple * multiple


def build_model(config, tokenizer, *, model_name_or_path=None, attn_implementation="sdpa", seed=42,
                gradient_checkpointing=False, lora_r=None, lora_alpha=None, lora_dropout=0.0):
    """The model to train: the saved weights of `model_name_or_path` (fp32), or new ones (seeded) sized to the
    tokenizer; with `lora_r`, LoRA adapters on LORA_TARGETS (peft) over a frozen base."""
    import torch
    from transformers import AutoModelForCausalLM

    if len(tokenizer) > config.padded_vocab_size and model_name_or_path:
        raise InputError(f"tokenizer has {len(tokenizer)} tokens but the model only {config.padded_vocab_size} rows")
    if config.kv_channels * config.num_attention_heads != config.hidden_size:
        warnings.warn(f"kv_channels {config.kv_channels} != hidden_size {config.hidden_size} / num_attention_heads "
                      f"{config.num_attention_heads}: our code and transformers run this model, but vLLM, llama.cpp "
                      "and chatglm.cpp compute the head size as hidden_size / num_attention_heads and cannot",
                      stacklevel=2)
    if model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(model_name_or_path, config=config, trust_remote_code=True,
                                                     dtype=torch.float32, attn_implementation=attn_implementation)
    else:
        config.padded_vocab_size = round_up(len(tokenizer))
        config.eos_token_id = tokenizer.eos_token_id  # an int, as THUDM's; generation_config.json has the stop list
        config.pad_token_id = tokenizer.pad_token_id
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=True,
                                                 attn_implementation=attn_implementation)
    if gradient_checkpointing:
        # transformers 5 renamed it activation checkpointing (the old name warns); 4.57 has only the old name.
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
        model.config.use_cache = False
    if lora_r:
        import peft

        lora = peft.LoraConfig(r=lora_r, lora_alpha=lora_alpha or 2 * lora_r, lora_dropout=lora_dropout,
                               target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
        if gradient_checkpointing:
            model.enable_input_require_grads()
        with warnings.catch_warnings():
            # peft 0.21 reads `is_gradient_checkpointing`, which transformers 5.25 deprecates with a FutureWarning
            # that would headline every LoRA run; peft's call, not ours.
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            model = peft.get_peft_model(model, lora)
    return model


def optimizer_for(model, *, learning_rate, weight_decay, betas):
    """AdamW over the trainable parameters, weight decay on matrices only (not biases or norms)."""
    import torch

    trainable = [p for p in model.parameters() if p.requires_grad]
    # ZeRO-3 (zero3_init_flag) leaves an empty tensor in each parameter: its shape is ds_shape.
    decay = [p for p in trainable if len(getattr(p, "ds_shape", p.shape)) >= 2]
    no_decay = [p for p in trainable if len(getattr(p, "ds_shape", p.shape)) < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=learning_rate, betas=betas,
                             fused=torch.cuda.is_available())
