"""mini-ImageNet (Vinyals et al., 2016) with the split of Ravi & Larochelle (2017).

100 ImageNet classes of 600 images, 84x84 RGB: 64 train, 16 validation and 20
test classes, each split uint8 ``[classes, 600, 3, 84, 84]`` (1.27 GB in all).
The classes come from the files, so any subset in the same layout loads too.

ImageNet's licence forbids redistribution, so nothing is downloaded; ``root``
must hold one of the two layouts in which the split is passed around:

* ``images/`` with the images, and ``train.csv``, ``val.csv``, ``test.csv``
  (header ``filename,label``, ``filename`` relative to ``images/``), as made by
  Ravi & Larochelle's script. Images not already 84x84 are resized.
* ``mini-imagenet-cache-train.pkl``, ``mini-imagenet-cache-validation.pkl`` and
  ``mini-imagenet-cache-test.pkl``, pickled dicts of ``image_data`` (uint8
  ``[N, 84, 84, 3]``) and ``class_dict`` (label -> list of row indices). They
  hold decoded pixels, so they are preferred when both layouts are present.

Classes are sorted by label (the WordNet id). ``mean``/``std`` are those of the
train split's pixels in [0, 1].
"""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np

from metarun.data.cache import cached_dataset, file_fingerprint
from metarun.data.images import check_disjoint, dataset_from_splits, decode_classes, group_by_class, iter_rows
from metarun.data.split import FewShotDataset, Split
from metarun.errors import DataError

IMAGE_SIZE = 84
SPLITS = ("train", "val", "test")
CSV_FILES = {split: f"{split}.csv" for split in SPLITS}
PICKLE_FILES = {
    "train": "mini-imagenet-cache-train.pkl",
    "val": "mini-imagenet-cache-validation.pkl",
    "test": "mini-imagenet-cache-test.pkl",
}
IMAGES_DIR = "images"
PREPROCESS_VERSION = 1  # bump when the decoded pixels change, so old caches are not reused


def load(root: str = "data/miniimagenet") -> FewShotDataset:
    """mini-ImageNet from ``root`` in either layout of the module docstring."""
    root_path = Path(root).expanduser()
    pickles = [root_path / name for name in PICKLE_FILES.values()]
    csvs = [root_path / name for name in CSV_FILES.values()]
    if all(p.is_file() for p in pickles):
        key = {"layout": "pickle", "files": [file_fingerprint(p) for p in pickles], "version": PREPROCESS_VERSION}
        return cached_dataset(root_path, "miniimagenet", key, lambda: _from_pickles(root_path))
    if all(p.is_file() for p in csvs) and (root_path / IMAGES_DIR).is_dir():
        key = {"layout": "csv", "files": [file_fingerprint(p) for p in csvs], "version": PREPROCESS_VERSION}
        return cached_dataset(root_path, "miniimagenet", key, lambda: _from_csv(root_path))
    raise DataError(_missing_message(root_path))


def _missing_message(root: Path) -> str:
    """Name what is missing of the layout the user seems to have started on (the CSV one when neither)."""
    missing_pickles = [name for name in PICKLE_FILES.values() if not (root / name).is_file()]
    missing_csv = [name for name in CSV_FILES.values() if not (root / name).is_file()]
    if not (root / IMAGES_DIR).is_dir():
        missing_csv.insert(0, f"{IMAGES_DIR}/")
    missing = missing_pickles if len(missing_pickles) < len(PICKLE_FILES) else missing_csv
    return (
        f"mini-ImageNet is not in {root} (missing {', '.join(missing)}): put either {IMAGES_DIR}/ with "
        f"{', '.join(CSV_FILES.values())} (Ravi & Larochelle split, header filename,label) or {', '.join(PICKLE_FILES.values())} "
        "there; ImageNet's licence keeps metarun from downloading it"
    )


def _from_csv(root: Path) -> FewShotDataset:
    files: dict[str, dict[str, list[Path]]] = {}
    for split, name in CSV_FILES.items():
        files[split] = {}
        for filename, label in _read_csv(root / name):
            files[split].setdefault(label, []).append(root / IMAGES_DIR / filename)
    check_disjoint({split: list(by_class) for split, by_class in files.items()}, f"the CSV files in {root}")
    splits = {}
    for split, by_class in files.items():
        labels = sorted(by_class)
        splits[split] = decode_classes(
            [by_class[c] for c in labels], labels, IMAGE_SIZE, description=f"decoding mini-ImageNet {split}"
        )
    return dataset_from_splits("miniimagenet", splits, {"layout": "csv"})


def _read_csv(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["filename", "label"]:
            raise DataError(f"{path} must start with the header filename,label (Ravi & Larochelle's format)")
        rows = [(row[0], row[1]) for row in reader if row]
    if not rows:
        raise DataError(f"{path} lists no images: replace it with the split file")
    return rows


def _from_pickles(root: Path) -> FewShotDataset:
    splits = {split: _read_pickle(root / name) for split, name in PICKLE_FILES.items()}
    check_disjoint({split: s.class_names for split, s in splits.items()}, f"the pickles in {root}")
    return dataset_from_splits("miniimagenet", splits, {"layout": "pickle"})


def _read_pickle(path: Path) -> Split:
    try:
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="latin1")  # latin1 reads numpy arrays pickled by Python 2 as well
        images, class_dict = np.asarray(data["image_data"]), data["class_dict"]
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
        raise DataError(
            f"{path} is not a mini-ImageNet cache pickle with image_data and class_dict ({type(e).__name__}: {e})"
        ) from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise DataError(f"{path}: image_data must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    class_names = sorted(class_dict)
    labels = np.full(len(images), -1, dtype=np.int64)
    for position, name in enumerate(class_names):
        rows = np.asarray(class_dict[name], dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(images)):
            raise DataError(f"{path}: class {name} lists rows beyond the {len(images)} images in image_data")
        labels[rows] = position
    return group_by_class(iter_rows(images), labels, class_names, channels_last=True, source=str(path))
