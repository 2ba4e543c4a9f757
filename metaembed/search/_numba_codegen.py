"""The LLVM code generation the one-query kernel needs that numba has no public API for (numba and llvmlite
internals, isolated here; tests/test_single_query.py fails loudly when they drift): the outer product's dots
written out as LLVM vector code (512-bit vectors), a prefetch, and views of arrays without numba's reference
counts (`unowned`, whose owners `keep_alive` holds until the views' last use: numba counts references atomically,
per inlined helper and candidate); for the batch kernel, a fixed-size array on the stack, which LLVM keeps in
registers, and 512-bit vectors preferred by its vectoriser for one function."""

from __future__ import annotations

from llvmlite import ir as llvm_ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

# LLVM's x86 backend splits 512-bit vectors in two on AVX-512 machines unless a function asks for them (its default
# guards against the clock slowdown of 512-bit instructions on old Xeons; the outer product gains 2x with them).
# This attribute makes them legal for the function holding the outer product, leaving its vectoriser's choices.
_LEGAL_512_BIT = '"min-legal-vector-width"="512"'
# For the batch kernel, written as plain loops: LLVM's vectoriser picks 512-bit vectors only where asked.
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
        _add_function_attributes(builder, _PREFER_512_BIT, "noinline")
        return context.get_dummy_value()

    return types.none(), codegen


def _add_function_attributes(builder, *names: str) -> None:
    attributes = builder.function.attributes
    # llvmlite accepts only the attributes it knows; LLVM reads string attributes such as these per function.
    attributes._known = attributes._known | set(names)
    for name in names:
        attributes.add(name)


