"""The LLVM code generation the one-query kernel needs that numba has no public API for (numba and llvmlite
internals, isolated here; tests/test_single_query.py fails loudly when they drift): a fixed-size array on the
stack, which LLVM keeps in registers, 512-bit vectors for one function, and a prefetch."""

from __future__ import annotations

from llvmlite import ir as llvm_ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

# LLVM's x86 backend uses 256-bit vectors on AVX-512 machines unless a function asks for more (its default
# guards against the clock slowdown of 512-bit instructions on old Xeons; the outer-product kernel gains 2x).
_PREFER_512_BIT = '"prefer-vector-width"="512"'


@intrinsic
def stack_array(typingctx, size):
    """A float32 pointer to `size` (a literal) elements on the caller's stack: wrap with `numba.carray`. Unlike
    `numpy.empty`, its elements become registers once its indices are constants (after unrolling)."""
    if not isinstance(size, types.IntegerLiteral):
        return None
    count = size.literal_value

    def codegen(context, builder, signature, arguments):
        return cgutils.alloca_once(builder, context.get_value_type(types.float32), size=count)

    return types.CPointer(types.float32)(size), codegen


@intrinsic
def wide_vectors(typingctx):
    """Let LLVM vectorise the calling function with 512-bit registers where the machine has them (no effect
    elsewhere), and keep it out of line so that callers compiled for 256 bits do not absorb it."""

    def codegen(context, builder, signature, arguments):
        attributes = builder.function.attributes
        # llvmlite accepts only the attributes it knows; LLVM reads this string attribute per function.
        attributes._known = attributes._known | {_PREFER_512_BIT}
        attributes.add(_PREFER_512_BIT)
        attributes.add("noinline")
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def prefetch(typingctx, address):
    """Ask the caches for the line at integer `address` ahead of its reading: a hint, which never faults."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, signature, arguments):
        pointer_type = llvm_ir.IntType(8).as_pointer()
        flag = llvm_ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module,
            llvm_ir.FunctionType(llvm_ir.VoidType(), [pointer_type, flag, flag, flag]),
            "llvm.prefetch.p0i8",
        )
        # a read, to be kept in all cache levels, of data
        builder.call(function, [builder.inttoptr(arguments[0], pointer_type), flag(0), flag(3), flag(1)])
        return context.get_dummy_value()

    return types.none(address), codegen
