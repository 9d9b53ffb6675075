"""CUB-200-2011 from a tiny copy of the official layout: Chen et al.'s split by class index, variable class sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from metarun.data import cub
from metarun.errors import DataError
from metarun.factory import build_dataset
from tests.conftest import dataset_config

SPECIES = [f"{i + 1:03d}.Bird_{i + 1}" for i in range(8)]
SIZES = [2, 3, 4, 2, 3, 2, 1, 3]


def write_cub(base: Path) -> Path:
    """``images/<species>/<file>.jpg`` of varied sizes, plus ``images.txt`` and ``classes.txt``; red = species number."""
    (base / "images").mkdir(parents=True)
    image_lines = []
    for c, (species, n) in enumerate(zip(SPECIES, SIZES, strict=True)):
        (base / "images" / species).mkdir()
        for i in range(n):
            relative = f"{species}/Bird_{c + 1}_{i:04d}.jpg"
            mode = "L" if (c, i) == (0, 1) else "RGB"  # the real set has a few grayscale photos
            Image.new(mode, (100 + 10 * i, 80), 30 * c if mode == "L" else (30 * c, 60, 90)).save(
                base / "images" / relative, quality=95
            )
            image_lines.append(f"{len(image_lines) + 1} {relative}")
    (base / "images.txt").write_text("\n".join(image_lines) + "\n")
    (base / "classes.txt").write_text("".join(f"{i + 1} {s}\n" for i, s in enumerate(SPECIES)))
    return base


def test_split_of_follows_chen_et_al() -> None:
    splits = [cub.split_of(i) for i in range(200)]
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (100, 50, 50)
    assert splits[:8] == ["train", "val", "train", "test", "train", "val", "train", "test"]


def test_official_layout(tmp_path: Path) -> None:
    write_cub(tmp_path / "CUB_200_2011")
    ds = build_dataset(dataset_config("cub", root=str(tmp_path)))
    expected = {"train": [0, 2, 4, 6], "val": [1, 5], "test": [3, 7]}
    for split, indices in expected.items():
        s = ds.splits[split]
        assert s.class_names == [SPECIES[i] for i in indices]
        assert s.images.shape == (len(indices), max(SIZES[i] for i in indices), 3, 84, 84)
        assert s.counts.tolist() == [SIZES[i] for i in indices]
        for c, i in enumerate(indices):
            red = s.images[c, : SIZES[i], 0, 42, 42].int()
            assert ((red - 30 * i).abs() <= 2).all()
    assert ds.splits["train"].images[0, 1, :, 42, 42].tolist() == [0, 0, 0]  # grayscale photo as RGB
    assert len(ds.mean) == 3


def test_files_directly_in_root_and_cache_reuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cub(tmp_path)
    first = cub.load(root=str(tmp_path))
    assert list((tmp_path / ".metarun-cache").glob("cub-*.pt"))

    def fail(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(cub, "decode_classes", fail)
    second = cub.load(root=str(tmp_path))
    assert (second.splits["test"].images == first.splits["test"].images).all()


def test_missing_dataset_says_where_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"CUB_200_2011\.tgz from https://www\.vision\.caltech\.edu") as info:
        cub.load(root=str(tmp_path))
    assert str(tmp_path / "CUB_200_2011") in str(info.value) and "\n" not in str(info.value)


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    base = write_cub(tmp_path / "CUB_200_2011")
    (base / "images" / SPECIES[3] / "Bird_4_0001.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DataError, match="Bird_4_0001.jpg"):
        cub.load(root=str(tmp_path))


def test_image_of_unknown_species(tmp_path: Path) -> None:
    base = write_cub(tmp_path / "CUB_200_2011")
    with open(base / "images.txt", "a") as f:
        f.write("99 201.Dodo/Dodo_0001.jpg\n")
    with pytest.raises(DataError, match="201.Dodo/Dodo_0001.jpg, whose folder is not in classes.txt"):
        cub.load(root=str(tmp_path))
