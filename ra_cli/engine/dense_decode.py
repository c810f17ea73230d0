"""Dense decode attention on a CPU: one query position of every head over all of a layer's keys,
in one numba pass over the KV buffer (full attention, and the layers retrieval leaves dense).

torch runs it as a bf16 matmul, a float32 softmax and a second bf16 matmul: three passes over
memory with the scores rounded to bf16 in between. Here each worker takes a chunk of one KV
head's keys, scores it against that head's G query heads (float32, keys widened from bf16
exactly), turns the chunk's scores into weights with its own running maximum and accumulates the
values while those weights are still in cache; chunks merge by log-sum-exp.
`benchmarks/dense_decode.py` times both in one run (docs/benchmarks.md, "Dense attention as one
float32 pass").
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from ra_cli.intrinsics import float32_from_bits, prefetch, widen

CHUNK = 512  # keys per work item: its weights (G x 512 floats) stay in cache from scoring to accumulating
UNROLL = 4  # keys scored / accumulated together: one pass over a query row serves 4 keys
HEAD_DIM = 64  # the head size compiled as a constant (SmolLM2, Qwen2.5), so LLVM can unroll the row loops:
# 14-21% faster than a run-time size (benchmarks/dense_decode.py before and after); others take the general path
AHEAD = 32  # rows prefetched ahead of the one being read: 4-10% faster than the hardware prefetcher
# alone (16 and 64 alike; benchmarks/dense_decode.py, alternating versions)
LOG2E = np.float32(1.4426950408889634)
LN2 = np.float32(0.6931471805599453)


@njit(cache=True, inline="always", fastmath=True)
def exp_nonpositive(x):
    """e^x for x <= 0 (below -87 it returns e^-87 ~ 1.6e-38, i.e. 0 for a softmax): 2^n times a
    degree-7 polynomial of the remainder. Relative error <= 1e-7 for |x| < 1, growing with |x|
    to 4e-6 at -87 (the float32 rounding of x log2(e); weights that small hardly count). Unlike
    np.exp (a libm call per element without SVML) it vectorizes."""
    t = max(x, np.float32(-87.0)) * LOG2E
    n = np.floor(t + np.float32(0.5))
    f = (t - n) * LN2  # |f| <= ln2 / 2
    p = np.float32(1.0 / 5040.0)
    p = p * f + np.float32(1.0 / 720.0)
    p = p * f + np.float32(1.0 / 120.0)
    p = p * f + np.float32(1.0 / 24.0)
    p = p * f + np.float32(1.0 / 6.0)
    p = p * f + np.float32(0.5)
    p = p * f + np.float32(1.0)
    p = p * f + np.float32(1.0)
    return p * float32_from_bits(np.int32(n + np.float32(127.0)) << 23)


@njit(cache=True, inline="always")
def _widened_rows(buffer, first, j, count, dim, rows):
    """rows[u] = buffer row (first + j + u) as float32 for u < UNROLL (past `count`: the last row
    again), prefetching the rows AHEAD of them."""
    for u in range(UNROLL):
        start = (first + min(j + u, count - 1)) * dim
        row = buffer[start:start + dim]  # a slice: LLVM vectorizes its loop, not one over flat indices
        if start + AHEAD * dim + dim <= buffer.shape[0]:  # both cache lines of a row AHEAD rows on
            prefetch(buffer, start + AHEAD * dim)
            prefetch(buffer, start + AHEAD * dim + dim // 2)
        for d in range(dim):
            rows[u, d] = widen(row[d])


@njit(cache=True, nogil=True, fastmath=True)
def _chunk_scores(queries, keys, first, count, rows, scores, scaling):
    """scores[r, j] = queries[r] . keys row (first + j) * scaling for j < count (rounded up to
    UNROLL; the padding repeats the last key). keys: the flat buffer from the row's start."""
    if queries.shape[1] == HEAD_DIM:
        _scores(queries, keys, first, count, rows, scores, scaling, HEAD_DIM)
    else:
        _scores(queries, keys, first, count, rows, scores, scaling, queries.shape[1])


@njit(cache=True, inline="always", fastmath=True)
def _scores(queries, keys, first, count, rows, scores, scaling, dim):
    for j in range(0, count, UNROLL):
        _widened_rows(keys, first, j, count, dim, rows)
        for r in range(queries.shape[0]):
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            for d in range(dim):
                x = queries[r, d]
                a0 += x * rows[0, d]
                a1 += x * rows[1, d]
                a2 += x * rows[2, d]
                a3 += x * rows[3, d]
            scores[r, j] = a0 * scaling
            scores[r, j + 1] = a1 * scaling
            scores[r, j + 2] = a2 * scaling
            scores[r, j + 3] = a3 * scaling


