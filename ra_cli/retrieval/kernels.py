"""numba kernel of the CPU half of retrieval attention: softmax over each query's retrieved keys."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ra_cli.engine.dense_decode import AHEAD, HEAD_DIM, UNROLL, _chunk_scores, _chunk_values, exp_nonpositive
from ra_cli.index.group_search import search_kv_head
from ra_cli.index.search_kernels import dot
from ra_cli.intrinsics import atomic_add, atomic_load, atomic_store, cycles, prefetch, widen

# Each search is also seeded with the previous step's best keys and their successors: consecutive
# decode queries look at the same places, and copying a phrase walks forward through it (the key
# after the one just attended is often the next one wanted).
CARRY = 8


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
    (the CPU path: both halves live in host memory; they meet by their maxima, not a second pass).

    static_keys/static_values [KVH, S, D]: query i sees the first static_visible[i] of them (sinks,
    then the window up to its own position); ids/scores [H, q, k]: retrieved ids into values [KVH,
    N, D] (float32 or bf16 bits) with their raw q·k from the search (-1 = none), reused rather than
    recomputed. Query head h reads KV head h // (H / KVH). Writes out [H, q, D].

    mass [H, M] (M = 0: off; only for one position) collects each key's softmax weight at its
    absolute position when that is in [first, M) and the weight is at least `floor` (static keys
    [0, lo) are positions [0, lo), static key lo + j is position window_start + j, retrieved node n
    is position lo + n): chat's citations. Row h belongs to query head h alone."""
    kv_heads, heads = static_keys.shape[0], queries.shape[0]
    static = _static_buffers(queries, static_keys)
    for g in prange(kv_heads):
        static_part(g, queries, static_keys, static_values, static_visible, scaling, *static)
    for h in prange(heads):
        retrieved_part(h, h // (heads // kv_heads), values, ids, scores, scaling, static_visible, *static, out, mass,
                       floor, first, lo, window_start)


