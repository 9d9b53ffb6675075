"""The input adapter: dataset-normalised episode images -> what ImageNet weights expect, by hand."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metarun.data.episodes import EpisodeSampler
from metarun.data.split import Split
from metarun.models.inputs import IMAGENET_MEAN, IMAGENET_STD, InputAdapter
from metarun.models.resnet import ResNet18

IMAGENET = (IMAGENET_MEAN, IMAGENET_STD)


def imagenet_normalised(raw: torch.Tensor) -> torch.Tensor:
    """What torchvision's transforms give: RGB in [0, 1], minus ImageNet's mean, over its std."""
    rgb = raw.expand(-1, 3, -1, -1)
    return (rgb - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def test_grey_dataset_images_become_imagenet_normalised_rgb():
    raw = torch.rand(4, 1, 28, 28, dtype=torch.float64).float()
    mean, std = 0.92, 0.25
    adapter = InputAdapter(1, 28, (mean,), (std,), IMAGENET)
    torch.testing.assert_close(adapter((raw - mean) / std), imagenet_normalised(raw))


def test_rgb_images_from_the_episode_engine_are_renormalised_then_resized():
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (3, 4, 3, 20, 20), dtype=torch.uint8, generator=g)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    sampler = EpisodeSampler(Split(pixels, ["a", "b", "c"]), 2, 1, 1, mean, std, seed=0)
    episode = sampler.sample(1)
    adapter = InputAdapter(3, 32, mean, std, IMAGENET)
    out = adapter(episode.support_x[0])
    # the same images as the engine stores them, normalised as ImageNet's networks expect, resized
    raw = (episode.support_x[0] * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)).clamp(0, 1)
    expected = F.interpolate(imagenet_normalised(raw), size=(32, 32), mode="bilinear", align_corners=False)
    assert out.shape == (2, 3, 32, 32)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_without_imagenet_weights_the_dataset_normalisation_is_kept():
    x = torch.randn(2, 1, 28, 28)
    adapter = InputAdapter(1, 28, (0.3,), (0.2,))
    assert torch.equal(adapter(x), x.expand(-1, 3, -1, -1))
    shrunk = InputAdapter(3, 14, (0.0,) * 3, (1.0,) * 3)(torch.ones(1, 3, 28, 28))
    torch.testing.assert_close(shrunk, torch.ones(1, 3, 14, 14))  # antialiased shrinking keeps constants


def test_normalize_follows_the_weights_unless_set():
    stats = ((0.5,), (0.25,))
    assert not ResNet18((1, 28, 28), image_size=32, weights="none", data_stats=stats).inputs.renormalize
    assert ResNet18((1, 28, 28), image_size=32, weights="none", normalize="imagenet", data_stats=stats).inputs.renormalize
    imagenet = ResNet18((1, 28, 28), image_size=32, weights="imagenet", load_weights=False, data_stats=stats)
    assert imagenet.inputs.renormalize
    dataset = ResNet18((1, 28, 28), image_size=32, weights="imagenet", load_weights=False, normalize="dataset")
    assert not dataset.inputs.renormalize
    # the adapter's statistics are rebuilt from the dataset, never saved: checkpoints keep the publisher's keys
    assert not any(k.startswith("inputs.") for k in imagenet.state_dict())
