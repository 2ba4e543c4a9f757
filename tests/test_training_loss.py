"""The MMR loss against a naive reference, across ranks (2-process gloo), and with a gradient cache."""

from __future__ import annotations

import datetime
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaembed.testing import SUPPORTED_FAMILIES
from metaembed.training import (
    MMR_GROUPS,
    CachedMMRLoss,
    ItemBatch,
    MMRLoss,
    MMRLossOutput,
    mmr_loss,
)
from scoring_metaembed import late_interaction_scores

SMALL_GROUPS = ((1, 1), (2, 3), (4, 6))


def random_embeddings(*shape: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=generator, dtype=dtype), dim=-1)


def batch(batch_size=4, num_hard_negatives=2, num_query_vectors=4, num_candidate_vectors=6, dim=5, dtype=torch.float64):
    queries = random_embeddings(batch_size, num_query_vectors, dim, dtype=dtype, seed=1)
    # Candidates near their query (as after some training), so that the positives' logits matter.
    candidates = F.normalize(
        random_embeddings(batch_size, num_candidate_vectors, dim, dtype=dtype, seed=2) + queries.mean(1, keepdim=True),
        dim=-1,
    )
    hard_negatives = random_embeddings(batch_size, num_hard_negatives, num_candidate_vectors, dim, dtype=dtype, seed=3)
    return queries, candidates, hard_negatives


def reference_group_loss(queries, candidates, group, temperature, hard_negatives=None):
    """Python loops over queries, candidates and vectors, with an explicit log-softmax."""
    num_query_vectors, num_candidate_vectors = group
    batch_size = queries.shape[0]
    per_query_losses = []
    for a in range(batch_size):
        seen = [candidates[b] for b in range(batch_size)]
        if hard_negatives is not None:
            seen += [hard_negatives[a, h] for h in range(hard_negatives.shape[1])]
        logits = []
        for candidate in seen:
            score = 0.0
            for i in range(num_query_vectors):
                score = score + max(torch.dot(queries[a, i], candidate[j]) for j in range(num_candidate_vectors))
            logits.append(score / temperature)
        logits = torch.stack(logits)
        largest = logits.max().detach()
        log_normaliser = largest + torch.log(torch.exp(logits - largest).sum())
        per_query_losses.append(-(logits[a] - log_normaliser))
    return torch.stack(per_query_losses).mean()


def reference_mmr_loss(queries, candidates, groups, temperature=0.03, hard_negatives=None, group_weights=None):
    weights = group_weights or [1.0] * len(groups)
    losses = [reference_group_loss(queries, candidates, group, temperature, hard_negatives) for group in groups]
    return sum(weight * loss for weight, loss in zip(weights, losses)) / sum(weights)


# ------------------------------------------------------------------------------------------------------------
# mmr_loss
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_hard_negatives", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference(with_hard_negatives, dtype):
    queries, candidates, hard_negatives = batch(dtype=dtype)
    hard_negatives = hard_negatives if with_hard_negatives else None
    loss = mmr_loss(queries, candidates, SMALL_GROUPS, 0.05, hard_negative_embeddings=hard_negatives)
    expected = reference_mmr_loss(queries.double(), candidates.double(), SMALL_GROUPS, 0.05, _double(hard_negatives))
    assert loss.dim() == 0 and loss.dtype == dtype
    tolerance = 1e-10 if dtype == torch.float64 else 1e-4
    assert loss.item() == pytest.approx(expected.item(), rel=tolerance, abs=tolerance)


def test_paper_groups_match_reference():
    queries, candidates, hard_negatives = batch(3, 1, 16, 64, 8)
    loss = mmr_loss(queries, candidates, hard_negative_embeddings=hard_negatives)
    expected = reference_mmr_loss(queries, candidates, MMR_GROUPS, 0.03, hard_negatives)
    assert MMR_GROUPS == ((1, 1), (2, 4), (4, 8), (8, 16), (16, 64))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)


