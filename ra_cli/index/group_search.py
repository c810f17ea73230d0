"""The graph search ra's index runs at decode: one KV head's graph searched in lockstep by its G
query heads, KV heads in parallel threads.

Pools hold packed 8-byte entries: the score's bits, made to order like the score, in the high 32
bits and the key id in the low 32, so one int64 comparison orders entries by score. Each query
head keeps a min-heap of its best `ef` entries (root = the worst kept) and a max-heap of entries
to expand; heap updates are O(log ef) where a sorted array shifts O(ef) entries per insertion
(measured: at ef 400 the heaps cost 52 ns per key read, the sorted pool 83).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ra_cli.intrinsics import prefetch
from ra_cli.index.search_kernels import NO_ID, _mark, _seen, dot


@njit(cache=True, inline="always")
def _ordered_bits(bits):
    """int32 bits of a float32 -> an int64 that orders like the float."""
    value = np.int64(bits)
    return value ^ 0x7FFFFFFF if value < 0 else value


@njit(cache=True, inline="always")
def _float_bits(ordered):
    """The inverse of _ordered_bits: a float32's int32 bits from their ordered form."""
    value = np.int32(ordered)
    return value ^ np.int32(0x7FFFFFFF) if value < 0 else value


@njit(cache=True, inline="always")
def _heap_up_max(heap, position):
    item = heap[position]
    while position > 0:
        parent = (position - 1) >> 1
        if heap[parent] >= item:
            break
        heap[position] = heap[parent]
        position = parent
    heap[position] = item


@njit(cache=True, inline="always")
def _heap_down_max(heap, size):
    item = heap[0]
    position = 0
    while True:
        child = 2 * position + 1
        if child >= size:
            break
        if child + 1 < size and heap[child + 1] > heap[child]:
            child += 1
        if heap[child] <= item:
            break
        heap[position] = heap[child]
        position = child
    heap[position] = item


@njit(cache=True, inline="always")
def _heap_up_min(heap, position):
    item = heap[position]
    while position > 0:
        parent = (position - 1) >> 1
        if heap[parent] <= item:
            break
        heap[position] = heap[parent]
        position = parent
    heap[position] = item


@njit(cache=True, inline="always")
def _heap_down_min(heap, size):
    item = heap[0]
    position = 0
    while True:
        child = 2 * position + 1
        if child >= size:
            break
        if child + 1 < size and heap[child + 1] < heap[child]:
            child += 1
        if heap[child] >= item:
            break
        heap[position] = heap[child]
        position = child
    heap[position] = item


@njit(cache=True, inline="always")
def _offer(h, entry, ef, kept, kept_size, todo, todo_size):
    """Offer a scored key to head h: kept if among its best ef, and then queued for expansion.
    When the queue is full, entries that can no longer be expanded (below the kept floor) go."""
    if kept_size[h] == ef:
        if entry <= kept[h, 0]:
            return
        kept[h, 0] = entry
        _heap_down_min(kept[h], ef)
    else:
        kept[h, kept_size[h]] = entry
        _heap_up_min(kept[h], kept_size[h])
        kept_size[h] += 1
    if todo_size[h] == todo.shape[1]:
        floor = kept[h, 0]
        size = 0
        for t in range(todo_size[h]):
            if todo[h, t] >= floor:
                todo[h, size] = todo[h, t]
                size += 1
        todo_size[h] = size
        for t in range(size):
            _heap_up_max(todo[h], t)
    todo[h, todo_size[h]] = entry
    _heap_up_max(todo[h], todo_size[h])
    todo_size[h] += 1


@njit(cache=True, inline="always")
def _keep_best(h, entry, k, best, best_size):
    """Bounded min-heap of the k best entries seen by head h (root = the k-th best)."""
    if best_size[h] == k:
        if entry > best[h, 0]:
            best[h, 0] = entry
            _heap_down_min(best[h], k)
        return
    best[h, best_size[h]] = entry
    _heap_up_min(best[h], best_size[h])
    best_size[h] += 1


