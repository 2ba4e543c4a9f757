"""The Matryoshka Multi-Vector Retrieval (MMR) loss.

MMR (MetaEmbed paper, section "Matryoshka Multi-Vector Retrieval") trains every prefix of the query and candidate
vectors to work on its own: for each budget (r_q, r_c) of `groups` it scores

    s(q, c) = sum_{i <= r_q} max_{j <= r_c} <q_i, c_j>

on the (L2-normalised) vectors, takes an InfoNCE loss over the in-batch candidates plus the query's own hard
negatives with logits s / temperature, and averages the groups' losses with weights.

- `mmr_loss`: the loss on embeddings you computed (optionally with candidates gathered across ranks).
- `MMRLoss`: embeds batches (`ItemBatch` items or processed features) with a model (e.g. `MetaEmbedModel`), then
  `mmr_loss`.
- `ItemBatch`: checked items of one input column, processed per mini-batch by the loss (any backbone family).

"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, overload

import torch
import torch.nn.functional as F
from torch import nn

from scoring_metaembed import MMR_BUDGETS, check_positive_int

from .distributed import gather_candidates

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
    gathered = gather_candidates(candidate_embeddings, gather_across_devices)
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
            with backward_context(query_embeddings.device):
                (group_losses * weights).sum().backward()
            group_losses = group_losses.detach()
        chunk_group_losses.append(group_losses)
    if backward and in_batch_candidates is not gathered.candidates:
        with backward_context(query_embeddings.device):
            torch.autograd.backward(gathered.candidates, in_batch_candidates.grad)
    group_losses = torch.stack(chunk_group_losses).sum(0)
    return MMRLossOutput((group_losses * weights).sum(), dict(zip(groups, group_losses.unbind(0))))


def backward_context(device: torch.device) -> torch.autocast:
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


@dataclass(frozen=True)
class ItemBatch:
    """The checked items of one input column (queries, positives or hard negatives), not processed yet.

    The loss processes them itself, with the task of their column, one mini-batch of items at a time
    (`processor.process_items(items, task, item_names)`): processed features hold family-specific image inputs
    (Qwen's patch rows, Idefics3's tiles, Mllama's cross-attention masks, ...) that cannot be cut into mini-batches
    without knowing the family; items can. A MetaEmbed model's vectors do not depend on the batch an item is
    processed in, so the mini-batches embed as the whole batch would.
    """

    items: tuple[Any, ...]
    item_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.items) != len(self.item_names):
            raise ValueError(f"{len(self.items)} items but {len(self.item_names)} item names")
        if not self.items:
            raise ValueError("an ItemBatch needs at least one item")

    def __len__(self) -> int:
        return len(self.items)

    def split(self, size: int) -> list[ItemBatch]:
        """Consecutive batches of at most `size` items, in order."""
        check_positive_int(size, "mini_batch_size")
        return [
            ItemBatch(self.items[begin : begin + size], self.item_names[begin : begin + size])
            for begin in range(0, len(self.items), size)
        ]

    def process(self, processor: Any, task: str, device: torch.device | None = None) -> dict[str, Any]:
        """The model inputs of these items for `task`, on `device`."""
        features = processor.process_items(list(self.items), task, item_names=list(self.item_names))
        return {
            key: value.to(device) if device is not None and isinstance(value, torch.Tensor) else value
            for key, value in features.items()
        }


Batch = ItemBatch | Features
"""One input column of a step: items (processed by the loss) or processed model inputs."""


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
    """MMR loss on batches: embeds queries, candidates and hard negatives with `model`, then `mmr_loss`.

    `model` is called through `embed_fn` with `num_vectors` = the largest budget of that side, so a candidate
    needs only the Meta Tokens the budgets read. Call it with the batches of one step:

        output = loss_fn(queries, candidates, hard_negatives)
        output.loss.backward()  # output.group_losses: per budget, for logging

    Each batch is an `ItemBatch` (as `MetaEmbedDataCollator` makes it; processed here with `processor`, default
    the model's, and moved to the model's device), a processed batch (a `Mapping` of model inputs), or a list of
    processed mini-batches, concatenated in order. Hard negatives are B x H items, query-major: items
    a*H .. a*H + H - 1 belong to query a.
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
        processor: Any = None,
    ) -> None:
        self.model = model
        self.processor = processor
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
        queries: Batch | Sequence[Features],
        candidates: Batch | Sequence[Features],
        hard_negatives: Batch | Sequence[Features] | None = None,
        *,
        model: nn.Module | None = None,
    ) -> MMRLossOutput:
        """Embed with gradients and compute the loss; the group losses carry gradients too. `model` replaces
        `self.model` for this call (e.g. the DDP-wrapped model a trainer passes to its `compute_loss`)."""
        model = self.model if model is None else model

        def embed(batch: Batch | Sequence[Features], task: str) -> torch.Tensor:
            return torch.cat([self._embed(model, chunk, task) for chunk in self.chunks(model, batch, task, None)])

        query_embeddings = embed(queries, "query")
        candidate_embeddings = embed(candidates, "candidate")
        hard_negative_embeddings = None
        if hard_negatives is not None:
            flat = embed(hard_negatives, "candidate")
            hard_negative_embeddings = per_query_hard_negatives(flat, query_embeddings.shape[0])
        return self._loss(query_embeddings, candidate_embeddings, hard_negative_embeddings)

    def chunks(
        self, model: nn.Module, batch: Batch | Sequence[Features], task: str, mini_batch_size: int | None
    ) -> list[Features]:
        """The processed mini-batches of `batch`, in order. An `ItemBatch` is cut into mini-batches of
        `mini_batch_size` items (whole if None), each processed for `task` on the model's device; a list of
        processed mini-batches is used as given; a processed batch is one mini-batch (it cannot be cut without
        knowing the backbone family's image inputs, so one larger than `mini_batch_size` is refused)."""
        if isinstance(batch, ItemBatch):
            processor = self.processor if self.processor is not None else _model_processor(model)
            pieces = [batch] if mini_batch_size is None else batch.split(mini_batch_size)
            return [piece.process(processor, task, _model_device(model)) for piece in pieces]
        if isinstance(batch, Mapping):
            rows = _batch_size(batch)
            if mini_batch_size is not None and rows is not None and rows > mini_batch_size:
                raise ValueError(
                    f"a processed batch of {rows} items cannot be cut into mini-batches of {mini_batch_size}: pass "
                    "an ItemBatch (as MetaEmbedDataCollator makes) or a list of processed mini-batches"
                )
            return [dict(batch)]
        chunks = list(batch) if isinstance(batch, Sequence) else []
        if not chunks or not all(isinstance(chunk, Mapping) for chunk in chunks):
            raise TypeError(
                "a batch must be an ItemBatch, a mapping of model inputs or a non-empty list of such mappings"
            )
        return chunks

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