def test_gradients_match_reference():
    queries, candidates, hard_negatives = (tensor.requires_grad_() for tensor in batch())
    inputs = (queries, candidates, hard_negatives)
    weights = [1.0, 2.0, 0.5]
    loss = mmr_loss(queries, candidates, SMALL_GROUPS, 0.1, hard_negatives, weights)
    expected = reference_mmr_loss(queries, candidates, SMALL_GROUPS, 0.1, hard_negatives, weights)
    for gradient, expected_gradient in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(expected, inputs)):
        torch.testing.assert_close(gradient, expected_gradient, rtol=1e-9, atol=1e-12)
        assert gradient.abs().sum() > 0


def test_each_query_sees_only_its_own_hard_negatives():
    queries, candidates, hard_negatives = batch(num_hard_negatives=1)
    queries.requires_grad_()

    def query_gradients(candidates, hard_negatives):
        loss = mmr_loss(queries, candidates, SMALL_GROUPS, 0.1, hard_negatives)
        return torch.autograd.grad(loss, queries)[0]

    baseline = query_gradients(candidates, hard_negatives)
    # Query 1's hard negative becomes query 0's positive: query 0 must not notice, query 1 must.
    changed_hard_negatives = hard_negatives.clone()
    changed_hard_negatives[1, 0] = candidates[0]
    gradients = query_gradients(candidates, changed_hard_negatives)
    assert torch.equal(gradients[0], baseline[0]) and torch.equal(gradients[2:], baseline[2:])
    assert not torch.allclose(gradients[1], baseline[1])
    # In-batch candidates, by contrast, are every query's negatives.
    changed_candidates = candidates.clone()
    changed_candidates[1] = candidates[0]
    gradients = query_gradients(changed_candidates, hard_negatives)
    assert all(not torch.allclose(gradients[a], baseline[a]) for a in range(queries.shape[0]))


@pytest.mark.parametrize("group", [(1, 1), (2, 3), (4, 6), (3, 1)])
@pytest.mark.parametrize("with_hard_negatives", [False, True])
def test_single_group_is_infonce_over_shipped_scores(group, with_hard_negatives):
    """One group = plain InfoNCE on the scores the inference kernel (`late_interaction_scores`) gives."""
    queries, candidates, hard_negatives = batch(dtype=torch.float32)
    scores = late_interaction_scores(queries, candidates, *group)
    if with_hard_negatives:
        own_scores = [late_interaction_scores(queries[a : a + 1], hard_negatives[a], *group) for a in range(4)]
        scores = torch.cat([scores, torch.cat(own_scores)], dim=1)
    expected = F.cross_entropy(scores / 0.03, torch.arange(4))
    loss = mmr_loss(queries, candidates, [group], 0.03, hard_negatives if with_hard_negatives else None)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_group_losses_and_weights():
    queries, candidates, hard_negatives = batch()
    output = mmr_loss(queries, candidates, SMALL_GROUPS, 0.1, hard_negatives, return_group_losses=True)
    assert isinstance(output, MMRLossOutput) and list(output.group_losses) == list(SMALL_GROUPS)
    for group, group_loss in output.group_losses.items():
        single = mmr_loss(queries, candidates, [group], 0.1, hard_negatives)
        assert group_loss.item() == pytest.approx(single.item(), rel=1e-12)
    group_losses = torch.stack(list(output.group_losses.values()))
    assert output.loss.item() == pytest.approx(group_losses.mean().item(), rel=1e-12)

    weights = [3.0, 0.0, 1.0]
    weighted = mmr_loss(queries, candidates, SMALL_GROUPS, 0.1, hard_negatives, weights)
    assert weighted.item() == pytest.approx((3 * group_losses[0] + group_losses[2]).item() / 4, rel=1e-12)
    # Only the ratios matter; a single non-zero weight selects its group.
    assert mmr_loss(queries, candidates, SMALL_GROUPS, 0.1, hard_negatives, [6.0, 0.0, 2.0]).item() == pytest.approx(
        weighted.item(), rel=1e-12
    )
    assert mmr_loss(queries, candidates, SMALL_GROUPS, 0.1, hard_negatives, [0, 1, 0]).item() == pytest.approx(
        group_losses[1].item(), rel=1e-12
    )


