r"""Train a GLM (ChatGLM3 / GLM-4 architecture) with accelerate: pretraining or SFT, full, LoRA or P-tuning v2.

    accelerate launch train.py                # the built-in run: a small chat model from scratch, then a chat
    accelerate launch train.py --train_file corpus.txt --config_name small --block_size 512
    accelerate launch --config_file accelerate_configs/fsdp.yaml train.py --model_name_or_path THUDM/chatglm3-6b \
        --train_file chats.jsonl --lora_r 8

Every knob is a flag (`python train.py --help`). This file reads top to bottom: parse, build (engine, data,
tokenizer, model), train, save. The parts live in glm_train/, one module per job (docs/architecture.md has the map):
flags, engine, data, model, checkpoint, loop, metrics, publish, skills.
"""

import signal
import sys
import time

from glm_train import flags
from glm_train.checkpoint import Checkpointer
from glm_train.errors import InputError, Interrupted, Refusal


def main(argv=None):
    args = flags.parse_args(argv)
    # Before anything is loaded or written: the checkpoint to resume and what the output folder may lose.
    checkpointer = Checkpointer(args.output_dir, resume_from=args.resume_from_checkpoint,
                                overwrite=args.overwrite_output_dir, every=args.checkpointing_steps,
                                keep=args.checkpoints_total_limit,
                                inputs={"--model_name_or_path": args.model_name_or_path,
                                        "--tokenizer_name": args.tokenizer_name})
    started = time.time()
    signal.signal(signal.SIGTERM, stop)  # a scheduler's or `kill`'s stop ends as Ctrl-C does
    try:
        accelerator = start_engine(args)
        rows, tokenizer, splits, net, max_steps = build(args, accelerator, checkpointer)
        net, log, summary = fit(args, accelerator, checkpointer, net, splits, max_steps, started)
        save(args, accelerator, checkpointer, net, tokenizer, rows, log, summary)
    except KeyboardInterrupt:  # checkpoints are written whole or not at all: say which one to continue from
        raise Interrupted(f"stopped before the end; the last complete checkpoint is "
                          f"{checkpointer.last_description()}" + ("; continue with --resume_from_checkpoint "
                          "latest" if checkpointer.last else "")) from None
    except Exception as error:  # a full disk, in whichever words the writing library puts it
        full = checkpointer.disk_full(error)
        if full is None:
            raise
        raise full from error
    if accelerator.is_main_process:
        print(f"done in {time.time() - started:.0f}s; the model folder is {args.output_dir}")


