"""Configuration of the GLM family (ChatGLM2/3-6B, GLM-4-9B) under the original THUDM key names.

The keys are those of the published `config.json` files (see docs/architecture.md section 1), so THUDM checkpoints load
unchanged and what we save loads in vLLM, llama.cpp's converter and chatglm.cpp. The standard transformers names
(`num_hidden_layers`, `vocab_size`, ...) are aliases of the original keys, so generic tools work too.

Example:
    >>> from configuration_glm import ChatGLMConfig
    >>> config = ChatGLMConfig(num_layers=2, hidden_size=64, num_attention_heads=4, kv_channels=16,
    ...                        multi_query_group_num=2, ffn_hidden_size=128, padded_vocab_size=1000)
    >>> config.num_hidden_layers, config.num_key_value_heads, config.vocab_size
    (2, 2, 1000)
"""

import os
import re

from transformers import PretrainedConfig

# Attention backends our modeling code can dispatch to; others registered with transformers'
# AttentionInterface are accepted too (checked in ChatGLMConfig.__init__).
KNOWN_ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")

# Where a saved folder's Auto* classes live: our code files, copied beside the weights (as THUDM's repos did).
AUTO_MAP = {
    "AutoConfig": "configuration_glm.ChatGLMConfig",
    "AutoModel": "modeling_glm.ChatGLMForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_glm.ChatGLMForConditionalGeneration",
    "AutoModelForSeq2SeqLM": "modeling_glm.ChatGLMForConditionalGeneration",
    "AutoModelForSequenceClassification": "modeling_glm.ChatGLMForSequenceClassification",
}

# llama.cpp's converter (convert_hf_to_gguf.py, ChatGLMModel) reads a ChatGLM2/3 SentencePiece vocabulary only when
# config.json's _name_or_path contains GLM3_ENGINE_MARK (docs/architecture.md sections 1 and 8). A ChatGLM3-format
# config without a Hub id that contains it is saved as GLM3_FORMAT_NAME: that names the format and, with its spaces,
# is no Hub id, so nothing takes it for a base model.
GLM3_ENGINE_MARK = "THUDM/chatglm3-6b"
GLM3_FORMAT_NAME = GLM3_ENGINE_MARK + " tokenizer format"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(name) -> bool:
    """Whether `name` is a Hub repository id ("org/name") rather than a local path or anything else.

    >>> is_hub_id("THUDM/chatglm3-6b"), is_hub_id("/models/chatglm3-6b"), is_hub_id(GLM3_FORMAT_NAME)
    (True, False, False)
    """
    return isinstance(name, str) and bool(_HUB_ID.fullmatch(name)) and not os.path.exists(name)


# THUDM/chatglm3-6b's values of the keys that have a standard alias (the other defaults are in __init__).
CHATGLM3_DEFAULTS = dict(num_layers=28, padded_vocab_size=65024, ffn_hidden_size=13696, kv_channels=128,
                         seq_length=8192, layernorm_epsilon=1e-5, multi_query_group_num=2)


