"""CIFAR-FS and FC100: two few-shot splits of CIFAR-100's 100 fine classes.

Both use all 600 images of a class (CIFAR-100's 500 train and 100 test images
together), 32x32 RGB, each split uint8 ``[classes, 600, 3, 32, 32]`` (184 MB
in all). They differ in how classes are split:

* CIFAR-FS (Bertinetto et al., 2019): 64 / 16 / 20 fine classes picked at
  random, so test classes have close relatives in training (``CIFARFS_CLASSES``,
  the lists of the authors' ``data/cifar100/splits/bertinetto/*.txt``).
* FC100 (Oreshkin et al., 2018): split by CIFAR-100's 20 super-classes, 12 / 4
  / 4, i.e. 60 / 20 / 20 fine classes, so test classes are semantically far
  from training ones and the benchmark is harder (``FC100_SUPERCLASSES``, as
  in the authors' TADAM code and the FC100 files derived from it).

Both read the official python archive ``cifar-100-python.tar.gz`` in ``root``
(downloaded there when missing and ``download`` is true; the two datasets share
it). Classes are in CIFAR-100's fine label order (alphabetical); images keep
the archive's order, train batch first. ``mean``/``std`` are those of the train
split's pixels in [0, 1].
"""

from __future__ import annotations

import pickle
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np

from metarun.data.cache import cached_dataset, file_fingerprint
from metarun.data.download import ensure_file
from metarun.data.images import dataset_from_splits, group_by_class, iter_rows
from metarun.data.split import FewShotDataset
from metarun.errors import DataError

URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
ARCHIVE = "cifar-100-python.tar.gz"
MEMBERS = ("cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta")
PREPROCESS_VERSION = 1  # bump when the loaded pixels change, so old caches are not reused

CIFARFS_CLASSES: dict[str, tuple[str, ...]] = {
    "train": (
        "apple", "aquarium_fish", "bear", "bee", "bottle", "bowl", "boy", "bridge", "bus", "can", "castle", "caterpillar",
        "chair", "clock", "cloud", "cockroach", "couch", "cup", "dinosaur", "dolphin", "elephant", "forest", "girl", "hamster",
        "house", "kangaroo", "keyboard", "lawn_mower", "lion", "lizard", "lobster", "mountain", "mouse", "mushroom", "oak_tree",
        "orange", "orchid", "palm_tree", "pear", "pine_tree", "plate", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
        "seal", "shrew", "skunk", "skyscraper", "snake", "spider", "squirrel", "streetcar", "sunflower", "tank", "tiger", "train",
        "trout", "tulip", "turtle", "willow_tree", "wolf",
    ),
    "val": (
        "beaver", "beetle", "butterfly", "camel", "cattle", "crab", "crocodile", "flatfish", "lamp", "maple_tree", "motorcycle",
        "otter", "sea", "shark", "television", "tractor",
    ),
    "test": (
        "baby", "bed", "bicycle", "chimpanzee", "fox", "leopard", "man", "pickup_truck", "plain", "poppy", "rocket", "rose",
        "snail", "sweet_pepper", "table", "telephone", "wardrobe", "whale", "woman", "worm",
    ),
}  # fmt: skip

FC100_SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "train": (
        "fish", "flowers", "food_containers", "fruit_and_vegetables", "household_electrical_devices", "household_furniture",
        "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "reptiles", "trees", "vehicles_1", "vehicles_2",
    ),
    "val": ("large_carnivores", "large_omnivores_and_herbivores", "non-insect_invertebrates", "small_mammals"),
    "test": ("aquatic_mammals", "insects", "medium_mammals", "people"),
}  # fmt: skip


@dataclass
class Cifar100:
    """The archive's two batches, kept apart so that the 60000 images are never concatenated."""

    batches: list[np.ndarray]  # uint8 [n, 3, 32, 32]: train, test
    fine: np.ndarray  # [60000], over both batches in order
    coarse: np.ndarray
    fine_names: list[str]
    coarse_names: list[str]

    def rows(self) -> Iterator[np.ndarray]:
        return chain.from_iterable(iter_rows(b) for b in self.batches)


