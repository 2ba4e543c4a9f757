"""The main job (`metaembed demo`): its scene task, held-out split, determinism and a small end-to-end run."""

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


def test_training_scenes_have_no_false_negatives_and_none_is_held_out():
    task = SceneTask()
    rng = random.Random(0)
    for _ in range(5):
        rows = task.training_scenes(rng, 32)
        assert len({(position, name) for position, name, _ in rows}) == 32
        for row, (position, name, scene) in enumerate(rows):
            assert scene[position] == name and not task.is_held_out(scene)
            # no other row's scene shows this row's target in its cell: every in-batch negative is one
            assert all(other[position] != name for index, (_, _, other) in enumerate(rows) if index != row)
    batch = task.training_batch(rng, 32, text_fraction=1.0)
    assert len({row["query"] for row in batch}) == 32


def test_window_batches_keep_targets_and_objects_in_the_window():
    task = SceneTask(grid=5)
    window = (1, 2, 2)  # rows 1-2, columns 2-3
    rows = task.training_scenes(random.Random(3), 32, window)
    cells = {(1, 2), (1, 3), (2, 2), (2, 3)}
    assert set(task.region(window)) == cells and task.region(None) == task.positions
    assert {position for position, _, _ in rows} <= cells
    for position, name, scene in rows:
        assert set(scene) == set(task.positions) and scene[position] == name and not task.is_held_out(scene)
        assert all(scene[cell] is None for cell in set(task.positions) - cells)
    # 4 cells x 18 objects: 32 distinct targets still fit; every in-batch negative is one
    assert len({(position, name) for position, name, _ in rows}) == 32
    for row, (position, name, _) in enumerate(rows):
        assert all(other[position] != name for index, (_, _, other) in enumerate(rows) if index != row)
    whole = task.training_scenes(random.Random(3), 32)
    assert any(position not in cells for position, _, _ in whole)
    # window batches show the window only: the scene's image cropped to its cells, pixel for pixel
    cell = task.cell_pixels
    box = (2 * cell, 1 * cell, 4 * cell, 3 * cell)
    batch = task.training_batch(random.Random(3), 32, 0.5, window)
    assert any(isinstance(row["query"], str) for row in batch) and any(
        not isinstance(row["query"], str) for row in batch
    )
    for row, (position, name, scene) in zip(batch, rows):
        assert row["positive"].tobytes() == task.draw(scene).crop(box).tobytes()
        if isinstance(row["query"], str):
            assert row["query"] == task.describe(name, position)
        else:
            assert row["query"].tobytes() == task.draw({position: name}).crop(box).tobytes()
    assert {row["positive"].size for row in task.training_batch(random.Random(3), 8, 0.5)} == {(5 * cell, 5 * cell)}


def test_curriculum_follows_the_batch_index():
    task = SceneTask(grid=5)
    batches = SceneTrainingBatches(task, 100, 4, seed=0, curriculum=((0.1, 2), (0.25, 3)))
    assert [batches.side(index) for index in (0, 9, 10, 24, 25, 99)] == [2, 2, 3, 3, None, None]
    assert SceneTrainingBatches(task, 100, 4, seed=0).side(0) is None
    cell = task.cell_pixels
    sizes = [{row["positive"].size for row in batches[index]} for index in (0, 10, 25)]
    assert sizes == [{(2 * cell, 2 * cell)}, {(3 * cell, 3 * cell)}, {(5 * cell, 5 * cell)}]
    # windows lie anywhere on the board, not only in its corner
    windows = {batches.window(index, random.Random(index)) for index in range(10)}
    assert all(0 <= top <= 3 and 0 <= left <= 3 and side == 2 for top, left, side in windows) and len(windows) > 3
    # the same index gives the same batch (made on demand from seed and index)
    first, again = batches[5], batches[5]
    assert [row["positive"].tobytes() for row in first] == [row["positive"].tobytes() for row in again]


def test_demo_trains_on_batches_in_step_order(tmp_path, monkeypatch):
    """The curriculum follows the step, so the Trainer must draw batch i at step i (not shuffled)."""
    drawn = []
    original = SceneTrainingBatches.__getitem__

    def record(self, index):
        drawn.append(index)
        return original(self, index)

    monkeypatch.setattr(SceneTrainingBatches, "__getitem__", record)
    settings = DemoSettings(steps=6, batch_size=4, curriculum=((0.5, 2),))
    train_demo_model(save_demo_backbone(str(tmp_path / "backbone"), settings), str(tmp_path / "m"), settings, True)
    assert drawn == list(range(6))


