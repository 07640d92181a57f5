"""The data path, from a file on disk to the micro-batches of an optimizer step:

1. `load_rows` reads the source (`sources.load_source`: built-in generated chats, local files, or any `datasets`
   source) with strings kept as strings, finds the mode (pretraining text or SFT conversations) and checks every row
   (`sources.check_rows`), naming file and line, before a tokenizer is trained or anything is written.
2. A tokenizer is trained on `tokenizer_corpus(rows)` (from scratch) or loaded (train.py decides).
3. `tokenize` carves off validation and tokenizes once through `datasets.map` (`preprocess`): pretraining text is
   packed into `block_size` blocks, SFT conversations become rows with labels on assistant replies only (several
   per row with `--packing`).
4. Collators pad rows into tensors (`batches.Collator`, `batches.PackedCollator`).
5. `batches.micro_batches` deals the same global batches to any number of processes (`GlobalBatchSampler`), from any
   micro-batch on, so a resumed run sees exactly the rows the uninterrupted one would.
"""

from dataclasses import dataclass

from ..errors import InputError
from . import builtin, preprocess, sources
from .batches import Collator, PackedCollator, micro_batches  # noqa: F401  the doors of step 4 and 5


@dataclass
class Rows:
    """Checked rows: the splits, their mode ("pretrain" or "sft"), the column that holds the data, and the built-in
    run's held-out conversations (None for any other source)."""

    source: sources.Source
    mode: str
    column: str
    heldout: list = None

    @property
    def train(self):
        return self.source.splits["train"]


def load_rows(*, dataset_name=None, dataset_config_name=None, train_file=None, validation_file=None,
              builtin_examples=20000, builtin_heldout=150, text_column="text", conversations_column=None,
              mode="auto", max_train_samples=None, streaming=False, seed=42) -> Rows:
    """Step 1: the rows of the given source (no source: the built-in data), checked."""
    import datasets

    heldout = None
    if dataset_name is None and train_file is None:
        train_rows, heldout = builtin.skill_splits(builtin_examples, builtin_heldout, seed=seed)
        source = sources.Source(datasets.DatasetDict({"train": datasets.Dataset.from_list(train_rows)}))
    else:
        source = sources.load_source(dataset_name, dataset_config_name, train_file, validation_file, streaming)
    raw = source.splits
    columns = _train_columns(raw["train"], streaming)
    conversations_column = sources.find_conversations_column(columns, conversations_column)
    mode = sources.detect_mode(columns, text_column, conversations_column, mode)
    # Every row, with its file and line, before a tokenizer is trained on them or anything is written.
    sources.check_rows(source, mode, text_column, conversations_column, max_train_samples)
    if "validation" in raw and not streaming and len(raw["validation"]) == 0:
        raise InputError("empty dataset: the validation split has 0 rows")
    if max_train_samples is not None and not streaming:
        raw["train"] = raw["train"].select(range(min(max_train_samples, len(raw["train"]))))
    return Rows(source, mode, text_column if mode == "pretrain" else conversations_column, heldout)


def _train_columns(train, streaming):
    if streaming:
        first = next(iter(train), None)
        if first is None:
            raise InputError("empty dataset: the train split has no rows")
        return train.column_names or list(first)
    if len(train) == 0:
        raise InputError("empty dataset: the train split has 0 rows")
    return train.column_names


def tokenizer_corpus(rows: Rows, max_train_samples=None, streaming=False):
    """Step 2's input: every string the training tokens come from, for a tokenizer trained from scratch (a stream:
    its first --max_train_samples rows; map-style rows were cut by load_rows)."""
    train = rows.train.take(max_train_samples) if streaming and max_train_samples is not None else rows.train
    if rows.mode == "pretrain":
        return (row[rows.column] for row in train)
    return sources.conversation_texts(train, rows.column)


@dataclass
class Splits:
    """Step 3's result: tokenized training and validation rows and the collators that batch them."""

    train: object
    validation: object
    train_collate: Collator
    eval_collate: Collator
    truncation: str = None  # how many rows truncation to block_size cut short, for the run's log


def tokenize(rows: Rows, tokenizer, *, block_size: int, validation_split_percentage=5, seed=42, num_proc=None,
             max_eval_samples=None, packing=False, streaming=False, main_process_first=None) -> Splits:
    """Step 3: tokenized (once, cached by datasets; the main process first where several run) and split."""
    import contextlib

    if packing and rows.mode != "sft":
        raise InputError(f"--packing packs SFT conversations; this run is in {rows.mode} mode (pretraining text is "
                         "already packed into blocks)")
    common = dict(block_size=block_size, validation_split_percentage=validation_split_percentage, seed=seed,
                  num_proc=num_proc, streaming=streaming)
    truncation = None
    with (main_process_first or contextlib.nullcontext)():
        if rows.mode == "pretrain":
            columns = _train_columns(rows.train, streaming)
            splits = preprocess.tokenize_pretraining(rows.source.splits, columns, tokenizer, rows.column, **common)
        else:
            splits, truncation = preprocess.tokenize_conversations(rows.source.splits, tokenizer, rows.column,
                                                                   places=rows.source.places, **common)
    train, validation = splits["train"], splits["validation"]
    if not streaming:
        _check_trainable(train, rows.mode, block_size)
    if max_eval_samples is not None:
        validation = validation.take(max_eval_samples) if streaming else \
            validation.select(range(min(max_eval_samples, len(validation))))
    if streaming:
        validation = list(validation)  # a stream's first rows, read once: every evaluation uses the same
    collate = Collator(tokenizer.pad_token_id)
    if packing:
        return Splits(preprocess.pack_sft(train, block_size), validation, PackedCollator(tokenizer.pad_token_id),
                      collate, truncation)
    return Splits(train, validation, collate, collate, truncation)


def _check_trainable(train, mode, block_size):
    if len(train) == 0:
        raise InputError(f"empty dataset: the training data yields no example of --block_size {block_size}"
                         " tokens (too little text, or block size too large)")
    if mode == "sft" and not any(any(x != -100 for x in labels) for labels in train["labels"][:1000]):
        raise InputError(f"SFT data has no assistant tokens within --block_size {block_size}")
