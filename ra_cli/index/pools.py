"""The candidate pools of ra's graph search (group_search.py), as packed 8-byte entries: the
score's bits, made to order like the score, in the high 32 bits and the key id in the low 32, so one
int64 comparison orders entries by score.

Each query head keeps a min-heap of its best `ef` entries (root = the worst kept) and a queue of
entries to expand, best first: a min-heap of the complemented entries (~e reverses the order of
int64 values exactly), so one pair of heap routines serves both. Heap updates are O(log ef) where
a sorted array shifts O(ef) entries per insertion (measured: at ef 400 the heaps cost 52 ns per
key read, the sorted pool 83). When the answer is wider than the beam (k > ef), every key scored
is a candidate for it: appended to a buffer of at least k + room entries, cut back to its k best
when full (O(1) per entry, where a bounded k-heap cost O(log k) and, measured on real searches,
10% of the search).
"""

from __future__ import annotations

import numpy as np
from numba import njit

MIN_ENTRY = -(2 ** 63)


@njit(cache=True, inline="always")
def ordered_bits(bits):
    """int32 bits of a float32 -> an int64 that orders like the float."""
    value = np.int64(bits)
    return value ^ 0x7FFFFFFF if value < 0 else value


@njit(cache=True, inline="always")
def float_bits(ordered):
    """The inverse of ordered_bits: a float32's int32 bits from their ordered form."""
    value = np.int32(ordered)
    return value ^ np.int32(0x7FFFFFFF) if value < 0 else value


@njit(cache=True, inline="always")
def _heap_up(heap, position):
    """Min-heap: move heap[position] up to its place."""
    item = heap[position]
    while position > 0:
        parent = (position - 1) >> 1
        if heap[parent] <= item:
            break
        heap[position] = heap[parent]
        position = parent
    heap[position] = item


@njit(cache=True, inline="always")
def _heap_down(heap, size):
    """Min-heap: move heap[0] down to its place."""
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
def next_to_expand(h, todo):
    """Head h's best entry not yet expanded (its queue is not empty)."""
    return ~todo[h, 0]


@njit(cache=True, inline="always")
def pop_next(h, todo, todo_size):
    """Take head h's best entry not yet expanded off its queue."""
    entry = ~todo[h, 0]
    todo_size[h] -= 1
    todo[h, 0] = todo[h, todo_size[h]]
    _heap_down(todo[h], todo_size[h])
    return entry


@njit(cache=True, inline="always")
def offer(h, entry, ef, kept, kept_size, todo, todo_size):
    """Offer a scored key to head h: kept if among its best ef, and then queued for expansion.
    When the queue is full, entries that can no longer be expanded (below the kept floor) go."""
    if kept_size[h] == ef:
        if entry <= kept[h, 0]:
            return
        kept[h, 0] = entry
        _heap_down(kept[h], ef)
    else:
        kept[h, kept_size[h]] = entry
        _heap_up(kept[h], kept_size[h])
        kept_size[h] += 1
    if todo_size[h] == todo.shape[1]:
        floor = kept[h, 0]
        size = 0
        for t in range(todo_size[h]):
            if ~todo[h, t] >= floor:
                todo[h, size] = todo[h, t]
                size += 1
        todo_size[h] = size
        for t in range(size):
            _heap_up(todo[h], t)
    todo[h, todo_size[h]] = ~entry
    _heap_up(todo[h], todo_size[h])
    todo_size[h] += 1


@njit(cache=True, inline="always")
def make_room(h, room, k, best, best_size, best_floor):
    """Head h's candidate buffer (k > ef; >= k + room entries) gets room for `room` more: when it is
    full, its k best are kept and the k-th becomes the floor below which nothing is appended."""
    if best_size[h] + room > best.shape[1]:
        select_top(best[h], best_size[h], k)
        best_size[h] = k
        best_floor[h] = _minimum(best[h], k)


@njit(cache=True, inline="always")
def keep_best(h, entry, k, best, best_size, best_floor):
    """One entry into head h's candidates for its k best (see make_room)."""
    make_room(h, 1, k, best, best_size, best_floor)
    if entry > best_floor[h]:
        best[h, best_size[h]] = entry
        best_size[h] += 1


@njit(cache=True, inline="always")
def _minimum(values, size):
    low = values[0]
    for i in range(1, size):
        low = min(low, values[i])
    return low


@njit(cache=True)
def select_top(values, size, k):
    """Reorder values[:size] (distinct) so that its k largest come first, in any order (quickselect)."""
    low, high = 0, size - 1
    while low < high:
        pivot = values[(low + high) >> 1]
        i, j = low, high
        while i <= j:
            while values[i] > pivot:
                i += 1
            while values[j] < pivot:
                j -= 1
            if i <= j:
                values[i], values[j] = values[j], values[i]
                i += 1
                j -= 1
        if k - 1 <= j:
            high = j
        elif k - 1 >= i:
            low = i
        else:
            break


@njit(cache=True, nogil=True)
def lead_first(pool, lead):
    """The pool's entries (distinct) with its `lead` largest first, largest first; the others
    after them in pool order. One pass keeping a small sorted array: O(size * lead) at worst,
    about size comparisons in practice."""
    top = np.full(lead, MIN_ENTRY, np.int64)  # descending
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
