"""Training MetaEmbed: the Matryoshka Multi-Vector Retrieval (MMR) loss, its distributed and cached variants.

MMR (MetaEmbed paper, section "Matryoshka Multi-Vector Retrieval") trains every prefix of the query and candidate
vectors to work on its own: for each budget (r_q, r_c) of `groups` it scores

    s(q, c) = sum_{i <= r_q} max_{j <= r_c} <q_i, c_j>

on the (L2-normalised) vectors, takes an InfoNCE loss over the in-batch candidates plus the query's own hard
negatives with logits s / temperature, and averages the groups' losses with weights.

- `mmr_loss`: the loss on embeddings you computed (optionally with candidates gathered across ranks).
- `MMRLoss`: embeds processed batches with a model (e.g. `MetaEmbedModel`), then `mmr_loss`.
- `CachedMMRLoss`: the same loss with a gradient cache (GradCache, as in sentence-transformers' cached losses),
  so the batch size is bounded by the number of similarities, not by the model's activations.
- `split_features`: cuts a `MetaEmbedProcessor` batch (text and images) into mini-batches.

This file is a training tool of the repository, not part of the remote code shipped to the Hub.
"""

from __future__ import annotations

import io
import math
import numbers
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any, Literal, NamedTuple, overload

import PIL.Image
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import get_device_states, set_device_states

from processing_metaembed import normalize_items
from scoring_metaembed import MMR_BUDGETS

__all__ = [
    "DEFAULT_TEMPERATURE",
    "LORA_TARGET_MODULES",
    "MMR_GROUPS",
    "CachedMMRLoss",
    "MMRLoss",
    "MMRLossOutput",
    "MetaEmbedDataCollator",
    "embed_with_model",
    "mmr_loss",
    "split_features",
    "train_metaembed",
]

# ------------------------------------------------------------------------------------------------------------
# MMR loss
# ------------------------------------------------------------------------------------------------------------

MMR_GROUPS = MMR_BUDGETS
"""The loss's default groups: the paper's budgets (r_q, r_c), from one vector to 16 query x 64 candidate."""
DEFAULT_TEMPERATURE = 0.03
"""The paper's InfoNCE temperature tau: logits are s(q, c) / tau."""

Budget = tuple[int, int]


class MMRLossOutput(NamedTuple):
    """The MMR loss and its per-group parts."""

    loss: torch.Tensor
    """Scalar: the weighted mean of `group_losses` (weights normalised to sum to 1)."""
    group_losses: dict[Budget, torch.Tensor]
    """Scalar InfoNCE loss per budget (r_q, r_c), in the order of `groups`."""


@overload
def mmr_loss(
    query_embeddings: torch.Tensor,
    candidate_embeddings: torch.Tensor,
    groups: Sequence[Budget] = ...,
    temperature: float = ...,
    hard_negative_embeddings: torch.Tensor | None = ...,
    group_weights: Sequence[float] | None = ...,
    *,
    gather_across_devices: bool = ...,
    return_group_losses: Literal[False] = ...,
) -> torch.Tensor: ...


@overload
def mmr_loss(
    query_embeddings: torch.Tensor,
    candidate_embeddings: torch.Tensor,
    groups: Sequence[Budget] = ...,
    temperature: float = ...,
    hard_negative_embeddings: torch.Tensor | None = ...,
    group_weights: Sequence[float] | None = ...,
    *,
    gather_across_devices: bool = ...,
    return_group_losses: Literal[True],
) -> MMRLossOutput: ...


def mmr_loss(
    query_embeddings: torch.Tensor,
    candidate_embeddings: torch.Tensor,
    groups: Sequence[Budget] = MMR_GROUPS,
    temperature: float = DEFAULT_TEMPERATURE,
    hard_negative_embeddings: torch.Tensor | None = None,
    group_weights: Sequence[float] | None = None,
    *,
    gather_across_devices: bool = False,
    return_group_losses: bool = False,
) -> torch.Tensor | MMRLossOutput:
    """Matryoshka Multi-Vector Retrieval loss: InfoNCE at every budget of `groups`, weighted mean over groups.

    For a group (r_q, r_c), query a's logit for candidate c is `s(q_a, c) / temperature` with
    `s(q, c) = sum_{i <= r_q} max_{j <= r_c} <q_i, c_j>` over the leading vectors (no length normalisation: pass
    L2-normalised vectors, as `MetaEmbedModel` returns them). Query a's candidates are all in-batch candidates
    (candidate a is its positive, the others are negatives) followed by its own hard negatives
    `hard_negative_embeddings[a]` only; its loss is the cross-entropy with target = its positive. A group's loss
    is the mean over queries; the total is `sum_g w_g * loss_g / sum_g w_g`.

    Args:
        query_embeddings: float `[B, R_q, D]`.
        candidate_embeddings: float `[B, R_c, D]`, aligned with the queries: row a is query a's positive.
        groups: budgets (r_q, r_c), each within `1..R_q` x `1..R_c` (a larger budget raises a ValueError rather
            than being clipped, which would silently train another configuration). Vectors beyond the largest
            budget are not read (they get zero gradient).
        temperature: tau > 0.
        hard_negative_embeddings: optional float `[B, H, R_c', D]` (R_c' >= the largest r_c): row a holds query
            a's H hard negatives, which no other query sees.
        group_weights: one non-negative weight per group (not all zero); default 1.0 each.
        gather_across_devices: when torch.distributed is initialised with more than one rank, every query also
            sees the candidates of all other ranks as negatives (see "Distributed" below). A no-op otherwise.
            Every rank must then call this function (and later backward) the same number of times.
        return_group_losses: return an `MMRLossOutput` (total and per-group losses) instead of the total.

    Returns:
        A scalar tensor (or `MMRLossOutput`) that carries gradients to all inputs. It is float32 (float64 if the
        inputs are float64): half-precision inputs are upcast, because logits of up to R_q / tau ~ 500 need
        float32 resolution.

    Distributed: candidates are all-gathered with an autograd-aware all-gather (its backward sums, onto each
    rank's own candidates, the gradients that every rank's loss sends them), and query a's positive is at
    index `offset + a`, where offset is the number of candidates on lower ranks. Each rank's value is the sum of
    its queries' losses divided by the mean number of queries per rank (with equal local batches: the mean
    over its queries). So the mean of the values over ranks equals the single-process loss of the concatenated
    batch, each rank's embedding gradients are world_size x that loss's gradients, and after DDP's gradient
    averaging over ranks the parameter gradients equal the single-process full-batch gradients (up to float
    rounding; no extra factor to correct).
    Hard negatives stay local: only their own query scores them. Local batches may differ in size.

    Computation: the similarities `[B, R_q, N, R_c]` (N = in-batch candidates; and `[B, R_q, H, R_c]` against the
    own hard negatives) are computed once, for the largest budgets. Then, for each distinct r_c in increasing
    order, the maximum over the first r_c candidate vectors is a running maximum (the previous r_c's maximum
    combined with the maximum over the new vectors only), so the reduction reads each similarity once whatever
    the number of groups. A group's scores are the sum of those maxima over its first r_q query vectors.
    """
    output = _checked_mmr_loss(
        query_embeddings,
        candidate_embeddings,
        hard_negative_embeddings,
        _check_groups(groups),
        group_weights,
        _check_temperature(temperature),
        gather_across_devices,
    )
    return output if return_group_losses else output.loss


