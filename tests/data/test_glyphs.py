"""The generated default dataset: the right layout, reproducible, learnable in principle, generated once."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

from metarun.data import glyphs
from metarun.data.split import FewShotDataset
from metarun.errors import ConfigError

SMALL = {"num_classes": 60, "images_per_class": 10, "val_classes": 10, "test_classes": 15}


def small(root: Path, **overrides) -> FewShotDataset:
    return glyphs.load(root=str(root), **{**SMALL, **overrides})


def test_layout_and_normalisation(tmp_path: Path) -> None:
    ds = small(tmp_path)
    assert ds.name == "glyphs"
    counts = {"train": 35, "val": 10, "test": 15}
    for name, split in ds.splits.items():
        assert split.images.dtype == torch.uint8
        assert tuple(split.images.shape) == (counts[name], 10, 1, 28, 28)
        assert split.counts is None
    train = ds.splits["train"].images.double() / 255
    assert len(ds.mean) == 1 and len(ds.std) == 1
    assert ds.mean[0] == pytest.approx(float(train.mean()))
    assert ds.std[0] == pytest.approx(float(train.std()))
    # Strokes bright on a dark background: most pixels are empty, every image has ink.
    assert 0.03 < ds.mean[0] < 0.35
    assert float((train == 0).double().mean()) > 0.5
    assert bool((train.amax(dim=(2, 3, 4)) > 0.7).all())


def test_image_size_is_respected(tmp_path: Path) -> None:
    ds = small(tmp_path, num_classes=30, val_classes=5, test_classes=5, images_per_class=3, image_size=40)
    assert ds.image_shape == (1, 40, 40)


def test_defaults_are_a_full_size_benchmark() -> None:
    defaults = {k: p.default for k, p in inspect.signature(glyphs.load).parameters.items()}
    assert defaults["num_classes"] >= 1000 and defaults["images_per_class"] >= 20


def test_splits_have_disjoint_classes(tmp_path: Path) -> None:
    ds = small(tmp_path)
    names = [set(s.class_names) for s in ds.splits.values()]
    assert sum(len(n) for n in names) == len(set.union(*names)) == SMALL["num_classes"]


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    a = small(tmp_path / "a", seed=3)
    b = small(tmp_path / "b", seed=3)
    c = small(tmp_path / "c", seed=4)
    for name in ("train", "val", "test"):
        assert torch.equal(a.splits[name].images, b.splits[name].images)
        assert not torch.equal(a.splits[name].images, c.splits[name].images)


def test_images_of_a_class_vary_but_resemble_each_other(tmp_path: Path) -> None:
    images = small(tmp_path).splits["train"].images.double().flatten(2)  # [C, N, pixels]
    c, n, _ = images.shape
    flat = images.reshape(c * n, -1)
    assert torch.unique(flat, dim=0).shape[0] == c * n  # no two images are the same drawing
    # Blurring first compares shapes rather than exact stroke positions, as a learned embedding would.
    blurred = torch.nn.functional.avg_pool2d(flat.view(-1, 1, 28, 28), 5, stride=1, padding=2).flatten(1)
    z = blurred - blurred.mean(1, keepdim=True)
    z = z / z.norm(dim=1, keepdim=True)
    corr = z @ z.T
    label = torch.arange(c).repeat_interleave(n)
    same = label[:, None] == label[None, :]
    off_diagonal = ~torch.eye(c * n, dtype=torch.bool)
    within = corr[same & off_diagonal].mean()
    across = corr[~same].mean()
    assert within > across + 0.15
    assert within < 0.95  # far from identical copies: there is real intra-class variation


def test_second_load_reuses_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = small(tmp_path)
    cached = list((tmp_path / ".metarun-cache").glob("glyphs-*.pt"))
    assert len(cached) == 1

    def must_not_render(*args, **kwargs):
        raise AssertionError("the cached dataset was generated again")

    monkeypatch.setattr(glyphs, "render_classes", must_not_render)
    second = small(tmp_path)
    for name in ("train", "val", "test"):
        assert torch.equal(first.splits[name].images, second.splits[name].images)
    assert second.mean == first.mean and second.std == first.std
    # Any argument that changes the images is part of the key, so it cannot hit the old entry.
    with pytest.raises(AssertionError, match="generated again"):
        small(tmp_path, seed=1)


def test_render_is_independent_of_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    whole = glyphs.render_classes(np.random.default_rng(7), 12, 4, 28)
    monkeypatch.setattr(glyphs, "CLASSES_PER_CHUNK", 5)
    assert np.array_equal(whole, glyphs.render_classes(np.random.default_rng(7), 12, 4, 28))


@pytest.mark.parametrize(
    "overrides",
    [{"val_classes": 30, "test_classes": 30}, {"val_classes": 0}, {"images_per_class": 0}, {"image_size": 4}],
)
def test_impossible_sizes_are_config_errors(tmp_path: Path, overrides: dict) -> None:
    with pytest.raises(ConfigError, match="glyphs"):
        small(tmp_path, **overrides)
