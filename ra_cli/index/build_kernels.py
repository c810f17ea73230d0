"""numba kernels that turn prefill queries' exact top-k lists into an attention-aware graph.

Edges come from co-selection: two keys that sit next to each other in some prefill query's ranked
top-k list are likely to be retrieved together by a decode query. Each key keeps a bounded table of
candidate neighbours with co-selection counts (the Space-Saving heavy-hitters algorithm, so memory
is O(n · slots) however long the prefill runs); the graph keeps each key's most frequent ones,
plus a few nearest keys by L2 from its own neighbourhood so that keys no query selected stay
reachable.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ra_cli.index.kernels import link_into


@njit(cache=True, nogil=True, inline="always")
def _bump(table_ids, table_counts, row, node, weight):
    """Space-Saving update of one row: count `node`, evicting the rarest entry when full."""
    slots = table_ids.shape[1]
    rarest = 0
    for s in range(slots):
        current = table_ids[row, s]
        if current == node:
            table_counts[row, s] += weight
            return
        if current < 0:
            table_ids[row, s] = node
            table_counts[row, s] = weight
            return
        if table_counts[row, s] < table_counts[row, rarest]:
            rarest = s
    table_ids[row, rarest] = node
    table_counts[row, rarest] += weight


@njit(cache=True, nogil=True, parallel=True)
def absorb_lists(lists, table_ids, table_counts):
    """lists [H, q, L] int32 (best first, -1 padded) -> co-selection counts per query head.

    Consecutive ranks of a list are linked both ways: a chain through the keys one query wanted.
    """
    heads = lists.shape[0]
    for h in prange(heads):
        for i in range(lists.shape[1]):
            for r in range(lists.shape[2] - 1):
                a = lists[h, i, r]
                b = lists[h, i, r + 1]
                if a < 0 or b < 0:
                    break
                _bump(table_ids[h], table_counts[h], a, b, 1)
                _bump(table_ids[h], table_counts[h], b, a, 1)


@njit(cache=True, nogil=True, parallel=True)
def assemble_adjacency(table_ids, table_counts, knn_all, kv_of_head, n, learned, adjacency):
    """adjacency [H, n, M] (int32, -1 = empty): per key its `learned` most co-selected neighbours,
    then its L2 nearest keys (knn_all [KVH, n, NK]). Keys left without an incoming edge get one from
    their nearest key, so every key is reachable."""
    heads = table_ids.shape[0]
    width = adjacency.shape[2]
    slots = table_ids.shape[2]
    for h in prange(heads):
        knn = knn_all[kv_of_head[h]]
        for i in range(n):
            row = adjacency[h, i]
            row[:] = -1
            order = np.argsort(-table_counts[h, i])
            filled = 0
            for s in range(slots):
                j = table_ids[h, i, order[s]]
                if j < 0 or j >= n or j == i:
                    continue
                row[filled] = j
                filled += 1
                if filled == learned:
                    break
            for s in range(knn.shape[1]):
                j = knn[i, s]
                if j < 0 or j >= n or j == i or filled == width:
                    continue
                duplicate = False
                for t in range(filled):
                    if row[t] == j:
                        duplicate = True
                        break
                if not duplicate:
                    row[filled] = j
                    filled += 1
        indegree = np.zeros(n, np.int32)
        for i in range(n):
            for s in range(width):
                j = adjacency[h, i, s]
                if j >= 0:
                    indegree[j] += 1
        for i in range(n):
            if indegree[i] > 0:
                continue
            for s in range(knn.shape[1]):
                source = knn[i, s]
                if 0 <= source < n and source != i:
                    link_into(adjacency[h, source], i)
                    break