def _checked_mmr_loss(
    query_embeddings: torch.Tensor,
    candidate_embeddings: torch.Tensor,
    hard_negative_embeddings: torch.Tensor | None,
    groups: tuple[Budget, ...],
    group_weights: Sequence[float] | None,
    temperature: float,
    gather_across_devices: bool,
    query_chunk_size: int | None = None,
    backward: bool = False,
) -> MMRLossOutput:
    """`_mmr_loss` after checking the embeddings against checked `groups` and normalising the weights."""
    compute_dtype = _check_embeddings(query_embeddings, candidate_embeddings, hard_negative_embeddings)
    _check_budgets_fit(groups, query_embeddings, candidate_embeddings, hard_negative_embeddings)
    weights = _normalised_group_weights(group_weights, len(groups), compute_dtype, query_embeddings.device)
    return _mmr_loss(
        query_embeddings,
        candidate_embeddings,
        hard_negative_embeddings,
        groups,
        weights,
        temperature,
        gather_across_devices,
        query_chunk_size,
        backward,
    )


def _mmr_loss(
    query_embeddings: torch.Tensor,
    candidate_embeddings: torch.Tensor,
    hard_negative_embeddings: torch.Tensor | None,
    groups: tuple[Budget, ...],
    weights: torch.Tensor,
    temperature: float,
    gather_across_devices: bool,
    query_chunk_size: int | None = None,
    backward: bool = False,
) -> MMRLossOutput:
    """The one implementation of the loss, on checked arguments (`weights` sum to 1).

    With `backward=True` (the gradient cache's step 2) the queries are scored `query_chunk_size` at a time and each
    chunk's loss is back-propagated at once, so only one chunk's similarities are alive; the returned tensors are
    then detached and the gradients are in the inputs' `.grad`. The all-gather is back-propagated once at the end,
    so each rank runs one collective per step whatever its number of chunks.
    """
    gathered = _gather_candidates(candidate_embeddings, gather_across_devices)
    in_batch_candidates = gathered.candidates
    if backward and in_batch_candidates is not candidate_embeddings:
        in_batch_candidates = in_batch_candidates.detach().requires_grad_()
    num_queries = query_embeddings.shape[0]
    positive_indices = torch.arange(num_queries, device=query_embeddings.device) + gathered.offset
    chunk_size = query_chunk_size or num_queries
    chunk_group_losses = []
    for begin in range(0, num_queries, chunk_size):
        end = min(begin + chunk_size, num_queries)
        cross_entropy_sums = _group_cross_entropy_sums(
            query_embeddings[begin:end],
            in_batch_candidates,
            None if hard_negative_embeddings is None else hard_negative_embeddings[begin:end],
            positive_indices[begin:end],
            groups,
            temperature,
            weights.dtype,
        )
        group_losses = cross_entropy_sums / gathered.queries_per_rank
        if backward:
            with _backward_context(query_embeddings.device):
                (group_losses * weights).sum().backward()
            group_losses = group_losses.detach()
        chunk_group_losses.append(group_losses)
    if backward and in_batch_candidates is not gathered.candidates:
        with _backward_context(query_embeddings.device):
            torch.autograd.backward(gathered.candidates, in_batch_candidates.grad)
    group_losses = torch.stack(chunk_group_losses).sum(0)
    return MMRLossOutput((group_losses * weights).sum(), dict(zip(groups, group_losses.unbind(0))))


def _backward_context(device: torch.device) -> torch.autocast:
    """For the backward passes this file starts itself (the cache's steps 2 and 3), which may run inside the
    caller's autocast block: autocast would also cast the backward's products to half precision, where a plain
    `loss.backward()` after the block would not."""
    return torch.autocast(device.type, enabled=False)


