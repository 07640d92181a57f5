"""Steps 2 and 3 of the data path: validation carved off, rows tokenized (once, through datasets.map), and
packed. Pretraining and SFT side by side:

- pretraining: texts cut into pieces (`text_pieces`), tokenized without special tokens, joined with eos and cut
  into `block_size` blocks (`pack_docs`); every token is a target;
- SFT: each conversation through `tokenizer.tokenize_conversation` (labels -100 outside assistant replies), cut
  at `block_size`; with `--packing` several conversations share a row (`pack_sft`).
"""

import itertools

from ..errors import InputError
from . import batches, sources


def carve_validation(raw, percentage: int, seed: int):
    """Split `validation_split_percentage` percent of train off as validation when the source has none."""
    import datasets

    if "validation" in raw:
        return raw
    if isinstance(raw, datasets.IterableDatasetDict):
        # A stream has no length: the first rows become validation, the rest train.
        n = max(1, percentage * 10)
        return datasets.IterableDatasetDict({"train": raw["train"].skip(n), "validation": raw["train"].take(n)})
    train = raw["train"]
    if len(train) < 2:
        raise InputError(f"the train split has {len(train)} row(s): too few to carve a validation split; "
                         "give --validation_file or more data")
    split = train.train_test_split(test_size=max(1, len(train) * percentage // 100), seed=seed, shuffle=True)
    return datasets.DatasetDict({"train": split["train"], "validation": split["test"]})



def tokenize_pretraining(raw, columns, tokenizer, text_column: str, block_size: int,
                         validation_split_percentage: int, seed: int, num_proc=None, streaming=False):
    """{"train", "validation"} blocks of `block_size` tokens. Documents are carved into validation before they are
    cut into pieces, so a document's pieces stay together."""
    proc = {} if streaming else {"num_proc": num_proc}
    raw = carve_validation(raw, validation_split_percentage, seed)
    pieces = raw.map(split_long_texts, fn_kwargs={"column": text_column}, batched=True, remove_columns=columns,
                     **proc)
    # encode_batch_ids: our tokenizer's offset-free batch path (same ids as __call__, ~1.4x faster). Control-token
    # strings in a corpus ("</s>" in web text) stay text: only packing adds eos.
    docs = pieces.map(lambda batch: {"input_ids": tokenizer.encode_batch_ids(
                          batch[text_column], add_special_tokens=False, split_special_tokens=True)},
                      batched=True, remove_columns=[text_column], **proc)
    return {name: pack_docs(docs[name], tokenizer.eos_token_id, block_size, num_proc, streaming) for name in docs}


def tokenize_conversations(raw, tokenizer, conversations_column: str, block_size: int,
                           validation_split_percentage: int, seed: int, num_proc=None, streaming=False, places=None):
    """{"train", "validation"} rows of one conversation each (input_ids, labels), at most `block_size` tokens, and
    a notice of the rows truncation cut short (None if none); `places` ({split: (rows, labels)}) names them."""
    import datasets

    tokenized, notices = {}, []
    for name in raw:
        tokenized[name], notice = tokenize_sft(raw[name], tokenizer, conversations_column, block_size, num_proc,
                                               streaming, (places or {}).get(name, (None, None))[1], name)
        notices += [notice] if notice else []
    kind = datasets.IterableDatasetDict if streaming else datasets.DatasetDict
    return carve_validation(kind(tokenized), validation_split_percentage, seed), "\n".join(notices) or None


def tokenize_sft(dataset, tokenizer, conversations_column: str, block_size: int, num_proc=None, streaming=False,
                 labels=None, split="train"):
    """input_ids and labels (-100 outside assistant replies) per conversation, truncated to block_size, and a
    notice of how many rows truncation cost target tokens (None if none). A row that would keep no target at all is
    refused, naming --block_size and the longest row (`labels[i]` names row i; a stream: at the row)."""

    def where(index):
        return labels[index] if labels else f"{split} split row {index}"

    def tokenize(row, index):
        try:
            messages = sources.conversation_of(row[conversations_column])
            encoded = tokenizer.tokenize_conversation(messages, tools=sources.row_tools(row))
        except (ValueError, KeyError, TypeError) as error:
            raise InputError(f"malformed conversation in {where(index)}: {error}") from None
        sources.check_conversation(messages, index)
        ids, targets = encoded["input_ids"], encoded["labels"]
        kept = sum(label != batches.IGNORE_INDEX for label in targets[:block_size])
        lost = sum(label != batches.IGNORE_INDEX for label in targets[block_size:])
        if streaming and lost and not kept:
            raise InputError(_no_target_left(where(index), len(ids), block_size))
        return {"input_ids": ids[:block_size], "labels": targets[:block_size], "length": len(ids), "lost": lost,
                "kept": kept}

    kwargs = {} if streaming else {"num_proc": num_proc, "desc": "tokenizing conversations"}
    tokenized = dataset.map(tokenize, with_indices=True, remove_columns=dataset.column_names, **kwargs)
    if streaming:
        return tokenized.remove_columns(["length", "lost", "kept"]), None
    lengths, lost, kept = tokenized["length"], tokenized["lost"], tokenized["kept"]
    longest = max(range(len(lengths)), key=lengths.__getitem__, default=None)
    empty = [i for i in range(len(lost)) if lost[i] and not kept[i]]
    if empty:
        raise InputError(f"{len(empty)} of {len(lost)} rows of the {split} split keep no target token within "
                         f"--block_size {block_size} (first: {where(empty[0])}, {lengths[empty[0]]} tokens); "
                         f"{_no_target_left(where(longest), lengths[longest], block_size, longest_row=True)}")
    cut = sum(1 for count in lost if count)
    notice = None
    if cut:
        notice = (f"note: truncation to --block_size {block_size} cut {cut} of {len(lost)} rows of the {split} split "
                  f"short, losing {sum(lost)} of {sum(lost) + sum(kept)} target tokens (longest row: "
                  f"{where(longest)}, {lengths[longest]} tokens)")
    return tokenized.remove_columns(["length", "lost", "kept"]), notice


def _no_target_left(place, length, block_size, longest_row=False):
    return (f"{'the longest row is ' if longest_row else ''}{place} with {length} tokens"
            f"{'' if longest_row else f', which keeps no target token within --block_size {block_size}'}: raise "
            f"--block_size (at most the model's seq_length) or shorten the conversations")


# Pretraining texts are tokenized in pieces of at most this many characters, so the memory of tokenizing (about 40
# bytes per character while tokenizers and Python hold the ids) is bounded by a batch of pieces, not by the longest
# line: one 50 MB line without newlines becomes 12,800 pieces of one document.
TEXT_PIECE_CHARS = 4096


def text_pieces(text: str, limit: int = TEXT_PIECE_CHARS):
    """`text` cut into pieces of at most `limit` characters: after the last newline in the window, else before the
    last space, else at the limit. Joined they give the text back."""
    start = 0
    while len(text) - start > limit:
        end = start + limit
        cut = text.rfind("\n", start, end) + 1
        if cut <= start:
            cut = text.rfind(" ", start + 1, end)
            if cut <= start:
                cut = end
        yield text[start:cut]
        start = cut
    yield text[start:]


def split_long_texts(batch, column: str):
    """A batched map: each text row becomes its pieces (text_pieces), `continues` True on all but a document's
    last piece, so packing puts no eos between the pieces of one document."""
    texts, continues = [], []
    for text in batch[column]:
        pieces = list(text_pieces(text))
        texts += pieces
        continues += [True] * (len(pieces) - 1) + [False]
    return {column: texts, "continues": continues}


def pack_docs(docs, eos_token_id: int, block_size: int, num_proc=None, streaming=False):
    """Tokenized pieces joined in order, eos after each document's last piece, cut into full blocks (the tail
    shorter than a block is dropped)."""

    def pack(batch):
        joined = list(itertools.chain.from_iterable(ids if more else ids + [eos_token_id]
                                                    for ids, more in zip(batch["input_ids"], batch["continues"])))
        total = len(joined) // block_size * block_size
        blocks = [joined[i:i + block_size] for i in range(0, total, block_size)]
        return {"input_ids": blocks, "labels": blocks}

    extra = {} if streaming else {"num_proc": num_proc, "desc": f"packing into blocks of {block_size}"}
    return docs.map(pack, batched=True, batch_size=1000, remove_columns=["input_ids", "continues"], **extra)


def pack_sft(dataset, block_size: int):
    """Concatenate tokenized conversations ({"input_ids", "labels"}) into rows of at most block_size tokens, in
    order (a conversation never straddles two rows), with "position_ids" restarting at 0 for each conversation. The
    model's mask keeps each conversation to itself (transformers' masking_utils detects restarting position_ids
    when no attention mask is given; flash attention derives cu_seqlens from them). A conversation's first label is
    set to -100, as no token of the row before it may learn to predict it: the same targets as the padded rows."""

    def pack(batch):
        rows, row = [], {"input_ids": [], "labels": [], "position_ids": []}
        for ids, labels in zip(batch["input_ids"], batch["labels"]):
            if row["input_ids"] and len(row["input_ids"]) + len(ids) > block_size:
                rows.append(row)
                row = {"input_ids": [], "labels": [], "position_ids": []}
            row["input_ids"] += list(ids)
            row["labels"] += [batches.IGNORE_INDEX] + list(labels[1:])
            row["position_ids"] += list(range(len(ids)))
        if row["input_ids"]:
            rows.append(row)
        return {key: [r[key] for r in rows] for key in ("input_ids", "labels", "position_ids")}

    return dataset.map(pack, batched=True, batch_size=1000, remove_columns=dataset.column_names,
                       desc=f"packing conversations into rows of {block_size}")
