"""`flat`: exact top-k by inner product over every indexed key (the reference; scans 100%)."""

from __future__ import annotations

import numpy as np
import torch

from ra_cli.engine.attention import grouped_scores
from ra_cli.index.base import LayerIndex, SearchResult
from ra_cli.store import widened


class FlatLayerIndex(LayerIndex):
    kind = "flat"

    def __init__(self, keys: np.ndarray, n: int | None = None):
        self.keys = keys  # [KVH, >= n, D] float32 or bf16 bits
        self.n = keys.shape[1] if n is None else n

    def _insert(self, keys: np.ndarray, n: int) -> None:
        pass  # an exact scan needs no structure: search reads keys [0, n)

    def _search(self, queries, k, ef, extra, result: SearchResult, ordered: int) -> None:
        keys = np.ascontiguousarray(widened(self.keys[:, : self.n]))
        scores = grouped_scores(torch.from_numpy(queries), torch.from_numpy(keys))
        take = min(k, self.n)
        top = torch.topk(scores, take, dim=-1)
        result.ids[..., :take] = top.indices.numpy()
        result.scores[..., :take] = top.values.numpy()
        result.evaluations[:] = self.n
