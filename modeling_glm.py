"""The GLM architecture (ChatGLM2/3-6B, GLM-4-9B) for transformers, loadable with `trust_remote_code=True`.

Module and parameter names are the checkpoint keys THUDM published (GLM_SPEC.md section 2); everything else follows
transformers' own decoder models: attention dispatched through `ALL_ATTENTION_FUNCTIONS`, the KV cache as a `Cache`
object, generation from `GenerationMixin`, untouched.

Example:
    >>> from transformers import AutoModelForCausalLM
    >>> model = AutoModelForCausalLM.from_pretrained("THUDM/chatglm3-6b", trust_remote_code=True)
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .chat_glm import ChatMixin
from .configuration_glm import ChatGLMConfig

# transformers 5.x renamed the cache argument and output field `past_key_values` to `cache`; 4.57 uses the old name.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def _cache_of(outputs):
    """The Cache held by a model output, whichever name this transformers version gives it."""
    return getattr(outputs, CACHE_FIELD)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) computed in fp32, times the weight, in the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.eps)
        return self.weight * hidden_states.to(input_dtype)


def _norm(config: ChatGLMConfig, hidden_size: int) -> nn.Module:
    if config.rmsnorm:
        return RMSNorm(hidden_size, eps=config.layernorm_epsilon)
    return nn.LayerNorm(hidden_size, eps=config.layernorm_epsilon)


class RotaryEmbedding(nn.Module):
    """GLM's RoPE tables: the first half of each head rotates, base 10000 * rope_ratio, computed in fp32.

    Holds no buffers: the original saved an `inv_freq` that nobody reads, and a table computed per forward from the
    config is correct on every device and under meta-device initialisation.
    """

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.rotary_dim = config.kv_channels // 2
        self.base = 10000.0 * config.rope_ratio

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        exponent = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32, device=position_ids.device)
        inv_freq = 1.0 / (self.base ** (exponent / self.rotary_dim))
        freqs = position_ids[..., None].to(torch.float32) * inv_freq  # [batch, seq, rotary_dim / 2]
        # One head axis to broadcast over: [batch, 1, seq, rotary_dim / 2].
        return freqs.cos().to(dtype)[:, None], freqs.sin().to(dtype)[:, None]


def apply_rotary_pos_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (2i, 2i+1) of the first 2 * cos.shape[-1] dims of x [batch, heads, seq, head_dim]."""
    rotary_dim = cos.shape[-1] * 2
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    x_rot = x_rot.unflatten(-1, (-1, 2))
    x0, x1 = x_rot[..., 0], x_rot[..., 1]
    rotated = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
    return torch.cat((rotated, x_pass), dim=-1)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Reference attention: grouped K/V expanded, scores and softmax in fp32 (GLM_SPEC section 3)."""
    groups = module.num_key_value_groups
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query.float(), key.float().transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[..., : key.shape[-2]].float()
    weights = torch.softmax(scores, dim=-1).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


class SelfAttention(nn.Module):
    """Fused QKV projection (rows Q, then K, then V), RoPE, grouped K/V, then `dense`."""

    is_causal = True

    def __init__(self, config: ChatGLMConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_kv_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.head_dim = config.kv_channels
        self.scaling = 1.0 / math.sqrt(self.head_dim)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.query_key_value = nn.Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.add_bias_linear or config.add_qkv_bias
        )
        self.dense = nn.Linear(self.q_size, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, hidden_states, attention_mask, position_embeddings, cache=None, cache_position=None, **kwargs):
        batch, seq_len, _ = hidden_states.shape
        qkv = self.query_key_value(hidden_states)
        query, key, value = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        query = query.view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        key = key.view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        value = value.view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        query = apply_rotary_pos_emb(query, cos, sin)
        key = apply_rotary_pos_emb(key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, {"cache_position": cache_position})

        implementation = self.config._attn_implementation or "sdpa"
        attention = eager_attention_forward if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]
        output, weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            scaling=self.scaling,
            dropout=self.config.attention_dropout if self.training else 0.0,
            **kwargs,
        )
        output = output.reshape(batch, seq_len, self.q_size)
        return self.dense(output), weights


class MLP(nn.Module):
    """SwiGLU: dense_h_to_4h writes gate then up; silu(gate) * up; dense_4h_to_h."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.ffn_hidden_size * 2, bias=config.add_bias_linear)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, hidden_states):
        gate, up = self.dense_h_to_4h(hidden_states).chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(gate) * up)


