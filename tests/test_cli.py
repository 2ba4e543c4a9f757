"""The README's main command (`metaembed demo`), at a few steps; argument checks and user errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

from metaembed.cli import main
from metaembed.demo import DemoSettings, save_demo_backbone


def test_demo_command_end_to_end(tmp_path, capsys):
    arguments = ["demo", "--steps", "2", "--num-candidates", "12", "--num-queries", "6", "--seed", "1"]
    main([*arguments, "--output-dir", str(tmp_path)])
    output = capsys.readouterr().out
    assert "| (16, 64) |" in output and "R@1 no-MMR" in output
    assert os.path.isfile(tmp_path / "quality_vs_budget.png")
    assert "README.md" in os.listdir(tmp_path / "metaembed-mmr")
    # --seed reaches the backbone: seed 1's random weights, not the default seed 0's
    seeded = load_file(tmp_path / "backbone" / "model.safetensors")
    default = load_file(os.path.join(save_demo_backbone(str(tmp_path / "seed-0"), DemoSettings()), "model.safetensors"))
    assert not torch.equal(seeded["visual.blocks.0.attn.qkv.weight"], default["visual.blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["index", "m", "c.txt", "out", "--shard-size", "-1"], "--shard-size: expected an integer >= 1, got -1"),
        (["index", "m", "c.txt", "out", "--shard-size", "0"], "--shard-size: expected an integer >= 1, got 0"),
        (["index", "m", "c.txt", "out", "--num-vectors", "0"], "--num-vectors: expected an integer >= 1, got 0"),
        (["index", "m", "c.txt", "out", "--batch-size", "x"], "--batch-size: expected an integer >= 1, got 'x'"),
        (["index", "m", "c.txt", "out", "--dtype", "banana"], "--dtype: invalid choice: 'banana'"),
        (["search", "index", "q", "--top-k", "0"], "--top-k: expected an integer >= 1, got 0"),
        (["demo", "--seed", "-1"], "--seed: expected an integer >= 0, got -1"),
        (["search", "index", "q", "--budget", "0", "4"], "--budget: expected an integer >= 1, got 0"),
        (["train", "--backbone", "b", "--train-file", "t", "--output-dir", "o", "--temperature", "-1"], "positive"),
    ],
)
def test_bad_arguments_are_refused_by_the_parser(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in error
    assert error.splitlines()[-1].startswith(f"metaembed {arguments[0]}: error: ") and message in error


def test_user_errors_at_run_time_print_one_line_and_exit_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "metaembed.cli", "search", str(tmp_path / "no-index"), "query"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        result.stderr == f"metaembed search: error: {tmp_path / 'no-index'} is not a MetaEmbed index (no index.json)\n"
    )
