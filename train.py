r"""Train a GLM (ChatGLM3 / GLM-4 architecture) with accelerate: pretraining or SFT, full, LoRA or P-tuning v2.

With no data flags it trains a small model from scratch on built-in generated bilingual chat data (arithmetic and a
weather tool call), checks held-out exact-match accuracy through AutoModelForCausalLM loaded from the saved folder,
and chats with it through AutoModel:

    accelerate launch train.py                # or: python train.py
    accelerate launch train.py --train_file corpus.txt --config_name small --block_size 512
    accelerate launch --config_file accelerate_configs/fsdp.yaml train.py --model_name_or_path THUDM/chatglm3-6b \
        --train_file chats.jsonl --lora_r 8

Everything a run needs is a flag (`python train.py --help`). The loop reads top to bottom: load data, build the
model, then one optimizer step per iteration of `for step in range(...)`.
"""

import argparse
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PRESETS = ROOT / "presets"
CHECKPOINT_MARKER = "checkpoint_complete.json"
# Written first into a checkpoint's temporary folder: it tells train.py's own interrupted writes from a user's folder.
CHECKPOINT_STARTED = "checkpoint_started.json"
CHECKPOINT_NAME = re.compile(r"step-\d{7}")
TEMPORARY_CHECKPOINT_NAME = re.compile(r"tmp-step-\d{7}")
TOKENIZER_COPY, TOKENIZER_TEMPORARY = "tokenizer", "tokenizer.tmp"
# What train.py writes into --output_dir (save_output, the model card, metrics, the tokenizer working copy); anything
# else there is a user's file and is never deleted.
OWN_FILES = {"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
             "adapter_config.json", "adapter_model.safetensors", "README.md", "loss_curve.png", "metrics.jsonl",
             "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
             "added_tokens.json", "chat_template.jinja", "configuration_glm.py", "modeling_glm.py", "chat_glm.py",
             "tokenization_glm.py"}
OWN_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
OWN_FOLDERS = {TOKENIZER_COPY, TOKENIZER_TEMPORARY, "adapter", "runs"}
TRAINER_STATE = "trainer_state.json"
LORA_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
# The built-in run's recipe (no data flags): tuned to reach >= 90% held-out accuracy on 2 CPU cores in minutes.
BUILTIN_RECIPE = dict(config_name="tiny", learning_rate=3e-3, per_device_train_batch_size=64, max_train_steps=1500,
                      num_warmup_steps=100, block_size=256, eval_steps=300, weight_decay=0.0, logging_steps=10,
                      tokenizer_vocab_size=800, max_eval_samples=256, checkpointing_steps=300)
# Where nothing else is given (run_clm's values where it has one).
GENERAL_DEFAULTS = dict(config_name=None, learning_rate=5e-5, per_device_train_batch_size=8, max_train_steps=None,
                        num_warmup_steps=0, block_size=None, eval_steps=500, weight_decay=0.0, logging_steps=10,
                        tokenizer_vocab_size=32000, max_eval_samples=None, checkpointing_steps=None)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model and tokenizer")
    model.add_argument("--model_name_or_path", help="A saved model folder or Hub id to fine-tune; omit to train from "
                       "scratch with --config_name.")
    model.add_argument("--config_name", help="From-scratch config: a preset name from presets/ (tiny, small, "
                       "chatglm3-6b, glm-4-9b) or a path to a config.json / folder. Default: 'tiny' for the "
                       "built-in run.")
    model.add_argument("--tokenizer_name", help="A saved tokenizer folder or Hub id. Default: the model's; from "
                       "scratch, a new tokenizer is trained on the training data.")
    model.add_argument("--tokenizer_vocab_size", type=int, help="Vocabulary size of a tokenizer trained from "
                       "scratch (default 800 built-in, 32000 otherwise).")
    model.add_argument("--attn_implementation", default="sdpa", help="eager, sdpa, flash_attention_2, ...")
    data = parser.add_argument_group("data (none of these: the built-in generated skill data)")
    data.add_argument("--dataset_name", help="Any datasets.load_dataset source: a Hub name or a local folder.")
    data.add_argument("--dataset_config_name", help="The dataset configuration name passed to load_dataset.")
    data.add_argument("--train_file", help="Local training file: .txt, .json, .jsonl, .csv or .parquet.")
    data.add_argument("--validation_file", help="Local validation file (same type as --train_file).")
    data.add_argument("--validation_split_percentage", type=int, default=5, help="Percent of train carved off as "
                      "validation when the data has no validation split (default 5).")
    data.add_argument("--mode", choices=["auto", "pretrain", "sft"], default="auto", help="pretrain: pack the text "
                      "column into blocks; sft: train on assistant replies of the conversations column; auto: "
                      "whichever column exists.")
    data.add_argument("--text_column", default="text", help="Column with raw text (pretraining).")
    data.add_argument("--conversations_column", help="Column with conversations (SFT): lists of {role, content"
                      "[, metadata, tools]} as ChatGLM3's, or OpenAI-style messages (tool_calls, role tool). "
                      "Default: 'conversations' or 'messages', whichever the data has.")
    data.add_argument("--block_size", type=int, help="Pretraining block length / SFT maximum length in tokens "
                      "(default 256 built-in, else min(1024, model seq_length)); must not exceed seq_length.")
    data.add_argument("--packing", action="store_true", help="SFT: pack several conversations into each row of up "
                      "to --block_size tokens, position_ids restarting per conversation (each attends only to "
                      "itself); less padding, the same loss.")
    data.add_argument("--streaming", action="store_true", help="Stream the dataset instead of loading it; the "
                      "stream is sharded across processes. Needs --max_train_steps.")
    data.add_argument("--max_train_samples", type=int, help="Use only this many training rows (debugging).")
    data.add_argument("--max_eval_samples", type=int, help="Use only this many validation rows (or blocks); "
                      "default 256 built-in, else all.")
    data.add_argument("--preprocessing_num_workers", type=int, help="Processes for datasets.map tokenization.")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes.")
    data.add_argument("--builtin_train_examples", type=int, default=20000, help="Size of the generated training "
                      "set of the built-in run.")
    data.add_argument("--builtin_heldout_examples", type=int, default=150, help="Size of the built-in held-out set "
                      "(disjoint from training) used for the exact-match accuracy.")
    optim = parser.add_argument_group("optimization")
    optim.add_argument("--per_device_train_batch_size", type=int, help="Rows per device per micro-step "
                       "(default 64 built-in, else 8).")
    optim.add_argument("--per_device_eval_batch_size", type=int, default=32, help="Rows per device for evaluation.")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-steps per optimizer step.")
    optim.add_argument("--learning_rate", type=float, help="Peak AdamW learning rate (default 3e-3 built-in, else "
                       "5e-5).")
    optim.add_argument("--weight_decay", type=float, help="AdamW weight decay on matrices (not biases or norms).")
    optim.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    optim.add_argument("--adam_beta2", type=float, default=0.95, help="AdamW beta2.")
    optim.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm (0: off).")
    optim.add_argument("--num_train_epochs", type=float, default=1, help="Epochs, when --max_train_steps is unset.")
    optim.add_argument("--max_train_steps", type=int, help="Optimizer steps; overrides --num_train_epochs.")
    optim.add_argument("--lr_scheduler_type", default="cosine", choices=["cosine", "linear", "constant_with_warmup"],
                       help="Decay after warmup.")
    optim.add_argument("--num_warmup_steps", type=int, help="Linear warmup steps.")
    optim.add_argument("--mixed_precision", default="auto", choices=["auto", "no", "fp16", "bf16"], help="auto: bf16 "
                       "on GPUs that have it, else fp16 on GPU, none on CPU; or what `accelerate launch` set.")
    optim.add_argument("--gradient_checkpointing", action="store_true", help="Recompute activations in backward.")
    optim.add_argument("--torch_compile", action="store_true", help="Compile the model with torch.compile.")
    optim.add_argument("--seed", type=int, default=42, help="Seed of weights, data order and dropout.")
    tune = parser.add_argument_group("parameter-efficient fine-tuning")
    tune.add_argument("--lora_r", type=int, help="Train LoRA adapters of this rank on " + ", ".join(LORA_TARGETS) +
                      " (peft); the base stays frozen.")
    tune.add_argument("--lora_alpha", type=int, help="LoRA alpha (default 2 * lora_r).")
    tune.add_argument("--lora_dropout", type=float, default=0.0, help="LoRA dropout.")
    tune.add_argument("--merge_lora", action="store_true", help="Also save the weights with the adapter merged in.")
    tune.add_argument("--pre_seq_len", type=int, help="P-tuning v2: learn a prefix of this many K/V positions per "
                      "layer; only transformer.prefix_encoder trains.")
    tune.add_argument("--prefix_projection", action="store_true", help="P-tuning v2 prefix through a 2-layer MLP.")
    out = parser.add_argument_group("output, logging, checkpoints")
    out.add_argument("--output_dir", default="output/glm-skills", help="Where the model folder, checkpoints and "
                     "metrics.jsonl go (default: output/glm-skills). A folder holding a run or other files is "
                     "refused unless "
                     "--resume_from_checkpoint or --overwrite_output_dir is given.")
    out.add_argument("--overwrite_output_dir", action="store_true", help="Start over in an --output_dir that holds "
                     "a run: train.py's own files there (weights, config, tokenizer, card, metrics, checkpoints) are "
                     "replaced; any other file is left untouched.")
    out.add_argument("--logging_steps", type=int, help="Log loss, lr, tokens/s and MFU every N steps.")
    out.add_argument("--eval_steps", type=int, help="Evaluate validation loss and perplexity every N steps.")
    out.add_argument("--checkpointing_steps", type=int, help="accelerator.save_state every N steps (atomic; "
                     "default 300 built-in, else none); resume with --resume_from_checkpoint latest.")
    out.add_argument("--checkpoints_total_limit", type=int, default=2, help="Keep the last K checkpoints.")
    out.add_argument("--resume_from_checkpoint", help="'latest' (the newest complete checkpoint in output_dir, if "
                     "any) or a checkpoint folder.")
    out.add_argument("--report_to", default="none", choices=["none", "tensorboard", "wandb", "all"],
                     help="Trackers through accelerate.")
    out.add_argument("--peak_tflops", type=float, help="Peak TFLOP/s of one device for MFU (default: known GPUs' "
                     "bf16 peak; CPU: threads x 32 (64 with AVX-512) fp32 FLOP/cycle x 2.5 GHz, an estimate).")
    out.add_argument("--max_shard_size", default="5GB", help="Largest safetensors shard of the saved weights.")
    out.add_argument("--push_to_hub", action="store_true", help="Upload the output folder with huggingface_hub.")
    out.add_argument("--hub_model_id", help="Repository to push to (default: the output folder's name).")
    out.add_argument("--hub_token", help="Token for --push_to_hub (default: the logged-in one).")
    out.add_argument("--hub_private", action="store_true", help="Create the Hub repository as private.")
    args = parser.parse_args(argv)

    args.builtin = args.dataset_name is None and args.train_file is None
    defaults = BUILTIN_RECIPE if args.builtin else GENERAL_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None and not (key == "config_name" and args.model_name_or_path):
            setattr(args, key, value)
    if args.validation_file and not args.train_file:
        parser.error("--validation_file needs --train_file")
    if args.streaming and args.max_train_steps is None:
        parser.error("--streaming needs --max_train_steps (a stream has no length)")
    if args.model_name_or_path is None and args.config_name is None:
        parser.error("give --model_name_or_path (fine-tune) or --config_name (from scratch)")
    if args.merge_lora and not args.lora_r:
        parser.error("--merge_lora needs --lora_r")
    if args.packing and args.streaming:
        parser.error("--packing needs a map-style dataset; it does not work with --streaming")
    if args.packing and args.pre_seq_len:
        parser.error("--packing cannot be combined with --pre_seq_len (the P-tuning prefix mask is not per-sequence)")
    if args.lora_r and args.pre_seq_len:
        parser.error("choose one of --lora_r and --pre_seq_len")
    check_flag_values(parser, args)
    return args


