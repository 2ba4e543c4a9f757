"""Training data is checked before the first step: every row's shape (query, positive, negatives as a list of
items), errors naming `file:line` (or the dataset row) and the field; JSONL image paths stay in the data folder."""

from __future__ import annotations

import json

import pytest

from metaembed.cli import main
from metaembed.training import train_metaembed
from metaembed.training.data import read_training_jsonl, validate_training_rows


def train_error(capsys, backbone_dir: str, train_file, tmp_path, *options: str) -> str:
    """The one line `metaembed train` prints for bad data (exit 2), before anything is trained or written."""
    capsys.readouterr()
    arguments = ["train", "--backbone", backbone_dir, "--train-file", str(train_file), "--output-dir"]
    arguments += [str(tmp_path / "out"), "--max-steps", "1", "--batch-size", "2", "--lora-rank", "0", *options]
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 2
    assert not (tmp_path / "out").exists()
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("metaembed train: error: "), error
    return error[0]


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.mark.parametrize(
    ("negatives", "message"),
    [
        ("abc", r"train\.jsonl:2: 'negatives' must be a list of items.*str 'abc'"),
        ({"text": "blue"}, r"train\.jsonl:2: 'negatives' must be a list of items.*dict"),
        ([{"txt": "blue"}], r"train\.jsonl:2: 'negatives'\[0\] has unknown keys"),
        # every row [] passed the check and failed at the first step (the loss needs >= 1 negative per row)
        ([], r"train\.jsonl:2: 'negatives' is an empty list"),
    ],
)
def test_negatives_that_are_not_a_list_of_items_are_refused_by_line(
    backbone_dirs, tmp_path, capsys, negatives, message
):
    train_file = tmp_path / "train.jsonl"
    write_jsonl(
        train_file,
        [
            {"query": "q", "positive": "p", "negatives": ["n"]},
            {"query": "q2", "positive": "p2", "negatives": negatives},
        ],
    )
    with pytest.raises(ValueError, match=message):
        read_training_jsonl(str(train_file))
    assert train_error(capsys, backbone_dirs["qwen2_vl"], train_file, tmp_path)


def test_a_row_without_positive_is_refused_before_training(backbone_dirs, model, tmp_path, capsys):
    train_file = tmp_path / "train.jsonl"
    write_jsonl(train_file, [{"query": "q", "positive": "p"}, {"query": "q2"}, {"query": "q3", "positive": "p3"}])
    line = train_error(capsys, backbone_dirs["qwen2_vl"], train_file, tmp_path)
    assert line.endswith("train.jsonl:2 has no 'positive'")
    # The Python entry point: a dataset row, named by its index, before any step.
    rows = [{"query": "q", "positive": "p"}, {"query": "q2", "positive": None}]
    with pytest.raises(ValueError, match="row 1 has no 'positive'"):
        train_metaembed(model, rows, str(tmp_path / "python"), max_steps=1, lora_rank=None)
    assert not (tmp_path / "python").exists()
    # check_rows=False (rows made on demand): the same row still fails, when its batch is built, naming it.
    with pytest.raises(TypeError, match=r"positive\[1\] is None"):
        train_metaembed(model, rows, str(tmp_path / "lazy"), max_steps=1, lora_rank=None, check_rows=False)


def test_datasets_rows_and_prebuilt_batches_are_checked(model, images):
    from datasets import Dataset

    good = {"query": "q", "positive": "p", "negatives": ["n1", "n2"]}
    validate_training_rows(Dataset.from_list([good, {**good, "query": "other"}]))
    with pytest.raises(ValueError, match=r"row 1: 'query' is an empty string"):
        validate_training_rows(Dataset.from_list([good, {**good, "query": " "}]))
    with pytest.raises(ValueError, match=r"row 1\[1\] has 1 'negatives', row 0 has 2"):
        validate_training_rows([good, [good, {**good, "negatives": ["n1"]}]])
    with pytest.raises(FileNotFoundError, match=r"row 0: 'positive'\['image'\]: no image file"):
        validate_training_rows([{"query": "q", "positive": {"image": "missing.png"}}])
    with pytest.raises(ValueError, match="row 0 must be an object"):
        validate_training_rows(["not a row"])


def test_jsonl_image_paths_stay_in_the_data_folder_unless_allowed(backbone_dirs, images, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    images["rgb"].save(tmp_path / "outside.png")
    images["rgb"].save(data / "inside.png")
    (data / "link.png").symlink_to(tmp_path / "outside.png")
    train_file = data / "train.jsonl"
    for path, message in [
        ("../outside.png", r"train\.jsonl:1: 'positive'\['image'\] '\.\./outside\.png' leads outside"),
        ("link.png", r"train\.jsonl:1: 'positive'\['image'\] 'link\.png' leads outside"),
        (str(tmp_path / "outside.png"), r"train\.jsonl:1: 'positive'\['image'\] is an absolute path"),
    ]:
        write_jsonl(train_file, [{"query": "q", "positive": {"image": path}}])
        with pytest.raises(ValueError, match=message):
            read_training_jsonl(str(train_file))
        assert "allow-absolute-image-paths" in train_error(capsys, backbone_dirs["qwen2_vl"], train_file, tmp_path)
        rows = read_training_jsonl(str(train_file), allow_absolute_image_paths=True)
        assert rows[0]["positive"]["image"] in (str(data / path), path)
    write_jsonl(
        train_file, [{"query": "q", "positive": {"image": "inside.png"}, "negatives": [{"image": "inside.png"}]}]
    )
    assert read_training_jsonl(str(train_file))[0]["negatives"][0]["image"] == str(data / "inside.png")
    # An image given as an object ({"path": ...}, datasets' storage form) escaped the folder check.
    for image in ({"path": str(tmp_path / "outside.png")}, {"path": "../outside.png"}):
        write_jsonl(train_file, [{"query": "q", "positive": {"image": image}}])
        with pytest.raises(ValueError, match=r"train\.jsonl:1: 'positive'\['image'\] is dict; in a JSONL file"):
            read_training_jsonl(str(train_file), allow_absolute_image_paths=True)
