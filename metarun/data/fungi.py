"""FGVCx Fungi 2018 (Danish Svampe Atlas): 1394 species, 89760 photos of the competition's train and val sets.

As in Meta-Dataset, the competition's train and validation sets are pooled
(its test set is unlabelled), classes are its categories named ``"%04d.%s"`` of
id and name (some names repeat, the ids do not), and they are split as
Meta-Dataset's ``fungi_splits.json``: 994 / 200 / 200 species
(:data:`metarun.data.metadataset_splits.FUNGI`). Photos are resized as a whole
to ``image_size`` (see :mod:`metarun.data.images`); a split is padded to its
largest species, so memory is about ``classes x largest class x 21 KB`` at 84
pixels: ``max_per_class`` keeps at most that many photos of a species, evenly
spread over their order in the annotation files.

The data are ``root/train.json``, ``root/val.json`` (COCO-style ``images``,
``annotations`` and ``categories``) and ``root/images/<category>/<photo>.JPG``:
``fungi_train_val.tgz`` (13 GB) and ``train_val_annotations.tgz`` from the
competition's page, unpacked in ``root``. Downloaded there, md5-checked and
unpacked when missing and ``download`` is true (off by default: 13 GB).
``mean``/``std`` are those of the train split.
"""

from __future__ import annotations

import json
from pathlib import Path

from metarun.data.cache import cached_dataset, file_fingerprint
from metarun.data.extract import fetch_unpacked
from metarun.data.images import dataset_from_splits, decode_classes, evenly_spaced
from metarun.data.metadataset_splits import FUNGI, FUNGI_CATEGORIES
from metarun.data.split import FewShotDataset
from metarun.errors import DataError

BASE_URL = "https://labs.gbif.org/fgvcx/2018"
ARCHIVES = (
    ("fungi_train_val.tgz", f"{BASE_URL}/fungi_train_val.tgz", "df2b2980835668ed1d9a0e286e4bdadd"),
    ("train_val_annotations.tgz", f"{BASE_URL}/train_val_annotations.tgz", "c3c0f1b8a8d0b60619c43d9c89bdbc7e"),
)
ANNOTATIONS = ("train.json", "val.json")
PREPROCESS_VERSION = 1  # bump when the decoded pixels change, so old caches are not reused


def find(root: Path) -> Path | None:
    for base in (root / "fungi", root):
        if all((base / name).is_file() for name in ANNOTATIONS) and (base / "images").is_dir():
            return base
    return None


def load(
    root: str = "data/fungi", download: bool = False, image_size: int = 84, channels: int = 3, max_per_class: int | None = None
) -> FewShotDataset:
    """FGVCx Fungi from ``root``, downloaded there when missing and ``download`` is true."""
    root_path = Path(root).expanduser()
    base = fetch_unpacked(root_path, find, ARCHIVES, download, "FGVCx Fungi")
    key = {
        "files": [file_fingerprint(base / name) for name in ANNOTATIONS],
        "image_size": image_size,
        "channels": channels,
        "max_per_class": max_per_class,
        "version": PREPROCESS_VERSION,
    }
    return cached_dataset(root_path, "fungi", key, lambda: _build(base, image_size, channels, max_per_class))


def _build(base: Path, image_size: int, channels: int, max_per_class: int | None) -> FewShotDataset:
    names: dict[int, str] = {}
    photos: dict[int, list[Path]] = {}
    for annotation_file in ANNOTATIONS:
        path = base / annotation_file
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
            names |= {int(c["id"]): str(c["name"]) for c in index["categories"]}
            file_of = {i["id"]: i["file_name"] for i in index["images"]}
            for a in index["annotations"]:
                photos.setdefault(int(a["category_id"]), []).append(base / file_of[a["image_id"]])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(
                f"{path} is not FGVCx Fungi's annotation file ({type(e).__name__}: {e}): replace it with the official one"
            ) from None
    if sorted(names) != list(range(FUNGI_CATEGORIES)):
        raise DataError(
            f"{base / ANNOTATIONS[0]} does not list categories 0-{FUNGI_CATEGORIES - 1}: replace it with the official file"
        )
    splits = {}
    for split, ids in FUNGI.items():
        empty = next((i for i in ids if not photos.get(i)), None)
        if empty is not None:
            raise DataError(
                f"{base} has no annotated photo of category {empty} ({names[empty]}): replace train.json and val.json"
            )
        files = [evenly_spaced(photos[i], max_per_class) for i in ids]
        class_names = [f"{i:04d}.{names[i]}" for i in ids]
        splits[split] = decode_classes(files, class_names, image_size, channels, f"decoding fungi {split}")
    return dataset_from_splits("fungi", splits)
