"""FGVC-Aircraft 2013b (Maji et al., 2013) at the variant level, as in Meta-Dataset: 100 variants x 100 photos.

Classes are the aircraft model variants (``A330-200``, ``F/A-18`` ...), split as
Meta-Dataset's ``aircraft_splits.json``: 70 / 15 / 15 variants
(:data:`metarun.data.metadataset_splits.AIRCRAFT`). Every photo of a variant is
used, from the archive's train, val and test lists alike
(``images_variant_{trainval,test}.txt``). As in Meta-Dataset, each photo is
cropped to its bounding box (``images_box.txt``): it names the aircraft the
label is about and drops the 20-pixel copyright banner at the bottom. Crops
are resized as a whole to ``image_size`` (see :mod:`metarun.data.images`):
uint8 ``[70, 100, 3, 84, 84]`` for train, 212 MB for all three splits.

``fgvc-aircraft-2013b.tar.gz`` (2.75 GB) is downloaded into ``root`` from the
Oxford VGG site when missing and ``download`` is true, md5-checked and unpacked
there; a copy unpacked by hand (``root/fgvc-aircraft-2013b/data/``) is used as
it is. ``max_per_class`` keeps that many photos of a variant, evenly spread
over its sorted file names. ``mean``/``std`` are those of the train split.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from metarun.data.cache import cached_dataset, file_fingerprint
from metarun.data.extract import fetch_unpacked
from metarun.data.images import dataset_from_splits, decode_classes, evenly_spaced
from metarun.data.metadataset_splits import AIRCRAFT
from metarun.data.split import FewShotDataset
from metarun.errors import DataError

URL = "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz"
MD5 = "d4acdd33327262359767eeaa97a4f732"
ARCHIVE = "fgvc-aircraft-2013b.tar.gz"
FOLDER = "fgvc-aircraft-2013b"
VARIANT_LISTS = ("images_variant_trainval.txt", "images_variant_test.txt")
BOXES = "images_box.txt"
PREPROCESS_VERSION = 1  # bump when the decoded pixels change, so old caches are not reused


def find(root: Path) -> Path | None:
    """The archive's ``data/`` folder under ``root`` (or ``root`` itself), where its index files are."""
    for base in (root / FOLDER / "data", root / "data", root):
        if all((base / name).is_file() for name in (*VARIANT_LISTS, BOXES)) and (base / "images").is_dir():
            return base
    return None


def load(
    root: str = "data/aircraft", download: bool = True, image_size: int = 84, channels: int = 3, max_per_class: int | None = None
) -> FewShotDataset:
    """FGVC-Aircraft from ``root``, downloaded there when missing and ``download`` is true."""
    root_path = Path(root).expanduser()
    data = fetch_unpacked(root_path, find, [(ARCHIVE, URL, MD5)], download, "FGVC-Aircraft")
    key = {
        "files": [file_fingerprint(data / name) for name in (*VARIANT_LISTS, BOXES)],
        "image_size": image_size,
        "channels": channels,
        "max_per_class": max_per_class,
        "version": PREPROCESS_VERSION,
    }
    return cached_dataset(root_path, "aircraft", key, lambda: _build(data, image_size, channels, max_per_class))


def _build(data: Path, image_size: int, channels: int, max_per_class: int | None) -> FewShotDataset:
    photos: dict[str, list[str]] = defaultdict(list)
    for name in VARIANT_LISTS:
        for image, variant in _pairs(data / name):
            photos[variant].append(image)
    boxes = {image: _box(rest, data / BOXES) for image, rest in _pairs(data / BOXES)}
    published = {v for names in AIRCRAFT.values() for v in names}
    missing, unknown = sorted(published - set(photos)), sorted(set(photos) - published)
    if missing or unknown:
        what = f"no photo of variant {missing[0]}" if missing else f"photos of variant {unknown[0]}, which is not FGVC-Aircraft's"
        raise DataError(f"{data} lists {what}: replace its index files with those of fgvc-aircraft-2013b")
    splits = {}
    for split, names in AIRCRAFT.items():
        chosen = [evenly_spaced(sorted(photos[v]), max_per_class) for v in names]
        lost = next((i for images in chosen for i in images if i not in boxes), None)
        if lost is not None:
            raise DataError(f"{data / BOXES} has no box for photo {lost}: replace it with the official file")
        splits[split] = decode_classes(
            [[data / "images" / f"{i}.jpg" for i in images] for images in chosen],
            list(names),
            image_size,
            channels,
            f"decoding aircraft {split}",
            boxes=[[boxes[i] for i in images] for images in chosen],
        )
    return dataset_from_splits("aircraft", splits)


def _pairs(path: Path) -> list[tuple[str, str]]:
    """The ``<image> <value>`` lines of an index file."""
    lines = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    pairs = [tuple(line.split(" ", 1)) for line in lines]
    if not pairs or any(len(p) != 2 for p in pairs):
        raise DataError(f"{path} is not an FGVC-Aircraft index of '<image> <value>' lines: replace it with the official file")
    return pairs  # type: ignore[return-value]


def _box(text: str, path: Path) -> tuple[int, int, int, int]:
    """``xmin ymin xmax ymax`` as Pillow's crop box, read as Meta-Dataset reads them (the pixels' own numbers)."""
    try:
        left, upper, right, lower = (int(v) for v in text.split())
    except ValueError:
        raise DataError(f"{path} has a box '{text}' that is not four integers: replace it with the official file") from None
    return left, upper, right, lower
