"""One decode token through a decoder layer on a CPU: two numba calls around its attention.

Every matrix of a decode step is a GEMV over int4 or int8 weights, which numba kernels stream at
memory speed (int4_decode.py, int8_decode.py). What was left around them was glue: a short-
context step of the embedded model spent ~2.6 ms a token in the ~6,000 small tensor-op calls
around its matrices (RMSNorm as eight ops, rotary as six, dtype round trips before and after every
projection; benchmarks/decode_profile.py), about what its weights take to stream (~2.4 ms). Here the work before attention (RMSNorm, q|k|v, bias, rotary) and
after it (output projection, residual, RMSNorm, gate|up, SiLU x up, down, residual) are one call
each, in float32 throughout; attention stays with the cache layers (dense or retrieval).
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from ra_cli.engine.int4_decode import TILE, int4_product
from ra_cli.engine.int8_decode import int8_product

NO_BIAS = np.zeros(0, np.float32)


def project(x, weights):
    """x [K] float32 times a layer's decode weights (PackedLinear.host_weights) -> float32 [>= N]
    (int4 tiles pad the outputs to a multiple of 16)."""


@overload(project, inline="always")
def _project(x, weights):
    if isinstance(weights, types.BaseTuple) and len(weights) == 3:  # int4: tiles, step bits, low bits
        def int4(x, weights):
            tiles, step, low = weights
            out = np.empty((1, tiles.shape[0] * TILE), np.float32)
            int4_product(x.reshape(1, x.shape[0]), tiles, step, low, out)
            return out[0]
        return int4

    def int8(x, weights):  # int8 rows, scales
        rows, scales = weights
        out = np.empty((1, rows.shape[0]), np.float32)
        int8_product(x.reshape(1, x.shape[0]), rows, scales, out)
        return out[0]
    return int8


@njit(cache=True, nogil=True, fastmath=True)
def rms_norm(x, weight, eps):
    """x / sqrt(mean(x^2) + eps) * weight, float32."""
    total = np.float32(0.0)
    for i in range(x.shape[0]):
        total += x[i] * x[i]
    inverse = np.float32(1.0) / np.sqrt(total / np.float32(x.shape[0]) + np.float32(eps))
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = x[i] * inverse * weight[i]
    return out


@njit(cache=True, nogil=True, fastmath=True)
def _add_bias(values, bias):
    for i in range(bias.shape[0]):
        values[i] += bias[i]


@njit(cache=True, parallel=True, nogil=True, fastmath=True)
def before_attention(x, norm, eps, qkv, qkv_bias, cos, sin, heads, kv_heads):
    """Normed x through q|k|v (+ bias), q and k rotated by cos/sin [D] (rotate-half, as Llama and
    Qwen2 do): returns query [H, D], key and value [KVH, D], float32."""
    dim = cos.shape[0]
    half = dim // 2
    projected = project(rms_norm(x, norm, eps), qkv)
    _add_bias(projected, qkv_bias)
    rotated = np.empty((heads + kv_heads, dim), np.float32)
    for h in range(heads + kv_heads):
        row = projected[h * dim: (h + 1) * dim]
        for i in range(half):
            rotated[h, i] = row[i] * cos[i] - row[i + half] * sin[i]
            rotated[h, i + half] = row[i + half] * cos[i + half] + row[i] * sin[i + half]
    value = projected[(heads + kv_heads) * dim: (heads + 2 * kv_heads) * dim].copy().reshape(kv_heads, dim)
    return rotated[:heads], rotated[heads:], value


@njit(cache=True, parallel=True, nogil=True, fastmath=True)
def after_attention(x, attended, out, out_bias, norm, eps, gate_up, gate_up_bias, down, down_bias, inner):
    """x (the residual stream, updated in place) += attended [H * D] through the output projection;
    then x += down(SiLU(gate) * up) of the normed x, `inner` the MLP width."""
    mixed = project(attended, out)
    _add_bias(mixed, out_bias)
    for i in range(x.shape[0]):
        x[i] += mixed[i]
    both = project(rms_norm(x, norm, eps), gate_up)
    _add_bias(both, gate_up_bias)
    activated = np.empty(inner, np.float32)
    for i in range(inner):
        gate = both[i]
        activated[i] = gate / (np.float32(1.0) + np.exp(-gate)) * both[inner + i]
    result = project(activated, down)
    _add_bias(result, down_bias)
    for i in range(x.shape[0]):
        x[i] += result[i]


@njit(cache=True, parallel=True, nogil=True, fastmath=True)
def final_logits(x, norm, eps, head, head_bias, vocab):
    """The last RMSNorm and the output head: logits [vocab] float32."""
    logits = project(rms_norm(x, norm, eps), head)[:vocab]
    _add_bias(logits, head_bias)
    return logits