def test_budgets_read_prefixes_only():
    queries, candidates, hard_negatives = (tensor.requires_grad_() for tensor in batch(num_query_vectors=6))
    groups = ((1, 2), (3, 4))
    loss = mmr_loss(queries, candidates, groups, 0.1, hard_negatives)
    prefix_loss = mmr_loss(queries[:, :3], candidates[:, :4], groups, 0.1, hard_negatives[:, :, :4])
    assert loss.item() == pytest.approx(prefix_loss.item(), rel=1e-12)
    query_gradient, candidate_gradient, hard_negative_gradient = torch.autograd.grad(
        loss, (queries, candidates, hard_negatives)
    )
    assert query_gradient[:, 3:].abs().max() == 0 and query_gradient[:, :3].abs().min() > 0
    assert candidate_gradient[:, 4:].abs().max() == 0 and hard_negative_gradient[:, :, 4:].abs().max() == 0
    # Group order does not matter for the total (the running maxima handle any order of r_c).
    assert mmr_loss(queries, candidates, groups[::-1], 0.1, hard_negatives).item() == pytest.approx(loss.item())


def test_half_precision_inputs_are_computed_in_float32():
    queries, candidates, hard_negatives = (tensor.bfloat16() for tensor in batch())
    loss = mmr_loss(queries, candidates, SMALL_GROUPS, hard_negative_embeddings=hard_negatives)
    expected = mmr_loss(
        queries.float(), candidates.float(), SMALL_GROUPS, hard_negative_embeddings=hard_negatives.float()
    )
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_no_hard_negatives_equals_empty_hard_negatives():
    queries, candidates, _ = batch()
    empty = torch.zeros(4, 0, 6, 5, dtype=torch.float64)
    assert mmr_loss(queries, candidates, SMALL_GROUPS, hard_negative_embeddings=empty).item() == pytest.approx(
        mmr_loss(queries, candidates, SMALL_GROUPS).item(), rel=1e-12
    )


def _arguments(**changes):
    queries, candidates, hard_negatives = batch()
    arguments = {
        "query_embeddings": queries,
        "candidate_embeddings": candidates,
        "groups": SMALL_GROUPS,
        "hard_negative_embeddings": hard_negatives,
    }
    return {**arguments, **changes}


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"groups": ((1, 1), (5, 6))}, ValueError, r"group \(5, 6\) needs 5 query vectors but query_embeddings has 4"),
        ({"groups": ((1, 7),)}, ValueError, r"needs 7 candidate vectors but candidate_embeddings has 6"),
        ({"groups": MMR_GROUPS}, ValueError, r"group \(4, 8\) needs 8 candidate vectors"),
        ({"groups": ()}, ValueError, "non-empty sequence"),
        ({"groups": ((1, 1), (1, 1))}, ValueError, "must not repeat"),
        ({"groups": ((0, 1),)}, ValueError, "positive ints"),
        ({"groups": ((True, 1),)}, ValueError, "positive ints"),
        ({"groups": ((1, 1.5),)}, ValueError, "positive ints"),
        ({"groups": (1, 1)}, ValueError, "pair"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"temperature": float("nan")}, ValueError, "temperature"),
        ({"group_weights": [1.0, 1.0]}, ValueError, "2 weights for 3 groups"),
        ({"group_weights": [1.0, -1.0, 1.0]}, ValueError, "non-negative"),
        ({"group_weights": [0.0, 0.0, 0.0]}, ValueError, "all be zero"),
        ({"query_embeddings": torch.zeros(4, 5, dtype=torch.float64)}, ValueError, r"3-D \[B, R, D\]"),
        ({"query_embeddings": torch.zeros(4, 4, 5, dtype=torch.long)}, TypeError, "floating-point"),
        ({"query_embeddings": [[0.0]]}, TypeError, "must be a torch.Tensor"),
        ({"candidate_embeddings": torch.zeros(3, 6, 5, dtype=torch.float64)}, ValueError, "3 candidates for 4"),
        ({"candidate_embeddings": torch.zeros(4, 6, 7, dtype=torch.float64)}, ValueError, "vector dim 7"),
        ({"candidate_embeddings": torch.zeros(4, 0, 5, dtype=torch.float64)}, ValueError, "no vectors"),
        ({"hard_negative_embeddings": torch.zeros(4, 6, 5, dtype=torch.float64)}, ValueError, r"4-D"),
        ({"hard_negative_embeddings": torch.zeros(3, 1, 6, 5, dtype=torch.float64)}, ValueError, r"B = 4"),
        ({"hard_negative_embeddings": torch.zeros(4, 1, 3, 5, dtype=torch.float64)}, ValueError, "has 3"),
        (
            {"query_embeddings": torch.zeros(0, 4, 5), "candidate_embeddings": torch.zeros(0, 6, 5)},
            ValueError,
            "empty",
        ),
        ({"query_embeddings": torch.zeros(4, 4, 5, device="meta")}, ValueError, "is on cpu"),
    ],
)
def test_invalid_arguments_raise(changes, error, message):
    with pytest.raises(error, match=message):
        mmr_loss(**_arguments(**changes))


