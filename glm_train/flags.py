"""The flag table of train.py and the recipes that fill what the flags leave open: the built-in run's (no data
flags) and the general one. Range checks happen here, so a bad value stops the run naming its flag before anything
is loaded or written. `parse_args` returns the namespace; nothing changes it afterwards.
"""

import argparse
import math
import os
from pathlib import Path

from .model import LORA_TARGETS

DESCRIPTION = """Train a GLM (ChatGLM3 / GLM-4 architecture) with accelerate: pretraining or SFT, full, LoRA or
P-tuning v2.

With no data flags it trains a small model from scratch on built-in generated bilingual chat data (arithmetic and a
weather tool call), checks held-out exact-match accuracy through AutoModelForCausalLM loaded from the saved folder,
and chats with it through AutoModel:

    accelerate launch train.py                # or: python train.py
    accelerate launch train.py --train_file corpus.txt --config_name small --block_size 512
    accelerate launch --config_file accelerate_configs/fsdp.yaml train.py --model_name_or_path THUDM/chatglm3-6b \\
        --train_file chats.jsonl --lora_r 8
"""

# The built-in run's recipe (no data flags): tuned to reach >= 90% held-out accuracy on 2 CPU cores in minutes.
BUILTIN_RECIPE = dict(config_name="tiny", learning_rate=3e-3, per_device_train_batch_size=64, max_train_steps=1500,
                      num_warmup_steps=100, block_size=256, eval_steps=300, weight_decay=0.0, logging_steps=10,
                      tokenizer_vocab_size=800, max_eval_samples=256, checkpointing_steps=300)
# Where nothing else is given (run_clm's values where it has one).
GENERAL_DEFAULTS = dict(config_name=None, learning_rate=5e-5, per_device_train_batch_size=8, max_train_steps=None,
                        num_warmup_steps=0, block_size=None, eval_steps=500, weight_decay=0.0, logging_steps=10,
                        tokenizer_vocab_size=32000, max_eval_samples=None, checkpointing_steps=None)


def default_output_dir(model_name_or_path=None) -> str:
    """output/glm-skills, or for a fine-tune a new folder named after the base: never the base itself.

    >>> default_output_dir("output/glm-skills"), default_output_dir("THUDM/chatglm3-6b")
    ('output/glm-skills-finetuned', 'output/chatglm3-6b-finetuned')
    """
    if not model_name_or_path:
        return "output/glm-skills"
    name = Path(model_name_or_path.rstrip("/\\")).name or "model"
    return f"output/{name}-finetuned"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    out.add_argument("--output_dir", help="Where the model folder, checkpoints and metrics.jsonl go (default: "
                     "output/glm-skills; for a fine-tune output/<base name>-finetuned). A folder holding a run or "
                     "other files is refused unless --resume_from_checkpoint or --overwrite_output_dir is given; the "
                     "folder being fine-tuned (or one holding it, or inside it) is always refused.")
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
    if args.output_dir is None:
        args.output_dir = default_output_dir(args.model_name_or_path)
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
    if args.push_to_hub and hub_offline():
        parser.error("--push_to_hub uploads to the Hub, but HF_HUB_OFFLINE is set (scripts/run.sh and "
                     "scripts/train.sh set HF_HUB_OFFLINE=1 unless it is given): run with HF_HUB_OFFLINE=0, or "
                     "train without --push_to_hub and upload the folder later")


def hub_offline() -> bool:
    """Whether huggingface_hub is in offline mode (HF_HUB_OFFLINE, read when it was imported)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def step_settings(args, processes: int, block_size: int, training_rows: int, config) -> dict:
    """What one optimizer step means: the rows it takes and what they update. Checkpoints record it; a resume under
    other settings is refused (checkpoint.check_same_run)."""
    data = (f"{args.dataset_name} {args.dataset_config_name or ''}".strip() if args.dataset_name else
            ", ".join(f for f in (args.train_file, args.validation_file) if f) or
            f"built-in ({args.builtin_train_examples} examples)")
    adapter = (f"LoRA r={args.lora_r} alpha={args.lora_alpha or 2 * args.lora_r} dropout={args.lora_dropout}"
               if args.lora_r else f"P-tuning v2 prefix {args.pre_seq_len}{' projected' * args.prefix_projection}"
               if args.pre_seq_len else "full")
    model = (f"{config.num_layers} layers, hidden {config.hidden_size}, ffn {config.ffn_hidden_size}, "
             f"{config.num_attention_heads} heads x {config.kv_channels} in {config.multi_query_group_num} groups, "
             f"vocab {config.padded_vocab_size}, seq_length {config.seq_length}")
    return {"--per_device_train_batch_size": args.per_device_train_batch_size,
            "--gradient_accumulation_steps": args.gradient_accumulation_steps, "processes": processes,
            "--seed": args.seed, "--block_size": block_size, "--packing": args.packing, "data": data,
            "training rows": "streamed" if args.streaming else training_rows, "model": model,
            "adapter": adapter}


def card_facts(args, mode: str) -> dict:
    """What the model card says about the run (publish.RunFacts' fields)."""
    local = [f for f in (args.dataset_name, args.train_file, args.validation_file) if f and os.path.exists(f)]
    data = ("built-in generated bilingual chat data (addition, weather tool call)" if args.builtin
            else ", ".join(Path(f).name for f in local) or args.dataset_name)  # local paths by name only
    return dict(base=args.model_name_or_path, config_name=args.config_name, data=data, mode=mode,
                method="LoRA" if args.lora_r else "P-tuning v2" if args.pre_seq_len else "full",
                batch=f"{args.per_device_train_batch_size} per device x {args.gradient_accumulation_steps} "
                      "accumulation",
                learning_rate=f"{args.learning_rate} ({args.lr_scheduler_type}, {args.num_warmup_steps} warmup steps)",
                name=args.hub_model_id, lora=bool(args.lora_r), merged=args.merge_lora,
                language=["en", "zh"] if args.builtin else [],  # the built-in data's languages; others unknown
                dataset=args.dataset_name)