def _group_cross_entropy_sums(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    own_hard_negatives: torch.Tensor | None,
    positive_indices: torch.Tensor,
    groups: tuple[Budget, ...],
    temperature: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """InfoNCE losses summed over `queries` [b, R_q, D], one per group: `[len(groups)]`, computed in `dtype`.

    Candidates: `candidates` [N, R_c, D] shared by all queries, then each query's own `own_hard_negatives`
    [b, H, R_c, D]; `positive_indices` [b] index into the N shared ones.
    """
    # Under an autocast block (mixed-precision training) the products below would run in half precision: logits
    # of up to R_q / temperature need float32.
    with torch.autocast(queries.device.type, enabled=False):
        return _group_cross_entropy_sums_in_dtype(
            queries, candidates, own_hard_negatives, positive_indices, groups, temperature, dtype
        )


def _group_cross_entropy_sums_in_dtype(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    own_hard_negatives: torch.Tensor | None,
    positive_indices: torch.Tensor,
    groups: tuple[Budget, ...],
    temperature: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    num_query_vectors = max(r_q for r_q, _ in groups)
    num_candidate_vectors = max(r_c for _, r_c in groups)
    queries = queries[:, :num_query_vectors].to(dtype)
    num_queries, _, dim = queries.shape

    candidates = candidates[:, :num_candidate_vectors].to(dtype)
    num_candidates = candidates.shape[0]
    # One GEMM over all (query vector, candidate vector) pairs, laid out [b, R_q, N, R_c] so that the maxima over
    # candidate vectors reduce the innermost, contiguous dimension.
    similarity_blocks = [
        torch.matmul(queries.reshape(-1, dim), candidates.reshape(-1, dim).T).view(
            num_queries, num_query_vectors, num_candidates, num_candidate_vectors
        )
    ]
    if own_hard_negatives is not None and own_hard_negatives.shape[1] > 0:
        own_hard_negatives = own_hard_negatives[:, :, :num_candidate_vectors].to(dtype)
        num_hard_negatives = own_hard_negatives.shape[1]
        # A batched product: query a meets only its own hard negatives, [b, R_q, H, R_c].
        similarity_blocks.append(
            torch.bmm(queries, own_hard_negatives.reshape(num_queries, -1, dim).transpose(1, 2)).view(
                num_queries, num_query_vectors, num_hard_negatives, num_candidate_vectors
            )
        )

    candidate_budgets = sorted({r_c for _, r_c in groups})
    # Per block and r_c: max_{j < r_c} of the similarities, [b, R_q, candidates of the block].
    prefix_maxima = [_running_prefix_maxima(similarity, candidate_budgets) for similarity in similarity_blocks]
    cross_entropy_sums = []
    for num_group_query_vectors, num_group_candidate_vectors in groups:
        # Scores [b, N (+ H)]: the blocks' maxima summed over the first r_q query vectors, side by side. The
        # blocks are joined only now, at score size, instead of copying the R_q x R_c times larger similarities.
        scores = torch.cat(
            [maxima[num_group_candidate_vectors][:, :num_group_query_vectors].sum(1) for maxima in prefix_maxima],
            dim=1,
        )
        cross_entropy_sums.append(F.cross_entropy(scores / temperature, positive_indices, reduction="sum"))
    return torch.stack(cross_entropy_sums)


def _running_prefix_maxima(similarity: torch.Tensor, candidate_budgets: list[int]) -> dict[int, torch.Tensor]:
    """`{r_c: similarity[..., :r_c].amax(-1)}` for increasing `candidate_budgets`, each from the previous one and
    the maximum over the new vectors only."""
    maxima: dict[int, torch.Tensor] = {}
    running_maximum: torch.Tensor | None = None
    start = 0
    for budget in candidate_budgets:
        new_maximum = similarity[..., start:budget].amax(-1)
        running_maximum = new_maximum if running_maximum is None else torch.maximum(running_maximum, new_maximum)
        maxima[budget] = running_maximum
        start = budget
    return maxima


class _GatheredCandidates(NamedTuple):
    candidates: torch.Tensor
    """[N_all, R_c, D]: the candidates of all ranks, in rank order (only this rank's when not gathering)."""
    offset: int
    """Index in `candidates` of this rank's first candidate."""
    queries_per_rank: float
    """The loss normaliser: the mean number of queries per rank (this rank's count when not gathering)."""


def _gather_candidates(candidates: torch.Tensor, gather_across_devices: bool) -> _GatheredCandidates:
    """All-gather the candidates of every rank, keeping the autograd link to every rank's rows."""
    local_count = candidates.shape[0]
    if not gather_across_devices:
        return _GatheredCandidates(candidates, 0, local_count)
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return _GatheredCandidates(candidates, 0, local_count)
    world_size, rank = dist.get_world_size(), dist.get_rank()
    # Shapes first: all_gather needs equal shapes, so uneven local batches are padded to the largest, and other
    # mismatches are reported on every rank alike instead of failing (or hanging) inside the collective.
    local_shape = torch.tensor(candidates.shape, dtype=torch.long, device=candidates.device)
    shapes = [torch.empty_like(local_shape) for _ in range(world_size)]
    dist.all_gather(shapes, local_shape)
    shape_lists = [shape.tolist() for shape in shapes]
    if any(shape[1:] != shape_lists[0][1:] for shape in shape_lists):
        raise ValueError(f"candidate embeddings differ in [R_c, D] across ranks: shapes per rank {shape_lists}")
    counts = [shape[0] for shape in shape_lists]
    padded = F.pad(candidates, (0, 0, 0, 0, 0, max(counts) - local_count))

    from torch.distributed.nn.functional import all_gather

    # The autograd-aware all-gather; torch marks it deprecated in favour of a private functional API, so its
    # FutureWarning (once per call) is silenced here only.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*all_gather is deprecated", category=FutureWarning)
        pieces = all_gather(padded.contiguous())
    gathered = torch.cat([piece[:count] for piece, count in zip(pieces, counts)])
    return _GatheredCandidates(gathered, sum(counts[:rank]), sum(counts) / world_size)


def _check_embeddings(
    query_embeddings: object, candidate_embeddings: object, hard_negative_embeddings: object
) -> torch.dtype:
    """Validate shapes, dtypes and devices; return the compute dtype."""
    named = [("query_embeddings", query_embeddings, 3), ("candidate_embeddings", candidate_embeddings, 3)]
    if hard_negative_embeddings is not None:
        named.append(("hard_negative_embeddings", hard_negative_embeddings, 4))
    for name, tensor, num_dims in named:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
        if tensor.dim() != num_dims:
            expected = "[B, H, R_c, D]" if num_dims == 4 else "[B, R, D]"
            raise ValueError(f"{name} must be {num_dims}-D {expected}, got shape {tuple(tensor.shape)}")
        if tensor.shape[-2] == 0 or tensor.shape[-1] == 0:
            raise ValueError(f"{name} has no vectors: shape {tuple(tensor.shape)}")
        if tensor.device != query_embeddings.device:
            raise ValueError(f"{name} is on {tensor.device}, query_embeddings on {query_embeddings.device}")
    batch_size, _, dim = query_embeddings.shape
    if batch_size == 0:
        raise ValueError("the batch is empty: query_embeddings has shape " + str(tuple(query_embeddings.shape)))
    if candidate_embeddings.shape[0] != batch_size:
        raise ValueError(
            f"candidate_embeddings must be aligned with query_embeddings (row a = query a's positive): got "
            f"{candidate_embeddings.shape[0]} candidates for {batch_size} queries"
        )
    for name, tensor, _ in named[1:]:
        if tensor.shape[-1] != dim:
            raise ValueError(f"{name} has vector dim {tensor.shape[-1]}, query_embeddings {dim}")
    if hard_negative_embeddings is not None and hard_negative_embeddings.shape[0] != batch_size:
        raise ValueError(
            f"hard_negative_embeddings must be [B, H, R_c, D] with B = {batch_size} (row a = query a's hard "
            f"negatives), got shape {tuple(hard_negative_embeddings.shape)}"
        )
    dtypes = [tensor.dtype for _, tensor, _ in named]
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _check_groups(groups: object) -> tuple[Budget, ...]:
    """Validate the budgets' form (pairs of positive ints, no repeats); return them as a tuple of int pairs."""
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence) or len(groups) == 0:
        raise ValueError(f"groups must be a non-empty sequence of (r_q, r_c) pairs, got {groups!r}")
    checked = []
    for group in groups:
        if (
            not isinstance(group, Sequence)
            or len(group) != 2
            or not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 1 for n in group)
        ):
            raise ValueError(f"each group must be a pair (r_q, r_c) of positive ints, got {group!r}")
        checked.append((int(group[0]), int(group[1])))
    if len(set(checked)) != len(checked):
        raise ValueError(f"groups must not repeat a budget, got {checked}")
    return tuple(checked)


