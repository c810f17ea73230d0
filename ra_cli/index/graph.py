"""`graph`: the attention-aware index (ours). One graph per KV head, built from the prefill queries of its query heads.

Build (per layer, once prefill is done, from PrefillCollector's work files):
1. co-selection counts: keys a few ranks apart in a prefill query's exact top-k list are linked
   (numba);
2. adjacency: each key's co-selected keys, nearest first, redundant ones pruned, + its nearest
   preceding keys by L2 + its successor, every key reachable;
3. router: k-means of the normalised prefill queries; each cluster's most selected keys are the
   entry points for decode queries that fall in it;
4. ef: the smallest beam width whose recall on held-out prefill queries (those in the final
   window, which see every indexed key) reaches the target, per layer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numba
import numpy as np
import torch

from ra_cli.buffers import with_room
from ra_cli.engine.attention import grouped_scores, static_and_top_mass
from ra_cli.index.base import IndexParams, LayerIndex, SearchBuffers, SearchResult
from ra_cli.index.build_kernels import assemble_adjacency, co_selection, insert_nodes, reachable
from ra_cli.index.group_search import search_groups_routed

EF_CANDIDATES = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
CALIBRATION_QUERIES = 32  # held-out prefill queries per head used to choose ef
# Calibrate a little above the recall wanted: the held-out prefill queries are a bit easier than
# real decode queries (measured: 0.95 on them gave 0.91-0.94 on held-out continuations).
CALIBRATION_MARGIN = 0.01
RECENT_ENTRIES = 16  # newest indexed keys seeding every search, besides the router's entries
NO_EXTRA = np.full((1, 0), -1, np.int32)
NO_NEIGHBOR_16 = np.iinfo(np.uint16).max


def adjacency_dtype(n: int):
    return np.uint16 if n < NO_NEIGHBOR_16 else np.int32


@dataclass
class GraphLayer:
    adjacency: np.ndarray  # [KVH, n, M] uint16 (65535 = empty) or int32 (-1 = empty)
    centroids: np.ndarray  # [KVH, C, D] float32
    entries: np.ndarray  # [KVH, C, E] int32
    ef: int
    selected: np.ndarray | None = None  # [KVH, ceil(n/8)] uint8 bits: keys in some sampled prefill query's list
    validation_recall: float | None = None
    validation_evaluations: float | None = None
    build_seconds: float = 0.0

    @property
    def nbytes(self) -> int:
        return self.adjacency.nbytes + self.centroids.nbytes + self.entries.nbytes


def kmeans_router(queries: np.ndarray, lists: np.ndarray, params: IndexParams, seed: int = 0):
    """Cluster normalised queries [H, s, D]; entries = each cluster's most frequent top-2 keys.
    All heads at once: a sample has keys to rank (lists[:, i, 0] >= 0) for every head or none."""
    heads, _, dim = queries.shape
    clusters = params.clusters
    centroids = np.zeros((heads, clusters, dim), np.float32)
    entries = np.full((heads, clusters, params.entries_per_cluster), -1, np.int32)
    valid = lists[0, :, 0] >= 0
    x = torch.from_numpy(np.asarray(queries)[:, valid].astype(np.float32))  # [H, s, D]
    if x.shape[1] == 0:
        return centroids, entries
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    count = min(clusters, x.shape[1])
    generator = torch.Generator().manual_seed(seed)
    start = torch.stack([torch.randperm(x.shape[1], generator=generator)[:count] for _ in range(heads)])
    centre = torch.gather(x, 1, start[..., None].expand(-1, -1, dim))
    for _ in range(5):
        assign = torch.argmax(torch.bmm(x, centre.transpose(1, 2)), dim=-1)  # [H, s]
        sums = torch.zeros_like(centre).scatter_add_(1, assign[..., None].expand(-1, -1, dim), x)
        sizes = torch.zeros(heads, count).scatter_add_(1, assign, torch.ones_like(assign, dtype=torch.float32))
        centre = torch.where(sizes[..., None] > 0, sums / sizes.clamp_min(1)[..., None], centre)
        centre = centre / centre.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    assign = torch.argmax(torch.bmm(x, centre.transpose(1, 2)), dim=-1).numpy()
    centroids[:, :count] = centre.numpy()
    for h in range(heads):
        entries[h] = cluster_entries(lists[h][valid][:, :2], assign[h], clusters, params.entries_per_cluster)
    return centroids, entries


def cluster_entries(tops: np.ndarray, assign: np.ndarray, clusters: int, width: int) -> np.ndarray:
    """Per cluster, the `width` keys that its queries' lists `tops` [s, t] name most often (ties:
    the earlier key), -1 padded: [clusters, width]."""
    entries = np.full((clusters, width), -1, np.int32)
    cluster = np.repeat(assign, tops.shape[1])
    ids = tops.reshape(-1)
    keep = ids >= 0
    if not keep.any():
        return entries
    span = int(ids.max()) + 1
    pairs, counts = np.unique(cluster[keep].astype(np.int64) * span + ids[keep], return_counts=True)
    order = np.lexsort((pairs % span, -counts, pairs // span))
    cluster, ids = pairs[order] // span, pairs[order] % span
    starts = np.searchsorted(cluster, cluster, side="left")
    rank = np.arange(len(cluster)) - starts
    chosen = rank < width
    entries[cluster[chosen], rank[chosen]] = ids[chosen]
    return entries


def build_graph_layer(lists: np.ndarray, queries: np.ndarray, knn: np.ndarray, held_out: np.ndarray,
                      keys: np.ndarray, params: IndexParams, ef_hint: int | None = None) -> GraphLayer:
    """One graph per KV head, learned from the prefill queries of all its query heads (they search
    it together: search_groups_routed). lists [H, s, L], queries [H, s, D], knn [KVH, n, NK] from
    the collector, held_out [s] bool (samples kept for calibration); keys [KVH, n, D] float32;
    ef_hint: where calibration starts."""
    started = time.perf_counter()
    heads = lists.shape[0]
    kv_heads, n, _ = keys.shape
    train = ~held_out
    # the G query heads of a KV head are consecutive: their samples become one group's rows
    group_lists = np.ascontiguousarray(lists[:, train]).reshape(kv_heads, -1, lists.shape[2])
    group_queries = np.asarray(queries[:, train]).reshape(kv_heads, -1, queries.shape[2])
    table_ids = np.full((kv_heads, n, params.slots), -1, np.int32)
    no_counts = np.zeros((kv_heads, n, 0), np.int32)  # the build reads only the order
    co_selection(group_lists, n, params.link_span, numba.get_num_threads(), table_ids, no_counts)
    adjacency = np.full((kv_heads, n, params.degree), -1, np.int32)
    assemble_adjacency(table_ids, np.ascontiguousarray(knn[:, :n]), np.ascontiguousarray(keys, dtype=np.float32), n,
                       params.degree - params.knn, params.occlusion, adjacency)
    del table_ids
    if adjacency_dtype(n) == np.uint16:
        adjacency = np.where(adjacency < 0, NO_NEIGHBOR_16, adjacency).astype(np.uint16)
    centroids, entries = kmeans_router(group_queries, group_lists, params)
    layer = GraphLayer(adjacency, centroids, entries, ef=128, selected=selected_keys(lists, kv_heads, n))
    probes = np.nonzero(held_out)[0][-CALIBRATION_QUERIES:]
    if probes.size:
        truth = np.asarray(lists[:, probes])
        probe = np.asarray(queries[:, probes]).astype(np.float32)
        layer.ef, layer.validation_recall, layer.validation_evaluations = calibrate_ef(
            GraphLayerIndex(layer, keys, params), probe, truth, min(0.995, params.target_recall + CALIBRATION_MARGIN),
            ef_hint)
    layer.build_seconds = time.perf_counter() - started
    return layer


def selected_keys(lists: np.ndarray, kv_heads: int, n: int) -> np.ndarray:
    """Bit-packed [KVH, ceil(n/8)]: the keys some sampled prefill query (training or held out) of
    the KV head's query heads ranked in its top list. The others are the rare keys: a fact stated
    once and never looked at again, which only the graph's other edges can lead a search to."""
    grouped = np.asarray(lists).reshape(kv_heads, -1)
    selected = np.zeros((kv_heads, n), bool)
    for g in range(kv_heads):
        ids = grouped[g][grouped[g] >= 0]
        selected[g, ids[ids < n]] = True
    return np.packbits(selected, axis=1)


