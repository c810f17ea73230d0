"""numba kernel of the CPU half of retrieval attention: softmax over each query's retrieved keys."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ra_cli.engine.dense_decode import exp_nonpositive
from ra_cli.index.search_kernels import dot
from ra_cli.intrinsics import prefetch, widen


@njit(cache=True, parallel=True, nogil=True, fastmath=True)
def attend_retrieved(queries, keys, values, kv_of_head, ids, scaling, out, lse):
    """Softmax attention of queries [H, q, D] over their own retrieved keys (ids [H, q, k], -1 =
    none) of keys/values [KVH, n, D] (float32 or bf16 bits): writes out [H, q, Dv] and the log-sum-exp [H, q] (-inf when
    nothing was retrieved) so the result merges exactly with the static part."""
    heads, count, _ = queries.shape
    width = ids.shape[2]
    for h in prange(heads):
        g = kv_of_head[h]
        weights = np.empty(width, np.float32)
        nodes = np.empty(width, np.int64)
        for i in range(count):
            best = -np.inf
            found = 0
            for j in range(width):
                if ids[h, i, j] < 0:
                    continue
                nodes[found] = ids[h, i, j]
                weights[found] = dot(queries[h, i], keys[g, nodes[found]]) * scaling
                best = max(best, weights[found])
                found += 1
            for d in range(out.shape[2]):
                out[h, i, d] = 0.0
            if found == 0:
                lse[h, i] = -np.inf
                continue
            total = np.float32(0.0)
            for j in range(found):  # a loop of its own: exp_nonpositive vectorizes here
                weights[j] = exp_nonpositive(weights[j] - best)
                total += weights[j]
            for j in range(found):
                row = values[g, nodes[j]]
                for d in range(out.shape[2]):
                    out[h, i, d] += weights[j] * widen(row[d])
            for d in range(out.shape[2]):
                out[h, i, d] /= total
            lse[h, i] = best + np.log(total)


@njit(cache=True, parallel=True, nogil=True, fastmath=True)
def attend_static_and_retrieved(queries, static_keys, static_values, static_visible, values, ids, scores, scaling, out,
                                mass, floor, first, lo, window_start):
    """Attention of queries [H, q, D] over their static keys and their retrieved keys in one softmax
    (the CPU path: both halves live in host memory, so no log-sum-exp merge is needed).

    static_keys/static_values [KVH, S, D]: query i sees the first static_visible[i] of them (sinks,
    then the window up to its own position); ids/scores [H, q, k]: retrieved ids into values [KVH,
    N, D] (float32 or bf16 bits) with their raw q·k from the search (-1 = none), reused rather than recomputed. Query head
    h reads KV head h // (H / KVH). Writes out [H, q, D].

    mass [H, M] (M = 0: off) collects each key's softmax weight at its absolute position when that
    is in [first, M) and the weight is at least `floor` (static keys [0, lo) are positions [0, lo),
    static key lo + j is position window_start + j, retrieved node n is position lo + n): chat's
    citations. Row h belongs to query head h alone, so the parallel heads never write the same cell."""
    heads, count, dim = queries.shape
    groups = heads // static_keys.shape[0]
    width = ids.shape[2]
    for h in prange(heads):
        g = h // groups
        weights = np.empty(static_keys.shape[1], np.float32)
        found = np.empty(width, np.float32)
        acc = np.empty(dim, np.float32)
        for i in range(count):
            visible = static_visible[i]
            best = -np.inf
            for j in range(visible):
                weights[j] = dot(queries[h, i], static_keys[g, j]) * scaling
                best = max(best, weights[j])
            answered = 0
            while answered < width and ids[h, i, answered] >= 0:
                prefetch(values[g, ids[h, i, answered]], 0)  # the value rows' misses overlap the static half
                found[answered] = scores[h, i, answered] * scaling
                best = max(best, found[answered])
                answered += 1
            # weights first, in loops of their own: exp_nonpositive vectorizes there (np.exp is a
            # libm call per key)
            total = np.float32(0.0)
            for j in range(visible):
                weights[j] = exp_nonpositive(weights[j] - best)
                total += weights[j]
            for j in range(answered):
                found[j] = exp_nonpositive(found[j] - best)
                total += found[j]
            acc[:] = 0.0  # a local accumulator: writes through `out` would not stay in registers
            for j in range(visible):
                w = weights[j]
                row = static_values[g, j]
                for d in range(dim):
                    acc[d] += w * row[d]
            for j in range(answered):
                w = found[j]
                row = values[g, ids[h, i, j]]
                for d in range(dim):
                    acc[d] += w * widen(row[d])
            for d in range(dim):
                out[h, i, d] = acc[d] / total if total > 0 else 0.0
            if mass.shape[1] > 0 and total > 0:
                for j in range(visible):
                    position = j if j < lo else window_start + j - lo
                    w = weights[j] / total
                    if first <= position < mass.shape[1] and w >= floor:
                        mass[h, position] += w
                for j in range(answered):
                    w = found[j] / total
                    if first <= lo + ids[h, i, j] < mass.shape[1] and w >= floor:
                        mass[h, lo + ids[h, i, j]] += w