# ------------------------------------------------------------------------------------------------------------
# Loss objects with a model: plain, cached
# ------------------------------------------------------------------------------------------------------------


class TinyEmbedder(nn.Module):
    """A stand-in for MetaEmbedModel: `forward(inputs, task, num_vectors)` -> L2-normalised [B, r, D]."""

    def __init__(self, input_dim=6, num_query_vectors=4, num_candidate_vectors=6, dim=5, dropout=0.0):
        super().__init__()
        self.dim = dim
        self.trunk = nn.Linear(input_dim, 16)
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleDict(
            {"query": nn.Linear(16, num_query_vectors * dim), "candidate": nn.Linear(16, num_candidate_vectors * dim)}
        )

    def forward(self, inputs: torch.Tensor, task: str, num_vectors: int) -> torch.Tensor:
        hidden = self.dropout(torch.tanh(self.trunk(inputs)))
        vectors = self.heads[task](hidden).view(inputs.shape[0], -1, self.dim)[:, :num_vectors]
        return F.normalize(vectors, dim=-1)


def tiny_embedder(dropout: float = 0.0) -> TinyEmbedder:
    torch.manual_seed(0)
    return TinyEmbedder(dropout=dropout).double()


def tiny_features(num_items: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"inputs": torch.randn(num_items, 6, generator=generator, dtype=torch.float64)}


