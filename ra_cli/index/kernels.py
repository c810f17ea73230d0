"""numba kernels for graph search: best-first beam search by inner product, counted evaluations.

Graphs are fixed-width adjacency arrays [n, M] of ids (int32 with -1 padding, or uint16 with 65535
padding when n < 65535; rows are filled from the left). One search runs per
(query head, query); heads run in parallel threads (prange, nogil), each with its own epoch-stamped
visited array so nothing of size n is cleared between searches.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

NO_ID = -1


@njit(cache=True, inline="always")
def _dot(a, b):
    total = np.float32(0.0)
    for i in range(a.shape[0]):
        total += a[i] * b[i]
    return total


@njit(cache=True)
def _heap_push_max(keys, ids, size, key, node):
    """Max-heap on keys (best candidate first)."""
    i = size
    keys[i] = key
    ids[i] = node
    while i > 0:
        parent = (i - 1) >> 1
        if keys[parent] >= keys[i]:
            break
        keys[parent], keys[i] = keys[i], keys[parent]
        ids[parent], ids[i] = ids[i], ids[parent]
        i = parent
    return size + 1


@njit(cache=True)
def _heap_pop_max(keys, ids, size):
    size -= 1
    keys[0] = keys[size]
    ids[0] = ids[size]
    i = 0
    while True:
        left = 2 * i + 1
        if left >= size:
            break
        best = left
        if left + 1 < size and keys[left + 1] > keys[left]:
            best = left + 1
        if keys[i] >= keys[best]:
            break
        keys[i], keys[best] = keys[best], keys[i]
        ids[i], ids[best] = ids[best], ids[i]
        i = best
    return size


@njit(cache=True)
def _heap_push_min(keys, ids, size, key, node):
    i = size
    keys[i] = key
    ids[i] = node
    while i > 0:
        parent = (i - 1) >> 1
        if keys[parent] <= keys[i]:
            break
        keys[parent], keys[i] = keys[i], keys[parent]
        ids[parent], ids[i] = ids[i], ids[parent]
        i = parent
    return size + 1


@njit(cache=True)
def _heap_pop_min(keys, ids, size):
    size -= 1
    keys[0] = keys[size]
    ids[0] = ids[size]
    i = 0
    while True:
        left = 2 * i + 1
        if left >= size:
            break
        best = left
        if left + 1 < size and keys[left + 1] < keys[left]:
            best = left + 1
        if keys[i] <= keys[best]:
            break
        keys[i], keys[best] = keys[best], keys[i]
        ids[i], ids[best] = ids[best], ids[i]
        i = best
    return size


@njit(cache=True)
def beam_search(query, keys, adjacency, n_valid, entries, ef, k, visited, epoch, out_ids, out_scores):
    """Best-first search for the k keys of largest inner product with `query`.

    keys [n, D] float32; adjacency [n, M] int32; only ids < n_valid exist; entries: start ids.
    Writes out_ids/out_scores (k, best first; -1/-inf padding) and returns the number of
    distance evaluations.
    """
    width = adjacency.shape[1]
    cap = ef + 1
    res_keys = np.empty(cap, np.float32)
    res_ids = np.empty(cap, np.int32)
    res_size = 0
    cand_cap = max(64, 4 * ef)
    cand_keys = np.empty(cand_cap, np.float32)
    cand_ids = np.empty(cand_cap, np.int32)
    cand_size = 0
    evaluations = 0
    for e in range(entries.shape[0]):
        node = entries[e]
        if node < 0 or node >= n_valid or visited[node] == epoch:
            continue
        visited[node] = epoch
        score = _dot(query, keys[node])
        evaluations += 1
        if cand_size == cand_cap:
            cand_keys = np.concatenate((cand_keys, np.empty(cand_cap, np.float32)))
            cand_ids = np.concatenate((cand_ids, np.empty(cand_cap, np.int32)))
            cand_cap *= 2
        cand_size = _heap_push_max(cand_keys, cand_ids, cand_size, score, node)
        res_size = _heap_push_min(res_keys, res_ids, res_size, score, node)
        if res_size > ef:
            res_size = _heap_pop_min(res_keys, res_ids, res_size)
    cursor = 0
    while True:
        while cand_size > 0:
            best_score = cand_keys[0]
            node = cand_ids[0]
            if res_size >= ef and best_score < res_keys[0]:
                break
            cand_size = _heap_pop_max(cand_keys, cand_ids, cand_size)
            for j in range(width):
                neighbor = adjacency[node, j]
                # padding is -1 (int32) or the dtype's max (uint16): both end the row
                if neighbor < 0 or neighbor >= n_valid:
                    break
                if visited[neighbor] == epoch:
                    continue
                visited[neighbor] = epoch
                score = _dot(query, keys[neighbor])
                evaluations += 1
                if res_size < ef or score > res_keys[0]:
                    if cand_size == cand_cap:
                        cand_keys = np.concatenate((cand_keys, np.empty(cand_cap, np.float32)))
                        cand_ids = np.concatenate((cand_ids, np.empty(cand_cap, np.int32)))
                        cand_cap *= 2
                    cand_size = _heap_push_max(cand_keys, cand_ids, cand_size, score, neighbor)
                    res_size = _heap_push_min(res_keys, res_ids, res_size, score, neighbor)
                    if res_size > ef:
                        res_size = _heap_pop_min(res_keys, res_ids, res_size)
        # The beam ran dry with room left in the results: the part of the graph reachable from the
        # entries is exhausted. Continue from an unvisited key, so that ef >= n is exact search.
        if res_size >= ef:
            break
        while cursor < n_valid and visited[cursor] == epoch:
            cursor += 1
        if cursor >= n_valid:
            break
        visited[cursor] = epoch
        score = _dot(query, keys[cursor])
        evaluations += 1
        cand_size = 0
        cand_size = _heap_push_max(cand_keys, cand_ids, cand_size, score, cursor)
        res_size = _heap_push_min(res_keys, res_ids, res_size, score, cursor)
    # results: min-heap -> sorted best first
    order = np.argsort(-res_keys[:res_size])
    for i in range(k):
        if i < res_size:
            out_ids[i] = res_ids[order[i]]
            out_scores[i] = res_keys[order[i]]
        else:
            out_ids[i] = NO_ID
            out_scores[i] = -np.inf
    return evaluations


@njit(cache=True, parallel=True, nogil=True)
def search_heads(queries, keys, kv_of_head, adjacency, n_valid, entries, ef, k, visited, epochs,
                 out_ids, out_scores, out_evals):
    """queries [H, q, D]; keys [KVH, n, D]; adjacency [H, n, M]; entries [H, E]; visited [H, n]
    uint32 with epochs [H] advanced here. Outputs [H, q, k] ids/scores and [H, q] evaluations."""
    heads = queries.shape[0]
    for h in prange(heads):
        key_set = keys[kv_of_head[h]]
        for i in range(queries.shape[1]):
            epochs[h] += 1
            out_evals[h, i] = beam_search(queries[h, i], key_set, adjacency[h], n_valid, entries[h], ef, k,
                                          visited[h], epochs[h], out_ids[h, i], out_scores[h, i])


@njit(cache=True, nogil=True)
def _route(query, centroids, entries, route, chosen):
    """Pick the `route` centroids most similar to the query; returns their entry ids, flattened."""
    clusters = centroids.shape[0]
    sims = np.empty(clusters, np.float32)
    for c in range(clusters):
        sims[c] = _dot(query, centroids[c])
    order = np.argsort(-sims)
    width = entries.shape[1]
    for r in range(route):
        for e in range(width):
            chosen[r * width + e] = entries[order[r], e]
    return clusters


@njit(cache=True, parallel=True, nogil=True)
def search_heads_routed(queries, keys, kv_of_head, adjacency, n_valid, centroids, entries, route, ef, k,
                        visited, epochs, out_ids, out_scores, out_evals):
    """Graph search where each query first picks its entry points through a router: the centroids
    [H, C, D] of prefill queries, each with entry keys [H, C, E]. Router dot products count as
    evaluations."""
    heads = queries.shape[0]
    for h in prange(heads):
        key_set = keys[kv_of_head[h]]
        chosen = np.empty(route * entries.shape[2], np.int32)
        for i in range(queries.shape[1]):
            epochs[h] += 1
            routed = _route(queries[h, i], centroids[h], entries[h], route, chosen)
            out_evals[h, i] = routed + beam_search(queries[h, i], key_set, adjacency[h], n_valid, chosen, ef, k,
                                                   visited[h], epochs[h], out_ids[h, i], out_scores[h, i])


@njit(cache=True, nogil=True)
def _descend(query, keys, entry, levels, upper_rows, upper_links):
    """hnswlib's greedy descent through the upper layers (ef = 1). Returns (entry, evaluations)."""
    current = entry
    best = _dot(query, keys[current])
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
                score = _dot(query, keys[neighbor])
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
                      ef, k, visited, epochs, out_ids, out_scores, out_evals):
    """hnswlib's search re-implemented over its own parsed graph, so evaluations can be counted:
    greedy descent through upper layers, then the same beam search at layer 0. One graph per KV
    head (hnswlib indexes keys only): arrays are indexed by kv_of_head[h]."""
    heads = queries.shape[0]
    for h in prange(heads):
        g = kv_of_head[h]
        key_set = keys[g]
        start = np.empty(1, np.int32)
        for i in range(queries.shape[1]):
            epochs[h] += 1
            node, descent = _descend(queries[h, i], key_set, entry_point[g], levels[g], upper_rows[g], upper_links[g])
            start[0] = node
            # the descent already evaluated `node`; beam_search evaluates it once more, so subtract it
            out_evals[h, i] = descent - 1 + beam_search(queries[h, i], key_set, base_links[g], n_valid, start, ef, k,
                                                        visited[h], epochs[h], out_ids[h, i], out_scores[h, i])


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
                weights[j] = _dot(queries[h, i], keys[g, node]) * scaling
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


