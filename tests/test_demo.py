"""The main job (`metaembed demo`): its scene task, determinism, seeds and a small end-to-end run."""

from __future__ import annotations

import os
import random

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel

from metaembed.demo import (
    PALETTE,
    DemoSettings,
    SceneTask,
    SceneTrainingBatches,
    cell_tint,
    evaluation_set,
    run_demo,
    save_demo_backbone,
    train_demo_model,
)


def test_scene_batches_have_no_false_negatives():
    task = SceneTask()
    rng = random.Random(0)
    for _ in range(5):
        batch = task.training_batch(rng, 32, text_fraction=1.0)
        targets = [row["query"] for row in batch]
        assert len(set(targets)) == 32
    data = evaluation_set(task, num_candidates=50, num_queries=20)
    assert data.relevant.shape == (20, 50) and bool(data.relevant.any(1).all())


def test_scene_board_shows_position_in_pixels():
    task = SceneTask()
    # The same disc in two cells differs in its surroundings; an empty cell shows the cell's own tint.
    top_left, bottom_right = task.draw({(0, 0): "red"}), task.draw({(2, 2): "red"})
    assert top_left.getpixel((1, 1)) == cell_tint(0, 0) != bottom_right.getpixel((57, 57)) == cell_tint(2, 2)
    assert top_left.getpixel((14, 14)) == bottom_right.getpixel((70, 70)) == PALETTE["red"]
    assert len({cell_tint(row, column) for row, column in task.positions}) == 9


def test_demo_training_is_deterministic_and_the_seed_matters(tmp_path):
    settings = DemoSettings(steps=2, batch_size=4)
    backbone = save_demo_backbone(str(tmp_path / "backbone"), settings)

    def trained(name: str, settings: DemoSettings) -> dict[str, torch.Tensor]:
        train_demo_model(backbone, str(tmp_path / name), settings, mmr=True)
        return load_file(os.path.join(tmp_path, name, "model.safetensors"))

    first, again = trained("first", settings), trained("again", settings)
    assert first.keys() == again.keys() and all(torch.equal(first[key], again[key]) for key in first)
    other = trained("other", DemoSettings(steps=2, batch_size=4, seed=1))
    assert not torch.equal(first["meta_tokens"], other["meta_tokens"])
    assert SceneTrainingBatches(SceneTask(), 2, 4, seed=0)[1] != SceneTrainingBatches(SceneTask(), 2, 4, seed=1)[1]


def test_demo_small_run(tmp_path, capsys):
    with_mmr, without_mmr = run_demo(
        DemoSettings(steps=3, batch_size=8, num_candidates=24, num_queries=9), str(tmp_path)
    )
    assert [result.budget for result in with_mmr] == [(1, 1), (2, 4), (4, 8), (8, 16), (16, 64)]
    assert all(0.0 <= result.metrics["precision@1"] <= 1.0 for result in with_mmr + without_mmr)
    assert with_mmr[-1].index_bytes_per_candidate == 64 * 16 * 4
    # The numbers are R@1 and capped R@10 of the saved model, as a plain computation from model.score gives them.
    model = AutoModel.from_pretrained(tmp_path / "metaembed-mmr", trust_remote_code=True)
    data = evaluation_set(SceneTask(), num_candidates=24, num_queries=9)
    queries, candidates = model.encode_queries(data.queries), model.encode_candidates(data.candidates)
    for result in with_mmr:
        top = model.score(queries, candidates, *result.budget).topk(10).indices
        hits = data.relevant.gather(1, top).float()
        assert result.metrics["precision@1"] == pytest.approx(hits[:, 0].mean().item(), abs=1e-6)
        capped = hits.sum(1) / data.relevant.sum(1).clamp(max=10)
        assert result.metrics["recall_cap@10"] == pytest.approx(capped.mean().item(), abs=1e-6)
    output = capsys.readouterr().out
    assert "| (1, 1) |" in output and "no-MMR" in output
    assert os.path.getsize(tmp_path / "quality_vs_budget.png") > 1000
    assert Image.open(tmp_path / "quality_vs_budget.png").size[0] > 100


def test_demo_checks_pytrec_eval_before_training(tmp_path, monkeypatch):
    """`metaembed demo` evaluates with pytrec_eval ([train] installs it): without it the demo stops at once with
    the extra to install, not after training both models."""
    import sys

    import metaembed.demo as demo

    monkeypatch.setitem(sys.modules, "pytrec_eval", None)  # import pytrec_eval now raises ImportError
    monkeypatch.setattr(demo, "save_demo_backbone", lambda *args: pytest.fail("the demo started before the check"))
    with pytest.raises(ImportError, match=r"pytrec_eval.*\[train\] for `metaembed demo`"):
        run_demo(DemoSettings(), str(tmp_path))
