"""CIFAR-FS and FC100 from a tiny CIFAR-100-style archive served on 127.0.0.1, and the published split lists."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from metarun.data import cifar
from metarun.errors import DataError
from metarun.factory import build_dataset
from tests.conftest import dataset_config
from tests.helpers.http_server import LocalHTTPServer

# CIFAR-100's real hierarchy: super-class -> its five fine classes.
HIERARCHY = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
FINE = sorted(f for fines in HIERARCHY.values() for f in fines)
COARSE = sorted(HIERARCHY)
COARSE_OF = {f: COARSE.index(c) for c, fines in HIERARCHY.items() for f in fines}
TRAIN_PER_CLASS, TEST_PER_CLASS = 2, 1


def batch(first: int, per_class: int) -> dict:
    """Images whose red plane is the fine label and green plane the index within the class (test images after train)."""
    rows, fine, coarse = [], [], []
    for index in range(per_class):
        for label, name in enumerate(FINE):
            image = np.zeros((3, 32, 32), dtype=np.uint8)
            image[0], image[1], image[2] = label, first + index, 200
            rows.append(image.reshape(-1))
            fine.append(label)
            coarse.append(COARSE_OF[name])
    return {"data": np.stack(rows), "fine_labels": fine, "coarse_labels": coarse, "filenames": ["x.png"] * len(rows)}


def archive_bytes() -> bytes:
    members = {
        "train": batch(0, TRAIN_PER_CLASS),
        "test": batch(TRAIN_PER_CLASS, TEST_PER_CLASS),
        "meta": {"fine_label_names": FINE, "coarse_label_names": COARSE},
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in members.items():
            data = pickle.dumps(content, protocol=2)
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def archive() -> bytes:
    return archive_bytes()


@pytest.fixture
def server(archive: bytes, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalHTTPServer]:
    with LocalHTTPServer(files={"/cifar-100-python.tar.gz": archive}) as running:
        monkeypatch.setattr(cifar, "URL", f"{running.url}/cifar-100-python.tar.gz")
        monkeypatch.setattr(cifar, "MD5", hashlib.md5(archive).hexdigest())
        yield running


def test_published_cifarfs_split_lists() -> None:
    sizes = {split: len(names) for split, names in cifar.CIFARFS_CLASSES.items()}
    assert sizes == {"train": 64, "val": 16, "test": 20}
    every = [n for names in cifar.CIFARFS_CLASSES.values() for n in names]
    assert sorted(every) == FINE  # disjoint and covering all 100 classes
    assert cifar.CIFARFS_CLASSES["test"] == (
        "baby", "bed", "bicycle", "chimpanzee", "fox", "leopard", "man", "pickup_truck", "plain", "poppy",
        "rocket", "rose", "snail", "sweet_pepper", "table", "telephone", "wardrobe", "whale", "woman", "worm",
    )  # fmt: skip


def test_published_fc100_split_lists() -> None:
    supers = cifar.FC100_SUPERCLASSES
    assert {split: len(names) for split, names in supers.items()} == {"train": 12, "val": 4, "test": 4}
    assert sorted(n for names in supers.values() for n in names) == COARSE
    # Oreshkin et al.'s super-class indices
    assert [COARSE.index(n) for n in supers["test"]] == [0, 7, 12, 14]
    assert [COARSE.index(n) for n in supers["val"]] == [8, 11, 13, 16]


def check_images(ds) -> None:
    for split in ds.splits.values():
        assert split.images.shape[1:] == (TRAIN_PER_CLASS + TEST_PER_CLASS, 3, 32, 32)
        assert split.counts is None
        for c, name in enumerate(split.class_names):
            assert split.images[c, :, 0].unique().tolist() == [FINE.index(name)]
            assert split.images[c, :, 1, 5, 5].tolist() == [0, 1, 2]  # train images then test images
            assert split.images[c, :, 2].unique().tolist() == [200]


def test_cifarfs_downloads_and_uses_the_published_split(server: LocalHTTPServer, tmp_path: Path) -> None:
    ds = build_dataset(dataset_config("cifarfs", root=str(tmp_path)))
    assert (tmp_path / "cifar-100-python.tar.gz").is_file()
    assert {s: v.num_classes for s, v in ds.splits.items()} == {"train": 64, "val": 16, "test": 20}
    for split, names in cifar.CIFARFS_CLASSES.items():
        assert tuple(ds.splits[split].class_names) == names
    check_images(ds)
    assert len(ds.mean) == 3 and ds.mean[2] == pytest.approx(200 / 255) and ds.std[2] == 0  # train split's statistics


def test_fc100_splits_by_superclass_and_shares_the_archive(server: LocalHTTPServer, tmp_path: Path) -> None:
    cifar.load_cifarfs(root=str(tmp_path))
    ds = build_dataset(dataset_config("fc100", root=str(tmp_path)))
    assert len(server.requests) == 1
    assert {s: v.num_classes for s, v in ds.splits.items()} == {"train": 60, "val": 20, "test": 20}
    for split, supers in cifar.FC100_SUPERCLASSES.items():
        assert ds.splits[split].class_names == sorted(f for s in supers for f in HIERARCHY[s])
    check_images(ds)


def test_cache_is_reused(server: LocalHTTPServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = cifar.load_fc100(root=str(tmp_path))

    def fail(*args, **kwargs):
        raise AssertionError("read the archive again instead of the cache")

    monkeypatch.setattr(cifar, "read_archive", fail)
    second = cifar.load_fc100(root=str(tmp_path))
    assert (second.splits["test"].images == first.splits["test"].images).all()
    assert len(server.requests) == 1


def test_missing_archive_without_download(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"cifar-100-python\.tar\.gz missing: put cifar-100-python\.tar\.gz in .*download=true"):
        cifar.load_cifarfs(root=str(tmp_path), download=False)


def test_archive_of_another_dataset_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        data = b"hello"
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(buffer.getvalue())
    monkeypatch.setattr(cifar, "MD5", None)
    with pytest.raises(DataError, match="is not the CIFAR-100 python archive"):
        cifar.load_cifarfs(root=str(tmp_path), download=False)