@njit(cache=True, nogil=True, fastmath=True)
def search_group(queries, keys, adjacency, n_valid, entries, ef, k, lead, visited, kept, todo, best, out_ids,
                 out_scores):
    """Best-first search of one graph by G queries at once, for their top-k keys by inner product.

    queries [G, D] contiguous; keys [n, D] float32 or bf16 bits (uint16); adjacency [n, M] (-1 or the dtype's max ends a
    row); only ids < n_valid exist; entries [E] int32 (-1 = none). Each query keeps its own pools
    (kept [G, >= ef], todo [G, cap] packed int64 scratch); a key reached by any query's expansion
    is read once and scored for all G (one cache miss, G dot products), so the queries of one KV
    head share their memory traffic. The fresh neighbours of an expanded key are prefetched, then
    scored, so their DRAM misses overlap. A query stops when its best unexpanded key is worse than
    its ef-th best; when every query has stopped with room left in its pool, the search goes on
    from an unvisited key, so that ef >= n is exact even on a disconnected graph.

    The answer is each query's k best keys among *every* key scored (best [G, >= k] scratch when
    k > ef): the beam width sets how far the search explores, the attention budget k how many of
    the keys it met are kept. Writes out_ids/out_scores [G, k] (-1/-inf padded) with the best
    `lead` first and in order, the rest in any order (lead >= k: all sorted; attention needs no
    order, and sorting hundreds of entries per query head is not free); returns the keys read."""
    groups, dim = queries.shape
    width = adjacency.shape[1]
    wide = k > ef
    kept_size = np.zeros(groups, np.int64)
    todo_size = np.zeros(groups, np.int64)
    best_size = np.zeros(groups, np.int64)
    stopped = np.zeros(groups, np.bool_)
    fresh = np.empty(width, np.int64)
    score_bits = np.empty((width, groups), np.float32)
    bits = score_bits.view(np.int32)
    visited[: (n_valid + 63) >> 6] = 0
    reads = 0
    for e in range(entries.shape[0]):
        node = np.int64(entries[e])
        if node < 0 or node >= n_valid or _seen(visited, node):
            continue
        _mark(visited, node)
        reads += 1
        for h in range(groups):
            score_bits[0, h] = dot(queries[h], keys[node])
        for h in range(groups):
            entry = (_ordered_bits(bits[0, h]) << 32) | node
            _offer(h, entry, ef, kept, kept_size, todo, todo_size)
            if wide:
                _keep_best(h, entry, k, best, best_size)
    unvisited = 0
    while True:
        running = 0
        for h in range(groups):  # the round's adjacency rows start loading together, not one miss per head
            if not stopped[h] and todo_size[h] > 0:
                prefetch(adjacency[np.int64(todo[h, 0] & 0xFFFFFFFF)], 0)
        for h in range(groups):
            if stopped[h]:
                continue
            if todo_size[h] == 0 or (kept_size[h] == ef and todo[h, 0] < kept[h, 0]):
                stopped[h] = True
                continue
            running += 1
            node = np.int64(todo[h, 0] & 0xFFFFFFFF)
            todo_size[h] -= 1
            todo[h, 0] = todo[h, todo_size[h]]
            _heap_down_max(todo[h], todo_size[h])
            count = 0
            for j in range(width):
                neighbor = np.int64(adjacency[node, j])
                if neighbor < 0 or neighbor >= n_valid:
                    break
                if _seen(visited, neighbor):
                    continue
                _mark(visited, neighbor)
                prefetch(keys[neighbor], 0)
                fresh[count] = neighbor
                count += 1
            reads += count
            for j in range(count):
                row = keys[fresh[j]]
                for g in range(groups):
                    score_bits[j, g] = dot(queries[g], row)
            for j in range(count):
                for g in range(groups):
                    entry = (_ordered_bits(bits[j, g]) << 32) | fresh[j]
                    if kept_size[g] < ef or entry > kept[g, 0]:
                        _offer(g, entry, ef, kept, kept_size, todo, todo_size)
                        stopped[g] = False
                    if wide and (best_size[g] < k or entry > best[g, 0]):
                        _keep_best(g, entry, k, best, best_size)
        if running:
            continue
        short = False
        for h in range(groups):
            if kept_size[h] < ef:
                short = True
        if not short:
            break
        while unvisited < n_valid and _seen(visited, unvisited):
            unvisited += 1
        if unvisited >= n_valid:
            break
        _mark(visited, unvisited)
        reads += 1
        for h in range(groups):
            score_bits[0, h] = dot(queries[h], keys[unvisited])
        for h in range(groups):
            entry = (_ordered_bits(bits[0, h]) << 32) | unvisited
            _offer(h, entry, ef, kept, kept_size, todo, todo_size)
            if wide:
                _keep_best(h, entry, k, best, best_size)
            stopped[h] = False
    answer_bits = np.empty(k, np.int32)
    answer_scores = answer_bits.view(np.float32)
    for h in range(groups):
        size = best_size[h] if wide else kept_size[h]
        pool = best[h, :size] if wide else kept[h, :size]
        if 0 < lead < min(size, k) and size <= k:  # every pooled key is answered: order only the lead
            ranked = _lead_first(pool, lead)
        else:
            ranked = np.sort(pool)[::-1]
        for i in range(k):
            if i < size:
                out_ids[h, i] = ranked[i] & 0xFFFFFFFF
                answer_bits[i] = _float_bits(ranked[i] >> 32)  # the score as scored: no second dot product
            else:
                out_ids[h, i] = NO_ID
                answer_scores[i] = -np.inf
        out_scores[h, :] = answer_scores
    return reads


