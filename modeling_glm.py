"""The GLM architecture (ChatGLM2/3-6B, GLM-4-9B) for transformers, loadable with `trust_remote_code=True`.

Module and parameter names are the checkpoint keys THUDM published (docs/architecture.md section 2); everything
else follows transformers' own decoder models: attention dispatched through `ALL_ATTENTION_FUNCTIONS`, the KV cache as
a `Cache` object, generation from `GenerationMixin`, untouched. What differs between transformers versions is in
compat_glm.py.

Example:
    >>> from transformers import AutoModelForCausalLM
    >>> model = AutoModelForCausalLM.from_pretrained("THUDM/chatglm3-6b", trust_remote_code=True)
"""

import json
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel, masking_utils
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import logging

from .chat_glm import ChatMixin
from .compat_glm import CACHE_FIELD, cache_of, causal_mask, pop_cache_position
from .configuration_glm import ChatGLMConfig
from .quantization_glm import quantize

# transformers 4.57 copies into its module cache only the direct relative imports of a local folder's model file
# (5.x follows them all; docs/architecture.md section 4): chat_glm.py's module is named here too, so 4.57 loads it.
from .tool_parser_glm import process_response  # noqa: F401

logger = logging.get_logger(__name__)
# Said once per model when it runs in fp16/bf16 on a CPU: what docs/performance.md measured at chatglm3-6b's width
# (28 layers extrapolated from 2 and 4) on a 2-core AVX2 CPU.
HALF_ON_CPU = (
    "GLM runs in {dtype} on the CPU. Without {dtype} matrix units (AVX2 and most AVX-512 CPUs) a prompt is processed "
    "2.6-3.5x slower than in float32, though each new token decodes 1.3-1.4x faster (half the bytes to read). "
    "dtype=torch.float32 is the faster dtype for prompts if memory allows (2x the fp16 checkpoint, 25 GB for "
    "chatglm3-6b); on a 16 GB machine the fastest measured route is llama.cpp with a q4_0 GGUF: 4x faster decoding "
    "and 6x faster prompts than float16 in 3.6 GiB (README, 'On a CPU'; docs/performance.md)."
)


def _tracing() -> bool:
    """True under torch.compile, torch.export (and so the dynamo ONNX exporter) and TorchScript tracing (the ONNX
    exporter optimum uses). There the plain-op versions run: jit.trace loses `out=` writes into views, and export and
    compile need ops they can functionalise; eager training keeps the memory-saving autograd Functions."""
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)
    return torch.compiler.is_compiling() or exporting() or torch.jit.is_tracing() or torch.jit.is_scripting()


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm whose backward keeps only the input and 1/rms: autograd's version also keeps the normalised copy."""

    @staticmethod
    def forward(ctx, hidden_states, weight, eps):
        input_dtype = hidden_states.dtype
        hidden = hidden_states.float()
        rstd = torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(hidden_states, weight, rstd)
        return weight * (hidden * rstd).to(input_dtype)

    @staticmethod
    def backward(ctx, grad_output):
        hidden_states, weight, rstd = ctx.saved_tensors
        hidden = hidden_states.float()
        normed = hidden * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_output * normed.to(hidden_states.dtype)).flatten(0, -2).sum(0).to(weight.dtype)
        grad_normed = (grad_output * weight).float()
        # d/dx of x * rstd: rstd * (g - x * rstd^2 * mean(g * x))
        grad_input = (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True)) * rstd
        return grad_input.to(hidden_states.dtype), grad_weight, None


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) computed in fp32, times the weight, in the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (hidden_states.requires_grad or self.weight.requires_grad) and not _tracing():
            return _RMSNormFunction.apply(hidden_states, self.weight, self.eps)
        input_dtype = hidden_states.dtype
        hidden = hidden_states.float()
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * hidden.to(input_dtype)


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
        # One head axis to broadcast over, in the [batch, seq, heads, head_dim] layout of the projections.
        return freqs.cos().to(dtype)[:, :, None], freqs.sin().to(dtype)[:, :, None]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., head_dim] with pairs (2i, 2i+1) of the first 2 * cos.shape[-1] dims rotated, into a new contiguous
    tensor: five elementwise kernels, no temporaries (an autograd-traced version takes ~20 and keeps slices)."""
    rotary_dim = cos.shape[-1] * 2
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    pairs = x[..., :rotary_dim].unflatten(-1, (-1, 2))
    out_pairs = out[..., :rotary_dim].unflatten(-1, (-1, 2))
    x0, x1, out0, out1 = pairs[..., 0], pairs[..., 1], out_pairs[..., 0], out_pairs[..., 1]
    torch.mul(x0, cos, out=out0)
    out0.addcmul_(x1, sin, value=-1)
    torch.mul(x1, cos, out=out1)
    out1.addcmul_(x0, sin)
    out[..., rotary_dim:] = x[..., rotary_dim:]
    return out


def _rotate_pure(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The same rotation as `_rotate` from plain out-of-place ops: what tracers, export and compile record."""
    rotary_dim = cos.shape[-1] * 2
    x0, x1 = x[..., :rotary_dim].unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
    return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)