def stop(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def start_engine(args):
    """The accelerate engine the launcher asked for, seeded; quiet libraries (one progress bar: training's)."""
    from glm_train import engine

    engine.set_process_environment()
    import datasets
    from accelerate.utils import set_seed
    from transformers.utils import logging as transformers_logging

    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()
    accelerator = engine.make_accelerator(
        mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.gradient_accumulation_steps,
        per_device_batch_size=args.per_device_train_batch_size, max_grad_norm=args.max_grad_norm,
        project_dir=args.output_dir, report_to=args.report_to, torch_compile=args.torch_compile)
    if args.merge_lora and engine.weights_sharded(accelerator):
        raise InputError(f"--merge_lora under {accelerator.distributed_type.value}: the weights are sharded across "
                         "processes, so train without it and merge afterwards in one process (peft: "
                         "PeftModel.from_pretrained(base, output_dir).merge_and_unload().save_pretrained(...))")
    set_seed(args.seed)
    return accelerator


def build(args, accelerator, checkpointer):
    """The checked rows, the tokenizer (trained on them from scratch, else loaded), the tokenized splits, the number
    of optimizer steps and the model; then, every check passed, the output folder's first change."""
    from glm_train import data, engine, loop, model

    config = model.load_config(args.model_name_or_path, args.config_name, args.pre_seq_len, args.prefix_projection)
    block_size = args.block_size or min(1024, config.seq_length)
    if block_size > config.seq_length:
        raise InputError(f"--block_size {block_size} is beyond the model's seq_length {config.seq_length}")
    rows = data.load_rows(
        dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name, train_file=args.train_file,
        validation_file=args.validation_file, builtin_examples=args.builtin_train_examples,
        builtin_heldout=args.builtin_heldout_examples, text_column=args.text_column,
        conversations_column=args.conversations_column, mode=args.mode, max_train_samples=args.max_train_samples,
        streaming=args.streaming, seed=args.seed)
    new_tokenizer = not (args.tokenizer_name or args.model_name_or_path or checkpointer.resume_from)
    if new_tokenizer:  # trained on this run's data (start() keeps a copy where resumes find it)
        corpus = data.tokenizer_corpus(rows, args.max_train_samples, args.streaming)
        tokenizer, tokenizer_files = model.shared_tokenizer(
            accelerator, lambda: model.train_tokenizer(corpus, args.tokenizer_vocab_size))
    else:
        tokenizer_files = None
        tokenizer = model.load_tokenizer(args.tokenizer_name or args.model_name_or_path or
                                         checkpointer.tokenizer_folder())
    splits = data.tokenize(rows, tokenizer, block_size=block_size, seed=args.seed,
                           validation_split_percentage=args.validation_split_percentage,
                           num_proc=args.preprocessing_num_workers, max_eval_samples=args.max_eval_samples,
                           packing=args.packing, streaming=args.streaming,
                           main_process_first=accelerator.main_process_first)
    if splits.truncation:
        accelerator.print(splits.truncation)
    max_steps = args.max_train_steps  # --streaming requires it: a stream has no length
    if not args.streaming:
        max_steps = loop.plan_steps(len(splits.train), per_device_batch_size=args.per_device_train_batch_size,
                                    num_processes=accelerator.num_processes, max_train_steps=max_steps,
                                    accumulation=args.gradient_accumulation_steps, epochs=args.num_train_epochs)
        step_rows = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
        notice = loop.few_steps_notice(max_steps, len(splits.train), step_rows, args.lr_scheduler_type,
                                       args.learning_rate, args.num_warmup_steps)
        if notice:
            accelerator.print(notice)
    net = model.build_model(config, tokenizer, model_name_or_path=args.model_name_or_path, seed=args.seed,
                            attn_implementation=args.attn_implementation, lora_r=args.lora_r,
                            gradient_checkpointing=args.gradient_checkpointing, lora_alpha=args.lora_alpha,
                            lora_dropout=args.lora_dropout)
    rows_trained = None if args.streaming else len(splits.train)
    run = flags.step_settings(args, accelerator.num_processes, block_size, rows_trained, net.config)
    checkpointer.start(accelerator, tokenizer_files, run)  # the first change to --output_dir
    if new_tokenizer:  # the same tokenizer, from where resumes will find it
        tokenizer = model.load_tokenizer(checkpointer.output_dir / "tokenizer")
    n_params = sum(engine.param_numel(p) for p in net.parameters())
    n_trainable = sum(engine.param_numel(p) for p in net.parameters() if p.requires_grad)
    accelerator.print(
        f"mode {rows.mode}: {'streamed' if args.streaming else len(splits.train)} training examples, "
        f"{n_params / 1e6:.2f}M parameters ({n_trainable / 1e6:.3f}M trainable); engine "
        f"{engine.engine_description(accelerator)}; mixed precision {engine.mixed_precision_in_use(accelerator)}")
    return rows, tokenizer, splits, net, max_steps


def fit(args, accelerator, checkpointer, net, splits, max_steps, started):
    """The optimizer and its schedule, the state to continue from, then the loop. Returns the final numbers."""
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from glm_train import data, loop, metrics, model

    optimizer = model.optimizer_for(net, learning_rate=args.learning_rate, weight_decay=args.weight_decay,
                                    betas=(args.adam_beta1, args.adam_beta2))
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.num_warmup_steps,
                              num_training_steps=max_steps)
    config = net.config
    net, optimizer, scheduler = accelerator.prepare(net, optimizer, scheduler)
    start_step = checkpointer.load(accelerator)
    log = metrics.MetricsLog(accelerator, checkpointer.output_dir / "metrics.jsonl", start_step, args.report_to,
                             vars(args))
    if args.checkpointing_steps:
        accelerator.print(f"checkpoints every {args.checkpointing_steps} steps in {checkpointer.folder}; a stopped "
                          "run continues with --resume_from_checkpoint latest")
    batches = data.micro_batches(
        splits.train, splits.train_collate, per_device_batch_size=args.per_device_train_batch_size,
        num_processes=accelerator.num_processes, process_index=accelerator.process_index, seed=args.seed,
        start_micro=start_step * args.gradient_accumulation_steps, accumulation=args.gradient_accumulation_steps,
        num_workers=args.dataloader_num_workers,
        pin_memory=accelerator.device.type == "cuda", streaming=args.streaming)
    peak = metrics.peak_flops(accelerator.device, args.peak_tflops) * accelerator.num_processes
    schedule = loop.Schedule(max_steps, args.gradient_accumulation_steps, args.max_grad_norm, args.logging_steps,
                             args.eval_steps, args.per_device_eval_batch_size)
    with tqdm(range(start_step, max_steps), initial=start_step, total=max_steps, desc="training",
              disable=not accelerator.is_local_main_process) as progress:  # closed on a stop too, before its line
        loss, eval_loss, perplexity = loop.train(
            accelerator, net, optimizer, scheduler, batches, schedule, start_step=start_step,
            validation=splits.validation, eval_collate=splits.eval_collate, checkpointer=checkpointer, log=log,
            throughput=metrics.Throughput(accelerator.unwrap_model(net), config, peak), progress=progress,
            started=started)
    checkpointer.ensure_finite(net, max_steps)
    return net, log, {"steps": max_steps, "final_loss": loss, "eval_loss": eval_loss, "perplexity": perplexity}


def save(args, accelerator, checkpointer, net, tokenizer, rows, log, summary):
    """The model folder; then (the built-in run) its held-out score and a chat; the upload last."""
    from glm_train import publish

    output_dir = checkpointer.output_dir
    facts = publish.RunFacts(**flags.card_facts(args, rows.mode))
    publish.save_output(accelerator, net, tokenizer, output_dir, facts, summary, args.max_shard_size)
    accelerator.end_training()
    if not accelerator.is_main_process:
        return
    if rows.heldout is not None:
        from glm_train import skills

        accuracy, details = skills.report_skills(output_dir, rows.heldout)
        log({"step": summary["steps"], "heldout_exact_match": accuracy})
        publish.write_model_card(output_dir, facts, {**summary, "heldout_exact_match": accuracy,
                                                     "heldout_details": details})  # the score in its model-index
    if args.push_to_hub:
        publish.push_to_hub(output_dir, args.hub_model_id or output_dir.name, token=args.hub_token,
                            private=args.hub_private)


if __name__ == "__main__":
    try:
        main()
    except Refusal as refusal:  # bad input or setup: the message names it; a traceback would bury it
        sys.exit(f"train.py: {refusal}")
    except Interrupted as interrupted:
        print(f"train.py: {interrupted}", file=sys.stderr)
        sys.exit(130)
