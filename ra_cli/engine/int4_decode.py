"""Decode-time products with int4 weight groups on a CPU: tiles of 16 output rows, one AVX-512
vector of sums each.

A decode step multiplies one row (or a few) by every weight matrix, so it costs the weight bytes
streamed from memory. torch's int4 kernel (`_weight_int4pack_mm_for_cpu`) took ~3.0 ms of a 9 ms
short-context step of the embedded model (120 calls a token, ~25 us each; benchmarks/decode_profile.py
on the code before this module). A plain numba loop over nibbles does not vectorize (a one-off
prototype ran 8-10x slower than torch's kernel: LLVM keeps it scalar), so the inner step is written
as vector IR: for a tile of 16 output rows and a group of 32 inputs, 16 bytes hold input j of
every row in their low nibbles and input j + 16 in their high nibbles; each byte vector is widened
to two float vectors and multiplied into the 16 row sums by the input broadcast. No horizontal
sum anywhere: a tile's 16 results come out as one vector store.

Weights: w = low + q * step per group of 32 inputs (GGUF Q4 blocks dequantize exactly to this),
q in 0..15, step and low kept in bfloat16 as torch's int4 layout keeps them. Activations and sums
stay float32; the result is rounded to the activations' dtype once. `benchmarks/decode_weights.py
int4` times this kernel against torch's.
"""

from __future__ import annotations

import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ra_cli.intrinsics import bf16_bits

TILE = 16  # output rows per tile: one vector of float32 sums
GROUP = 32  # inputs per scale (the GGUF block size)


