"""Late-interaction (MaxSim) scoring of MetaEmbed multi-vector embeddings.

    s(q, c) = sum_{i <= r_q} max_{j <= r_c} <q_i, c_j>

MetaEmbed trains every prefix of its vectors to work on its own (Matryoshka Multi-Vector Retrieval), so a
budget (r_q, r_c) picks how many leading vectors take part. This file is the one scoring kernel of the
package and the one validation of vector counts; it depends on torch and the standard library only, because
it travels to the Hub as remote code.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import NamedTuple

import torch

__all__ = [
    "MMR_BUDGETS",
    "PrefixBlocks",
    "TopKScores",
    "check_num_vectors",
    "check_positive_int",
    "late_interaction_scores",
    "merge_top_k",
]

# The budgets (r_q, r_c) the paper trains with MMR and evaluates.
MMR_BUDGETS: tuple[tuple[int, int], ...] = ((1, 1), (2, 4), (4, 8), (8, 16), (16, 64))

# Elements of one fp32 similarity tile [candidate vectors x query vectors]. On CPU a tile of 2**21 (8 MiB)
# stays cache-resident, so the max-reduction reads it from cache instead of RAM: measured on 2 cores (32
# queries, D = 128), 2**21 gives 0.8-0.85x of a big square GEMM at (16, 64) and 0.6x at (4, 8), where
# 2**22 gives 0.85-0.9x and 0.45x, and chunks of thousands of candidates about half. GPUs prefer fewer,
# larger kernels. The staging buffers obey the same budget, so the extra memory is a few tiles whatever the
# number of candidates.
_TILE_ELEMENTS_CPU = 2**21
_TILE_ELEMENTS_GPU = 2**24
# Elements of candidates read or staged (upcast from float16, dequantised from int8 / int4) per chunk on CPU:
# 8 MiB of float32, read back from cache. Smaller chunks (1 MiB) made one-query search dispatch-bound at r_c = 64
# (seven blocks, a few torch calls each per chunk of 32 candidates).
_STAGING_ELEMENTS_CPU = 2**21
# Below this many candidates per tile the matmuls get too thin to be efficient: queries are split instead.
_MIN_CANDIDATES_PER_TILE = 16
# Up to this many query vectors in a tile (e.g. one query at r_q <= 16, the serving case), similarities are
# laid out [query vectors, candidate vectors] so the max runs along contiguous memory: a max over the middle
# axis of [candidates, r_c, 16] is 3x slower on CPU (measured). Wider tiles keep [candidate vectors, query
# vectors], where the max vectorises across the query vectors.
_MAX_QUERY_VECTORS_FOR_ROW_LAYOUT = 16


class PrefixBlocks:
    """Candidates stored the way an index keeps them: their vectors split into consecutive blocks, block b
    holding vectors `offset_b .. offset_b + R_b - 1` of every candidate (e.g. vectors 0, 1, 2-3, 4-7, ...), so
    the first vectors of all candidates lie together and a budget r_c reads only the blocks it uses. A block is
    float (any floating dtype); int8 with one float32 scale per vector (`vector = int8 * scale`); or uint8 holding
    4-bit codes, two per byte along D (element 2i in the low nibble, 2i + 1 in the high one), with one float32
    scale per vector (`element = code_values[code] * scale`, by default `code_values[code] = code - 8`).
    `offsets`, when given, is one vector per candidate added to each of its vectors (the "residual4" storage codes
    each vector's residual from its candidate's mean). Scoring decodes an 8 MiB chunk at a time (`_decode_block`),
    once for all queries of a call.

    Args:
        blocks: one or more tensors `[N, R_b, D]` (`[N, R_b, D / 2]` for 4-bit codes; views are fine), all with
            the same N and D, on one device.
        scales: None, or one entry per block: None for a float block, float32 `[N, R_b]` for a quantised one.
        code_values: None, or float32 `[16]`: the value of each 4-bit code (uint8 blocks only).
        offsets: None, or a floating tensor `[N, D]` added to every vector of each candidate.
    """

    def __init__(
        self,
        blocks: Sequence[torch.Tensor],
        scales: Sequence[torch.Tensor | None] | None = None,
        code_values: torch.Tensor | None = None,
        offsets: torch.Tensor | None = None,
    ) -> None:
        blocks = list(blocks) if isinstance(blocks, (list, tuple)) else blocks
        if not isinstance(blocks, list) or not blocks:
            raise TypeError(f"blocks must be a non-empty list of [N, R_b, D] tensors, got {type(blocks).__name__}")
        scales = [None] * len(blocks) if scales is None else list(scales)
        if len(scales) != len(blocks):
            raise ValueError(f"got {len(scales)} scales for {len(blocks)} blocks")
        for number, (block, block_scales) in enumerate(zip(blocks, scales)):
            if not isinstance(block, torch.Tensor) or block.ndim != 3:
                shape = list(block.shape) if isinstance(block, torch.Tensor) else type(block).__name__
                raise ValueError(f"blocks[{number}] must be a tensor [N, R_b, D], got {shape}")
            if block.shape[0] != blocks[0].shape[0] or block.shape[2] != blocks[0].shape[2]:
                raise ValueError(
                    f"blocks[{number}] has shape {list(block.shape)}, but blocks[0] has {list(blocks[0].shape)}: "
                    f"every block needs the same number of candidates and dim"
                )
            if block.device != blocks[0].device:
                raise ValueError(f"blocks[{number}] is on {block.device}, but blocks[0] is on {blocks[0].device}")
            if block.shape[1] == 0:
                raise ValueError(f"blocks[{number}] holds no vectors (shape {list(block.shape)})")
            if block.dtype in (torch.int8, torch.uint8):
                if not isinstance(block_scales, torch.Tensor) or block_scales.dtype != torch.float32:
                    raise TypeError(
                        f"blocks[{number}] is {str(block.dtype).removeprefix('torch.')}: scales[{number}] must be a "
                        "float32 tensor [N, R_b]"
                    )
                if block_scales.shape != block.shape[:2] or block_scales.device != block.device:
                    raise ValueError(
                        f"scales[{number}] has shape {list(block_scales.shape)} on {block_scales.device}, expected "
                        f"{list(block.shape[:2])} on {block.device}"
                    )
            elif not block.dtype.is_floating_point:
                raise TypeError(
                    f"blocks[{number}] has dtype {block.dtype}, expected a floating dtype, int8 or uint8 (4-bit codes)"
                )
            elif block_scales is not None:
                raise ValueError(f"blocks[{number}] is {block.dtype}: scales[{number}] must be None")
        self.blocks: tuple[torch.Tensor, ...] = tuple(blocks)
        self.scales: tuple[torch.Tensor | None, ...] = tuple(scales)
        if code_values is not None:
            if not any(block.dtype == torch.uint8 for block in blocks):
                raise ValueError("code_values only apply to uint8 blocks (4-bit codes)")
            if not isinstance(code_values, torch.Tensor) or code_values.dtype != torch.float32:
                raise TypeError(f"code_values must be a float32 tensor [16], got {_describe(code_values)}")
            if code_values.shape != (16,) or code_values.device != blocks[0].device:
                raise ValueError(f"code_values must be [16] on {blocks[0].device}, got {_describe(code_values)}")
        if offsets is not None:
            if not isinstance(offsets, torch.Tensor) or not offsets.dtype.is_floating_point:
                raise TypeError(f"offsets must be a floating tensor [N, D], got {_describe(offsets)}")
            if offsets.shape != (len(blocks[0]), self.dim) or offsets.device != blocks[0].device:
                raise ValueError(
                    f"offsets must be [{len(blocks[0])}, {self.dim}] on {blocks[0].device}, got {_describe(offsets)}"
                )
        self.code_values, self.offsets = code_values, offsets

    def __len__(self) -> int:
        return self.blocks[0].shape[0]

    @property
    def num_vectors(self) -> int:
        """Vectors per candidate, over all blocks."""
        return sum(block.shape[1] for block in self.blocks)

    @property
    def dim(self) -> int:
        """D: the vector dimension (twice the stored last dimension for 4-bit codes)."""
        block = self.blocks[0]
        return block.shape[2] * (2 if block.dtype == torch.uint8 else 1)


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} {list(value.shape)} on {value.device}"
    return type(value).__name__


def _decode_block(
    stored: torch.Tensor,
    out: torch.Tensor,
    scales: torch.Tensor | None = None,
    code_values: torch.Tensor | None = None,
    offsets: torch.Tensor | None = None,
) -> None:
    """Decode stored vectors into `out` (float32 `[n, r, D]`, contiguous): the one decoder of every storage type.

    Args:
        stored: `[n, r, D]` floating or int8, or uint8 `[n, r, D / 2]` 4-bit codes (element 2i in the low nibble,
            2i + 1 in the high one).
        scales: float32 `[n, r]`, one per vector, for int8 / uint8 (`element = value * scale`).
        code_values: float32 `[16]`, the value of each 4-bit code (default: `code - 8`).
        offsets: floating `[n, D]`, added to all `r` vectors of each item.
    """
    if stored.dtype == torch.uint8 and code_values is None:  # "int4": value = code - 8
        pairs = out.view(*stored.shape, 2)
        pairs[..., 0].copy_(stored & 15)
        pairs[..., 1].copy_(stored >> 4)
        out.sub_(8.0)
    elif stored.dtype == torch.uint8:
        # One lookup per byte into the 256 pairs of values a byte can hold: both elements in one pass.
        codes = torch.arange(256, device=out.device)
        pairs = torch.stack([code_values[codes & 15], code_values[codes >> 4]], dim=1)
        torch.index_select(pairs, 0, stored.reshape(-1).int(), out=out.view(-1, 2))
    else:
        out.copy_(stored)
    if scales is not None:
        out.mul_(scales.unsqueeze(-1))
    if offsets is not None:
        out.add_(offsets.unsqueeze(1))


class TopKScores(NamedTuple):
    """The `k` best candidates per query, best first."""

    scores: torch.Tensor
    """float32 `[num_queries, k]`."""
    indices: torch.Tensor
    """int64 `[num_queries, k]`: positions in the candidates."""


def check_num_vectors(num_vectors: int | None, maximum: int, argument_name: str = "num_vectors") -> int:
    """Validate a vector count (a budget's r_q or r_c) against the `maximum` available.

    Args:
        num_vectors: `None` for all `maximum` vectors, or an integer in `1..maximum` (a Python int, a numpy
            integer or a 0-dim integer tensor).
        maximum: how many vectors there are.
        argument_name: the name used in error messages.

    Returns:
        The count as a Python int.

    Raises:
        TypeError: `num_vectors` is not an integer (bools, floats, strings, ... are refused).
        ValueError: it lies outside `1..maximum`.
    """
    if isinstance(maximum, bool) or not isinstance(maximum, numbers.Integral) or maximum < 1:
        raise ValueError(f"maximum must be a positive int, got {maximum!r}")
    if num_vectors is None:
        return int(maximum)
    value = _as_int(num_vectors)
    if value is None:
        raise TypeError(
            f"{argument_name} must be an int between 1 and {maximum} or None, "
            f"got {type(num_vectors).__name__} {num_vectors!r}"
        )
    if not 1 <= value <= maximum:
        raise ValueError(f"{argument_name} must be between 1 and {maximum} (inclusive), got {value}")
    return value


def late_interaction_scores(
    queries: torch.Tensor | Sequence[torch.Tensor],
    candidates: torch.Tensor | Sequence[torch.Tensor],
    num_query_vectors: int | None = None,
    num_candidate_vectors: int | None = None,
    *,
    query_mask: torch.Tensor | None = None,
    candidate_mask: torch.Tensor | None = None,
    top_k: int | None = None,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
) -> torch.Tensor | TopKScores:
    """Late-interaction scores of every query against every candidate, for a budget (r_q, r_c).

    `s(q, c) = sum_{i <= r_q} max_{j <= r_c} <q_i, c_j>` over the first r_q real query vectors and the first
    r_c real candidate vectors (no normalisation: pass L2-normalised vectors, as the model returns them).
    An item with fewer real vectors than the budget uses all it has; padding never takes part.

    Args:
        queries: float tensor `[Q, R_q, D]` (padded; see `query_mask`) or a list/tuple of `[R_i, D]`
            tensors (ragged), all on one device.
        candidates: the same for candidates, `[N, R_c, D]` or a list of `[R_j, D]` tensors, or `PrefixBlocks`
            (the blocked, possibly int8, layout of an index).
        num_query_vectors: r_q, in `1..R_q` (the padded width); `None` uses all vectors.
        num_candidate_vectors: r_c, in `1..R_c`; `None` uses all vectors.
        query_mask: optional bool (or 0/1 integer) `[Q, R_q]` for a padded `queries`, True for real vectors.
            "The first r_q vectors" then means the first r_q True positions. Not allowed with a list.
        candidate_mask: the same for candidates, `[N, R_c]`.
        top_k: if given, return only the `k` best candidates per query (`k` is clipped to N), kept as a
            running top-k across chunks so memory stays `Q x k`.
        chunk_size: candidates per chunk. `None` picks it from an element budget so that the extra memory
            stays within a few tens of MB (CPU) or ~100 MB (GPU) at any N. Results agree across chunk sizes
            up to float32 rounding (the BLAS may pick another kernel for another matrix shape).
        device: where to compute and return the result; default: the candidates' device.

    Returns:
        float32 `[Q, N]` scores on the compute device, or with `top_k` a `TopKScores(scores [Q, k] float32,
        indices [Q, k] int64)`, best first. Empty inputs give an empty `[Q, N]` (or `[Q, 0]`) result.

    Computation is in float32 whatever the input dtype (half-precision inputs are upcast one chunk at a time;
    float64 is rounded to float32). It runs without autograd: training losses compute their own similarities.
    """
    query_side = _EmbeddingSide(queries, query_mask, "queries", "query_mask")
    candidate_side = _EmbeddingSide(candidates, candidate_mask, "candidates", "candidate_mask")
    if query_side.dim is not None and candidate_side.dim is not None and query_side.dim != candidate_side.dim:
        raise ValueError(
            f"queries and candidates must have the same vector dim, got {query_side.dim} for queries and "
            f"{candidate_side.dim} for candidates"
        )
    query_side.select_vectors(num_query_vectors, "num_query_vectors")
    candidate_side.select_vectors(num_candidate_vectors, "num_candidate_vectors")
    num_queries, num_candidates = query_side.count, candidate_side.count
    k = None if top_k is None else min(check_positive_int(top_k, "top_k", none_allowed=True), num_candidates)
    if chunk_size is not None:
        chunk_size = check_positive_int(chunk_size, "chunk_size", none_allowed=True)
    if device is not None:
        compute_device = torch.device(device)
    else:
        compute_device = candidate_side.device or query_side.device or torch.device("cpu")

    if num_queries == 0 or num_candidates == 0:
        empty_scores = torch.zeros(num_queries, num_candidates if k is None else k, device=compute_device)
        if k is None:
            return empty_scores
        return TopKScores(empty_scores, torch.zeros(num_queries, k, dtype=torch.long, device=compute_device))

    with torch.no_grad():
        return _score(query_side, candidate_side, k, chunk_size, compute_device)


# ------------------------------------------------------------------------------------------------------------
# Internals
# ------------------------------------------------------------------------------------------------------------


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def _as_int(value: object) -> int | None:
    """`value` as a Python int if it is an integer (Python, numpy, 0-dim integer tensor), else None. bool is
    an Integral, but True meaning "1" is far more likely a bug than intent, so it is refused."""
    if isinstance(value, torch.Tensor):
        return int(value.item()) if value.ndim == 0 and _is_integer_dtype(value.dtype) else None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return None


class NotAnIntegerError(TypeError, ValueError):
    """A count or size that is not an integer: a wrong type and an invalid value alike, so callers catching
    either (TypeError as Python does, ValueError as argument checks usually do) see it."""


def check_positive_int(value: object, name: str, none_allowed: bool = False) -> int:
    """`value` as a Python int if it is an integer >= 1 (Python, numpy or 0-dim tensor; bools refused). The one
    positive-int check of the package.

    Raises:
        NotAnIntegerError (a TypeError and a ValueError): not an integer. ValueError: below 1. The message names
        `name` (and "or None" when the caller accepts None and handles it itself)."""
    expected = "a positive int or None" if none_allowed else "a positive int"
    integer = _as_int(value)
    if integer is None:
        raise NotAnIntegerError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    if integer < 1:
        raise ValueError(f"{name} must be {expected}, got {integer}")
    return integer


class _EmbeddingSide:
    """One side (queries or candidates) of the scoring, validated, that copies chunks of its items into
    float32 buffers of a fixed width `num_vectors` (the budget), padding resolved on the way."""

    def __init__(self, embeddings: object, mask: torch.Tensor | None, name: str, mask_name: str) -> None:
        self.name = name
        self.padded: torch.Tensor | None = None
        self.items: list[torch.Tensor] | None = None
        self.mask: torch.Tensor | None = None
        self.lengths: list[int] | None = None
        self.blocks: PrefixBlocks | None = None
        if isinstance(embeddings, torch.Tensor):
            self._init_padded(embeddings, mask, mask_name)
        elif isinstance(embeddings, PrefixBlocks):
            if mask is not None:
                raise ValueError(f"{mask_name} does not apply to PrefixBlocks: every stored vector is real")
            self.blocks, self.count, self.width = embeddings, len(embeddings), embeddings.num_vectors
            self.dim, self.device = embeddings.dim, embeddings.blocks[0].device
        elif isinstance(embeddings, (list, tuple)):
            if mask is not None:
                raise ValueError(
                    f"{mask_name} only applies to a padded {name} tensor; the items of a list carry their "
                    f"own number of vectors"
                )
            self._init_list(list(embeddings))
        else:
            raise TypeError(
                f"{name} must be a torch.Tensor of shape [num_items, num_vectors, dim], a list of "
                f"[num_vectors, dim] tensors or PrefixBlocks, got {type(embeddings).__name__}"
            )
        self.num_vectors = self.width

    def _init_padded(self, embeddings: torch.Tensor, mask: torch.Tensor | None, mask_name: str) -> None:
        name = self.name
        if embeddings.ndim != 3:
            hint = f" (for a single item use {name}.unsqueeze(0) or [{name}])" if embeddings.ndim == 2 else ""
            raise ValueError(
                f"{name} must have shape [num_items, num_vectors, dim] or be a list of [num_vectors, dim] "
                f"tensors, got a tensor of shape {list(embeddings.shape)}{hint}"
            )
        _check_floating(embeddings, name)
        self.count, self.width, self.dim = embeddings.shape
        if self.count > 0 and self.width == 0:
            raise ValueError(f"{name} has no vectors per item (shape {list(embeddings.shape)})")
        if self.dim == 0:
            raise ValueError(f"{name} has vectors of dim 0 (shape {list(embeddings.shape)})")
        if mask is not None:
            if not isinstance(mask, torch.Tensor):
                raise TypeError(f"{mask_name} must be a bool torch.Tensor or None, got {type(mask).__name__}")
            if mask.dtype != torch.bool and not _is_integer_dtype(mask.dtype):
                raise TypeError(f"{mask_name} must be a bool (or 0/1 integer) tensor, got dtype {mask.dtype}")
            if tuple(mask.shape) != (self.count, self.width):
                raise ValueError(
                    f"{mask_name} must have shape [{self.count}, {self.width}] to match {name} of shape "
                    f"{list(embeddings.shape)}, got {list(mask.shape)}"
                )
            mask = mask.bool()
            if self.count > 0:
                has_vectors = mask.any(dim=1)
                if not bool(has_vectors.all()):
                    index = int((~has_vectors).nonzero()[0, 0])
                    raise ValueError(f"{mask_name}[{index}] is all False: {name}[{index}] has no vectors")
        self.padded, self.mask, self.device = embeddings, mask, embeddings.device

    def _init_list(self, items: list[object]) -> None:
        name = self.name
        self.count, self.dim, self.device = len(items), None, None
        lengths = []
        for index, item in enumerate(items):
            if not isinstance(item, torch.Tensor):
                raise TypeError(
                    f"{name}[{index}] is a {type(item).__name__}, expected a torch.Tensor of shape [num_vectors, dim]"
                )
            if item.ndim != 2:
                raise ValueError(
                    f"{name}[{index}] must have shape [num_vectors, dim], got a tensor of shape {list(item.shape)}"
                )
            _check_floating(item, f"{name}[{index}]")
            if item.shape[0] == 0:
                raise ValueError(f"{name}[{index}] has no vectors (shape {list(item.shape)})")
            if self.dim is None:
                self.dim, self.device = item.shape[1], item.device
                if self.dim == 0:
                    raise ValueError(f"{name}[{index}] has vectors of dim 0 (shape {list(item.shape)})")
            elif item.shape[1] != self.dim:
                raise ValueError(f"{name}[{index}] has dim {item.shape[1]}, but {name}[0] has dim {self.dim}")
            elif item.device != self.device:
                raise ValueError(f"{name}[{index}] is on {item.device}, but {name}[0] is on {self.device}")
            lengths.append(item.shape[0])
        self.items, self.lengths = items, lengths
        self.width = max(lengths, default=0)

    def select_vectors(self, num_vectors: int | None, argument_name: str) -> None:
        """Keep the first `num_vectors` vectors of each item (all when None)."""
        if self.width == 0:
            # An empty list: there is no width to check against, only the type and sign.
            if num_vectors is not None:
                check_positive_int(num_vectors, argument_name, none_allowed=True)
            return
        self.num_vectors = check_num_vectors(num_vectors, self.width, argument_name)

    def part_lengths(self) -> list[int]:
        """Vectors per item in each part the scoring reads separately: for `PrefixBlocks`, the blocks the first
        `num_vectors` vectors lie in (the last one possibly cut); otherwise one part of all `num_vectors`."""
        if self.blocks is None:
            return [self.num_vectors]
        lengths, remaining = [], self.num_vectors
        for block in self.blocks.blocks:
            if remaining == 0:
                break
            lengths.append(min(block.shape[1], remaining))
            remaining -= lengths[-1]
        return lengths

    def as_matrix(self, start: int, end: int, device: torch.device, part: int = 0) -> torch.Tensor | None:
        """Items `start:end` (their vectors in `part`) as a float32 `[(end - start) * length, dim]` view without
        a copy, or None where that needs one (other dtype or device, padding inside the budget, a layout a matmul
        can't read). Saves a pass over memory that matters at small budgets, where a copy costs as much as the
        matmul."""
        length = self.part_lengths()[part]
        if self.blocks is not None:
            source = self.blocks.blocks[part]
            if source.dtype != torch.float32 or source.device != device or self.blocks.offsets is not None:
                return None
        else:
            source = self.padded
            if source is None or source.dtype != torch.float32 or source.device != device:
                return None
            if self.mask is not None and not bool(self.mask[start:end, :length].all()):
                return None
        chunk = source[start:end, :length]
        if chunk.stride(2) != 1:
            return None
        if length > 1 and (chunk.stride(1) != self.dim or chunk.stride(0) != length * self.dim):
            return None
        return chunk.reshape(-1, self.dim)

    def stage(self, start: int, end: int, out: torch.Tensor, pad_with_zeros: bool, part: int = 0) -> None:
        """Copy items `start:end` (their vectors in `part`) into `out` (float32 `[end - start, length, dim]`,
        contiguous), upcast or dequantised.

        Items with fewer than `num_vectors` real vectors are padded with zero vectors (`pad_with_zeros`,
        for queries: a zero query vector adds exactly 0 to the sum) or with copies of their own first vector
        (for candidates: a duplicate never changes a max, where a zero could win it over negative
        similarities).
        """
        if self.blocks is not None:
            blocks, length = self.blocks, out.shape[1]
            scales = blocks.scales[part]
            _decode_block(
                blocks.blocks[part][start:end, :length],
                out,
                None if scales is None else scales[start:end, :length],
                blocks.code_values,
                None if blocks.offsets is None else blocks.offsets[start:end],
            )
            return
        if self.items is not None:
            self._stage_list(start, end, out, pad_with_zeros)
            return
        chunk = self.padded[start:end]
        mask = None if self.mask is None else self.mask[start:end]
        if mask is None or bool(mask[:, : self.num_vectors].all()):
            # The first num_vectors positions are all real: a plain copy (and upcast) does.
            out.copy_(chunk[:, : self.num_vectors])
            return
        # Positions of each item's first num_vectors real vectors, True positions first in their order.
        order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)[:, : self.num_vectors]
        real_count = mask.sum(dim=1, keepdim=True).clamp(max=self.num_vectors)
        is_real = torch.arange(self.num_vectors, device=mask.device) < real_count
        positions = torch.where(is_real, order, order[:, :1]).to(chunk.device)
        rows = torch.arange(end - start, device=chunk.device).unsqueeze(1)
        out.copy_(chunk[rows, positions])
        if pad_with_zeros:
            out.masked_fill_(~is_real.to(out.device).unsqueeze(-1), 0.0)

    def _stage_list(self, start: int, end: int, out: torch.Tensor, pad_with_zeros: bool) -> None:
        num_vectors = self.num_vectors
        items = self.items[start:end]
        lengths = [min(length, num_vectors) for length in self.lengths[start:end]]
        stacked = torch.cat([item[:length] for item, length in zip(items, lengths)])
        if all(length == num_vectors for length in lengths):
            out.copy_(stacked.view(out.shape))
            return
        lengths_tensor = torch.tensor(lengths, device=stacked.device)
        offsets = torch.cumsum(lengths_tensor, dim=0) - lengths_tensor
        is_real = torch.arange(num_vectors, device=stacked.device) < lengths_tensor.unsqueeze(1)
        # Pad slots point at the item's first vector (offset + 0).
        rows = offsets.unsqueeze(1) + torch.where(is_real, torch.arange(num_vectors, device=stacked.device), 0)
        out.view(-1, out.shape[-1]).copy_(stacked[rows.view(-1)])
        if pad_with_zeros:
            out.masked_fill_(~is_real.to(out.device).unsqueeze(-1), 0.0)


def _check_floating(tensor: torch.Tensor, name: str) -> None:
    if not tensor.dtype.is_floating_point:
        raise TypeError(
            f"{name} has dtype {tensor.dtype}, expected a floating dtype (float32, bfloat16, float16 or float64)"
        )


def _score(
    query_side: _EmbeddingSide,
    candidate_side: _EmbeddingSide,
    k: int | None,
    chunk_size: int | None,
    device: torch.device,
) -> torch.Tensor | TopKScores:
    """The chunked kernel: per candidate chunk and query tile, one matmul per part of the candidates' vectors
    (one part, or the blocks of `PrefixBlocks`) into a reused buffer, a max over each candidate's vectors
    (running across parts), a sum over each query's vectors. Inputs are non-empty and validated."""
    num_queries, num_candidates, dim = query_side.count, candidate_side.count, query_side.dim
    query_vectors, candidate_vectors = query_side.num_vectors, candidate_side.num_vectors
    part_lengths = candidate_side.part_lengths()
    widest_part = max(part_lengths)
    on_cpu = device.type == "cpu"
    tile_elements = _TILE_ELEMENTS_CPU if on_cpu else _TILE_ELEMENTS_GPU
    # Candidates are read (views) or staged (upcast, dequantised) a chunk of at most this many elements at a
    # time: on CPU a chunk that fits the cache is matmul'd while still there, and MKL's skinny matmuls (one query)
    # slow down on much larger operands.
    staging_elements = _STAGING_ELEMENTS_CPU if on_cpu else tile_elements
    pair_elements = query_vectors * widest_part
    if chunk_size is None:
        queries_per_tile = tile_elements // (pair_elements * _MIN_CANDIDATES_PER_TILE)
        queries_per_tile = max(1, min(num_queries, queries_per_tile, tile_elements // (query_vectors * dim)))
        candidates_per_chunk = min(
            tile_elements // (queries_per_tile * pair_elements), staging_elements // (candidate_vectors * dim)
        )
        candidates_per_chunk = max(1, min(num_candidates, candidates_per_chunk))
    else:
        candidates_per_chunk = min(chunk_size, num_candidates)
        queries_per_tile = tile_elements // (pair_elements * candidates_per_chunk)
        queries_per_tile = max(1, min(num_queries, queries_per_tile, tile_elements // (query_vectors * dim)))

    # Buffers allocated once and reused: a fresh large allocation costs page faults on every chunk, and a
    # reused tile stays in cache. The staging buffers are only made when some chunk needs a copy.
    float32 = {"dtype": torch.float32, "device": device}
    similarity_buffer = torch.empty(candidates_per_chunk * widest_part * queries_per_tile * query_vectors, **float32)
    # A single part of one vector per candidate: the similarities already are the maxima, no buffer for them.
    max_elements = candidates_per_chunk * queries_per_tile * query_vectors
    max_buffer = torch.empty(max_elements if part_lengths != [1] else 0, **float32)
    # Maxima of the parts after the first, merged into max_buffer.
    part_max_buffer = torch.empty(max_elements if any(length > 1 for length in part_lengths[1:]) else 0, **float32)
    staging_buffers: dict[str, torch.Tensor] = {}

    def as_matrix(side: _EmbeddingSide, start: int, end: int, pad_with_zeros: bool, part: int = 0) -> torch.Tensor:
        """Items `start:end` of `side` (vectors of `part`) as float32 `[(end - start) * length, dim]` on `device`;
        the parts of one chunk are staged side by side."""
        matrix = side.as_matrix(start, end, device, part)
        if matrix is not None:
            return matrix
        items_per_buffer = queries_per_tile if side is query_side else candidates_per_chunk
        if side.name not in staging_buffers:
            staging_buffers[side.name] = torch.empty(items_per_buffer * side.num_vectors * dim, **float32)
        length = side.part_lengths()[part]
        offset = items_per_buffer * sum(side.part_lengths()[:part]) * dim
        staged = staging_buffers[side.name][offset : offset + (end - start) * length * dim]
        side.stage(start, end, staged.view(end - start, length, dim), pad_with_zeros, part)
        return staged.view(-1, dim)

    query_tiles = [
        (start, min(start + queries_per_tile, num_queries)) for start in range(0, num_queries, queries_per_tile)
    ]
    # With a single query tile the queries are prepared once; otherwise again for every candidate chunk,
    # which costs about 1 / (2 * chunk vectors) of the matmul work.
    single_query_tile = as_matrix(query_side, 0, num_queries, True) if len(query_tiles) == 1 else None

    scores = torch.empty(num_queries, num_candidates if k is None else candidates_per_chunk, **float32)
    best_scores: torch.Tensor | None = None
    best_indices: torch.Tensor | None = None
    for chunk_start in range(0, num_candidates, candidates_per_chunk):
        chunk_end = min(chunk_start + candidates_per_chunk, num_candidates)
        chunk_length = chunk_end - chunk_start
        parts = [as_matrix(candidate_side, chunk_start, chunk_end, False, part) for part in range(len(part_lengths))]
        chunk_scores = scores[:, chunk_start:chunk_end] if k is None else scores[:, :chunk_length]
        for query_start, query_end in query_tiles:
            if single_query_tile is not None:
                tile_queries = single_query_tile
            else:
                tile_queries = as_matrix(query_side, query_start, query_end, True)
            tile_length, query_width = query_end - query_start, tile_queries.shape[0]
            if query_vectors == 1 and part_lengths == [1]:
                # (1, 1): the similarities are the scores; the matmul writes them in place (measured 1.6x faster
                # with 32 queries than the wide layout and its transposed copy).
                torch.mm(tile_queries, parts[0].T, out=chunk_scores[query_start:query_end])
                continue
            # Up to _MAX_QUERY_VECTORS_FOR_ROW_LAYOUT query vectors: [query vectors, candidate vectors], the max
            # over each candidate's contiguous columns. Wider: [candidate vectors, query vectors], the max over
            # rows, vectorised across query vectors.
            row_layout = query_width <= _MAX_QUERY_VECTORS_FOR_ROW_LAYOUT
            shape = (query_width, chunk_length) if row_layout else (chunk_length, query_width)
            maxima = None
            for number, (matrix, length) in enumerate(zip(parts, part_lengths)):
                elements = matrix.shape[0] * query_width
                if row_layout:
                    similarities = similarity_buffer[:elements].view(query_width, matrix.shape[0])
                    torch.mm(tile_queries, matrix.T, out=similarities)
                    grouped, vector_axis = similarities.view(query_width, chunk_length, length), 2
                else:
                    similarities = similarity_buffer[:elements].view(matrix.shape[0], query_width)
                    torch.mm(matrix, tile_queries.T, out=similarities)
                    grouped, vector_axis = similarities.view(chunk_length, length, query_width), 1
                # Max over each candidate's vectors in this part, merged into the running max of earlier parts.
                if number == 0:
                    if len(parts) == 1 and length == 1:
                        maxima = similarities.view(shape)
                        continue
                    maxima = max_buffer[: chunk_length * query_width].view(shape)
                    if length == 1:
                        maxima.copy_(similarities.view(shape))
                    else:
                        torch.amax(grouped, dim=vector_axis, out=maxima)
                elif length == 1:
                    torch.maximum(maxima, similarities.view(shape), out=maxima)
                else:
                    part_maxima = part_max_buffer[: chunk_length * query_width].view(shape)
                    torch.amax(grouped, dim=vector_axis, out=part_maxima)
                    torch.maximum(maxima, part_maxima, out=maxima)
            # Sum over each query's vectors, in float32 -> [tile queries, chunk].
            if row_layout:
                tile_scores = maxima.view(tile_length, query_vectors, chunk_length).sum(dim=1)
                chunk_scores[query_start:query_end].copy_(tile_scores)
            else:
                tile_scores = maxima
                if query_vectors > 1:
                    tile_scores = maxima.view(chunk_length, tile_length, query_vectors).sum(dim=2)
                chunk_scores[query_start:query_end].copy_(tile_scores.T)
        if k is not None:
            best_scores, best_indices = merge_top_k(best_scores, best_indices, chunk_scores, chunk_start, k)

    if k is None:
        return scores
    return TopKScores(best_scores, best_indices)


def merge_top_k(
    best_scores: torch.Tensor | None,
    best_indices: torch.Tensor | None,
    new_scores: torch.Tensor,
    new_indices: int | torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-k: the best `k` of the best so far and a new block of scores. Equal scores rank by the lower
    index first, so the result does not depend on how the candidates were split into chunks, shards or a
    shortlist (`torch.topk` alone keeps an arbitrary one of tied candidates).

    Args:
        best_scores / best_indices: `[Q, <= k]` from the previous call, or None at the start.
        new_scores: `[Q, n]` scores of a block of candidates.
        new_indices: the candidates of `new_scores`' columns: an int64 `[Q, n]` tensor, or an int offset
            (column j is candidate `offset + j`).
        k: how many to keep.

    Returns:
        (scores, indices) `[Q, min(k, ...)]`, best first (ties: lower index first).
    """
    top_scores, top_indices = _top_k_lowest_index_first(new_scores, new_indices, min(k, new_scores.shape[1]))
    if best_scores is None:
        return top_scores, top_indices
    scores = torch.cat([best_scores, top_scores], dim=1)
    indices = torch.cat([best_indices, top_indices], dim=1)
    return _top_k_lowest_index_first(scores, indices, min(k, scores.shape[1]))


def _top_k_lowest_index_first(
    scores: torch.Tensor, indices: torch.Tensor | int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` best (score, then lowest index) of each row of `scores` `[Q, n]`, sorted that way, with their
    indices: from `indices` `[Q, n]`, or column + `indices` for an int offset."""

    def index_of(rows: slice | int, columns: torch.Tensor) -> torch.Tensor:
        if isinstance(indices, torch.Tensor):
            return indices.gather(1, columns) if isinstance(rows, slice) else indices[rows, columns]
        return columns + indices

    top = scores.topk(min(k + 1, scores.shape[1]), dim=1)  # one more, to see whether the k-th place is tied
    selected_scores, selected_indices = top.values[:, :k], index_of(slice(None), top.indices[:, :k])
    if top.values.shape[1] > k:
        # Rows where the next candidate ties the k-th score: topk kept an arbitrary few of the tied candidates;
        # choose again among all of them. Rare with real embeddings, so done row by row.
        tied = top.values[:, k] == top.values[:, k - 1]
        if bool(tied.any()):
            selected_scores, selected_indices = selected_scores.clone(), selected_indices.clone()
            for row in tied.nonzero()[:, 0].tolist():
                keep = (scores[row] >= top.values[row, k - 1]).nonzero()[:, 0]
                keep_indices = index_of(row, keep)
                order = _score_then_index_order(scores[row, keep], keep_indices)[:k]
                selected_scores[row], selected_indices[row] = scores[row, keep[order]], keep_indices[order]
    order = _score_then_index_order(selected_scores, selected_indices)
    return selected_scores.gather(-1, order), selected_indices.gather(-1, order)


def _score_then_index_order(scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The permutation (along the last axis) sorting by score descending, ties by index ascending."""
    by_index = indices.argsort(dim=-1, stable=True)
    by_score = scores.gather(-1, by_index).argsort(dim=-1, descending=True, stable=True)
    return by_index.gather(-1, by_score)
