"""Helpers that several model test files share: padded batches and static caches for tiny GLM models."""

import torch
from transformers.cache_utils import StaticCache


def left_padded_batch(vocab, lengths, pad=0):
    """Random ids [len(lengths), max(lengths)] left-padded with `pad`, and their attention mask."""
    total = max(lengths)
    ids = torch.full((len(lengths), total), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, total - length:] = torch.randint(3, vocab, (length,))
        mask[row, total - length:] = 1
    return ids, mask


def static_cache(model, batch, max_len):
    """A StaticCache of `max_len` positions for `model`."""
    # transformers 5.x: StaticCache(config, max_cache_len); 4.57 also wants the batch size up front (max_batch_size).
    try:
        return StaticCache(config=model.config, max_cache_len=max_len)
    except TypeError:
        return StaticCache(config=model.config, max_batch_size=batch, max_cache_len=max_len)
