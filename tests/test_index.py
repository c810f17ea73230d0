"""Search indexes: exactness limits, valid results, recall on the real model, persistence, corruption."""

from __future__ import annotations

import json
import numpy as np
import pytest

from conftest import LIGHTHOUSE
from ra_cli.document import load_document
from ra_cli.errors import RaError
from ra_cli.index import IndexParams, open_layer_index
from ra_cli.index.base import indexed_range
from ra_cli.index.flat import FlatLayerIndex
from ra_cli.index.graph import GraphLayer, GraphLayerIndex, build_graph_layer, recall
from ra_cli.index.group_search import worker_plan
from ra_cli.index.pools import MIN_ENTRY, keep_best, select_top
from ra_cli.index.hnsw import HnswLayerIndex, build_hnsw_file, parse_hnsw_file
from ra_cli.ingest import IngestOptions, ingest
from ra_cli.store import ContextStore


def synthetic_layer(seed=0, heads=4, kv_heads=2, n=700, dim=16, samples=160):
    """Keys with a shared offset (like real keys) and queries pointing against it."""
    rng = np.random.default_rng(seed)
    keys = (rng.standard_normal((kv_heads, n, dim)) + 3.0).astype(np.float32)
    queries = (rng.standard_normal((heads, samples, dim)) - 1.0).astype(np.float32)
    params = IndexParams(list_size=20, clusters=8, degree=12, knn=4, query_stride=1)
    lists = FlatLayerIndex(keys).search(queries, params.list_size).ids
    knn = np.full((kv_heads, n, params.knn), -1, np.int32)
    for g in range(kv_heads):
        d = ((keys[g][:, None] - keys[g][None]) ** 2).sum(-1)
        d[np.triu_indices(n)] = np.inf  # only earlier keys, as in streaming
        knn[g, 1:] = np.argsort(d, axis=1)[1:, : params.knn]
    held_out = np.zeros(samples, bool)  # every query trains the graph
    layer = build_graph_layer(lists, queries.astype(np.float16), knn, held_out, keys, params=params)
    return keys, queries, layer, params


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_flat_is_the_exact_top_k_of_the_first_n_keys(dtype):
    """Against a float64 ranking of the keys as stored (bf16 bits widened exactly), with grouped
    query heads, several query positions and keys past n that must not be read."""
    import torch

    from ra_cli.intrinsics import bf16_bits

    rng = np.random.default_rng(3)
    keys = torch.from_numpy(rng.standard_normal((2, 2600, 64)).astype(np.float32))
    keys[:, 2500:] = 50 * keys[:, :100].abs()  # past n: read, they would take top slots
    keys = keys.to(torch.bfloat16)
    stored = bf16_bits(keys) if dtype == "bfloat16" else keys.float().numpy()
    queries = rng.standard_normal((6, 3, 64)).astype(np.float32)
    found = FlatLayerIndex(stored, 2500).search(queries, 40)
    wide = keys.double().numpy()[:, :2500]
    for h in range(6):
        scores = queries[h].astype(np.float64) @ wide[h // 3].T  # [3, 2500]
        for i in range(3):
            assert sorted(found.ids[h, i]) == sorted(np.argsort(-scores[i])[:40])
            np.testing.assert_allclose(found.scores[h, i], scores[i][found.ids[h, i]], rtol=1e-5, atol=1e-5)
    assert (found.evaluations == 2500).all()


def test_graph_is_exact_when_ef_covers_every_key():
    keys, queries, layer, params = synthetic_layer()
    index = GraphLayerIndex(layer, keys, params)
    exact = FlatLayerIndex(keys).search(queries, 30)
    found = index.search(queries, 30, ef=keys.shape[1])
    np.testing.assert_array_equal(found.ids, exact.ids)
    np.testing.assert_allclose(found.scores, exact.scores, rtol=1e-5)


@pytest.mark.parametrize("k,ef", [(200, 32), (30, 64), (30, 700)])
def test_decode_answers_are_the_same_keys_with_only_the_lead_in_order(k, ef):
    """Decode asks for its best CARRY keys in order and the rest in any order (sorting is not
    free): the same keys and scores as a fully ordered answer."""
    keys, queries, layer, params = synthetic_layer(seed=2)
    index = GraphLayerIndex(layer, keys, params)
    ordered = index.search(queries[:, :12], k, ef=ef)
    lead = index.search(queries[:, :12], k, ef=ef, ordered=8)
    np.testing.assert_array_equal(lead.ids[..., :8], ordered.ids[..., :8])
    np.testing.assert_array_equal(np.sort(lead.ids, -1), np.sort(ordered.ids, -1))
    np.testing.assert_array_equal(np.sort(lead.scores, -1), np.sort(ordered.scores, -1))
    np.testing.assert_array_equal(lead.evaluations, ordered.evaluations)
    if k > ef:  # every key the search met is answered: past the lead they come in pool order
        assert not (np.diff(lead.scores[..., 8:], axis=-1) <= 0).all()


def test_a_wide_answer_is_the_k_best_of_every_key_the_search_scored():
    """k > ef: every key scored is a candidate, cut back to its k best whenever the buffer fills
    (at k = 40 a search here reads several hundred keys). The traversal does not depend on k, so
    an answer wide enough to hold every key read, cut to its k best, is the reference."""
    keys, queries, layer, params = synthetic_layer(seed=3)
    index = GraphLayerIndex(layer, keys, params)
    every = index.search(queries[:, :12], keys.shape[1], ef=32)
    cut = index.search(queries[:, :12], 40, ef=32)
    assert (every.evaluations == cut.evaluations).all() and every.evaluations.min() > 2 * 40 + params.degree
    np.testing.assert_array_equal(cut.ids, every.ids[..., :40])
    np.testing.assert_array_equal(cut.scores, every.scores[..., :40])


def test_candidate_buffer_cuts_to_the_k_best():
    entries = np.random.default_rng(0).permutation(5000).astype(np.int64) * 7 - 9000
    k = 37
    best, size, floor = np.empty((1, k + 1), np.int64), np.zeros(1, np.int64), np.full(1, MIN_ENTRY, np.int64)
    for entry in entries:
        keep_best(0, entry, k, best, size, floor)
    if size[0] > k:
        select_top(best[0], size[0], k)
    np.testing.assert_array_equal(np.sort(best[0, :k]), np.sort(entries)[-k:])


def test_worker_plan_balances_kv_heads_over_threads():
    """3 KV heads on 2 threads: the head that read most last time searches alone."""
    heads = lambda plan: [[int(g) for g in row if g >= 0] for row in plan]  # noqa: E731
    assert heads(worker_plan(np.array([966.0, 1193.0, 764.0]), 2)) == [[1], [0, 2]]
    assert heads(worker_plan(np.ones(2), 2)) == [[0], [1]] and heads(worker_plan(np.ones(3), 1)) == [[0, 1, 2]]
    reads = np.array([5.0, 1.0, 4.0, 2.0, 3.0])
    plan = heads(worker_plan(reads, 2))
    assert sorted(g for row in plan for g in row) == [0, 1, 2, 3, 4]
    assert sorted(reads[row].sum() for row in plan) == [7.0, 8.0]


def test_hnsw_is_exact_when_ef_covers_every_key(tmp_path):
    keys, queries, _, _ = synthetic_layer(seed=1)
    graphs = []
    for g in range(keys.shape[0]):
        build_hnsw_file(keys[g], tmp_path / f"h{g}.bin", IndexParams(kind="hnsw", hnsw_m=8))
        graphs.append(parse_hnsw_file(tmp_path / f"h{g}.bin", keys.shape[2]))
    index = HnswLayerIndex(graphs, keys, heads=queries.shape[0])
    exact = FlatLayerIndex(keys).search(queries, 30)
    np.testing.assert_array_equal(index.search(queries, 30, ef=keys.shape[1]).ids, exact.ids)


def test_hnsw_counted_search_matches_hnswlib(tmp_path):
    import hnswlib

    keys, queries, _, _ = synthetic_layer(seed=2, n=2000)
    params = IndexParams(kind="hnsw", hnsw_m=8, hnsw_centered=False)
    build_hnsw_file(keys[0], tmp_path / "h.bin", params)
    ours = HnswLayerIndex([parse_hnsw_file(tmp_path / "h.bin", keys.shape[2])], keys[:1], heads=1)
    reference = hnswlib.Index(space="ip", dim=keys.shape[2])
    reference.load_index(str(tmp_path / "h.bin"))
    for ef in (20, 60):
        reference.set_ef(ef)
        labels, _ = reference.knn_query(queries[0], k=10)
        found = ours.search(queries[:1], 10, ef=ef)
        assert (found.ids[0] == labels).mean() > 0.99
        assert found.evaluations.min() > 10  # hnswlib counts nothing; we do


@pytest.mark.parametrize("ef", [16, 40])
def test_results_are_valid(ef):
    keys, queries, layer, params = synthetic_layer(seed=3)
    result = GraphLayerIndex(layer, keys, params).search(queries, 12, ef=ef)
    for h in range(queries.shape[0]):
        for i in range(queries.shape[1]):
            ids = result.ids[h, i]
            assert len(set(ids.tolist())) == len(ids) and (ids >= 0).all()
            assert np.all(np.diff(result.scores[h, i]) <= 0)
            np.testing.assert_allclose(result.scores[h, i], keys[h // 2][ids] @ queries[h, i], rtol=1e-5)
    assert (result.evaluations > 0).all() and (result.evaluations <= keys.shape[1] + params.clusters).all()


def test_graph_beats_a_random_guess_on_synthetic_data():
    keys, queries, layer, params = synthetic_layer(seed=4)
    found = GraphLayerIndex(layer, keys, params).search(queries, 20, ef=40)
    assert recall(found.ids, FlatLayerIndex(keys).search(queries, 20).ids) > 0.9


@pytest.fixture(scope="module")
def indexed_context(tmp_path_factory, loaded):
    """A ~1.6K-token real context: about 900 indexed keys per KV head."""
    path = tmp_path_factory.mktemp("idx") / "doc.txt"
    path.write_text((LIGHTHOUSE + "\n") * 15 + "The museum opens from May to September.\n" * 3)
    doc = load_document(path)
    out = path.parent / "ctx.idx"
    ingest(loaded, doc, out, IngestOptions(chunk_size=256, index=IndexParams(kind="graph", sinks=64, window=128)))
    return out


def test_real_model_recall_and_manifest(indexed_context, loaded):
    store = ContextStore.open(indexed_context, loaded.fingerprint)
    section = store.manifest["index"]
    lo, hi = section["lo"], section["hi"]
    assert (lo, hi) == indexed_range(store.n_tokens, IndexParams(sinks=64, window=128))
    assert hi - lo > 800 and set(section["layers"]) == {str(i) for i in range(30)}
    from ra_cli.bench.recall import capture_decode_queries

    question = loaded.tokenizer("Who was the keeper of the lighthouse in 1902, and what did he keep?",
                                add_special_tokens=False).input_ids
    layers = (3, 15, 27)
    queries, _ = capture_decode_queries(loaded, store, question, list(layers), hi, lo)
    for layer in layers:
        entry = section["layers"][str(layer)]
        assert entry["validation_recall"] >= 0.9 and 16 <= entry["ef"] <= 512
        index = open_layer_index(store, layer)
        keys = np.asarray(store.keys(layer)[:, lo:hi])
        exact = FlatLayerIndex(keys).search(queries[layer], 100)
        found = index.search(queries[layer], 100)  # the calibrated ef: what chat uses
        assert recall(found.ids, exact.ids) >= 0.9
        assert found.evaluations.mean() < 0.8 * (hi - lo)
        assert recall(index.search(queries[layer], 100, ef=hi - lo).ids, exact.ids) == 1.0


def test_reopened_index_gives_identical_results(indexed_context, loaded, tmp_path):
    import shutil

    copy = tmp_path / "copy.idx"
    shutil.copytree(indexed_context, copy)
    a = open_layer_index(ContextStore.open(indexed_context), 15)
    b = open_layer_index(ContextStore.open(copy), 15)
    probe = np.random.default_rng(0).standard_normal((9, 16, 64)).astype(np.float32)
    ra_, rb = a.search(probe, 40), b.search(probe, 40)
    np.testing.assert_array_equal(ra_.ids, rb.ids)
    np.testing.assert_array_equal(ra_.evaluations, rb.evaluations)
    assert isinstance(b.layer.adjacency, np.memmap)


def test_index_is_deterministic(indexed_context, loaded, tmp_path):
    out = tmp_path / "again.idx"
    first = json.loads((indexed_context / "manifest.json").read_text())
    # same document bytes -> same files, bit for bit
    src = next(p for p in indexed_context.parent.iterdir() if p.suffix == ".txt")
    ingest(loaded, load_document(src), out, IngestOptions(chunk_size=256, index=IndexParams(kind="graph", sinks=64, window=128)))
    second = json.loads((out / "manifest.json").read_text())
    for name in ("index/graph_015.npy", "index/router_015.npy", "index/entries_015.npy"):
        assert first["files"][name]["sha256"] == second["files"][name]["sha256"]


def test_corrupted_index_file_is_rejected(indexed_context, tmp_path):
    import shutil

    copy = tmp_path / "bad.idx"
    shutil.copytree(indexed_context, copy)
    target = copy / "index" / "graph_007.npy"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(RaError, match="index/graph_007.npy fails its checksum"):
        ContextStore.open(copy)


def test_hnsw_and_flat_contexts(tmp_path, loaded):
    path = tmp_path / "doc.txt"
    path.write_text((LIGHTHOUSE + "\n") * 10)
    doc = load_document(path)
    for kind in ("hnsw", "flat"):
        out = tmp_path / f"{kind}.idx"
        ingest(loaded, doc, out, IngestOptions(chunk_size=512, index=IndexParams(kind=kind, sinks=32, window=64)))
        store = ContextStore.open(out, loaded.fingerprint)
        index = open_layer_index(store, 10)
        lo, hi = store.manifest["index"]["lo"], store.manifest["index"]["hi"]
        probe = np.random.default_rng(1).standard_normal((9, 4, 64)).astype(np.float32)
        exact = FlatLayerIndex(np.asarray(store.keys(10)[:, lo:hi])).search(probe, 20)
        assert recall(index.search(probe, 20, ef=hi - lo).ids, exact.ids) == 1.0
        if kind == "hnsw":
            target = out / "index" / "hnsw_010_1.bin"
            target.write_bytes(target.read_bytes()[:-4] + b"\x00\x00\x00\x01")
            with pytest.raises(RaError, match="hnsw_010_1.bin fails its checksum"):
                ContextStore.open(out)


def test_collector_streams_exact_lists_and_neighbours(tmp_path):
    """Fed chunk by chunk, the collector records each sampled query's exact causal top-k and each
    key's exact L2 neighbours within its band and the band before (brute-force references)."""
    import torch

    from ra_cli.index.collect import PrefillCollector

    rng = np.random.default_rng(3)
    n, heads, kv_heads, dim = 700, 4, 2, 8
    params = IndexParams(sinks=10, window=50, knn=4, knn_window=32, list_size=6, query_stride=7, final_stride=3)
    keys = rng.standard_normal((kv_heads, n, dim)).astype(np.float32)
    queries = rng.standard_normal((heads, n, dim)).astype(np.float32)
    collector = PrefillCollector(tmp_path, n, [None], heads, kv_heads, dim, params, resume=False)
    for start in range(0, n, 97):
        end = min(n, start + 97)
        collector.observe(0, torch.from_numpy(queries[None, :, start:end]), torch.from_numpy(keys[None, :, :end]),
                          start, 0, 1.0)
    lo, hi = indexed_range(n, params)
    band = params.knn_window
    for g, i in np.ndindex(kv_heads, n):
        if not lo <= i < hi:
            continue
        first = max(lo, lo + (i - lo) // band * band - band)
        distances = ((keys[g, first:i] - keys[g, i]) ** 2).sum(-1)
        expected = (np.argsort(distances, kind="stable")[: params.knn] + first - lo).tolist()
        got = collector.knn[0][g, i - lo].tolist()
        assert got == expected + [-1] * (params.knn - len(expected)), (g, i)
    for slot, position in enumerate(collector.sample_positions()):
        for h in range(heads):
            visible = min(hi, position + 1)
            scores = keys[h // (heads // kv_heads), lo:visible] @ queries[h, position]
            expected = np.argsort(-scores, kind="stable")[: params.list_size].tolist()
            got = collector.lists[0][h, slot].tolist()
            assert got == expected + [-1] * (params.list_size - len(expected)), (h, position)


def test_recall_counts_hits_against_truth_ignoring_padding():
    found = np.array([[[1, 2, 3], [7, -1, -1]]])
    truth = np.array([[[3, 4, 1], [7, 8, -1]]])
    assert recall(found, truth) == 3 / 5


def test_collector_top_lists_agree_between_cpu_kernel_and_device_path():
    """The GPU path (torch matmul + masked topk) and the CPU path (blocked numba selection) pick
    the same lists; both run on CPU tensors here."""
    import torch

    from ra_cli.index.collect import ROWS_PER_BLOCK, top_lists

    generator = torch.Generator().manual_seed(5)
    kv_heads, groups, count, n = 3, 3, 2 * ROWS_PER_BLOCK // 3 + 5, 900
    rows = torch.randn(kv_heads, groups * count, 16, generator=generator)
    candidates = torch.randn(kv_heads, n, 16, generator=generator)
    visible = np.sort(np.random.default_rng(5).integers(1, n + 1, count))
    visible[0] = 7  # fewer visible keys than the list holds: padded with -1
    visible = np.tile(visible, groups)
    cpu = top_lists(rows, candidates, visible, 40, kernel=True)
    device = top_lists(rows, candidates, visible, 40, kernel=False)
    np.testing.assert_array_equal(cpu, device)
    assert (cpu[:, 0, 7:] == -1).all() and (cpu[:, 0, :7] >= 0).all()


def test_cluster_entries_are_each_clusters_most_named_keys():
    from ra_cli.index.graph import cluster_entries

    tops = np.array([[5, 2], [5, 9], [2, -1], [7, 7], [3, 4], [4, 3]])
    assign = np.array([0, 0, 0, 2, 1, 1])
    entries = cluster_entries(tops, assign, clusters=3, width=2)
    # cluster 0 names 5 and 2 twice, 9 once; cluster 1 ties 3 and 4; cluster 2 names only 7
    np.testing.assert_array_equal(entries, [[2, 5], [3, 4], [7, -1]])


def test_co_selection_links_each_rank_to_the_next_span_ranks():
    from ra_cli.index.build_kernels import co_selection

    lists = np.array([[[0, 1, 2, 3, -1], [2, 3, -1, -1, -1]]], np.int32)  # one graph, two queries
    for parts in (1, 2, 3):  # how the work is split must not change the counts
        ids = np.full((1, 4, 8), -1, np.int32)
        counts = np.zeros((1, 4, 8), np.int32)
        co_selection(lists, 4, 2, parts, ids, counts)
        # ranks at most 2 apart, both ways; 2-3 sit together in both lists; most first, then by id
        np.testing.assert_array_equal(ids[0, :, :3], [[1, 2, -1], [0, 2, 3], [3, 0, 1], [2, 1, -1]])
        np.testing.assert_array_equal(counts[0, :, :3], [[1, 1, 0], [1, 1, 1], [2, 1, 1], [2, 1, 0]])
    ids = np.full((1, 4, 1), -1, np.int32)
    counts = np.zeros((1, 4, 1), np.int32)
    co_selection(lists, 4, 2, 2, ids, counts)  # one slot: each key's most co-selected
    np.testing.assert_array_equal(ids[0, :, 0], [1, 0, 3, 2])


def test_adjacency_drops_a_candidate_that_a_nearer_neighbour_already_leads_to():
    from ra_cli.index.build_kernels import assemble_adjacency

    # key 0 at the origin; co-selected with 1 (at 1), 2 (at 2, behind 1) and 3 (at -1.5, the other way)
    keys = np.zeros((1, 5, 2), np.float32)
    keys[0, :4, 0] = [0.0, 1.0, 2.0, -1.5]
    keys[0, 4] = [0.0, 9.0]
    ids = np.full((1, 5, 4), -1, np.int32)
    ids[0, 0, :3] = [2, 3, 1]  # most co-selected first (co_selection's order): not the order kept
    knn = np.full((1, 5, 1), -1, np.int32)
    knn[0, 0, 0] = 4

    def row(occlusion):
        adjacency = np.full((1, 5, 6), -1, np.int32)
        assemble_adjacency(ids, knn, keys, 5, 4, occlusion, adjacency)
        return adjacency[0, 0].tolist()

    # nearest first; |1 - 2|^2 = 1 < 0.83 x |0 - 2|^2: the way to 2 goes through 1, so 2 is dropped;
    # 3 lies the other way (|1 - 3|^2 = 6.25 > 0.83 x 2.25). Then the L2 neighbour 4; the successor
    # (1) is there already
    assert row(0.83) == [1, 3, 4, -1, -1, -1]
    assert row(0.0) == [1, 3, 2, 4, -1, -1]  # no pruning: every candidate, nearest first


@pytest.mark.parametrize("start", [None, 96, 256, 512])
def test_calibrate_ef_finds_the_smallest_sufficient_beam_from_any_start(start):
    from ra_cli.index.base import SearchResult
    from ra_cli.index.graph import calibrate_ef

    truth = np.arange(100)[None, None, :].repeat(4, 1)

    class BeamIndex:  # finds ef // 3 of the true top-100: 0.95 needs ef >= 285 -> 384
        def __init__(self):
            self.searched = []

        def search(self, probe, k, ef):
            self.searched.append(ef)
            found = np.where(np.arange(k) < min(k, ef // 3), np.arange(k), -1)[None, None, :].repeat(4, 1)
            return SearchResult(found, np.zeros(found.shape, np.float32), np.full((1, 4), ef))

    index = BeamIndex()
    ef, measured, evaluations = calibrate_ef(index, None, truth, 0.95, start)
    assert (ef, measured, evaluations) == (384, 1.0, 384.0)
    assert len(index.searched) == len(set(index.searched))
    never = calibrate_ef(BeamIndex(), None, truth, 1.01, start)
    assert never[0] == 512