class _RotaryFunction(torch.autograd.Function):
    """RoPE as one autograd node: the backward is the inverse rotation, so no activation is kept."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad_output):
        cos, sin = ctx.saved_tensors
        return _rotate(grad_output, cos, -sin), None, None


def apply_rotary_pos_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (2i, 2i+1) of the first 2 * cos.shape[-1] dims of x [batch, seq, heads, head_dim];
    cos and sin are [batch, seq, 1, rotary_dim / 2]. Returns a new contiguous tensor."""
    if _tracing():
        return _rotate_pure(x, cos, sin)
    if torch.is_grad_enabled() and x.requires_grad:
        return _RotaryFunction.apply(x, cos, sin)
    return _rotate(x, cos, sin)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Reference attention: grouped K/V expanded, scores and softmax in fp32 (docs/architecture.md section 3)."""
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


def _grouped_single_query(module, implementation, attention_mask, kwargs):
    """Whether a one-token attention step can run on the K/V groups as they are cached (see below): transformers'
    own sdpa function is the one registered, K/V heads are shared, the mask (if any) is the same for all heads, and
    nothing needs the attention weights or dropout. Not under TorchScript tracing (optimum's ONNX exporter), which
    would record the one-token test as a constant: one graph serves prompts and decoding steps there."""
    return (
        implementation == "sdpa"
        and not torch.jit.is_tracing()
        and module.num_key_value_groups > 1
        and ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward
        and (attention_mask is None or (attention_mask.dim() == 4 and attention_mask.shape[1] == 1))
        and not kwargs.get("output_attentions")
        and not (module.training and module.config.attention_dropout > 0)
    )


def _grouped_single_query_sdpa(query, key, value, attention_mask, scaling):
    """Decoding attention without repeating K/V: the n_rep query heads that share a K/V group become n_rep query
    rows of that group (query [batch, heads, 1, dim] -> [batch, kv_heads, n_rep, dim]), so sdpa reads each cached
    K/V head once. The same rewrite transformers' sdpa_attention_forward makes for one query token outside
    torch.compile (`pack_gqa`, 5.x); under compile, and on 4.57, it repeats K/V into a copy of the whole cache per
    layer and step instead, which costs a decoding step more the longer the context (docs/performance.md).
    Head h uses K/V group h // n_rep, as repeat_kv and the expansion of docs/architecture.md section 3 do.
    Returns [batch, heads, dim]."""
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    query = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    if attention_mask is not None:  # [batch, 1, 1, kv] (static caches: longer): broadcast over the query rows
        attention_mask = attention_mask[..., : key.shape[-2]]
    output = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling)
    return output.reshape(batch, heads, dim)


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
        # Q and K are adjacent in the fused projection: one RoPE pass over both, on the [batch, seq, heads, dim] view.
        query_key = qkv[..., : self.q_size + self.kv_size].view(batch, seq_len, -1, self.head_dim)
        cos, sin = position_embeddings
        query_key = apply_rotary_pos_emb(query_key, cos, sin).transpose(1, 2)
        query, key = query_key.split((self.num_heads, self.num_kv_heads), dim=1)
        # A copy of V lets the fused QKV output be freed instead of being kept alive by a view.
        value = qkv[..., self.q_size + self.kv_size:].view(batch, seq_len, -1, self.head_dim).transpose(1, 2)
        value = value.contiguous() if torch.is_grad_enabled() else value
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, {"cache_position": cache_position})

        implementation = self.config._attn_implementation or "sdpa"
        if seq_len == 1 and _grouped_single_query(self, implementation, attention_mask, kwargs):
            output = _grouped_single_query_sdpa(query, key, value, attention_mask, self.scaling)
            return self.dense(output.reshape(batch, seq_len, self.q_size)), None
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
        gate_up = self.dense_h_to_4h(hidden_states)
        if torch.is_grad_enabled() and gate_up.requires_grad and not _tracing():
            return self.dense_4h_to_h(_SwiGLUFunction.apply(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(gate).mul_(up))


class _SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up keeping only the projection's output for backward (autograd also keeps silu(gate))."""

    @staticmethod
    def forward(ctx, gate_up):
        ctx.save_for_backward(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad_output):
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        sigmoid = torch.sigmoid(gate)
        grad = torch.empty_like(gate_up)
        grad_gate, grad_up = grad.chunk(2, dim=-1)
        torch.mul(gate * sigmoid, grad_output, out=grad_up)
        # silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
        derivative = (1 - sigmoid).mul_(gate).add_(1).mul_(sigmoid).mul_(up)
        torch.mul(derivative, grad_output, out=grad_gate)
        return grad


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

    def forward(self, hidden_states, attention_mask, position_embeddings, cache=None, prefix=None,
                output_attentions=False, output_hidden_states=False, **kwargs) -> BaseModelOutput:
        """Every block, then the final norm. `prefix`: a P-tuning prefix's per-layer (key, value) when no cache
        holds it (use_cache=False); `kwargs` go to every block (cache_position, attention kwargs)."""
        all_hidden_states = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer_idx, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            # No cache to hold the prefix: give this layer a one-layer cache holding it.
            layer_cache = cache if prefix is None else _PrefixOnlyCache(layer_idx, *prefix[layer_idx])
            hidden_states, weights = layer(
                hidden_states,
                attention_mask=attention_mask,
                position_embeddings=position_embeddings,
                cache=layer_cache,
                output_attentions=output_attentions,
                **kwargs,  # e.g. flash attention's cu_seq_lens_q/k, max_length_q/k for packed rows
            )
            if output_attentions:
                all_attentions += (weights,)
        if self.final_layernorm is not None:
            hidden_states = self.final_layernorm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=all_hidden_states,
                               attentions=all_attentions)


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
    _can_compile_fullgraph = True  # without a P-tuning prefix

    # Weights a checkpoint may lack: heads that are new by design (a P-tuning v2 prefix added to a base model, a
    # sequence classifier on a causal-LM checkpoint). Any other missing weight would stay random.
    _new_heads = ("prefix_encoder.", "classifier_head.")

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As PreTrainedModel.from_pretrained, but a checkpoint missing any block, embedding, final-norm or
        output-layer weight is refused (ValueError naming the keys) instead of loading with random weights there;
        a P-tuning v2 model comes back with only its prefix trainable (transformers 5.x hands back loaded
        parameters that all require grad, undoing the freeze of __init__)."""
        want_info = kwargs.pop("output_loading_info", False)
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        try:
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        except Exception as error:  # a truncated download or copy: name the file, which the libraries do not
            damaged = damaged_file(source)
            if damaged:
                raise OSError(f"{damaged}; copy or download it again") from error
            raise
        missing = sorted(k for k in info.get("missing_keys", ()) if not any(h in k for h in cls._new_heads))
        if missing:
            raise ValueError(f"{source}: the checkpoint lacks {len(missing)} weight(s) the config needs: "
                             f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}; check num_layers in "
                             "config.json against the weight files")
        if model.config.pre_seq_len is not None:
            getattr(model, "transformer", model).freeze_base_model()
        return (model, info) if want_info else model


def damaged_file(folder):
    """The first file of a local model folder that cannot be what its name says, with why: a .json file that does
    not parse, or a .safetensors file shorter than its header declares (a truncated copy); None if all are whole."""
    if not (isinstance(folder, (str, os.PathLike)) and os.path.isdir(folder)):
        return None
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        try:
            if name.endswith(".json"):
                with open(path, encoding="utf-8") as f:
                    json.load(f)
            elif name.endswith(".safetensors"):
                with open(path, "rb") as f:
                    header_length = int.from_bytes(f.read(8), "little")
                    header = json.loads(f.read(header_length))
                end = 8 + header_length + max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"),
                                              default=0)
                if os.path.getsize(path) < end:
                    return f"{path} is truncated: {os.path.getsize(path)} bytes where its header needs {end}"
        except (ValueError, UnicodeDecodeError, KeyError, TypeError) as error:
            return f"{path} is damaged (truncated?): {type(error).__name__}: {str(error)[:100]}"
    return None


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

    def _say_if_half_on_cpu(self, hidden_states):
        """No silent fp16 on a CPU: dtype="auto" loads the checkpoint's fp16, and the first forward says, once per
        model, which dtype is faster there."""
        half = hidden_states.dtype in (torch.float16, torch.bfloat16)
        if half and hidden_states.device.type == "cpu" and not _tracing() and not getattr(self, "_said_half", False):
            self._said_half = True
            logger.warning(HALF_ON_CPU.format(dtype=str(hidden_states.dtype).removeprefix("torch.")))

    def get_prompt(self, batch_size: int, device, dtype):
        """The P-tuning v2 prefix as per-layer (key, value) pairs [batch, kv_heads, pre_seq_len, kv_channels]."""
        config = self.config
        tokens = torch.arange(config.pre_seq_len, device=device).unsqueeze(0).expand(batch_size, -1)
        prefix = self.prefix_dropout(self.prefix_encoder(tokens).to(dtype))
        prefix = prefix.view(batch_size, config.pre_seq_len, config.num_layers * 2, config.num_kv_heads,
                             config.kv_channels)
        prefix = prefix.permute(2, 0, 3, 1, 4)  # [layers * 2, batch, kv_heads, pre_seq_len, kv_channels]
        return [(prefix[2 * i], prefix[2 * i + 1]) for i in range(config.num_layers)]

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
        cache = cache if cache is not None else past_key_values  # either name, on every transformers version
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else config.return_dict
        use_cache = use_cache if use_cache is not None else config.use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        _check_inputs(input_ids, inputs_embeds, cache)

        if inputs_embeds is None:
            inputs_embeds = self.embedding(input_ids)
        self._say_if_half_on_cpu(inputs_embeds)
        created_cache = use_cache and cache is None
        if created_cache:
            cache = DynamicCache()
        prefix = self._prefix_into_cache(cache, inputs_embeds)
        cache_position = self._cache_position(pop_cache_position(kwargs), cache, prefix, inputs_embeds)
        if position_ids is None:
            position_ids = self._position_ids(attention_mask, cache_position, inputs_embeds)
        position_ids = position_ids.to(inputs_embeds.device)
        position_embeddings = self.rotary_pos_emb(position_ids, inputs_embeds.dtype)
        mask = self._attention_mask(attention_mask, inputs_embeds, cache, created_cache, prefix, cache_position,
                                    position_ids)
        # Flash attention derives packed rows' cu_seqlens from position_ids when no mask is given; flex takes no
        # position_ids (with torch 2.13 on CPU, passing them on breaks inductor's flex kernel, as in native Glm).
        if config._attn_implementation != "flex_attention":
            kwargs["position_ids"] = position_ids

        encoded = self.encoder(
            inputs_embeds,
            attention_mask=mask,
            position_embeddings=position_embeddings,
            cache=cache,
            prefix=prefix,
            cache_position=cache_position,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        outputs = BaseModelOutputWithPast(
            last_hidden_state=encoded.last_hidden_state,
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
            **{CACHE_FIELD: cache if use_cache else None},
        )
        return outputs if return_dict else outputs.to_tuple()

    def _prefix_into_cache(self, cache, inputs_embeds):
        """P-tuning v2 (eager only, not compile-clean): the prefix's per-layer (key, value) enter the cache on the
        first step. Returns them when there is no cache to hold them (use_cache=False), else None."""
        if not _prefix_length(self.config) or (cache is not None and cache.get_seq_length() != 0):
            return None
        prefix = self.get_prompt(inputs_embeds.shape[0], inputs_embeds.device, inputs_embeds.dtype)
        if cache is None:
            return prefix
        prefix_position = torch.arange(self.config.pre_seq_len, device=inputs_embeds.device)
        for layer_idx, (key, value) in enumerate(prefix):
            cache.update(key, value, layer_idx, {"cache_position": prefix_position})
        return None

    def _cache_position(self, given, cache, prefix, inputs_embeds):
        """Where this step's tokens go in the cache: the `cache_position` generate() gave (transformers 4.57), else
        counted from the cache. With a P-tuning prefix always counted: generate()'s count leaves the prefix out and a
        continued conversation's includes it."""
        prefix_len = _prefix_length(self.config)
        if given is not None and not prefix_len:
            return given
        past_len = cache.get_seq_length() if cache is not None else (prefix_len if prefix is not None else 0)
        # A tensor sum: no data-dependent guard under compile.
        return torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_len

    def _position_ids(self, attention_mask, cache_position, inputs_embeds):
        """RoPE positions count real tokens only: left pads and a P-tuning prefix sit before position 0."""
        batch, q_len = inputs_embeds.shape[:2]
        if attention_mask is not None and attention_mask.dim() == 2:
            return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]
        return (cache_position - _prefix_length(self.config)).unsqueeze(0).expand(batch, -1)

    def _attention_mask(self, attention_mask, inputs_embeds, cache, created_cache, prefix, cache_position,
                        position_ids):
        """The mask the configured attention takes: our flex BlockMask, or transformers' own mask."""
        config = self.config
        batch, q_len = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        if attention_mask is not None and attention_mask.dim() == 2 and _prefix_length(config):
            # The caller's mask covers the real tokens; the prefix is always visible.
            attention_mask = F.pad(attention_mask.to(device=device, dtype=torch.bool), (_prefix_length(config), 0),
                                   value=True)
        mask_cache = self._mask_cache(cache, created_cache, prefix, device)
        if config._attn_implementation == "flex_attention" and not (
                attention_mask is not None and attention_mask.dim() == 4):
            return _flex_block_mask(attention_mask, position_ids, mask_cache, batch, q_len, device)
        return causal_mask(config, inputs_embeds, attention_mask, mask_cache, cache_position, position_ids)

    def _mask_cache(self, cache, created_cache, prefix, device):
        """The cache that sizes the mask: the step's own, except in two cases below."""
        if prefix is not None:
            # No cache but a prefix (use_cache=False): size the mask by a cache holding the prefix alone.
            mask_cache = DynamicCache()
            positions = torch.arange(self.config.pre_seq_len, device=device)
            mask_cache.update(*prefix[0], 0, {"cache_position": positions})
            return mask_cache
        if created_cache and not _prefix_length(self.config):
            return None  # empty: the no-cache mask, which also detects packed rows from position_ids
        return cache


