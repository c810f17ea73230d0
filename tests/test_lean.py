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
import ra_cli.engine.linear as linear
from ra_cli.engine.linear import DECODE_ROWS, PackedLinear, int4_groups
from ra_cli.model.pack import PlainConfig


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


def test_bf16_products_run_in_hardware_only_with_bf16_instructions(monkeypatch):
    """torch's bf16 GEMMs use bf16 instructions (AVX512-BF16, AMX tiles) through oneDNN only;
    without either ra multiplies in float32."""
    for avx512_bf16, amx, expected in ((True, False, True), (False, True, True), (False, False, False)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        assert linear._cpu_has_bf16_instructions.__wrapped__() is expected
    monkeypatch.setattr(linear, "_cpu_has_bf16_instructions", lambda: True)
    assert linear.cpu_multiplies_bf16() is torch.backends.mkldnn.is_available()
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)  # oneDNN off: torch's software bf16 GEMM
    assert not linear.cpu_multiplies_bf16()


@pytest.mark.parametrize("bf16_in_hardware", [True, False])
def test_prefill_products_without_bf16_instructions_are_float32_products(monkeypatch, bf16_in_hardware):
    """Without bf16 instructions a batch of rows is multiplied in float32 by a float32 copy of the
    bf16 weights (the same products, rounded once to bf16); with them by torch's bf16 GEMM. Decode
    rows keep the int4 kernel and make no copy."""
    monkeypatch.setattr(linear, "cpu_multiplies_bf16", lambda: bf16_in_hardware)
    layer = PackedLinear(q4_weight(48, 256), torch.randn(48), WeightFormat.int4)
    layer(torch.randn(DECODE_ROWS, 256).bfloat16())
    assert getattr(layer, "_float32", None) is None
    rows = torch.randn(DECODE_ROWS + 1, 256).bfloat16()
    out = layer(rows)
    if bf16_in_hardware:
        assert getattr(layer, "_float32", None) is None
        assert torch.equal(out, torch.nn.functional.linear(rows, layer.dense) + layer.bias)
    else:
        assert layer._float32[1].dtype == torch.float32 and torch.equal(layer._float32[1], layer.dense.float())
        assert torch.equal(out, (rows.float() @ layer.dense.float().T).bfloat16() + layer.bias)


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
def test_int8_decode_kernel_is_float32_math_on_the_int8_rows(rows, scale_dtype):
    """engine/int8_decode.py against float64 math on the same int8 rows and scales (200 outputs:
    not a multiple of its 64-row blocks; 1 MiB, the smallest matrix it takes), in float32 before
    the final rounding; and what torch's int8 kernel (off a CPU, small matrices) computes, within
    that rounding."""
    import numpy as np

    from ra_cli.engine.int8_decode import int8_matmul, int8_rows_matmul
    from ra_cli.intrinsics import bf16_bits

    g = torch.Generator().manual_seed(rows)
    weights = torch.randint(-127, 128, (200, 5248), generator=g, dtype=torch.int8)
    scales = (torch.rand(200, generator=g) * 0.01).to(scale_dtype)
    x = torch.randn(rows, 5248, generator=g).bfloat16()
    reference = x.double() @ (weights.double() * scales.double()[:, None]).T
    out = np.empty((rows, 200), np.float32)
    bits = bf16_bits(scales) if scale_dtype == torch.bfloat16 else scales.numpy()
    int8_rows_matmul(x.float().numpy(), weights.numpy(), bits, out)
    torch.testing.assert_close(torch.from_numpy(out).double(), reference, atol=1e-5 * reference.abs().max(), rtol=0)
    rounded = int8_matmul(x, weights, scales)
    assert rounded.dtype == torch.bfloat16 and torch.equal(rounded, torch.from_numpy(out).bfloat16())
    torch.testing.assert_close(rounded.float(), torch._weight_int8pack_mm(x, weights, scales.bfloat16()).float(),
                               atol=0.01 * reference.abs().max(), rtol=0)
    assert int8_matmul(x, weights.t(), scales) is None  # a layout it cannot read in place
    assert int8_matmul(x[:, :96], weights[:, :96].contiguous(), scales) is None  # too small to pay


