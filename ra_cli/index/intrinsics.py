"""Two LLVM instructions numba does not expose: a software prefetch, and the bfloat16 -> float32
bit conversion (so kernels can read bf16 arrays, stored as uint16, without a float32 copy)."""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic


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
def bf16_to_float32(typingctx, bits):
    """The float32 whose upper 16 bits are `bits` (uint16): exact for every bfloat16 value."""
    signature = types.float32(types.uint16)

    def codegen(context, builder, sig, args):
        wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(wide, ir.FloatType())

    return signature, codegen
