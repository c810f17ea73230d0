"""The CPU fast path: packed int4/int8 decode weights and the lean decoder forward, against
transformers' own float32 forward."""

from __future__ import annotations

import pytest
import torch

from ra_cli.engine.attention import install
from ra_cli.engine.cache import ContextCache
from ra_cli.engine.forward import LeanDecoder
from ra_cli.engine.generate import prefill
from ra_cli.choices import WeightFormat
from ra_cli.engine.linear import PackedLinear, int4_groups


def q4_weight(rows=48, cols=64, seed=0):
    """A weight as a GGUF Q4 checkpoint dequantizes: each group of 32 inputs is low + q * step,
    q in 0..15 (step and low bf16-exact, as fp16 GGUF scales mostly are after rounding)."""
    g = torch.Generator().manual_seed(seed)
    step = (torch.rand(rows, cols // 32, 1, generator=g) * 0.1 + 0.01).bfloat16().float()
    low = (torch.randn(rows, cols // 32, 1, generator=g) * 0.3).bfloat16().float()
    q = torch.randint(0, 16, (rows, cols // 32, 32), generator=g).float()
    return (low + q * step).reshape(rows, cols)


def test_int4_groups_recover_a_4bit_grid_and_refuse_anything_else():
    weight = q4_weight()
    q, step, low = int4_groups(weight)
    rebuilt = (low[..., None] + q.reshape(48, 2, 32).float() * step[..., None]).reshape(48, 64)
    assert torch.equal(rebuilt, weight)
    assert int4_groups(weight + 1e-3 * torch.randn(48, 64)) is None  # off the grid: int8 instead
    assert int4_groups(torch.randn(8, 48)) is None  # not a multiple of the group size


@pytest.mark.parametrize("decode", [WeightFormat.int4, WeightFormat.int8])
def test_packed_linear_decode_matches_its_dense_weights(decode):
    weight, bias = q4_weight(), torch.randn(48)
    layer = PackedLinear(weight, bias, decode)
    assert layer.kind == decode.value
    x = torch.randn(3, 64).bfloat16()
    reference = (x.float() @ weight.T + bias.bfloat16().float())
    tolerance = 0.02 if decode is WeightFormat.int4 else 0.05  # bf16 output rounding; int8 requantizes
    torch.testing.assert_close(layer(x).float(), reference, atol=tolerance * reference.abs().max(), rtol=0)
    prefill_rows = torch.randn(40, 64).bfloat16()  # more rows than DECODE_ROWS: the dense bf16 weights
    torch.testing.assert_close(layer(prefill_rows).float(), prefill_rows.float() @ weight.bfloat16().float().T
                               + bias.bfloat16().float(), atol=0.05, rtol=0.01)


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
def test_int8_decode_kernel_is_float32_math_on_the_int8_rows(rows, scale_dtype):
    """engine/int8_decode.py against float64 math on the same int8 rows and scales (200 outputs:
    not a multiple of its 64-row blocks; 1 MiB, the smallest matrix it takes), in float32 before
    the final rounding; and what torch's int8 kernel (off a CPU, small matrices) computes, within
    that rounding."""
    import numpy as np

    from ra_cli.engine.int8_decode import int8_matmul, int8_rows_matmul

    g = torch.Generator().manual_seed(rows)
    weights = torch.randint(-127, 128, (200, 5248), generator=g, dtype=torch.int8)
    scales = (torch.rand(200, generator=g) * 0.01).to(scale_dtype)
    x = torch.randn(rows, 5248, generator=g).bfloat16()
    reference = x.double() @ (weights.double() * scales.double()[:, None]).T
    out = np.empty((rows, 200), np.float32)
    bits = scales.view(torch.int16).numpy().view(np.uint16) if scale_dtype == torch.bfloat16 else scales.numpy()
    int8_rows_matmul(x.float().numpy(), weights.numpy(), bits, out)
    torch.testing.assert_close(torch.from_numpy(out).double(), reference, atol=1e-5 * reference.abs().max(), rtol=0)
    rounded = int8_matmul(x, weights, scales)
    assert rounded.dtype == torch.bfloat16 and torch.equal(rounded, torch.from_numpy(out).bfloat16())
    torch.testing.assert_close(rounded.float(), torch._weight_int8pack_mm(x, weights, scales.bfloat16()).float(),
                               atol=0.01 * reference.abs().max(), rtol=0)
    assert int8_matmul(x, weights.t(), scales) is None  # a layout it cannot read in place
    assert int8_matmul(x[:, :96], weights[:, :96].contiguous(), scales) is None  # too small to pay


def _transformers_logits(model, ids):
    model.set_attn_implementation("sdpa")
    try:
        with torch.inference_mode():
            return model(ids).logits[0].float()
    finally:
        install(model)


PREFILL = 17  # more rows than DECODE_ROWS: the prefill path, then decode steps


def _lean_logits(lean, config, ids):
    """Logits at positions PREFILL-1.. through the lean forward: one prefill chunk, then one token
    at a time."""
    cache = ContextCache.full(config)
    with torch.inference_mode():
        rows = [lean(ids[:, :PREFILL], cache)]
        for position in range(PREFILL, ids.shape[1]):
            rows.append(lean(ids[:, position:position + 1], cache))
    return torch.stack(rows)


def test_lean_forward_equals_transformers_in_float32(loaded):
    lean = LeanDecoder.from_model(loaded.model, WeightFormat.dense, torch.float32)
    ids = torch.randint(100, 40000, (1, 24), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_lean_logits(lean, loaded.model.config, ids),
                               _transformers_logits(loaded.model, ids)[PREFILL - 1:], atol=2e-4, rtol=0)


def test_lean_forward_handles_qwen2_biases_and_rope():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config).eval()
    for layer in model.model.layers:  # random biases so that a missing one shows
        for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            projection.bias.data.normal_()
    install(model)
    lean = LeanDecoder.from_model(model, WeightFormat.dense, torch.float32)
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(_lean_logits(lean, config, ids), _transformers_logits(model, ids)[PREFILL - 1:],
                               atol=1e-4, rtol=0)


def test_fast_default_tracks_float32(loaded, loaded_fast):
    """bf16 activations with the GGUF's own int4 groups: the same next token, a small divergence."""
    assert loaded_fast.fingerprint.dtype == "bfloat16+int4" and loaded_fast.cache_dtype == torch.float32
    ids = loaded.tokenizer("The lighthouse on Karsk Island was built in 1871 by the engineer", add_special_tokens=False).input_ids
    reference = torch.log_softmax(prefill(loaded.model, ContextCache.full(loaded.model.config), ids), -1)
    fast = torch.log_softmax(prefill(loaded_fast.model, ContextCache.full(loaded_fast.model.config), ids), -1)
    assert int(fast.argmax()) == int(reference.argmax())
    assert float((reference.exp() * (reference - fast)).sum()) < 0.05


def test_the_cached_pack_is_the_fresh_pack(loaded_fast, loaded):
    """Later starts load the packed decoder from the cache (no packing): bit-identical tensors and
    logits to packing the float32 weights afresh."""
    fresh = LeanDecoder.from_model(loaded.model, WeightFormat.int4, torch.bfloat16, torch.float32)
    cached = loaded_fast.model.ra_lean
    fresh_state, cached_state = fresh.state(), cached.state()
    assert fresh_state.keys() == cached_state.keys()
    for name, tensor in fresh_state.items():
        assert torch.equal(tensor, cached_state[name]), name
    ids = torch.tensor([[1, 504, 3213, 314, 253, 1159, 28]])
    with torch.inference_mode():
        a = fresh(ids, ContextCache.full(loaded.model.config))
        b = cached(ids, ContextCache.full(loaded.model.config))
    assert torch.equal(a, b)
