"""`flat`: exact top-k by inner product over every indexed key (the reference; scans 100%)."""

from __future__ import annotations

import numpy as np
import torch

from ra_cli.index.base import SearchResult, outputs


class FlatLayerIndex:
    kind = "flat"
    default_ef = 0

    def __init__(self, keys: np.ndarray):
        self.keys = keys  # [KVH, n, D] float32
        self.n = keys.shape[1]
        self.heads = None

    def grow(self, keys: np.ndarray, n: int) -> None:
        self.keys = keys[:, :n]
        self.n = n

    def search(self, queries: np.ndarray, k: int, ef: int | None = None, extra=None) -> SearchResult:
        heads, count, dim = queries.shape
        ids, scores, evaluations = outputs(heads, count, k)
        if self.n == 0:
            return SearchResult(ids, scores, evaluations)
        kv_heads = self.keys.shape[0]
        groups = heads // kv_heads
        keys = torch.from_numpy(np.ascontiguousarray(self.keys))
        rows = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).reshape(kv_heads, groups * count, dim)
        all_scores = torch.matmul(rows, keys.transpose(-1, -2)).reshape(heads, count, -1)
        take = min(k, self.n)
        top = torch.topk(all_scores, take, dim=-1)
        ids[..., :take] = top.indices.numpy()
        scores[..., :take] = top.values.numpy()
        evaluations[:] = self.n
        return SearchResult(ids, scores, evaluations)