class TinyProcessor:
    """A stand-in for MetaEmbedProcessor over TinyEmbedder's inputs: an item is one row of `inputs`; records the
    tasks and item names it processed."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []

    def process_items(self, items, task, item_names):
        self.calls.append((task, item_names))
        return {"inputs": torch.stack(items)}


def tiny_items(num_items: int, seed: int, name: str = "item") -> ItemBatch:
    rows = tiny_features(num_items, seed)["inputs"].unbind(0)
    return ItemBatch(rows, tuple(f"{name}[{index}]" for index in range(num_items)))


def chunked(features: dict[str, torch.Tensor], sizes: list[int]) -> list[dict[str, torch.Tensor]]:
    return [{"inputs": piece} for piece in features["inputs"].split(sizes)]


def parameter_gradients(model: nn.Module, compute_loss) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad()
    loss = compute_loss()
    loss.backward()
    # Parameters off the path (e.g. LLaVA-NeXT's last CLIP layer: it reads the one before) get no gradient.
    return loss.item(), [
        torch.zeros_like(parameter) if parameter.grad is None else parameter.grad.clone()
        for parameter in model.parameters()
    ]


def test_mmr_loss_object_equals_function_on_model_embeddings():
    model = tiny_embedder()
    queries, candidates, hard_negatives = tiny_features(5, 1), tiny_features(5, 2), tiny_features(10, 3)
    output = MMRLoss(model, groups=SMALL_GROUPS, temperature=0.1)(queries, candidates, hard_negatives)
    expected = mmr_loss(
        model(queries["inputs"], "query", 4),
        model(candidates["inputs"], "candidate", 6),
        SMALL_GROUPS,
        0.1,
        model(hard_negatives["inputs"], "candidate", 6).view(5, 2, 6, 5),
        return_group_losses=True,
    )
    assert output.loss.item() == pytest.approx(expected.loss.item(), rel=1e-12)
    assert output.loss.requires_grad and all(value.requires_grad for value in output.group_losses.values())


@pytest.mark.parametrize(("mini_batch_size", "scoring_chunk_size"), [(2, None), (3, 2), (1, 1), (8, 4)])
def test_cached_gradients_equal_uncached_with_dropout(mini_batch_size, scoring_chunk_size):
    """Dropout is on: equality needs the cache's second forward to replay the first one's random state."""
    model = tiny_embedder(dropout=0.3).train()
    queries, candidates, hard_negatives = tiny_features(7, 1), tiny_features(7, 2), tiny_features(14, 3)
    processor = TinyProcessor()
    with torch.no_grad():
        assert not torch.equal(model(queries["inputs"], "query", 4), model(queries["inputs"], "query", 4))
    groups = {"groups": SMALL_GROUPS, "temperature": 0.1, "group_weights": [1.0, 2.0, 3.0]}
    uncached = MMRLoss(model, **groups)
    cached = CachedMMRLoss(
        model, mini_batch_size=mini_batch_size, scoring_chunk_size=scoring_chunk_size, processor=processor, **groups
    )

    def sizes(num_items: int) -> list[int]:
        return [min(mini_batch_size, num_items - begin) for begin in range(0, num_items, mini_batch_size)]

    # The plain loss embeds the same mini-batches in the same order, so it draws the same dropout masks.
    torch.manual_seed(1)
    expected_loss, expected_gradients = parameter_gradients(
        model,
        lambda: (
            uncached(chunked(queries, sizes(7)), chunked(candidates, sizes(7)), chunked(hard_negatives, sizes(14))).loss
        ),
    )
    torch.manual_seed(1)
    output = cached(tiny_items(7, 1, "query"), tiny_items(7, 2, "positive"), tiny_items(14, 3, "negatives"))
    # Each mini-batch of items is processed once, with its column's task and its items' names.
    assert [call[0] for call in processor.calls] == ["query"] * len(sizes(7)) + ["candidate"] * len(
        sizes(7) + sizes(14)
    )
    assert processor.calls[0][1] == [f"query[{index}]" for index in range(sizes(7)[0])]
    assert [name for task, names in processor.calls[len(sizes(7)) :] for name in names][-14:] == [
        f"negatives[{index}]" for index in range(14)
    ]
    rng_state_after_forward = torch.get_rng_state()
    model.zero_grad()
    output.loss.backward()
    assert torch.equal(torch.get_rng_state(), rng_state_after_forward), "the replay must not consume random numbers"
    assert output.loss.item() == pytest.approx(expected_loss, rel=1e-12)
    assert not any(value.requires_grad for value in output.group_losses.values())
    for gradient, expected_gradient in zip([p.grad for p in model.parameters()], expected_gradients):
        torch.testing.assert_close(gradient, expected_gradient, rtol=1e-9, atol=1e-12)


def test_cached_replay_uses_the_first_forwards_autocast_state():
    """Step 3 runs in the backward pass, outside the caller's autocast block: it must still compute in bfloat16."""
    torch.manual_seed(0)
    model = TinyEmbedder()  # float32 weights, bfloat16 compute under autocast
    query_chunks, candidate_chunks = (
        chunked({"inputs": features["inputs"].float()}, [3, 3])
        for features in (tiny_features(6, 1), tiny_features(6, 2))
    )

    def embed(chunks, task, num_vectors):
        # One autocast block per mini-batch, as the cache runs them: within one block autocast shares a bfloat16
        # copy of each weight, whose gradients would then be summed in bfloat16.
        embeddings = []
        for chunk in chunks:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                embeddings.append(model(chunk["inputs"], task, num_vectors))
        return torch.cat(embeddings)

    _, expected_gradients = parameter_gradients(
        model,
        lambda: mmr_loss(embed(query_chunks, "query", 4), embed(candidate_chunks, "candidate", 6), SMALL_GROUPS, 0.1),
    )
    cached = CachedMMRLoss(model, groups=SMALL_GROUPS, temperature=0.1)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = cached(query_chunks, candidate_chunks)
    output.loss.backward()
    for parameter, expected_gradient in zip(model.parameters(), expected_gradients):
        torch.testing.assert_close(parameter.grad, expected_gradient, rtol=1e-5, atol=1e-6)


