"""What differs between the transformers versions the GLM model files support (4.57 and 5.x), in one place.

Each shim names the transformers version that needs it; when that version is no longer supported, its shim goes.
The tokenizer's own shims stay in tokenization_glm.py, which must load alone (a tokenizer-only folder holds only it).

Example:
    >>> from .compat_glm import CACHE_FIELD
    >>> model.generate(input_ids, **{CACHE_FIELD: DynamicCache()})
"""

import inspect

import torch
from transformers import masking_utils
from transformers.modeling_outputs import BaseModelOutputWithPast

# transformers 5.x renamed the cache argument and output field `past_key_values` to `cache`; 4.57 uses the old name.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"

# transformers 5.x: create_causal_mask(config, inputs_embeds, attention_mask, cache, position_ids) takes the query
# offset from the cache; 4.57: (config, input_embeds, attention_mask, cache_position, past_key_values, position_ids).
MASK_TAKES_CACHE = "cache" in inspect.signature(masking_utils.create_causal_mask).parameters


def cache_of(outputs):
    """The Cache held by a model output, whichever name this transformers version gives it."""
    return getattr(outputs, CACHE_FIELD)


def pop_cache_position(kwargs: dict):
    """The `cache_position` generate() passes on transformers 4.57 (static caches there need it: their length is a
    data-dependent count), removed from `kwargs`; None on 5.x, whose caches count themselves (static ones as a
    tensor)."""
    return kwargs.pop("cache_position", None)


def causal_mask(config, inputs_embeds, attention_mask, cache, cache_position, position_ids):
    """transformers' own mask for the configured attention (sdpa/eager/flex/flash, static caches, packed rows)."""
    if MASK_TAKES_CACHE:
        return masking_utils.create_causal_mask(config=config, inputs_embeds=inputs_embeds,
                                                attention_mask=attention_mask, cache=cache, position_ids=position_ids)
    if torch.jit.is_tracing() and _stock_vmap_mask(config):
        # 4.57 builds sdpa/eager masks with torch.vmap, which jit.trace cannot record (an opaque C++ error). A mask
        # function registered in their place (AttentionMaskInterface; optimum's ONNX exporter registers vmap-free
        # ones while it traces) is used as it is.
        raise RuntimeError("TorchScript tracing (torch.onnx.export(..., dynamo=False), optimum's exporter) needs "
                           "transformers >= 5.0 with this model: transformers 4.57 builds the attention mask with "
                           "torch.vmap, which torch.jit.trace cannot record. Use torch.onnx.export(..., dynamo=True) "
                           "or a newer transformers.")
    return masking_utils.create_causal_mask(config=config, input_embeds=inputs_embeds, attention_mask=attention_mask,
                                            cache_position=cache_position, past_key_values=cache,
                                            position_ids=position_ids)


def _stock_vmap_mask(config) -> bool:
    """Whether 4.57's own vmap-built sdpa or eager mask function is the one registered for this attention."""
    registered = masking_utils.ALL_MASK_ATTENTION_FUNCTIONS.get(config._attn_implementation or "sdpa")
    return registered in (masking_utils.sdpa_mask, masking_utils.eager_mask)