@njit(cache=True, nogil=True, fastmath=True)
def _chunk_values(weights, values, first, count, rows, acc):
    """acc[r] += sum_j weights[r, j] * values row (first + j), j < count rounded up to UNROLL (the
    padding's weights are 0)."""
    if acc.shape[1] == HEAD_DIM:
        _values(weights, values, first, count, rows, acc, HEAD_DIM)
    else:
        _values(weights, values, first, count, rows, acc, acc.shape[1])


@njit(cache=True, inline="always", fastmath=True)
def _values(weights, values, first, count, rows, acc, dim):
    for j in range(0, count, UNROLL):
        _widened_rows(values, first, j, count, dim, rows)
        for r in range(acc.shape[0]):
            w0 = weights[r, j]
            w1 = weights[r, j + 1]
            w2 = weights[r, j + 2]
            w3 = weights[r, j + 3]
            for d in range(dim):
                acc[r, d] += w0 * rows[0, d] + w1 * rows[1, d] + w2 * rows[2, d] + w3 * rows[3, d]


@njit(cache=True, parallel=True, nogil=True, fastmath=True)
def dense_decode_attention(queries, keys, values, head_stride, n, visible, scaling, out, lse, floor, at, weights):
    """softmax(q k^T * scaling) v of queries [KVH, R, D] float32 (the R = G x positions rows of
    each KV head) over the first n rows of each KV head's keys/values, row r seeing only the first
    visible[r] (1 <= visible[r] <= n: a question's tokens see the document and the tokens before
    them; the keys past that get weight 0). keys/values: flat 1-D buffers (float32 or bf16 bits as
    uint16), KV head g's rows starting at g * head_stride. Writes out [KVH, R, D] and its
    log-sum-exp [KVH, R] (to merge with attention over other keys); at / weights [items, R, slots]
    (slots 0: not wanted; items: KV heads x chunks) get, per chunk and row, the keys whose softmax
    weight is at least `floor` — chat's citations — and their weights (unused slots: key 0,
    weight 0). A key's weight over its whole row is at most its weight within its chunk, so a
    chunk's candidates are picked before the row's total is known; with floor > 0 fewer than
    1 / floor + 1 can qualify in a chunk, so slots stay few and no [R, n] array of weights is
    written (at 77K keys that array, its normalisation and its sum cost 1.2-1.4 ms a layer:
    docs/benchmarks.md, "Citations at a dense layer's cost")."""
    kv_heads, count, dim = queries.shape
    chunks = (n + CHUNK - 1) // CHUNK
    items = kv_heads * chunks
    partial = np.empty((items, count, dim), np.float32)
    maxima = np.empty((items, count), np.float32)
    sums = np.empty((items, count), np.float32)
    slots = weights.shape[2]
    for item in prange(items):
        g, first = item // chunks, (item % chunks) * CHUNK
        size = min(n - first, CHUNK)
        padded = (size + UNROLL - 1) // UNROLL * UNROLL
        scores = np.empty((count, CHUNK), np.float32)
        rows = np.empty((UNROLL, dim), np.float32)
        base = g * head_stride
        _chunk_scores(queries[g], keys[base:], first, size, rows, scores, scaling)
        for r in range(count):
            seen = min(size, max(0, visible[r] - first))  # this chunk's keys row r may see
            top = np.float32(-np.inf)
            for j in range(seen):
                top = max(top, scores[r, j])
            total = np.float32(0.0)
            for j in range(seen):
                e = exp_nonpositive(scores[r, j] - top)
                scores[r, j] = e
                total += e
            for j in range(seen, padded):
                scores[r, j] = 0.0
            maxima[item, r] = top
            sums[item, r] = total
            if slots > 0:
                bar = floor * total * np.float32(1.0 - 1e-6)  # the slack: rounding never drops a key at the floor
                used = 0
                for j in range(seen if bar <= np.float32(1.0) else 0):  # the chunk's largest weight is 1
                    if scores[r, j] >= bar and used < slots:
                        at[item, r, used] = first + j
                        weights[item, r, used] = scores[r, j]
                        used += 1
                for t in range(used, slots):
                    at[item, r, t] = 0
                    weights[item, r, t] = 0.0
        acc = np.zeros((count, dim), np.float32)
        _chunk_values(scores, values[base:], first, size, rows, acc)
        partial[item] = acc
    for g in range(kv_heads):
        for r in range(count):
            top = np.float32(-np.inf)
            for c in range(chunks):
                top = max(top, maxima[g * chunks + c, r])
            total = np.float32(0.0)
            for d in range(dim):
                out[g, r, d] = 0.0
            for c in range(chunks):
                scale = np.exp(maxima[g * chunks + c, r] - top)
                total += scale * sums[g * chunks + c, r]
                for d in range(dim):
                    out[g, r, d] += scale * partial[g * chunks + c, r, d]
            for d in range(dim):
                out[g, r, d] /= total
            lse[g, r] = top + np.log(total)
            for c in range(chunks):
                scale = np.exp(maxima[g * chunks + c, r] - top) / total
                for t in range(slots):
                    w = weights[g * chunks + c, r, t] * scale
                    weights[g * chunks + c, r, t] = w if w >= floor else np.float32(0.0)  # a candidate that fell short


