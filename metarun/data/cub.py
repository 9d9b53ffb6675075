"""CUB-200-2011 (Wah et al., 2011): 200 bird species, 11788 photos, as in Chen et al. (2019).

The few-shot split of "A Closer Look at Few-shot Classification" (their
``write_CUB_filelist.py``): with the species numbered from 0 in the order of
``classes.txt`` (the sorted folder names ``001.Black_footed_Albatross`` ...),
species ``i`` is train when ``i % 2 == 0``, validation when ``i % 4 == 1`` and
test when ``i % 4 == 3``: 100 / 50 / 50 species. Images are resized to 84x84
RGB as a whole (see :mod:`metarun.data.images`); species hold 41 to 60 images,
so each split is padded to its largest species and ``counts`` records the real
sizes: uint8 ``[100, 60, 3, 84, 84]`` for train, 254 MB for all three splits.

Nothing is downloaded: get ``CUB_200_2011.tgz`` from
https://www.vision.caltech.edu/datasets/cub_200_2011/ and extract it in
``root``, so that ``root/CUB_200_2011/`` holds ``images/``, ``images.txt`` and
``classes.txt`` (those three directly in ``root`` work too). ``mean``/``std``
are those of the train split's pixels in [0, 1].
"""

from __future__ import annotations

from pathlib import Path

from metarun.data.cache import cached_dataset, file_fingerprint
from metarun.data.images import dataset_from_splits, decode_classes
from metarun.data.split import FewShotDataset
from metarun.errors import DataError

IMAGE_SIZE = 84
FOLDER = "CUB_200_2011"
REQUIRED = ("images", "images.txt", "classes.txt")
URL = "https://www.vision.caltech.edu/datasets/cub_200_2011/"
PREPROCESS_VERSION = 1  # bump when the decoded pixels change, so old caches are not reused


def split_of(index: int) -> str:
    """The split of the species at 0-based ``index`` in ``classes.txt`` (Chen et al., 2019)."""
    if index % 2 == 0:
        return "train"
    return "val" if index % 4 == 1 else "test"


def load(root: str = "data/cub") -> FewShotDataset:
    """CUB-200-2011 from the extracted official archive in ``root``."""
    root_path = Path(root).expanduser()
    base = next((d for d in (root_path / FOLDER, root_path) if all((d / name).exists() for name in REQUIRED)), None)
    if base is None:
        raise DataError(
            f"CUB-200-2011 is not in {root_path}: download CUB_200_2011.tgz from {URL} and extract it there, "
            f"so that {root_path / FOLDER} holds images/, images.txt and classes.txt"
        )
    key = {"files": [file_fingerprint(base / name) for name in REQUIRED[1:]], "version": PREPROCESS_VERSION}
    return cached_dataset(root_path, "cub", key, lambda: _build(base))


def _build(base: Path) -> FewShotDataset:
    classes = [line.split(maxsplit=1)[1] for line in _lines(base / "classes.txt")]
    files: dict[str, list[Path]] = {name: [] for name in classes}
    for line in _lines(base / "images.txt"):
        relative = line.split(maxsplit=1)[1]
        species = relative.split("/", 1)[0]
        if species not in files:
            raise DataError(
                f"{base / 'images.txt'} lists {relative}, whose folder is not in classes.txt: replace both with the official files"
            )
        files[species].append(base / "images" / relative)
    empty = [name for name in classes if not files[name]]
    if empty:
        raise DataError(f"{base / 'images.txt'} lists no image of {empty[0]}: replace it with the official file")
    by_split: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for i, name in enumerate(classes):
        by_split[split_of(i)].append(name)
    splits = {
        split: decode_classes([files[n] for n in names], names, IMAGE_SIZE, description=f"decoding CUB {split}")
        for split, names in by_split.items()
    }
    return dataset_from_splits("cub", splits)


def _lines(path: Path) -> list[str]:
    """The ``<id> <value>`` lines of one of the dataset's index files, checked for that form."""
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    bad = next((line for line in lines if len(line.split(maxsplit=1)) != 2), None)
    if bad is not None or not lines:
        raise DataError(f"{path} is not a CUB index file of '<id> <name>' lines: replace it with the official file")
    return lines
