"""Trust is explicit: a model folder named by data (an index's index.json) is served by the installed package's
classes; its own code runs only with `--trust-remote-code` / `trust_remote_code=True`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, make_model

from metaembed.loading import foreign_code_files, load_model
from metaembed.search.index import MetaEmbedIndex

PAYLOAD = "\nopen({marker!r}, 'w').write('ran')\n"


@pytest.fixture(scope="module")
def shared_index(backbone_dirs, tmp_path_factory):
    """An index folder as someone might share it: index.json names a model folder shipped inside it."""
    folder = tmp_path_factory.mktemp("shared") / "index"
    model = make_model(backbone_dirs["qwen2_5_vl"])
    model_folder = folder / "model"
    model.save_pretrained(model_folder)
    index = MetaEmbedIndex(model.config.output_dim, 8, "float32", str(model_folder))
    index.add(model.encode_candidates(["a red circle", "a blue square"]), ids=["red", "blue"])
    index.save(str(folder))
    return folder, model


def run_search(index_folder, *options: str, modules_cache: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": modules_cache}
    command = [sys.executable, "-m", "metaembed.cli", "search", str(index_folder), "red circle", "--json", *options]
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)


def test_an_unedited_model_folder_is_served_by_the_installed_classes(shared_index):
    folder, model = shared_index
    assert foreign_code_files(folder / "model") == []
    loaded = load_model(str(folder / "model"))
    # The installed class itself: nothing was imported from the folder (remote code is a transformers_modules class).
    assert type(loaded) is type(model) and type(loaded).__module__ == "modeling_metaembed"
    torch.testing.assert_close(loaded.encode_queries(["red"]), model.encode_queries(["red"]), atol=0, rtol=0)


def test_search_never_runs_code_shipped_with_an_index(shared_index, tmp_path):
    folder, _ = shared_index
    edited = tmp_path / "index"
    import shutil

    shutil.copytree(folder, edited)
    # index.json names the model folder inside the copy.
    manifest = json.loads((edited / "index.json").read_text())
    manifest["model_name_or_path"] = str(edited / "model")
    (edited / "index.json").write_text(json.dumps(manifest))
    marker = tmp_path / "marker"
    with open(edited / "model" / "modeling_metaembed.py", "a") as file:
        file.write(PAYLOAD.format(marker=str(marker)))
    assert foreign_code_files(edited / "model") == ["modeling_metaembed.py"]
    with pytest.raises(ValueError, match=r"modeling_metaembed\.py.*trust-remote-code"):
        load_model(str(edited / "model"))

    result = run_search(edited, modules_cache=str(tmp_path / "modules"))
    assert not marker.exists(), "code shipped with the index ran without --trust-remote-code"
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert errors[-1].startswith("metaembed search: error: ") and "--trust-remote-code" in errors[-1]

    # Opting in is the user's choice: then the folder's code is what runs.
    result = run_search(edited, "--trust-remote-code", modules_cache=str(tmp_path / "modules"))
    assert result.returncode == 0, result.stderr
    assert marker.read_text() == "ran"
    assert json.loads(result.stdout)[0]["results"][0]["id"] in ("red", "blue")


def test_an_extra_module_in_the_folder_is_refused(shared_index, tmp_path):
    folder, _ = shared_index
    import shutil

    shutil.copytree(folder / "model", tmp_path / "model")
    (tmp_path / "model" / "helpers.py").write_text("import os\n")
    with pytest.raises(ValueError, match=r"helpers\.py"):
        load_model(str(tmp_path / "model"))
