"""Decode-time products with int8 weight rows on a CPU, in one numba pass.

A decode step multiplies a row or a few by every weight matrix, so it costs the weight bytes
streamed from memory. torch's int8 weight-only kernel (`_weight_int8pack_mm`) moves them at
~28-32 GB/s here; a plain loop per output row (int8 widened to float32 in registers, one dot
with the float32 activations, the row's scale after) moves them at ~38-46 GB/s on the same
shapes (`benchmarks/decode_weights.py int8` times both in one run). Sums stay in float32: the result is
rounded to the activations' dtype once, at the end.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from ra_cli.intrinsics import bf16_bits, widen

BLOCK = 64  # output rows per work item: enough items to balance threads on the smallest matrix (q|k|v)
SMALLEST = 1 << 20  # weight bytes below which torch's kernel wins: a call here costs a few microseconds more
# (benchmarks/decode_weights.py int8, `call`: slower at 896 x 896, about even at 896 x 1152, faster above)


@njit(cache=True, nogil=True, fastmath=True)
def _row_dot(features, weight):
    """features [K] float32 . weight [K] int8, summed in float32."""
    total = np.float32(0.0)
    for i in range(features.shape[0]):
        total += features[i] * np.float32(weight[i])
    return total


@njit(cache=True, nogil=True, fastmath=True, inline="always")
def int8_product(x, weights, scales, out):
    """out[r, n] = scales[n] * (x[r] . weights[n]) for x [R, K] float32, weights [N, K] int8,
    scales [N] float32 or bf16 bits (uint16); out [R, N] float32. Each weight row is read from
    memory once for all R rows. Inlined into its callers' parallel regions (int4_decode.int4_product
    says why)."""
    rows, outputs = x.shape[0], weights.shape[0]
    for block in prange((outputs + BLOCK - 1) // BLOCK):
        for n in range(block * BLOCK, min(outputs, (block + 1) * BLOCK)):
            weight = weights[n]
            scale = widen(scales[n])
            for r in range(rows):
                out[r, n] = _row_dot(x[r], weight) * scale


@njit(cache=True, parallel=True, nogil=True, fastmath=True)
def int8_rows_matmul(x, weights, scales, out):
    """int8_product as a parallel kernel of its own (PackedLinear's calls from Python)."""
    int8_product(x, weights, scales, out)


def int8_views(weights: torch.Tensor, scales: torch.Tensor):
    """The arrays int8_rows_matmul reads (scales as bf16 bits or float32), or None where it cannot
    read the weights in place (not on a CPU, not contiguous). A caller keeps them: converting on
    every call costs microseconds."""
    if weights.device.type != "cpu" or not weights.is_contiguous() or scales.dtype not in (torch.bfloat16, torch.float32):
        return None
    return weights.numpy(), bf16_bits(scales) if scales.dtype == torch.bfloat16 else scales.contiguous().numpy()


def int8_matmul(rows: torch.Tensor, weights: torch.Tensor, scales: torch.Tensor, smallest: int = SMALLEST,
                views=None) -> torch.Tensor | None:
    """rows [R, K] @ (weights [N, K] int8 * scales [N])^T in rows' dtype, or None where this kernel
    does not apply (not a CPU, a layout it cannot read in place) or would not pay (fewer than
    `smallest` weight bytes). `views`: int8_views of the same weights, kept by the caller."""
    if rows.device.type != "cpu" or weights.numel() < smallest:
        return None
    views = views or int8_views(weights, scales)  # after the size check: small matrices need no views
    if views is None:
        return None
    x = np.ascontiguousarray(rows.detach().to(torch.float32).numpy())
    out = np.empty((x.shape[0], weights.shape[0]), np.float32)
    int8_rows_matmul(x, *views, out)
    return torch.from_numpy(out).to(rows.dtype)