KERNEL_DTYPES = {torch.bfloat16: torch.int16, torch.float32: torch.float32}


def flat_rows(x: torch.Tensor) -> tuple[np.ndarray, int] | None:
    """A [KVH, n, D] CPU view whose rows are dense (each KV head's [n, D] contiguous, e.g. the first
    n rows of a preallocated cache buffer) as one flat numpy array over the same memory and the
    element distance between KV heads; None when the layout or dtype does not allow it."""
    if x.device.type != "cpu" or x.dtype not in KERNEL_DTYPES or x.stride(2) != 1 or x.stride(1) != x.shape[2]:
        return None
    kv_heads, n, dim = x.shape
    span = (kv_heads - 1) * x.stride(0) + n * dim
    flat = torch.as_strided(x, (span,), (1,)).view(KERNEL_DTYPES[x.dtype]).numpy()
    return (flat.view(np.uint16) if x.dtype == torch.bfloat16 else flat), x.stride(0)


def cpu_decode_attention(rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float,
                         floor: float | None = None, visible: np.ndarray | None = None):
    """Attention of rows [KVH, R, D] over keys/values [KVH, n, D] on a CPU with this module's kernel:
    (out [KVH, R, D] float32, the keys weighing at least `floor` as `picked` returns them, or None
    when floor is None), or None where the kernel does not apply (another device, dtype or layout;
    keys and values of different dtypes; no keys). visible [R] int64: the keys each row sees (a
    prefix; default all n)."""
    n = keys.shape[1]
    flat_keys, flat_values = flat_rows(keys), flat_rows(values)
    if n == 0 or flat_keys is None or flat_values is None or keys.dtype != values.dtype \
            or flat_keys[1] != flat_values[1] or keys.shape[2] != values.shape[2]:
        return None
    queries = np.ascontiguousarray(rows.detach().to(torch.float32).numpy())
    out, _, heavy = _attend(queries, flat_keys[0], flat_values[0], flat_keys[1], n, scaling, floor, visible)
    return torch.from_numpy(out), heavy


def host_attention_with_lse(rows: np.ndarray, keys: np.ndarray, values: np.ndarray, n: int, scaling: float,
                            floor: float | None = None):
    """Attention of rows [KVH, R, D] float32 over the first n rows of host arrays keys/values
    [KVH, capacity, D] (float32 or bf16 bits as uint16, C-contiguous) with this module's kernel:
    (out [KVH, R, D], log-sum-exp [KVH, R], the keys weighing at least `floor` as `picked` returns
    them, or None), to merge with attention over other keys."""
    return _attend(rows, keys.reshape(-1), values.reshape(-1), keys.shape[1] * keys.shape[2], n, scaling, floor)


def _attend(queries, flat_keys, flat_values, head_stride: int, n: int, scaling: float, floor: float | None,
            visible: np.ndarray | None = None):
    """dense_decode_attention's outputs allocated and filled: (out, lse, picked keys or None)."""
    kv_heads, count = queries.shape[:2]
    out = np.empty_like(queries)
    lse = np.empty((kv_heads, count), np.float32)
    slots = 0 if floor is None else CHUNK if floor <= 0 else min(CHUNK, int(1.0 / floor) + 1)
    items = kv_heads * ((n + CHUNK - 1) // CHUNK)
    at, weights = np.empty((items, count, slots), np.int64), np.empty((items, count, slots), np.float32)
    visible = np.full(count, n, np.int64) if visible is None else np.minimum(visible, n).astype(np.int64)
    dense_decode_attention(queries, flat_keys, flat_values, head_stride, n, visible, np.float32(scaling), out, lse,
                           np.float32(floor or 0.0), at, weights)
    return out, lse, (None if floor is None else picked(at, weights, kv_heads))


def picked(at: np.ndarray, weights: np.ndarray, kv_heads: int) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's per-chunk picks [KVH x chunks, R, slots] as (positions, weights) [KVH, R,
    chunks x slots]: each row's keys at or above the floor, in any order (unused slots: key 0,
    weight 0 — they add nothing)."""
    count, slots = at.shape[1:]

    def per_row(x):
        return x.reshape(kv_heads, -1, count, slots).transpose(0, 2, 1, 3).reshape(kv_heads, count, -1)

    return per_row(at), per_row(weights)