@njit(cache=True, nogil=True)
def _lead_first(pool, lead):
    """The pool's entries (distinct) with its `lead` largest first, largest first; the others
    after them in pool order. One pass keeping a small sorted array: O(size * lead) at worst,
    about size comparisons in practice."""
    top = np.full(lead, -(2 ** 63), np.int64)  # descending
    for entry in pool:
        if entry <= top[lead - 1]:
            continue
        position = lead - 1
        while position > 0 and top[position - 1] < entry:
            top[position] = top[position - 1]
            position -= 1
        top[position] = entry
    ranked = np.empty(pool.shape[0], np.int64)
    ranked[:lead] = top
    rest = lead
    for entry in pool:
        if entry < top[lead - 1]:
            ranked[rest] = entry
            rest += 1
    return ranked


@njit(cache=True, nogil=True, fastmath=True)
def _route_group(queries, centroids, entries, route, chosen):
    """Entries of the `route` clusters nearest each of G queries, written to chosen[:G*route*E];
    returns the router's evaluations per query (every centroid is scored)."""
    clusters, width = centroids.shape[0], entries.shape[1]
    sims = np.empty(clusters, np.float32)
    slot = 0
    for h in range(queries.shape[0]):
        for c in range(clusters):
            sims[c] = dot(queries[h], centroids[c])
        order = np.argsort(-sims)
        for r in range(route):
            for e in range(width):
                chosen[slot] = entries[order[r], e]
                slot += 1
    return clusters


@njit(cache=True, parallel=True, nogil=True, fastmath=True)
def search_groups_routed(queries, keys, adjacency, n_valid, centroids, entries, route, recent, extra, ef, k, lead,
                         plan, visited, kept, todo, best, out_ids, out_scores, out_evals):
    """Every KV head's graph searched by its query heads in lockstep, KV heads in parallel.

    queries [H, q, D] (head h reads KV head h // G); keys [KVH, n, D]; adjacency [KVH, n, M];
    router centroids [KVH, C, D] with entry keys [KVH, C, E]; each search starts from the entries of
    the `route` clusters nearest each of its queries, the `recent` newest keys, extra [KVH, X]
    (-1 = none) and key 0. Scratch per KV head: visited [KVH, words], kept [KVH, G, >= ef], todo [KVH, G,
    cap], best [KVH, G, >= k]. out_evals [H, q]: keys each query head scored, router included.
    lead: how many of each answer's best come first, in order (>= k: all; see search_group).
    plan [W, P]: the KV heads each of W parallel workers searches in turn (-1 ends a row), every
    KV head once (graph.worker_plan)."""
    kv_heads = keys.shape[0]
    groups = queries.shape[0] // kv_heads
    fixed = groups * route * entries.shape[2]
    for worker in prange(plan.shape[0]):
        for turn in range(plan.shape[1]):
            g = plan[worker, turn]
            if g < 0:
                break
            _search_kv_head(queries, keys, adjacency, n_valid, centroids, entries, route, recent, extra, ef, k, lead,
                            visited, kept, todo, best, out_ids, out_scores, out_evals, g, groups, fixed)


@njit(cache=True, nogil=True, fastmath=True)
def _search_kv_head(queries, keys, adjacency, n_valid, centroids, entries, route, recent, extra, ef, k, lead, visited,
                    kept, todo, best, out_ids, out_scores, out_evals, g, groups, fixed):
    """KV head g's part of search_groups_routed: every query position, its G query heads in lockstep."""
    chosen = np.empty(fixed + recent + extra.shape[1] + 1, np.int32)
    for j in range(recent):
        chosen[fixed + j] = n_valid - 1 - j if j < n_valid else -1
    for j in range(extra.shape[1]):
        chosen[fixed + recent + j] = extra[g, j]
    chosen[-1] = 0  # the first key: with successor edges every key is reachable from it
    first = g * groups
    group_queries = np.empty((groups, queries.shape[2]), np.float32)  # contiguous: dots vectorize
    for i in range(queries.shape[1]):
        for h in range(groups):
            group_queries[h] = queries[first + h, i]
        routed = _route_group(group_queries, centroids[g], entries[g], route, chosen)
        reads = search_group(group_queries, keys[g], adjacency[g], n_valid, chosen, ef, k, lead, visited[g],
                             kept[g], todo[g], best[g], out_ids[first:first + groups, i],
                             out_scores[first:first + groups, i])
        for h in range(groups):
            out_evals[first + h, i] = routed + reads