def load_cifarfs(root: str = "data/cifar100", download: bool = True) -> FewShotDataset:
    """CIFAR-FS (Bertinetto et al., 2019) from the CIFAR-100 archive in ``root``."""
    return _load("cifarfs", root, download, _cifarfs_classes)


def load_fc100(root: str = "data/cifar100", download: bool = True) -> FewShotDataset:
    """FC100 (Oreshkin et al., 2018) from the CIFAR-100 archive in ``root``."""
    return _load("fc100", root, download, _fc100_classes)


def _load(name: str, root: str, download: bool, classes: Callable[[Cifar100, Path], dict[str, list[int]]]) -> FewShotDataset:
    root_path = Path(root).expanduser()
    archive = ensure_file(root_path / ARCHIVE, URL, MD5, download)

    def build() -> FewShotDataset:
        data = read_archive(archive)
        splits = {}
        for split, fine_ids in classes(data, archive).items():
            positions = np.full(len(data.fine_names), -1, dtype=np.int64)
            positions[fine_ids] = np.arange(len(fine_ids))
            names = [data.fine_names[i] for i in fine_ids]
            splits[split] = group_by_class(data.rows(), positions[data.fine], names, channels_last=False, source=str(archive))
        return dataset_from_splits(name, splits)

    key = {"archive": file_fingerprint(archive), "version": PREPROCESS_VERSION}
    return cached_dataset(root_path, name, key, build)


def _cifarfs_classes(data: Cifar100, archive: Path) -> dict[str, list[int]]:
    index = {n: i for i, n in enumerate(data.fine_names)}
    unknown = [n for names in CIFARFS_CLASSES.values() for n in names if n not in index]
    if unknown:
        raise DataError(f"{archive} has no fine class {unknown[0]}: it is not CIFAR-100, replace it with the official archive")
    return {split: sorted(index[n] for n in names) for split, names in CIFARFS_CLASSES.items()}


def _fc100_classes(data: Cifar100, archive: Path) -> dict[str, list[int]]:
    index = {n: i for i, n in enumerate(data.coarse_names)}
    unknown = [n for names in FC100_SUPERCLASSES.values() for n in names if n not in index]
    if unknown:
        raise DataError(f"{archive} has no super-class {unknown[0]}: it is not CIFAR-100, replace it with the official archive")
    return {
        split: np.unique(data.fine[np.isin(data.coarse, [index[n] for n in names])]).tolist()
        for split, names in FC100_SUPERCLASSES.items()
    }


def read_archive(path: Path) -> Cifar100:
    """The batches and label names, read in one pass over the gzipped tar without unpacking it."""
    found: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                if member.name in MEMBERS:
                    found[member.name] = pickle.load(tar.extractfile(member), encoding="latin1")  # type: ignore[arg-type]
        train, test, meta = (found[m] for m in MEMBERS)
        batches = [np.asarray(b["data"], dtype=np.uint8).reshape(-1, 3, 32, 32) for b in (train, test)]
        fine = np.concatenate([train["fine_labels"], test["fine_labels"]]).astype(np.int64)
        coarse = np.concatenate([train["coarse_labels"], test["coarse_labels"]]).astype(np.int64)
        fine_names, coarse_names = list(meta["fine_label_names"]), list(meta["coarse_label_names"])
    except (tarfile.TarError, zlib.error, EOFError, OSError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as e:
        raise DataError(
            f"{path} is not the CIFAR-100 python archive ({type(e).__name__}: {e}): delete it and download it again"
        ) from None
    if len(fine) != sum(len(b) for b in batches) or len(coarse) != len(fine):
        raise DataError(
            f"{path} has {len(fine)} labels for {sum(len(b) for b in batches)} images: delete it and download it again"
        )
    return Cifar100(batches, fine, coarse, fine_names, coarse_names)
