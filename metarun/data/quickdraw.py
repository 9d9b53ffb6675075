"""Quick, Draw! (Jongejan et al., 2016): 345 categories of 28x28 doodles, as in Meta-Dataset.

Each category is one ``<name>.npy`` of Google's ``numpy_bitmap`` release: a uint8
``[drawings, 784]`` array of 28x28 bitmaps, strokes bright on a dark background
(kept so, as for Omniglot). Categories are split as Meta-Dataset's
``quickdraw_splits.json``: 241 / 52 / 52
(:data:`metarun.data.metadataset_splits.QUICKDRAW`). A category holds 100k to
300k drawings, 50 M in all (37 GB): ``max_per_class`` (default 1000) keeps that
many of each, evenly spread over the file and read through a memory map, so
only they are read: uint8 ``[241, 1000, 1, 28, 28]`` for train, 270 MB in all
(``null``: every drawing). ``image_size`` other than 28 resizes with Lanczos
filtering; ``channels=3`` repeats the gray plane (to mix with colour datasets).

The files go in ``root``; missing ones are downloaded from Google's public
bucket when ``download`` is true (off by default: 37 GB; the bucket publishes
no checksums, so a download is checked against its announced length only).
``mean``/``std`` are those of the train split.
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from metarun.data.cache import cached_dataset, file_fingerprint
from metarun.data.download import ensure_file
from metarun.data.images import MODES, dataset_from_splits, evenly_spaced
from metarun.data.metadataset_splits import QUICKDRAW
from metarun.data.split import FewShotDataset, stack_classes
from metarun.errors import ConfigError, DataError
from metarun.progress import progress_bar

BASE_URL = "https://storage.googleapis.com/quickdraw_dataset/full/numpy_bitmap"
SIDE = 28
PREPROCESS_VERSION = 1  # bump when the decoded pixels change, so old caches are not reused


def url_of(name: str) -> str:
    return f"{BASE_URL}/{urllib.parse.quote(name)}.npy"


def load(
    root: str = "data/quickdraw",
    download: bool = False,
    image_size: int = 28,
    channels: int = 1,
    max_per_class: int | None = 1000,
) -> FewShotDataset:
    """Quick, Draw! bitmaps from ``root``, downloaded there when missing and ``download`` is true."""
    if channels not in MODES:
        raise ConfigError(f"dataset.channels={channels} must be 1 (grayscale) or 3 (RGB)")
    root_path = Path(root).expanduser()
    names = [n for split in QUICKDRAW.values() for n in split]
    missing = [n for n in names if not (root_path / f"{n}.npy").is_file()]
    if missing and not download:
        raise DataError(
            f"Quick, Draw! is not complete in {root_path} ({len(missing)} of {len(names)} files missing, e.g. {missing[0]}.npy): "
            f"put the numpy_bitmap files from {BASE_URL}/ there (or set dataset.download=true: 37 GB)"
        )
    files = {n: ensure_file(root_path / f"{n}.npy", url_of(n), None, download) for n in names}
    key = {
        "files": [file_fingerprint(f) for f in files.values()],
        "image_size": image_size,
        "channels": channels,
        "max_per_class": max_per_class,
        "version": PREPROCESS_VERSION,
    }

    def build() -> FewShotDataset:
        splits = {}
        for split, split_names in QUICKDRAW.items():
            with progress_bar(len(split_names), f"reading quickdraw {split}", transient=True) as advance:
                per_class = []
                for n in split_names:
                    per_class.append(_drawings(files[n], max_per_class, image_size, channels))
                    advance(1)
            splits[split] = stack_classes(per_class, list(split_names))
        return dataset_from_splits("quickdraw", splits)

    return cached_dataset(root_path, "quickdraw", key, build)


def _drawings(path: Path, limit: int | None, image_size: int, channels: int) -> torch.Tensor:
    """``limit`` drawings of one file as uint8 ``[n, channels, image_size, image_size]``."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is not a .npy array ({e}): delete it and download it again") from None
    if array.ndim != 2 or array.shape[1] != SIDE * SIDE or array.dtype not in (np.uint8, np.bool_) or not len(array):
        raise DataError(f"{path} holds a {array.dtype} {array.shape} array, not 28x28 bitmaps: delete it and download it again")
    rows = np.asarray(array[evenly_spaced(range(len(array)), limit)])
    images = (rows.astype(np.uint8) * 255 if rows.dtype == np.bool_ else rows).reshape(-1, SIDE, SIDE)
    if image_size != SIDE:
        images = np.stack(
            [np.asarray(Image.fromarray(i).resize((image_size, image_size), Image.Resampling.LANCZOS)) for i in images]
        )
    out = torch.from_numpy(np.ascontiguousarray(images))[:, None]
    return out.expand(-1, channels, -1, -1).contiguous()