class ChatGLMConfig(PretrainedConfig):
    r"""Configuration of a GLM model; defaults are those of THUDM/chatglm3-6b.

    Args:
        num_layers: number of GLMBlocks.
        padded_vocab_size: rows of the embedding and of the output layer.
        hidden_size: model width.
        ffn_hidden_size: SwiGLU inner width (dense_h_to_4h writes twice this).
        kv_channels: head dimension (queries are num_attention_heads * kv_channels wide).
        num_attention_heads: query heads.
        seq_length: trained context length.
        multi_query_attention / multi_query_group_num: grouped K/V heads and their number.
        rope_ratio: RoPE base multiplier (base = 10000 * rope_ratio).
        layernorm_epsilon: RMSNorm epsilon.
        add_qkv_bias / add_bias_linear: bias on the fused QKV / on the other linears.
        pre_seq_len / prefix_projection: P-tuning v2 prefix length and whether it goes through an MLP.
        classifier_dropout: dropout before the sequence-classification head.
        The remaining keys (rmsnorm, post_layer_norm, apply_query_key_layer_scaling, attention_softmax_in_fp32,
        fp32_residual_connection, original_rope, bias_dropout_fusion, apply_residual_connection_post_layernorm)
        are kept for compatibility with the published files and the engines that read them.
    """

    model_type = "chatglm"
    keys_to_ignore_at_inference = ["past_key_values"]
    # Standard transformers names -> the original keys, so generic code (generate, peft, accelerate) finds them.
    attribute_map = {
        "num_hidden_layers": "num_layers",
        "num_key_value_heads": "multi_query_group_num",
        "head_dim": "kv_channels",
        "intermediate_size": "ffn_hidden_size",
        "vocab_size": "padded_vocab_size",
        "max_position_embeddings": "seq_length",
        "rms_norm_eps": "layernorm_epsilon",
    }

    def __init__(
        self,
        num_layers=None,
        padded_vocab_size=None,
        hidden_size=4096,
        ffn_hidden_size=None,
        kv_channels=None,
        num_attention_heads=32,
        seq_length=None,
        hidden_dropout=0.0,
        classifier_dropout=None,
        attention_dropout=0.0,
        layernorm_epsilon=None,
        rope_ratio=1,
        rmsnorm=True,
        apply_residual_connection_post_layernorm=False,
        post_layer_norm=True,
        add_bias_linear=False,
        add_qkv_bias=True,
        bias_dropout_fusion=True,
        multi_query_attention=True,
        multi_query_group_num=None,
        apply_query_key_layer_scaling=True,
        attention_softmax_in_fp32=True,
        fp32_residual_connection=False,
        original_rope=True,
        pre_seq_len=None,
        prefix_projection=False,
        initializer_range=0.02,
        use_cache=True,
        tie_word_embeddings=False,
        eos_token_id=2,
        pad_token_id=0,
        **kwargs,
    ):
        # The standard names (which every saved config.json also carries, and glm-4's published one has for
        # num_hidden_layers) are aliases: given with the original key they must agree, alone they stand for it.
        given = dict(num_layers=num_layers, padded_vocab_size=padded_vocab_size, ffn_hidden_size=ffn_hidden_size,
                     kv_channels=kv_channels, seq_length=seq_length, layernorm_epsilon=layernorm_epsilon,
                     multi_query_group_num=multi_query_group_num)
        for alias, key in self.attribute_map.items():
            alias_value = kwargs.pop(alias, None)
            if given[key] is not None and alias_value is not None and alias_value != given[key]:
                raise ValueError(f"ChatGLMConfig: {key}={given[key]!r} and {alias}={alias_value!r} disagree; they "
                                 f"name the same value (edit both, or remove {alias})")
            given[key] = given[key] if given[key] is not None else alias_value
            given[key] = given[key] if given[key] is not None else CHATGLM3_DEFAULTS[key]
        self.num_layers = given["num_layers"]
        self.padded_vocab_size = given["padded_vocab_size"]
        self.hidden_size = hidden_size
        self.ffn_hidden_size = given["ffn_hidden_size"]
        self.kv_channels = given["kv_channels"]
        self.num_attention_heads = num_attention_heads
        self.seq_length = given["seq_length"]
        self.hidden_dropout = hidden_dropout
        self.classifier_dropout = classifier_dropout
        self.attention_dropout = attention_dropout
        self.layernorm_epsilon = given["layernorm_epsilon"]
        self.rope_ratio = rope_ratio
        self.rmsnorm = rmsnorm
        self.apply_residual_connection_post_layernorm = apply_residual_connection_post_layernorm
        self.post_layer_norm = post_layer_norm
        self.add_bias_linear = add_bias_linear
        self.add_qkv_bias = add_qkv_bias
        self.bias_dropout_fusion = bias_dropout_fusion
        self.multi_query_attention = multi_query_attention
        self.multi_query_group_num = given["multi_query_group_num"]
        self.apply_query_key_layer_scaling = apply_query_key_layer_scaling
        self.attention_softmax_in_fp32 = attention_softmax_in_fp32
        self.fp32_residual_connection = fp32_residual_connection
        self.original_rope = original_rope
        self.pre_seq_len = pre_seq_len
        self.prefix_projection = prefix_projection
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self._validate_glm(kwargs.get("attn_implementation"))
        super().__init__(
            tie_word_embeddings=tie_word_embeddings, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs
        )

    @property
    def num_kv_heads(self) -> int:
        """K/V heads actually used: the groups with multi_query_attention, else one per query head."""
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    def _validate_glm(self, attn_implementation):
        positive = ("num_layers", "padded_vocab_size", "hidden_size", "ffn_hidden_size", "kv_channels",
                    "num_attention_heads", "seq_length")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ChatGLMConfig.{name} must be a positive integer, got {value!r}")
        if self.multi_query_attention:
            groups = self.multi_query_group_num
            if not isinstance(groups, int) or groups <= 0:
                raise ValueError(f"ChatGLMConfig.multi_query_group_num must be a positive integer, got {groups!r}")
            if self.num_attention_heads % groups:
                raise ValueError(
                    f"ChatGLMConfig.num_attention_heads ({self.num_attention_heads}) must be divisible by "
                    f"multi_query_group_num ({groups})"
                )
        if self.kv_channels % 4:
            # RoPE rotates the first half of each head in (even, odd) pairs.
            raise ValueError(f"ChatGLMConfig.kv_channels must be a multiple of 4, got {self.kv_channels}")
        if self.rope_ratio is None or not self.rope_ratio > 0:
            raise ValueError(f"ChatGLMConfig.rope_ratio must be > 0, got {self.rope_ratio!r}")
        if not self.layernorm_epsilon > 0:
            raise ValueError(f"ChatGLMConfig.layernorm_epsilon must be > 0, got {self.layernorm_epsilon!r}")
        if self.pre_seq_len is not None and (not isinstance(self.pre_seq_len, int) or self.pre_seq_len <= 0):
            raise ValueError(f"ChatGLMConfig.pre_seq_len must be a positive integer or None, got {self.pre_seq_len!r}")
        if attn_implementation is not None:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            known = set(KNOWN_ATTENTION) | set(ALL_ATTENTION_FUNCTIONS.keys())
            # Hub kernels ("org/repo") are resolved by transformers itself.
            if attn_implementation not in known and "/" not in attn_implementation:
                raise ValueError(
                    f"ChatGLMConfig.attn_implementation {attn_implementation!r} is unknown; "
                    f"use one of {sorted(known)}"
                )

    @property
    def is_glm3_format(self) -> bool:
        """Whether the vocabulary is ChatGLM2/3's SentencePiece one, whose `</s>` is id 2: eos (or the first of a stop
        list) is 2. GLM-4's eos is `<|endoftext|>`, after its byte-level ranks (151329 in the published vocabulary),
        never 2."""
        eos = self.eos_token_id
        return (eos[0] if isinstance(eos, (list, tuple)) and eos else eos) == 2

    def saved_name_or_path(self):
        """The `_name_or_path` that config.json records, or None (docs/architecture.md section 1): the name the model
        was loaded from when that is a Hub id, except that a ChatGLM3-format config records GLM3_FORMAT_NAME unless
        its Hub id contains GLM3_ENGINE_MARK, so llama.cpp's converter always takes its SentencePiece vocabulary.
        A local path is never recorded.

        >>> config = ChatGLMConfig(name_or_path="/home/me/chatglm3-6b")
        >>> config.saved_name_or_path()
        'THUDM/chatglm3-6b tokenizer format'
        >>> ChatGLMConfig(name_or_path="THUDM/chatglm3-6b-32k").saved_name_or_path()
        'THUDM/chatglm3-6b-32k'
        """
        name = self.name_or_path if is_hub_id(self.name_or_path) else None
        if self.is_glm3_format and GLM3_ENGINE_MARK not in (name or ""):
            return GLM3_FORMAT_NAME
        return name

    def to_diff_dict(self):
        """What `save_pretrained` writes (transformers 4.57 and 5.x both save through this): transformers' own diff,
        from which it drops `_name_or_path`, with `_name_or_path` set to `saved_name_or_path()`. Every path that
        saves a config (save_pretrained of a model, Trainer and TRL output, peft's merged model, train.py,
        convert_glm.py) goes through here."""
        output = super().to_diff_dict()
        name = self.saved_name_or_path()
        if name:
            output["_name_or_path"] = name
        return output

    def to_dict(self):
        """The config as a dict: the original keys, the standard names beside them (`num_hidden_layers`,
        `num_key_value_heads`, `head_dim`, `intermediate_size`, `vocab_size`, `max_position_embeddings`,
        `rms_norm_eps`: what peft, llama.cpp's converter and other generic tools read) and our `auto_map`, so a saved
        folder loads with trust_remote_code."""
        output = super().to_dict()
        for alias, key in self.attribute_map.items():
            output[alias] = output[key]
        output["auto_map"] = dict(AUTO_MAP)
        return output
