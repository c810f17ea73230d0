"""The graph search ra's index runs at decode: one KV head's graph searched in lockstep by its G
query heads, KV heads in parallel threads. Its pools (packed score|id entries, heaps, the answer's
candidates) are pools.py.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ra_cli.intrinsics import prefetch
from ra_cli.index.pools import (MIN_ENTRY, float_bits, keep_best, lead_first, make_room, next_to_expand, offer,
                                ordered_bits, pop_next, select_top)
from ra_cli.index.search_kernels import NO_ID, _mark, _seen, dot


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

    The answer is each query's k best keys among *every* key scored (best [G, >= k + M] scratch
    when k > ef; 2k + M keeps its cuts rare): the beam width sets how far the search explores, the
    attention budget k how many of the keys it met are kept. Writes out_ids/out_scores [G, k] (-1/-inf padded) with the best
    `lead` first and in order, the rest in any order (lead >= k: all sorted; attention needs no
    order, and sorting hundreds of entries per query head is not free); returns the keys read."""
    groups, dim = queries.shape
    width = adjacency.shape[1]
    wide = k > ef
    kept_size = np.zeros(groups, np.int64)
    todo_size = np.zeros(groups, np.int64)
    best_size = np.zeros(groups, np.int64)
    best_floor = np.full(groups, MIN_ENTRY, np.int64)
    stopped = np.zeros(groups, np.bool_)
    fresh = np.empty(width, np.int64)
    score_bits = np.empty((width, groups), np.float32)
    bits = score_bits.view(np.int32)
    visited[: (n_valid + 63) >> 6] = 0
    line = 64 // keys.itemsize  # row elements per cache line
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
            entry = (ordered_bits(bits[0, h]) << 32) | node
            offer(h, entry, ef, kept, kept_size, todo, todo_size)
            if wide:
                keep_best(h, entry, k, best, best_size, best_floor)
    unvisited = 0
    while True:
        running = 0
        for h in range(groups):  # the round's adjacency rows start loading together, not one miss per head
            if not stopped[h] and todo_size[h] > 0:
                prefetch(adjacency[np.int64(next_to_expand(h, todo) & 0xFFFFFFFF)], 0)
        for h in range(groups):
            if stopped[h]:
                continue
            if todo_size[h] == 0 or (kept_size[h] == ef and next_to_expand(h, todo) < kept[h, 0]):
                stopped[h] = True
                continue
            running += 1
            node = np.int64(pop_next(h, todo, todo_size) & 0xFFFFFFFF)
            count = 0
            for j in range(width):
                neighbor = np.int64(adjacency[node, j])
                if neighbor < 0 or neighbor >= n_valid:
                    break
                if _seen(visited, neighbor):
                    continue
                _mark(visited, neighbor)
                for offset in range(0, keys.shape[1], line):  # every cache line of the row (bf16 64-dim: 2)
                    prefetch(keys[neighbor], offset)
                fresh[count] = neighbor
                count += 1
            reads += count
            for j in range(count):
                row = keys[fresh[j]]
                for g in range(groups):
                    score_bits[j, g] = dot(queries[g], row)
            for j in range(count):
                for g in range(groups):
                    entry = (ordered_bits(bits[j, g]) << 32) | fresh[j]
                    if kept_size[g] < ef or entry > kept[g, 0]:
                        offer(g, entry, ef, kept, kept_size, todo, todo_size)
                        stopped[g] = False
            if wide:  # every key scored is a candidate for the answer; appended in a loop of its own (no calls, no
                # branch: each key is written and kept by moving the end past it when it beats the floor;
                # 1-9% faster search in 5 of 5 alternated runs of benchmarks/decode_search.py at 16K)
                for g in range(groups):
                    make_room(g, count, k, best, best_size, best_floor)
                    floor, size = best_floor[g], best_size[g]
                    candidates = best[g]
                    for j in range(count):
                        entry = (ordered_bits(bits[j, g]) << 32) | fresh[j]
                        candidates[size] = entry
                        size += entry > floor
                    best_size[g] = size
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
            entry = (ordered_bits(bits[0, h]) << 32) | unvisited
            offer(h, entry, ef, kept, kept_size, todo, todo_size)
            if wide:
                keep_best(h, entry, k, best, best_size, best_floor)
            stopped[h] = False
    answer_bits = np.empty(k, np.int32)
    answer_scores = answer_bits.view(np.float32)
    for h in range(groups):
        size = best_size[h] if wide else kept_size[h]
        pool = best[h] if wide else kept[h]  # scratch from here on: reordered in place
        if size > k:  # the k best first (quickselect), then only those are ordered
            select_top(pool, size, k)
            size = k
        if 0 < lead < size:
            ranked = lead_first(pool[:size], lead)
        else:
            ranked = np.sort(pool[:size])[::-1]
        for i in range(k):
            if i < size:
                out_ids[h, i] = ranked[i] & 0xFFFFFFFF
                answer_bits[i] = float_bits(ranked[i] >> 32)  # the score as scored: no second dot product
            else:
                out_ids[h, i] = NO_ID
                answer_scores[i] = -np.inf
        out_scores[h, :] = answer_scores
    return reads


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
        for r in range(route):  # the best `route` clusters by repeated maximum: route is 1-3, no sort
            nearest = np.argmax(sims)
            sims[nearest] = -np.inf
            for e in range(width):
                chosen[slot] = entries[nearest, e]
                slot += 1
    return clusters