# Every learned vocabulary holds the 259 reserved pieces (<unk> <s> </s> and 256 bytes) and the 9 control tokens
# (tokenization_glm.GLM3_RESERVED_PIECES / GLM3_CONTROL_TOKENS); a test checks the figure.
MIN_TOKENIZER_VOCAB = 259 + 9 + 1


def check_flag_values(parser, args):
    """Range checks at parse time: a bad value stops here, naming its flag, before anything is loaded or written."""
    def bad(flag, why):
        parser.error(f"--{flag} {getattr(args, flag)!r}: {why}")

    def finite(flag):
        value = getattr(args, flag)
        if value is not None and not math.isfinite(value):
            bad(flag, "must be a finite number")
        return value

    at_least = {"per_device_train_batch_size": 1, "per_device_eval_batch_size": 1, "gradient_accumulation_steps": 1,
                "block_size": 1, "eval_steps": 1, "logging_steps": 1, "checkpointing_steps": 1,
                "max_train_steps": 1, "max_train_samples": 1, "max_eval_samples": 1, "num_warmup_steps": 0,
                "checkpoints_total_limit": 0, "preprocessing_num_workers": 1, "dataloader_num_workers": 0,
                "builtin_train_examples": 1, "builtin_heldout_examples": 3, "lora_r": 1, "lora_alpha": 1,
                "pre_seq_len": 1, "tokenizer_vocab_size": MIN_TOKENIZER_VOCAB, "seed": 0}
    for flag, low in at_least.items():
        value = getattr(args, flag)
        if value is not None and value < low:
            bad(flag, f"must be at least {low}")
    if not 0 <= args.seed < 2 ** 32:
        bad("seed", "must be below 2**32 (numpy's seed range)")
    if not 0 < args.validation_split_percentage < 100:
        bad("validation_split_percentage", "must be between 1 and 99")
    if not finite("learning_rate") > 0:
        bad("learning_rate", "must be positive")
    if not finite("max_grad_norm") >= 0:
        bad("max_grad_norm", "must be >= 0 (0 turns clipping off)")
    if finite("weight_decay") is not None and args.weight_decay < 0:
        bad("weight_decay", "must be >= 0")
    for flag in ("adam_beta1", "adam_beta2"):
        if not 0 <= finite(flag) < 1:
            bad(flag, "must be in [0, 1)")
    if not finite("num_train_epochs") > 0:
        bad("num_train_epochs", "must be positive")
    if not 0 <= finite("lora_dropout") < 1:
        bad("lora_dropout", "must be in [0, 1)")
    if args.peak_tflops is not None and not finite("peak_tflops") > 0:
        bad("peak_tflops", "must be positive")
    if not args.output_dir:
        parser.error("--output_dir must not be empty")
    if args.prefix_projection and not args.pre_seq_len:
        parser.error("--prefix_projection needs --pre_seq_len")
    if (args.lora_alpha is not None or args.lora_dropout) and not args.lora_r:
        parser.error("--lora_alpha / --lora_dropout need --lora_r")
    if args.overwrite_output_dir and args.resume_from_checkpoint:
        parser.error("choose one of --overwrite_output_dir (start over) and --resume_from_checkpoint (continue)")


# ---------------------------------------------------------------------------------------------------------------
# Model, tokenizer, data

def resolve_config_path(name: str) -> str:
    """A preset name (presets/<name>.json) or a path to a config file / folder."""
    preset = PRESETS / f"{name}.json"
    if preset.exists():
        return str(preset)
    if os.path.exists(name):
        return name
    available = sorted(p.stem for p in PRESETS.glob("*.json"))
    raise ValueError(f"--config_name {name!r} is neither a preset ({', '.join(available)}) nor a path")


def register_auto_classes():
    """Let AutoConfig / AutoModel* build our classes from a preset (model_type 'chatglm'); saved folders then get
    auto_map and the code files, because local_glm registers the classes for trust_remote_code."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from local_glm import glm

    AutoConfig.register("chatglm", glm.ChatGLMConfig, exist_ok=True)
    AutoModel.register(glm.ChatGLMConfig, glm.ChatGLMForConditionalGeneration, exist_ok=True)
    AutoModelForCausalLM.register(glm.ChatGLMConfig, glm.ChatGLMForConditionalGeneration, exist_ok=True)


def load_config(args):
    from transformers import AutoConfig

    register_auto_classes()

    overrides = {}
    if args.pre_seq_len:
        overrides.update(pre_seq_len=args.pre_seq_len, prefix_projection=args.prefix_projection)
    if args.model_name_or_path:
        return AutoConfig.from_pretrained(args.model_name_or_path, trust_remote_code=True, **overrides)
    path = resolve_config_path(args.config_name)
    if os.path.isdir(path):
        return AutoConfig.from_pretrained(path, trust_remote_code=True, **overrides)
    with open(path) as f:
        values = json.load(f)
    values.pop("auto_map", None)  # presets carry no code: our registered classes build them
    values.update(overrides)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def round_up(n: int, multiple: int = 64) -> int:
    return (n + multiple - 1) // multiple * multiple


def tokenizer_corpus(raw_train, mode, args):
    import data_glm

    rows = raw_train if args.max_train_samples is None else raw_train.take(args.max_train_samples) \
        if args.streaming else raw_train.select(range(min(args.max_train_samples, len(raw_train))))
    if mode == "pretrain":
        return (row[args.text_column] for row in rows)
    return data_glm.conversation_texts(rows, args.conversations_column)


def saved_tokenizer(checkpoint: Path) -> Path:
    """The tokenizer a from-scratch run trained, for resuming it from `checkpoint`: the working copy beside its
    checkpoints, or (a finished run, whose working copy is gone) the run folder's own tokenizer files."""
    run_dir = Path(checkpoint).parent.parent
    for folder in (run_dir / TOKENIZER_COPY, run_dir):
        if (folder / "tokenizer_config.json").is_file() and (folder / "tokenizer.json").is_file():
            return folder
    raise FileNotFoundError(f"cannot resume from {checkpoint}: the tokenizer its run trained is neither in "
                            f"{run_dir / TOKENIZER_COPY} nor in {run_dir}; give it with --tokenizer_name")


