"""The training loop: one optimizer step per iteration, then metrics, evaluation and `checkpointer.save(step)`.

The loss of a step is the mean over every target token of the global batch, so any process count and any
accumulation split give the same gradient.
"""

import math
import time
from dataclasses import dataclass

from .checkpoint import NonFiniteLoss
from .data.batches import steps_per_epoch
from .engine import engine_record
from .errors import InputError

# Fewer optimizer steps than this, and the run says so before training, with the learning rate of each step.
FEW_STEPS = 10


@dataclass
class Schedule:
    """How long and how often: optimizer steps, micro-steps per step, and the logging / evaluation intervals."""

    max_steps: int
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    eval_steps: int = 500
    eval_batch_size: int = 32


def plan_steps(num_rows: int, *, per_device_batch_size: int, num_processes: int, accumulation: int,
               epochs: float, max_train_steps=None) -> int:
    """The run's optimizer steps: --max_train_steps, else --num_train_epochs passes over the rows (each epoch's last
    step takes the rows that are left). Refuses data smaller than one step's rows, naming the flags to lower and
    the largest batch that fits."""
    step_rows = per_device_batch_size * num_processes * accumulation
    if num_rows < step_rows:
        fits = num_rows // (num_processes * accumulation)
        largest = (f"--per_device_train_batch_size {fits}" if fits else
                   f"--per_device_train_batch_size 1 --gradient_accumulation_steps {num_rows // num_processes}"
                   if num_rows >= num_processes else f"at most {num_rows} process(es)")
        raise InputError(f"{num_rows} training examples are fewer than one optimizer step's {step_rows} rows "
                         f"(--per_device_train_batch_size {per_device_batch_size} x --gradient_accumulation_steps "
                         f"{accumulation} x {num_processes} process(es)); the largest batch that fits: {largest}")
    return max_train_steps or max(1, int(epochs * steps_per_epoch(num_rows, step_rows)))


def learning_rates(scheduler_type: str, learning_rate: float, warmup: int, steps: int):
    """The learning rate each optimizer step uses under the schedule (transformers' get_scheduler, as the loop)."""
    import torch
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=learning_rate)
    scheduler = get_scheduler(scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    rates = []
    for _ in range(steps):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates


def few_steps_notice(steps: int, num_rows: int, step_rows: int, scheduler_type: str, learning_rate: float,
                     warmup: int) -> str:
    """A line for runs of fewer than FEW_STEPS optimizer steps (they rarely learn anything); else ""."""
    if steps >= FEW_STEPS:
        return ""
    rates = learning_rates(scheduler_type, learning_rate, warmup, steps)
    epochs = steps / steps_per_epoch(num_rows, step_rows)
    return (f"note: this run makes only {steps} optimizer step(s), {epochs:.3g} epoch(s) of {num_rows} training "
            f"examples at {step_rows} a step; the learning rate of each step: "
            f"{', '.join(f'{rate:.3g}' for rate in rates)}. For more steps raise --num_train_epochs or "
            "--max_train_steps, or lower --per_device_train_batch_size / --gradient_accumulation_steps.")


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


def evaluate(accelerator, model, validation, collate, batch_size: int):
    """Validation loss (mean over target tokens of all processes) and perplexity."""
    import torch

    model.eval()
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    indices = list(range(accelerator.process_index, len(validation), accelerator.num_processes))
    with torch.no_grad():
        for i in range(0, len(indices), batch_size):
            batch = collate([validation[j] for j in indices[i:i + batch_size]])
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.autocast():
                loss, count = token_loss_sum(model, batch)
            total += torch.stack((loss.double(), count.double()))
    total = accelerator.reduce(total, "sum")
    model.train()
    loss = (total[0] / total[1].clamp(min=1)).item()
    return loss, math.exp(min(loss, 50))


def train_step(accelerator, model, optimizer, scheduler, micro, max_grad_norm: float):
    """Forward and backward over the micro-batches, clipping, one optimizer and scheduler step. Returns the global
    mean loss per target token, the gradient norm (None without clipping) and the learning rate the step used."""
    import torch

    # Backends average gradients over processes and accelerate divides by the accumulation steps; scaling by both
    # undoes that, leaving the sum over the global batch divided by its target tokens.
    local = torch.stack([(b["labels"][:, 1:] != -100).sum() for b in micro]).sum()
    global_tokens = accelerator.reduce(local.float(), "sum").clamp(min=1)
    scale = accelerator.num_processes * len(micro) / global_tokens
    loss_sum = torch.zeros((), device=accelerator.device)
    for batch in micro:
        with accelerator.accumulate(model):
            with accelerator.autocast():
                loss, _ = token_loss_sum(model, batch)
            accelerator.backward(loss * scale)
            loss_sum += loss.detach()
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm) if max_grad_norm > 0 else None
    learning_rate = scheduler.get_last_lr()[0]  # this step's: scheduler.step() moves it to the next step's
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return (accelerator.reduce(loss_sum, "sum") / global_tokens).item(), grad_norm, learning_rate