@pytest.mark.parametrize("rows", [1, 3])
def test_int4_decode_kernel_is_float32_math_on_the_groups(rows):
    """engine/int4_decode.py against float64 math on the same groups (low + q * step, bf16-exact):
    200 outputs (not a multiple of its 16-row tiles), K = 576; the tiles hold every q at its place."""
    import numpy as np

    from ra_cli.engine.int4_decode import int4_matmul, int4_tiles_matmul, int4_views, pack_int4_tiles

    g = torch.Generator().manual_seed(rows)
    q = torch.randint(0, 16, (200, 576), generator=g)
    step = (torch.rand(200, 18, generator=g) * 0.1 + 0.01).bfloat16().float()
    low = (torch.randn(200, 18, generator=g) * 0.3).bfloat16().float()
    weight = low.repeat_interleave(32, 1) + q * step.repeat_interleave(32, 1)
    tiles, step_tiles, low_tiles = pack_int4_tiles(q, step, low)
    assert tiles.shape == (13, 18, 16, 16) and step_tiles.shape == (13, 18, 16)
    unpacked = torch.stack([tiles & 15, tiles >> 4], 2).permute(0, 4, 1, 2, 3).reshape(13 * 16, 576)
    assert torch.equal(unpacked[:200].int(), q) and not unpacked[200:].any()
    x = torch.randn(rows, 576, generator=g)
    reference = x.double() @ weight.double().T
    out = np.empty((rows, 13 * 16), np.float32)
    int4_tiles_matmul(x.numpy(), *int4_views(tiles, step_tiles, low_tiles), out)
    torch.testing.assert_close(torch.from_numpy(out[:, :200]).double(), reference, atol=1e-5 * reference.abs().max(),
                               rtol=0)
    assert not out[:, 200:].any()
    rounded = int4_matmul(x.bfloat16(), int4_views(tiles, step_tiles, low_tiles), 200)
    assert rounded.shape == (rows, 200) and rounded.dtype == torch.bfloat16
    assert torch.equal(rounded, int4_matmul(x.bfloat16().float(), int4_views(tiles, step_tiles, low_tiles), 200)
                       .bfloat16())


def test_a_packed_state_at_any_offset_loads_aligned():
    """A saved state puts tensors back to back at any offset; torch's int8 kernel (small matrices)
    crashes on weights that do not start on a cache line, so loading copies those."""
    layer = PackedLinear(torch.randn(48, 64), None, WeightFormat.int8)
    state = {}
    for name, tensor in layer.state_dict().items():
        if tensor is not None:
            raw = torch.empty(tensor.numel() * tensor.element_size() + 72, dtype=torch.uint8)
            start = 8 + (-raw.data_ptr()) % 64  # 8 bytes past a cache line
            state["x." + name] = raw[start: start + tensor.numel() * tensor.element_size()].view(tensor.dtype) \
                .view(tensor.shape).copy_(tensor)
    assert state["x.int8"].data_ptr() % 64 == 8
    loaded = PackedLinear.from_state(state, "x.")
    assert loaded.int8.data_ptr() % 64 == 0 and torch.equal(loaded.int8, layer.int8)
    x = torch.randn(3, 64).bfloat16()
    assert torch.equal(loaded(x), layer(x))