def _check_budgets_fit(
    groups: tuple[Budget, ...],
    query_embeddings: torch.Tensor,
    candidate_embeddings: torch.Tensor,
    hard_negative_embeddings: torch.Tensor | None,
) -> None:
    available = [
        ("query_embeddings", 0, query_embeddings.shape[1]),
        ("candidate_embeddings", 1, candidate_embeddings.shape[1]),
    ]
    if hard_negative_embeddings is not None:
        available.append(("hard_negative_embeddings", 1, hard_negative_embeddings.shape[2]))
    for group in groups:
        for name, side, num_vectors in available:
            if group[side] > num_vectors:
                raise ValueError(
                    f"group {group} needs {group[side]} {('query', 'candidate')[side]} vectors but {name} has "
                    f"{num_vectors}; embed more vectors or drop the group"
                )


def _normalised_group_weights(
    group_weights: Sequence[float] | None, num_groups: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    if group_weights is None:
        return torch.full((num_groups,), 1.0 / num_groups, dtype=dtype, device=device)
    if isinstance(group_weights, torch.Tensor):
        group_weights = group_weights.tolist()
    if isinstance(group_weights, (str, bytes)) or not isinstance(group_weights, Sequence):
        raise TypeError(f"group_weights must be a sequence of numbers, got {type(group_weights).__name__}")
    if len(group_weights) != num_groups:
        raise ValueError(f"group_weights has {len(group_weights)} weights for {num_groups} groups")
    if not all(
        isinstance(weight, numbers.Real) and not isinstance(weight, bool) and math.isfinite(weight) and weight >= 0
        for weight in group_weights
    ):
        raise ValueError(f"group_weights must be finite non-negative numbers, got {list(group_weights)}")
    total = float(sum(group_weights))
    if total <= 0:
        raise ValueError("group_weights must not all be zero")
    return torch.tensor([float(weight) / total for weight in group_weights], dtype=dtype, device=device)


def _check_temperature(temperature: object) -> float:
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, numbers.Real)
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise ValueError(f"temperature must be a finite positive number, got {temperature!r}")
    return float(temperature)


# ------------------------------------------------------------------------------------------------------------
# Loss objects that embed with a model: plain and gradient-cached
# ------------------------------------------------------------------------------------------------------------

Features = Mapping[str, Any]
"""One processed batch: keyword arguments of the model's forward (e.g. a `MetaEmbedProcessor` output)."""
EmbedFn = Callable[[nn.Module, Features, str, int], torch.Tensor]
"""`(model, features, task, num_vectors) -> [b, num_vectors, D]` embeddings, task "query" or "candidate"."""


def embed_with_model(model: nn.Module, features: Features, task: str, num_vectors: int) -> torch.Tensor:
    """The default `EmbedFn`: `model(**features, task=task, num_vectors=num_vectors)`, as `MetaEmbedModel.forward`
    (also wrapped in DDP) takes it; reads `.embeddings` (or `["embeddings"]`) or takes a plain tensor output."""
    output = model(**features, task=task, num_vectors=num_vectors)
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "embeddings" in output:
        return output["embeddings"]
    return output.embeddings