def load_or_train_tokenizer(args, accelerator, raw_train, mode, checkpoint=None):
    """The given tokenizer, the model's, or (from scratch) one trained on the training data. A new run always trains
    a new one (the corpus or --tokenizer_vocab_size may have changed); only a resumed run reuses the saved copy."""
    from transformers import AutoTokenizer

    if args.tokenizer_name or args.model_name_or_path:
        return AutoTokenizer.from_pretrained(args.tokenizer_name or args.model_name_or_path, trust_remote_code=True)
    if checkpoint is not None:
        return AutoTokenizer.from_pretrained(saved_tokenizer(checkpoint), trust_remote_code=True)
    output_dir = Path(args.output_dir)
    work, temporary = output_dir / TOKENIZER_COPY, output_dir / TOKENIZER_TEMPORARY
    if accelerator.is_main_process:
        from local_glm import glm

        tokenizer = glm.tokenization.train_glm_tokenizer(tokenizer_corpus(raw_train, mode, args),
                                                         vocab_size=args.tokenizer_vocab_size)
        # Resumes trust the working copy: written whole into a temporary folder and fsynced here, renamed into place
        # by start_output_dir once the model is built (nothing else of the folder changes before that).
        if temporary.exists():
            shutil.rmtree(temporary)  # an interrupted earlier copy
        tokenizer.save_pretrained(temporary)
        if os.environ.get("GLM_TRAIN_KILL_IN_TOKENIZER"):
            os.kill(os.getpid(), signal.SIGKILL)  # test hook: die with the copy written but not renamed
        _fsync_tree(temporary)
    accelerator.wait_for_everyone()
    return AutoTokenizer.from_pretrained(temporary, trust_remote_code=True)


# ---------------------------------------------------------------------------------------------------------------
# The output folder at start: refuse to replace a run or a user's files (run_clm's --overwrite_output_dir rule).

class OutputDirError(ValueError):
    pass


def _own_checkpoint_entry(path: Path) -> bool:
    """A complete checkpoint, or an interrupted write of one (empty, or carrying the started marker)."""
    if not path.is_dir():
        return False
    if CHECKPOINT_NAME.fullmatch(path.name):
        return (path / CHECKPOINT_MARKER).is_file()
    if TEMPORARY_CHECKPOINT_NAME.fullmatch(path.name):
        return (path / CHECKPOINT_STARTED).is_file() or not any(path.iterdir())
    return False


def inspect_output_dir(folder: Path):
    """(own, foreign): train.py's entries in `folder` (checkpoints/ entries one by one) and everything else."""
    own, foreign = [], []
    if folder.exists() and not folder.is_dir():
        raise OutputDirError(f"--output_dir {folder} is a file, not a folder")
    if not folder.is_dir():
        return own, foreign
    for entry in sorted(folder.iterdir()):
        if entry.name == "checkpoints" and entry.is_dir():
            for item in sorted(entry.iterdir()):
                (own if _own_checkpoint_entry(item) else foreign).append(item)
        elif (entry.is_file() and (entry.name in OWN_FILES or OWN_SHARD.fullmatch(entry.name))) or \
                (entry.is_dir() and entry.name in OWN_FOLDERS):
            own.append(entry)
        else:
            foreign.append(entry)
    return own, foreign


def _listing(folder: Path, paths) -> str:
    names = [str(p.relative_to(folder)) + ("/" if p.is_dir() else "") for p in paths]
    return ", ".join(names[:15]) + (f" and {len(names) - 15} more" if len(names) > 15 else "")


def check_output_dir(args, checkpoint):
    """What start_output_dir removes, and the user's files it leaves; raises OutputDirError (naming the folder and
    the files found) where starting would replace a run or someone's files. Reads only; runs before any write.

    - Empty or new folder: fine. Interrupted writes of train.py (checkpoints/tmp-step-N with its started marker,
      tokenizer.tmp) are always removed.
    - Resuming (a checkpoint found): everything is kept; other files are left as they are.
    - A complete checkpoint and neither flag: refused, saying how to resume or start over (no auto-resume).
    - Any other content: refused without --overwrite_output_dir; with it train.py's own files are removed first and
      the others are left untouched. A foreign entry inside checkpoints/ is always refused (its names are ours).
    """
    folder = Path(args.output_dir)
    own, foreign = inspect_output_dir(folder)
    intruders = [p for p in foreign if p.parent.name == "checkpoints" and p.parent.parent == folder]
    if intruders:
        raise OutputDirError(f"--output_dir {folder}: {_listing(folder, intruders)} in checkpoints/ is not a "
                             "checkpoint train.py wrote (no completion or started marker); checkpoints/ is "
                             "train.py's own folder, so move it out and start again")
    # tokenizer.tmp is start_output_dir's to handle (by then it may hold this run's new copy).
    own = [p for p in own if p.name != TOKENIZER_TEMPORARY]
    stale = [p for p in own if TEMPORARY_CHECKPOINT_NAME.fullmatch(p.name)]
    kept = [p for p in own if p not in stale]
    if checkpoint is not None:
        return stale, foreign
    if args.overwrite_output_dir:
        print(f"--overwrite_output_dir: replacing train.py's files in {folder}: {_listing(folder, own) or 'none'}")
        # Checkpoints first: a kill while removing never leaves a checkpoint without its run's tokenizer copy.
        return sorted(own, key=lambda p: p.parent.name != "checkpoints"), foreign
    complete = [p for p in kept if CHECKPOINT_NAME.fullmatch(p.name)]
    if complete:
        raise OutputDirError(f"--output_dir {folder} holds a run with a complete checkpoint ({complete[-1].name}; "
                             f"files found: {_listing(folder, kept + foreign)}); nothing was changed. Pass --resume_from_checkpoint latest to continue it, or "
                             "--overwrite_output_dir to start over (train.py's own files there are replaced, others "
                             "left untouched).")
    if kept or foreign:
        raise OutputDirError(f"--output_dir {folder} is not empty: it holds {_listing(folder, kept + foreign)}; "
                             "nothing was changed. Use another folder, or pass --overwrite_output_dir to replace "
                             "train.py's own files there (other files are never deleted).")
    return stale, []


def start_output_dir(args, accelerator, plan, new_tokenizer: bool):
    """Once data, tokenizer and model are ready (so bad input has had its chance to stop the run): create the folder,
    remove what check_output_dir planned, and rename a from-scratch run's new tokenizer copy into place."""
    remove, foreign = plan
    output_dir = Path(args.output_dir)
    work, temporary = output_dir / TOKENIZER_COPY, output_dir / TOKENIZER_TEMPORARY
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        if foreign:
            accelerator.print(f"note: {output_dir} also holds files train.py did not write; left untouched: "
                              f"{_listing(output_dir, foreign)}")
        for path in remove:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        if new_tokenizer:
            if work.exists():
                shutil.rmtree(work)  # a new run's: no checkpoint uses the old copy (check_output_dir)
            os.rename(temporary, work)
            _fsync_dir(output_dir)
        elif temporary.exists():
            shutil.rmtree(temporary)  # an interrupted copy of an earlier start
    accelerator.wait_for_everyone()


def build_model(args, config, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    if len(tokenizer) > config.padded_vocab_size and args.model_name_or_path:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model only {config.padded_vocab_size} rows")
    if config.kv_channels * config.num_attention_heads != config.hidden_size:
        import warnings

        warnings.warn(f"kv_channels {config.kv_channels} != hidden_size {config.hidden_size} / num_attention_heads "
                      f"{config.num_attention_heads}: our code and transformers run this model, but vLLM, llama.cpp "
                      "and chatglm.cpp compute the head size as hidden_size / num_attention_heads and cannot",
                      stacklevel=2)
    if args.model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, config=config, trust_remote_code=True,
                                                     dtype=torch.float32, attn_implementation=args.attn_implementation)
    else:
        config.padded_vocab_size = round_up(len(tokenizer))
        config.eos_token_id = tokenizer.eos_token_id  # an int, as THUDM's; generation_config.json has the stop list
        config.pad_token_id = tokenizer.pad_token_id
        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=True,
                                                 attn_implementation=args.attn_implementation)
    if args.gradient_checkpointing:
        # transformers 5 renamed it activation checkpointing (the old name warns); 4.57 has only the old name.
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
        model.config.use_cache = False
    if args.lora_r:
        import peft

        lora = peft.LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha or 2 * args.lora_r,
                               lora_dropout=args.lora_dropout, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
        if args.gradient_checkpointing:
            model.enable_input_require_grads()
        model = peft.get_peft_model(model, lora)
    return model


