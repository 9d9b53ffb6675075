"""Oxford 102 Flowers (Nilsback & Zisserman, 2008): 102 species, 8189 photos (40 to 258 a species), as in Meta-Dataset.

Classes are the labels 1-102 of ``imagelabels.mat``, named ``"%03d.%s"`` with
Meta-Dataset's species names and split as its ``vgg_flower_splits.json``: 71 /
15 / 16 (:data:`metarun.data.metadataset_splits.VGG_FLOWER`). Photo ``i`` is
``jpg/image_%05d.jpg`` of ``i + 1`` and has label ``labels[i]``. Photos are
resized as a whole to ``image_size`` (see :mod:`metarun.data.images`); a split
is padded to its largest species (``counts`` holds the real sizes): uint8
``[71, 258, 3, 84, 84]`` for train, 557 MB for all three splits.

``102flowers.tgz`` (330 MB) and ``imagelabels.mat`` are downloaded into ``root``
from the Oxford VGG site when missing and ``download`` is true, md5-checked, and
the archive unpacked there (``root/jpg/``); ``imagelabels.mat`` is read without
SciPy (:mod:`metarun.data.matfile`). ``max_per_class`` keeps that many photos
of a species, evenly spread over their numbers. ``mean``/``std`` are those of
the train split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from metarun.data.cache import cached_dataset, file_fingerprint
from metarun.data.extract import fetch_unpacked
from metarun.data.images import dataset_from_splits, decode_classes, evenly_spaced
from metarun.data.matfile import read_array
from metarun.data.metadataset_splits import FLOWER_NAMES, VGG_FLOWER
from metarun.data.split import FewShotDataset
from metarun.errors import DataError

BASE_URL = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102"
ARCHIVES = (
    ("102flowers.tgz", f"{BASE_URL}/102flowers.tgz", "52808999861908f626f3c1f4e79d11fa"),
    ("imagelabels.mat", f"{BASE_URL}/imagelabels.mat", "e0620be6f572b9609742df49c70aed4d"),
)
LABELS = "imagelabels.mat"
PREPROCESS_VERSION = 1  # bump when the decoded pixels change, so old caches are not reused


def class_name(label: int) -> str:
    """Meta-Dataset's name of the species with label ``label`` (1-102)."""
    return f"{label:03d}.{FLOWER_NAMES[label - 1]}"


def find(root: Path) -> Path | None:
    return root if (root / "jpg").is_dir() and (root / LABELS).is_file() else None


def load(
    root: str = "data/vgg_flower",
    download: bool = True,
    image_size: int = 84,
    channels: int = 3,
    max_per_class: int | None = None,
) -> FewShotDataset:
    """Oxford 102 Flowers from ``root``, downloaded there when missing and ``download`` is true."""
    root_path = Path(root).expanduser()
    base = fetch_unpacked(root_path, find, ARCHIVES, download, "Oxford 102 Flowers")
    key = {
        "labels": file_fingerprint(base / LABELS),
        "image_size": image_size,
        "channels": channels,
        "max_per_class": max_per_class,
        "version": PREPROCESS_VERSION,
    }
    return cached_dataset(root_path, "vgg_flower", key, lambda: _build(base, image_size, channels, max_per_class))


def _build(base: Path, image_size: int, channels: int, max_per_class: int | None) -> FewShotDataset:
    labels = read_array(base / LABELS, "labels").reshape(-1)
    if labels.size == 0 or not np.array_equal(labels, labels.round()) or labels.min() < 1 or labels.max() > len(FLOWER_NAMES):
        raise DataError(f"{base / LABELS} does not hold labels 1-{len(FLOWER_NAMES)}: replace it with the official file")
    labels = labels.astype(np.int64)
    splits = {}
    for split, species in VGG_FLOWER.items():
        files = []
        for label in species:
            numbers = (np.flatnonzero(labels == label) + 1).tolist()
            if not numbers:
                raise DataError(f"{base / LABELS} gives no photo label {label}: replace it with the official file")
            files.append([base / "jpg" / f"image_{n:05d}.jpg" for n in evenly_spaced(numbers, max_per_class)])
        names = [class_name(label) for label in species]
        splits[split] = decode_classes(files, names, image_size, channels, f"decoding flowers {split}")
    return dataset_from_splits("vgg_flower", splits)