class MMRLoss:
    """MMR loss on processed batches: embeds queries, candidates and hard negatives with `model`, then `mmr_loss`.

    `model` is called through `embed_fn` with `num_vectors` = the largest budget of that side, so a candidate
    needs only the Meta Tokens the budgets read. Call it with the features of one step:

        output = loss_fn(query_features, candidate_features, hard_negative_features)
        output.loss.backward()  # output.group_losses: per budget, for logging

    Features are a processed batch (a `Mapping` of model inputs) or a list of such mini-batches, concatenated in
    order. Hard negatives are B x H items, query-major: items a*H .. a*H + H - 1 belong to query a.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        groups: Sequence[Budget] = MMR_GROUPS,
        temperature: float = DEFAULT_TEMPERATURE,
        group_weights: Sequence[float] | None = None,
        gather_across_devices: bool = False,
        embed_fn: EmbedFn = embed_with_model,
    ) -> None:
        self.model = model
        self.groups = _check_groups(groups)
        self.temperature = _check_temperature(temperature)
        # Validated now, so a bad configuration fails before any training step.
        _normalised_group_weights(group_weights, len(self.groups), torch.float32, torch.device("cpu"))
        self.group_weights = None if group_weights is None else [float(weight) for weight in group_weights]
        self.gather_across_devices = gather_across_devices
        self.embed_fn = embed_fn

    @property
    def num_query_vectors(self) -> int:
        """Query vectors the budgets read (the largest r_q)."""
        return max(r_q for r_q, _ in self.groups)

    @property
    def num_candidate_vectors(self) -> int:
        """Candidate vectors the budgets read (the largest r_c)."""
        return max(r_c for _, r_c in self.groups)

    def __call__(
        self,
        query_features: Features | Sequence[Features],
        candidate_features: Features | Sequence[Features],
        hard_negative_features: Features | Sequence[Features] | None = None,
        *,
        model: nn.Module | None = None,
    ) -> MMRLossOutput:
        """Embed with gradients and compute the loss; the group losses carry gradients too. `model` replaces
        `self.model` for this call (e.g. the DDP-wrapped model a trainer passes to its `compute_loss`)."""
        model = self.model if model is None else model
        query_embeddings = torch.cat([self._embed(model, chunk, "query") for chunk in _as_chunks(query_features, None)])
        candidate_embeddings = torch.cat(
            [self._embed(model, chunk, "candidate") for chunk in _as_chunks(candidate_features, None)]
        )
        hard_negative_embeddings = None
        if hard_negative_features is not None:
            flat = torch.cat(
                [self._embed(model, chunk, "candidate") for chunk in _as_chunks(hard_negative_features, None)]
            )
            hard_negative_embeddings = _per_query_hard_negatives(flat, query_embeddings.shape[0])
        return self._loss(query_embeddings, candidate_embeddings, hard_negative_embeddings)

    def _embed(self, model: nn.Module, features: Features, task: str) -> torch.Tensor:
        num_vectors = self.num_query_vectors if task == "query" else self.num_candidate_vectors
        return self.embed_fn(model, features, task, num_vectors)

    def _loss(
        self,
        query_embeddings: torch.Tensor,
        candidate_embeddings: torch.Tensor,
        hard_negative_embeddings: torch.Tensor | None,
        query_chunk_size: int | None = None,
        backward: bool = False,
    ) -> MMRLossOutput:
        return _checked_mmr_loss(
            query_embeddings,
            candidate_embeddings,
            hard_negative_embeddings,
            self.groups,
            self.group_weights,
            self.temperature,
            self.gather_across_devices,
            query_chunk_size,
            backward,
        )


class CachedMMRLoss(MMRLoss):
    """`MMRLoss` with a gradient cache (GradCache, Gao et al. 2021; sentence-transformers' cached losses), so the
    batch size is no longer bounded by the model's activations:

    1. embed every mini-batch of `mini_batch_size` items without gradients, saving its RNG and autocast state;
    2. compute the loss on those (detached) embeddings, queries `scoring_chunk_size` at a time, back-propagating
       each chunk to the embeddings at once, and keep the embeddings' gradients;
    3. when the returned loss is back-propagated (a hook on it), re-run each mini-batch's forward with gradients,
       under its saved RNG and autocast state so that dropout and precision match step 1, and back-propagate the
       cached gradient (times the incoming gradient, so loss scaling and gradient-accumulation division apply).

    The parameter gradients equal `MMRLoss`'s on the same batch (same mini-batch forwards), at the cost of a second
    forward. Memory: one mini-batch's activations (steps 1 and 3) or one chunk's similarities
    `[scoring_chunk_size, R_q, B_all, R_c]` (step 2) at a time, plus the embeddings.

    The returned `MMRLossOutput.loss` is a leaf that only triggers step 3: call `.backward()` on it (or on a
    multiple of it) exactly once; `group_losses` are detached values for logging. Under `torch.no_grad()`
    (evaluation) only steps 1 and 2 run, with no hook.

    Distributed: with `gather_across_devices=True` the candidates are gathered as in `mmr_loss` (same scaling).
    Pass the `DistributedDataParallel`-wrapped model (as `model` here or per call): step 3 then runs every
    mini-batch under `no_sync` and afterwards averages the gradients over the ranks itself, once per step, as
    DDP would; so it does not depend on `find_unused_parameters` (DDP's own sync at the last mini-batch would
    average wrong values when that mini-batch misses some trainable parameter, e.g. a text-only mini-batch with
    a trainable vision tower). An outer `no_sync` (gradient accumulation) is respected: gradients then stay
    local until a synchronised step. With an unwrapped model nothing is averaged. FSDP / DeepSpeed are not
    supported.

    Args:
        mini_batch_size: items per forward when the features are given as one batch (a list of mini-batches is
            used as given; `split_features` shows how a `MetaEmbedProcessor` batch is cut).
        scoring_chunk_size: queries per chunk in step 2; `None` scores all queries at once.
        Other arguments: as `MMRLoss`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        mini_batch_size: int = 8,
        scoring_chunk_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, **kwargs)
        self.mini_batch_size = _check_positive_int(mini_batch_size, "mini_batch_size")
        self.scoring_chunk_size = (
            None if scoring_chunk_size is None else _check_positive_int(scoring_chunk_size, "scoring_chunk_size")
        )

    def __call__(
        self,
        query_features: Features | Sequence[Features],
        candidate_features: Features | Sequence[Features],
        hard_negative_features: Features | Sequence[Features] | None = None,
        *,
        model: nn.Module | None = None,
    ) -> MMRLossOutput:
        """Steps 1 and 2; step 3 runs when the returned loss is back-propagated. `model`: as `MMRLoss`."""
        model = self.model if model is None else model
        sides = [
            _Side("query", _as_chunks(query_features, self.mini_batch_size)),
            _Side("candidate", _as_chunks(candidate_features, self.mini_batch_size)),
        ]
        if hard_negative_features is not None:
            sides.append(_Side("candidate", _as_chunks(hard_negative_features, self.mini_batch_size)))
        record_states = torch.is_grad_enabled()
        # Step 1.
        with torch.no_grad():
            for side in sides:
                for features in side.chunks:
                    state = _ForwardState(features) if record_states else None
                    side.states.append(state)
                    side.embeddings.append(self._embed(model, features, side.task).detach())
        embeddings = [torch.cat(side.embeddings).requires_grad_(record_states) for side in sides]
        num_queries = embeddings[0].shape[0]
        hard_negatives = _per_query_hard_negatives(embeddings[2], num_queries) if len(embeddings) == 3 else None
        if not record_states:  # evaluation: no gradients to cache, no backward to hook into
            return self._loss(embeddings[0], embeddings[1], hard_negatives, self.scoring_chunk_size)
        # Step 2.
        output = self._loss(embeddings[0], embeddings[1], hard_negatives, self.scoring_chunk_size, backward=True)
        for side, side_embeddings in zip(sides, embeddings):
            side_gradient = (
                side_embeddings.grad if side_embeddings.grad is not None else torch.zeros_like(side_embeddings)
            )
            side.gradients = list(side_gradient.split([chunk.shape[0] for chunk in side.embeddings]))
            side.embeddings = []  # the cache keeps gradients only
        loss = output.loss.detach().requires_grad_()
        loss.register_hook(partial(self._replay_with_cached_gradients, model=model, sides=sides))
        return MMRLossOutput(loss, {budget: value.detach() for budget, value in output.group_losses.items()})

    def _replay_with_cached_gradients(self, grad_output: torch.Tensor, model: nn.Module, sides: list[_Side]) -> None:
        """Step 3 (a hook on the returned loss)."""
        from torch.nn.parallel import DistributedDataParallel

        ddp_model = model if isinstance(model, DistributedDataParallel) else None
        # Read before our own no_sync: False inside an outer no_sync (gradient accumulation), then gradients stay
        # local until a later step synchronises them all.
        synchronise = ddp_model is not None and ddp_model.require_backward_grad_sync
        with torch.enable_grad():
            for side in sides:
                for features, state, gradient in zip(side.chunks, side.states, side.gradients):
                    # Every replay runs under no_sync and gradients are averaged once afterwards, instead of
                    # letting DDP synchronise at the last mini-batch: DDP (without find_unused_parameters) would
                    # silently average wrong values when that mini-batch does not reach every trainable
                    # parameter (e.g. a text-only mini-batch and a trainable vision tower).
                    with ddp_model.no_sync() if ddp_model is not None else nullcontext():
                        with state.restore():
                            embeddings = self._embed(model, features, side.task)
                        if not embeddings.requires_grad:  # e.g. a frozen tower
                            continue
                        # At least float32: a half-precision dot product would round the cached gradients.
                        dtype = torch.promote_types(embeddings.dtype, torch.float32)
                        surrogate = (embeddings.to(dtype) * gradient.to(dtype)).sum() * grad_output
                        with _backward_context(embeddings.device):
                            surrogate.backward()
        if synchronise:
            _average_gradients_across_ranks(ddp_model.module, ddp_model.process_group)