@intrinsic
def prefetch(typingctx, address):
    """Ask the caches for the line at integer `address` ahead of its reading: a hint, which never faults."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, signature, arguments):
        _emit_prefetch(builder, arguments[0])
        return context.get_dummy_value()

    return types.none(address), codegen


def _emit_prefetch(builder, address) -> None:
    byte_pointer, flag = llvm_ir.IntType(8).as_pointer(), llvm_ir.IntType(32)
    function = cgutils.get_or_insert_function(
        builder.module, llvm_ir.FunctionType(llvm_ir.VoidType(), [byte_pointer, flag, flag, flag]), "llvm.prefetch.p0i8"
    )
    # a read, to be kept in all cache levels, of data
    builder.call(function, [builder.inttoptr(address, byte_pointer), flag(0), flag(3), flag(1)])


@intrinsic
def widen_halves(typingctx, halves, count, vectors, first):
    """`vectors[first:first + count] = halves[:count]` as float32, for float16 bits `halves` (uint16, `[w, D]`,
    C-contiguous rows) and a float32 or uint32 (its bits) buffer `vectors [rows, D]`: sixteen at a time by
    `fpext <16 x half>` (vcvtph2ps: exact, subnormals included, one instruction where the bit trick takes five
    and a query scaled by 2**112). Needs F16C (every AVX-512 machine has it: the outer-product kernels only)."""
    if not (isinstance(halves, types.Array) and halves.dtype == types.uint16 and isinstance(vectors, types.Array)):
        return None
    if vectors.dtype not in (types.float32, types.uint32):
        return None

    def codegen(context, builder, signature, arguments):
        index_type, half = llvm_ir.IntType(64), llvm_ir.HalfType()
        row_count, first_row = (
            context.cast(builder, arguments[position], signature.args[position], types.int64) for position in (1, 3)
        )
        structure = context.make_array(signature.args[0])(context, builder, arguments[0])
        dim = cgutils.unpack_tuple(builder, structure.shape, 2)[1]
        source = builder.bitcast(structure.data, half.as_pointer())
        target, _ = _row_pointer(context, builder, signature.args[2], arguments[2], first_row)
        total = builder.mul(row_count, dim)
        whole = builder.and_(total, index_type(-_LANES))
        halves_vector, lane_vector = llvm_ir.VectorType(half, _LANES), _lane_vector()
        with cgutils.for_range_slice(builder, index_type(0), whole, index_type(_LANES)) as (element, _):
            loaded = builder.load(builder.bitcast(builder.gep(source, [element]), halves_vector.as_pointer()), align=2)
            widened = builder.fpext(loaded, lane_vector)
            builder.store(widened, builder.bitcast(builder.gep(target, [element]), lane_vector.as_pointer()), align=4)
        with cgutils.for_range_slice(builder, whole, total, index_type(1)) as (element, _):
            widened = builder.fpext(builder.load(builder.gep(source, [element]), align=2), llvm_ir.FloatType())
            builder.store(widened, builder.gep(target, [element]), align=4)
        _add_function_attributes(builder, _LEGAL_512_BIT)
        return context.get_dummy_value()

    return types.none(halves, count, vectors, first), codegen


@intrinsic
def widen_offset(typingctx, halves, offset):
    """`offset = halves` as float32, even elements first, then odd ones (the order 4-bit codes are decoded in),
    for float16 bits `halves` (uint16 `[D]`, contiguous) and a float32 or uint32 (its bits) `offset [D]`: 32 at a
    time by `fpext` (vcvtph2ps) and two shuffles, then one by one. Needs F16C (the outer-product kernels only)."""
    if not (isinstance(halves, types.Array) and halves.dtype == types.uint16 and isinstance(offset, types.Array)):
        return None
    if offset.dtype not in (types.float32, types.uint32):
        return None

    def codegen(context, builder, signature, arguments):
        index_type, half, single = llvm_ir.IntType(64), llvm_ir.HalfType(), llvm_ir.FloatType()
        structure = context.make_array(signature.args[0])(context, builder, arguments[0])
        dim = cgutils.unpack_tuple(builder, structure.shape, 1)[0]
        source = builder.bitcast(structure.data, half.as_pointer())
        target = _float_pointer(context, builder, signature, arguments, 1)
        pairs = builder.ashr(dim, index_type(1))
        whole = builder.and_(dim, index_type(-2 * _LANES))
        pair_vector = llvm_ir.VectorType(half, 2 * _LANES)
        with cgutils.for_range_slice(builder, index_type(0), whole, index_type(2 * _LANES)) as (element, _):
            loaded = builder.load(builder.bitcast(builder.gep(source, [element]), pair_vector.as_pointer()), align=2)
            widened = builder.fpext(loaded, llvm_ir.VectorType(single, 2 * _LANES))
            pair = builder.ashr(element, index_type(1))
            for parity, first in ((0, pair), (1, builder.add(pairs, pair))):
                split = builder.shuffle_vector(
                    widened, widened, _lane_mask([2 * lane + parity for lane in range(_LANES)])
                )
                builder.store(split, builder.bitcast(builder.gep(target, [first]), _lane_vector().as_pointer()), 4)
        with cgutils.for_range_slice(builder, whole, dim, index_type(1)) as (element, _):
            widened = builder.fpext(builder.load(builder.gep(source, [element]), align=2), single)
            parity = builder.and_(element, index_type(1))
            place = builder.add(builder.mul(parity, pairs), builder.ashr(element, index_type(1)))
            builder.store(widened, builder.gep(target, [place]), align=4)
        _add_function_attributes(builder, _LEGAL_512_BIT)
        return context.get_dummy_value()

    return types.none(halves, offset), codegen


def _float_pointer(context, builder, signature, arguments, position):
    array = context.make_array(signature.args[position])(context, builder, arguments[position])
    return builder.bitcast(array.data, llvm_ir.FloatType().as_pointer())


@intrinsic
def widen_nibbles(typingctx, codes, count, scales, table, offset, vectors, first):
    """`vectors[first + r] = table[code] * scales[r] + offset` for the 4-bit codes of `codes[:count]` (uint8
    `[w, D / 2]`, C-contiguous rows, two codes a byte: low nibbles the even elements, high nibbles the odd ones,
    written as [even elements, odd elements]), float32 `scales [w]`, `table [16]` (the code values), `offset [D]`
    (zeros: none) and a float32 or uint32 (its bits) buffer `vectors [rows, D]`. Sixteen codes at a time: the
    table held in a register, looked up by vpermps (a scalar load per element otherwise), a multiply-add.
    AVX-512 only (the outer-product kernels)."""
    arrays = (codes, scales, table, offset, vectors)
    if not all(isinstance(array, types.Array) for array in arrays) or codes.dtype != types.uint8:
        return None
    if vectors.dtype not in (types.float32, types.uint32):
        return None

    def codegen(context, builder, signature, arguments):
        index_type, byte, word, single = (
            llvm_ir.IntType(64),
            llvm_ir.IntType(8),
            llvm_ir.IntType(32),
            llvm_ir.FloatType(),
        )
        lane_vector, index_vector = _lane_vector(), llvm_ir.VectorType(word, _LANES)
        row_count, first_row = (
            context.cast(builder, arguments[position], signature.args[position], types.int64) for position in (1, 6)
        )
        code_array = context.make_array(signature.args[0])(context, builder, arguments[0])
        pairs = cgutils.unpack_tuple(builder, code_array.shape, 2)[1]
        code_pointer = builder.bitcast(code_array.data, byte.as_pointer())
        scale_pointer, table_pointer, offset_pointer = (
            builder.bitcast(
                context.make_array(signature.args[position])(context, builder, arguments[position]).data,
                single.as_pointer(),
            )
            for position in (2, 3, 4)
        )
        target, row_stride = _row_pointer(context, builder, signature.args[5], arguments[5], first_row)
        permute = cgutils.get_or_insert_function(
            builder.module,
            llvm_ir.FunctionType(lane_vector, [lane_vector, index_vector]),
            "llvm.x86.avx512.permvar.sf.512",
        )
        fma = cgutils.get_or_insert_function(
            builder.module, llvm_ir.FunctionType(lane_vector, [lane_vector] * 3), f"llvm.fma.v{_LANES}f32"
        )
        scalar_fma = cgutils.get_or_insert_function(
            builder.module, llvm_ir.FunctionType(single, [single] * 3), "llvm.fma.f32"
        )
        values = builder.load(builder.bitcast(table_pointer, lane_vector.as_pointer()), align=4)
        whole = builder.and_(pairs, index_type(-_LANES))
        with cgutils.for_range(builder, row_count) as row_loop:
            row = row_loop.index
            scale = builder.load(builder.gep(scale_pointer, [row]))
            scale_vector = builder.shuffle_vector(
                builder.insert_element(llvm_ir.Constant(lane_vector, None), scale, word(0)),
                llvm_ir.Constant(lane_vector, None),
                _lane_mask([0] * _LANES),
            )
            source = builder.gep(code_pointer, [builder.mul(row, pairs)])
            output = builder.gep(target, [builder.mul(row, row_stride)])
            with cgutils.for_range_slice(builder, index_type(0), whole, index_type(_LANES)) as (pair, _):
                loaded = builder.load(
                    builder.bitcast(builder.gep(source, [pair]), llvm_ir.VectorType(byte, _LANES).as_pointer()), align=1
                )
                widened = builder.zext(loaded, index_vector)
                halves = (
                    (builder.and_(widened, llvm_ir.Constant(index_vector, [15] * _LANES)), pair),
                    (builder.lshr(widened, llvm_ir.Constant(index_vector, [4] * _LANES)), builder.add(pairs, pair)),
                )
                for indices, element in halves:
                    shift = builder.load(
                        builder.bitcast(builder.gep(offset_pointer, [element]), lane_vector.as_pointer()), align=4
                    )
                    decoded = builder.call(fma, [builder.call(permute, [values, indices]), scale_vector, shift])
                    builder.store(
                        decoded, builder.bitcast(builder.gep(output, [element]), lane_vector.as_pointer()), align=4
                    )
            with cgutils.for_range_slice(builder, whole, pairs, index_type(1)) as (pair, _):
                code = builder.zext(builder.load(builder.gep(source, [pair])), word)
                halves = ((builder.and_(code, word(15)), pair), (builder.lshr(code, word(4)), builder.add(pairs, pair)))
                for index, element in halves:
                    value = builder.load(builder.gep(table_pointer, [index]))
                    shift = builder.load(builder.gep(offset_pointer, [element]))
                    builder.store(builder.call(scalar_fma, [value, scale, shift]), builder.gep(output, [element]))
        _add_function_attributes(builder, _LEGAL_512_BIT)
        return context.get_dummy_value()

    return types.none(codes, count, scales, table, offset, vectors, first), codegen


_LANES = 16  # float32 lanes of a 512-bit register
_GROUPS = (1, 2, 4, 8, 16)  # query elements per lane group: 16 / (query vectors padded to a power of two)


def _row_pointer(context, builder, array_type, array, row):
    """A float pointer to row `row` of a 2D numba array of 32-bit elements, and its row stride in elements."""
    structure = context.make_array(array_type)(context, builder, array)
    row_stride = builder.sdiv(cgutils.unpack_tuple(builder, structure.strides, 2)[0], row.type(4))
    data = builder.bitcast(structure.data, llvm_ir.FloatType().as_pointer())
    return builder.gep(data, [builder.mul(row, row_stride)]), row_stride


@intrinsic
def grouped_dots(typingctx, out, query_lanes, vectors, first, per_step, fold_max, ahead, lines):
    """The dots of `per_step` (a literal) float32 vectors `vectors[first:first + per_step]` (`[w, D]`) with the
    query vectors packed in float32 `query_lanes` `[D / G, 16]` (G = D / its rows, one of 1, 2, 4, 8, 16; lane
    `slot * G + t` of row k holds element `k * G + t` of query vector `slot`). Each step loads one query row and,
    per vector, its G elements there broadcast to every slot (a broadcast load), multiply-added into sixteen-lane
    sums that stay in registers; after D / G steps log2(G) shuffle-adds (lane ^ 1, lane ^ 2, ...) fold each
    slot's G lanes, leaving the dot in every lane of its slot (no horizontal sum per dot). `fold_max` (a literal
    bool) True: `out[0] = max(out[0], the vectors' dots)` lane by lane; False: `out[v] = vector first + v's dots`.
    Step k < `lines` also prefetches the line at address `ahead + 64 k`. numba's vectoriser does not give this
    code (it gathers the G elements lane by lane), hence LLVM IR written out, a loop per G."""
    if not isinstance(per_step, types.IntegerLiteral) or not isinstance(fold_max, types.BooleanLiteral):
        return None
    vector_count, keep_max = per_step.literal_value, fold_max.literal_value

    def codegen(context, builder, signature, arguments):
        index_type = llvm_ir.IntType(64)
        first_row, ahead_address, line_count = (
            context.cast(builder, arguments[position], signature.args[position], types.int64) for position in (3, 6, 7)
        )
        out_pointer, _ = _row_pointer(context, builder, signature.args[0], arguments[0], index_type(0))
        query_pointer, _ = _row_pointer(context, builder, signature.args[1], arguments[1], index_type(0))
        vector_pointer, row_stride = _row_pointer(context, builder, signature.args[2], arguments[2], first_row)
        steps = cgutils.unpack_tuple(
            builder, context.make_array(signature.args[1])(context, builder, arguments[1]).shape, 2
        )[0]
        dim = cgutils.unpack_tuple(
            builder, context.make_array(signature.args[2])(context, builder, arguments[2]).shape, 2
        )[1]
        group = builder.sdiv(dim, steps)
        pointers = (builder.bitcast(out_pointer, _lane_vector().as_pointer()), query_pointer, vector_pointer)
        exit_block = builder.append_basic_block("grouped.exit")
        switch = builder.switch(group, exit_block)  # other groups: the caller's packing rules them out
        for group_size in _GROUPS:
            block = builder.append_basic_block(f"grouped.{group_size}")
            switch.add_case(index_type(group_size), block)
            builder.position_at_end(block)
            _emit_grouped_dots(
                builder, pointers, row_stride, steps, group_size, vector_count, keep_max, ahead_address, line_count
            )
            builder.branch(exit_block)
        builder.position_at_end(exit_block)
        _add_function_attributes(builder, _LEGAL_512_BIT)
        return context.get_dummy_value()

    return types.none(out, query_lanes, vectors, first, per_step, fold_max, ahead, lines), codegen


def _lane_vector() -> llvm_ir.VectorType:
    return llvm_ir.VectorType(llvm_ir.FloatType(), _LANES)


def _lane_mask(sources: list[int]) -> llvm_ir.Constant:
    """A shufflevector mask: lane i takes lane sources[i]."""
    return llvm_ir.Constant(llvm_ir.VectorType(llvm_ir.IntType(32), _LANES), sources)


def _emit_grouped_dots(builder, pointers, row_stride, steps, group_size, vector_count, keep_max, ahead, lines):
    out_pointer, query_pointer, vector_pointer = pointers
    lane_vector, index_type = _lane_vector(), llvm_ir.IntType(64)
    group_vector = llvm_ir.VectorType(llvm_ir.FloatType(), group_size)
    fma = cgutils.get_or_insert_function(
        builder.module, llvm_ir.FunctionType(lane_vector, [lane_vector] * 3), f"llvm.fma.v{_LANES}f32"
    )
    broadcast_mask = _lane_mask([lane % group_size for lane in range(_LANES)])
    entry = builder.basic_block
    loop = builder.append_basic_block(f"grouped.{group_size}.loop")
    builder.branch(loop)
    builder.position_at_end(loop)
    step = builder.phi(index_type)
    step.add_incoming(index_type(0), entry)
    sums = []
    for _ in range(vector_count):
        sums.append(builder.phi(lane_vector))
        sums[-1].add_incoming(llvm_ir.Constant(lane_vector, None), entry)
    query_row = builder.gep(query_pointer, [builder.mul(step, index_type(_LANES))])
    query_row = builder.load(builder.bitcast(query_row, lane_vector.as_pointer()), align=4)
    element = builder.mul(step, index_type(group_size))
    updated = []
    for vector, total in enumerate(sums):
        address = builder.gep(vector_pointer, [builder.add(builder.mul(index_type(vector), row_stride), element)])
        loaded = builder.load(builder.bitcast(address, group_vector.as_pointer()), align=4)
        broadcast = builder.shuffle_vector(loaded, llvm_ir.Constant(group_vector, None), broadcast_mask)
        updated.append(builder.call(fma, [query_row, broadcast, total]))
    with builder.if_then(builder.icmp_signed("<", step, lines), likely=False):
        _emit_prefetch(builder, builder.add(ahead, builder.mul(step, index_type(64))))
    latch = builder.basic_block
    following = builder.add(step, index_type(1))
    step.add_incoming(following, latch)
    for phi, total in zip(sums, updated):
        phi.add_incoming(total, latch)
    done = builder.append_basic_block(f"grouped.{group_size}.done")
    builder.cbranch(builder.icmp_signed("<", following, steps), loop, done)
    builder.position_at_end(done)
    folded = []
    for total in updated:
        shift = 1
        while shift < group_size:
            total = builder.fadd(
                total, builder.shuffle_vector(total, total, _lane_mask([lane ^ shift for lane in range(_LANES)]))
            )
            shift *= 2
        folded.append(total)
    if keep_max:
        best = builder.load(out_pointer, align=4)
        for total in folded:
            best = builder.select(builder.fcmp_ordered(">", total, best), total, best)
        builder.store(best, out_pointer, align=4)
    else:
        for vector, total in enumerate(folded):
            builder.store(total, builder.gep(out_pointer, [index_type(vector)]), align=4)


def _arrays_only(value) -> bool:
    if isinstance(value, types.BaseTuple):
        return all(_arrays_only(element) for element in value.types)
    return isinstance(value, types.Array)


@intrinsic
def unowned(typingctx, value):
    """`value` (an array, or a tuple of arrays and such tuples) without its owner: the same data, shape and strides,
    no reference count. numba counts a reference for every array an inlined helper receives (atomic operations,
    which cost more than the one-query kernel's own work per candidate at small budgets); through these views it
    counts none. The caller keeps the owners alive while the views are in use (`keep_alive`)."""
    if not _arrays_only(value):
        return None

    def codegen(context, builder, signature, arguments):
        def strip(value_type, value):
            if isinstance(value_type, types.BaseTuple):
                elements = [
                    strip(element_type, builder.extract_value(value, position))
                    for position, element_type in enumerate(value_type.types)
                ]
                return context.make_tuple(builder, value_type, elements)
            structure = context.make_array(value_type)(context, builder, value)
            view = context.make_array(value_type)(context, builder)
            for field in ("nitems", "itemsize", "data", "shape", "strides"):
                setattr(view, field, getattr(structure, field))
            view.meminfo = cgutils.get_null_value(view.meminfo.type)
            view.parent = cgutils.get_null_value(view.parent.type)
            return view._getvalue()

        return strip(value, arguments[0])

    return value(value), codegen


@intrinsic
def keep_alive(typingctx, value):
    """A use of `value`: numba releases an array after its last use, so an owner used here outlives its
    `unowned` views used before."""

    def codegen(context, builder, signature, arguments):
        return context.get_dummy_value()

    return types.none(value), codegen