def _check_inputs(input_ids, inputs_embeds, cache):
    """Exactly one of input_ids or inputs_embeds, and a Cache object (or None) for the cache."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("ChatGLMModel.forward needs exactly one of input_ids or inputs_embeds")
    if cache is not None and not isinstance(cache, Cache):
        raise TypeError(
            f"past_key_values must be a transformers Cache (e.g. DynamicCache), got {type(cache).__name__}; "
            "legacy tuples of tensors are not supported"
        )


def _flex_block_mask(padding, position_ids, cache, batch, q_len, device):
    """Causal + padding (+ packed rows) as a flex-attention BlockMask. Our own rather than transformers': with torch
    2.13 on CPU, inductor fails to compile flex attention with transformers' decode-step mask (a C++ error; native
    GlmForCausalLM fails the same way), and a dense mask crashes flex on CPU."""
    from torch.nn.attention.flex_attention import create_block_mask

    if cache is None:
        kv_len = q_len
    else:  # a static cache hands back its whole length, a dynamic one what it holds after this step
        max_len = cache.get_max_cache_shape() if hasattr(cache, "get_max_cache_shape") else -1
        kv_len = max_len if isinstance(max_len, int) and max_len > 0 else int(cache.get_seq_length()) + q_len
    # A Python int where the cache counts in ints (a captured 0-d tensor offset hits the same CPU compile error).
    offset = cache.get_seq_length() if cache is not None else 0
    if padding is not None:
        padding = padding.to(device=device, dtype=torch.bool)
        if padding.shape[-1] < kv_len:
            padding = F.pad(padding, (0, kv_len - padding.shape[-1]), value=False)
    packed = None
    if padding is None and cache is None:
        packed = masking_utils.find_packed_sequence_indices(position_ids.expand(batch, -1))

    def mask_mod(b, h, q_idx, kv_idx):
        query = q_idx + offset
        allowed = kv_idx <= query
        if padding is None:
            return allowed
        # A query always sees itself, so left-pad rows never softmax over nothing.
        return (allowed & padding[b, kv_idx]) | (kv_idx == query)

    if packed is not None:
        def packed_mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (packed[b, q_idx] == packed[b, kv_idx])

        return create_block_mask(packed_mask_mod, batch, None, q_len, kv_len, device=device)
    return create_block_mask(mask_mod, batch, None, q_len, kv_len, device=device)


class _PrefixOnlyCache:
    """Stands in for a Cache when use_cache=False but a P-tuning prefix must still be attended."""

    def __init__(self, layer_idx, key, value):
        self.layer_idx, self.key, self.value = layer_idx, key, value

    def update(self, key, value, layer_idx, cache_kwargs=None):
        return torch.cat((self.key, key), dim=2), torch.cat((self.value, value), dim=2)


def _shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """labels shifted left by one, -100 at the end: position t predicts labels[t + 1]."""
    return F.pad(labels[:, 1:], (0, 1), value=-100)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Next-token cross entropy in fp32: logits at t predict labels at t + 1; -100 is ignored. The mean over the
    targets, or their sum divided by `num_items_in_batch` (what Trainer passes under gradient accumulation)."""
    targets = _shifted_targets(labels.to(logits.device)).reshape(-1)
    flat = logits.float().reshape(-1, logits.shape[-1])
    if num_items_in_batch is None:
        return F.cross_entropy(flat, targets, ignore_index=-100)
    return F.cross_entropy(flat, targets, ignore_index=-100, reduction="sum") / num_items_in_batch