def _snapped_qwen2():
    """A random two-layer Qwen2 (q|k|v biases) whose weights ra packs without loss: q|k|v, the
    output projection and down on 4-bit groups (int4), gate|up and the head as bf16-scaled int8
    rows with a +-127 in each (int8)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config).eval()

    def int8_rows(rows, cols, seed):
        g = torch.Generator().manual_seed(seed)
        q = torch.randint(-127, 128, (rows, cols), generator=g).float()
        q[:, 0] = 127
        return q * (torch.rand(rows, 1, generator=g) * 0.002 + 0.0005).bfloat16().float()

    for i, layer in enumerate(model.model.layers):
        attention, mlp = layer.self_attn, layer.mlp
        for j, projection in enumerate((attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj)):
            projection.weight.data = q4_weight(*projection.weight.shape, seed=10 * i + j) * 0.2
        for projection in (attention.q_proj, attention.k_proj, attention.v_proj):
            projection.bias.data.normal_()
        mlp.gate_proj.weight.data = int8_rows(96, 64, 10 * i + 5)
        mlp.up_proj.weight.data = int8_rows(96, 64, 10 * i + 6)
        mlp.down_proj.weight.data = q4_weight(64, 96, seed=10 * i + 7) * 0.2
    model.lm_head.weight.data = int8_rows(300, 64, 99) * 20
    install(model)
    return config, model


def test_fused_decode_step_is_the_layer_math():
    """A decode token through fused_decode.py (float32 glue in numba around the cache's attention)
    against transformers' float32 forward of the same (losslessly packed) weights, token by token;
    the general forward (torch ops, activations rounded to bf16 at each projection) is checked
    beside it. Only keys and values are rounded to bf16 in both ra paths."""
    config, model = _snapped_qwen2()
    lean = LeanDecoder.from_model(model, WeightFormat.int4, torch.bfloat16, torch.float32)
    kinds = [(b.qkv.kind, b.out.kind, b.gate_up.kind, b.down.kind) for b in lean.blocks] + [lean.lm_head.kind]
    assert kinds == [("int4", "int4", "int8", "int4")] * 2 + ["int8"]
    assert lean._host_weights() is not None
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(3))
    reference = _transformers_logits(model, ids)[PREFILL - 1:]
    fused = _lean_logits(lean, config, ids)
    lean._host = False  # the general forward for one token
    general = _lean_logits(lean, config, ids)
    scale = reference.abs().max()
    torch.testing.assert_close(fused, reference, atol=0.01 * scale, rtol=0)
    torch.testing.assert_close(general, reference, atol=0.03 * scale, rtol=0)
    assert (fused[1:] - reference[1:]).abs().max() < (general[1:] - reference[1:]).abs().max()


def test_fast_default_decodes_like_float32(loaded, loaded_fast):
    """The embedded model's decode steps on the CPU default (fused_decode.py, int4 groups) track
    float32 token by token: the same greedy token wherever float32's choice is clear (its top two
    more than 0.2 nats apart: a 0.07 near-tie flips either way with rounding), a small divergence."""
    assert loaded_fast.model.ra_lean._host_weights() is not None
    ids = loaded.tokenizer("The lighthouse on Karsk Island was built in 1871 by the engineer Tomas Lindqvist, who",
                           add_special_tokens=False).input_ids
    caches = [ContextCache.full(loaded.model.config), ContextCache.full(loaded_fast.model.config)]
    prefill(loaded.model, caches[0], ids[:PREFILL])
    prefill(loaded_fast.model, caches[1], ids[:PREFILL])
    for token in ids[PREFILL:]:
        reference = torch.log_softmax(prefill(loaded.model, caches[0], [token]), -1)
        fast = torch.log_softmax(prefill(loaded_fast.model, caches[1], [token]), -1)
        first, second = torch.topk(reference, 2).values
        assert int(fast.argmax()) == int(reference.argmax()) or first - second < 0.2
        assert float((reference.exp() * (reference - fast)).sum()) < 0.02


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


def test_a_cpu_without_bf16_instructions_prefills_like_one_with_them(loaded_fast, monkeypatch):
    """The default model's prefill with its products in float32 (a CPU without bf16 instructions)
    against bf16 GEMMs: the same next token, logits within bf16 rounding of each other."""
    ids = loaded_fast.tokenizer("The lighthouse on Karsk Island was built in 1871 by the engineer",
                                add_special_tokens=False).input_ids
    logits = {}
    for in_hardware in (True, False):
        monkeypatch.setattr(linear, "cpu_multiplies_bf16", lambda: in_hardware)
        logits[in_hardware] = prefill(loaded_fast.model, ContextCache.full(loaded_fast.model.config), ids)
    packed = [m for m in loaded_fast.model.ra_lean.modules() if isinstance(m, PackedLinear)]
    assert any(getattr(m, "_float32", None) is not None for m in packed)
    for m in packed:  # the copies are this test's: free them
        m._float32 = None
    assert int(logits[False].argmax()) == int(logits[True].argmax())
    torch.testing.assert_close(logits[False], logits[True], atol=0.05 * logits[True].abs().max(), rtol=0)


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


@pytest.mark.parametrize("rope", [None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                                  {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}])
def test_the_rope_table_is_transformers_rotary_module(rope):
    """The lean decoder's cos/sin table (from the frequencies the pack stores) against the rotary
    module transformers builds from the config: the same values, scaled ropes included (yarn also
    scales the table)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = {"rope_parameters": {"rope_theta": 5e5, **rope}} if rope else {}
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **settings)
    model = LlamaForCausalLM(config)
    lean = LeanDecoder.from_state(config, LeanDecoder.from_model(model, WeightFormat.dense, torch.float32).state(),
                                  torch.float32)
    positions = torch.arange(5000)[None]
    cos, sin = model.model.rotary_emb(torch.empty(1), positions)
    table_cos, table_sin = lean._rotary(0, 5000, torch.device("cpu"))
    torch.testing.assert_close(table_cos, cos[0], atol=1e-7, rtol=0)
    torch.testing.assert_close(table_sin, sin[0], atol=1e-7, rtol=0)
    assert rope is None or rope["rope_type"] != "yarn" or float(lean.rope_scale) > 1.0