def train(accelerator, model, optimizer, scheduler, batches, schedule: Schedule, *, start_step, validation,
          eval_collate, checkpointer, log, throughput, progress, started):
    """Steps start_step+1 .. schedule.max_steps. Returns the final loss, validation loss and perplexity."""
    loss, eval_loss, perplexity = float("nan"), None, None
    model.train()
    if start_step == 0:
        eval_loss, perplexity = evaluate(accelerator, model, validation, eval_collate, schedule.eval_batch_size)
        log({"step": 0, "eval_loss": eval_loss, "perplexity": perplexity})
    throughput.restart()
    for step in range(start_step + 1, schedule.max_steps + 1):
        micro = [{k: v.to(accelerator.device, non_blocking=True) for k, v in next(batches).items()}
                 for _ in range(schedule.gradient_accumulation_steps)]
        loss, grad_norm, learning_rate = train_step(accelerator, model, optimizer, scheduler, micro,
                                                    schedule.max_grad_norm)
        if step == start_step + 1:
            log_engine(accelerator, model, optimizer, step, log, progress)
        if not math.isfinite(loss):
            accelerator.end_training()
            raise NonFiniteLoss(f"loss is {loss} at step {step}: stopping. The last good checkpoint is "
                                f"{checkpointer.last_description()}; lower --learning_rate or check the data, then "
                                "resume with --resume_from_checkpoint.")
        throughput.add([tuple(b["input_ids"].shape) for b in micro], accelerator.num_processes)
        progress.update(1)
        if step % schedule.logging_steps == 0 or step == schedule.max_steps:
            record = {"step": step, "loss": loss, "lr": learning_rate,
                      "grad_norm": float(grad_norm) if grad_norm is not None else None, **throughput.rates(),
                      "elapsed_s": time.time() - started}
            log(record)
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}",
                                 mfu=f"{record['mfu']:.1%}")
            throughput.restart()
        else:
            log({"step": step, "loss": loss})
        if step % schedule.eval_steps == 0 or step == schedule.max_steps:
            eval_loss, perplexity = evaluate(accelerator, model, validation, eval_collate, schedule.eval_batch_size)
            log({"step": step, "eval_loss": eval_loss, "perplexity": perplexity})
            if accelerator.is_main_process:  # a line of its own, not glued to the progress bar
                progress.write(f"step {step}: loss {loss:.4f}, eval loss {eval_loss:.4f}, perplexity "
                               f"{perplexity:.3f}")
            throughput.restart()  # throughput counts training only
        if checkpointer.save(step, model):
            throughput.restart()
    progress.close()
    if start_step >= schedule.max_steps:  # resumed from the last step: the numbers of the card
        eval_loss, perplexity = evaluate(accelerator, model, validation, eval_collate, schedule.eval_batch_size)
    return loss, eval_loss, perplexity


def log_engine(accelerator, model, optimizer, step, log, progress):
    """What each process really holds, recorded at the first step (and printed when there are several)."""
    record = engine_record(accelerator, model, optimizer)
    log({"step": step, **record})
    if accelerator.num_processes > 1 and accelerator.is_main_process:
        progress.write(f"engine check at step {step}: layer 0 query_key_value.weight "
                       f"({record['block_weight_numel']} elements) held per process "
                       f"{record['block_weight_numel_per_rank']}, AdamW moment elements per process "
                       f"{record['adam_state_numel_per_rank']}")