@njit(cache=True, parallel=True, nogil=True)
def insert_nodes(keys, kv_of_graph, adjacency, first, last, ef, visited, epochs):
    """Link keys [first, last) into graphs adjacency [G, capacity, M] (int32, writable) that hold
    keys [0, first): each new key searches the graph with its own vector, keeps the best hits as
    neighbours plus its predecessor, and every neighbour gets an edge back (its weakest slot is
    overwritten when full)."""
    graphs = adjacency.shape[0]
    width = adjacency.shape[2]
    for g in prange(graphs):
        key_set = keys[kv_of_graph[g]]
        found = np.empty(width, np.int32)
        scores = np.empty(width, np.float32)
        entries = np.empty(2, np.int32)
        for t in range(first, last):
            row = adjacency[g, t]
            row[:] = -1
            filled = 0
            if t > 0:
                epochs[g] += 1
                entries[0] = t - 1
                entries[1] = 0
                beam_search(key_set[t], key_set, adjacency[g], t, entries, max(ef, width), width - 1, visited[g],
                            epochs[g], found, scores)
                for j in range(width - 1):
                    if found[j] >= 0:
                        row[filled] = found[j]
                        filled += 1
                predecessor_known = False
                for j in range(filled):
                    if row[j] == t - 1:
                        predecessor_known = True
                if not predecessor_known:
                    row[filled] = t - 1
                    filled += 1
            for j in range(filled):
                u = row[j]
                slot = width - 1
                for s in range(width):
                    if adjacency[g, u, s] < 0:
                        slot = s
                        break
                adjacency[g, u, slot] = t
