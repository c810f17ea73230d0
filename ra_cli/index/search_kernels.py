"""numba kernels for single-query graph search: best-first beam search by inner product with
counted evaluations (hnswlib's algorithm over its parsed graph, and linking new keys in).

Graphs are fixed-width adjacency arrays [n, M] of ids (int32 with -1 padding, or uint16 with 65535
padding when n < 65535; rows are filled from the left). Every search has its own visited bitset
(n/8 bytes: 16 KB at 128K keys, so it stays in L1/L2 while an epoch-stamped array of n words
would miss the cache at every check; clearing it costs one memset per search). The search ra's
index runs at decode, one KV head's graph by all its query heads at once, is group_search.py.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ra_cli.intrinsics import widen
from ra_cli.engine.dense_decode import HEAD_DIM

NO_ID = -1


@njit(cache=True, inline="always", fastmath=True)
def dot(a, b):
    """a · b for float32 or bfloat16-bits (uint16) vectors: host KV kept in the store's bf16 halves
    the bytes every random row read moves, and widening is exact (same scores as a float32 copy)."""
    total = np.float32(0.0)
    if a.shape[0] == HEAD_DIM:  # a constant trip count: LLVM unrolls one vector pass, no remainder loop
        for i in range(HEAD_DIM):
            total += widen(a[i]) * widen(b[i])
        return total
    for i in range(a.shape[0]):
        total += widen(a[i]) * widen(b[i])
    return total


@njit(cache=True, nogil=True, inline="always")
def _seen(visited, node):
    return (visited[node >> 6] >> (node & 63)) & 1


@njit(cache=True, nogil=True, inline="always")
def _mark(visited, node):
    visited[node >> 6] |= np.int64(1) << (node & 63)


@njit(cache=True, nogil=True, inline="always")
def _pool_insert(pool_scores, pool_ids, pool_done, size, ef, score, node):
    """Insert into the pool (sorted best first, at most ef entries); returns (size, position),
    position == ef when the score did not make it in."""
    if size == ef and score <= pool_scores[size - 1]:
        return size, ef
    low, high = 0, size
    while low < high:
        middle = (low + high) >> 1
        if pool_scores[middle] >= score:
            low = middle + 1
        else:
            high = middle
    last = min(size, ef - 1)
    for t in range(last, low, -1):
        pool_scores[t] = pool_scores[t - 1]
        pool_ids[t] = pool_ids[t - 1]
        pool_done[t] = pool_done[t - 1]
    pool_scores[low] = score
    pool_ids[low] = node
    pool_done[low] = False
    return min(size + 1, ef), low


@njit(cache=True, nogil=True, fastmath=True)
def beam_search(query, keys, adjacency, n_valid, entries, ef, k, visited, out_ids, out_scores):
    """Best-first search for the k keys of largest inner product with `query`.

    The candidate pool holds the ef best keys seen so far, sorted; the best one not yet expanded
    is expanded next; search ends when every pooled key is expanded (the beam search of HNSW's
    layer 0 / DiskANN, kept in one sorted array instead of two heaps: fewer unpredictable
    branches). keys [n, D] float32; adjacency [n, M]; only ids < n_valid exist; visited: an int64
    bitset of at least n_valid bits, cleared here. Writes
    out_ids/out_scores (k, best first, -1/-inf padding) and returns the distance evaluations.
    """
    width = adjacency.shape[1]
    pool_scores = np.empty(ef, np.float32)
    pool_ids = np.empty(ef, np.int32)
    pool_done = np.zeros(ef, np.bool_)
    batch = np.empty(width, np.int64)
    batch_scores = np.empty(width, np.float32)
    visited[: (n_valid + 63) >> 6] = 0
    size = 0
    evaluations = 0
    for e in range(entries.shape[0]):
        node = entries[e]
        if node < 0 or node >= n_valid or _seen(visited, node):
            continue
        _mark(visited, node)
        evaluations += 1
        size, _ = _pool_insert(pool_scores, pool_ids, pool_done, size, ef, dot(query, keys[node]), node)
    cursor = 0
    unvisited = 0
    while True:
        while cursor < size:
            if pool_done[cursor]:
                cursor += 1
                continue
            pool_done[cursor] = True
            node = pool_ids[cursor]
            # Collect the unvisited neighbours first, then score them in one pass: independent
            # loads let the CPU overlap the cache misses of many key rows.
            fresh = 0
            for j in range(width):
                neighbor = adjacency[node, j]
                # padding is -1 (int32) or the dtype's max (uint16): both end the row
                if neighbor < 0 or neighbor >= n_valid:
                    break
                if _seen(visited, neighbor):
                    continue
                _mark(visited, neighbor)
                batch[fresh] = neighbor
                fresh += 1
            for j in range(fresh):
                batch_scores[j] = dot(query, keys[batch[j]])
            evaluations += fresh
            earliest = ef
            for j in range(fresh):
                size, position = _pool_insert(pool_scores, pool_ids, pool_done, size, ef, batch_scores[j], batch[j])
                if position < earliest:
                    earliest = position
            if earliest < cursor:
                cursor = earliest
        # Every pooled key is expanded. If the pool still has room, the part of the graph
        # reachable from the entries is exhausted: go on from an unvisited key, so that
        # ef >= n is an exact search even on a disconnected graph.
        if size >= ef:
            break
        while unvisited < n_valid and _seen(visited, unvisited):
            unvisited += 1
        if unvisited >= n_valid:
            break
        _mark(visited, unvisited)
        evaluations += 1
        size, position = _pool_insert(pool_scores, pool_ids, pool_done, size, ef,
                                      dot(query, keys[unvisited]), unvisited)
        cursor = min(cursor, position)
    for i in range(k):
        if i < size:
            out_ids[i] = pool_ids[i]
            out_scores[i] = pool_scores[i]
        else:
            out_ids[i] = NO_ID
            out_scores[i] = -np.inf
    return evaluations


@njit(cache=True, nogil=True)
def _descend(query, keys, entry, levels, upper_rows, upper_links):
    """hnswlib's greedy descent through the upper layers (ef = 1). Returns (entry, evaluations)."""
    current = entry
    best = dot(query, keys[current])
    evaluations = 1
    for level in range(levels[current], 0, -1):
        changed = True
        while changed:
            changed = False
            row = upper_rows[current]
            for j in range(upper_links.shape[2]):
                neighbor = upper_links[row, level - 1, j]
                if neighbor < 0:
                    break
                score = dot(query, keys[neighbor])
                evaluations += 1
                if score > best:
                    best = score
                    current = neighbor
                    changed = True
            if changed:
                row = upper_rows[current]
    return current, evaluations


@njit(cache=True, parallel=True, nogil=True)
def search_heads_hnsw(queries, keys, kv_of_head, base_links, n_valid, entry_point, levels, upper_rows, upper_links,
                      ef, k, visited, out_ids, out_scores, out_evals):
    """hnswlib's search re-implemented over its own parsed graph, so evaluations can be counted:
    greedy descent through upper layers, then the same beam search at layer 0. One graph per KV
    head (hnswlib indexes keys only): arrays are indexed by kv_of_head[h]."""
    heads = queries.shape[0]
    for h in prange(heads):
        g = kv_of_head[h]
        key_set = keys[g]
        start = np.empty(1, np.int32)
        for i in range(queries.shape[1]):
            node, descent = _descend(queries[h, i], key_set, entry_point[g], levels[g], upper_rows[g], upper_links[g])
            start[0] = node
            # the descent already evaluated `node`; beam_search evaluates it once more, so subtract it
            out_evals[h, i] = descent - 1 + beam_search(queries[h, i], key_set, base_links[g], n_valid, start, ef, k,
                                                        visited[h], out_ids[h, i], out_scores[h, i])