class GLMBlock(GradientCheckpointingLayer):
    """One transformer block: x + Attention(Norm(x)), then h + MLP(Norm(h)) (pre-norm residuals)."""

    def __init__(self, config: ChatGLMConfig, layer_idx: int):
        super().__init__()
        self.post_norm_residual = config.apply_residual_connection_post_layernorm
        self.input_layernorm = _norm(config, config.hidden_size)
        self.self_attention = SelfAttention(config, layer_idx)
        self.post_attention_layernorm = _norm(config, config.hidden_size)
        self.mlp = MLP(config)
        self.hidden_dropout = config.hidden_dropout

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, **kwargs):
        normed = self.input_layernorm(hidden_states)
        attention_output, weights = self.self_attention(normed, attention_mask, position_embeddings, cache, **kwargs)
        residual = normed if self.post_norm_residual else hidden_states
        hidden_states = residual + F.dropout(attention_output, p=self.hidden_dropout, training=self.training)
        normed = self.post_attention_layernorm(hidden_states)
        residual = normed if self.post_norm_residual else hidden_states
        hidden_states = residual + F.dropout(self.mlp(normed), p=self.hidden_dropout, training=self.training)
        return hidden_states, weights


class GLMTransformer(nn.Module):
    """The stack of GLMBlocks (`encoder` in the checkpoint) and the final norm."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.layers = nn.ModuleList([GLMBlock(config, i) for i in range(config.num_layers)])
        self.final_layernorm = _norm(config, config.hidden_size) if config.post_layer_norm else None


class Embedding(nn.Module):
    """Token embeddings only: GLM has no absolute positions and no embedding scaling."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)

    def forward(self, input_ids):
        return self.word_embeddings(input_ids)