def _average_gradients_across_ranks(module: nn.Module, process_group: Any, bucket_elements: int = 2**25) -> None:
    """What DDP does after a backward: average the trainable parameters' gradients over the ranks of
    `process_group`, in buckets of about `bucket_elements` (128 MiB of float32) per collective. A parameter
    without gradient here but with one on another rank gets the average (with zeros for this rank); one without
    gradient on every rank keeps `grad = None`, as under DDP."""
    import torch.distributed as dist

    parameters = [parameter for parameter in module.parameters() if parameter.requires_grad]
    if not parameters:
        return
    world_size = dist.get_world_size(process_group)
    has_gradient = torch.tensor(
        [parameter.grad is not None for parameter in parameters], dtype=torch.int32, device=parameters[0].device
    )
    dist.all_reduce(has_gradient, group=process_group)
    bucket: list[torch.Tensor] = []

    def flush() -> None:
        flat = torch.cat([gradient.reshape(-1) for gradient in bucket])
        dist.all_reduce(flat, group=process_group)
        flat.div_(world_size)
        for gradient, averaged in zip(bucket, flat.split([gradient.numel() for gradient in bucket])):
            gradient.copy_(averaged.view_as(gradient))
        bucket.clear()

    for parameter, used_somewhere in zip(parameters, has_gradient.tolist()):
        if not used_somewhere:
            continue
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        gradient = parameter.grad
        if bucket and (
            gradient.dtype != bucket[0].dtype
            or gradient.device != bucket[0].device
            or sum(g.numel() for g in bucket) + gradient.numel() > bucket_elements
        ):
            flush()
        bucket.append(gradient)
    if bucket:
        flush()


class _Side:
    """One input column of a cached step: its mini-batches and what steps 1-2 recorded for each."""

    def __init__(self, task: str, chunks: list[Features]) -> None:
        self.task = task
        self.chunks = chunks
        self.states: list[_ForwardState | None] = []
        self.embeddings: list[torch.Tensor] = []
        self.gradients: list[torch.Tensor] = []


class _ForwardState:
    """The RNG and autocast state before a mini-batch's first forward, restored for its second forward, so that
    dropout draws the same masks and the same precision is used: otherwise the cached gradients would belong to
    other embeddings (as `torch.utils.checkpoint` and sentence-transformers' `RandContext` do)."""

    def __init__(self, features: Features) -> None:
        tensors = [value for value in features.values() if isinstance(value, torch.Tensor)]
        self.cpu_rng_state = torch.get_rng_state()
        self.gpu_devices, self.gpu_rng_states = get_device_states(*tensors)
        self.device_type = tensors[0].device.type if tensors else "cpu"
        self.autocast_enabled = torch.is_autocast_enabled(self.device_type)
        self.autocast_dtype = torch.get_autocast_dtype(self.device_type)

    @contextmanager
    def restore(self) -> Iterator[None]:
        # fork_rng puts the caller's RNG state back afterwards: the replay must not shift later random draws.
        with torch.random.fork_rng(devices=self.gpu_devices):
            torch.set_rng_state(self.cpu_rng_state)
            set_device_states(self.gpu_devices, self.gpu_rng_states)
            with torch.autocast(self.device_type, dtype=self.autocast_dtype, enabled=self.autocast_enabled):
                yield


def _per_query_hard_negatives(flat_hard_negatives: torch.Tensor, num_queries: int) -> torch.Tensor:
    """[B * H, R, D] query-major -> [B, H, R, D]."""
    if flat_hard_negatives.dim() != 3 or flat_hard_negatives.shape[0] % num_queries != 0:
        raise ValueError(
            f"hard negatives must be B x H items (query-major) for B = {num_queries} queries, got embeddings of "
            f"shape {tuple(flat_hard_negatives.shape)}"
        )
    return flat_hard_negatives.view(num_queries, -1, *flat_hard_negatives.shape[1:])


def _as_chunks(features: Features | Sequence[Features], mini_batch_size: int | None) -> list[Features]:
    """A list of mini-batches: a given list as is, one batch split by `mini_batch_size` (or whole if None)."""
    if isinstance(features, Mapping):
        return [dict(features)] if mini_batch_size is None else split_features(features, mini_batch_size)
    chunks = list(features)
    if not chunks or not all(isinstance(chunk, Mapping) for chunk in chunks):
        raise TypeError("features must be a mapping of model inputs or a non-empty list of such mappings")
    return chunks


