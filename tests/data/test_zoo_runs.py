"""A train + eval smoke run on each dataset of the zoo, from tiny files in its real layout.

The loaders' own tests check classes, shapes and caches; this one checks that
each dataset flows through the whole runner as a user would run it (episodes
of 3-channel images of its size through a Conv4, validation, checkpoint, the
final evaluation) with nothing special-cased.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metarun.trainer import train
from tests.data import test_cub, test_folder, test_miniimagenet, test_tieredimagenet
from tests.data.test_cifar import archive, server  # noqa: F401  (fixtures: the CIFAR archive on 127.0.0.1)


def miniimagenet(root: Path) -> list[str]:
    test_miniimagenet.write_csv_layout(root)
    return [f"dataset.root={root}"]


def tieredimagenet(root: Path) -> list[str]:
    test_tieredimagenet.write_dataset(root, "npz")
    return [f"dataset.root={root}"]


def cub(root: Path) -> list[str]:
    test_cub.write_cub(root / "CUB_200_2011")
    return [f"dataset.root={root}"]


def folder(root: Path) -> list[str]:
    test_folder.write_flat(root / "images")
    return [f"dataset.path={root / 'images'}", "dataset.image_size=32"]


def cifar(root: Path) -> list[str]:
    return [f"dataset.root={root}"]


WRITERS = {
    "miniimagenet": miniimagenet,
    "tieredimagenet": tieredimagenet,
    "cub": cub,
    "folder": folder,
    "cifarfs": cifar,
    "fc100": cifar,
}
SMOKE = [
    "task.ways=2",
    "task.shots=1",
    "task.queries=1",
    "task.meta_batch=2",
    "backbone.hidden=8",
    "trainer.steps=2",
    "trainer.val_every=2",
    "trainer.val_episodes=2",
    "trainer.progress=false",
    "eval.settings=[{ways:2,shots:1}]",
    "eval.queries=1",
    "eval.episodes=4",
    "logger=none",
]


@pytest.mark.parametrize("name", list(WRITERS))
def test_train_and_evaluate(name, tmp_path, compose_config, request, monkeypatch):
    if name in ("cifarfs", "fc100"):
        request.getfixturevalue("server")
    # every class can serve 1 shot + 1 query
    monkeypatch.setitem(test_tieredimagenet.SIZES, "n07", 2)
    monkeypatch.setattr(test_cub, "SIZES", [max(n, 2) for n in test_cub.SIZES])
    overrides = [f"dataset={name}", *WRITERS[name](tmp_path / "data"), *SMOKE]
    if name in ("miniimagenet", "cub"):
        overrides.append("dataset.augment=true")
    run = tmp_path / "run"
    train(compose_config("train", overrides), run)
    result = json.loads((run / "eval.json").read_text())["results"][0]
    assert (result["ways"], result["shots"], result["episodes"]) == (2, 1, 4)
    assert 0.0 <= result["accuracy"] <= 1.0 and len(result["per_episode"]) == 4
    assert (run / "checkpoints" / "best.pt").is_file()
