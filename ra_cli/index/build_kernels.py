"""numba kernels that turn prefill queries' exact top-k lists into an attention-aware graph.

Edges come from co-selection: keys that sit close together in some prefill query's ranked top-k
list (within `span` ranks) are likely to be retrieved together by a decode query. Each key's most
co-selected keys are counted exactly (memory grows with the lists, i.e. linearly with the
document). The graph keeps the candidates that are not redundant — nearest first, a candidate is
dropped when a neighbour already kept lies clearly closer to it (the relative-neighbourhood rule
of HNSW / DiskANN) — plus a few nearest keys by L2 from its own neighbourhood and its positional
successor, so that every key is reachable. Keys that arrive after the build (a long chat's
evicted window) are linked in by search (`insert_nodes`).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ra_cli.index.search_kernels import beam_search

ASSEMBLE_BLOCK = 1024  # adjacency rows per parallel task


@njit(cache=True, nogil=True)
def _walk_links(lists, span, parts, part, slot_of, links, fill):
    """One pass over a graph's lists [q, L]: every link (a, b) of ranks at most `span` apart, both
    ways, whose key falls in this `part`. Counting (fill False): slot_of[key + 1] += 1 per link
    (bucket sizes); filling: the link's partner goes to links[slot_of[key]] (the bucket's cursor)."""
    shift = 0 if fill else 1
    for i in range(lists.shape[0]):
        for r in range(lists.shape[1] - 1):
            a = lists[i, r]
            if a < 0:
                break
            for rank in range(r + 1, min(lists.shape[1], r + 1 + span)):
                b = lists[i, rank]
                if b < 0:
                    break
                if a % parts == part:
                    if fill:
                        links[slot_of[a]] = b
                    slot_of[a + shift] += 1
                if b % parts == part:
                    if fill:
                        links[slot_of[b]] = a
                    slot_of[b + shift] += 1


@njit(cache=True, nogil=True, parallel=True)
def co_selection(lists, n, span, parts, table_ids, table_counts):
    """lists [G, q, L] int32 (a graph's prefill queries' top lists, best first, -1 padded) ->
    per key its `slots` most co-selected keys and their counts, table_ids / table_counts
    [G, n, slots] (most first, ties: the smaller id; -1 / 0 padded). table_counts [G, n, 0]: not
    wanted (the build needs only the order; at 128K keys the counts would be 200 MB more).

    Each rank of a list is linked both ways to the next `span` ranks: a band through the keys one
    query wanted (a plain chain, span 1, needed 5% more evaluations than span 3 for Recall@100
    0.95 on the 16K recall bench: 1,391 against 1,326, benchmarks/graph_variants.py). Counts are
    exact: every link is written into its key's bucket (sized by a first pass), each bucket sorted
    and counted — O(links) memory, which grows with the document like the lists themselves. The
    work is split into `parts` per graph by key (id % parts) so that 3 graphs keep 2 threads
    busy; the result does not depend on `parts`."""
    graphs = lists.shape[0]
    slots = table_ids.shape[2]
    for task in prange(graphs * parts):
        g, part = task // parts, task % parts
        starts = np.zeros(n + 1, np.int64)
        _walk_links(lists[g], span, parts, part, starts, starts[:0].astype(np.int32), False)  # bucket sizes
        starts = np.cumsum(starts)
        links = np.empty(starts[n], np.int32)
        _walk_links(lists[g], span, parts, part, starts[:n].copy(), links, True)
        sizes = starts[1:] - starts[:n]
        largest = sizes.max() if n else 0
        distinct = np.empty(largest, np.int32)
        counts = np.empty(largest, np.int32)
        for key in range(part, n, parts):
            bucket = links[starts[key]:starts[key + 1]]
            if bucket.shape[0] == 0:
                continue
            bucket.sort()
            found = 0
            for t in range(bucket.shape[0]):
                if found > 0 and distinct[found - 1] == bucket[t]:
                    counts[found - 1] += 1
                else:
                    distinct[found] = bucket[t]
                    counts[found] = 1
                    found += 1
            order = np.argsort(-counts[:found], kind="mergesort")
            for t in range(min(slots, found)):
                table_ids[g, key, t] = distinct[order[t]]
            for t in range(min(table_counts.shape[2], found)):
                table_counts[g, key, t] = counts[order[t]]


@njit(cache=True, nogil=True, inline="always")
def _squared_distance(a, b):
    total = np.float32(0.0)
    for d in range(a.shape[0]):
        t = a[d] - b[d]
        total += t * t
    return total


@njit(cache=True, nogil=True, parallel=True, fastmath=True)
def assemble_adjacency(table_ids, knn_all, keys, n, learned, occlusion, adjacency):
    """adjacency [G, n, M] (int32, -1 = empty) of graph g over keys [g] (float32 [G, n, D]): per
    key i up to `learned` of its co-selected keys (table_ids [G, n, slots], -1 padded; co_selection), then its L2 nearest keys (knn_all [G, n, NK]),
    then its positional successor i + 1 in the last slot it can take.

    Co-selected candidates are taken nearest first, and one is dropped when
    a neighbour m already taken is closer to it than `occlusion` x its own squared distance to i
    (|m - j|^2 < occlusion |i - j|^2): an edge to j would only repeat the way through m. Rows
    then spend their slots on directions a search has not got yet — on the 16K recall bench
    (SmolLM2, licenses.txt) 20% fewer evaluations for Recall@100 0.95 with this rule than
    without (1,326 against 1,661, benchmarks/graph_variants.py).

    The successor edges make every key reachable from key 0 (an entry of every search) whatever
    the learned edges are — keys no prefill query selected included — and they are the direction
    a copied phrase is read in."""
    graphs = table_ids.shape[0]
    width = adjacency.shape[2]
    slots = table_ids.shape[2]
    blocks = -(-n // ASSEMBLE_BLOCK)
    for task in prange(graphs * blocks):  # rows are independent: blocks keep every thread busy
        h = task // blocks
        knn = knn_all[h]
        key_set = keys[h]
        candidates = np.empty(slots, np.int64)
        distances = np.empty(slots, np.float32)
        for i in range(task % blocks * ASSEMBLE_BLOCK, min(n, (task % blocks + 1) * ASSEMBLE_BLOCK)):
            row = adjacency[h, i]
            row[:] = -1
            count = 0
            for s in range(slots):
                j = table_ids[h, i, s]
                if j < 0 or j >= n or j == i:
                    continue
                candidates[count] = j
                distances[count] = _squared_distance(key_set[i], key_set[j])
                count += 1
            order = np.argsort(distances[:count], kind="mergesort")
            filled = 0
            for s in range(count):
                if filled == learned:
                    break
                j = candidates[order[s]]
                limit = occlusion * distances[order[s]]
                occluded = False
                for t in range(filled):
                    if _squared_distance(key_set[row[t]], key_set[j]) < limit:
                        occluded = True
                        break
                if not occluded:
                    row[filled] = j
                    filled += 1
            for s in range(knn.shape[1]):
                j = knn[i, s]
                if j < 0 or j >= n or j == i or filled == width - 1:
                    continue
                if not _contains(row, filled, j):
                    row[filled] = j
                    filled += 1
            if i + 1 < n and not _contains(row, filled, i + 1):
                row[filled] = i + 1


@njit(cache=True, nogil=True, inline="always")
def _contains(row, filled, node):
    for t in range(filled):
        if row[t] == node:
            return True
    return False


@njit(cache=True, nogil=True)
def reachable(adjacency, n, entries):
    """Which of ids [0, n) a search can reach from `entries` by following adjacency [n, M] rows
    (breadth-first): bool [n]."""
    seen = np.zeros(n, np.bool_)
    queue = np.empty(n, np.int64)
    head = tail = 0
    for e in entries:
        if 0 <= e < n and not seen[e]:
            seen[e] = True
            queue[tail] = e
            tail += 1
    while head < tail:
        node = queue[head]
        head += 1
        for j in range(adjacency.shape[1]):
            neighbor = np.int64(adjacency[node, j])
            if neighbor < 0 or neighbor >= n:
                break
            if not seen[neighbor]:
                seen[neighbor] = True
                queue[tail] = neighbor
                tail += 1
    return seen


@njit(cache=True, nogil=True, inline="always")
def _sift_down(heap_scores, heap_ids, size, score, node):
    """Replace the root of a min-heap (the weakest kept score) and restore the heap."""
    c = 0
    while True:
        child = 2 * c + 1
        if child >= size:
            break
        if child + 1 < size and heap_scores[child + 1] < heap_scores[child]:
            child += 1
        if heap_scores[child] >= score:
            break
        heap_scores[c] = heap_scores[child]
        heap_ids[c] = heap_ids[child]
        c = child
    heap_scores[c] = score
    heap_ids[c] = node


@njit(cache=True, nogil=True, parallel=True)
def top_k_rows(scores, valid, out):
    """Exact top-k per row, best first: scores [R, n] float32, of which row r's first valid[r]
    entries count (causal prefixes); out [R, k] int32 gets column ids, -1 past the valid ones.

    One pass per row against a k-entry min-heap: almost every score loses to the heap's root, so
    the scan is a compare per element over data the caller keeps cache-sized."""
    k = out.shape[1]
    for r in prange(scores.shape[0]):
        row = scores[r]
        size = min(k, valid[r], scores.shape[1])
        heap_scores = np.full(max(size, 1), -np.inf, np.float32)
        heap_ids = np.full(max(size, 1), -1, np.int32)
        # newest keys first: on real prefill scores they are the likeliest winners (recency), so
        # the heap's floor rises early and later keys rarely get in
        for j in range(min(valid[r], scores.shape[1]) - 1, -1, -1):
            if row[j] > heap_scores[0]:
                _sift_down(heap_scores, heap_ids, size, row[j], j)
        order = np.argsort(-heap_scores[:size], kind="mergesort")
        for t in range(size):
            out[r, t] = heap_ids[order[t]]
        for t in range(size, k):
            out[r, t] = -1


@njit(cache=True, nogil=True, inline="always")
def link_into(row, target):
    """Add an edge to `target` in an int32 adjacency row: the first empty slot, else the last
    (the weakest edge: rows are ordered strongest first)."""
    slot = row.shape[0] - 1
    for s in range(row.shape[0]):
        if row[s] < 0:
            slot = s
            break
    row[slot] = target


@njit(cache=True, parallel=True, nogil=True)
def insert_nodes(keys, kv_of_graph, adjacency, first, last, ef, visited):
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
                entries[0] = t - 1
                entries[1] = 0
                beam_search(key_set[t], key_set, adjacency[g], t, entries, max(ef, width), width - 1, visited[g],
                            found, scores)
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
                link_into(adjacency[g, row[j]], t)
