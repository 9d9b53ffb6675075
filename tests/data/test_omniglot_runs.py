"""The one-shot runs, on runs built here in the official layout."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from metarun.data import omniglot
from metarun.data.omniglot_runs import load_runs
from metarun.errors import DataError

WAYS = 20


def drawing(seed: int) -> Image.Image:
    """A 105x105 mode '1' drawing like Omniglot's: white background, one black stroke."""
    image = Image.new("1", (105, 105), 1)
    x = 5 + 4 * seed
    ImageDraw.Draw(image).line([(x, 5), (100 - x, 100)], fill=0, width=5)
    return image


def build_runs(root: Path, runs: int = 2) -> dict[str, list[int]]:
    """Runs whose item k shows the drawing of class ``labels[k]``; returns the labels per run."""
    rng = np.random.default_rng(0)
    truth = {}
    for r in range(1, runs + 1):
        name = f"run{r:02d}"
        (root / name / "training").mkdir(parents=True)
        (root / name / "test").mkdir()
        for j in range(WAYS):
            drawing(j).save(root / name / "training" / f"class{j + 1:02d}.png")
        labels = rng.permutation(WAYS).tolist()
        lines = []
        for k, label in enumerate(labels):
            drawing(label).save(root / name / "test" / f"item{k + 1:02d}.png")
            lines.append(f"{name}/test/item{k + 1:02d}.png {name}/training/class{label + 1:02d}.png")
        (root / name / "class_labels.txt").write_text("\n".join(reversed(lines)) + "\n")
        truth[name] = labels
    return truth


def test_load_runs(tmp_path: Path) -> None:
    truth = build_runs(tmp_path)
    runs = load_runs(tmp_path)
    assert [run.name for run in runs] == ["run01", "run02"]
    for run in runs:
        assert run.support.shape == (WAYS, 1, 1, 28, 28) and run.support.dtype == torch.uint8
        assert run.query.shape == (WAYS, 1, 28, 28) and run.query.dtype == torch.uint8
        assert run.query_labels.dtype == torch.int64
        assert run.query_labels.tolist() == truth[run.name]
        assert torch.equal(run.query, run.support[run.query_labels, 0])  # each item is its class's drawing
        assert run.support[:, :, :, 0, 0].max() == 0 and run.support.max() == 255  # dark background, bright strokes


def test_same_pixels_as_training_data(tmp_path: Path) -> None:
    build_runs(tmp_path, runs=1)
    (run,) = load_runs(tmp_path, image_size=20)
    expected = omniglot.preprocess(drawing(3), 20)
    assert torch.equal(run.support[3, 0, 0], torch.from_numpy(expected))
    buffer = io.BytesIO()
    drawing(3).save(buffer, format="PNG")
    assert np.array_equal(omniglot.decode_png(buffer.getvalue(), 20), expected)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="runs folder .* missing"):
        load_runs(tmp_path / "all_runs")
    with pytest.raises(DataError, match="no runNN folders"):
        load_runs(tmp_path)


def test_missing_labels_file(tmp_path: Path) -> None:
    build_runs(tmp_path, runs=1)
    (tmp_path / "run01" / "class_labels.txt").unlink()
    with pytest.raises(DataError, match="class_labels.txt missing"):
        load_runs(tmp_path)


@pytest.mark.parametrize(
    "bad_line",
    [
        "run01/test/item01.png",
        "run01/test/item01.png run01/training/class99.png",
        "run02/test/item01.png run01/training/class01.png",
    ],
)
def test_malformed_labels(tmp_path: Path, bad_line: str) -> None:
    build_runs(tmp_path, runs=1)
    labels = tmp_path / "run01" / "class_labels.txt"
    labels.write_text(bad_line + "\n" + labels.read_text())
    with pytest.raises(DataError, match=r"class_labels.txt:1: expected"):
        load_runs(tmp_path)


def test_unlabelled_item(tmp_path: Path) -> None:
    build_runs(tmp_path, runs=1)
    labels = tmp_path / "run01" / "class_labels.txt"
    labels.write_text("\n".join(line for line in labels.read_text().splitlines() if "item07" not in line))
    with pytest.raises(DataError, match="no label for test/item07.png"):
        load_runs(tmp_path)


def test_unreadable_image(tmp_path: Path) -> None:
    build_runs(tmp_path, runs=1)
    (tmp_path / "run01" / "training" / "class05.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read .*class05.png"):
        load_runs(tmp_path)