# Elements of the fp32 logits block the training loss handles at a time (32 MB).
_LOSS_BLOCK_ELEMENTS = 1 << 23


class _LinearCrossEntropy(torch.autograd.Function):
    """Cross entropy of hidden @ weight.T, a block of rows at a time, with its gradient computed in the same pass.

    Autograd would keep the [tokens, vocab] logits, their fp32 log-softmax and, in backward, two more tensors of that
    size (1 GB at batch 4 x 512 and a 32k vocabulary); here one block of fp32 logits exists at a time and the backward
    only scales the gradients computed in forward (no recomputation).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, divisor):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        rows = max(1, _LOSS_BLOCK_ELEMENTS // weight.shape[0])
        for start in range(0, hidden.shape[0], rows):
            block = slice(start, start + rows)
            logits = (hidden[block] @ weight.t()).float()  # the model's dtype, then fp32, as the plain path
            target = targets[block]
            valid = target != -100
            target = target.masked_fill(~valid, 0)
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, target[:, None])[:, 0]) * valid).sum()
            # d loss / d logits = (softmax - one_hot(target)) * valid / divisor, built in place of the logits
            grad_logits = logits.sub_(lse[:, None]).exp_()
            grad_logits.scatter_add_(1, target[:, None], grad_logits.new_full((target.shape[0], 1), -1.0))
            grad_logits.mul_((valid.to(grad_logits.dtype) / divisor)[:, None])
            if need_hidden:
                torch.mm(grad_logits.to(weight.dtype), weight, out=grad_hidden[block])
            if need_weight:
                if weight.dtype == torch.float32:
                    grad_weight.addmm_(grad_logits.t(), hidden[block])
                else:  # accumulate the blocks in fp32
                    grad_weight += grad_logits.to(weight.dtype).t() @ hidden[block]
        ctx.grad_hidden, ctx.grad_weight, ctx.weight_dtype = grad_hidden, grad_weight, weight.dtype
        return total / divisor

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.grad_hidden, ctx.grad_weight
        ctx.grad_hidden = ctx.grad_weight = None  # a second backward through this graph is not supported
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


def fused_causal_lm_loss(hidden_states, weight, labels, num_items_in_batch=None):
    """`causal_lm_loss(hidden_states @ weight.T, labels)` without the logits: computed block by block with the
    gradient, so training never holds vocabulary-sized tensors. Values and gradients equal the plain path's."""
    width = hidden_states.shape[-1]
    targets = _shifted_targets(labels.to(hidden_states.device)).reshape(-1)
    divisor = (targets != -100).sum() if num_items_in_batch is None else num_items_in_batch
    if not isinstance(divisor, torch.Tensor):
        divisor = torch.tensor(float(divisor))
    divisor = divisor.to(device=hidden_states.device, dtype=torch.float32)
    return _LinearCrossEntropy.apply(hidden_states.reshape(-1, width), weight, targets, divisor)


