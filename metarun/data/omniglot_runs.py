"""Omniglot's official one-shot classification runs (Lake et al., 2015).

The 20 runs are fixed 20-way 1-shot episodes that papers report against, so
they are loaded as given instead of being sampled. Layout, as released::

    DIR/runNN/training/classJJ.png   one drawing per class (the support set)
    DIR/runNN/test/itemKK.png        the query drawings
    DIR/runNN/class_labels.txt       lines "runNN/test/itemKK.png runNN/training/classJJ.png"

Images go through :func:`metarun.data.omniglot.preprocess`, the same as the
training data, so a model meta-trained on ``omniglot`` sees the same pixels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from metarun.data.omniglot import preprocess
from metarun.errors import DataError

_RUN_DIR = re.compile(r"run\d+")


@dataclass
class Run:
    name: str
    support: torch.Tensor  # uint8 [ways, 1, 1, H, W], class order = sorted class file names
    query: torch.Tensor  # uint8 [n_items, 1, H, W], order = sorted item file names
    query_labels: torch.Tensor  # int64 [n_items], index into support


def _read_image(path: Path, image_size: int) -> torch.Tensor:
    try:
        with Image.open(path) as image:
            return torch.from_numpy(preprocess(image, image_size)).unsqueeze(0)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"cannot read {path} ({e}): restore it from the official one-shot runs") from None


def _pngs(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.png")) if folder.is_dir() else []
    if not files:
        raise DataError(f"{folder} holds no PNG images: restore it from the official one-shot runs")
    return files


def _load_run(run_dir: Path, image_size: int) -> Run:
    classes = _pngs(run_dir / "training")
    items = _pngs(run_dir / "test")
    labels_file = run_dir / "class_labels.txt"
    if not labels_file.is_file():
        raise DataError(f"{labels_file} missing: restore it from the official one-shot runs")
    class_index = {f"{run_dir.name}/training/{p.name}": i for i, p in enumerate(classes)}
    item_names = {p.name for p in items}
    label_of: dict[str, int] = {}
    item_prefix = f"{run_dir.name}/test/"
    for number, line in enumerate(labels_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        item = fields[0][len(item_prefix) :] if fields[0].startswith(item_prefix) else ""
        if len(fields) != 2 or fields[1] not in class_index or item not in item_names or item in label_of:
            raise DataError(
                f"{labels_file}:{number}: expected '{item_prefix}<item>.png {run_dir.name}/training/<class>.png' for an existing, not yet labelled item, got {line.strip()!r}"
            )
        label_of[item] = class_index[fields[1]]
    unlabelled = sorted(item_names - label_of.keys())
    if unlabelled:
        raise DataError(f"{labels_file}: no label for test/{unlabelled[0]}: restore it from the official one-shot runs")
    return Run(
        name=run_dir.name,
        support=torch.stack([_read_image(p, image_size) for p in classes]).unsqueeze(1),
        query=torch.stack([_read_image(p, image_size) for p in items]),
        query_labels=torch.tensor([label_of[p.name] for p in items], dtype=torch.int64),
    )


def load_runs(path: Path, image_size: int = 28) -> list[Run]:
    """Every ``runNN`` folder under ``path``, in name order."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"one-shot runs folder {path} missing: unpack the official all_runs.zip there")
    run_dirs = sorted(p for p in path.iterdir() if p.is_dir() and _RUN_DIR.fullmatch(p.name))
    if not run_dirs:
        raise DataError(f"{path} holds no runNN folders: unpack the official all_runs.zip there")
    return [_load_run(run_dir, image_size) for run_dir in run_dirs]
