"""The README's main command, at its real (tiny) size."""

from __future__ import annotations

import os

from cli_metaembed import main


def test_demo_runs_end_to_end(tmp_path, capsys):
    main(["demo", "--output-dir", str(tmp_path)])
    output = capsys.readouterr().out
    assert "random" in output
    assert "(16, 64)" in output and "4096" in output
    assert "equals the first 4 of 64 vectors" in output
    assert "README.md" in os.listdir(tmp_path / "metaembed-tiny")
