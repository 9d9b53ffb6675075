"""A user's own image folders: both layouts, seeded class split, caching and the errors a user can act on."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from metarun.data import folder
from metarun.errors import ConfigError, DataError
from metarun.factory import build_dataset
from tests.conftest import dataset_config

FORMATS = ("png", "jpg", "bmp", "gif", "webp")


def write_class(directory: Path, value: int, n: int, nested: bool = False) -> None:
    directory.mkdir(parents=True)
    for i in range(n):
        fmt = FORMATS[i % len(FORMATS)]
        target = directory / "more" if nested and i == 0 else directory
        target.mkdir(exist_ok=True)
        Image.new("RGB", (30 + i, 20), (value, value, value)).save(target / f"img{i}.{fmt.upper() if i == 1 else fmt}")
    (directory / "notes.txt").write_text("not an image")
    (directory / ".hidden.png").write_bytes(b"junk")


def write_flat(path: Path, classes: int = 10) -> Path:
    for c in range(classes):
        write_class(path / f"class{c:02d}", 20 * c, 2 + c % 3, nested=c == 0)
    return path


def load(path: Path, **kwargs):
    return folder.load(path=str(path), **kwargs)


def test_flat_layout_is_split_by_class_with_a_seed(tmp_path: Path) -> None:
    data = write_flat(tmp_path / "data")
    ds = build_dataset(dataset_config("folder", path=str(data), image_size=16))
    assert {s: v.num_classes for s, v in ds.splits.items()} == {"train": 6, "val": 2, "test": 2}
    names = [set(v.class_names) for v in ds.splits.values()]
    assert set.union(*names) == {f"class{c:02d}" for c in range(10)} and sum(map(len, names)) == 10
    for split in ds.splits.values():
        assert split.images.shape[2:] == (3, 16, 16)
        for c, name in enumerate(split.class_names):
            n = 2 + int(name[-2:]) % 3  # every image counted; .txt and hidden files skipped; nested found
            assert int(split.counts[c]) == n
            assert (split.images[c, :n, :, 8, 8].int() - 20 * int(name[-2:])).abs().max() <= 2
    again = load(data, image_size=16, root=str(tmp_path / "elsewhere"))
    assert all(again.splits[s].class_names == ds.splits[s].class_names for s in ds.splits)
    other = load(data, image_size=16, seed=1)
    assert other.splits["test"].class_names != ds.splits["test"].class_names


def test_presplit_layout(tmp_path: Path) -> None:
    for split, classes in {"train": ["a", "b", "c"], "val": ["d"], "test": ["e", "f"]}.items():
        for c in classes:
            write_class(tmp_path / split / c, 100, 3)
    ds = load(tmp_path, image_size=8, channels=1, split_fractions=[1.0, 0.0, 0.0])  # fractions play no part
    assert {s: v.class_names for s, v in ds.splits.items()} == {"train": ["a", "b", "c"], "val": ["d"], "test": ["e", "f"]}
    assert ds.splits["train"].images.shape == (3, 3, 1, 8, 8) and ds.splits["train"].counts is None
    assert len(ds.mean) == 1 and ds.meta["presplit"]


def test_cache_in_folder_is_reused_and_follows_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_flat(tmp_path)
    first = load(tmp_path, image_size=8)
    first_sizes = [int(n) for v in first.splits.values() for n in v.counts]
    assert list((tmp_path / ".metarun-cache").glob("folder-*.pt"))
    real_decode = folder.decode_classes

    def fail(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(folder, "decode_classes", fail)
    second = load(tmp_path, image_size=8)  # the cache folder inside the dataset is not taken for a class
    assert second.splits["train"].class_names == first.splits["train"].class_names
    Image.new("RGB", (8, 8)).save(tmp_path / "class03" / "new.png")
    with pytest.raises(AssertionError, match="decoded again"):
        load(tmp_path, image_size=8)
    monkeypatch.setattr(folder, "decode_classes", real_decode)
    assert sum(int(v.counts.sum()) for v in load(tmp_path, image_size=8).splits.values()) == sum(first_sizes) + 1


def test_cache_in_root(tmp_path: Path) -> None:
    write_flat(tmp_path / "data")
    load(tmp_path / "data", image_size=8, root=str(tmp_path / "cache"))
    assert list((tmp_path / "cache" / ".metarun-cache").glob("folder-*.pt"))
    assert not (tmp_path / "data" / ".metarun-cache").exists()


def test_unwritable_cache_asks_for_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_flat(tmp_path)

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")  # what mkdir raises in a read-only dataset folder

    monkeypatch.setattr(folder, "cached_dataset", read_only)
    with pytest.raises(DataError, match=r"\.metarun-cache \(Permission denied\): set dataset.root to a writable folder"):
        load(tmp_path, image_size=8)


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    write_flat(tmp_path)
    (tmp_path / "class05" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    with pytest.raises(DataError, match=r"class05/broken\.jpg") as info:
        load(tmp_path, image_size=8)
    assert "\n" not in str(info.value)


def test_too_few_classes(tmp_path: Path) -> None:
    write_flat(tmp_path, classes=2)
    with pytest.raises(
        DataError, match=r"has 2 class folders, which .* splits into 1/0/1 train/val/test classes: every split needs at least one"
    ):
        load(tmp_path)


def test_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is not a folder"):
        load(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no class folders"):
        load(tmp_path / "empty")
    write_class(tmp_path / "partial" / "train" / "a", 1, 2)
    write_class(tmp_path / "partial" / "test" / "b", 1, 2)
    with pytest.raises(DataError, match="has train/, test/ but no val/"):
        load(tmp_path / "partial")
    write_flat(tmp_path / "hollow")
    (tmp_path / "hollow" / "zz_empty").mkdir()
    with pytest.raises(DataError, match="zz_empty holds no images"):
        load(tmp_path / "hollow")


def test_same_class_in_two_splits(tmp_path: Path) -> None:
    for split in ("train", "val", "test"):
        write_class(tmp_path / split / f"only_{split}", 1, 2)
    write_class(tmp_path / "test" / "only_train", 1, 2)
    with pytest.raises(DataError, match="class only_train is in both the train and the test split"):
        load(tmp_path)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"split_fractions": [0.5, 0.5]},
        {"split_fractions": [0.7, 0.2, 0.2]},
        {"split_fractions": [1.2, -0.1, -0.1]},
        {"channels": 4},
    ],
)
def test_bad_options(tmp_path: Path, kwargs: dict) -> None:
    write_flat(tmp_path)
    with pytest.raises(ConfigError):
        load(tmp_path, **kwargs)