def test_ropes_that_change_with_length_run_on_transformers():
    from transformers import LlamaConfig

    from ra_cli.engine.forward import supports

    assert supports(LlamaConfig())
    assert not supports(LlamaConfig(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}))
    assert not supports(PlainConfig({"model_type": "llama", "rope_scaling": {"type": "dynamic", "factor": 2.0}}))


def test_a_packed_model_starts_without_transformers_model_code(loaded_fast, model_cache_dir):
    """Later starts read the config from the pack: the same config hash as transformers' own config
    class (stored contexts stay valid), and none of the model modules whose import cost ~1.2 s."""
    import json
    import os
    import subprocess
    import sys

    from transformers import AutoConfig

    from ra_cli.model.convert import converted_gguf
    from ra_cli.model.fingerprint import config_sha256
    from ra_cli.model.resolve import resolve_model

    assert isinstance(loaded_fast.model.config, PlainConfig)
    converted, _ = converted_gguf(resolve_model(None).path)  # the embedded model's, converted by the fixture
    assert loaded_fast.fingerprint.config_sha256 == config_sha256(AutoConfig.from_pretrained(converted))
    assert loaded_fast.eos_token_id == 2 and loaded_fast.model.ra_lean._host_weights() is not None
    script = ("import sys, json; from ra_cli.model import load_model; m = load_model(None, device='cpu'); "
              "print(json.dumps([m.fingerprint.digest, sorted(n for n in sys.modules if n.startswith("
              "('transformers.models.llama', 'transformers.modeling_utils', 'transformers.core_model_loading')))]))")
    env = {**os.environ, "RA_CACHE_DIR": str(model_cache_dir.parent / "ra-session-cache")}
    digest, modules = json.loads(subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                                                text=True, check=True).stdout.splitlines()[-1])
    assert digest == loaded_fast.fingerprint.digest
    assert modules == []


def test_a_damaged_pack_is_one_line_that_says_what_to_do(tmp_path):
    from ra_cli.errors import RaError
    from ra_cli.model.pack import read_pack

    pack = tmp_path / "damaged.safetensors"
    pack.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(RaError, match="damaged .*delete that file"):
        read_pack(pack, torch.bfloat16, torch.float32, torch.device("cpu"))


def test_a_pack_reads_back_its_model_and_replaces_packs_of_another_layout(tmp_path):
    """write_pack/read_pack on a small saved model: the config (hash included), end-of-sequence
    ids and logits come back; packs of another layout version (older ra: no version in the
    header) are deleted when a new pack is written, since this ra never reads them."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from ra_cli.model.fingerprint import config_sha256
    from ra_cli.model.pack import LAYOUT_VERSION, read_pack, write_pack

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "model")
    GenerationConfig(eos_token_id=[5, 7]).save_pretrained(tmp_path / "model")
    packs = tmp_path / "packed"
    packs.mkdir()
    save_file({"x": torch.zeros(1)}, str(packs / "older.safetensors"))  # an older layout: no version
    save_file({"x": torch.zeros(1)}, str(packs / "current.safetensors"), metadata={"layout_version": str(LAYOUT_VERSION)})
    (packs / "unreadable.safetensors").write_bytes(b"not a pack")
    pack = packs / "model.safetensors"
    write_pack(str(tmp_path / "model"), pack, WeightFormat.dense, torch.float32, torch.float32,
               {"source": "tiny llama", "weights": "float32+dense"})
    assert sorted(p.name for p in packs.iterdir()) == ["current.safetensors", "model.safetensors", "unreadable.safetensors"]
    loaded, eos = read_pack(pack, torch.float32, torch.float32, torch.device("cpu"))
    assert eos == [5, 7]
    assert config_sha256(loaded.config) == config_sha256(LlamaForCausalLM.from_pretrained(tmp_path / "model").config)
    assert loaded.config.num_hidden_layers == 2 and loaded.config.get_text_config(decoder=True) is loaded.config
    ids = torch.randint(0, 64, (1, 24), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_lean_logits(loaded.ra_lean, loaded.config, ids),
                               _transformers_logits(model, ids)[PREFILL - 1:], atol=1e-4, rtol=0)
