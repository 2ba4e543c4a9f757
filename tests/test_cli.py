"""The README's main command (`metaembed demo`), at a few steps."""

from __future__ import annotations

import os

from metaembed.cli import main


def test_demo_command_end_to_end(tmp_path, capsys):
    main(["demo", "--steps", "2", "--num-candidates", "12", "--num-queries", "6", "--output-dir", str(tmp_path)])
    output = capsys.readouterr().out
    assert "| (16, 64) |" in output and "R@1 no-MMR" in output
    assert os.path.isfile(tmp_path / "quality_vs_budget.png")
    assert "README.md" in os.listdir(tmp_path / "metaembed-mmr")