def split_features(features: Features, mini_batch_size: int) -> list[dict[str, Any]]:
    """Cut a processed batch into mini-batches of at most `mini_batch_size` items, in order.

    Made for `MetaEmbedProcessor` outputs: `input_ids`, `attention_mask`, `mm_token_type_ids` [B, L] are sliced by
    row, and columns that are padding in every row of a mini-batch are dropped (positions come from the attention
    mask, so the embeddings do not change); `pixel_values` [num_patches, ...] and `image_grid_thw` [num_images, 3]
    are cut to the images of the mini-batch's items (at most one image per item, an item having one when its
    `mm_token_type_ids` row has a 1). Any other tensor whose first dim is B is sliced by row; other values are
    passed through.
    """
    _check_positive_int(mini_batch_size, "mini_batch_size")
    tensors = {key: value for key, value in features.items() if isinstance(value, torch.Tensor)}
    batch_tensor = next(
        (tensors[key] for key in ("input_ids", "attention_mask") if key in tensors),
        next((value for value in tensors.values() if value.dim() > 0), None),
    )
    if batch_tensor is None:
        raise ValueError("cannot find the batch size: the features hold no batched tensor")
    batch_size = batch_tensor.shape[0]
    attention_mask = tensors.get("attention_mask")
    token_shape = tuple(attention_mask.shape) if attention_mask is not None and attention_mask.dim() == 2 else None

    image_keys = {"pixel_values", "image_grid_thw"} & tensors.keys()
    if image_keys:
        if image_keys != {"pixel_values", "image_grid_thw"} or "mm_token_type_ids" not in tensors:
            raise ValueError(
                "splitting a batch with images needs pixel_values, image_grid_thw and mm_token_type_ids "
                "(as MetaEmbedProcessor returns them)"
            )
        has_image = tensors["mm_token_type_ids"].bool().any(-1)
        image_grid = tensors["image_grid_thw"]
        if int(has_image.sum()) != image_grid.shape[0]:
            raise ValueError(
                f"{int(has_image.sum())} items have image tokens but image_grid_thw has {image_grid.shape[0]} rows; "
                "split_features supports at most one image per item"
            )
        # images_before[i]: images of items < i; patch_offsets[k]: first patch of image k.
        images_before = F.pad(has_image.long().cumsum(0), (1, 0)).tolist()
        patch_offsets = F.pad(image_grid.prod(-1).cumsum(0), (1, 0)).tolist()

    chunks = []
    for begin in range(0, batch_size, mini_batch_size):
        end = min(begin + mini_batch_size, batch_size)
        columns = slice(None)
        if token_shape is not None:
            active_columns = attention_mask[begin:end].bool().any(0).nonzero().flatten()
            if active_columns.numel() > 0:
                columns = slice(int(active_columns[0]), int(active_columns[-1]) + 1)
        chunk: dict[str, Any] = {}
        for key, value in features.items():
            if key in image_keys:
                first_image, end_image = images_before[begin], images_before[end]
                if first_image == end_image:
                    continue  # no image in this mini-batch: the model gets none
                if key == "image_grid_thw":
                    chunk[key] = value[first_image:end_image]
                else:
                    chunk[key] = value[patch_offsets[first_image] : patch_offsets[end_image]]
            elif not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != batch_size:
                chunk[key] = value
            elif token_shape is not None and tuple(value.shape[:2]) == token_shape:
                chunk[key] = value[begin:end, columns]
            else:
                chunk[key] = value[begin:end]
        chunks.append(chunk)
    return chunks


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


# ------------------------------------------------------------------------------------------------------------
# Trainer: datasets rows -> processed batches -> MMR loss, on the transformers Trainer
# ------------------------------------------------------------------------------------------------------------

LORA_TARGET_MODULES = (
    r"vlm\.(language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    r"|visual\.blocks\..*\.(attn\.qkv|attn\.proj|mlp\.gate_proj|mlp\.up_proj|mlp\.down_proj))"
)
"""LoRA targets: q/k/v/o/gate/up/down of the language model and of the vision tower (whose attention packs
q/k/v into `qkv` and names o `proj`). The reference regex only reaches the vision MLP, through its naming."""


def _row_item(value: Any, where: str) -> Any:
    """A dataset cell as an item. `datasets` fills absent dict keys with None ({"text": None, "image": x} is an
    image) and may hand nested images over in its storage form {"bytes": ..., "path": ...}."""
    if isinstance(value, Mapping):
        value = {key: item for key, item in value.items() if item is not None}
        if not value:
            raise ValueError(f"{where} has neither text nor image")
        image = value.get("image")
        if isinstance(image, Mapping):
            if image.get("bytes") is not None:
                value["image"] = PIL.Image.open(io.BytesIO(image["bytes"]))
            elif image.get("path") is not None:
                value["image"] = image["path"]
            else:
                raise ValueError(f"{where}['image'] holds neither bytes nor a path")
    return value


class MetaEmbedDataCollator:
    """Turns `datasets` rows into the three processed batches the MMR loss takes.

    Each row holds `query_column`, `positive_column` and optionally `negatives_column` (a list with the same
    number H of hard negatives in every row); each cell is a text, a PIL image, or a {"text", "image"} dict.
    A dataset item may also be a list of rows, a pre-built batch, which is flattened in order.
    Returns {"query_features", "candidate_features"[, "hard_negative_features"]} with B (and B x H) items,
    hard negatives query-major.
    """

    def __init__(
        self,
        processor: Any,
        query_column: str = "query",
        positive_column: str = "positive",
        negatives_column: str | None = "negatives",
    ) -> None:
        self.processor = processor
        self.query_column = query_column
        self.positive_column = positive_column
        self.negatives_column = negatives_column

    def _process(self, cells: list[Any], task: str, name: str) -> Any:
        items = normalize_items([_row_item(cell, f"{name}[{index}]") for index, cell in enumerate(cells)], name)
        return self.processor.process_items(items, task, item_names=[f"{name}[{index}]" for index in range(len(items))])

    def __call__(self, rows: list[Mapping[str, Any]] | list[list[Mapping[str, Any]]]) -> dict[str, Any]:
        # Items that are lists are pre-built batches (e.g. free of false negatives): flatten them.
        rows = [row for item in rows for row in (item if isinstance(item, (list, tuple)) else [item])]
        for column in (self.query_column, self.positive_column):
            missing = [index for index, row in enumerate(rows) if column not in row]
            if missing:
                raise KeyError(f"rows {missing[:5]} have no column {column!r}")
        batch = {
            "query_features": self._process([row[self.query_column] for row in rows], "query", "query"),
            "candidate_features": self._process([row[self.positive_column] for row in rows], "candidate", "positive"),
        }
        negatives = [row.get(self.negatives_column) for row in rows] if self.negatives_column else [None]
        if any(value is not None for value in negatives):
            counts = {len(value or []) for value in negatives}
            if len(counts) != 1 or 0 in counts:
                raise ValueError(f"every row needs the same number of {self.negatives_column!r}, got {sorted(counts)}")
            flat = [negative for value in negatives for negative in value]
            batch["hard_negative_features"] = self._process(flat, "candidate", self.negatives_column)
        return batch