def _is_plain_linear(module: nn.Module) -> bool:
    """A bare nn.Linear: no adapter wrapper (PEFT), hook or replaced forward that a direct weight product would skip."""
    return (type(module) is nn.Linear and module.bias is None and "forward" not in module.__dict__
            and not module._forward_hooks and not module._forward_pre_hooks)


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

    def create_masks_for_generate(self, *args, **kwargs):
        """generate()'s hook that builds a static cache's 4D mask ahead of the forward: transformers' own, except with
        a P-tuning prefix, which it does not know of (the forward then builds the mask from the 2D one)."""
        if _prefix_length(self.config):
            return kwargs["attention_mask"]
        return masking_utils.create_masks_for_generate(*args, **kwargs)

    def set_output_embeddings(self, new_embeddings):
        self.transformer.output_layer = new_embeddings

    def quantize(self, bits: int):
        """Weight-only int8 or int4 of every block's four matrices, in place, with torchao (quantization_glm.py).
        Returns self.

        Example:
            >>> model = AutoModel.from_pretrained(path, trust_remote_code=True, dtype=torch.bfloat16).quantize(4)
        """
        return quantize(self, bits)

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
            **{k: v for k, v in kwargs.items() if k != "num_items_in_batch"},  # cache_position, attention kwargs
        )
        hidden_states = outputs.last_hidden_state
        head = self.transformer.output_layer
        num_items = kwargs.get("num_items_in_batch")
        # Training with labels: the loss without the logits (logits=None), which would be the largest tensors of the
        # step. Evaluation, generation and no-grad calls return the logits as usual.
        if (labels is not None and self.training and torch.is_grad_enabled() and _is_plain_linear(head)
                and not _tracing()
                and isinstance(logits_to_keep, int) and logits_to_keep == 0
                and (hidden_states.requires_grad or head.weight.requires_grad)):
            logits, loss = None, fused_causal_lm_loss(hidden_states, head.weight, labels, num_items)
        else:
            # Only the last positions' logits are needed while generating.
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = head(hidden_states[:, keep])
            loss = causal_lm_loss(logits, labels, num_items) if labels is not None else None
        result = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_FIELD: cache_of(outputs)},
        )
        return result if return_dict else result.to_tuple()


