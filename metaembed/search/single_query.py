"""Exhaustive MaxSim of one query over an index's stored prefix blocks, compiled with numba (the `[search]`
extra; without it the index uses `late_interaction_scores`).

One query is a thin matrix product: r_q <= 16 query vectors against millions of stored vectors. Through torch's BLAS
it reads the stored vectors slower than the machine can (its GEMM kernels are tuned for wide matrices), and float16
/ int8 / 4-bit storage pay an extra pass to upcast every chunk. Here each candidate is read once: its first r_c
vectors are decoded from their stored type (float16 bits, int8 or 4-bit codes times the vector's scale, residual4's
mean added) into a small buffer that stays in the L1 cache, and their dots with the query vectors go straight into a
running max. From `_LANES_MIN_QUERY_VECTORS` query vectors up (on AVX-512 machines), the dots are an outer product
with the query vectors across the 16 lanes of a vector register: r_q padded to P slots (1, 2, 4, 8 or 16) of G = 16
/ P lanes, each lane a query vector's share of G consecutive elements (`_query_lanes`). Each step multiplies one row
of it by G decoded elements of eight candidate vectors, broadcast to every slot, and adds into sums held in
registers; after D / G steps log2(G) shuffle-adds fold each slot's lanes, so no dot ends in a horizontal sum and the
max over a candidate's vectors is lane by lane. Below r_c = 8 several candidates share a step (a candidate's vectors
padded to 1, 2 or 4; 5 to 7 take a step of their own). Meanwhile the next candidate's stored vectors are requested
from memory. With fewer query vectors the dots run along D instead (`block_max`). Scores are float32 and accumulate
in float32 (with a different summation order than torch's kernel: equal to float32 rounding). Candidates are split
across `torch.get_num_threads()` threads (the kernels release the GIL); a call shares no state with another, so
servers may search from several threads at once.

A batch of queries (`batch_scores`) fills the lanes with all its queries' vectors instead, in groups of sixteen
taken two at a time (G = 1), over each candidate decoded once for the whole batch: quantised storage pays its
decoding once per candidate, not once per query or per chunk as torch's path does.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from functools import cache, partial
from typing import Any

import numpy
import torch

from scoring_metaembed import PrefixBlocks, merge_top_k

_STORED_TYPES = (torch.float32, torch.float16, torch.int8, torch.uint8)
# Below this many candidate vectors (candidates x r_c) per thread, splitting costs more than it saves: a one-query
# search over all of 2,048 candidates at (1, 1), or a two-stage rerank of 400 shortlisted candidates at (16, 64).
_MIN_VECTORS_PER_THREAD = 2048
# The lanes of the outer-product kernel (16 float32 fill a 512-bit register) and its candidate vectors per step (a
# candidate's r_c vectors are padded to a multiple, or to 1, 2 or 4, by repeating its first one).
_LANES, _VECTORS_PER_STEP = 16, 8
# A batch's groups of sixteen query lanes per step of the outer product: measured on one thread at 10k
# candidates, 32 queries, (16, 64), one candidate at a time, two groups ran at 167 GFLOP/s (the square-matmul
# rate), one at 137, three at 151 (24 sums and three query rows crowd the 32 registers).
_GROUPS_PER_STEP = 2
# From this many query vectors up the outer product is the faster one (any r_c: below 8 several candidates share a
# step), measured on one thread against the dots along D at r_c 1, 4 and 16 (8k candidates, D 128): float16, int8
# and 4-bit 1.1-2.1x from r_q = 2, at r_q = 1 1.1-1.2x at r_c = 1 (the (1, 1) budget), 0.87-0.98x at r_c = 4,
# 1.0-1.06x at r_c = 16; float32 1.0-1.2x from r_q = 3, 0.8-1.1x at r_q = 2, 0.8-0.97x at r_q = 1.
_LANES_MIN_QUERY_VECTORS = {torch.float32: 3, torch.float16: 1, torch.int8: 1, torch.uint8: 1}


def available() -> bool:
    """numba is installed and the kernels are not switched off (`METAEMBED_NUMBA=0`)."""
    return os.environ.get("METAEMBED_NUMBA", "1") != "0" and _numba_installed()


@cache
def _numba_installed() -> bool:
    # Looked up once: without numba, find_spec would search sys.path on every search call.
    return importlib.util.find_spec("numba") is not None


def supports(candidates: PrefixBlocks, num_query_vectors: int, num_candidate_vectors: int) -> bool:
    """The kernels handle these blocks (float32, float16, int8 or 4-bit codes on CPU) for one query of up to 16
    vectors, and are the faster choice: all but float32 at r_c = 1, a plain matrix-vector product over one
    contiguous block that torch's BLAS reads at memory speed (measured: 1.7 ms against 2.9 ms for 50k candidates)."""
    block = candidates.blocks[0]
    if block.device.type != "cpu" or block.dtype not in _STORED_TYPES or num_query_vectors > 16:
        return False
    return not (block.dtype == torch.float32 and num_candidate_vectors == 1)


