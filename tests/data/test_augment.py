"""Batched episode augmentation: shapes, range, reproducibility and what each operation does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metarun.data.augment import augment_batch


def batch(b: int = 32, c: int = 3, h: int = 12, w: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.rand((b, c, h, w), generator=torch.Generator().manual_seed(seed))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_shape_dtype_and_range() -> None:
    x = batch()
    out = augment_batch(x, gen(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert not torch.equal(out, x)


def test_deterministic_given_the_generator_seed() -> None:
    x = batch()
    assert torch.equal(augment_batch(x, gen(7)), augment_batch(x, gen(7)))
    assert not torch.equal(augment_batch(x, gen(7)), augment_batch(x, gen(8)))


def test_flips_actually_flip() -> None:
    x = batch(b=64)
    out = augment_batch(x, gen(1), padding=0, flip=True, jitter=0.0)
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x, strict=True)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, x, strict=True)])
    assert bool((flipped ^ kept).all())  # each image is exactly itself or its mirror
    assert 10 < int(flipped.sum()) < 54


def test_crops_are_shifts_of_the_padded_image() -> None:
    x, padding = batch(b=40), 3
    out = augment_batch(x, gen(2), padding=padding, flip=False, jitter=0.0)
    padded = F.pad(x, (padding,) * 4)
    h, w = x.shape[-2:]
    offsets = set()
    for i in range(len(x)):
        matches = [
            (dy, dx)
            for dy in range(2 * padding + 1)
            for dx in range(2 * padding + 1)
            if torch.equal(out[i], padded[i, :, dy : dy + h, dx : dx + w])
        ]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 10  # offsets vary per image


def test_identity_when_everything_is_off() -> None:
    x = batch()
    assert torch.equal(augment_batch(x, gen(0), padding=0, flip=False, jitter=0.0), x)


def test_jitter_changes_colours_within_range_per_image() -> None:
    x = batch(b=16)
    out = augment_batch(x, gen(3), padding=0, flip=False, jitter=0.4)
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    ratios = (out.mean(dim=(1, 2, 3)) / x.mean(dim=(1, 2, 3))).unique()
    assert len(ratios) == 16  # factors differ between images


def test_grayscale_images() -> None:
    x = batch(c=1)
    out = augment_batch(x, gen(0))
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1


def test_rejects_uint8() -> None:
    with pytest.raises(ValueError, match="float images"):
        augment_batch(torch.zeros((2, 3, 4, 4), dtype=torch.uint8), gen(0))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_runs_on_the_device_of_its_input() -> None:
    x = batch().cuda()
    generator = torch.Generator(device="cuda").manual_seed(0)
    out = augment_batch(x, generator)
    assert out.device == x.device
    assert torch.equal(out, augment_batch(x, torch.Generator(device="cuda").manual_seed(0)))
