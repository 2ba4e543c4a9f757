"""Cross-rank helpers of the MMR losses: candidates gathered with their autograd link, gradients averaged
as DDP does."""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class GatheredCandidates(NamedTuple):
    candidates: torch.Tensor
    """[N_all, R_c, D]: the candidates of all ranks, in rank order (only this rank's when not gathering)."""
    offset: int
    """Index in `candidates` of this rank's first candidate."""
    queries_per_rank: float
    """The loss normaliser: the mean number of queries per rank (this rank's count when not gathering)."""


def gather_candidates(candidates: torch.Tensor, gather_across_devices: bool) -> GatheredCandidates:
    """All-gather the candidates of every rank, keeping the autograd link to every rank's rows."""
    local_count = candidates.shape[0]
    if not gather_across_devices:
        return GatheredCandidates(candidates, 0, local_count)
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return GatheredCandidates(candidates, 0, local_count)
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
    return GatheredCandidates(gathered, sum(counts[:rank]), sum(counts) / world_size)


def average_gradients_across_ranks(module: nn.Module, process_group: Any, bucket_elements: int = 2**25) -> None:
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
