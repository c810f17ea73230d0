"""The attention engine against transformers' own sdpa path and against exact math."""

from __future__ import annotations

import pytest
import torch

from ra_cli.engine.attention import attention_with_lse, causal_mask, exact_attention, install, merge_partial
from ra_cli.engine.cache import ContextCache
from ra_cli.engine.generate import prefill


def _sdpa_logits(model, ids):
    model.set_attn_implementation("sdpa")
    try:
        with torch.inference_mode():
            return model(ids).logits[0]
    finally:
        install(model)


def test_chunked_prefill_matches_transformers_single_pass(loaded):
    model = loaded.model
    ids = torch.randint(100, 40000, (1, 300), generator=torch.Generator().manual_seed(1))
    reference = _sdpa_logits(model, ids)
    cache = ContextCache.full(model.config)
    for start in range(0, 299, 64):
        prefill(model, cache, ids[0, start:min(start + 64, 299)], want_logits=False)
    last = prefill(model, cache, ids[0, 299:])
    assert cache.length == 300
    torch.testing.assert_close(last, reference[-1].float(), atol=2e-4, rtol=0)


def test_merge_of_disjoint_key_sets_is_exact():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 6, 3, 16, generator=g)
    k = torch.randn(1, 2, 40, 16, generator=g) * 3
    v = torch.randn(1, 2, 40, 16, generator=g)
    mask = causal_mask(3, 37, 40)
    full, full_lse = attention_with_lse(q, k, v, 0.25, mask)
    perm = torch.randperm(40, generator=g)
    a, b = perm[:11], perm[11:]
    out_a, lse_a = attention_with_lse(q, k[:, :, a], v[:, :, a], 0.25, mask[:, a])
    out_b, lse_b = attention_with_lse(q, k[:, :, b], v[:, :, b], 0.25, mask[:, b])
    merged, lse = merge_partial([out_a, out_b], [lse_a, lse_b])
    torch.testing.assert_close(merged, full, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse, full_lse, atol=1e-6, rtol=1e-6)
    reference = exact_attention(q, k, v, 0.25, q_offset=37)
    torch.testing.assert_close(full, reference, atol=1e-5, rtol=1e-5)


def test_empty_key_set_vanishes_in_merge():
    q = torch.randn(1, 2, 1, 8)
    k = torch.randn(1, 2, 5, 8)
    v = torch.randn(1, 2, 5, 8)
    out, lse = attention_with_lse(q, k, v, 1.0)
    none_out, none_lse = attention_with_lse(q, k[:, :, :0], v[:, :, :0], 1.0)
    assert torch.isinf(none_lse).all() and not torch.isnan(none_out).any()
    merged, _ = merge_partial([out, none_out], [lse, none_lse])
    torch.testing.assert_close(merged, out)


def test_sliding_window_mask_follows_transformers():
    mask = causal_mask(q_len=3, q_offset=5, kv_len=8, sliding_window=3)
    # query at position 5 sees keys 3,4,5; at 6 sees 4,5,6; at 7 sees 5,6,7
    assert mask.nonzero().tolist() == [[0, 3], [0, 4], [0, 5], [1, 4], [1, 5], [1, 6], [2, 5], [2, 6], [2, 7]]


def test_hybrid_sliding_model_matches_transformers():
    """Gemma 3 style: sliding-window and global layers, GQA, custom scaling — random tiny weights."""
    from transformers import Gemma3TextConfig, Gemma3ForCausalLM

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                              layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
                              max_position_embeddings=256)
    model = Gemma3ForCausalLM(config).eval()
    install(model)
    ids = torch.randint(0, 256, (1, 40))
    reference = _sdpa_logits(model, ids)
    cache = ContextCache.full(model.config)
    outputs = [prefill(model, cache, ids[0, :13])]
    for position in range(13, 40, 9):
        outputs.append(prefill(model, cache, ids[0, position:position + 9]))
    torch.testing.assert_close(outputs[-1], reference[-1].float(), atol=1e-4, rtol=1e-4)
    # one token at a time too (decode path, q_len = 1, window smaller than the cache)
    cache = ContextCache.full(model.config)
    prefill(model, cache, ids[0, :30], want_logits=False)
    for position in range(30, 40):
        last = prefill(model, cache, ids[0, position:position + 1])
    torch.testing.assert_close(last, reference[-1].float(), atol=1e-4, rtol=1e-4)


def test_truncate_rewinds_every_layer(loaded):
    cache = ContextCache.full(loaded.model.config)
    prefill(loaded.model, cache, list(range(100, 140)), want_logits=False)
    cache.layers[3].crop(-5)  # as if an interrupted forward had stopped mid-way
    cache.truncate(30)
    assert {layer.get_seq_length() for layer in cache.layers} == {30}