def _trainer_class() -> type:
    """`MetaEmbedTrainer`, built on first use so that importing this file does not import the Trainer stack."""
    from transformers import Trainer

    class MetaEmbedTrainer(Trainer):
        """The transformers `Trainer` with the MMR loss: progress bars, logging, checkpoints, mixed precision,
        gradient accumulation and multi-GPU (accelerate / torchrun) come from the Trainer; logs add the loss of
        every budget as `loss_{r_q}x{r_c}`."""

        def __init__(self, *args: Any, loss: MMRLoss | None = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.loss_fn = loss or MMRLoss(self.model, gather_across_devices=self.args.world_size > 1)
            self._group_loss_sums: dict[Budget, float] = {}
            self._group_loss_steps = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            output = self.loss_fn(
                inputs["query_features"],
                inputs["candidate_features"],
                inputs.get("hard_negative_features"),
                model=model,
            )
            for budget, value in output.group_losses.items():
                self._group_loss_sums[budget] = self._group_loss_sums.get(budget, 0.0) + float(value.detach())
            self._group_loss_steps += 1
            return (output.loss, {}) if return_outputs else output.loss

        def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            if "loss" in logs and self._group_loss_steps:
                for (r_q, r_c), total in self._group_loss_sums.items():
                    logs[f"loss_{r_q}x{r_c}"] = round(total / self._group_loss_steps, 4)
                self._group_loss_sums, self._group_loss_steps = {}, 0
            super().log(logs, *args, **kwargs)

    return MetaEmbedTrainer


def train_metaembed(
    model: nn.Module,
    train_dataset: Any,
    output_dir: str,
    *,
    groups: Sequence[Budget] = MMR_GROUPS,
    temperature: float = DEFAULT_TEMPERATURE,
    group_weights: Sequence[float] | None = None,
    lora_rank: int | None = 32,
    lora_alpha: int = 32,
    merge_lora: bool = True,
    cached_mini_batch_size: int | None = None,
    query_column: str = "query",
    positive_column: str = "positive",
    negatives_column: str | None = "negatives",
    save: bool = True,
    callbacks: list[Any] | None = None,
    **training_arguments: Any,
) -> nn.Module:
    """Train a `MetaEmbedModel` with the MMR loss on the transformers Trainer and save a complete Hub folder.

    Args:
        model: a `MetaEmbedModel` (e.g. from `MetaEmbedModel.from_backbone`), with its processor attached.
        train_dataset: rows with `query_column`, `positive_column`, optional `negatives_column` (a `datasets`
            Dataset, or any sequence of dicts); cells are text, PIL images or {"text", "image"} dicts.
        output_dir: checkpoints and the final model folder.
        groups / temperature / group_weights: the MMR loss (see `mmr_loss`).
        lora_rank / lora_alpha: LoRA (peft) on `LORA_TARGET_MODULES`, the reference's r = alpha = 32; the Meta
            Token table and the projection are trained fully. `lora_rank=None` trains every parameter (for
            backbones trained from scratch, like the demo's).
        merge_lora: merge the adapters into the weights before returning and saving, so the folder loads like
            any MetaEmbed model. With False the returned model is the peft model and nothing is saved.
        cached_mini_batch_size: use `CachedMMRLoss` with this mini-batch size (large effective batches).
        save: write the final model to `output_dir` with `save_pretrained`.
        **training_arguments: `transformers.TrainingArguments` fields (per_device_train_batch_size,
            learning_rate, max_steps, bf16, gradient_checkpointing, logging_steps, report_to, ...).

    Returns:
        the trained model (LoRA merged), in eval mode.
    """
    from transformers import TrainingArguments

    processor = model.processor
    if processor is None:
        raise ValueError("the model has no processor attached; create it with from_backbone or from_pretrained")
    trained = model
    if lora_rank is not None:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGET_MODULES)
        trained = get_peft_model(model, config)
        # The new parts are trained fully, as in the reference (peft froze everything else).
        for name, parameter in trained.named_parameters():
            if name.endswith("meta_tokens") or ".projection." in name:
                parameter.requires_grad_(True)
    arguments = {
        "report_to": "none",
        "save_strategy": "no",
        "ddp_find_unused_parameters": True,  # text-only steps leave the vision tower unused
        **training_arguments,
        "output_dir": output_dir,
        "remove_unused_columns": False,  # the collator reads the raw query / positive / negatives columns
    }
    args = TrainingArguments(**arguments)
    loss_options = {
        "groups": groups,
        "temperature": temperature,
        "group_weights": group_weights,
        "gather_across_devices": args.world_size > 1,
    }
    if cached_mini_batch_size is not None:
        loss = CachedMMRLoss(trained, mini_batch_size=cached_mini_batch_size, **loss_options)
    else:
        loss = MMRLoss(trained, **loss_options)
    collator = MetaEmbedDataCollator(processor, query_column, positive_column, negatives_column)
    trainer = _trainer_class()(
        model=trained,
        args=args,
        train_dataset=train_dataset,
        data_collator=collator,
        loss=loss,
        callbacks=callbacks,
    )
    trainer.train()
    if lora_rank is not None:
        if not merge_lora:
            return trained
        trained = trained.merge_and_unload()
    trained.processor = processor
    if save and trainer.is_world_process_zero():
        trained.save_pretrained(output_dir)
    return trained.eval()