def prepare_data(args, accelerator, tokenizer_holder):
    """Load, check, tokenize (once, cached by datasets) and split; returns (mode, train, validation, heldout)."""
    import datasets
    import data_glm

    heldout = None
    if args.builtin:
        train_rows, heldout = data_glm.skill_splits(args.builtin_train_examples, args.builtin_heldout_examples,
                                                    seed=args.seed)
        raw = datasets.DatasetDict({"train": datasets.Dataset.from_list(train_rows)})
    else:
        raw = data_glm.load_raw(args)
    train = raw["train"]
    if args.streaming:
        first = next(iter(train), None)
        if first is None:
            raise ValueError("empty dataset: the train split has no rows")
        columns = train.column_names or list(first)
    else:
        if len(train) == 0:
            raise ValueError("empty dataset: the train split has 0 rows")
        columns = train.column_names
    args.conversations_column = data_glm.find_conversations_column(columns, args.conversations_column)
    mode = data_glm.detect_mode(columns, args.text_column, args.conversations_column, args.mode)
    # Every row, with its file and line, before a tokenizer is trained on them or anything is written.
    data_glm.check_rows(raw, mode, args.text_column, args.conversations_column, args.max_train_samples)
    if "validation" in raw and not args.streaming and len(raw["validation"]) == 0:
        raise ValueError("empty dataset: the validation split has 0 rows")
    if args.max_train_samples is not None and not args.streaming:
        raw["train"] = raw["train"].select(range(min(args.max_train_samples, len(raw["train"]))))

    tokenizer = tokenizer_holder(raw["train"], mode)
    kwargs = dict(num_proc=args.preprocessing_num_workers, streaming=args.streaming)
    with accelerator.main_process_first():
        if mode == "pretrain":
            # encode_batch_ids: our tokenizer's offset-free batch path (same ids as __call__, ~1.4x faster).
            # Long lines are cut into pieces first (data_glm.TEXT_PIECE_CHARS): memory is bounded by a batch of
            # pieces whatever the line length. Ids at a cut may differ from tokenizing the line whole (each piece
            # gets the dummy prefix); the pieces stay one document.
            proc = {} if args.streaming else {"num_proc": args.preprocessing_num_workers}
            # Documents are carved into validation before they are cut, so a document's pieces stay together.
            raw = data_glm.carve_validation(raw, args.validation_split_percentage, args.seed)
            pieces = raw.map(data_glm.split_long_texts, fn_kwargs={"column": args.text_column}, batched=True,
                             remove_columns=columns, **proc)
            # Control-token strings in a corpus ("</s>" in web text) stay text: only packing adds eos.
            docs = pieces.map(lambda batch: {"input_ids": tokenizer.encode_batch_ids(
                                  batch[args.text_column], add_special_tokens=False, split_special_tokens=True)},
                              batched=True, remove_columns=[args.text_column], **proc)
            splits = {name: pack_docs(docs[name], tokenizer, args.block_size, args) for name in docs}
        else:
            tokenized = {name: data_glm.tokenize_sft(raw[name], tokenizer, args.conversations_column,
                                                     args.block_size, **kwargs) for name in raw}
            splits = data_glm.carve_validation(datasets.DatasetDict(tokenized) if not args.streaming else
                                               datasets.IterableDatasetDict(tokenized),
                                               args.validation_split_percentage, args.seed)
    train, validation = splits["train"], splits["validation"]
    if not args.streaming:
        if len(train) == 0:
            raise ValueError(f"empty dataset: the training data yields no example of --block_size {args.block_size}"
                             " tokens (too little text, or block size too large)")
        if mode == "sft":
            trainable = sum(1 for labels in train["labels"][:1000] if any(x != -100 for x in labels))
            if trainable == 0:
                raise ValueError(f"SFT data has no assistant tokens within --block_size {args.block_size}")
    if args.max_eval_samples is not None:
        validation = validation.take(args.max_eval_samples) if args.streaming else \
            validation.select(range(min(args.max_eval_samples, len(validation))))
    return mode, tokenizer, train, validation, heldout


def pack_docs(docs, tokenizer, block_size, args):
    import itertools

    eos = tokenizer.eos_token_id

    def pack(batch):
        joined = list(itertools.chain.from_iterable(ids if more else ids + [eos]
                                                    for ids, more in zip(batch["input_ids"], batch["continues"])))
        total = len(joined) // block_size * block_size
        blocks = [joined[i:i + block_size] for i in range(0, total, block_size)]
        return {"input_ids": blocks, "labels": blocks}

    extra = {} if args.streaming else {"num_proc": args.preprocessing_num_workers,
                                       "desc": f"packing into blocks of {block_size}"}
    return docs.map(pack, batched=True, batch_size=1000, remove_columns=["input_ids", "continues"],
                    **extra)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: written into a temporary folder, fsynced, marked complete, then renamed into place.

def _fsync_tree(folder: Path):
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for directory in [folder, *[p for p in folder.rglob("*") if p.is_dir()]]:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def complete_checkpoints(folder: Path):
    """Checkpoints that carry the completion marker, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if CHECKPOINT_NAME.fullmatch(p.name) and (p / CHECKPOINT_MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(accelerator, output_dir: Path, step: int, state: dict, total_limit: int):
    folder = output_dir / "checkpoints"
    final = folder / f"step-{step:07d}"
    temporary = folder / f"tmp-step-{step:07d}"
    if accelerator.is_main_process:
        if temporary.exists():
            shutil.rmtree(temporary)  # ours: check_output_dir refuses anything else under checkpoints/
        temporary.mkdir(parents=True)
        (temporary / CHECKPOINT_STARTED).write_text(json.dumps({"step": step}))
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(temporary / TRAINER_STATE, "w") as f:
            json.dump(state, f)
        _fsync_tree(temporary)
        if os.environ.get("GLM_TRAIN_KILL_IN_CHECKPOINT") == str(step):
            os.kill(os.getpid(), signal.SIGKILL)  # test hook: die mid-write, before the marker and the rename
        with open(temporary / CHECKPOINT_MARKER, "w") as f:
            json.dump({"step": step}, f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.rename(temporary, final)
        _fsync_dir(folder)
        for old in complete_checkpoints(folder)[:-total_limit] if total_limit > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _fsync_dir(folder: Path):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def find_checkpoint(args):
    """The folder to resume from, or None (with 'latest' and nothing complete yet)."""
    if args.resume_from_checkpoint in (None, ""):
        return None
    if args.resume_from_checkpoint == "latest":
        found = complete_checkpoints(Path(args.output_dir) / "checkpoints")
        return found[-1] if found else None
    path = Path(args.resume_from_checkpoint)
    if not (path / CHECKPOINT_MARKER).exists():
        raise ValueError(f"--resume_from_checkpoint {path} is not a complete checkpoint (no {CHECKPOINT_MARKER})")
    return path


def check_checkpoint(checkpoint: Path, num_processes: int):
    """What accelerate's load_state would skip silently: every process's RNG file must be there and readable (an
    exact resume needs them), and the step must be known. Raises naming the file."""
    from accelerate.utils import load

    for index in range(num_processes):
        path = checkpoint / f"random_states_{index}.pkl"
        try:
            states = load(path)
            missing = [key for key in ("random_state", "numpy_random_seed", "torch_manual_seed") if key not in states]
        except Exception as error:  # noqa: BLE001  any unreadable file is reported the same way
            raise ValueError(f"cannot resume from {checkpoint}: the RNG state {path} is unreadable "
                             f"({type(error).__name__}: {error}); resume from another checkpoint") from None
        if missing:
            raise ValueError(f"cannot resume from {checkpoint}: the RNG state {path} lacks {missing}")
    try:
        step = json.loads((checkpoint / TRAINER_STATE).read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"cannot resume from {checkpoint}: {checkpoint / TRAINER_STATE} is unreadable "
                         f"({type(error).__name__}: {error})") from None
    if not (isinstance(step, int) and step >= 0):
        raise ValueError(f"cannot resume from {checkpoint}: {checkpoint / TRAINER_STATE} step is {step!r}")
    return step


# ---------------------------------------------------------------------------------------------------------------
# Batches and measurements

def micro_batches(args, accelerator, train, collate, start_micro: int, batches_per_epoch=None):
    """An endless iterator over this process's micro-batches, starting at global micro-batch `start_micro`."""
    import torch
    import data_glm

    if args.streaming:
        import itertools
        from datasets.distributed import split_dataset_by_node

        epoch = 0
        shard = split_dataset_by_node(train, accelerator.process_index, accelerator.num_processes)
        skipped = 0
        while True:
            shard.set_epoch(epoch)
            rows = iter(shard)
            while True:
                batch = list(itertools.islice(rows, args.per_device_train_batch_size))
                if len(batch) < args.per_device_train_batch_size:
                    break
                if skipped < start_micro:
                    skipped += 1
                    continue
                yield collate(batch)
            epoch += 1
    epoch, offset = divmod(start_micro, batches_per_epoch)
    while True:
        sampler = data_glm.GlobalBatchSampler(len(train), args.per_device_train_batch_size,
                                              accelerator.num_processes, accelerator.process_index, args.seed,
                                              epoch=epoch, start=offset)
        # Its own generator: creating the iterator draws a worker seed, and from the global RNG that would shift
        # every later dropout mask of a resumed run (it creates the iterator at another step than the first run).
        generator = torch.Generator().manual_seed(args.seed * 1000003 + epoch)
        loader = torch.utils.data.DataLoader(train, batch_sampler=sampler, collate_fn=collate,
                                             num_workers=args.dataloader_num_workers, generator=generator,
                                             pin_memory=accelerator.device.type == "cuda")
        yield from loader
        epoch, offset = epoch + 1, 0


