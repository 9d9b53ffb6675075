"""mini-ImageNet from tiny datasets in both real layouts: CSV + images/, and the cache pickles."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metarun.data import miniimagenet
from metarun.errors import DataError
from metarun.factory import build_dataset
from tests.conftest import dataset_config

CLASSES = {"train": ["n01", "n02", "n03"], "val": ["n04", "n05"], "test": ["n06", "n07"]}
PER_CLASS = 4


def write_csv_layout(root: Path) -> None:
    """84x84 JPEGs (and one larger PNG per class, resized on load) listed in Ravi & Larochelle style CSVs."""
    (root / "images").mkdir(parents=True)
    for split, classes in CLASSES.items():
        lines = ["filename,label"]
        for label in classes:
            for i in range(PER_CLASS):
                value = 10 * int(label[1:]) + i
                if i == 0:
                    name = f"{label}{i:08d}.png"
                    Image.new("RGB", (120, 100), (value, 0, 0)).save(root / "images" / name)
                else:
                    name = f"{label}{i:08d}.jpg"
                    Image.new("RGB", (84, 84), (value, 0, 0)).save(root / "images" / name, quality=95)
                lines.append(f"{name},{label}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")


def write_pickle_layout(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for split, file in miniimagenet.PICKLE_FILES.items():
        classes = CLASSES[split]
        n = len(classes) * PER_CLASS
        data = np.zeros((n, 84, 84, 3), dtype=np.uint8)
        class_dict = {}
        order = np.random.default_rng(0).permutation(n)  # rows of a class need not be contiguous
        for c, label in enumerate(classes):
            rows = sorted(order[c * PER_CLASS : (c + 1) * PER_CLASS].tolist())
            class_dict[label] = rows
            for i, row in enumerate(rows):
                data[row, :, :, 1] = 10 * int(label[1:]) + i
        with open(root / file, "wb") as f:
            pickle.dump({"image_data": data, "class_dict": class_dict}, f)


def check(ds, channel: int) -> None:
    for split, classes in CLASSES.items():
        s = ds.splits[split]
        assert s.class_names == classes
        assert s.images.shape == (len(classes), PER_CLASS, 3, 84, 84)
        assert s.counts is None
        for c, label in enumerate(classes):
            values = s.images[c, :, channel, 40, 40].int().tolist()
            assert all(abs(v - (10 * int(label[1:]) + i)) <= 2 for i, v in enumerate(values))
    assert len(ds.mean) == 3 and len(ds.std) == 3


def test_csv_layout(tmp_path: Path) -> None:
    write_csv_layout(tmp_path)
    ds = build_dataset(dataset_config("miniimagenet", root=str(tmp_path)))
    check(ds, channel=0)
    assert ds.meta["layout"] == "csv"


def test_pickle_layout_is_preferred(tmp_path: Path) -> None:
    write_csv_layout(tmp_path)
    write_pickle_layout(tmp_path)
    ds = miniimagenet.load(root=str(tmp_path))
    check(ds, channel=1)
    assert ds.meta["layout"] == "pickle"


def test_cache_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_csv_layout(tmp_path)
    first = miniimagenet.load(root=str(tmp_path))
    assert list((tmp_path / ".metarun-cache").glob("miniimagenet-*.pt"))

    def fail(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(miniimagenet, "decode_classes", fail)
    second = miniimagenet.load(root=str(tmp_path))
    assert (second.splits["train"].images == first.splits["train"].images).all()


def test_missing_files_say_what_to_put_where(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        miniimagenet.load(root=str(tmp_path / "nothing"))
    message = str(info.value)
    assert "\n" not in message
    for name in ("images/", "train.csv", "val.csv", "test.csv", "mini-imagenet-cache-validation.pkl", str(tmp_path / "nothing")):
        assert name in message


def test_partial_layout_names_the_missing_file(tmp_path: Path) -> None:
    write_csv_layout(tmp_path)
    (tmp_path / "val.csv").unlink()
    with pytest.raises(DataError, match=r"missing val\.csv\)"):
        miniimagenet.load(root=str(tmp_path))
    write_pickle_layout(tmp_path / "p")
    (tmp_path / "p" / "mini-imagenet-cache-test.pkl").unlink()
    with pytest.raises(DataError, match=r"missing mini-imagenet-cache-test\.pkl\)"):
        miniimagenet.load(root=str(tmp_path / "p"))


def test_missing_image_is_named(tmp_path: Path) -> None:
    write_csv_layout(tmp_path)
    (tmp_path / "images" / "n0600000002.jpg").unlink()
    with pytest.raises(DataError, match="n0600000002.jpg"):
        miniimagenet.load(root=str(tmp_path))


def test_overlapping_splits_are_refused(tmp_path: Path) -> None:
    write_csv_layout(tmp_path)
    with open(tmp_path / "test.csv", "a") as f:
        f.write("n0100000001.jpg,n01\n")
    with pytest.raises(DataError, match="class n01 is in both the train and the test split"):
        miniimagenet.load(root=str(tmp_path))


def test_bad_csv_header(tmp_path: Path) -> None:
    write_csv_layout(tmp_path)
    (tmp_path / "train.csv").write_text("image,class\nx.jpg,n01\n")
    with pytest.raises(DataError, match="header filename,label"):
        miniimagenet.load(root=str(tmp_path))
