"""tieredImageNet (Ren et al., 2018): 608 ImageNet classes under 34 broad categories.

The split is by broad category (20/6/8), so test classes are semantically far
from training ones: 351 train, 97 validation and 160 test classes, 84x84 RGB,
732 to 1300 images per class (``counts`` records the true sizes).

Nothing is downloaded (ImageNet's licence forbids redistribution). ``root``
holds, for each split ``train``, ``val`` and ``test``:

* ``<split>_images.npz`` with the array ``images`` (uint8 ``[N, 84, 84, 3]``),
  or that array already extracted as ``<split>_images.npy``, which is preferred;
* ``<split>_labels.pkl``, a pickled dict with ``label_specific`` (``[N]``, the
  class of each image), ``label_specific_str`` (class names, indexed by
  ``label_specific``) and ``label_general``.

Classes are those present in the labels, sorted by ``label_specific``.

Memory, as uint8 with classes padded to 1300 images: train 351 x 1300 x 21168
B = 9.7 GB, validation 2.7 GB, test 4.4 GB, 16.7 GB in all, which is what a
run holds in CPU memory once the dataset is loaded (and what the cache in
``root/.metarun-cache`` takes on disk). Building it needs little more: the
image array is streamed from the ``.npy`` or from inside the ``.npz``
(compressed or not) in chunks of ``ROW_CHUNK_BYTES`` and each chunk is
scattered straight into the preallocated ``[classes, 1300, 3, 84, 84]``
tensor, so the 9.5 GB source array is never in memory next to it. A
memory-mapped array gathered class by class would save the same memory but
read the file in random order; one sequential pass is faster on any disk and
works for compressed archives too. ``mean``/``std`` are counted from the train
split with histograms, again without a float copy.
"""

from __future__ import annotations

import pickle
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import BinaryIO

import numpy as np

from metarun.data.cache import cached_dataset, file_fingerprint
from metarun.data.images import ROW_CHUNK_BYTES, check_disjoint, dataset_from_splits, group_by_class
from metarun.data.split import FewShotDataset, Split
from metarun.errors import DataError

SPLITS = ("train", "val", "test")
NPZ_MEMBER = "images.npy"
PREPROCESS_VERSION = 1  # bump when the loaded pixels change, so old caches are not reused


def load(root: str = "data/tieredimagenet") -> FewShotDataset:
    """tieredImageNet from the arrays and label pickles in ``root`` (see the module docstring)."""
    root_path = Path(root).expanduser()
    images = {split: _images_file(root_path, split) for split in SPLITS}
    labels = {split: root_path / f"{split}_labels.pkl" for split in SPLITS}
    missing = [f"{split}_images.npz" for split, path in images.items() if path is None]
    missing += [path.name for path in labels.values() if not path.is_file()]
    if missing:
        raise DataError(
            f"tieredImageNet is not in {root_path} (missing {', '.join(missing)}): put {{train,val,test}}_images.npz "
            "(or the extracted .npy) and {train,val,test}_labels.pkl there; ImageNet's licence keeps metarun from downloading it"
        )
    sources = {split: (images[split], labels[split]) for split in SPLITS}
    key = {"files": [file_fingerprint(p) for pair in sources.values() for p in pair], "version": PREPROCESS_VERSION}
    return cached_dataset(root_path, "tieredimagenet", key, lambda: _build(root_path, sources))


def _images_file(root: Path, split: str) -> Path | None:
    for path in (root / f"{split}_images.npy", root / f"{split}_images.npz"):
        if path.is_file():
            return path
    return None


def _build(root: Path, sources: dict[str, tuple[Path, Path]]) -> FewShotDataset:
    labels = {split: _read_labels(label_path) for split, (_, label_path) in sources.items()}
    check_disjoint({split: names for split, (_, names) in labels.items()}, f"tieredImageNet in {root}")
    splits = {split: _read_split(images_path, *labels[split]) for split, (images_path, _) in sources.items()}
    return dataset_from_splits("tieredimagenet", splits, {"images": [p.name for p, _ in sources.values()]})


def _read_labels(path: Path) -> tuple[np.ndarray, list[str]]:
    """Each image's class position, and the class names in that order."""
    try:
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="latin1")  # the original release was pickled by Python 2
        specific = np.asarray(data["label_specific"], dtype=np.int64)
        names = data.get("label_specific_str")
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{path} is not a tieredImageNet label pickle with label_specific ({type(e).__name__}: {e})") from None
    present, positions = np.unique(specific, return_inverse=True)
    if names is None:
        class_names = [str(v) for v in present]
    elif present.min() < 0 or present.max() >= len(names):
        raise DataError(f"{path}: label_specific goes beyond the {len(names)} names in label_specific_str")
    else:
        class_names = [str(names[v]) for v in present]
    return positions.reshape(-1), class_names


def _read_split(path: Path, labels: np.ndarray, class_names: list[str]) -> Split:
    try:
        with ExitStack() as stack:
            if path.suffix == ".npy":
                stream = stack.enter_context(open(path, "rb"))
            else:  # the member is read in place, decompressing as it goes when the npz is compressed
                stream = stack.enter_context(stack.enter_context(zipfile.ZipFile(path)).open(NPZ_MEMBER))
            return group_by_class(_npy_chunks(stream, path), labels, class_names, channels_last=True, source=str(path))
    except (zipfile.BadZipFile, zlib.error, KeyError, EOFError) as e:
        raise DataError(
            f"{path} is not a complete npz holding the array images ({e}): replace it with the complete file"
        ) from None


def _npy_chunks(f: BinaryIO, path: Path) -> Iterator[np.ndarray]:
    """Consecutive row chunks of a uint8 ``[N, H, W, 3]`` array in npy format."""
    try:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(f)
    except ValueError as e:
        raise DataError(f"{path} does not hold an npy array ({e}): replace it with the complete file") from None
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or fortran_order:
        raise DataError(f"{path}: images must be a C-ordered uint8 [N, H, W, 3] array, got {dtype} {shape}")
    row_bytes = shape[1] * shape[2] * shape[3]
    step = max(1, ROW_CHUNK_BYTES // row_bytes)
    for start in range(0, shape[0], step):
        n = min(step, shape[0] - start)
        data = f.read(n * row_bytes)
        if len(data) != n * row_bytes:
            raise DataError(
                f"{path} ends after {start + len(data) // row_bytes} of its {shape[0]} images: replace it with the complete file"
            )
        yield np.frombuffer(data, dtype=np.uint8).reshape(n, *shape[1:])
