"""`CachedMMRLoss`: the MMR loss with a gradient cache (GradCache), for batches larger than activations allow."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import get_device_states, set_device_states

from scoring_metaembed import check_positive_int

from .distributed import average_gradients_across_ranks
from .loss import Batch, Features, MMRLoss, MMRLossOutput, backward_context, per_query_hard_negatives


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
        mini_batch_size: items per forward for `ItemBatch` inputs (cut into mini-batches of items, each processed
            on its own); a list of processed mini-batches is used as given.
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
        self.mini_batch_size = check_positive_int(mini_batch_size, "mini_batch_size")
        self.scoring_chunk_size = (
            None if scoring_chunk_size is None else check_positive_int(scoring_chunk_size, "scoring_chunk_size")
        )

    def __call__(
        self,
        queries: Batch | Sequence[Features],
        candidates: Batch | Sequence[Features],
        hard_negatives: Batch | Sequence[Features] | None = None,
        *,
        model: nn.Module | None = None,
    ) -> MMRLossOutput:
        """Steps 1 and 2; step 3 runs when the returned loss is back-propagated. `model`: as `MMRLoss`."""
        model = self.model if model is None else model
        columns = [("query", queries), ("candidate", candidates)]
        if hard_negatives is not None:
            columns.append(("candidate", hard_negatives))
        sides = [_Side(task, self.chunks(model, batch, task, self.mini_batch_size)) for task, batch in columns]
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
        hard_negatives = per_query_hard_negatives(embeddings[2], num_queries) if len(embeddings) == 3 else None
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
                        with backward_context(embeddings.device):
                            surrogate.backward()
        if synchronise:
            average_gradients_across_ranks(ddp_model.module, ddp_model.process_group)


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