class PrefixEncoder(nn.Module):
    """P-tuning v2: pre_seq_len learned K/V entries for every layer, optionally through a two-layer MLP."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.prefix_projection = config.prefix_projection
        kv_size = config.num_layers * 2 * config.num_kv_heads * config.kv_channels
        self.embedding = nn.Embedding(config.pre_seq_len, kv_size)
        if self.prefix_projection:
            self.trans = nn.Sequential(
                nn.Linear(kv_size, config.hidden_size), nn.Tanh(), nn.Linear(config.hidden_size, kv_size)
            )

    def forward(self, prefix_tokens):
        prefix = self.embedding(prefix_tokens)
        return self.trans(prefix) if self.prefix_projection else prefix


class ChatGLMPreTrainedModel(PreTrainedModel):
    """Shared loading and initialisation settings of the GLM models."""

    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    # The original code saved its RoPE table; it is recomputed from the config.
    _keys_to_ignore_on_load_unexpected = [r"rotary_pos_emb\.inv_freq"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True


def _prefix_length(config: ChatGLMConfig) -> int:
    return config.pre_seq_len or 0


class ChatGLMModel(ChatGLMPreTrainedModel):
    """The GLM base model; returns `last_hidden_state` after the final norm.

    It also owns `output_layer`, because the published checkpoints keep the LM head under `transformer.`.
    """

    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.embedding = Embedding(config)
        self.rotary_pos_emb = RotaryEmbedding(config)
        self.encoder = GLMTransformer(config)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        if config.pre_seq_len is not None:
            self.prefix_encoder = PrefixEncoder(config)
            self.prefix_dropout = nn.Dropout(0.1)
        self.gradient_checkpointing = False
        self.post_init()
        if config.pre_seq_len is not None:
            self.freeze_base_model()

    def freeze_base_model(self):
        """P-tuning v2 trains only the prefix encoder: every other parameter stops requiring gradients."""
        for name, param in self.named_parameters():
            param.requires_grad = name.startswith("prefix_encoder.")

    def get_input_embeddings(self):
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.embedding.word_embeddings = value

    def get_prompt(self, batch_size: int, device, dtype):
        """The P-tuning v2 prefix as per-layer (key, value) pairs [batch, kv_heads, pre_seq_len, kv_channels]."""
        config = self.config
        tokens = torch.arange(config.pre_seq_len, device=device).unsqueeze(0).expand(batch_size, -1)
        prefix = self.prefix_dropout(self.prefix_encoder(tokens).to(dtype))
        prefix = prefix.view(batch_size, config.pre_seq_len, config.num_layers * 2, config.num_kv_heads,
                             config.kv_channels)
        prefix = prefix.permute(2, 0, 3, 1, 4)  # [layers * 2, batch, kv_heads, pre_seq_len, kv_channels]
        return [(prefix[2 * i], prefix[2 * i + 1]) for i in range(config.num_layers)]

    def _attention_mask(self, attention_mask, batch, q_len, kv_len, past_len, device, dtype):
        """The mask in the form the configured attention implementation takes (None when plain causal will do)."""
        implementation = self.config._attn_implementation or "sdpa"
        if attention_mask is not None and attention_mask.dim() == 4:
            return attention_mask  # already built by the caller (e.g. generate() with a static cache)
        prefix_len = _prefix_length(self.config)
        if attention_mask is not None:
            attention_mask = attention_mask.to(device=device, dtype=torch.bool)
            if prefix_len:
                attention_mask = F.pad(attention_mask, (prefix_len, 0), value=True)
            if bool(attention_mask.all()):
                attention_mask = None
        if implementation.startswith("flash_attention"):
            # Flash kernels take the 2D padding mask; causality is aligned bottom-right inside the kernel.
            return attention_mask
        if implementation == "flex_attention":
            return _flex_block_mask(attention_mask, batch, q_len, kv_len, past_len, device)
        if attention_mask is None and kv_len == past_len + q_len:
            if q_len == 1 or (q_len == kv_len and implementation == "sdpa"):
                return None  # sdpa's is_causal (or a single query seeing everything) is the whole mask
        key_index = torch.arange(kv_len, device=device)
        query_index = torch.arange(past_len, past_len + q_len, device=device)
        allowed = key_index[None, :] <= query_index[:, None]  # [q, kv]
        allowed = allowed[None, None].expand(batch, 1, q_len, kv_len)
        if attention_mask is not None:
            padding = attention_mask[:, :kv_len]
            if padding.shape[-1] < kv_len:  # a static cache is longer than the tokens seen so far
                padding = F.pad(padding, (0, kv_len - padding.shape[-1]), value=False)
            # A query always sees itself, so left-pad rows never softmax over nothing (NaN).
            allowed = (allowed & padding[:, None, None, :]) | (key_index[None, :] == query_index[:, None])
        if implementation == "sdpa" or implementation.endswith("sdpa"):
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[Cache] = None,
        past_key_values: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ):
        config = self.config
        cache = cache if cache is not None else past_key_values
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else config.return_dict
        use_cache = use_cache if use_cache is not None else config.use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("ChatGLMModel.forward needs exactly one of input_ids or inputs_embeds")
        if cache is not None and not isinstance(cache, Cache):
            raise TypeError(
                f"past_key_values must be a transformers Cache (e.g. DynamicCache), got {type(cache).__name__}; "
                "legacy tuples of tensors are not supported"
            )
        if inputs_embeds is None:
            inputs_embeds = self.embedding(input_ids)
        batch, q_len = inputs_embeds.shape[:2]
        device = inputs_embeds.device

        prefix_len = _prefix_length(config)
        if use_cache and cache is None:
            cache = DynamicCache()
        past_len = cache.get_seq_length() if cache is not None else 0
        prefix = None
        if prefix_len and past_len == 0:
            prefix = self.get_prompt(batch, device, inputs_embeds.dtype)
            if cache is not None:
                for layer_idx, (key, value) in enumerate(prefix):
                    cache.update(key, value, layer_idx, {"cache_position": torch.arange(prefix_len, device=device)})
                prefix = None
            past_len = prefix_len
        # Positions count real tokens only: a P-tuning prefix sits before position 0.
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 2:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]
            else:
                position_ids = torch.arange(past_len - prefix_len, past_len - prefix_len + q_len, device=device)
                position_ids = position_ids.unsqueeze(0).expand(batch, -1)
        position_embeddings = self.rotary_pos_emb(position_ids.to(device), inputs_embeds.dtype)

        # Our own count, not generate()'s (which ignores a P-tuning prefix); static caches in 4.57 need it.
        cache_position = torch.arange(past_len, past_len + q_len, device=device)
        kv_len = past_len + q_len
        if cache is not None and hasattr(cache, "get_max_cache_shape"):
            max_shape = cache.get_max_cache_shape()
            if isinstance(max_shape, int) and max_shape > 0:
                kv_len = max_shape  # static caches hand back their whole length
        mask = self._attention_mask(attention_mask, batch, q_len, kv_len, past_len, device, inputs_embeds.dtype)

        hidden_states = inputs_embeds
        all_hidden_states = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer_idx, layer in enumerate(self.encoder.layers):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            layer_cache = cache
            if prefix is not None:
                # No cache to hold the prefix (use_cache=False): give this layer a one-layer cache holding it.
                layer_cache = _PrefixOnlyCache(layer_idx, *prefix[layer_idx])
            hidden_states, weights = layer(
                hidden_states,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                cache=layer_cache,
                cache_position=cache_position,
                output_attentions=output_attentions,
            )
            if output_attentions:
                all_attentions += (weights,)
        if self.encoder.final_layernorm is not None:
            hidden_states = self.encoder.final_layernorm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        outputs = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
            **{CACHE_FIELD: cache if use_cache else None},
        )
        return outputs if return_dict else outputs.to_tuple()


def _flex_block_mask(padding, batch, q_len, kv_len, past_len, device):
    """The same causal + padding rule as a flex-attention BlockMask (a dense float mask crashes flex on CPU)."""
    from torch.nn.attention.flex_attention import create_block_mask

    if padding is not None and padding.shape[-1] < kv_len:
        padding = F.pad(padding, (0, kv_len - padding.shape[-1]), value=False)

    def mask_mod(b, h, q_idx, kv_idx):
        query = q_idx + past_len
        allowed = kv_idx <= query
        if padding is None:
            return allowed
        return (allowed & padding[b, kv_idx]) | (kv_idx == query)

    return create_block_mask(mask_mod, batch, None, q_len, kv_len, device=device)


class _PrefixOnlyCache:
    """Stands in for a Cache when use_cache=False but a P-tuning prefix must still be attended."""

    def __init__(self, layer_idx, key, value):
        self.layer_idx, self.key, self.value = layer_idx, key, value

    def update(self, key, value, layer_idx, cache_kwargs=None):
        return torch.cat((self.key, key), dim=2), torch.cat((self.value, value), dim=2)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy in fp32: logits at t predict labels at t + 1; -100 is ignored."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:].to(logits.device)
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=-100)


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel, GenerationMixin, ChatMixin):
    """GLM causal language model (what AutoModel and AutoModelForCausalLM load).

    Example:
        >>> out = model(input_ids, labels=input_ids)
        >>> out.loss.backward()
        >>> model.generate(input_ids, max_new_tokens=20)
    """

    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.transformer = ChatGLMModel(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.transformer.embedding.word_embeddings = value

    def get_output_embeddings(self):
        return self.transformer.output_layer

    def set_output_embeddings(self, new_embeddings):
        self.transformer.output_layer = new_embeddings

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[Cache] = None,
        past_key_values: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        logits_to_keep=0,
        **kwargs,
    ):
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        # Only the last positions' logits are needed while generating.
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.transformer.output_layer(hidden_states[:, keep])
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        result = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_FIELD: _cache_of(outputs)},
        )
        return result if return_dict else result.to_tuple()


class ChatGLMForSequenceClassification(ChatGLMPreTrainedModel):
    """GLM with a classification head on the hidden state of the last real (non-padding) token."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = ChatGLMModel(config)
        self.classifier_head = nn.Linear(config.hidden_size, config.num_labels, bias=True)
        self.dropout = nn.Dropout(config.classifier_dropout) if config.classifier_dropout else None
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.transformer.embedding.word_embeddings = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ):
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        batch, seq_len = hidden_states.shape[:2]
        positions = torch.arange(seq_len, device=hidden_states.device)
        if attention_mask is not None:
            real = attention_mask.to(hidden_states.device).bool()
        elif input_ids is not None and self.config.pad_token_id is not None:
            real = input_ids.to(hidden_states.device) != self.config.pad_token_id
        else:
            real = torch.ones(batch, seq_len, dtype=torch.bool, device=hidden_states.device)
        # The last real token, whichever side the padding is on.
        last = torch.where(real, positions, -1).max(-1).values.clamp(min=0)
        pooled = hidden_states[torch.arange(batch, device=hidden_states.device), last]
        if self.dropout is not None:
            pooled = self.dropout(pooled)
        logits = self.classifier_head(pooled.to(self.classifier_head.weight.dtype)).float()

        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            problem = self.config.problem_type
            if problem is None:
                if self.num_labels == 1:
                    problem = "regression"
                elif labels.dtype in (torch.long, torch.int):
                    problem = "single_label_classification"
                else:
                    problem = "multi_label_classification"
                self.config.problem_type = problem
            if problem == "regression":
                loss = F.mse_loss(logits.squeeze(-1), labels.float().view(-1)) if self.num_labels == 1 else \
                    F.mse_loss(logits, labels.float())
            elif problem == "single_label_classification":
                loss = F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
            else:
                loss = F.binary_cross_entropy_with_logits(logits, labels.float())
        result = SequenceClassifierOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return result if return_dict else result.to_tuple()


__all__ = [
    "ChatGLMPreTrainedModel",
    "ChatGLMModel",
    "ChatGLMForConditionalGeneration",
    "ChatGLMForSequenceClassification",
    "GLMBlock",
]
