"""`flat`: exact top-k by inner product over every indexed key (the reference; scans 100%)."""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from ra_cli.index.base import LayerIndex, SearchResult, kv_head_of
from ra_cli.index.search_kernels import dot

BLOCK = 1024  # keys per work item: each row is read once for every query of its KV head


@njit(cache=True, parallel=True, nogil=True, fastmath=True)
def all_scores(queries, keys, kv_of_head, n, out):
    """out[h, i, j] = queries[h, i] · keys[kv_of_head[h], j] for every key j < n: queries [H, q, D]
    float32, keys [KVH, >= n, D] float32 or bf16 bits (widened in registers: no float32 copy of
    the keys is made, which for bf16 cost more than the scores themselves)."""
    kv_heads, heads, count = keys.shape[0], queries.shape[0], queries.shape[1]
    blocks = (n + BLOCK - 1) // BLOCK
    for item in prange(kv_heads * blocks):
        g, first = item // blocks, (item % blocks) * BLOCK
        for j in range(first, min(n, first + BLOCK)):
            row = keys[g, j]
            for h in range(heads):
                if kv_of_head[h] == g:
                    for i in range(count):
                        out[h, i, j] = dot(queries[h, i], row)


def exact_scores(queries: np.ndarray, keys: np.ndarray, n: int) -> np.ndarray:
    """q·k of queries [H, q, D] against the first n keys [KVH, >= n, D] (float32 or bf16 bits) of
    each query head's KV head: [H, q, n] float32 (all_scores, allocated)."""
    heads, count = queries.shape[:2]
    scores = np.empty((heads, count, n), np.float32)
    all_scores(np.ascontiguousarray(queries, np.float32), keys, kv_head_of(heads, keys.shape[0]), n, scores)
    return scores


class FlatLayerIndex(LayerIndex):
    kind = "flat"

    def __init__(self, keys: np.ndarray, n: int | None = None):
        self.keys = keys  # [KVH, >= n, D] float32 or bf16 bits
        self.n = keys.shape[1] if n is None else n

    def _insert(self, keys: np.ndarray, n: int) -> None:
        pass  # an exact scan needs no structure: search reads keys [0, n)

    def _search(self, queries, k, ef, extra, result: SearchResult, ordered: int) -> None:
        take = min(k, self.n)
        top = torch.topk(torch.from_numpy(exact_scores(queries, self.keys, self.n)), take, dim=-1)
        result.ids[..., :take] = top.indices.numpy()
        result.scores[..., :take] = top.values.numpy()
        result.evaluations[:] = self.n