def token_loss_sum(model, batch):
    """Summed next-token cross entropy (fp32) and the number of target tokens of one micro-batch."""
    import torch.nn.functional as F

    # Right padding: real tokens never attend to the pads after them, so no mask is needed. Packed rows (--packing)
    # carry position_ids restarting per conversation, from which the model builds the per-conversation mask.
    logits = model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"), use_cache=False).logits
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                           reduction="sum")
    return loss, (labels != -100).sum()


def evaluate(args, accelerator, model, validation, collate):
    """Validation loss (mean over target tokens of all processes) and perplexity."""
    import torch

    model.eval()
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    rows = validation if not args.streaming else list(validation)
    indices = list(range(accelerator.process_index, len(rows), accelerator.num_processes))
    with torch.no_grad():
        for i in range(0, len(indices), args.per_device_eval_batch_size):
            chunk = indices[i:i + args.per_device_eval_batch_size]
            batch = collate([rows[j] for j in chunk])
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.autocast():
                loss, count = token_loss_sum(model, batch)
            total += torch.stack((loss.double(), count.double()))
    total = accelerator.reduce(total, "sum")
    model.train()
    loss = (total[0] / total[1].clamp(min=1)).item()
    return loss, math.exp(min(loss, 50))


def peak_flops(args, accelerator):
    import torch

    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if accelerator.device.type == "cuda":
        name = torch.cuda.get_device_name(accelerator.device)
        for key, tflops in (("H200", 989), ("H100", 989), ("A100", 312), ("L40", 181), ("A10", 125),
                            ("4090", 165), ("V100", 125), ("T4", 65)):
            if key in name:
                return tflops * 1e12
        return 312e12
    # An estimate: fp32 FMA lanes per cycle (AVX-512: 2 units x 16 lanes x 2 FLOPs; AVX2: half) at 2.5 GHz.
    wide = "avx512f" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False
    return torch.get_num_threads() * (64 if wide else 32) * 2.5e9


def matmul_params(model) -> int:
    """Parameters that take part in matrix products (the embedding lookup does not)."""
    return sum(param_numel(p) for n, p in model.named_parameters() if "word_embeddings" not in n)


def batch_flops(params: int, config, batch_shape) -> float:
    """nanoGPT's estimate of a training step's FLOPs: 6 * params + 12 * layers * width * seq per token."""
    rows, seq = batch_shape
    attention = 12 * config.num_layers * config.num_attention_heads * config.kv_channels * seq
    return rows * seq * (6 * params + attention)


class NonFiniteLoss(RuntimeError):
    pass


def stop_if_weights_non_finite(accelerator, model, step, last_checkpoint):
    """Before a checkpoint or the final save: the loss was computed before the optimizer step, so only the weights
    themselves show whether that step broke them. Raises NonFiniteLoss naming the parameters."""
    import torch

    bad = [name for name, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p.detach()).all()]
    total = accelerator.reduce(torch.tensor(float(len(bad)), device=accelerator.device), "sum").item()
    if total:
        names = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "") if bad else \
            "(on another process)"
        accelerator.end_training()
        raise NonFiniteLoss(f"weights are not finite after step {step} ({names}): stopping before saving them. The "
                            f"last good checkpoint is {last_checkpoint or 'none (no checkpoint was written yet)'}; "
                            "lower --learning_rate or check the data, then resume with --resume_from_checkpoint.")


# ---------------------------------------------------------------------------------------------------------------
# The distributed engine: what `accelerate launch` was asked for (its config / flags reach us as environment
# variables), engaged for real on GPUs and on CPU processes, or refused before training.

def requested_engine() -> str:
    """'deepspeed', 'fsdp' or 'ddp' (plain data parallel, or one process), as the launcher's environment says."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    return "ddp"


def launcher_process_count():
    """The process count `accelerate launch` was asked for when it started this process itself (its simple launcher,
    used for --cpu: no WORLD_SIZE), read from the launcher's command line and config file; None otherwise."""
    if "WORLD_SIZE" in os.environ or "ACCELERATE_USE_CPU" not in os.environ:
        return None
    try:
        argv = [a.decode() for a in Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return None
    if "launch" not in argv:
        return None
    from accelerate.commands.config.config_args import default_config_file, load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    try:
        launch = launch_command_parser().parse_args(argv[argv.index("launch") + 1:])
    except SystemExit:  # not a command line accelerate's parser reads
        return None
    if launch.num_processes is None and (launch.config_file or os.path.isfile(default_config_file)):
        return load_config_from_file(launch.config_file).num_processes
    return launch.num_processes


def check_process_count(world_size: int):
    """Stop when the launcher was asked for several processes but started fewer (accelerate's --cpu path)."""
    asked = launcher_process_count()
    if asked is not None and asked > world_size:
        raise RuntimeError(
            f"`accelerate launch` was asked for {asked} processes but started {world_size}: its --cpu multi-process "
            "path needs MPI (--mpirun_hostfile). On CPUs start the processes through torchrun's path, which trains "
            f"over gloo: accelerate launch --multi_gpu --num_processes {asked} train.py ...")


def deepspeed_plugin(args, world_size: int, on_cpu: bool):
    """accelerate's DeepSpeedPlugin from the launch config, with the batch, accumulation and clipping values that
    accelerate would fill from a dataloader (train.py prepares none) set from our flags."""
    try:
        import deepspeed  # noqa: F401
    except ImportError as error:
        raise RuntimeError(f"the launch config asks for DeepSpeed but it cannot be imported ({error}): "
                           "pip install deepspeed") from error
    from accelerate.utils import DeepSpeedPlugin

    if on_cpu:
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() != "cpu":
            raise RuntimeError(f"DeepSpeed on CPU processes needs its CPU accelerator, but it selected "
                               f"{get_accelerator().device_name()!r}: set DS_ACCELERATOR=cpu")
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path and not os.path.isfile(path) and (ROOT / path).is_file():
        path = str(ROOT / path)  # the shipped configs name their JSON relative to the repository
    plugin = DeepSpeedPlugin(hf_ds_config=path) if path and path != "none" else DeepSpeedPlugin()
    config = plugin.deepspeed_config
    wanted = {"train_micro_batch_size_per_gpu": ("--per_device_train_batch_size", args.per_device_train_batch_size),
              "gradient_accumulation_steps": ("--gradient_accumulation_steps", args.gradient_accumulation_steps),
              "train_batch_size": ("--per_device_train_batch_size x --gradient_accumulation_steps x processes",
                                   args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size),
              "gradient_clipping": ("--max_grad_norm", args.max_grad_norm)}
    for key, (flag, value) in wanted.items():
        if config.get(key, "auto") not in ("auto", value):
            raise ValueError(f"DeepSpeed config {path or '(from accelerate launch flags)'}: {key} is {config[key]} "
                             f"but {flag} gives {value}; set it to \"auto\" or to the same value")
        config[key] = value
    return plugin  # AcceleratorState fills mixed precision and hands transformers the config for zero.Init


def accelerator_options(args, torch) -> dict:
    """Accelerator arguments that engage the requested engine. accelerate builds a process group on CPU only with
    cpu=True (then it drops FSDP and DeepSpeed), so each engine gets its own route on a machine without GPUs."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    check_process_count(world_size)
    on_cpu = not torch.cuda.is_available()
    engine = requested_engine()
    if engine == "deepspeed":
        options = {"deepspeed_plugin": deepspeed_plugin(args, world_size, on_cpu)}
        if on_cpu:
            # cpu=True would turn DeepSpeed off; DeepSpeed's own process group over gloo keeps it on.
            from accelerate.utils import InitProcessGroupKwargs

            options["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
        return options
    if engine == "fsdp":
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* environment
        if on_cpu and plugin.fsdp_version != 2:
            raise RuntimeError(f"FSDP on CPU processes runs as FSDP2 (torch's fully_shard over gloo); the launch "
                               f"config has fsdp_version {plugin.fsdp_version}: set fsdp_version: 2")
        if on_cpu and world_size < 2:
            raise RuntimeError("FSDP on CPU needs 2 or more processes (--num_processes 2): one CPU process gets no "
                               "process group from accelerate, and has nothing to shard with")
        return {"fsdp_plugin": plugin, "cpu": on_cpu}
    # Several processes started by torchrun / `accelerate launch --multi_gpu` on a machine without a GPU: DDP over
    # gloo on the CPU (accelerate's own `--cpu` multi-process path needs MPI).
    return {"cpu": world_size > 1 and on_cpu}


def engage_engine(accelerator, options):
    """Make sure the engine the launcher asked for is the one accelerate runs; stop otherwise."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    engine = requested_engine()
    if engine == "fsdp" and accelerator.distributed_type != DistributedType.FSDP and options.get("cpu"):
        # accelerate 1.15 engages FSDP only for accelerator devices (AcceleratorState's MULTI_GPU, MULTI_XPU, ...
        # list), yet torch's FSDP2 runs over gloo on CPU: make the two assignments AcceleratorState makes there.
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = options["fsdp_plugin"]
        PartialState().distributed_type = DistributedType.FSDP  # AcceleratorState() re-reads it from here
    wanted = {"deepspeed": DistributedType.DEEPSPEED, "fsdp": DistributedType.FSDP}.get(engine)
    if wanted is not None and accelerator.distributed_type != wanted:
        raise RuntimeError(f"the launch asks for {wanted.value} but accelerate set up "
                           f"{accelerator.distributed_type.value}; refusing to train without the requested sharding")
    world_size = int(os.environ.get("WORLD_SIZE", accelerator.num_processes))  # MPI launches set no WORLD_SIZE
    if accelerator.num_processes != world_size:
        raise RuntimeError(f"the launcher started {world_size} processes but accelerate sees "
                           f"{accelerator.num_processes} ({accelerator.distributed_type.value})")


def engine_description(accelerator) -> str:
    """The engine really in use, its sharding and the process count, in words (the start-up line)."""
    from accelerate.utils import DistributedType

    n = accelerator.num_processes
    where = f"{n} process(es) on {accelerator.device.type}" + (" (one process: it holds everything)" if n == 1 else "")
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        stage = accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]["stage"]
        shards = {0: "nothing sharded (plain data parallel)", 1: "optimizer states sharded",
                  2: "optimizer states and gradients sharded", 3: "parameters, gradients and optimizer states sharded"}
        return f"DeepSpeed ZeRO-{stage}: {shards[stage]} over {where}"
    if kind == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        full = plugin.reshard_after_forward in (True, "FULL_SHARD") or \
            getattr(plugin.reshard_after_forward, "name", "") == "FULL_SHARD"
        sharding = ("parameters, gradients and optimizer states sharded" if full else
                    "gradients and optimizer states sharded, parameters kept after forward")
        return f"FSDP{plugin.fsdp_version}: {sharding}, one unit per " \
               f"{', '.join(plugin.transformer_cls_names_to_wrap or ['(auto policy)'])}, over {where}"
    if n > 1:
        return f"DDP: a full replica on each of {where}"
    return f"single process on {accelerator.device.type}, nothing sharded"


