"""Sparse prefill: exact over what it attends to, exactly full prefill when its budget covers
everything, and the graph's training lists drawn from the attended keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import LIGHTHOUSE
from ra_cli.engine.attention import causal_mask, exact_attention
from ra_cli.engine.sparse import BlockMeans, SparsePrefill, sparse_chunk_attention

POLICY = SparsePrefill(sinks=20, window=64, block=16, blocks=3, sub_chunk=8)


def chunk(seed=0, heads=6, kv_heads=2, n=400, count=48, dim=16):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, kv_heads, n, dim, generator=g)
    values = torch.randn(1, kv_heads, n, dim, generator=g)
    query = torch.randn(1, heads, count, dim, generator=g) * 2
    return query, keys, values, n - count


def test_sparse_chunk_is_exact_attention_over_the_positions_it_keeps():
    query, keys, values, offset = chunk()
    out, kept = sparse_chunk_attention(query, keys, values, 0.25, offset, BlockMeans(), POLICY)
    assert kept.shape[0] == 2 and (torch.diff(kept, dim=1) > 0).all()  # ascending, no repeats
    for g in range(2):
        positions = set(kept[g].tolist())
        assert set(range(POLICY.sinks)) <= positions  # the sinks
        assert set(range(offset - POLICY.window, offset + query.shape[2])) <= positions  # window and chunk
        middle = positions - set(range(32)) - set(range((offset - POLICY.window) // 16 * 16, offset + query.shape[2]))
        assert len(middle) == POLICY.blocks * POLICY.block and all(p % 16 == 0 for p in sorted(middle)[::16])
    reference = []
    for h in range(6):
        mask = causal_mask(query.shape[2], offset, keys.shape[2])
        hidden = torch.ones(keys.shape[2], dtype=torch.bool)
        hidden[kept[h // 3]] = False
        mask[:, hidden] = False
        scores = (query[0, h] @ keys[0, h // 3].T * 0.25).masked_fill(~mask, float("-inf"))
        reference.append(torch.softmax(scores, -1) @ values[0, h // 3])
    torch.testing.assert_close(out[0], torch.stack(reference), atol=1e-5, rtol=1e-5)


def test_a_budget_covering_everything_is_full_attention():
    query, keys, values, offset = chunk(seed=1)
    wide = SparsePrefill(sinks=20, window=64, block=16, blocks=100, sub_chunk=8)
    assert sparse_chunk_attention(query, keys, values, 0.25, offset, BlockMeans(), wide) == (None, None)


def test_collector_ranks_the_attended_keys_of_a_sparse_chunk(tmp_path):
    from ra_cli.index.base import IndexParams, indexed_range
    from ra_cli.index.collect import PrefillCollector

    query, keys, values, offset = chunk(seed=2, n=448, count=64)
    params = IndexParams(sinks=10, window=32, list_size=12, query_stride=5, final_stride=3, knn=4, knn_window=32)
    collector = PrefillCollector(tmp_path, keys.shape[2], [None], 6, 2, 16, params, resume=False)
    _, kept = sparse_chunk_attention(query, keys, values, 0.25, offset, BlockMeans(), POLICY)
    collector.observe(0, query, keys, offset, 0, 0.25, kept)
    lo, hi = indexed_range(keys.shape[2], params)
    sampled = [(slot, p) for slot, p in enumerate(collector.sample_positions()) if offset <= p < offset + 64]
    assert sampled
    for slot, position in sampled:
        for h in range(6):
            candidates = [int(p) for p in kept[h // 3] if lo <= p < hi and p <= position]
            scores = keys[0, h // 3, candidates] @ query[0, h, position - offset]
            expected = [candidates[i] - lo for i in torch.argsort(scores, descending=True, stable=True)[:12].tolist()]
            assert collector.lists[0][h, slot, : len(expected)].tolist() == expected, (h, position)


def test_sparse_ingest_with_a_full_budget_stores_exactly_the_full_prefill(tmp_path, loaded, monkeypatch):
    from ra_cli import ingest as ingest_module
    from ra_cli.document import load_document
    from ra_cli.ingest import IngestOptions, ingest
    from ra_cli.store import ContextStore

    path = tmp_path / "doc.txt"
    path.write_text(LIGHTHOUSE * 8)
    full = ingest(loaded, load_document(path), tmp_path / "full.idx", IngestOptions(chunk_size=64, prefill="full"))
    monkeypatch.setattr(ingest_module, "sparse_policy", lambda options: SparsePrefill(sinks=32, window=64, block=16,
                                                                                      blocks=1000, sub_chunk=16))
    notices = []
    sparse = ingest(loaded, load_document(path), tmp_path / "sparse.idx", IngestOptions(chunk_size=64, prefill="sparse"),
                    on_notice=notices.append)
    a, b = ContextStore.open(full.path), ContextStore.open(sparse.path)
    assert b.manifest["ingest"]["prefill"] == "sparse" and a.manifest["ingest"]["prefill"] == "full"
    for layer in (0, 15, 29):
        np.testing.assert_array_equal(a.keys(layer), b.keys(layer))
    monkeypatch.setattr(ingest_module, "sparse_policy", lambda options: SparsePrefill(sinks=32, window=64, block=16,
                                                                                      blocks=2, sub_chunk=16))
    narrow = ingest(loaded, load_document(path), tmp_path / "narrow.idx", IngestOptions(chunk_size=64, prefill="sparse"))
    c = ContextStore.open(narrow.path)
    assert not np.array_equal(np.asarray(a.keys(29)), np.asarray(c.keys(29)))  # a narrow budget really is sparse
    np.testing.assert_array_equal(np.asarray(a.keys(29))[:, :128], np.asarray(c.keys(29))[:, :128])  # not before it starts


@pytest.mark.parametrize("prefill", ["full", "sparse"])
def test_an_ingest_holding_its_kv_in_the_store_stores_and_indexes_exactly_what_a_float32_cache_does(
        tmp_path, loaded_fast, monkeypatch, prefill):
    """The default CPU model (bf16 KV): the store's bf16 KV, widened where attention reads it,
    gives the bits a float32 copy of it gave — KV and every index file."""
    from ra_cli import ingest as ingest_module
    from ra_cli.document import load_document
    from ra_cli.ingest import IngestOptions, ingest
    from ra_cli.store import ContextStore

    path = tmp_path / "doc.txt"
    path.write_text(LIGHTHOUSE * 8)
    monkeypatch.setattr(ingest_module, "sparse_policy", lambda options: SparsePrefill(sinks=32, window=64, block=16,
                                                                                      blocks=2, sub_chunk=16))
    options = IngestOptions(chunk_size=64, prefill=prefill)
    loaded = loaded_fast
    assert ingest_module.kv_in_store(loaded, "bfloat16")
    in_store = ingest(loaded, load_document(path), tmp_path / "store.idx", options)
    monkeypatch.setattr(ingest_module, "kv_in_store", lambda loaded, kv_dtype: False)
    copied = ingest(loaded, load_document(path), tmp_path / "copy.idx", options)
    a, b = ContextStore.open(in_store.path), ContextStore.open(copied.path)
    assert a.manifest["ingest"]["prefill"] == prefill and a.n_tokens > 256
    digests = {name: entry["sha256"] for name, entry in a.manifest["files"].items()}
    assert digests == {name: entry["sha256"] for name, entry in b.manifest["files"].items()}
    assert any(name.startswith("index/graph_") for name in digests) and any(name.startswith("kv/") for name in digests)
