"""What every index shares: parameters, the indexed range, search results, key access."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from ra_cli.choices import IndexKind
from ra_cli.errors import RaError



KINDS = tuple(kind.value for kind in IndexKind)


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
    slots: int = 128  # most co-selected keys per key that the build weighs as neighbours
    link_span: int = 3  # a prefill query's list links each key to the next this many of its ranks
    # a co-selected candidate is dropped when a kept neighbour is nearer to it than this share of
    # its squared distance to the key (build_kernels.assemble_adjacency)
    occlusion: float = 0.83
    clusters: int = 64  # router centroids of prefill queries
    entries_per_cluster: int = 8
    route: int = 2  # clusters whose entries seed one search
    target_recall: float = 0.95  # ef is calibrated per layer to reach this on held-out queries
    # Retrieval budgets whose softmax-mass coverage ingest measures per layer (chat picks one).
    # 800 and 1600: a 32K-trained model's diffuse layers need them (Qwen2.5 at 16K: top-800 on every
    # layer lifted `ra eval` agreement 0.966 -> 0.971); on a CPU such layers often go dense anyway.
    budgets: tuple = (100, 200, 300, 400, 800, 1600)
    # hnsw baseline (hnswlib)
    hnsw_m: int = 16
    hnsw_ef_construction: int = 200
    hnsw_centered: bool = True  # subtract the key mean: same ranking, far easier for a key graph

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "IndexParams":
        """Parameters read back from a store (untrusted): each must have its field's type and a
        sane range, since searches and builds size arrays and loops from them."""
        defaults = cls()
        known = {}
        for name, value in data.items():
            if name not in cls.__dataclass_fields__:
                continue  # a parameter of another version
            default = getattr(defaults, name)
            if isinstance(default, bool):
                ok = isinstance(value, bool)
            elif isinstance(default, int):
                ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 1 << 20
            elif isinstance(default, float):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1
            elif isinstance(default, tuple):
                ok = isinstance(value, (list, tuple)) and all(isinstance(v, int) and 0 < v <= 1 << 20 for v in value)
                value = tuple(value) if ok else value
            else:
                ok = isinstance(value, str)
            if not ok:
                raise RaError(f"index parameter {name}={value!r} is not valid; the context is damaged — ingest again")
            known[name] = value
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

    def pools(self, groups: int, ef: int, k: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Candidate pools of the lockstep search, kept between calls (packed int64 entries):
        kept [heads, groups, >= ef], todo [heads, groups, 4 ef + 8], and the answer's candidates
        best [heads, groups, >= 2k + width] (width: the graph's row length; see pools.make_room)."""
        pools = getattr(self, "_pools", None)
        candidates = 2 * k + width
        if pools is None or pools[0].shape[1] != groups or pools[0].shape[2] < ef or pools[2].shape[2] < candidates:
            ef = max(ef, 0 if pools is None else pools[0].shape[2])
            candidates = max(candidates, 0 if pools is None else pools[2].shape[2])
            pools = (np.empty((self.heads, groups, ef), np.int64), np.empty((self.heads, groups, 4 * ef + 8), np.int64),
                     np.empty((self.heads, groups, candidates), np.int64))
            self._pools = pools
        return pools


class LayerIndex:
    """Search over one layer's indexed keys `keys` [KVH, >= n, D] float32 (id i = position lo + i).
    Subclasses fill a result in `_search` and link keys that arrive later in `_insert`."""

    kind = ""
    default_ef = 0
    n = 0
    keys: np.ndarray

    def search(self, queries: np.ndarray, k: int, ef: int | None = None, extra: np.ndarray | None = None,
               ordered: int | None = None) -> SearchResult:
        """The top-k keys by inner product of each query [H, q, D]: ids best first (-1 padding),
        raw scores and distance evaluations. ef: beam width (None: the index's own); extra [H, X]
        int32: more entry points per head (e.g. what the previous decode step found); ordered: only
        this many of the best need come first and in order (None: all), the rest may follow in any
        order — attention does not care, and sorting is not free."""
        heads, count, _ = queries.shape
        result = SearchResult(*outputs(heads, count, k))
        if self.n > 0 and k > 0:
            self._search(np.ascontiguousarray(queries, dtype=np.float32), k, self.beam(ef, k), extra, result,
                         k if ordered is None else ordered)
        return result

    def beam(self, ef: int | None, k: int) -> int:
        """The beam width a search uses: asked for, else the index's own; at least k unless the
        index keeps the best k of every key it scores (then the beam only sets the effort)."""
        return max(ef or self.default_ef, k)

    def grow(self, keys: np.ndarray, n: int) -> None:
        """Index keys [self.n, n) of `keys` (which holds at least n keys per KV head)."""
        if n > self.n:
            self._insert(keys, n)
            self.n = n
        self.keys = keys

    def _search(self, queries, k, ef, extra, result: SearchResult, ordered: int) -> None:
        raise NotImplementedError

    def _insert(self, keys: np.ndarray, n: int) -> None:
        raise NotImplementedError


def kv_head_of(heads: int, kv_heads: int) -> np.ndarray:
    """The KV head each query head reads under grouped-query attention (int64 [heads])."""
    return np.arange(heads, dtype=np.int64) // (heads // kv_heads)


def bitset_words(n: int) -> int:
    return max(1, (n + 63) // 64)


def outputs(heads: int, queries: int, k: int):
    return (np.full((heads, queries, k), -1, np.int32), np.full((heads, queries, k), -np.inf, np.float32),
            np.zeros((heads, queries), np.int64))