def test_cached_loss_scales_with_the_incoming_gradient_and_runs_without_grad():
    model = tiny_embedder()
    queries, candidates = tiny_items(6, 1), tiny_items(6, 2)
    cached = CachedMMRLoss(model, groups=SMALL_GROUPS, mini_batch_size=4, processor=TinyProcessor())
    _, full = parameter_gradients(model, lambda: cached(queries, candidates).loss)
    # Gradient accumulation divides the loss: every replayed mini-batch must see that factor.
    _, halved = parameter_gradients(model, lambda: cached(queries, candidates).loss * 0.5)
    for gradient, full_gradient in zip(halved, full):
        torch.testing.assert_close(gradient, full_gradient * 0.5, rtol=1e-12, atol=1e-15)
    with torch.no_grad():
        evaluation = cached(queries, candidates)
    assert not evaluation.loss.requires_grad
    plain = MMRLoss(model, groups=SMALL_GROUPS)(tiny_features(6, 1), tiny_features(6, 2))
    assert evaluation.loss.item() == pytest.approx(plain.loss.item())


def test_hard_negative_items_must_be_a_multiple_of_the_queries():
    model = tiny_embedder()
    with pytest.raises(ValueError, match="B x H items"):
        CachedMMRLoss(model, groups=SMALL_GROUPS)(tiny_features(4, 1), tiny_features(4, 2), tiny_features(6, 3))
    with pytest.raises(ValueError, match="mini_batch_size"):
        CachedMMRLoss(model, mini_batch_size=0)


