"""tieredImageNet from tiny arrays in the real layout: npz (compressed or not) or npy, plus label pickles."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from metarun.data import tieredimagenet
from metarun.errors import DataError
from metarun.factory import build_dataset
from tests.conftest import dataset_config

SIZE = 84
# split -> class names in label_specific order, with a different number of images per class
CLASSES = {"train": ["n01", "n02", "n03"], "val": ["n04", "n05"], "test": ["n06", "n07"]}
SIZES = {"n01": 3, "n02": 5, "n03": 4, "n04": 2, "n05": 2, "n06": 3, "n07": 1}


def write_split(root: Path, split: str, fmt: str) -> None:
    """Images in shuffled class order; pixel [0, 0] holds (class number, index within the class, 7)."""
    names = CLASSES[split]
    labels = np.concatenate([np.full(SIZES[n], i) for i, n in enumerate(names)])
    labels = labels[np.random.default_rng(1).permutation(len(labels))]
    images = np.zeros((len(labels), SIZE, SIZE, 3), dtype=np.uint8)
    seen = dict.fromkeys(range(len(names)), 0)
    for row, label in enumerate(labels):
        images[row, 0, 0] = (int(names[label][1:]), seen[label], 7)
        seen[label] += 1
    if fmt == "npy":
        np.save(root / f"{split}_images.npy", images)
    elif fmt == "npz":
        np.savez(root / f"{split}_images.npz", images=images)
    else:
        np.savez_compressed(root / f"{split}_images.npz", images=images)
    general = np.zeros_like(labels)
    with open(root / f"{split}_labels.pkl", "wb") as f:
        pickle.dump(
            {"label_specific": labels, "label_general": general, "label_specific_str": names, "label_general_str": ["g"]}, f
        )


def write_dataset(root: Path, fmt: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split in CLASSES:
        write_split(root, split, fmt)
    return root


@pytest.mark.parametrize("fmt", ["npz", "npz_compressed", "npy"])
def test_layouts_group_by_class_in_order(tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tieredimagenet, "ROW_CHUNK_BYTES", 2 * SIZE * SIZE * 3)  # several chunks per split
    root = write_dataset(tmp_path, fmt)
    ds = build_dataset(dataset_config("tieredimagenet", root=str(root)))
    for split, names in CLASSES.items():
        s = ds.splits[split]
        assert s.class_names == names
        assert s.images.shape == (len(names), max(SIZES[n] for n in names), 3, SIZE, SIZE)
        sizes = [SIZES[n] for n in names]
        assert (s.counts is None) == (len(set(sizes)) == 1)
        if s.counts is not None:
            assert s.counts.tolist() == sizes
        for c, name in enumerate(names):
            pixels = s.images[c, : SIZES[name], :, 0, 0]
            assert pixels[:, 0].tolist() == [int(name[1:])] * SIZES[name]
            assert pixels[:, 1].tolist() == list(range(SIZES[name]))
            assert pixels[:, 2].tolist() == [7] * SIZES[name]
    assert len(ds.mean) == 3


def test_npy_is_preferred_over_npz(tmp_path: Path) -> None:
    root = write_dataset(tmp_path, "npz")
    np.save(root / "train_images.npy", np.load(root / "train_images.npz")["images"])
    (root / "train_images.npz").write_bytes(b"broken")
    assert tieredimagenet.load(root=str(root)).splits["train"].num_classes == 3


def test_cache_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_dataset(tmp_path, "npz")
    first = tieredimagenet.load(root=str(root))

    def fail(*args, **kwargs):
        raise AssertionError("read again instead of reading the cache")

    monkeypatch.setattr(tieredimagenet, "group_by_class", fail)
    second = tieredimagenet.load(root=str(root))
    assert (second.splits["val"].images == first.splits["val"].images).all()


def test_missing_files_are_listed(tmp_path: Path) -> None:
    root = write_dataset(tmp_path, "npz")
    (root / "val_images.npz").unlink()
    (root / "test_labels.pkl").unlink()
    with pytest.raises(DataError, match=r"missing val_images\.npz, test_labels\.pkl\)") as info:
        tieredimagenet.load(root=str(root))
    assert "\n" not in str(info.value)


def test_truncated_array_is_reported(tmp_path: Path) -> None:
    root = write_dataset(tmp_path, "npy")
    data = (root / "test_images.npy").read_bytes()
    (root / "test_images.npy").write_bytes(data[: len(data) - 100])
    with pytest.raises(DataError, match="test_images.npy ends after 3 of its 4 images"):
        tieredimagenet.load(root=str(root))


def test_labels_must_match_images(tmp_path: Path) -> None:
    root = write_dataset(tmp_path, "npz")
    with open(root / "val_labels.pkl", "rb") as f:
        labels = pickle.load(f)
    labels["label_specific"] = labels["label_specific"][:-1]
    with open(root / "val_labels.pkl", "wb") as f:
        pickle.dump(labels, f)
    with pytest.raises(DataError, match="4 images for 3 labels"):
        tieredimagenet.load(root=str(root))


def test_corrupt_npz_is_reported(tmp_path: Path) -> None:
    root = write_dataset(tmp_path, "npz")
    (root / "val_images.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="val_images.npz is not a complete npz"):
        tieredimagenet.load(root=str(root))