@njit(cache=True, parallel=True, nogil=True, fastmath=True)
def search_and_attend(queries, keys, adjacency, n_valid, centroids, entries, route, recent, extra, ef, k, lead, costs,
                      threads, visited, kept, todo, best, out_ids, out_scores, out_evals, static_keys, static_values,
                      static_visible, values, scaling, out, mass, floor, first, lo, window_start, carried):
    """search_groups_routed (index/group_search.py; its arguments first, as GraphLayerIndex.
    lockstep_arguments gives them) and attend_static_and_retrieved (the rest), in one call: one
    call from Python per layer, and the workers kept busy across both kinds of work.

    Tasks: g < KVH searches KV head g; KVH + g scores its query heads' static keys (no search
    needed); 2 KVH + h merges query head h's retrieved keys into its static part (after both of
    its KV head's tasks). `threads` workers take them in turn from one queue (task_order): the
    searches, costliest first, then the static halves, then the heads in the order their KV heads
    should be done. A worker that takes a head whose KV head is not done yet leaves it for after
    the queue (a second parallel loop) instead of waiting: nobody spins on a thread the OS may
    have put aside. So with 3 KV heads on 2 threads, the worker that searched once scores the
    static halves and merges the heads already searched while the other is still searching.
    costs [2 KVH + H] float64: the cycles each task took the step before (the order comes from
    them); this step's are written back. carried [H, >= 2 C]: its first 2 C columns get the last
    position's best C keys of each head and their successors (-1: none), the next step's extra
    entry points (it may be the memory `extra` views: it is written after every search has read
    its entries). Returns the keys scored (summed over query heads and positions) and the share
    of the workers' cycles spent searching."""
    kv_heads, heads = keys.shape[0], queries.shape[0]
    groups = heads // kv_heads
    fixed = groups * route * entries.shape[2]
    static = _static_buffers(queries, static_keys)
    order, taken, done = task_order(costs, kv_heads, threads)
    left = np.zeros(heads, np.bool_)  # merges whose KV head was not done when taken
    for worker in prange(min(threads, order.shape[0])):
        while True:
            turn = atomic_add(taken, 0, 1)
            if turn >= order.shape[0]:
                break
            task = order[turn]
            if task >= 2 * kv_heads:  # a head's merge: only once its KV head's search and static half are done
                h = task - 2 * kv_heads
                if atomic_load(done, h // groups) == 0 or atomic_load(done, kv_heads + h // groups) == 0:
                    left[h] = True
                    continue
            began = cycles()
            if task < kv_heads:
                search_kv_head(queries, keys, adjacency, n_valid, centroids, entries, route, recent, extra, ef, k, lead,
                               visited, kept, todo, best, out_ids, out_scores, out_evals, task, groups, fixed)
            elif task < 2 * kv_heads:
                static_part(task - kv_heads, queries, static_keys, static_values, static_visible, scaling, *static)
            else:
                retrieved_part(h, h // groups, values, out_ids, out_scores, scaling, static_visible, *static, out, mass,
                               floor, first, lo, window_start)
            costs[task] = cycles() - began
            atomic_store(done, task, 1)
    for h in prange(heads):
        if left[h]:
            began = cycles()
            retrieved_part(h, h // groups, values, out_ids, out_scores, scaling, static_visible, *static, out, mass,
                           floor, first, lo, window_start)
            costs[2 * kv_heads + h] = cycles() - began
    last = out_ids.shape[1] - 1
    for h in range(heads):
        for j in range(CARRY):
            node = out_ids[h, last, j] if j < out_ids.shape[2] else -1
            carried[h, j] = node
            carried[h, CARRY + j] = node + 1 if 0 <= node and node + 1 < n_valid else -1
    searching = costs[:kv_heads].sum()
    return out_evals.sum(), searching / max(1.0, searching + costs[kv_heads:].sum())


@njit(cache=True, nogil=True)
def task_order(costs, kv_heads, threads):
    """search_and_attend's queue: the order of its tasks, a counter of those taken and their done
    flags (zeros). Searches costliest first, then static halves costliest first; then each head's
    merge, by when its KV head's two tasks should be done if `threads` workers take the queue in
    turn with the costs of the step before (consecutive decode steps are alike)."""
    tasks = costs.shape[0]
    order = np.empty(tasks, np.int64)
    order[:kv_heads] = np.argsort(-costs[:kv_heads], kind="mergesort")
    order[kv_heads: 2 * kv_heads] = kv_heads + np.argsort(-costs[kv_heads: 2 * kv_heads], kind="mergesort")
    load = np.zeros(max(1, threads), np.float64)
    finish = np.zeros(kv_heads, np.float64)
    for turn in range(2 * kv_heads):
        task = order[turn]
        w = np.argmin(load)
        load[w] += costs[task]
        g = task % kv_heads
        finish[g] = max(finish[g], load[w])
    groups = (tasks - 2 * kv_heads) // kv_heads
    ready = np.empty(tasks - 2 * kv_heads, np.float64)
    for h in range(ready.shape[0]):
        ready[h] = finish[h // groups]
    order[2 * kv_heads:] = 2 * kv_heads + np.argsort(ready, kind="mergesort")
    return order, np.zeros(1, np.int64), np.zeros(tasks, np.int64)


@njit(cache=True, nogil=True)
def _static_buffers(queries, static_keys):
    """static_part's outputs: weights [H, S + UNROLL], maxima and totals [H, q], partial [H, q, D]."""
    heads, count, dim = queries.shape
    return (np.empty((heads, static_keys.shape[1] + UNROLL), np.float32), np.empty((heads, count), np.float32),
            np.empty((heads, count), np.float32), np.empty((heads, count, dim), np.float32))


@njit(cache=True, nogil=True, fastmath=True)
def static_part(g, queries, static_keys, static_values, static_visible, scaling, weights, maxima, totals, partial):
    """KV head g's query heads over their visible static keys, unnormalised: per head h and
    position i the largest score maxima[h, i], totals[h, i] = sum of e^(score - maximum) and
    partial[h, i] the values weighted by those; weights[h] keeps the last position's (then zeros
    up to the next multiple of 4). The G heads are scored and summed together, 4 rows at a time
    (dense_decode's loops: one pass over the rows serves every head, and the sums stay in
    registers where a row at a time waited on its own stores: 38 us a layer at 16K for the
    static halves alone before, docs/benchmarks.md "Search and attention in one call")."""
    heads, count, dim = queries.shape
    groups = heads // static_keys.shape[0]
    capacity = static_keys.shape[1]
    flat_keys, flat_values = static_keys.reshape(-1), static_values.reshape(-1)
    rows = np.empty((UNROLL, dim), np.float32)
    group_queries = np.empty((groups, dim), np.float32)
    head = g * groups
    group_weights = weights[head:head + groups]  # this KV head's rows: scored in place
    acc = np.empty((groups, dim), np.float32)
    for i in range(count):
        visible = static_visible[i]
        for r in range(groups):
            group_queries[r] = queries[head + r, i]
        _chunk_scores(group_queries, flat_keys, g * capacity, visible, rows, group_weights, scaling)
        for r in range(groups):
            best = -np.inf
            for j in range(visible):
                best = max(best, group_weights[r, j])
            total = np.float32(0.0)
            for j in range(visible):  # a loop of its own: exp_nonpositive vectorizes here
                group_weights[r, j] = exp_nonpositive(group_weights[r, j] - best)
                total += group_weights[r, j]
            for j in range(visible, visible + UNROLL):  # the 4-row loop's padding weighs nothing
                group_weights[r, j] = 0.0
            maxima[head + r, i] = best
            totals[head + r, i] = total
        acc[:] = 0.0
        _chunk_values(group_weights, flat_values, g * capacity, visible, rows, acc)
        partial[head:head + groups, i] = acc


@njit(cache=True, nogil=True, fastmath=True)
def retrieved_part(h, g, values, ids, scores, scaling, static_visible, weights, maxima, totals, partial, out, mass,
                   floor, first, lo, window_start):
    """Query head h's retrieved keys (ids/scores [H, q, k] into values[g]) merged with its static
    part (static_part's outputs): the softmax over both, written to out[h]; with mass on, every
    key's weight as in attend_static_and_retrieved."""
    count, width, dim = ids.shape[1], ids.shape[2], out.shape[2]
    found = np.empty(width + UNROLL, np.float32)
    acc = np.empty(dim, np.float32)
    for i in range(count):
        answered = 0
        best = maxima[h, i]
        while answered < width and ids[h, i, answered] >= 0:
            found[answered] = scores[h, i, answered] * scaling
            best = max(best, found[answered])
            answered += 1
        total = np.float32(0.0)
        for j in range(answered):  # a loop of its own: exp_nonpositive vectorizes here
            found[j] = exp_nonpositive(found[j] - best)
            total += found[j]
        for j in range(answered, answered + UNROLL):
            found[j] = 0.0
        rescale = exp_nonpositive(maxima[h, i] - best) if totals[h, i] > 0 else np.float32(0.0)
        total += totals[h, i] * rescale
        for d in range(dim):
            acc[d] = partial[h, i, d] * rescale
        _gathered_values(found, values[g], ids[h, i], answered, acc)
        for d in range(dim):
            out[h, i, d] = acc[d] / total if total > 0 else 0.0
        if mass.shape[1] > 0 and total > 0:  # one position: weights[h] are its static weights
            for j in range(static_visible[i]):
                position = j if j < lo else window_start + j - lo
                w = weights[h, j] * rescale / total
                if first <= position < mass.shape[1] and w >= floor:
                    mass[h, position] += w
            for j in range(answered):
                w = found[j] / total
                if first <= lo + ids[h, i, j] < mass.shape[1] and w >= floor:
                    mass[h, lo + ids[h, i, j]] += w


@njit(cache=True, nogil=True, fastmath=True)
def _gathered_values(weights, values, ids, count, acc):
    """acc += sum_j weights[j] * values[ids[j]] for j < count, 4 rows at a time (weights padded
    with zeros past count; a padding row repeats row ids[0]), each row's cache lines requested
    AHEAD rows before they are read."""
    if acc.shape[0] == HEAD_DIM:
        _gather(weights, values, ids, count, acc, HEAD_DIM)
    else:
        _gather(weights, values, ids, count, acc, acc.shape[0])


@njit(cache=True, inline="always", fastmath=True)
def _gather(weights, values, ids, count, acc, dim):
    line = 64 // values.itemsize  # row elements per cache line
    for j in range(min(count, AHEAD)):
        for offset in range(0, dim, line):
            prefetch(values[ids[j]], offset)
    for j in range(0, count, UNROLL):
        for u in range(j + AHEAD, min(j + AHEAD + UNROLL, count)):
            for offset in range(0, dim, line):
                prefetch(values[ids[u]], offset)
        r0 = values[ids[j]]
        r1 = values[ids[j + 1 if j + 1 < count else 0]]
        r2 = values[ids[j + 2 if j + 2 < count else 0]]
        r3 = values[ids[j + 3 if j + 3 < count else 0]]
        w0, w1, w2, w3 = weights[j], weights[j + 1], weights[j + 2], weights[j + 3]
        for d in range(dim):
            acc[d] += w0 * widen(r0[d]) + w1 * widen(r1[d]) + w2 * widen(r2[d]) + w3 * widen(r3[d])