def mixed_precision_in_use(accelerator) -> str:
    """accelerate's setting, or under DeepSpeed (which casts itself) what its config enables."""
    if accelerator.state.deepspeed_plugin is None:
        return accelerator.mixed_precision
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    return next((kind for kind in ("bf16", "fp16") if config.get(kind, {}).get("enabled") is True), "no")


def weights_sharded(accelerator) -> bool:
    """FSDP or DeepSpeed ZeRO-3: no process holds the whole model between steps."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    return accelerator.distributed_type == DistributedType.DEEPSPEED and \
        accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]["stage"] == 3


def param_numel(p) -> int:
    """A parameter's full element count (ZeRO-3 leaves only the partition in the tensor; DTensors report global)."""
    return getattr(p, "ds_numel", None) or p.numel()


def local_numel(p) -> int:
    """The elements of a parameter (or optimizer state) this process holds."""
    if hasattr(p, "ds_tensor"):
        return p.ds_tensor.numel() + p.data.numel()  # ZeRO-3 partition, plus the full tensor while it is gathered
    if hasattr(p, "to_local"):
        return p.to_local().numel()  # FSDP2 DTensor shard
    return p.numel()


def engine_record(accelerator, model, optimizer) -> dict:
    """Proof of what each process holds during training: the elements of layer 0's query_key_value weight and of
    the AdamW first moments on this process, gathered from every process."""
    import torch

    name, weight = next((n, p) for n, p in accelerator.unwrap_model(model).named_parameters()
                        if "layers.0.self_attention.query_key_value" in n and n.endswith("weight"))
    inner = optimizer
    while hasattr(inner, "optimizer"):  # accelerate's wrapper, then DeepSpeed's ZeRO optimizer, then torch's AdamW
        inner = inner.optimizer
    states = sum(local_numel(state["exp_avg"]) for state in inner.state.values() if "exp_avg" in state)
    local = torch.tensor([local_numel(weight), states], device=accelerator.device)
    gathered = accelerator.gather(local[None]).tolist()
    return {"engine": engine_description(accelerator), "distributed_type": accelerator.distributed_type.value,
            "num_processes": accelerator.num_processes, "block_weight": name,
            "block_weight_numel": param_numel(weight), "block_weight_numel_per_rank": [g[0] for g in gathered],
            "adam_state_numel_per_rank": [g[1] for g in gathered]}


# ---------------------------------------------------------------------------------------------------------------
# The run