# Not GenericForSequenceClassification: it pools by pad_token_id alone (ignores attention_mask) and lacks our head.
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
        pooled = _last_real_token(outputs.last_hidden_state, attention_mask, input_ids, self.config.pad_token_id)
        if self.dropout is not None:
            pooled = self.dropout(pooled)
        logits = self.classifier_head(pooled.to(self.classifier_head.weight.dtype)).float()
        loss = self._loss(logits, labels) if labels is not None else None
        result = SequenceClassifierOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return result if return_dict else result.to_tuple()

    def _loss(self, logits, labels):
        """MSE, cross entropy or BCE by `config.problem_type`, which the first labels set when it is None."""
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
            if self.num_labels == 1:
                return F.mse_loss(logits.squeeze(-1), labels.float().view(-1))
            return F.mse_loss(logits, labels.float())
        if problem == "single_label_classification":
            return F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return F.binary_cross_entropy_with_logits(logits, labels.float())


def _last_real_token(hidden_states, attention_mask, input_ids, pad_token_id):
    """Each row's hidden state at its last real token, whichever side the padding is on: real tokens are those of
    the attention mask, else those that are not pad_token_id, else all."""
    batch, seq_len = hidden_states.shape[:2]
    device = hidden_states.device
    positions = torch.arange(seq_len, device=device)
    if attention_mask is not None:
        real = attention_mask.to(device).bool()
    elif input_ids is not None and pad_token_id is not None:
        real = input_ids.to(device) != pad_token_id
    else:
        real = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    last = torch.where(real, positions, -1).max(-1).values.clamp(min=0)
    return hidden_states[torch.arange(batch, device=device), last]


__all__ = [
    "ChatGLMPreTrainedModel",
    "ChatGLMModel",
    "ChatGLMForConditionalGeneration",
    "ChatGLMForSequenceClassification",
    "GLMBlock",
]
