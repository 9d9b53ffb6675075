"""The Describable Textures Dataset (Cimpoi et al., 2014): 47 texture words x 120 photos, as in Meta-Dataset.

Classes are the folders of ``dtd/images/`` (``banded``, ``zigzagged`` ...),
split as Meta-Dataset's ``dtd_splits.json``: 33 / 7 / 7
(:data:`metarun.data.metadataset_splits.DTD`). Every image of a folder is used
(non-image files such as the stray ``waffled/.directory`` are skipped),
resized as a whole to ``image_size`` (see :mod:`metarun.data.images`): uint8
``[33, 120, 3, 84, 84]`` for train, 119 MB in all.

``dtd-r1.0.1.tar.gz`` (625 MB) is downloaded into ``root`` from the Oxford VGG
site when missing and ``download`` is true, md5-checked and unpacked there; a
copy unpacked by hand (``root/dtd/images/``) is used as it is.
``max_per_class`` keeps that many images of a class, evenly spread over its
sorted file names. ``mean``/``std`` are those of the train split.
"""

from __future__ import annotations

from pathlib import Path

from metarun.data.cache import cached_dataset, file_fingerprint
from metarun.data.extract import fetch_unpacked
from metarun.data.images import dataset_from_splits, decode_classes, evenly_spaced, image_extensions
from metarun.data.metadataset_splits import DTD
from metarun.data.split import FewShotDataset
from metarun.errors import DataError

URL = "https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz"
MD5 = "fff73e5086ae6bdbea199a49dfb8a4c1"
ARCHIVE = "dtd-r1.0.1.tar.gz"
PREPROCESS_VERSION = 1  # bump when the decoded pixels change, so old caches are not reused


def find(root: Path) -> Path | None:
    """The folder of class folders: ``root/dtd/images`` (or ``root/images``)."""
    return next((d for d in (root / "dtd" / "images", root / "images") if d.is_dir()), None)


def load(
    root: str = "data/dtd", download: bool = True, image_size: int = 84, channels: int = 3, max_per_class: int | None = None
) -> FewShotDataset:
    """DTD from ``root``, downloaded there when missing and ``download`` is true."""
    root_path = Path(root).expanduser()
    images = fetch_unpacked(root_path, find, [(ARCHIVE, URL, MD5)], download, "DTD")
    extensions = image_extensions()
    files: dict[str, list[Path]] = {}
    for name in (n for names in DTD.values() for n in names):
        folder = images / name
        if not folder.is_dir():
            raise DataError(f"{images} has no folder {name}: unpack the complete {ARCHIVE} in {root_path}")
        found = sorted(f for f in folder.iterdir() if f.suffix.lower() in extensions and not f.name.startswith("."))
        if not found:
            raise DataError(f"{folder} holds no image: unpack the complete {ARCHIVE} in {root_path}")
        files[name] = evenly_spaced(found, max_per_class)
    key = {
        "files": [file_fingerprint(f) | {"class": n} for n, fs in files.items() for f in fs],
        "image_size": image_size,
        "channels": channels,
        "version": PREPROCESS_VERSION,
    }

    def build() -> FewShotDataset:
        splits = {
            split: decode_classes([files[n] for n in names], list(names), image_size, channels, f"decoding DTD {split}")
            for split, names in DTD.items()
        }
        return dataset_from_splits("dtd", splits)

    return cached_dataset(root_path, "dtd", key, build)
