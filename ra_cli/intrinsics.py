"""LLVM instructions numba does not expose: a software prefetch, the CPU's cycle counter, atomic
operations on int64 arrays (workers of one parallel kernel taking tasks from a shared queue), the
bfloat16 -> float32 bit
conversion (so kernels can read bf16 arrays, stored as uint16, without a float32 copy), and an
int32 -> float32 bit cast (a vectorizable exp builds its power of two from the exponent bits);
and `widen`, a stored KV element as float32, for kernels over float32 or bf16 arrays alike; on the
host side, `bf16_bits`, a bfloat16 tensor as the uint16 array those kernels read. Shared by the
index's search, the retrieval kernels, dense decode attention, the store and the decode weights."""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload


@intrinsic
def prefetch(typingctx, array, index):
    """Ask the CPU to start loading the cache line of array.flat[index] (read, keep in cache):
    independent loads then overlap instead of each stalling the search on DRAM latency."""
    signature = types.void(array, index)

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        address = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(8).as_pointer())
        int32 = ir.IntType(32)
        function_type = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), int32, int32, int32])
        function = builder.module.declare_intrinsic("llvm.prefetch", fnty=function_type)
        builder.call(function, [address, ir.Constant(int32, 0), ir.Constant(int32, 3), ir.Constant(int32, 1)])
        return context.get_dummy_value()

    return signature, codegen


@intrinsic
def cycles(typingctx):
    """The CPU's time-stamp counter (int64): how a parallel kernel's worker splits its own time
    between two kinds of work, where no Python clock can look."""
    signature = types.int64()

    def codegen(context, builder, sig, args):
        function = builder.module.declare_intrinsic("llvm.readcyclecounter", fnty=ir.FunctionType(ir.IntType(64), []))
        return builder.call(function, [])

    return signature, codegen


def _int64_cell(context, builder, sig, args):
    """The address of int64 array args[0] at index args[1] (any integer type)."""
    index = context.cast(builder, args[1], sig.args[1], types.int64)
    return builder.gep(context.make_array(sig.args[0])(context, builder, args[0]).data, [index])


def _cell_and_value(context, builder, sig, args):
    """_int64_cell, and args[2] (any integer type) as the int64 to write there."""
    return _int64_cell(context, builder, sig, args), context.cast(builder, args[2], sig.args[2], types.int64)


def _int64_array(array, *integers):
    return isinstance(array, types.Array) and array.dtype == types.int64 and all(
        isinstance(value, types.Integer) for value in integers)


@intrinsic
def atomic_add(typingctx, array, index, value):
    """array[index] += value as one indivisible step between threads; returns the value before."""
    if not _int64_array(array, index, value):
        return None
    signature = types.int64(array, index, value)

    def codegen(context, builder, sig, args):
        return builder.atomic_rmw("add", *_cell_and_value(context, builder, sig, args), "seq_cst")

    return signature, codegen


@intrinsic
def atomic_load(typingctx, array, index):
    """array[index], read afresh every time (never hoisted out of a wait loop), and every write
    the other thread made before its atomic_store of it visible after."""
    if not _int64_array(array, index):
        return None
    signature = types.int64(array, index)

    def codegen(context, builder, sig, args):
        return builder.load_atomic(_int64_cell(context, builder, sig, args), "acquire", 8)

    return signature, codegen


@intrinsic
def atomic_store(typingctx, array, index, value):
    """array[index] = value, after every write this thread made before it (see atomic_load)."""
    if not _int64_array(array, index, value):
        return None
    signature = types.void(array, index, value)

    def codegen(context, builder, sig, args):
        cell, value = _cell_and_value(context, builder, sig, args)
        builder.store_atomic(value, cell, "release", 8)
        return context.get_dummy_value()

    return signature, codegen


@intrinsic
def bf16_to_float32(typingctx, bits):
    """The float32 whose upper 16 bits are `bits` (uint16): exact for every bfloat16 value."""
    signature = types.float32(types.uint16)

    def codegen(context, builder, sig, args):
        wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(wide, ir.FloatType())

    return signature, codegen


@intrinsic
def float32_from_bits(typingctx, bits):
    """The float32 whose bits are `bits` (int32)."""
    signature = types.float32(types.int32)

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return signature, codegen


def widen(x):
    """A stored KV element as float32: bfloat16 bits (uint16) are widened exactly, floats pass."""
    return x


@overload(widen, inline="always")
def _widen(x):
    if x == types.uint16:
        return lambda x: bf16_to_float32(x)
    return lambda x: x


def bf16_bits(tensor):
    """A CPU bfloat16 tensor's bits as a uint16 numpy array (the same memory when contiguous)."""
    import numpy as np
    import torch

    return tensor.contiguous().view(torch.int16).numpy().view(np.uint16)
