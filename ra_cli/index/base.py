"""What every index shares: parameters, the indexed range, search results, key access."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

KINDS = ("graph", "hnsw", "flat")


@dataclass
class IndexParams:
    kind: str = "graph"
    sinks: int = 128  # first tokens kept on the device, never indexed
    window: int = 512  # last tokens of the stored context kept on the device, never indexed
    # graph
    degree: int = 24  # adjacency width M: learned co-selection edges + L2 neighbours
    knn: int = 8  # L2 neighbours per key (reachability for keys no query selected)
    knn_window: int = 128  # L2 neighbours are searched among this many preceding keys
    list_size: int = 64  # exact top-k keys per sampled prefill query
    query_stride: int = 16  # every stride-th prefill query is sampled...
    final_stride: int = 2  # ...and every 2nd of the final window (they see every indexed key)
    slots: int = 32  # co-selection candidates tracked per key while building
    clusters: int = 64  # router centroids of prefill queries
    entries_per_cluster: int = 8
    route: int = 2  # clusters whose entries seed one search
    target_recall: float = 0.95  # ef is calibrated per layer to reach this on held-out queries
    # Retrieval budgets whose softmax-mass coverage ingest measures per layer (chat picks one)
    budgets: tuple = (100, 200, 300, 400)
    # hnsw baseline (hnswlib)
    hnsw_m: int = 16
    hnsw_ef_construction: int = 200
    hnsw_centered: bool = True  # subtract the key mean: same ranking, far easier for a key graph

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "IndexParams":
        known = {key: value for key, value in data.items() if key in cls.__dataclass_fields__}
        if "budgets" in known:
            known["budgets"] = tuple(known["budgets"])
        return cls(**known)


def indexed_range(n_tokens: int, params: IndexParams) -> tuple[int, int]:
    """Positions [lo, hi) that live in the index; the rest is the static set."""
    lo = min(params.sinks, n_tokens)
    hi = max(lo, n_tokens - params.window)
    return lo, hi


@dataclass
class SearchResult:
    ids: np.ndarray  # [H, q, k] int32, indexed ids (position - lo), -1 where fewer found
    scores: np.ndarray  # [H, q, k] float32 raw q.k, best first
    evaluations: np.ndarray  # [H, q] int64 distance evaluations (router + graph)


@dataclass
class SearchBuffers:
    """Per-layer scratch reused across searches: one visited bitset per head (int64 words)."""

    heads: int
    n: int
    visited: np.ndarray = field(init=False)

    def __post_init__(self):
        self.visited = np.zeros((self.heads, bitset_words(self.n)), np.int64)

    def grow(self, n: int) -> None:
        if bitset_words(n) > self.visited.shape[1]:
            self.visited = np.zeros((self.heads, max(bitset_words(n), 2 * self.visited.shape[1])), np.int64)


def bitset_words(n: int) -> int:
    return max(1, (n + 63) // 64)


def outputs(heads: int, queries: int, k: int):
    return (np.full((heads, queries, k), -1, np.int32), np.full((heads, queries, k), -np.inf, np.float32),
            np.zeros((heads, queries), np.int64))


def float32_keys(keys: np.ndarray, kv_dtype: str) -> np.ndarray:
    """Keys [KVH, n, D] as float32 (numba has no half types): a view when already float32."""
    if kv_dtype == "float32":
        return keys
    if kv_dtype == "bfloat16":
        return (np.asarray(keys, dtype=np.uint32) << 16).view(np.float32)
    return np.asarray(keys, dtype=np.float32)