def test_sampling_rules():
    from ra_cli.engine.generate import Sampling, sample

    logits = torch.tensor([1.0, 3.0, 2.9, -1.0])
    assert sample(logits, Sampling()) == 1
    # the answer already said token 1: a penalty of 1.1 makes 3.0/1.1 < 2.9
    assert sample(logits, Sampling(repeat_penalty=1.1), recent=[1]) == 2
    assert sample(logits, Sampling(repeat_penalty=1.1), recent=[0]) == 1
    # top-p keeps only the head of the distribution
    picks = {sample(torch.tensor([5.0, 4.9, -9.0, -9.0]), Sampling(temperature=1.0, top_p=0.5, seed=s)) for s in range(20)}
    assert picks <= {0, 1}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("groups", [3, 7])
@pytest.mark.parametrize("dim", [64, 128])
def test_cpu_dense_decode_is_exact_softmax_attention(dtype, groups, dim):
    """The CPU decode kernel against float64 math on the same (rounded) KV, inside a preallocated
    cache buffer (rows beyond n must be ignored), at chunk edges; and its weights are the softmax.
    Head size 64 runs the kernel's compiled-constant path, 128 the general one."""
    import numpy as np

    from ra_cli.engine.dense_decode import CHUNK, cpu_decode_attention, host_attention_with_lse

    g = torch.Generator().manual_seed(groups)
    kv_heads = 2
    for n in (1, 5, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17):
        buffer_k = (torch.randn(kv_heads, n + 64, dim, generator=g) * 2).to(dtype)
        buffer_v = torch.randn(kv_heads, n + 64, dim, generator=g).to(dtype)
        buffer_k[:, n:] = 1e4  # garbage past the cached length would dominate any softmax that read it
        rows = torch.randn(kv_heads, groups, dim, generator=g)
        out, heavy = cpu_decode_attention(rows, buffer_k[:, :n], buffer_v[:, :n], 0.125, floor=0.0)
        reference_weights = torch.softmax(rows.double() @ buffer_k[:, :n].double().transpose(1, 2) * 0.125, -1)
        reference = reference_weights @ buffer_v[:, :n].double()
        torch.testing.assert_close(out.double(), reference, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(scattered(heavy, n), reference_weights, atol=1e-7, rtol=1e-5)
        # with a floor: exactly the keys at or above it, with their weights
        floor = float(reference_weights.max()) / 2
        _, heavy = cpu_decode_attention(rows, buffer_k[:, :n], buffer_v[:, :n], 0.125, floor=floor)
        assert heavy[0].shape[2] < n or n < CHUNK  # a few slots a chunk, not one per key
        torch.testing.assert_close(scattered(heavy, n), torch.where(reference_weights >= floor, reference_weights, 0.0),
                                   atol=1e-7, rtol=1e-5)
        # host arrays (bf16 as uint16 bits): the same attention and its log-sum-exp, for merging
        host_k, host_v = (x.view(torch.int16).numpy().view(np.uint16) if dtype == torch.bfloat16 else x.numpy()
                          for x in (buffer_k.contiguous(), buffer_v.contiguous()))
        out, lse, heavy = host_attention_with_lse(rows.numpy(), host_k, host_v, n, 0.125, floor=0.0)
        torch.testing.assert_close(scattered(heavy, n), reference_weights, atol=1e-7, rtol=1e-5)
        torch.testing.assert_close(torch.from_numpy(out).double(), reference, atol=2e-6, rtol=1e-5)
        reference_lse = torch.logsumexp(rows.double() @ buffer_k[:, :n].double().transpose(1, 2) * 0.125, -1)
        torch.testing.assert_close(torch.from_numpy(lse).double(), reference_lse, atol=1e-5, rtol=1e-6)


def scattered(heavy, n: int) -> torch.Tensor:
    """The kernel's picked keys (positions, weights) [KVH, R, slots] as dense weights [KVH, R, n]
    float64 (unused slots add 0 to key 0)."""
    import numpy as np

    at, weights = heavy
    dense = np.zeros((*at.shape[:2], n))
    for g in range(at.shape[0]):
        for r in range(at.shape[1]):
            np.add.at(dense[g, r], at[g, r], weights[g, r])
    return torch.from_numpy(dense)


@pytest.mark.parametrize("q_len", [2, 17, 64])
def test_a_question_after_the_context_is_exact_causal_attention(q_len):
    """exact_attention for a few positions at the end of a CPU cache buffer (the question read
    after a stored document): each position sees the keys up to itself — the kernel's per-row
    visible prefix — against float64 math, with chunk edges inside the question, the weights of
    the hidden keys exactly 0 (a key made huge past a position would otherwise dominate it), and
    float32 accuracy where bf16 matmuls would round every score."""
    from ra_cli.engine.dense_decode import CHUNK

    g = torch.Generator().manual_seed(q_len)
    n = 2 * CHUNK + 10  # the question's keys straddle a chunk edge
    keys = torch.randn(1, 2, n, 64, generator=g).to(torch.bfloat16)
    values = torch.randn(1, 2, n, 64, generator=g).to(torch.bfloat16)
    keys[:, :, n - q_len + 1:] *= 6  # the question's later keys: huge scores, visible to later rows only
    query = torch.randn(1, 6, q_len, 64, generator=g)
    out = exact_attention(query, keys, values, 0.125, q_offset=n - q_len)
    mask = causal_mask(q_len, n - q_len, n)
    scores = (query.double().reshape(1, 2, 3 * q_len, 64) @ keys.double().transpose(2, 3)) * 0.125
    weights = torch.softmax(scores.masked_fill(~mask.repeat(3, 1), float("-inf")), -1)
    reference = (weights @ values.double()).reshape(1, 6, q_len, 64)
    torch.testing.assert_close(out.double(), reference, atol=2e-6, rtol=1e-5)


def test_cpu_dense_decode_exp_and_fallbacks():
    """Its exp is accurate wherever a softmax can land; layouts it cannot read go to torch."""
    import numpy as np
    from numba import njit

    from ra_cli.engine.dense_decode import cpu_decode_attention, exp_nonpositive

    x = -np.concatenate([np.linspace(0, 87, 100_001), np.geomspace(1e-8, 1, 1000)]).astype(np.float32)
    got = njit(lambda v: np.array([exp_nonpositive(t) for t in v], np.float32))(x)
    exact = np.exp(x.astype(np.float64))
    np.testing.assert_allclose(got[np.abs(x) < 1], exact[np.abs(x) < 1], rtol=1.5e-7, atol=0)
    np.testing.assert_allclose(got, exact, rtol=5e-6, atol=0)
    keys = torch.randn(2, 64, 16)
    assert cpu_decode_attention(torch.randn(2, 3, 16), keys.transpose(1, 2), keys.transpose(1, 2), 0.25) is None
    assert cpu_decode_attention(torch.randn(2, 3, 16), keys.half(), keys.half(), 0.25) is None
    q = torch.randn(1, 6, 1, 16)
    transposed = torch.randn(1, 2, 16, 40).transpose(2, 3)  # rows not contiguous: torch's path, same answer
    torch.testing.assert_close(exact_attention(q, transposed, transposed, 0.25, q_offset=39),
                               exact_attention(q, transposed.contiguous(), transposed.contiguous(), 0.25, q_offset=39),
                               atol=1e-5, rtol=1e-5)


def test_dense_decode_collects_each_positions_softmax_weight():
    """Chat's citations from a dense layer: every query head's weight per position, from sinks on."""
    import numpy as np

    from ra_cli.engine.mass import AttentionMass

    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(1, 6, 1, 16, generator=g), torch.randn(1, 2, 700, 16, generator=g), torch.randn(1, 2, 700, 16)
    mass = AttentionMass(heads=6, limit=650, sinks=4)
    exact_attention(q, k, v, 0.25, q_offset=699, mass=mass)
    scores = torch.einsum("hd,hnd->hn", q[0, :, 0].double(), k[0].repeat_interleave(3, 0).double()) * 0.25
    weights = torch.softmax(scores, -1)  # query head h reads KV head h // 3
    expected = weights.sum(0).numpy()
    expected[:4] = 0
    np.testing.assert_allclose(mass.by_position(), expected[:650], atol=1e-7, rtol=1e-5)


def test_device_memory_plans_layers_in_order_and_refuses_with_what_to_do(monkeypatch):
    """The accelerator's plan (engine/device_memory.py) without an accelerator: layers fit in order
    while their bytes do, a chunk's working memory grows with the chunk, and a plan beyond the room
    names the cap and what to do (the GPU tests check the same against a real card)."""
    import ra_cli.engine.device_memory as memory
    from transformers import LlamaConfig

    from ra_cli.model.synthetic import SHAPES

    gib = memory.GIB
    assert memory.kv_bytes(131072, 8, 128, 2) == gib // 2  # Llama-3-8B: half a GiB of keys and values a layer at 128K
    assert memory.layers_that_fit([3, 3, 3], 7) == 2 and memory.layers_that_fit([3, 3], 2) == 0
    assert memory.layers_that_fit([1, 5, 1], 4) == 1  # in order: a later small layer does not jump the queue
    fields = {k: v for k, v in SHAPES["llama-3-8b"].items() if k != "model_type"}
    config = LlamaConfig(**fields)
    small, large = (memory.prefill_reserve(config, chunk, 2, gib // 2) for chunk in (512, 2048))
    assert gib < small < large < 4 * gib  # the slack, the streamed layer, the scores, then the activations
    monkeypatch.setattr(memory, "room", lambda device: 3 * gib)
    monkeypatch.setitem(memory._cap, 0, 24 * gib)
    monkeypatch.setattr(memory, "device_index", lambda device: 0)
    memory.check_fits(torch.device("cuda"), 2 * gib, "full attention over 8 tokens", "use less")  # fits
    with pytest.raises(memory.DoesNotFit, match=r"^full attention over 131,072 tokens needs 16\.5 GB on the accelerator "
                                                r"and 3\.0 GB free under --gpu-mem-gb 24; use --attention retrieval$"):
        memory.check_fits(torch.device("cuda"), int(16.5 * gib), "full attention over 131,072 tokens", "use --attention retrieval")
