"""numba kernel of the CPU half of retrieval attention: softmax over each query's retrieved keys."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ra_cli.index.search_kernels import dot


@njit(cache=True, parallel=True, nogil=True)
def attend_retrieved(queries, keys, values, kv_of_head, ids, scaling, out, lse):
    """Softmax attention of queries [H, q, D] over their own retrieved keys (ids [H, q, k], -1 =
    none) of keys/values [KVH, n, D]: writes out [H, q, Dv] and the log-sum-exp [H, q] (-inf when
    nothing was retrieved) so the result merges exactly with the static part."""
    heads, count, _ = queries.shape
    width = ids.shape[2]
    for h in prange(heads):
        g = kv_of_head[h]
        weights = np.empty(width, np.float32)
        for i in range(count):
            best = -np.inf
            for j in range(width):
                node = ids[h, i, j]
                if node < 0:
                    weights[j] = -np.inf
                    continue
                weights[j] = dot(queries[h, i], keys[g, node]) * scaling
                if weights[j] > best:
                    best = weights[j]
            for d in range(out.shape[2]):
                out[h, i, d] = 0.0
            if best == -np.inf:
                lse[h, i] = -np.inf
                continue
            total = np.float32(0.0)
            for j in range(width):
                node = ids[h, i, j]
                if node < 0:
                    continue
                w = np.exp(weights[j] - best)
                total += w
                row = values[g, node]
                for d in range(out.shape[2]):
                    out[h, i, d] += w * row[d]
            for d in range(out.shape[2]):
                out[h, i, d] /= total
            lse[h, i] = best + np.log(total)
