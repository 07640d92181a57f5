"""Compile, export and packed sequences: fullgraph torch.compile with a static cache, torch.export (plain and through
transformers' ExecuTorch wrapper), both ONNX exporters run with onnxruntime, and packed rows against rows run alone."""

import importlib.util
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, glm, tiny_config
from model_helpers import left_padded_batch, static_cache

modeling = glm.modeling
compat = sys.modules["glm_hf.compat_glm"]


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    return glm.ChatGLMForConditionalGeneration(tiny_config(**overrides)).eval()


# ---------------------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) with a static cache


def test_fullgraph_compiled_static_cache_generate_equals_eager():
    """generate() compiles the decoding step (fullgraph: any graph break or data-dependent guard raises)."""
    from transformers import CompileConfig

    model = _model(1, num_layers=1)
    ids, mask = left_padded_batch(model.config.padded_vocab_size, [7, 5])
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    eager = model.generate(ids, **kwargs)
    compile_config = CompileConfig(fullgraph=True, mode="default")
    compile_config._compile_all_devices = True  # transformers' own switch to compile generate() on CPU (its tests)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=False):
        compiled = model.generate(ids, cache_implementation="static", compile_config=compile_config, **kwargs)
    assert torch.equal(compiled, eager)


def test_fullgraph_compiled_forward_decode_step_with_static_cache():
    """torch.compile(model.forward, fullgraph=True) for a decoding step with a StaticCache and a 2D mask (the path
    of 4.57's generate and of users' own loops): same logits as eager, and a second step reuses the graph."""
    model = _model(2, num_layers=1)
    ids, mask = left_padded_batch(model.config.padded_vocab_size, [6, 4])
    batch = ids.shape[0]

    def run(forward):
        cache = static_cache(model, batch, 12)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            out = model(ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                        cache_position=torch.arange(ids.shape[1]))
            logits = [out.logits[:, -1]]
            token, step_mask, position = out.logits[:, -1:].argmax(-1), mask, positions[:, -1:]
            for step in range(2):
                step_mask = torch.cat([step_mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)
                position = position + 1
                out = forward(input_ids=token, attention_mask=torch.nn.functional.pad(
                    step_mask, (0, 12 - step_mask.shape[1])), position_ids=position, past_key_values=cache,
                    use_cache=True, cache_position=torch.tensor([ids.shape[1] + step]))
                logits.append(out.logits[:, -1])
                token = out.logits[:, -1:].argmax(-1)
        return torch.stack(logits)

    eager = run(model.forward)
    torch._dynamo.reset()
    compiled_forward = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
    compiled = run(compiled_forward)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# torch.export


class _Logits(torch.nn.Module):
    """forward(input_ids, attention_mask) -> logits, without a cache (what exporters take)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


@pytest.mark.parametrize("grad", [False, True])
def test_torch_export_forward_with_attention_mask_matches_eager(grad):
    model = _model(3)
    ids, mask = left_padded_batch(model.config.padded_vocab_size, [9, 6])
    wrapper = _Logits(model)
    with torch.set_grad_enabled(grad):
        program = torch.export.export(wrapper, (ids, mask))
        exported = program.module()(ids, mask)
        eager = wrapper(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(exported[real], eager[real], atol=1e-5, rtol=1e-5)
    # The exported graph is not specialised to these values: a different padding gives the eager answer too.
    other = mask.clone()
    other[0, :3] = 0
    with torch.no_grad():
        torch.testing.assert_close(program.module()(ids, other)[other.bool()], wrapper(ids, other)[other.bool()],
                                   atol=1e-5, rtol=1e-5)


class _DecodeStep(torch.nn.Module):
    """One decoding step against a StaticCache held as buffers (as transformers' ExecuTorch wrapper holds it)."""

    def __init__(self, model, cache):
        super().__init__()
        self.model, self.cache = model, cache
        for i, layer in enumerate(cache.layers):
            self.register_buffer(f"key_{i}", layer.keys, persistent=False)
            self.register_buffer(f"value_{i}", layer.values, persistent=False)

    def forward(self, input_ids, position_ids, cache_position):
        for layer in self.cache.layers:  # transformers 5.x counts in the layer; export runs the step once itself
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length.copy_(cache_position[0])
        return self.model(input_ids=input_ids, position_ids=position_ids, past_key_values=self.cache,
                          use_cache=True, cache_position=cache_position).logits


def test_torch_export_decode_step_with_static_cache_matches_eager():
    model = _model(4)
    ids = torch.randint(3, model.config.padded_vocab_size, (1, 6))
    with torch.no_grad():
        expected = model(torch.cat([ids, ids[:, :1]], dim=1)).logits[:, -1]
        cache = static_cache(model, 1, 16)
        model(ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(6))  # prefill, eager
        step = _DecodeStep(model, cache)
        args = (ids[:, :1], torch.tensor([[6]]), torch.tensor([6]))
        program = torch.export.export(step, args)
        exported = program.module()(*args)[:, -1]
    torch.testing.assert_close(exported, expected, atol=1e-5, rtol=1e-5)


def test_transformers_executorch_decoder_only_export_matches_eager():
    executorch = pytest.importorskip("transformers.integrations.executorch")
    if not hasattr(executorch, "TorchExportableModuleForDecoderOnlyLM"):
        pytest.skip("this transformers has no TorchExportableModuleForDecoderOnlyLM")
    model = _model(5)
    model.generation_config.cache_implementation = "static"
    ids = torch.randint(3, model.config.padded_vocab_size, (1, 7))
    exportable = executorch.TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=16)
    program = exportable.export(input_ids=ids[:, :1], cache_position=torch.tensor([0]))
    with torch.no_grad():
        full = model(ids).logits[0]
        # One token at a time through the exported program's static cache, as the ExecuTorch runner feeds it.
        steps = torch.stack([program.module()(input_ids=ids[:, i:i + 1], cache_position=torch.tensor([i]))[0, -1]
                             for i in range(ids.shape[1])])
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# ONNX: both exporters, run with onnxruntime


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_export_logits_match_eager_in_onnxruntime(dynamo, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if importlib.util.find_spec("onnx") is None or (dynamo and importlib.util.find_spec("onnxscript") is None):
        pytest.skip("the ONNX exporters need onnx (and onnxscript for dynamo=True)")
    model = _model(6)
    ids, mask = left_padded_batch(model.config.padded_vocab_size, [8, 5])
    wrapper = _Logits(model)
    path = tmp_path / "model.onnx"
    if not dynamo and not compat.MASK_TAKES_CACHE:  # transformers 4.57: refused, saying why
        with pytest.raises(RuntimeError, match="dynamo=True"), torch.no_grad():
            torch.onnx.export(wrapper, (ids, mask), str(path), dynamo=False)
        return
    with torch.no_grad():
        torch.onnx.export(wrapper, (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                          output_names=["logits"], dynamo=dynamo)
        eager = wrapper(ids, mask)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    real = mask.bool()
    torch.testing.assert_close(torch.from_numpy(logits)[real], eager[real], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# optimum-onnx: the Hugging Face ONNX exporter (optimum-cli export onnx) and its onnxruntime models


def _need_optimum_onnx():
    if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.exporters.onnx") is None:
        pytest.skip("optimum-onnx is not installed here: its latest release (0.1.0) requires transformers < 4.58, so "
                    "CI installs it in the transformers 4.57 leg (ci/requirements-transformers4.txt), which runs this")


def test_optimum_cli_exports_the_native_conversion_and_its_ort_model_generates_our_tokens(tmp_path):
    """The route docs/engines.md gives: convert_glm.py --to native, then `optimum-cli export onnx --task
    text-generation-with-past` as optimum documents it; optimum's ORTModelForCausalLM (onnxruntime, with its KV cache)
    gives our greedy tokens for left-padded rows and our logits."""
    import convert_glm

    _need_optimum_onnx()
    from optimum.onnxruntime import ORTModelForCausalLM

    model = _model(8)
    model.save_pretrained(tmp_path / "ours")
    convert_glm.convert_checkpoint(tmp_path / "ours", tmp_path / "native", "native")
    result = subprocess.run([sys.executable, "-m", "optimum.commands.optimum_cli", "export", "onnx", "--model",
                             str(tmp_path / "native"), "--task", "text-generation-with-past", str(tmp_path / "onnx")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ort_model = ORTModelForCausalLM.from_pretrained(tmp_path / "onnx")
    ids, mask = left_padded_batch(model.config.padded_vocab_size, [9, 5])
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ort_model.generate(ids, attention_mask=mask, **kwargs),
                       model.generate(ids, attention_mask=mask, **kwargs))
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(ort_model(input_ids=ids, attention_mask=mask).logits[real], ours[real], atol=1e-4,
                               rtol=0)


def test_optimum_exports_our_remote_code_folder_with_its_glm_onnx_config(tmp_path):
    """Our own folder (model_type chatglm, trust_remote_code) through optimum's main_export with its GLM ONNX config
    passed as a custom config, as optimum documents for custom architectures: the ONNX model gives our logits in
    onnxruntime for a prompt and then for a decoding step fed the returned K/V. (optimum's ORTModelForCausalLM sizes
    an empty cache by num_attention_heads for model types it does not list, so it cannot run this file: the native
    conversion above is the route for it.)"""
    _need_optimum_onnx()
    ort = pytest.importorskip("onnxruntime")
    import numpy as np
    from optimum.exporters.onnx import main_export
    from optimum.exporters.onnx.model_configs import GLMOnnxConfig
    from transformers import AutoConfig

    model = _model(9)
    model.save_pretrained(tmp_path / "ours")
    config = AutoConfig.from_pretrained(tmp_path / "ours", trust_remote_code=True)
    onnx_config = GLMOnnxConfig(config, task="text-generation", use_past=True, use_past_in_inputs=True)
    main_export(str(tmp_path / "ours"), output=tmp_path / "onnx", task="text-generation-with-past",
                trust_remote_code=True, custom_onnx_configs={"model": onnx_config})
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = {i.name for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    ids, mask = left_padded_batch(model.config.padded_vocab_size, [9, 5])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    empty = np.zeros((2, model.config.multi_query_group_num, 0, model.config.kv_channels), dtype=np.float32)
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy()}
    feed.update({name: empty for name in inputs if name.startswith("past_key_values.")})
    prompt = session.run(None, {k: v for k, v in feed.items() if k in inputs})
    step_ids = torch.tensor([[5], [7]])
    step_mask = torch.cat([mask, torch.ones_like(step_ids)], 1)
    feed = {"input_ids": step_ids.numpy(), "attention_mask": step_mask.numpy(),
            "position_ids": positions[:, -1:].numpy() + 1}
    feed.update({name.replace("present", "past_key_values"): value
                 for name, value in zip(outputs, prompt) if name.startswith("present")})
    step = session.run(None, {k: v for k, v in feed.items() if k in inputs})
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        ours_step = model(torch.cat([ids, step_ids], 1), attention_mask=step_mask).logits[:, -1]
    real = mask.bool()
    torch.testing.assert_close(torch.from_numpy(prompt[0])[real], ours[real], atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.from_numpy(step[0])[:, -1], ours_step, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Packed rows: position_ids restarting inside a row


def _packed(lengths, vocab, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pieces = [torch.randint(3, vocab, (n,), generator=generator) for n in lengths]
    ids = torch.cat(pieces)[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return pieces, ids, positions


@pytest.mark.parametrize("implementation", ["eager", "sdpa", "flex_attention"])
def test_packed_rows_equal_sequences_run_alone(implementation):
    model = _model(7, attn_implementation=implementation)
    pieces, ids, positions = _packed([5, 7, 4], model.config.padded_vocab_size)
    with torch.no_grad():
        packed = model(ids, position_ids=positions).logits[0]  # default use_cache: the cache made here is empty
        alone = torch.cat([model(piece[None]).logits[0] for piece in pieces])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_packed_rows_loss_and_gradients_equal_padded_batch():
    model = _model(8).train()
    pieces, ids, positions = _packed([6, 3, 5], model.config.padded_vocab_size, seed=1)
    labels = ids.clone()
    starts = torch.tensor([0, 6, 9])
    labels[0, starts] = -100  # a sequence's first token is no one's target (as in the padded rows)
    packed = model(ids, position_ids=positions, labels=labels, use_cache=False).loss
    packed.backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    width = max(len(p) for p in pieces)
    padded_ids = torch.zeros(len(pieces), width, dtype=torch.long)
    padded_labels = torch.full_like(padded_ids, -100)
    for row, piece in enumerate(pieces):
        padded_ids[row, :len(piece)] = piece
        padded_labels[row, :len(piece)] = piece
    padded = model(padded_ids, labels=padded_labels, use_cache=False).loss
    padded.backward()
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)
    for mine, theirs in zip(packed_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4)


def test_flash_style_attention_gets_packed_kwargs():
    """A custom attention registered through transformers' AttentionInterface (as flash attention is) gets the
    position_ids and the caller's cu_seq_lens/max_length kwargs; computing per segment from them with sdpa gives
    the sequences' own logits."""
    from transformers import AttentionInterface

    seen = []

    def segment_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        seen.append({k: kwargs.get(k) for k in ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                                                "max_length_k")})
        assert attention_mask is None  # flash takes packed rows from these kwargs, not from a mask
        bounds = kwargs["cu_seq_lens_q"].tolist()
        key = key.repeat_interleave(module.num_key_value_groups, dim=1)
        value = value.repeat_interleave(module.num_key_value_groups, dim=1)
        outputs = [torch.nn.functional.scaled_dot_product_attention(
            query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling)
            for a, b in zip(bounds[:-1], bounds[1:])]
        return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None

    AttentionInterface.register("glm_test_segments", segment_attention)
    # The mask interface of flash attention: the 2D padding mask (here none) is what the function gets.
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionMaskInterface.register("glm_test_segments", ALL_MASK_ATTENTION_FUNCTIONS["flash_attention_2"])
    model = _model(9)
    pieces, ids, positions = _packed([4, 6, 3], model.config.padded_vocab_size, seed=2)
    cu = torch.tensor([0, 4, 10, 13], dtype=torch.int32)
    with torch.no_grad():
        alone = torch.cat([model(piece[None]).logits[0] for piece in pieces])
        model.config._attn_implementation = "glm_test_segments"
        packed = model(ids, position_ids=positions, use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                       max_length_q=6, max_length_k=6).logits[0]
    assert len(seen) == model.config.num_layers
    for kwargs in seen:
        assert torch.equal(kwargs["position_ids"], positions)
        assert torch.equal(kwargs["cu_seq_lens_q"], cu) and kwargs["max_length_k"] == 6
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_gpu_parity_script_passes_on_cpu():
    """benchmarks/gpu_parity.py, the parity half of scripts/gpu_check.sh for a session with a GPU, run on the CPU:
    every check it prints (ours against native in fp32 and bf16, eager, static-cache and compiled) says OK."""

    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_parity.py"), "--device", "cpu"],
                            capture_output=True, text=True, timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith(("OK", "DIFF"))]
    assert result.returncode == 0 and len(lines) == 6 and all(line.startswith("OK") for line in lines), \
        result.stdout + result.stderr[-3000:]
