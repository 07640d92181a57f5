"""Weight-only int8/int4 quantization of the GLM blocks with torchao: what `model.quantize(bits)` runs.

    >>> model = AutoModel.from_pretrained(path, trust_remote_code=True, dtype=torch.bfloat16).quantize(4)
"""

import torch

# The four matrices of every GLMBlock that quantize() converts; embeddings and the output layer stay as they are.
QUANTIZED_MATRICES = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h",
                      "mlp.dense_4h_to_h")


def quantize(model, bits: int):
    """Weight-only int8 or int4 quantization of every block's query_key_value, dense, dense_h_to_4h and
    dense_4h_to_h (embeddings, output layer and norms stay as they are), in place, with torchao. Returns the model.

    int8 keeps one scale per output row; int4 one scale and zero point per group of 128 inputs (64 or 32 when
    the width needs it). Activations stay in the model's dtype.

    Example:
        >>> quantize(model, 8) is model
        True
    """
    torchao_config(bits, model.device.type)  # refuses other bits, and says how to install torchao
    quantization, _ = _torchao()

    # Block matrices grouped by the config they take (int4's group size depends on the input width).
    groups = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".encoder.layers." in f".{name}" \
                and name.endswith(QUANTIZED_MATRICES):
            key = 8 if bits == 8 else _int4_group_size(module.in_features)
            groups.setdefault(key, set()).add(name)
    for key, names in groups.items():
        config = torchao_config(bits, model.device.type, group_size=key if bits == 4 else 128)
        quantization.quantize_(model, config, filter_fn=lambda module, fqn: fqn in names)
    model.config.quantization_bit = bits
    return model


def torchao_config(bits: int, device_type: str = "cpu", group_size: int = 128):
    """The torchao config of weight-only int8 (one scale per output row) or int4 (one scale and zero point per
    `group_size` inputs) that quantize() applies on `device_type`. Also what transformers' `TorchAoConfig` takes to
    quantize while loading, so that full precision is never in memory at once (docs/chat.md):

        >>> AutoModel.from_pretrained(path, trust_remote_code=True, dtype=torch.bfloat16,
        ...                           quantization_config=TorchAoConfig(torchao_config(8)))
    """
    if bits not in (4, 8):
        raise ValueError(f"quantize() takes 4 or 8 bits, got {bits!r}")
    quantization, prototype_int4 = _torchao()
    if bits == 8:
        return quantization.Int8WeightOnlyConfig()
    if device_type == "cuda":
        return quantization.Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")
    # torchao 0.18's Int4WeightOnlyConfig has no CPU format; this one runs aten's CPU int4 kernel.
    return prototype_int4(group_size=group_size)


def _torchao():
    """torchao's quantization module and its CPU int4 config, or an ImportError saying how to install it."""
    # In try: transformers' remote-code import check skips it, so loading a model does not require torchao.
    try:
        import torchao.quantization as quantization
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
    except ImportError as error:
        raise ImportError("model.quantize() needs torchao, an optional dependency: pip install -r "
                          "requirements-quantize.txt (or pip install torchao)") from error
    return quantization, PrototypeInt4WeightOnlyConfig


def _int4_group_size(in_features: int) -> int:
    """The largest of torchao's int4 group sizes (128, 64, 32) that divides the input width."""
    for size in (128, 64, 32):
        if in_features % size == 0:
            return size
    raise ValueError(f"int4 quantization needs input widths divisible by 32, got {in_features}")