def test_evaluation_set_is_held_out_and_relevance_matches_the_scenes():
    task = SceneTask()
    data = evaluation_set(task, num_candidates=60, num_queries=30)
    assert data.relevant.shape == (30, 60) and bool(data.relevant.any(1).all())
    assert data.query_is_text == [index % 3 != 2 for index in range(30)]
    # Rebuild the scenes from the same seed: each is held out, and a query is relevant exactly to the scenes that
    # hold its object in its cell.
    rng, scenes = random.Random(12345), []
    while len(scenes) < 60:
        scene = task.random_scene(rng)
        if task.is_held_out(scene):
            scenes.append(scene)
    assert [task.draw(scene).tobytes() for scene in scenes] == [image.tobytes() for image in data.candidates]
    for query, row in zip(data.queries, data.relevant):
        if isinstance(query, str):
            name, cell = query.rsplit(" ", 1)
            position = (int(cell[1:]) - 1, "abcdefgh".index(cell[0]))
            assert row.tolist() == [scene[position] == name for scene in scenes]


def test_held_out_part_is_about_one_scene_in_ten():
    task, rng = SceneTask(), random.Random(1)
    held_out = sum(task.is_held_out(task.random_scene(rng)) for _ in range(5000))
    assert 400 < held_out < 600


def test_scene_board_shows_cell_and_object_in_pixels():
    task = SceneTask()
    cell, grid = task.cell_pixels, task.grid
    assert grid == 5 and len(task.positions) == 25  # the demo's board: more cells than (8, 16) has vectors
    # The same object in two cells differs in its surroundings; an empty cell shows the cell's own tint.
    last = grid - 1
    top_left, bottom_right = task.draw({(0, 0): "red disc"}), task.draw({(last, last): "red disc"})
    assert top_left.size == (grid * cell, grid * cell)
    assert top_left.getpixel((0, 0)) == cell_tint(0, 0, grid) != bottom_right.getpixel((last * cell, last * cell))
    assert bottom_right.getpixel((last * cell, last * cell)) == cell_tint(last, last, grid)
    middle = cell // 2
    assert top_left.getpixel((middle, middle)) == bottom_right.getpixel((last * cell + middle,) * 2) == PALETTE["red"]
    assert len({cell_tint(row, column, grid) for row, column in task.positions}) == 25
    assert task.describe("red disc", (3, 2)) == "red disc c4"
    drawn = {shape: task.draw({(0, 0): f"blue {shape}"}).tobytes() for shape in task.shapes}
    assert len(set(drawn.values())) == len(task.shapes) == 2


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
    assert SceneTrainingBatches(settings.task, 2, 4, seed=0)[1] != SceneTrainingBatches(settings.task, 2, 4, seed=1)[1]


def test_demo_backbone_seed_changes_its_weights(tmp_path):
    zero = load_file(save_demo_backbone(str(tmp_path / "zero"), DemoSettings()) + "/model.safetensors")
    one = load_file(save_demo_backbone(str(tmp_path / "one"), DemoSettings(seed=1)) + "/model.safetensors")
    name = "language_model.layers.0.mlp.up_proj.weight"
    assert zero[name].shape == one[name].shape and not torch.equal(zero[name], one[name])


def test_demo_small_run(tmp_path, capsys):
    small = DemoSettings(steps=3, batch_size=8, num_candidates=24, num_queries=9)
    with_mmr, without_mmr = run_demo(small, str(tmp_path))
    # Each model trained in its own process with one thread: the same weights as a one-thread training here.
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for mmr, name in ((True, "metaembed-mmr"), (False, "metaembed-no-mmr")):
            train_demo_model(str(tmp_path / "backbone"), str(tmp_path / f"here-{name}"), small, mmr)
            here = load_file(tmp_path / f"here-{name}" / "model.safetensors")
            there = load_file(tmp_path / name / "model.safetensors")
            assert here.keys() == there.keys() and all(torch.equal(here[key], there[key]) for key in here)
    finally:
        torch.set_num_threads(threads)
    assert [result.budget for result in with_mmr] == [(1, 1), (2, 4), (4, 8), (8, 16), (16, 64)]
    assert all(0.0 <= result.metrics["precision@1"] <= 1.0 for result in with_mmr + without_mmr)
    settings = DemoSettings()
    assert with_mmr[-1].index_bytes_per_candidate == 64 * settings.embedding_dim * 4
    # The numbers are R@1 and capped R@10 of the saved model, as a plain computation from model.score gives them.
    model = AutoModel.from_pretrained(tmp_path / "metaembed-mmr", trust_remote_code=True)
    data = evaluation_set(settings.task, num_candidates=24, num_queries=9)
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