@njit(cache=True, parallel=True, nogil=True, fastmath=True)
def search_groups_routed(queries, keys, adjacency, n_valid, centroids, entries, route, recent, extra, ef, k, lead,
                         costs, threads, visited, kept, todo, best, out_ids, out_scores, out_evals):
    """Every KV head's graph searched by its query heads in lockstep, KV heads in parallel.

    queries [H, q, D] (head h reads KV head h // G); keys [KVH, n, D]; adjacency [KVH, n, M];
    router centroids [KVH, C, D] with entry keys [KVH, C, E]; each search starts from the entries of
    the `route` clusters nearest each of its queries, the `recent` newest keys, extra [KVH, X]
    (-1 = none) and key 0. Scratch per KV head: visited [KVH, words], kept [KVH, G, >= ef], todo [KVH, G,
    cap], best [KVH, G, >= k + M]. out_evals [H, q]: keys each query head scored, router included.
    lead: how many of each answer's best come first, in order (>= k: all; see search_group).
    costs [KVH] float64: each KV head's keys read by the previous search, which balances this
    one's `threads` workers (worker_plan); this search's are written back."""
    kv_heads = keys.shape[0]
    groups = queries.shape[0] // kv_heads
    fixed = groups * route * entries.shape[2]
    plan = worker_plan(costs, threads)
    for worker in prange(plan.shape[0]):
        for turn in range(plan.shape[1]):
            g = plan[worker, turn]
            if g < 0:
                break
            search_kv_head(queries, keys, adjacency, n_valid, centroids, entries, route, recent, extra, ef, k, lead,
                           visited, kept, todo, best, out_ids, out_scores, out_evals, g, groups, fixed)
    for g in range(kv_heads):
        costs[g] = out_evals[g * groups].sum()


@njit(cache=True, nogil=True)
def worker_plan(costs, threads):
    """Tasks per parallel worker [W, T] (-1 padded), for tasks costing costs [T] (what they cost
    the step before: consecutive decode steps are alike): with more tasks than threads, the
    costliest go first, each to the worker with the least work so far (longest processing time
    first; ties: the lower task). 3 KV heads on 2 threads read e.g. 966 / 1,193 / 764 keys: the
    fixed split {0, 1} | {2} waits for 2,159 reads, this one {1} | {0, 2} for 1,730."""
    tasks = costs.shape[0]
    workers = max(1, min(threads, tasks))
    plan = np.full((workers, tasks), -1, np.int64)
    load = np.zeros(workers, np.float64)
    filled = np.zeros(workers, np.int64)
    for task in np.argsort(-costs, kind="mergesort"):
        w = np.argmin(load)
        plan[w, filled[w]] = task
        filled[w] += 1
        load[w] += costs[task]
    return plan


@njit(cache=True, nogil=True, fastmath=True)
def search_kv_head(queries, keys, adjacency, n_valid, centroids, entries, route, recent, extra, ef, k, lead, visited,
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