def test_a_processed_batch_is_not_cut_and_items_need_a_processor():
    """Processed features hold a family's image inputs, which only the family knows how to cut: the cached loss
    takes items (or a list of processed mini-batches) instead of guessing."""
    model = tiny_embedder()
    with pytest.raises(ValueError, match="processed batch of 6 items cannot be cut into mini-batches of 4"):
        CachedMMRLoss(model, groups=SMALL_GROUPS, mini_batch_size=4)(tiny_features(6, 1), tiny_features(6, 2))
    with pytest.raises(ValueError, match="need a processor"):
        MMRLoss(model, groups=SMALL_GROUPS)(tiny_items(4, 1), tiny_items(4, 2))
    with pytest.raises(TypeError, match="must be an ItemBatch"):
        MMRLoss(model, groups=SMALL_GROUPS)("text", tiny_features(4, 2))
    with pytest.raises(ValueError, match="3 items but 2 item names"):
        ItemBatch(("a", "b", "c"), ("x", "y"))


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_cached_loss_over_item_mini_batches_equals_the_plain_loss(
    family, family_backbone_dir, images, num2words_stand_in
):
    """Real tiny MetaEmbedModel of every backbone family, text, image and text+image items: the cached loss
    processes and embeds mini-batches of 2 items (each with its own padding and image inputs) and gives the loss
    and parameter gradients of the plain loss over the whole processed batch."""
    from conftest import NUM_CANDIDATE_VECTORS, NUM_QUERY_VECTORS, make_model

    from processing_metaembed import normalize_items

    model = make_model(family_backbone_dir(family))
    query_items = ["red circle", {"text": "like this", "image": images["rgb"]}, "a much longer query " * 3, "x"]
    candidate_items = [images["tall"], "a red circle top left", {"text": "scene", "image": images["gray"]}, "blue"]
    hard_negative_items = ["green square", images["rgba"], "red square", {"text": "t", "image": images["tiny"]}]

    def item_batch(items, name):
        return ItemBatch(tuple(normalize_items(items, name)), tuple(f"{name}[{index}]" for index in range(len(items))))

    batches = [item_batch(items, name) for items, name in ((query_items, "query"), (candidate_items, "positive"))]
    batches.append(item_batch(hard_negative_items, "negatives"))  # H = 1 per query
    groups = {"groups": ((1, 1), (2, 4), (NUM_QUERY_VECTORS, NUM_CANDIDATE_VECTORS)), "temperature": 0.1}
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    processed = model.processor.process_candidates(candidate_items)
    expected_loss, expected_gradients = parameter_gradients(
        model,
        lambda: MMRLoss(model, **groups)(model.processor.process_queries(query_items), processed, batches[2]).loss,
    )
    loss, gradients = parameter_gradients(
        model, lambda: CachedMMRLoss(model, mini_batch_size=2, **groups)(*batches).loss
    )
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert len(gradients) == len(trainable)
    assert model.meta_tokens.grad.abs().sum() > 0
    for gradient, expected_gradient in zip(gradients, expected_gradients):
        # float32 sums over differently padded mini-batches: a few elements near zero differ by ~1e-6 on some CPUs.
        torch.testing.assert_close(gradient, expected_gradient, rtol=1e-3, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# Distributed: two gloo processes on this machine against one process on the concatenated batch
# ------------------------------------------------------------------------------------------------------------

LOCAL_BATCH_SIZES = (3, 2)  # uneven on purpose: gathering pads and the labels are offset by the counts before
DISTRIBUTED_GROUPS = ((1, 1), (2, 3), (4, 6))


def _distributed_inputs():
    total = sum(LOCAL_BATCH_SIZES)
    queries, candidates, hard_negatives = batch(total, 1)
    features = (tiny_features(total, 1), tiny_features(total, 2), tiny_features(total, 3))
    return (queries, candidates, hard_negatives), features


def _distributed_worker(rank: int, world_size: int, init_file: str, result_file: str) -> None:
    """One rank: losses and gradients of its slice of the batch, candidates gathered across ranks."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    # A collective that waits longer than this raises (naming the rank) instead of hanging the test run.
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=300),
    )
    begin = sum(LOCAL_BATCH_SIZES[:rank])
    local = slice(begin, begin + LOCAL_BATCH_SIZES[rank])
    (queries, candidates, hard_negatives), features = _distributed_inputs()
    embeddings = [tensor[local].clone().requires_grad_() for tensor in (queries, candidates, hard_negatives)]
    output = mmr_loss(
        *embeddings[:2],
        DISTRIBUTED_GROUPS,
        0.1,
        embeddings[2],
        gather_across_devices=True,
        return_group_losses=True,
    )
    output.loss.backward()

    model = tiny_embedder()
    ddp_model = DistributedDataParallel(model)
    local_features = [{"inputs": feature["inputs"][local]} for feature in features]
    local_items = [
        ItemBatch(tuple(feature["inputs"].unbind(0)), tuple(map(str, range(len(feature["inputs"])))))
        for feature in local_features
    ]
    options = {"groups": DISTRIBUTED_GROUPS, "temperature": 0.1, "gather_across_devices": True}
    _, uncached = parameter_gradients(model, lambda: MMRLoss(ddp_model, **options)(*local_features).loss)
    # Each mini-batch's forward reaches only one of the two heads: DDP's own sync would go wrong here.
    cached_loss = CachedMMRLoss(
        ddp_model, mini_batch_size=2, scoring_chunk_size=1, processor=TinyProcessor(), **options
    )
    _, cached = parameter_gradients(model, lambda: cached_loss(*local_items).loss)
    # Gradient accumulation: a first step under the trainer's no_sync stays local, the second synchronises both.
    model.zero_grad()
    with ddp_model.no_sync():
        cached_loss(*local_items).loss.backward()
    cached_loss(*local_items).loss.backward()
    accumulated = [parameter.grad / 2 for parameter in model.parameters()]
    torch.save(
        {
            "loss": output.loss.detach(),
            "group_losses": {group: value.detach() for group, value in output.group_losses.items()},
            "embedding_gradients": [tensor.grad for tensor in embeddings],
            "uncached": uncached,
            "cached": cached,
            "accumulated": accumulated,
        },
        result_file,
    )
    # Leave without interpreter teardown: destroying a gloo group while a DDP reducer still holds it can deadlock
    # in torch (the group's worker thread waits for the GIL that the joining main thread holds); seen when the
    # parent's stdin is closed, as under CI.
    sys.stdout.flush()
    os._exit(0)


def test_distributed_gather_matches_single_process(tmp_path):
    world_size = len(LOCAL_BATCH_SIZES)
    tests_dir = Path(__file__).resolve().parent
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tests_dir), str(tests_dir.parent)]),
        "OMP_NUM_THREADS": "1",
    }
    if any(name == "lo" for _, name in socket.if_nameindex()):
        environment["GLOO_SOCKET_IFNAME"] = "lo"  # keep gloo's connections on the loopback interface
    init_file = tmp_path / "store"
    logs = [tmp_path / f"{rank}.log" for rank in range(world_size)]
    processes = []
    for rank, log in enumerate(logs):
        with open(log, "w") as log_file:  # a file, not a pipe: a rank blocked on a full pipe would stall the other
            processes.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-c",
                        "import test_training_loss as t; "
                        f"t._distributed_worker({rank}, {world_size}, {str(init_file)!r}, "
                        f"{str(tmp_path / f'{rank}.pt')!r})",
                    ],
                    env=environment,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                )
            )
    try:
        for process in processes:
            # Generous: each rank takes ~8 s alone, but CI machines can be many times slower under load.
            process.wait(timeout=600)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for rank, process in enumerate(processes):
        assert process.returncode == 0, f"rank {rank}:\n{logs[rank].read_text()}"
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(world_size)]

    # Single process, concatenated batch.
    embedding_inputs, features = _distributed_inputs()
    embeddings = [tensor.clone().requires_grad_() for tensor in embedding_inputs]
    output = mmr_loss(*embeddings[:2], DISTRIBUTED_GROUPS, 0.1, embeddings[2], return_group_losses=True)
    output.loss.backward()
    assert math.isclose(
        sum(result["loss"].item() for result in results) / world_size, output.loss.item(), rel_tol=1e-12
    )
    for group, value in output.group_losses.items():
        assert math.isclose(
            sum(result["group_losses"][group].item() for result in results) / world_size, value.item(), rel_tol=1e-12
        )
    # Each rank's gradients are world_size x the full-batch loss's gradients for its rows (DDP's averaging over
    # ranks then gives exactly the full-batch gradient).
    begin = 0
    for rank, result in enumerate(results):
        local = slice(begin, begin + LOCAL_BATCH_SIZES[rank])
        begin = local.stop
        for gradient, full in zip(result["embedding_gradients"], embeddings):
            torch.testing.assert_close(gradient, world_size * full.grad[local], rtol=1e-9, atol=1e-12)

    model = tiny_embedder()
    _, expected = parameter_gradients(
        model, lambda: MMRLoss(model, groups=DISTRIBUTED_GROUPS, temperature=0.1)(*features).loss
    )
    for result in results:
        for name in ("uncached", "cached", "accumulated"):
            for gradient, expected_gradient in zip(result[name], expected):
                torch.testing.assert_close(gradient, expected_gradient, rtol=1e-9, atol=1e-12)


def _double(tensor):
    return None if tensor is None else tensor.double()
