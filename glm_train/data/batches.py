"""Step 4 of the data path: rows to micro-batches. Collators pad rows into tensors; `GlobalBatchSampler` deals
the same global batches to any number of processes; `micro_batches` is the endless, resumable stream the loop
draws from.
"""

import itertools
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100

@dataclass
class Collator:
    """Right-pads a list of {"input_ids", "labels"} rows into tensors; padded labels are -100."""

    pad_token_id: int

    def __call__(self, rows):
        if isinstance(rows, dict):  # datasets' __getitems__ may hand over columns
            rows = [dict(zip(rows, values)) for values in zip(*rows.values())]
        if not rows:  # this process's empty share of a short last step: one padding token, no target
            rows = [{"input_ids": [self.pad_token_id], "labels": [IGNORE_INDEX], "position_ids": [0]}]
        length = max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.as_tensor(row["input_ids"])
            labels[i, :n] = torch.as_tensor(row["labels"])
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def steps_per_epoch(num_rows: int, step_rows: int) -> int:
    """Optimizer steps in one pass over `num_rows` rows at `step_rows` rows a step, the last one shorter."""
    return -(-num_rows // step_rows)


def _share(rows, parts: int, index: int):
    """Part `index` of `rows` cut into `parts` consecutive pieces as even as possible (the first ones one longer)."""
    size, extra = divmod(len(rows), parts)
    first = index * size + min(index, extra)
    return rows[first:first + size + (index < extra)]


class GlobalBatchSampler(torch.utils.data.Sampler):
    """This process's micro-batches of a seeded per-epoch shuffle, starting at a given micro-batch (for resume).

    Optimizer step s of an epoch takes rows s*S .. (s+1)*S of the shuffle, S = per_device_batch_size x num_processes
    x accumulation; its rows are cut into `accumulation` micro-batches and each of those across the processes in rank
    order. So any process count and any accumulation split of the same S see the same steps. The epoch's last step
    takes the rows that are left; a process whose share of a micro-batch is empty gets no row (the collators then
    give it one padding token without a target, so every process still runs the step). The order depends only on
    (seed, epoch).
    """

    def __init__(self, num_rows, per_device_batch_size, num_processes, process_index, seed, epoch=0,
                 start=0, shuffle=True, accumulation=1):
        self.num_rows, self.batch, self.accumulation = num_rows, per_device_batch_size, accumulation
        self.num_processes, self.process_index = num_processes, process_index
        self.seed, self.epoch, self.start, self.shuffle = seed, epoch, start, shuffle

    def global_batches(self):
        """Micro-batches per epoch (of every process together)."""
        return steps_per_epoch(self.num_rows, self.batch * self.num_processes * self.accumulation) * self.accumulation

    def __len__(self):
        return max(0, self.global_batches() - self.start)

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
            order = torch.randperm(self.num_rows, generator=generator).tolist()
        else:
            order = list(range(self.num_rows))
        step_rows = self.batch * self.num_processes * self.accumulation
        for g in range(self.start, self.global_batches()):
            step, micro = divmod(g, self.accumulation)
            rows = order[step * step_rows:(step + 1) * step_rows]
            yield _share(_share(rows, self.accumulation, micro), self.num_processes, self.process_index)


@dataclass
class PackedCollator(Collator):
    """Collator for pack_sft rows: also right-pads position_ids with 0 (each pad then stands alone) and returns no
    attention mask, so that the model builds the per-conversation mask from position_ids."""

    def __call__(self, rows):
        if isinstance(rows, dict):
            rows = [dict(zip(rows, values)) for values in zip(*rows.values())]
        if not rows:
            rows = [{"input_ids": [self.pad_token_id], "labels": [IGNORE_INDEX], "position_ids": [0]}]
        batch = super().__call__(rows)
        positions = torch.zeros_like(batch["input_ids"])
        for i, row in enumerate(rows):
            positions[i, :len(row["position_ids"])] = torch.as_tensor(row["position_ids"])
        del batch["attention_mask"]
        batch["position_ids"] = positions
        return batch


def micro_batches(train, collate, *, per_device_batch_size: int, num_processes: int, process_index: int, seed: int,
                  start_micro: int, accumulation: int = 1, num_workers: int = 0, pin_memory: bool = False,
                  streaming: bool = False):
    """An endless iterator over this process's micro-batches, starting at global micro-batch `start_micro`
    (streams: each process's shard in batches of `per_device_batch_size`, a shard's short tail skipped)."""
    if streaming:
        yield from _streamed_micro_batches(train, collate, per_device_batch_size, num_processes, process_index,
                                           start_micro)
        return
    batches_per_epoch = GlobalBatchSampler(len(train), per_device_batch_size, num_processes, process_index, seed,
                                           accumulation=accumulation).global_batches()
    epoch, offset = divmod(start_micro, batches_per_epoch)
    while True:
        sampler = GlobalBatchSampler(len(train), per_device_batch_size, num_processes, process_index, seed,
                                     epoch=epoch, start=offset, accumulation=accumulation)
        # Its own generator: creating the iterator draws a worker seed, and from the global RNG that would shift
        # every later dropout mask of a resumed run (it creates the iterator at another step than the first run).
        generator = torch.Generator().manual_seed(seed * 1000003 + epoch)
        loader = torch.utils.data.DataLoader(train, batch_sampler=sampler, collate_fn=collate,
                                             num_workers=num_workers, generator=generator, pin_memory=pin_memory)
        yield from loader
        epoch, offset = epoch + 1, 0


def _streamed_micro_batches(train, collate, batch_size, num_processes, process_index, start_micro):
    """A stream sharded across processes (datasets' split_dataset_by_node), epoch after epoch."""
    from datasets.distributed import split_dataset_by_node

    epoch, skipped = 0, 0
    shard = split_dataset_by_node(train, process_index, num_processes)
    while True:
        shard.set_epoch(epoch)
        rows = iter(shard)
        while True:
            batch = list(itertools.islice(rows, batch_size))
            if len(batch) < batch_size:
                break
            if skipped < start_micro:
                skipped += 1
                continue
            yield collate(batch)
        epoch += 1