def single_query_scores(
    query: torch.Tensor, candidates: PrefixBlocks, num_candidate_vectors: int, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """MaxSim scores of one query against the stored candidates (all, or those at `rows`, read in place: a
    two-stage search reranks its shortlist without gathering it).

    Args:
        query: float `[r_q, D]`, the query vectors taking part (r_q <= 16).
        candidates: the stored prefix blocks (see `supports`).
        num_candidate_vectors: r_c, the leading stored vectors per candidate taking part (validated by the caller).
        rows: None, or int64 `[n]` positions in `candidates` (valid: checked by the caller).

    Returns:
        float32 `[N]`, or `[n]` for `rows`.
    """
    dtype = candidates.blocks[0].dtype
    outer_product = len(query) >= _LANES_MIN_QUERY_VECTORS[dtype] and _has_512_bit_vectors()
    return _scores(query[None], candidates, num_candidate_vectors, rows, "lanes" if outer_product else "dots")[0]


def batch_supports(candidates: PrefixBlocks, num_queries: int, num_candidate_vectors: int) -> bool:
    """`batch_scores` handles these blocks (float32, float16, int8 or 4-bit codes on CPU, AVX-512) and is the
    faster choice: for two queries or more, at r_c a multiple of 8, and for int8 / 4-bit codes also at r_c 2 and
    4 (several candidates per step). Measured on one thread, 10k candidates, 32 queries, against torch's kernel
    (which decodes a chunk at a time): 1.1-1.7x at r_c 8, 16 and 64 for every storage; at r_c 2 and 4 1.1-1.6x
    for int8 and 4-bit, 0.8-1.2x for float32 and float16 (kept on torch); at r_c 3 (padded to 4) 0.7-1.1x and
    at r_c 1 0.6-1.0x."""
    block = candidates.blocks[0]
    small = num_candidate_vectors in (2, 4) and block.dtype in (torch.int8, torch.uint8)
    return (
        num_queries >= 2
        and block.device.type == "cpu"
        and block.dtype in _STORED_TYPES
        and (num_candidate_vectors % _VECTORS_PER_STEP == 0 or small)
        and _has_512_bit_vectors()
    )


def batch_scores(
    queries: torch.Tensor, candidates: PrefixBlocks, num_candidate_vectors: int, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """MaxSim scores of a batch of queries against the stored candidates by the outer product: all the queries'
    vectors side by side in the lanes (in groups of sixteen), each candidate decoded once for the whole batch.
    A query's scores do not depend on the rest of the batch (its lanes' sums and maxima are computed alike
    wherever they sit), nor on the thread split.

    Args:
        queries: float `[Q, r_q, D]`, the query vectors taking part (any r_q).
        candidates: the stored prefix blocks (see `batch_supports`).
        num_candidate_vectors: r_c, the leading stored vectors per candidate taking part (validated by the caller).
        rows: None, or int64 `[n]` positions in `candidates` (valid: checked by the caller).

    Returns:
        float32 `[Q, N]`, or `[Q, n]` for `rows`.
    """
    return _scores(queries, candidates, num_candidate_vectors, rows, "batch")


def _scores(
    queries: torch.Tensor,
    candidates: PrefixBlocks,
    num_candidate_vectors: int,
    rows: torch.Tensor | None,
    kind: str,
) -> torch.Tensor:
    """float32 `[Q, N]` (or `[Q, n]`) scores of `queries [Q, r_q, D]` by the kernels of `kind`: "batch" (the
    outer product over tiles of candidates), or for one query "lanes" (its outer product) or "dots" (along D)."""
    kernels = _kernels()
    num_queries = len(queries)
    # All the queries' vectors, one query after another.
    query = numpy.ascontiguousarray(queries.detach().to(torch.float32).cpu().flatten(0, 1).numpy())
    dtype = candidates.blocks[0].dtype
    widths, blocks, scales = [], [], []
    remaining = num_candidate_vectors
    for block, block_scales in zip(candidates.blocks, candidates.scales):
        if remaining == 0:
            break
        widths.append(min(block.shape[1], remaining))
        remaining -= widths[-1]
        # Views of the stored tensors (memory-mapped shards stay on disk until read); float16 is read as its bits.
        stored = block.view(torch.uint16) if dtype == torch.float16 else block
        blocks.append(_as_array(stored))
        scales.append(_as_array(block_scales) if block_scales is not None else _NO_SCALES)
    code_values, offsets = _NO_CODE_VALUES, _NO_OFFSETS
    if dtype == torch.uint8:  # 4-bit codes: even elements first, then odd ones, as the kernel decodes them
        query = numpy.ascontiguousarray(numpy.concatenate([query[:, 0::2], query[:, 1::2]], axis=1))
        if candidates.code_values is not None:
            code_values = _as_array(candidates.code_values)
        elif kind != "dots":  # int4's codes in the outer products: looked up like residual4's (`widen_nibbles`)
            code_values = _INT4_CODE_VALUES
        if candidates.offsets is not None:
            offsets = _as_array(candidates.offsets.to(torch.float16).view(torch.uint16))
    elif dtype == torch.float16 and kind == "dots":  # that kernel reads halves 2**112 too small (see there)
        query = query * numpy.float32(2.0**112)
    selected = _NO_ROWS if rows is None else _as_array(rows.to(torch.int64))
    query_lanes = _NO_QUERY_LANES
    if kind == "lanes":
        query_lanes = _query_lanes(query)
    elif kind == "batch":
        # [groups, D, 16]: the queries' vectors transposed, sixteen per group, zero-padded to whole steps of
        # `_GROUPS_PER_STEP` groups.
        groups = -(-len(query) // _LANES)
        groups = -(-groups // _GROUPS_PER_STEP) * _GROUPS_PER_STEP
        padded = numpy.zeros((groups * _LANES, query.shape[1]), dtype=numpy.float32)
        padded[: len(query)] = query
        query_lanes = _read_only(numpy.ascontiguousarray(padded.reshape(groups, _LANES, -1).transpose(0, 2, 1)))
    storage = {torch.float32: "float32", torch.float16: "float16", torch.int8: "int8", torch.uint8: "four_bit"}[dtype]
    if kind == "batch":
        kernel = partial(kernels.batch_lanes, getattr(kernels, storage + "_candidate"))
    else:
        kernel = getattr(kernels, storage + ("_lanes" if kind == "lanes" else ""))
    arguments = (
        query,
        query_lanes,
        tuple(blocks),
        tuple(scales),
        code_values,
        offsets,
        numpy.asarray(widths, dtype=numpy.int64),
        selected,
    )
    count = len(candidates) if rows is None else len(rows)
    scores = numpy.empty((num_queries, count), dtype=numpy.float32)
    output = scores if kind == "batch" else scores[0]  # the one-query kernels write [N]
    parts = max(1, min(torch.get_num_threads(), count * num_candidate_vectors // _MIN_VECTORS_PER_THREAD))
    bounds = [count * part // parts for part in range(parts + 1)]
    if parts == 1:
        kernel(*arguments, 0, count, output)
    else:
        futures = [
            _executor().submit(kernel, *arguments, start, end, output) for start, end in itertools.pairwise(bounds)
        ]
        for future in futures:
            future.result()
    return torch.from_numpy(scores)


def _query_lanes(query: numpy.ndarray) -> numpy.ndarray:
    """float32 `[r_q, D]` packed for the outer product, `[D / G, 16]`: r_q padded with zero vectors to P slots (a
    power of two) of G = 16 / P lanes each (fewer where G does not divide D), lane `slot * G + t` of row k holding
    element `k * G + t` of query vector `slot`; G = 1 is the query transposed."""
    num_query_vectors, dim = query.shape
    group = _LANES // (1 << (num_query_vectors - 1).bit_length())
    while dim % group != 0:
        group //= 2
    padded = numpy.zeros((_LANES // group, dim), dtype=numpy.float32)
    padded[:num_query_vectors] = query
    packed = padded.reshape(_LANES // group, dim // group, group).transpose(1, 0, 2).reshape(dim // group, _LANES)
    return _read_only(numpy.ascontiguousarray(packed))


def _read_only(array: numpy.ndarray) -> numpy.ndarray:
    array.flags.writeable = False
    return array


_NO_SCALES = _read_only(numpy.zeros((0, 0), dtype=numpy.float32))
_NO_CODE_VALUES = _read_only(numpy.zeros(0, dtype=numpy.float32))
_INT4_CODE_VALUES = _read_only(numpy.arange(-8, 8, dtype=numpy.float32))  # int4: a code c stands for c - 8
_NO_OFFSETS = _read_only(numpy.zeros((0, 0), dtype=numpy.uint16))
_NO_ROWS = _read_only(numpy.zeros(0, dtype=numpy.int64))
_NO_QUERY_LANES = _read_only(numpy.zeros((0, _LANES), dtype=numpy.float32))


def _as_array(tensor: torch.Tensor) -> numpy.ndarray:
    """A read-only C-contiguous view (a copy only for a strided tensor): read-only for all, so the blocks of a
    call are one numba type whether they come from memory or a memory-mapped shard."""
    array = tensor.numpy()
    if not array.flags.c_contiguous:
        array = numpy.ascontiguousarray(array)
    return _read_only(array.view())


@cache
def _has_512_bit_vectors() -> bool:
    """AVX-512: the outer product's sixteen lanes and eight sums fit its registers (with 256-bit ones they would
    spill; unmeasured there, so such machines keep the dots along D)."""
    import llvmlite.binding

    return "+avx512f" in llvmlite.binding.get_host_cpu_features().flatten()


@cache
def _executor() -> ThreadPoolExecutor:
    # Shared by all calls; each call waits only for its own parts.
    return ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1), thread_name_prefix="metaembed-maxsim")


class _Kernels:
    def __init__(self, **kernels: Any) -> None:
        self.__dict__.update(kernels)


@cache
def _kernels() -> _Kernels:
    """Compile (or load from numba's cache) the kernels: for one query two per stored type (dots along D, outer
    product); for batches `batch_lanes` with one candidate decoder per stored type."""
    import numba

    from ._numba_codegen import (
        grouped_dots,
        keep_alive,
        prefetch,
        stack_array,
        unowned,
        wide_vectors,
        widen_halves,
        widen_nibbles,
        widen_offset,
    )

    options = {"nogil": True, "cache": True, "fastmath": {"reassoc", "contract"}, "boundscheck": False}
    lanes, per_step, groups_per_step = _LANES, _VECTORS_PER_STEP, _GROUPS_PER_STEP
    step_accumulators = groups_per_step * lanes * per_step

    @numba.njit(**options)
    def _widest(widths):  # rows of the decode buffer for the dots along D
        return max(1, widths.max())

    @numba.njit(**options)
    def _buffer_rows(widths):  # for the outer product: every block of a candidate pending at once, padded to a step
        return -(-widths.sum() // per_step) * per_step + per_step

    @numba.njit(**options, inline="always")
    def block_max(query, vectors, running):
        """running[i] = max(running[i], max_j <query[i], vectors[j]>) for float32 `query [M, D]`, `vectors [w, D]`.
        Two vectors x four query vectors at a time: eight independent sums share each load and hide the latency
        of one another's reduction."""
        num_rows, dim = query.shape
        width = vectors.shape[0]
        column = 0
        while column < width:
            pair = column + 1 < width
            second = column + 1 if pair else column  # an odd last vector is paired with itself
            row = 0
            while row + 4 <= num_rows:
                a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = numpy.float32(0.0)
                for element in range(dim):
                    x, y = vectors[column, element], vectors[second, element]
                    q0, q1 = query[row, element], query[row + 1, element]
                    q2, q3 = query[row + 2, element], query[row + 3, element]
                    a0 += q0 * x
                    a1 += q1 * x
                    a2 += q2 * x
                    a3 += q3 * x
                    b0 += q0 * y
                    b1 += q1 * y
                    b2 += q2 * y
                    b3 += q3 * y
                running[row] = max(running[row], a0, b0)
                running[row + 1] = max(running[row + 1], a1, b1)
                running[row + 2] = max(running[row + 2], a2, b2)
                running[row + 3] = max(running[row + 3], a3, b3)
                row += 4
            while row < num_rows:
                a0 = b0 = numpy.float32(0.0)
                for element in range(dim):
                    a0 += query[row, element] * vectors[column, element]
                    b0 += query[row, element] * vectors[second, element]
                running[row] = max(running[row], a0, b0)
                row += 1
            column += 2

    # Inlined, with no array slices: a call or a slice per candidate costs atomic reference counts (measured: most
    # of the time at r_c = 1).
    @numba.njit(**options, inline="always")
    def lanes_max(query_lanes, vectors, count, running, ahead, row_bytes):
        """running[0, lane] = max(running[0, lane], dot of lane's query vector with vectors[j]) over j < count (a
        multiple of 8), the dot in every lane of its slot (see `_query_lanes`), for float32 `vectors [w, D]`: eight
        vectors at a time (`grouped_dots`). `ahead`: the address of the next candidate's stored copy of these
        vectors (0: none), `row_bytes` a vector's there, read into the cache meanwhile, a line per step (the
        hardware's prefetchers miss these short runs)."""
        steps = query_lanes.shape[0]
        group_lines = -(-per_step * row_bytes // 64) if ahead != 0 else 0
        for first in range(0, count, per_step):
            group = ahead + first * row_bytes
            grouped_dots(running, query_lanes, vectors, first, per_step, True, group, group_lines)
            for line in range(steps, group_lines):
                prefetch(group + 64 * line)

    @numba.njit(**options, inline="always")
    def lanes_score(dots, row, num_query_vectors, group):
        """The sum over query vectors of dots[row, lane of its slot]."""
        total = numpy.float32(0.0)
        for slot in range(num_query_vectors):
            total += dots[row, slot * group]
        return total

    @numba.njit(**options, inline="always")
    def candidate_rows(widths):
        """Buffer rows per candidate below 8 vectors (r_c padded to 1, 2 or 4, several candidates per step; 5 to 7
        padded to 8); 0 when each candidate takes whole steps of its own."""
        count = widths.sum()
        if count >= per_step:
            return 0
        rows = 1
        while rows < count:
            rows *= 2
        return rows

    @numba.njit(**options, inline="always")
    def ahead(block, rows, item, end):
        """(address, bytes per vector) of the next candidate's vectors in `block` (0: none)."""
        if item + 1 >= end:
            return 0, 0
        following = rows[item + 1] if rows.shape[0] > 0 else item + 1
        return numpy.int64(block.ctypes.data + following * block.strides[0]), block.strides[1]

    @numba.njit(**options, inline="always")
    def repeat_first(vectors, first_row, start, stop):
        """vectors[start:stop] = vectors[first_row] (a candidate's padding: repeats change no max)."""
        for row in range(start, stop):
            for element in range(vectors.shape[1]):
                vectors[row, element] = vectors[first_row, element]

    @numba.njit(**options, inline="always")
    def lanes_fold(query_lanes, vectors, pending, blocks, widths, number, rows, item, end, state, scores):
        """Fold the decoded `vectors[: pending + widths[number]]` (the pending ones, then block `number`'s) into
        the scores by the outer product, reading the next candidate's block ahead; returns how many rows stay
        pending. One candidate per step (r_c >= 8): eight vectors at a time into its running maxima, a rest
        waiting for the next block, after the last one padded by repeating the first vector (repeats change no
        max). Several (r_c < 8): each candidate's vectors padded to its rows (a power of two) the same way, the
        step taken once 8 rows (or the range's last candidate) are in, each candidate's max taken over its own rows;
        no read-ahead there (the hardware's prefetchers follow the contiguous runs of a whole collection).
        `state`: (running maxima [1, 16], dots [8, 16], rows per candidate (0: one per step), query vectors, G):
        no integer division per candidate (tens of cycles each)."""
        running, dots, rows_per_candidate, num_query_vectors, group = state
        count = pending + widths[number]
        last = number == len(widths) - 1
        if rows_per_candidate > 0:
            if not last:
                return count
            first_row = (count - 1) & -rows_per_candidate  # a power of two
            padded = first_row + rows_per_candidate
            repeat_first(vectors, first_row, count, padded)
            if padded < per_step and item + 1 < end:
                return padded
            repeat_first(vectors, 0, padded, per_step)  # the range's end: slots of no candidate, ignored
            grouped_dots(dots, query_lanes, vectors, 0, per_step, False, 0, 0)
            held = padded // rows_per_candidate
            for slot in range(held):
                for vector in range(slot * rows_per_candidate + 1, (slot + 1) * rows_per_candidate):
                    for lane in range(lanes):
                        dots[slot * rows_per_candidate, lane] = max(
                            dots[slot * rows_per_candidate, lane], dots[vector, lane]
                        )
                scores[item - held + 1 + slot] = lanes_score(dots, slot * rows_per_candidate, num_query_vectors, group)
            return 0
        if count % per_step != 0:
            if not last:
                return count
            padded = count + per_step - count % per_step
            repeat_first(vectors, 0, count, padded)
            count = padded
        address, row_bytes = ahead(blocks[number], rows, item, end)
        lanes_max(query_lanes, vectors, count, running, address, row_bytes)
        if last:
            scores[item] = lanes_score(running, 0, num_query_vectors, group)
            running[0, :] = -numpy.inf
        return 0

    # Decoders: a candidate's first `width` stored vectors of one block, as float32, into `vectors[first:]`.
    # float16 in the outer-product kernels: `widen_halves` (vcvtph2ps, on every AVX-512 machine); here, for the dots
    # along D, which any machine runs, half bits h -> float32 bits (h & 0x8000) << 16 | (h & 0x7FFF) << 13: the same
    # sign and digits with the exponent 112 lower, for normal and subnormal halves alike; the query comes scaled by
    # 2**112 to match (powers of two: the products round as the plain ones do).
    @numba.njit(**options, inline="always")
    def decode_float16(halves, width, bits, first):
        for position in range(width):
            for element in range(halves.shape[1]):
                value = numpy.uint32(halves[position, element])
                bits[first + position, element] = ((value & 0x8000) << 16) | ((value & 0x7FFF) << 13)

    @numba.njit(**options, inline="always")
    def decode_int8(codes, vector_scales, width, vectors, first):
        for position in range(width):
            scale = vector_scales[position]
            for element in range(codes.shape[1]):
                vectors[first + position, element] = numpy.float32(codes[position, element]) * scale

    # 4-bit: element = code_values[code] * scale (int4, without code values: (code - 8) * scale), plus the
    # candidate's offset for residual4 (its float16 mean, read as bits like float16 storage, then rescaled as it
    # is added). The low nibbles of a vector's D / 2 bytes are its even elements, the high nibbles its odd ones;
    # they are decoded as [even elements, odd elements], and the query comes reordered the same way. The outer
    # products decode codes by `widen_nibbles` (the code values in a register, vpermps) and offsets by
    # `widen_offset` (vcvtph2ps), the dots along D here.
    @numba.njit(**options, inline="always")
    def decode_offset(offsets, candidate, offset_bits, offset):
        pairs = offset.shape[0] // 2
        for pair in range(pairs):
            for parity in range(2):
                value = numpy.uint32(offsets[candidate, 2 * pair + parity])
                offset_bits[parity * pairs + pair] = ((value & 0x8000) << 16) | ((value & 0x7FFF) << 13)
        for element in range(offset.shape[0]):
            offset[element] *= numpy.float32(2.0**112)

    @numba.njit(**options, inline="always")
    def decode_four_bit(codes, vector_scales, width, vectors, first, code_values, offset):
        pairs = offset.shape[0] // 2
        for position in range(width):
            scale = vector_scales[position]
            row = first + position
            if code_values.shape[0] > 0:
                for pair in range(pairs):
                    code = codes[position, pair]
                    vectors[row, pair] = code_values[code & 15] * scale + offset[pair]
                    vectors[row, pairs + pair] = code_values[code >> 4] * scale + offset[pairs + pair]
            else:  # int4: code - 8, arithmetic vectorises where a table lookup does not
                for pair in range(pairs):
                    code = numpy.int32(codes[position, pair])
                    vectors[row, pair] = numpy.float32((code & 15) - 8) * scale
                    vectors[row, pairs + pair] = numpy.float32((code >> 4) - 8) * scale

    # The kernels, two per stored type: the dots along D (`block_max`, a block at a time), and the outer product
    # (`lanes_max`, eight vectors at a time: float32 reads whole groups of 8 in place).
    @numba.njit(**options)
    def float32(query, query_lanes, blocks, scales, code_values, offsets, widths, rows, start, end, scores):
        owner = numpy.empty(query.shape[0], dtype=numpy.float32)
        running = unowned(owner)
        query, blocks, scales, rows, scores = unowned((query, blocks, scales, rows, scores))
        for item in range(start, end):
            candidate = rows[item] if rows.shape[0] > 0 else item
            running[:] = -numpy.inf
            for number in range(len(widths)):
                block_max(query, blocks[number][candidate, : widths[number]], running)
            scores[item] = running.sum()
        keep_alive(owner)

    @numba.njit(**options)
    def lanes_buffers(query, widths):
        """The running maxima `[1, 16]` and dots `[8, 16]` of `lanes_fold`, and a decode buffer of 32-bit
        elements."""
        running = numpy.full((1, lanes), -numpy.inf, dtype=numpy.float32)
        dots = numpy.empty((per_step, lanes), dtype=numpy.float32)
        return running, dots, numpy.empty((_buffer_rows(widths), query.shape[1]), dtype=numpy.uint32)

    @numba.njit(**options)
    def float32_lanes(query, query_lanes, blocks, scales, code_values, offsets, widths, rows, start, end, scores):
        owners = lanes_buffers(query, widths)
        arrays = unowned((owners, query_lanes, blocks, scales, widths, rows, scores))
        (running, dots, bits), query_lanes, blocks, scales, widths, rows, scores = arrays
        state = (running, dots, candidate_rows(widths), query.shape[0], query.shape[1] // query_lanes.shape[0])
        vectors = bits.view(numpy.float32)
        pending = 0
        for item in range(start, end):
            candidate = rows[item] if rows.shape[0] > 0 else item
            for number in range(len(widths)):
                stored = blocks[number][candidate]
                if pending == 0 and widths[number] % per_step == 0:
                    address, row_bytes = ahead(blocks[number], rows, item, end)
                    lanes_max(query_lanes, stored, widths[number], running, address, row_bytes)
                    if number == len(widths) - 1:
                        scores[item] = lanes_score(running, 0, state[3], state[4])
                        running[0, :] = -numpy.inf
                    continue
                for position in range(widths[number]):  # the small blocks, gathered
                    for element in range(stored.shape[1]):
                        vectors[pending + position, element] = stored[position, element]
                pending = lanes_fold(
                    query_lanes, vectors, pending, blocks, widths, number, rows, item, end, state, scores
                )
        keep_alive(owners)

    @numba.njit(**options)
    def float16(query, query_lanes, blocks, scales, code_values, offsets, widths, rows, start, end, scores):
        owners = (
            numpy.empty(query.shape[0], dtype=numpy.float32),
            numpy.empty((_widest(widths), query.shape[1]), dtype=numpy.uint32),
        )
        running, bits = unowned(owners)
        vectors = bits.view(numpy.float32)
        query, blocks, scales, rows, scores = unowned((query, blocks, scales, rows, scores))
        for item in range(start, end):
            candidate = rows[item] if rows.shape[0] > 0 else item
            running[:] = -numpy.inf
            for number in range(len(widths)):
                decode_float16(blocks[number][candidate], widths[number], bits, 0)
                block_max(query, vectors[: widths[number]], running)
            scores[item] = running.sum()
        keep_alive(owners)

    @numba.njit(**options)
    def int8(query, query_lanes, blocks, scales, code_values, offsets, widths, rows, start, end, scores):
        owners = (
            numpy.empty(query.shape[0], dtype=numpy.float32),
            numpy.empty((_widest(widths), query.shape[1]), dtype=numpy.float32),
        )
        running, vectors = unowned(owners)
        query, blocks, scales, rows, scores = unowned((query, blocks, scales, rows, scores))
        for item in range(start, end):
            candidate = rows[item] if rows.shape[0] > 0 else item
            running[:] = -numpy.inf
            for number in range(len(widths)):
                decode_int8(blocks[number][candidate], scales[number][candidate], widths[number], vectors, 0)
                block_max(query, vectors[: widths[number]], running)
            scores[item] = running.sum()
        keep_alive(owners)

    @numba.njit(**options)
    def four_bit(query, query_lanes, blocks, scales, code_values, offsets, widths, rows, start, end, scores):
        owners = (
            numpy.empty(query.shape[0], dtype=numpy.float32),
            numpy.empty((_widest(widths), query.shape[1]), dtype=numpy.float32),
        )
        running, vectors = unowned(owners)
        offset_owner = numpy.zeros(query.shape[1], dtype=numpy.uint32)
        offset_bits = unowned(offset_owner)
        offset = offset_bits.view(numpy.float32)
        code_values, offsets = unowned((code_values, offsets))
        query, blocks, scales, rows, scores = unowned((query, blocks, scales, rows, scores))
        for item in range(start, end):
            candidate = rows[item] if rows.shape[0] > 0 else item
            running[:] = -numpy.inf
            if offsets.shape[0] > 0:
                decode_offset(offsets, candidate, offset_bits, offset)
            for number in range(len(widths)):
                codes, vector_scales = blocks[number][candidate], scales[number][candidate]
                decode_four_bit(codes, vector_scales, widths[number], vectors, 0, code_values, offset)
                block_max(query, vectors[: widths[number]], running)
            scores[item] = running.sum()
        keep_alive(owners)
        keep_alive(offset_owner)

    # One outer-product kernel per decoded type: a single one branching on the type measured 1.3-1.5x slower.
    @numba.njit(**options)
    def float16_lanes(query, query_lanes, blocks, scales, code_values, offsets, widths, rows, start, end, scores):
        owners = lanes_buffers(query, widths)
        arrays = unowned((owners, query_lanes, blocks, scales, widths, rows, scores))
        (running, dots, bits), query_lanes, blocks, scales, widths, rows, scores = arrays
        state = (running, dots, candidate_rows(widths), query.shape[0], query.shape[1] // query_lanes.shape[0])
        vectors = bits.view(numpy.float32)
        pending = 0
        for item in range(start, end):
            candidate = rows[item] if rows.shape[0] > 0 else item
            for number in range(len(widths)):
                widen_halves(blocks[number][candidate], widths[number], bits, pending)
                pending = lanes_fold(
                    query_lanes, vectors, pending, blocks, widths, number, rows, item, end, state, scores
                )
        keep_alive(owners)

    @numba.njit(**options)
    def int8_lanes(query, query_lanes, blocks, scales, code_values, offsets, widths, rows, start, end, scores):
        owners = lanes_buffers(query, widths)
        arrays = unowned((owners, query_lanes, blocks, scales, widths, rows, scores))
        (running, dots, bits), query_lanes, blocks, scales, widths, rows, scores = arrays
        state = (running, dots, candidate_rows(widths), query.shape[0], query.shape[1] // query_lanes.shape[0])
        vectors = bits.view(numpy.float32)
        pending = 0
        for item in range(start, end):
            candidate = rows[item] if rows.shape[0] > 0 else item
            for number in range(len(widths)):
                codes, vector_scales = blocks[number][candidate], scales[number][candidate]
                decode_int8(codes, vector_scales, widths[number], vectors, pending)
                pending = lanes_fold(
                    query_lanes, vectors, pending, blocks, widths, number, rows, item, end, state, scores
                )
        keep_alive(owners)

    @numba.njit(**options)
    def four_bit_lanes(query, query_lanes, blocks, scales, code_values, offsets, widths, rows, start, end, scores):
        owners = lanes_buffers(query, widths)
        arrays = unowned((owners, query_lanes, blocks, scales, widths, rows, scores))
        (running, dots, bits), query_lanes, blocks, scales, widths, rows, scores = arrays
        state = (running, dots, candidate_rows(widths), query.shape[0], query.shape[1] // query_lanes.shape[0])
        vectors = bits.view(numpy.float32)
        code_values, offsets = unowned((code_values, offsets))
        offset_owner = numpy.zeros(query.shape[1], dtype=numpy.uint32)
        offset_bits = unowned(offset_owner)
        offset = offset_bits.view(numpy.float32)
        pending = 0
        for item in range(start, end):
            candidate = rows[item] if rows.shape[0] > 0 else item
            if offsets.shape[0] > 0:
                widen_offset(offsets[candidate], offset)
            for number in range(len(widths)):
                codes, vector_scales = blocks[number][candidate], scales[number][candidate]
                widen_nibbles(codes, widths[number], vector_scales, code_values, offset, vectors, pending)
                pending = lanes_fold(
                    query_lanes, vectors, pending, blocks, widths, number, rows, item, end, state, scores
                )
        keep_alive(owners)
        keep_alive(offset_owner)

    # Batches: every query's vectors in the lanes, `groups_per_step` groups of sixteen at a time (one group
    # alone does eight multiply-adds per nine loads: there the loads, not the multiply-adds, set the pace), over
    # a tile of candidates decoded once for the whole batch, so that a pair of groups' query rows is read from
    # the L2 cache once per tile rather than once per candidate.
    @numba.njit(nogil=True, cache=True, fastmath={"contract"}, boundscheck=False)
    def groups_step_max(query_lanes, first_group, vectors, rows_per_candidate, running):
        """`lanes_max` for the `groups_per_step` groups of query lanes from `first_group` of `query_lanes
        [groups, D, 16]` at once, over the decoded vectors of a tile of candidates (`vectors [8 * steps, D]`, each
        candidate's `rows_per_candidate` in a row: a multiple of 8, or 1, 2 or 4 for several candidates per
        step), into `running [tile, groups, 16]`."""
        wide_vectors()
        sums = numba.carray(stack_array(step_accumulators), (groups_per_step, per_step, lanes))
        dim = query_lanes.shape[1]
        for first in range(0, vectors.shape[0], per_step):
            for step_group in range(groups_per_step):
                for vector in range(per_step):
                    for lane in range(lanes):
                        sums[step_group, vector, lane] = 0.0
            for element in range(dim):
                for lane in range(lanes):
                    for step_group in range(groups_per_step):
                        weight = query_lanes[first_group + step_group, element, lane]
                        for vector in range(per_step):
                            sums[step_group, vector, lane] += weight * vectors[first + vector, element]
            # (The loops over a step's vectors stay innermost: unrolled, they index the sums by constants, which
            # keeps them in registers.)
            slot = first // rows_per_candidate
            for step_group in range(groups_per_step):
                group = first_group + step_group
                if rows_per_candidate >= per_step:  # one candidate's vectors
                    for lane in range(lanes):
                        best = running[slot, group, lane]
                        for vector in range(per_step):
                            best = max(best, sums[step_group, vector, lane])
                        running[slot, group, lane] = best
                    continue
                for lane in range(lanes):
                    for vector in range(per_step):
                        owner = (first + vector) // rows_per_candidate
                        running[owner, group, lane] = max(running[owner, group, lane], sums[step_group, vector, lane])

    # A candidate's first r_c vectors decoded into `vectors [rows, D]` (float32), padded to a multiple of 8 by
    # repeating the first one (repeats change no max); `offset_bits [D]`: scratch for residual4's offsets.
    @numba.njit(**options)
    def float32_candidate(blocks, scales, code_values, offsets, widths, candidate, vectors, offset_bits):
        count = 0
        for number in range(len(widths)):
            stored = blocks[number][candidate]
            for position in range(widths[number]):
                for element in range(stored.shape[1]):
                    vectors[count + position, element] = stored[position, element]
            count += widths[number]
        repeat_first(vectors, 0, count, vectors.shape[0])

    @numba.njit(**options)
    def float16_candidate(blocks, scales, code_values, offsets, widths, candidate, vectors, offset_bits):
        count = 0
        for number in range(len(widths)):
            widen_halves(blocks[number][candidate], widths[number], vectors, count)
            count += widths[number]
        repeat_first(vectors, 0, count, vectors.shape[0])

    @numba.njit(**options)
    def int8_candidate(blocks, scales, code_values, offsets, widths, candidate, vectors, offset_bits):
        count = 0
        for number in range(len(widths)):
            decode_int8(blocks[number][candidate], scales[number][candidate], widths[number], vectors, count)
            count += widths[number]
        repeat_first(vectors, 0, count, vectors.shape[0])

    @numba.njit(**options)
    def four_bit_candidate(blocks, scales, code_values, offsets, widths, candidate, vectors, offset_bits):
        offset = offset_bits.view(numpy.float32)
        if offsets.shape[0] > 0:
            widen_offset(offsets[candidate], offset)
        count = 0
        for number in range(len(widths)):
            codes, vector_scales = blocks[number][candidate], scales[number][candidate]
            widen_nibbles(codes, widths[number], vector_scales, code_values, offset, vectors, count)
            count += widths[number]
        repeat_first(vectors, 0, count, vectors.shape[0])

    @numba.njit(**options)
    def batch_lanes(
        decode_candidate, query, query_lanes, blocks, scales, code_values, offsets, widths, rows, start, end, scores
    ):
        """scores[q, item] for the queries whose vectors are `query [Q * r_q, D]` (one query after another;
        `query_lanes [groups, D, 16]` the same, transposed, zero-padded to an even number of groups), the sum of
        their lanes' maxima; each candidate decoded once by `decode_candidate` (one of the `*_candidate` above)."""
        groups, dim = query_lanes.shape[0], query_lanes.shape[1]
        # A candidate's decoded rows: r_c padded to 1, 2 or 4 (several candidates per step) or a multiple of 8.
        rows_per_candidate = candidate_rows(widths)
        if rows_per_candidate == 0:
            rows_per_candidate = -(-widths.sum() // per_step) * per_step
        per_step_candidates = max(1, per_step // rows_per_candidate)
        # A tile of candidates fills about 16 KiB of the L1 cache, beside the query rows of a pair of groups.
        tile = max(1, 4096 // (rows_per_candidate * dim) // per_step_candidates) * per_step_candidates
        vectors = numpy.zeros((tile * rows_per_candidate, dim), dtype=numpy.float32)
        running = numpy.empty((tile, groups, lanes), dtype=numpy.float32)
        offset_bits = numpy.zeros(dim, dtype=numpy.uint32)
        per_query = query.shape[0] // scores.shape[0]
        for first in range(start, end, tile):
            count = min(tile, end - first)
            for slot in range(count):
                candidate = rows[first + slot] if rows.shape[0] > 0 else first + slot
                decoded = vectors[slot * rows_per_candidate : (slot + 1) * rows_per_candidate]
                decode_candidate(blocks, scales, code_values, offsets, widths, candidate, decoded, offset_bits)
            running[:] = -numpy.inf
            # Whole steps: the rows after a last tile's candidates are left from before (their maxima unread).
            tiled = vectors[: -(-count * rows_per_candidate // per_step) * per_step]
            for group in range(0, groups, groups_per_step):
                groups_step_max(query_lanes, group, tiled, rows_per_candidate, running)
            for slot in range(count):
                maxima = running[slot].reshape(groups * lanes)
                for number in range(scores.shape[0]):
                    # In order, as `lanes_score` adds one query's maxima: from 9 query vectors up (G = 1) a query's
                    # score in a batch equals its score alone to the bit.
                    total = numpy.float32(0.0)
                    for lane in range(number * per_query, (number + 1) * per_query):
                        total += maxima[lane]
                    scores[number, first + slot] = total

    kernels = (
        *(float32, float16, int8, four_bit, float32_lanes, float16_lanes, int8_lanes, four_bit_lanes),
        *(batch_lanes, groups_step_max, float32_candidate, float16_candidate, int8_candidate, four_bit_candidate),
    )
    return _Kernels(**{kernel.py_func.__name__: kernel for kernel in kernels})


# Above this k the one-pass top-k (k steps per insertion at worst) gives way to torch's top-k and sorts.
_MAX_ONE_PASS_TOP_K = 64


def top_k_columns(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` best of float32 `scores` `[n]` (0 < k <= n), best first, equal scores by the lower column first and
    NaN above every number (the order `merge_top_k` keeps): `(scores [k], columns [k] int64)`. Up to
    `_MAX_ONE_PASS_TOP_K`, one pass that keeps a sorted run of k, in place of torch's top-k and the sorts that
    settle its ties: a one-query search spends less time around the kernel than in it."""
    if not 0 < k <= len(scores):
        raise ValueError(f"k must lie in 1..{len(scores)}, got {k}")
    if k > _MAX_ONE_PASS_TOP_K:
        best_scores, best_columns = merge_top_k(None, None, scores.unsqueeze(0), 0, k)
        return best_scores[0], best_columns[0]
    best_scores = numpy.empty(k, dtype=numpy.float32)
    best_columns = numpy.empty(k, dtype=numpy.int64)
    _top_k_kernel()(scores.numpy(), best_scores, best_columns)
    return torch.from_numpy(best_scores), torch.from_numpy(best_columns)


@cache
def _top_k_kernel() -> Any:
    import numba

    @numba.njit(nogil=True, cache=True, boundscheck=False, inline="always")
    def above(score, other):  # strictly better; NaN ranks above every number, as in torch's top-k
        return score > other or (score != score and other == other)

    @numba.njit(nogil=True, cache=True, boundscheck=False)
    def top_k(scores, best_scores, best_columns):
        k = best_scores.shape[0]
        for column in range(scores.shape[0]):
            score = scores[column]
            filled = min(column, k)
            # A later column enters only ahead of strictly lower scores: ties keep the lower column first.
            if filled == k and not above(score, best_scores[k - 1]):
                continue
            place = filled if filled < k else k - 1
            while place > 0 and above(score, best_scores[place - 1]):
                best_scores[place] = best_scores[place - 1]
                best_columns[place] = best_columns[place - 1]
                place -= 1
            best_scores[place] = score
            best_columns[place] = column

    return top_k
