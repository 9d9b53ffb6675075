"""Omniglot (Lake et al., 2015): 1623 handwritten characters from 50 alphabets, 20 drawings each.

Images are read straight from the official zips (no extraction: 32k small files
are slow to unpack and to list on network disks), resized with Lanczos
antialiasing from 105x105, and inverted so that strokes are bright on a dark
background, which is what convolutional backbones with zero padding expect.
Each split is uint8 ``[characters, 20, 1, H, W]``.

Splits, by character (every drawing of a character lands in one split):

* ``subset=full``: ``images_background.zip`` (30 alphabets, 964 characters)
  then ``images_evaluation.zip`` (20 alphabets, 659 characters), each sorted by
  alphabet then character name, 1623 characters in that order. The first 1200
  are for meta-training and the remaining 423 (all from the evaluation set) are
  test, the standard 1200/423 split. Of the 1200, the last ``val_classes``
  (default 100, all from the evaluation set) are validation and the others
  (default 1100) train. ``seed`` plays no part.
* ``subset=small``: ``images_background_small1.zip`` and
  ``images_background_small2.zip``, whose common alphabets (Greek, Latin) are
  counted once: 8 alphabets, 242 characters. They are sorted by alphabet then
  character name and permuted with ``torch.randperm(242,
  generator=torch.Generator().manual_seed(seed))``; the last
  ``round(0.2 * 242) = 48`` of the permutation are test, the ``val_classes``
  before them (default ``round(0.1 * 242) = 24``) are validation and the first
  170 are train. The test characters depend only on ``seed``.

With ``rotations=true`` every character of a split also appears rotated by 90,
180 and 270 degrees (``torch.rot90``, counter-clockwise) as three new classes of
the same split, named ``<alphabet>/<character>/rot<deg>``; rotating after the
split keeps the rotations of a test character out of training. The default
split sizes become 4400/400/1692 (full) and 680/96/192 (small) classes.

``mean``/``std`` are those of the train split's pixels in [0, 1].
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from metarun.data.cache import cached_dataset, file_fingerprint
from metarun.data.download import ensure_file
from metarun.data.split import FewShotDataset, Split, stack_classes
from metarun.errors import ConfigError, DataError

BASE_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
SUBSETS = {
    "full": ("images_background.zip", "images_evaluation.zip"),
    "small": ("images_background_small1.zip", "images_background_small2.zip"),
}
MD5 = {
    "images_background.zip": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation.zip": "6b91aef0f799c5bb55b94e3f2daec811",
    "images_background_small1.zip": "e704a628b5459e08445c13499850abc4",
    "images_background_small2.zip": "b75a71a51d3b13f821f212756fe481fd",
}
FULL_META_TRAIN_CHARACTERS = 1200
FULL_VAL_CHARACTERS = 100
SMALL_TEST_FRACTION = 0.2
SMALL_VAL_FRACTION = 0.1
PREPROCESS_VERSION = 1  # bump when the decoded pixels change, so old caches are not reused


def preprocess(image: Image.Image, image_size: int) -> np.ndarray:
    """One drawing as uint8 ``[H, W]``, strokes bright on a dark background (shared with the one-shot runs)."""
    gray = image.convert("L")
    if gray.size != (image_size, image_size):
        gray = gray.resize((image_size, image_size), Image.Resampling.LANCZOS)
    return 255 - np.asarray(gray, dtype=np.uint8)


def decode_png(data: bytes, image_size: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return preprocess(image, image_size)


def _read_characters(path: Path, image_size: int, seen: set[str]) -> list[tuple[str, torch.Tensor]]:
    """The characters of one zip not already in ``seen``, sorted by alphabet then character name."""
    try:
        with zipfile.ZipFile(path) as archive:
            members: dict[str, list[str]] = {}
            for name in archive.namelist():
                parts = name.split("/")
                if len(parts) == 4 and parts[3].endswith(".png"):
                    members.setdefault(f"{parts[1]}/{parts[2]}", []).append(name)
            if not members:
                raise DataError(
                    f"{path} holds no Omniglot images (<top>/<alphabet>/<character>/<image>.png): replace it with the official file"
                )
            characters = []
            for character in sorted(members.keys() - seen):
                drawings = []
                for name in sorted(members[character]):
                    try:
                        drawings.append(decode_png(archive.read(name), image_size))
                    except (UnidentifiedImageError, OSError, zipfile.BadZipFile, EOFError) as e:
                        raise DataError(f"{path}: cannot read {name} ({e}): replace the zip with the official file") from None
                characters.append((character, torch.from_numpy(np.stack(drawings)).unsqueeze(1)))
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{path} is not a readable zip ({e}): delete it and download it again") from None
    seen.update(members)
    return characters


def _rotate(split: Split) -> Split:
    images = torch.cat([torch.rot90(split.images, k, dims=(3, 4)) for k in range(4)])
    names = split.class_names + [f"{name}/rot{90 * k}" for k in (1, 2, 3) for name in split.class_names]
    counts = None if split.counts is None else split.counts.repeat(4)
    return Split(images.contiguous(), names, counts)


def _pixel_stats(images: torch.Tensor) -> tuple[float, float]:
    """Mean and std in [0, 1] from a 256-bin histogram: exact, and no float copy of the split."""
    hist = torch.bincount(images.flatten(), minlength=256).double()
    levels = torch.arange(256, dtype=torch.float64) / 255
    n = hist.sum()
    mean = (hist * levels).sum() / n
    var = (hist * (levels - mean) ** 2).sum() / n
    return float(mean), float(var.sqrt())


def _split_indices(subset: str, n: int, seed: int, val_classes: int | None) -> dict[str, list[int]]:
    if subset == "full":
        n_meta_train = FULL_META_TRAIN_CHARACTERS
        n_val = FULL_VAL_CHARACTERS if val_classes is None else val_classes
        order = list(range(n))
    else:
        n_meta_train = n - round(SMALL_TEST_FRACTION * n)
        n_val = round(SMALL_VAL_FRACTION * n) if val_classes is None else val_classes
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    if n_meta_train >= n:
        raise DataError(
            f"Omniglot subset={subset} has {n} characters, too few for a test split: replace the zips with the official files"
        )
    if not 0 < n_val < n_meta_train:
        raise ConfigError(f"dataset.val_classes={n_val} must be between 1 and {n_meta_train - 1} for Omniglot subset={subset}")
    n_train = n_meta_train - n_val
    parts = {"train": order[:n_train], "val": order[n_train:n_meta_train], "test": order[n_meta_train:]}
    return {name: sorted(idx) for name, idx in parts.items()}


def _build(zips: list[Path], subset: str, rotations: bool, image_size: int, seed: int, val_classes: int | None) -> FewShotDataset:
    seen: set[str] = set()
    characters = [c for path in zips for c in _read_characters(path, image_size, seen)]
    if subset == "small":  # the two zips share alphabets, so their order is not meaningful
        characters.sort(key=lambda c: c[0])
    names = [name for name, _ in characters]
    splits = {}
    for split_name, idx in _split_indices(subset, len(characters), seed, val_classes).items():
        split = stack_classes([characters[i][1] for i in idx], [names[i] for i in idx])
        splits[split_name] = _rotate(split) if rotations else split
    mean, std = _pixel_stats(splits["train"].images)
    return FewShotDataset("omniglot", splits, (mean,), (std,), {"subset": subset, "rotations": rotations})


def load(
    root: str = "data/omniglot",
    subset: str = "small",
    rotations: bool = True,
    download: bool = True,
    image_size: int = 28,
    seed: int = 0,
    val_classes: int | None = None,
) -> FewShotDataset:
    """Omniglot from the zips in ``root``; see the module docstring for the splits.

    ``download`` fetches a missing or damaged full-subset zip from ``BASE_URL``;
    the small zips are not downloaded. ``val_classes`` counts characters, before
    rotations; ``None`` means 100 (full) or 10% (small).
    """
    if subset not in SUBSETS:
        raise ConfigError(f"dataset.subset={subset} is not one of {', '.join(SUBSETS)}")
    if image_size < 1:
        raise ConfigError(f"dataset.image_size={image_size} must be positive")
    root_path = Path(root)
    url_base = BASE_URL if subset == "full" else None
    zips = [
        ensure_file(root_path / name, None if url_base is None else f"{url_base}/{name}", MD5[name], download)
        for name in SUBSETS[subset]
    ]
    key = {
        "zips": [file_fingerprint(p) for p in zips],
        "subset": subset,
        "rotations": rotations,
        "image_size": image_size,
        "seed": seed if subset == "small" else None,
        "val_classes": val_classes,
        "preprocess": PREPROCESS_VERSION,
    }
    return cached_dataset(root_path, "omniglot", key, lambda: _build(zips, subset, rotations, image_size, seed, val_classes))