def per_query_hard_negatives(flat_hard_negatives: torch.Tensor, num_queries: int) -> torch.Tensor:
    """[B * H, R, D] query-major -> [B, H, R, D]."""
    if flat_hard_negatives.dim() != 3 or flat_hard_negatives.shape[0] % num_queries != 0:
        raise ValueError(
            f"hard negatives must be B x H items (query-major) for B = {num_queries} queries, got embeddings of "
            f"shape {tuple(flat_hard_negatives.shape)}"
        )
    return flat_hard_negatives.view(num_queries, -1, *flat_hard_negatives.shape[1:])


def _batch_size(features: Features) -> int | None:
    """Rows of a processed batch: the first dim of `input_ids` / `attention_mask` (else of its first tensor)."""
    tensors = {key: value for key, value in features.items() if isinstance(value, torch.Tensor) and value.dim() > 0}
    for key in ("input_ids", "attention_mask", *tensors):
        if key in tensors:
            return tensors[key].shape[0]
    return None


def _model_device(model: nn.Module) -> torch.device | None:
    parameter = next(model.parameters(), None)
    return None if parameter is None else parameter.device


def _model_processor(model: nn.Module) -> Any:
    """The processor attached to `model` (through DDP's `.module`; peft forwards attributes itself)."""
    while not hasattr(model, "processor") and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    processor = getattr(model, "processor", None)
    if processor is None:
        raise ValueError("ItemBatch inputs need a processor: pass processor= to the loss or attach one to the model")
    return processor