def pack_int4_tiles(q: torch.Tensor, step: torch.Tensor, low: torch.Tensor):
    """q [N, K] in 0..15, step/low [N, K/32] -> (tiles [T, K/32, 16, 16] uint8, step and low
    [T, K/32, 16] bfloat16), T = ceil(N / 16): byte [t, g, j, r] holds q of row 16t + r at input
    32g + j (low nibble) and 32g + 16 + j (high nibble). Rows past N are zero."""
    n, k = q.shape
    tiles = -(-n // TILE)
    pad = tiles * TILE - n
    q = torch.nn.functional.pad(q.to(torch.uint8), (0, 0, 0, pad)).reshape(tiles, TILE, k // GROUP, 2, GROUP // 2)
    nibbles = q[:, :, :, 0] | (q[:, :, :, 1] << 4)  # [T, 16 rows, G, 16 j]
    packed = nibbles.permute(0, 2, 3, 1).contiguous()

    def per_tile(values):
        values = torch.nn.functional.pad(values.float(), (0, 0, 0, pad)).reshape(tiles, TILE, k // GROUP)
        return values.transpose(1, 2).contiguous().to(torch.bfloat16)

    return packed, per_tile(step), per_tile(low)


@intrinsic
def _tile_product(typingctx, tiles, t, x, sums, r, step, low, out):
    """out[r, 16t: 16t + 16] = tile t of tiles [T, G, 16, 16] uint8 times x[r] [G * 32] float32,
    with step/low [T, G, 16] bfloat16 bits (uint16) and sums[r] [G] the group sums of x[r]."""
    signature = types.void(tiles, t, x, sums, r, step, low, out)

    def codegen(context, builder, sig, args):
        arrays = [context.make_array(sig.args[i])(context, builder, args[i]) for i in (0, 2, 3, 5, 6, 7)]
        tiles_a, x_a, sums_a, step_a, low_a, out_a = arrays
        i64, i32, i16, i8, f32 = ir.IntType(64), ir.IntType(32), ir.IntType(16), ir.IntType(8), ir.FloatType()
        floats, ints = ir.VectorType(f32, TILE), ir.VectorType(i32, TILE)
        fma = builder.module.declare_intrinsic(f"llvm.fma.v{TILE}f32", fnty=ir.FunctionType(floats, [floats] * 3))

        def wide(value):
            return builder.sext(value, i64) if value.type != i64 else value

        def const(value):
            return ir.Constant(i64, value)

        t_, r_ = wide(args[1]), wide(args[4])
        groups = builder.extract_value(tiles_a.shape, 1)
        first = builder.mul(t_, groups)  # tile t's first group
        x_row = builder.gep(x_a.data, [builder.mul(r_, builder.extract_value(x_a.shape, 1))])
        sums_row = builder.gep(sums_a.data, [builder.mul(r_, groups)])
        nibble_rows = builder.bitcast(builder.gep(tiles_a.data, [builder.mul(first, const(TILE * TILE))]),
                                      ir.VectorType(i8, TILE).as_pointer())
        step_rows = builder.bitcast(builder.gep(step_a.data, [builder.mul(first, const(TILE))]),
                                    ir.VectorType(i16, TILE).as_pointer())
        low_rows = builder.bitcast(builder.gep(low_a.data, [builder.mul(first, const(TILE))]),
                                   ir.VectorType(i16, TILE).as_pointer())
        undefined = ir.Constant(floats, ir.Undefined)
        zero = ir.Constant(floats, [0.0] * TILE)

        def broadcast(value):
            return builder.shuffle_vector(builder.insert_element(undefined, value, ir.Constant(i32, 0)), undefined,
                                          ir.Constant(ints, [0] * TILE))

        def bf16_vector(pointer):  # 16 bfloat16 bits -> 16 float32: the bits are the upper halves
            bits = builder.zext(builder.load(pointer, align=2), ints)
            return builder.bitcast(builder.shl(bits, ir.Constant(ints, [16] * TILE)), floats)

        total = cgutils.alloca_once_value(builder, zero)
        with cgutils.for_range(builder, groups) as loop:
            g = loop.index
            inputs = builder.gep(x_row, [builder.mul(g, const(GROUP))])
            partial = [zero] * 4  # four chains: the adds of one chain wait on each other
            for j in range(GROUP // 2):
                byte = builder.load(builder.gep(nibble_rows, [builder.add(builder.mul(g, const(GROUP // 2)), const(j))]),
                                    align=1)
                byte = builder.zext(byte, ints)
                low_q = builder.uitofp(builder.and_(byte, ir.Constant(ints, [15] * TILE)), floats)
                high_q = builder.uitofp(builder.lshr(byte, ir.Constant(ints, [4] * TILE)), floats)
                low_x = broadcast(builder.load(builder.gep(inputs, [const(j)])))
                high_x = broadcast(builder.load(builder.gep(inputs, [const(GROUP // 2 + j)])))
                partial[2 * j % 4] = builder.call(fma, [low_q, low_x, partial[2 * j % 4]])
                partial[(2 * j + 1) % 4] = builder.call(fma, [high_q, high_x, partial[(2 * j + 1) % 4]])
            quantized = builder.fadd(builder.fadd(partial[0], partial[1]), builder.fadd(partial[2], partial[3]))
            # sum of (low + q step) x over the group = step (q . x) + low (sum of x)
            running = builder.call(fma, [bf16_vector(builder.gep(step_rows, [g])), quantized, builder.load(total)])
            group_sum = broadcast(builder.load(builder.gep(sums_row, [g])))
            builder.store(builder.call(fma, [bf16_vector(builder.gep(low_rows, [g])), group_sum, running]), total)
        width = builder.extract_value(out_a.shape, 1)
        target = builder.gep(out_a.data, [builder.add(builder.mul(r_, width), builder.mul(t_, const(TILE)))])
        builder.store(builder.load(total), builder.bitcast(target, floats.as_pointer()), align=4)
        return context.get_dummy_value()

    return signature, codegen


@njit(cache=True, nogil=True, fastmath=True)
def _group_sums(x):
    """[R, K / 32]: each row's sum over each group of 32 inputs (what the groups' lows multiply)."""
    sums = np.zeros((x.shape[0], x.shape[1] // GROUP), np.float32)
    for r in range(x.shape[0]):
        for i in range(x.shape[1]):
            sums[r, i // GROUP] += x[r, i]
    return sums


@njit(cache=True, nogil=True, fastmath=True, inline="always")
def int4_product(x, tiles, step, low, out):
    """out [R, 16 T] float32 = x [R, K] float32 times the int4 tiles (pack_int4_tiles; step/low as
    uint16 bits); every array C-contiguous, K = 32 G. Each tile is read from memory once for all R
    rows (the rows after the first find it in L1). Inlined into its callers, whose parallel region
    its prange becomes (numba: a cached function calling a parallel one can crash when loaded
    from its cache, numba issue 8578, so parallel kernels are never called from jitted code)."""
    sums = _group_sums(x)
    for t in prange(tiles.shape[0]):
        for r in range(x.shape[0]):
            _tile_product(tiles, t, x, sums, r, step, low, out)


@njit(cache=True, parallel=True, nogil=True, fastmath=True)
def int4_tiles_matmul(x, tiles, step, low, out):
    """int4_product as a parallel kernel of its own (PackedLinear's calls from Python)."""
    int4_product(x, tiles, step, low, out)


def int4_views(tiles: torch.Tensor, step: torch.Tensor, low: torch.Tensor):
    """The arrays int4_tiles_matmul reads, viewed once (a caller keeps them: converting on every
    call costs microseconds, 120 calls a token)."""
    return np.ascontiguousarray(tiles.numpy()), bf16_bits(step), bf16_bits(low)


def int4_matmul(rows: torch.Tensor, views, out_features: int) -> torch.Tensor:
    """rows [R, K] times the int4 weights `views` (int4_views) -> [R, out_features] in rows' dtype."""
    tiles, step, low = views
    x = np.ascontiguousarray(rows.detach().to(torch.float32).numpy())
    out = np.empty((x.shape[0], tiles.shape[0] * TILE), np.float32)
    int4_tiles_matmul(x, tiles, step, low, out)
    return torch.from_numpy(out[:, :out_features]).to(rows.dtype)