def attention_coverage(all_keys: np.ndarray, queries: np.ndarray, positions: np.ndarray, lo: int, hi: int,
                       budgets: tuple[int, ...], scaling: float) -> dict[int, float]:
    """Mean softmax mass that the static set (positions < lo or >= hi) plus the exact top-k
    indexed keys hold, for each k in `budgets`, for queries [H, q, D] at `positions` over all_keys
    [KVH, N, D]: how well retrieval attention with budget k can do at best on this layer."""
    keys = torch.from_numpy(np.ascontiguousarray(all_keys, dtype=np.float32))
    scores = grouped_scores(torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)), keys) * scaling
    key_positions = torch.arange(keys.shape[1])
    scores.masked_fill_(key_positions[None, None, :] > torch.from_numpy(positions)[None, :, None], float("-inf"))
    return {k: float(mass.mean()) for k, mass in static_and_top_mass(scores, lo, hi, budgets).items()}


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Pooled |found ∩ truth| / |truth| over all queries (ignoring -1 padding in truth)."""
    found = found.reshape(-1, found.shape[-1])
    truth = truth.reshape(-1, truth.shape[-1])
    hits = 0
    for row in range(0, truth.shape[0], 1024):  # bounded [rows, k, k] comparison
        t, f = truth[row: row + 1024], found[row: row + 1024]
        hits += int(((t[:, :, None] == f[:, None, :]).any(-1) & (t >= 0)).sum())
    total = int((truth >= 0).sum())
    return hits / total if total else 1.0


def calibrate_ef(index, probe: np.ndarray, truth: np.ndarray, target: float, start: int | None = None):
    """Smallest ef in EF_CANDIDATES reaching `target` recall on the probe queries (recall grows
    with ef). Walks from `start` (e.g. the previous layer's choice: neighbouring layers need
    similar beams) down while the target holds, else up. Returns (ef, recall, mean evaluations)."""
    k = truth.shape[-1]
    beam = getattr(index, "beam", lambda ef, k: max(ef, k))
    candidates = sorted({beam(candidate, k) for candidate in EF_CANDIDATES})
    position = candidates.index(start) if start in candidates else 0
    tried = {}

    def trial(i):
        if i not in tried:
            result = index.search(probe, k, candidates[i])
            tried[i] = (candidates[i], recall(result.ids, truth), float(result.evaluations.mean()))
        return tried[i]

    if trial(position)[1] >= target:
        while position > 0 and trial(position - 1)[1] >= target:
            position -= 1
        return trial(position)
    while position + 1 < len(candidates):
        position += 1
        if trial(position)[1] >= target:
            break
    return trial(position)


class GraphLayerIndex(LayerIndex):
    """Search over one layer's graphs, one per KV head; keys [KVH, n, D] float32 or bf16 bits."""

    kind = "graph"

    def __init__(self, layer: GraphLayer, keys: np.ndarray, params: IndexParams, n: int | None = None):
        self.layer = layer
        self.keys = keys  # [KVH, >= n, D] float32, C-contiguous
        self.params = params
        self.kv_heads = layer.adjacency.shape[0]
        self.n = keys.shape[1] if n is None else n
        self.buffers = SearchBuffers(self.kv_heads, self.n)
        self.last_reads = np.ones(self.kv_heads)  # keys each KV head's last search read: balances the next

    @property
    def default_ef(self) -> int:
        return self.layer.ef

    def entry_points(self, g: int) -> np.ndarray:
        """Every key a search of KV head g can start from before decoding carries its own: the
        router's entries, the newest keys and key 0."""
        recent = np.arange(max(0, self.n - RECENT_ENTRIES), self.n)
        return np.unique(np.concatenate([np.asarray(self.layer.entries[g]).reshape(-1), recent, [0]]))

    def reachability(self) -> np.ndarray:
        """Fraction of the indexed keys reachable from the entry points, per KV head (BFS)."""
        return np.array([reachable(np.asarray(self.layer.adjacency[g]), self.n, self.entry_points(g)).mean()
                         for g in range(self.kv_heads)])

    def beam(self, ef: int | None, k: int) -> int:
        # the lockstep search keeps the best k of every key it scores: the beam only sets the effort
        return max(ef or self.default_ef, 1)

    def _insert(self, keys: np.ndarray, n: int) -> None:
        adjacency = self.layer.adjacency
        private = adjacency.dtype == np.int32 and not isinstance(adjacency, np.memmap)  # not the stored map
        grown = with_room(adjacency, self.n, n, axis=1, minimum=1024, fill=-1, dtype=np.int32, copy=not private)
        if adjacency.dtype == np.uint16:
            head = grown[:, : self.n]
            head[head == NO_NEIGHBOR_16] = -1
        self.layer.adjacency = grown
        self.buffers.grow(n)
        insert_nodes(keys, np.arange(self.kv_heads, dtype=np.int64), grown, self.n, n, 64, self.buffers.visited)

    def _search(self, queries, k, ef, extra, result: SearchResult, ordered: int) -> None:
        """`extra` [KVH, X] or [H, X] int32 (regrouped per KV head): more entry points."""
        search_groups_routed(*self.lockstep_arguments(queries, k, ef, extra, result, ordered))

    def lockstep_arguments(self, queries, k: int, ef: int, extra, result: SearchResult, ordered: int,
                           costs: np.ndarray | None = None) -> tuple:
        """search_groups_routed's arguments for queries [H, q, D] float32 (contiguous) writing into
        `result`; retrieval's fused kernel (retrieval/kernels.search_and_attend) takes them too, with
        its own task costs (default: each KV head's reads in the last search, which it updates)."""
        kept, todo, best = self.buffers.pools(queries.shape[0] // self.kv_heads, ef, k,
                                              self.layer.adjacency.shape[2])
        extra = NO_EXTRA if extra is None else extra.reshape(self.kv_heads, -1) if extra.shape[0] != 1 else extra
        if extra.shape[0] != self.kv_heads or extra.dtype != np.int32 or not (extra.flags.c_contiguous
                                                                               and extra.flags.writeable):
            # a fresh writable array: numba compiles the search once per argument type, and a
            # broadcast view is read-only, another type
            extra = np.array(np.broadcast_to(extra, (self.kv_heads, extra.shape[1])), dtype=np.int32, order="C")
        return (queries, self.keys, self.layer.adjacency, self.n, self.layer.centroids, self.layer.entries,
                min(self.params.route, self.layer.centroids.shape[1]), RECENT_ENTRIES, extra, ef, k, ordered,
                self.last_reads if costs is None else costs, numba.get_num_threads(), self.buffers.visited, kept, todo,
                best, result.ids, result.scores, result.evaluations)