def main(argv=None):
    args = parse_args(argv)
    # Before anything is loaded or written: the checkpoint to resume and what the output folder may lose.
    checkpoint = find_checkpoint(args)
    output_plan = check_output_dir(args, checkpoint)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import torch

    if not torch.cuda.is_available():
        # DeepSpeed (imported by accelerate when installed) would pick its CPU accelerator anyway, with a warning.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler
    from transformers.utils import logging as transformers_logging

    # One progress bar, training's: none for loading weights or mapping datasets.
    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()

    sys.path.insert(0, str(ROOT))
    import data_glm
    from local_glm import glm  # noqa: F401  registers our classes for the Auto* factories

    mixed_precision = args.mixed_precision
    if mixed_precision == "auto":
        if os.environ.get("ACCELERATE_MIXED_PRECISION"):
            mixed_precision = None  # what `accelerate launch` / its config file chose
        elif torch.cuda.is_available():
            mixed_precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            mixed_precision = "no"
    output_dir = Path(args.output_dir)
    options = accelerator_options(args, torch)
    accelerator = Accelerator(
        **options,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "runs")),
        step_scheduler_with_optimizer=False,  # one scheduler step per optimizer step, whatever the process count
        dynamo_backend="inductor" if args.torch_compile else None,
    )
    engage_engine(accelerator, options)
    if args.merge_lora and weights_sharded(accelerator):
        raise ValueError(f"--merge_lora under {accelerator.distributed_type.value}: the weights are sharded across "
                         "processes, so train without it and merge afterwards in one process (peft: "
                         "PeftModel.from_pretrained(base, output_dir).merge_and_unload().save_pretrained(...))")
    say = accelerator.print
    set_seed(args.seed)
    started = time.time()
    start_step = check_checkpoint(checkpoint, accelerator.num_processes) if checkpoint is not None else 0

    config = load_config(args)
    if args.block_size is None:
        args.block_size = min(1024, config.seq_length)
    if args.block_size > config.seq_length:
        raise ValueError(f"--block_size {args.block_size} is beyond the model's seq_length {config.seq_length}")
    holder = lambda raw_train, mode: load_or_train_tokenizer(args, accelerator, raw_train, mode, checkpoint)  # noqa
    mode, tokenizer, train, validation, heldout = prepare_data(args, accelerator, holder)
    collate = data_glm.Collator(tokenizer.pad_token_id)
    train_collate = collate
    if args.packing:
        if mode != "sft":
            raise ValueError(f"--packing packs SFT conversations; this run is in {mode} mode (pretraining text is "
                             "already packed into blocks)")
        train = data_glm.pack_sft(train, args.block_size)
        train_collate = data_glm.PackedCollator(tokenizer.pad_token_id)
    model = build_model(args, config, tokenizer)
    new_tokenizer = not (args.tokenizer_name or args.model_name_or_path or checkpoint)
    start_output_dir(args, accelerator, output_plan, new_tokenizer)  # the first change to --output_dir
    if new_tokenizer:  # the same tokenizer, from where resumes will find it
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(output_dir / TOKENIZER_COPY, trust_remote_code=True)
    config = model.config
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    n_params = sum(param_numel(p) for p in model.parameters())
    n_trainable = sum(param_numel(p) for _, p in trainable)
    say(f"mode {mode}: {'streamed' if args.streaming else len(train)} training examples, "
        f"{n_params / 1e6:.2f}M parameters ({n_trainable / 1e6:.3f}M trainable); engine "
        f"{engine_description(accelerator)}; mixed precision {mixed_precision_in_use(accelerator)}")

    # ZeRO-3 (zero3_init_flag) leaves an empty tensor in each parameter: its shape is ds_shape.
    decay = [p for n, p in trainable if len(getattr(p, "ds_shape", p.shape)) >= 2]
    no_decay = [p for n, p in trainable if len(getattr(p, "ds_shape", p.shape)) < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.learning_rate,
                                  betas=(args.adam_beta1, args.adam_beta2), fused=torch.cuda.is_available())
    global_batch = args.per_device_train_batch_size * accelerator.num_processes
    batches_per_epoch = None
    if not args.streaming:
        batches_per_epoch = len(train) // global_batch
        if batches_per_epoch == 0:
            raise ValueError(f"empty dataset: {len(train)} training examples are fewer than one global batch "
                             f"({global_batch})")
    if args.max_train_steps is None:
        args.max_train_steps = max(1, int(args.num_train_epochs * batches_per_epoch
                                          // args.gradient_accumulation_steps))
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.num_warmup_steps,
                              num_training_steps=args.max_train_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    metrics_path = output_dir / "metrics.jsonl"
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        say(f"resumed from {checkpoint} at step {start_step}")
        if accelerator.is_main_process and metrics_path.exists():
            kept = [line for line in metrics_path.read_text().splitlines()
                    if json.loads(line).get("step", 0) <= start_step]
            metrics_path.write_text("".join(line + "\n" for line in kept))
    elif accelerator.is_main_process and metrics_path.exists():
        metrics_path.unlink()
    if args.report_to != "none":
        accelerator.init_trackers("glm-train", config={k: v for k, v in vars(args).items()
                                                       if isinstance(v, (int, float, str, bool))})

    def log(record):
        accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if accelerator.is_main_process:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    if args.checkpointing_steps:
        say(f"checkpoints every {args.checkpointing_steps} steps in {output_dir / 'checkpoints'}; a stopped run "
            "continues with --resume_from_checkpoint latest")
    batches = micro_batches(args, accelerator, train, train_collate, start_step * args.gradient_accumulation_steps,
                            batches_per_epoch)
    params = matmul_params(accelerator.unwrap_model(model))
    peak = peak_flops(args, accelerator) * accelerator.num_processes
    progress = tqdm(range(start_step, args.max_train_steps), initial=start_step, total=args.max_train_steps,
                    disable=not accelerator.is_local_main_process, desc="training")
    model.train()
    last_checkpoint = complete_checkpoints(output_dir / "checkpoints")[-1:] or [None]
    last_checkpoint = checkpoint or last_checkpoint[0]
    loss_value, eval_loss, perplexity = float("nan"), None, None
    if start_step == 0:
        eval_loss, perplexity = evaluate(args, accelerator, model, validation, collate)
        log({"step": 0, "eval_loss": eval_loss, "perplexity": perplexity})
    window_tokens, window_flops, window_start = 0, 0.0, time.time()
    for step in range(start_step + 1, args.max_train_steps + 1):
        micro = [{k: v.to(accelerator.device, non_blocking=True) for k, v in next(batches).items()}
                 for _ in range(args.gradient_accumulation_steps)]
        # The loss is the mean over every target token of the global batch, so any process count and any
        # accumulation split give the same gradient. Backends average gradients over processes and accelerate
        # divides by the accumulation steps; scaling by both undoes that.
        local = torch.stack([(b["labels"][:, 1:] != -100).sum() for b in micro]).sum()
        global_tokens = accelerator.reduce(local.float(), "sum").clamp(min=1)
        scale = accelerator.num_processes * args.gradient_accumulation_steps / global_tokens
        loss_sum = torch.zeros((), device=accelerator.device)
        for batch in micro:
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    loss, _ = token_loss_sum(model, batch)
                accelerator.backward(loss * scale)
                loss_sum += loss.detach()
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm) \
            if args.max_grad_norm > 0 else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step == start_step + 1:
            record = engine_record(accelerator, model, optimizer)
            log({"step": step, **record})
            if accelerator.num_processes > 1 and accelerator.is_main_process:  # what each process really holds
                progress.write(f"engine check at step {step}: layer 0 query_key_value.weight "
                               f"({record['block_weight_numel']} elements) held per process "
                               f"{record['block_weight_numel_per_rank']}, AdamW moment elements per process "
                               f"{record['adam_state_numel_per_rank']}")

        loss_value = (accelerator.reduce(loss_sum, "sum") / global_tokens).item()
        if not math.isfinite(loss_value):
            message = (f"loss is {loss_value} at step {step}: stopping. The last good checkpoint is "
                       f"{last_checkpoint or 'none (no checkpoint was written yet)'}; lower --learning_rate or check "
                       "the data, then resume with --resume_from_checkpoint.")
            accelerator.end_training()
            raise NonFiniteLoss(message)
        window_tokens += sum(int(b["input_ids"].numel()) for b in micro) * accelerator.num_processes
        window_flops += sum(batch_flops(params, config, b["input_ids"].shape) for b in micro) * \
            accelerator.num_processes
        progress.update(1)
        if step % args.logging_steps == 0 or step == args.max_train_steps:
            elapsed = time.time() - window_start
            tokens_per_s = window_tokens / max(elapsed, 1e-9)
            record = {"step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0],
                      "grad_norm": float(grad_norm) if grad_norm is not None else None,
                      "tokens_per_s": tokens_per_s, "mfu": window_flops / max(elapsed, 1e-9) / peak,
                      "elapsed_s": time.time() - started}
            log(record)
            progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{tokens_per_s:.0f}",
                                 mfu=f"{record['mfu']:.1%}")
            window_tokens, window_flops, window_start = 0, 0.0, time.time()
        else:
            log({"step": step, "loss": loss_value})
        if step % args.eval_steps == 0 or step == args.max_train_steps:
            eval_loss, perplexity = evaluate(args, accelerator, model, validation, collate)
            log({"step": step, "eval_loss": eval_loss, "perplexity": perplexity})
            if accelerator.is_main_process:  # a line of its own, not glued to the progress bar
                progress.write(f"step {step}: loss {loss_value:.4f}, eval loss {eval_loss:.4f}, "
                               f"perplexity {perplexity:.3f}")
            window_start = time.time()  # throughput counts training only
        if args.checkpointing_steps and step % args.checkpointing_steps == 0:
            stop_if_weights_non_finite(accelerator, model, step, last_checkpoint)
            last_checkpoint = save_checkpoint(accelerator, output_dir, step, {"step": step},
                                              args.checkpoints_total_limit)
            window_start = time.time()
    progress.close()
    if start_step >= args.max_train_steps:
        eval_loss, perplexity = evaluate(args, accelerator, model, validation, collate)

    stop_if_weights_non_finite(accelerator, model, args.max_train_steps, last_checkpoint)
    save_output(args, accelerator, model, tokenizer, mode, {"steps": args.max_train_steps, "final_loss": loss_value,
                                                             "eval_loss": eval_loss, "perplexity": perplexity})
    accelerator.end_training()
    if accelerator.is_main_process:
        if heldout is not None:
            accuracy, details = report_skills(output_dir, heldout)
            log({"step": args.max_train_steps, "heldout_exact_match": accuracy})
            with open(output_dir / "README.md", "a") as f:
                f.write(f"\nHeld-out exact match of greedy replies (questions never seen in training): "
                        f"{accuracy:.1%} ({details}).\n")
        if args.push_to_hub:
            push_to_hub(output_dir, args.hub_model_id or output_dir.name, token=args.hub_token,
                        private=args.hub_private)
        say(f"done in {time.time() - started:.0f}s; the model folder is {output_dir}")


# ---------------------------------------------------------------------------------------------------------------
# The output folder: weights, config with auto_map, code files, tokenizer, generation config, model card.

def save_output(args, accelerator, model, tokenizer, mode, summary):
    from transformers import GenerationConfig

    output_dir = Path(args.output_dir)
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)
    if not args.lora_r:
        unwrapped = savable_model(unwrapped)
    save = dict(is_main_process=accelerator.is_main_process, save_function=accelerator.save,
                max_shard_size=args.max_shard_size)
    if args.lora_r:
        # The adapter alone (small, loads with peft on top of the base), and with --merge_lora full weights.
        adapter_dir = output_dir / "adapter" if args.merge_lora else output_dir
        unwrapped.save_pretrained(adapter_dir, state_dict=state_dict, **save)
        if args.merge_lora and accelerator.is_main_process:
            merged = unwrapped.merge_and_unload()
            merged.save_pretrained(output_dir, max_shard_size=args.max_shard_size)
    else:
        unwrapped.save_pretrained(output_dir, state_dict=state_dict, **save)
    if not accelerator.is_main_process:
        return
    if (output_dir / "config.json").exists():  # not for a LoRA adapter alone
        write_engine_config(output_dir / "config.json", args, tokenizer)
    tokenizer.model_max_length = unwrapped.config.seq_length  # so truncation=True means the model's context
    tokenizer.save_pretrained(output_dir)
    # The working copy a from-scratch run kept for resumes; the folder's own tokenizer files replace it.
    shutil.rmtree(output_dir / "tokenizer", ignore_errors=True)
    stop_ids = list(tokenizer.stop_token_ids)
    GenerationConfig(eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id, do_sample=False
                     ).save_pretrained(output_dir)
    write_model_card(args, output_dir, mode, summary)


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


