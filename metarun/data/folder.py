"""Your own images, one folder per class, as a few-shot dataset.

Two layouts, told apart by the folder names right under ``path``:

* ``path/train/<class>/*``, ``path/val/<class>/*`` and ``path/test/<class>/*``:
  the split is yours (``split_fractions`` and ``seed`` play no part);
* ``path/<class>/*``: classes (never single images) are split at random into
  train / val / test by ``split_fractions``, with ``seed`` (the permutation of
  :func:`metarun.data.split.split_by_class`), so the same folder and seed
  always give the same split.

Images may sit in sub-folders of their class folder; every file whose suffix
is a format Pillow decodes (JPEG, PNG, BMP, GIF, TIFF, WebP, ...) is used and
anything else (and anything hidden) is skipped. Each image is turned upright
by its EXIF orientation, converted to RGB (``channels=3``) or grayscale
(``channels=1``) and resized as a whole to ``image_size x image_size`` (see
:mod:`metarun.data.images` for why it is not cropped). Classes may hold
different numbers of images (``counts``). Memory as uint8 is about
``classes x largest class x channels x image_size^2`` bytes.

The decoded dataset is cached in ``root/.metarun-cache`` (``root`` defaults to
``path`` itself), keyed by every image's path, size and modification time, so
adding, removing or editing an image rebuilds it. ``mean``/``std`` are those of
the train split's pixels in [0, 1].
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from metarun.data.cache import cached_dataset
from metarun.data.images import MODES, check_disjoint, dataset_from_splits, decode_classes, image_extensions
from metarun.data.split import FewShotDataset, Split, split_by_class
from metarun.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")
PREPROCESS_VERSION = 1  # bump when the decoded pixels change, so old caches are not reused


def load(
    path: str,
    image_size: int = 84,
    channels: int = 3,
    split_fractions: Sequence[float] = (0.64, 0.16, 0.2),
    seed: int = 0,
    root: str | None = None,
) -> FewShotDataset:
    """The images under ``path`` in either layout of the module docstring."""
    base = Path(path).expanduser()
    fractions = tuple(float(f) for f in split_fractions)
    if channels not in MODES:
        raise ConfigError(f"dataset.channels={channels} must be 1 (grayscale) or 3 (RGB)")
    if image_size < 1:
        raise ConfigError(f"dataset.image_size={image_size} must be positive")
    if len(fractions) != 3 or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ConfigError(
            f"dataset.split_fractions={list(fractions)} must be three non-negative numbers (train, val, test) summing to 1"
        )
    if not base.is_dir():
        raise DataError(f"{base} is not a folder: set dataset.path to a folder holding one sub-folder of images per class")
    present = [s for s in SPLITS if (base / s).is_dir()]
    if present and len(present) < len(SPLITS):
        absent = ", ".join(f"{s}/" for s in SPLITS if s not in present)
        raise DataError(
            f"{base} has {', '.join(f'{s}/' for s in present)} but no {absent}: use {base}/{{train,val,test}}/<class>/ or {base}/<class>/"
        )
    if present:
        files = {s: _scan(base / s) for s in SPLITS}
        check_disjoint({s: list(by_class) for s, by_class in files.items()}, str(base))
    else:
        files = {"all": _scan(base)}
        _check_enough_classes(base, len(files["all"]), fractions)
    key = {
        "images": {s: [_fingerprint(p, base) for paths in by_class.values() for p in paths] for s, by_class in files.items()},
        "image_size": image_size,
        "channels": channels,
        "split": None if present else {"fractions": fractions, "seed": seed},
        "version": PREPROCESS_VERSION,
    }
    cache_root = base if root is None else Path(root).expanduser()

    def build() -> FewShotDataset:
        decoded = {s: _decode(by_class, image_size, channels, s) for s, by_class in files.items()}
        if present:
            splits = decoded
        else:
            everything = decoded["all"]
            splits = split_by_class(everything.images, everything.class_names, fractions, seed, everything.counts)
        return dataset_from_splits("folder", splits, {"path": str(base), "presplit": bool(present)})

    try:
        return cached_dataset(cache_root, "folder", key, build)
    except OSError as e:
        raise DataError(
            f"cannot write the dataset cache in {cache_root / '.metarun-cache'} ({e.strerror or e}): set dataset.root to a writable folder"
        ) from None


def _scan(directory: Path) -> dict[str, list[Path]]:
    """Class name -> sorted image files of each visible sub-folder, walked recursively."""
    extensions = image_extensions()
    classes = sorted(d for d in directory.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{directory} has no class folders: put the images of each class in {directory}/<class>/")
    files = {}
    for class_dir in classes:
        found = []
        for parent, dirs, names in os.walk(class_dir, followlinks=True):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found += [Path(parent) / n for n in names if not n.startswith(".") and Path(n).suffix.lower() in extensions]
        if not found:
            raise DataError(f"class folder {class_dir} holds no images (e.g. .jpg, .png): add some or remove the folder")
        files[class_dir.name] = sorted(found)
    return files


def _check_enough_classes(base: Path, n: int, fractions: tuple[float, float, float]) -> None:
    """Fail before decoding anything when a split would be empty, with the numbers that show why."""
    n_train, n_val = round(fractions[0] * n), round(fractions[1] * n)
    sizes = (n_train, n_val, n - n_train - n_val)
    if min(sizes) < 1:
        raise DataError(
            f"{base} has {n} class folders, which dataset.split_fractions={list(fractions)} splits into {'/'.join(map(str, sizes))} "
            "train/val/test classes: every split needs at least one class (and as many as an episode has ways); add classes or change the fractions"
        )


def _fingerprint(path: Path, base: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (path.relative_to(base).as_posix(), st.st_size, st.st_mtime_ns)


def _decode(by_class: dict[str, list[Path]], image_size: int, channels: int, split: str) -> Split:
    names = list(by_class)
    return decode_classes([by_class[n] for n in names], names, image_size, channels, description=f"decoding {split} images")