# llama.cpp's converter takes ChatGLM3's SentencePiece vocabulary only when config.json's _name_or_path contains
# "THUDM/chatglm3-6b". A folder without a Hub base records this: it names the format, and is no Hub id (the space).
GLM3_FORMAT_NAME = "THUDM/chatglm3-6b tokenizer format"


def base_hub_id(args):
    """The base model's Hub id ("org/name"), or None: a Hub id given as --model_name_or_path, else the
    `_name_or_path` that a local base folder's config.json records (THUDM's files carry theirs)."""
    import re

    base = args.model_name_or_path
    if base is None:
        return None
    if (Path(base) / "config.json").exists():
        base = json.loads((Path(base) / "config.json").read_text()).get("_name_or_path") or ""
    is_hub_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", base) and not Path(base).exists()
    return base if is_hub_id else None


def write_engine_config(path: Path, args, tokenizer):
    """config.json values that serving engines' converters read (GLM_SPEC.md section 8, docs/engines.md):
    `eos_token_id` one int (chatglm.cpp packs it as one; the stop list is in generation_config.json), `vocab_size`
    (llama.cpp's converter reads it), and `_name_or_path`: the base's Hub id, or for a ChatGLM3-format tokenizer
    without one GLM3_FORMAT_NAME (llama.cpp reads the SentencePiece vocabulary only then)."""
    config = json.loads(path.read_text())
    if isinstance(config.get("eos_token_id"), list) and not tokenizer.is_glm4:
        config["eos_token_id"] = tokenizer.eos_token_id  # GLM-4's published config keeps its list
    name = base_hub_id(args) or (None if tokenizer.is_glm4 else GLM3_FORMAT_NAME)
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


def write_model_card(args, output_dir: Path, mode: str, summary: dict):
    """README.md with Hub metadata, what was trained on, the final numbers and the loss curve."""
    plot_loss(output_dir / "metrics.jsonl", output_dir / "loss_curve.png")
    base = base_hub_id(args)  # never a local path in the card
    data = ("built-in generated bilingual chat data (addition, weather tool call)" if args.builtin
            else args.dataset_name or ", ".join(f for f in (args.train_file, args.validation_file) if f))
    method = "LoRA" if args.lora_r else "P-tuning v2" if args.pre_seq_len else "full"
    tags = ["glm", "chatglm", "text-generation", mode] + (["lora", "peft"] if args.lora_r else []) + \
        (["p-tuning-v2"] if args.pre_seq_len else [])
    header = ["---", "license: mit", "library_name: " + ("peft" if args.lora_r and not args.merge_lora
                                                         else "transformers"),
              "pipeline_tag: text-generation", "tags:"] + [f"- {t}" for t in tags]
    if base:
        header.append(f"base_model: {base}")
    header.append("---")

    def number(value):
        return "n/a" if value is None else f"{value:.4g}"

    body = f"""
# {args.hub_model_id or output_dir.name}

A GLM model ({'fine-tuned from ' + (base or 'a local model') if args.model_name_or_path
               else 'trained from scratch with config ' + str(args.config_name)})
by this repository's `train.py` ({method} training, {mode} mode).

| | |
|---|---|
| data | {data} |
| steps | {summary['steps']} |
| batch | {args.per_device_train_batch_size} per device x {args.gradient_accumulation_steps} accumulation |
| learning rate | {args.learning_rate} ({args.lr_scheduler_type}, {args.num_warmup_steps} warmup steps) |
| final training loss | {number(summary['final_loss'])} |
| validation loss | {number(summary['eval_loss'])} |
| validation perplexity | {number(summary['perplexity'])} |

![loss curve](loss_curve.png)

## Use

```python
from transformers import AutoModel, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("{args.hub_model_id or output_dir}", trust_remote_code=True)
model = AutoModel.from_pretrained("{args.hub_model_id or output_dir}", trust_remote_code=True)
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


# ---------------------------------------------------------------------------------------------------------------
# The built-in run's check: greedy replies from the saved folder, and a chat through AutoModel.

def heldout_prompts(tokenizer, heldout):
    """(prompt ids, expected reply ids without the stop token) for each held-out conversation."""
    pairs = []
    for row in heldout:
        encoded = tokenizer.tokenize_conversation(row["conversations"])
        ids, labels = encoded["input_ids"], encoded["labels"]
        start = next(i for i, label in enumerate(labels) if label != -100)
        end = start
        while end < len(labels) and labels[end] != -100:
            end += 1
        # The label after a reply is the stop token; a held-out conversation ends at the reply, so it is </s> even
        # where the model rightly stops a tool call with <|observation|>: any stop token counts.
        pairs.append((ids[:start], ids[start:end - 1]))
    return pairs


def generate_replies(model, tokenizer, prompts, max_new_tokens, batch_size=64):
    """Greedy continuations of left-padded prompts, each cut after its first stop token."""
    import torch

    stop = set(tokenizer.stop_token_ids)
    pad = tokenizer.pad_token_id
    replies = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        width = max(len(p) for p in chunk)
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=list(stop), pad_token_id=pad)
        for row in out[:, width:].tolist():
            reply = []
            for token in row:
                reply.append(token)
                if token in stop:
                    break
            replies.append(reply)
    return replies


def report_skills(output_dir: Path, heldout) -> float:
    """Held-out exact match of greedy replies from the saved folder; then a short chat through AutoModel."""
    import data_glm
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(output_dir, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(output_dir, trust_remote_code=True).eval()
    pairs = heldout_prompts(tokenizer, heldout)
    replies = generate_replies(model, tokenizer, [p for p, _ in pairs], max(len(e) for _, e in pairs) + 3)
    stop = set(tokenizer.stop_token_ids)
    replies = [reply[:-1] if reply and reply[-1] in stop else reply + [None] for reply in replies]  # unstopped: wrong
    by_kind = {}
    for row, (_, expected), reply in zip(heldout, pairs, replies):
        by_kind.setdefault(row["kind"], []).append(reply == expected)
    correct = sum(sum(v) for v in by_kind.values())
    accuracy = correct / len(heldout)
    details = ", ".join(f"{kind} {sum(v)}/{len(v)}" for kind, v in sorted(by_kind.items()))
    print(f"held-out exact match: {accuracy:.1%} ({details})")
    # Reply and expectation decoded alike (a tool call's metadata line included).
    misses = [(row, tokenizer.decode([t for t in reply if t is not None]), tokenizer.decode(expected))
              for row, (_, expected), reply in zip(heldout, pairs, replies) if reply != expected]
    for row, text, expected in misses[:3]:
        print(f"  miss: {row['conversations'][-2]['content']!r} -> {text!r} (expected {expected!r})")

    chat_model = AutoModel.from_pretrained(output_dir, trust_remote_code=True).eval()
    for query in ("What is 23 plus 58?", "41+17等于多少？"):
        print(f"chat> {query}\n  {chat_reply(chat_model, tokenizer, query)}")
    tools_history = [{"role": "system", "content": data_glm.SYSTEM_PROMPT, "tools": [data_glm.WEATHER_TOOL]}]
    print(f"chat> 杭州今天天气如何？ (with the weather tool)\n  "
          f"{chat_reply(chat_model, tokenizer, '杭州今天天气如何？', tools_history)}")
    return accuracy, details


def chat_reply(model, tokenizer, query, history=None):
    """model.chat when the chat API is present (chat_glm.py), else the prompt and a greedy generate."""
    if hasattr(model, "chat"):
        try:
            response, _ = model.chat(tokenizer, query, history=list(history or []), do_sample=False,
                                     max_new_tokens=64)
            return response
        except Exception as error:  # say so, then answer through the plain prompt below
            print(f"  (model.chat failed: {type(error).__name__}: {error}; using build_chat_input + generate)")
    inputs = tokenizer.build_chat_input(query, history=history or [], role="user")
    prompt = inputs["input_ids"][0].tolist()
    reply = generate_replies(model, tokenizer, [prompt], 64)[0]
    if reply and reply[-1] in set(tokenizer.stop_token_ids):
        reply = reply[:-1]
    return tokenizer.decode(reply)


if __name__ == "__main__":
    main()
