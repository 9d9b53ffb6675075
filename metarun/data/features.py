"""The frozen-feature pipeline: episodes sampled from a fixed backbone's features instead of images.

When nothing in the backbone changes during a run (every weight frozen, batch norm on its running
statistics) and the algorithm only ever asks it for each image's features, every image of a split
can go through it once, in the precision that split is used in, and episodes are then gathered
from the ``[classes, n, *feature_shape]`` tensor by the same engine as images: the same seeded
indices, so the same episodes, at the cost of a gather instead of a forward pass per episode.
The model sees the features through :class:`metarun.models.freeze.FeatureInput`, a stand-in for
the backbone whose forward is the identity; which runs qualify is decided in one place,
:func:`metarun.factory.frozen_features_reason`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from metarun.data.episodes import EpisodeSampler, check_episode
from metarun.data.split import FewShotDataset, Split
from metarun.device import autocast, input_dtype
from metarun.progress import progress_bar

#: images a forward pass of the feature pass takes
BATCH_SIZE = 256


@dataclass
class FeatureSplit:
    """A split's features: ``images`` holds them, ``[classes, n, *feature_shape]``, so that the episode engine,
    which gathers rows of ``images``, serves them unchanged; padded slots (``counts``) are never drawn."""

    images: torch.Tensor
    class_names: list[str]
    counts: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        return self.images.shape[0]


def encode_split(
    backbone: nn.Module,
    split: Split,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    *,
    device: torch.device,
    precision: str,
    description: str = "features",
    batch_size: int = BATCH_SIZE,
) -> FeatureSplit:
    """Every image of ``split`` through ``backbone`` once, normalised exactly as episodes are
    (:meth:`EpisodeSampler.images_at`) and under the same autocast, without gradients."""
    pixels = EpisodeSampler(split, 1, 1, 1, mean, std, seed=0, device=split.images.device, dtype=input_dtype(precision))
    classes, per_class = split.images.shape[:2]
    total = classes * per_class
    out = None
    with torch.no_grad(), autocast(device, precision), progress_bar(total, description, transient=True) as advance:
        for start in range(0, total, batch_size):
            index = torch.arange(start, min(start + batch_size, total), device=split.images.device)
            z = backbone(pixels.images_at(index).to(device))
            if out is None:
                out = torch.empty((total, *z.shape[1:]), dtype=z.dtype, device=device)
            out[start : start + len(index)] = z
            advance(len(index))
    counts = None if split.counts is None else split.counts.to(device)
    return FeatureSplit(out.view(classes, per_class, *out.shape[1:]), split.class_names, counts)


class FeatureDataset:
    """``images`` (a :class:`FewShotDataset`) seen through a fixed ``backbone``: the same name, splits (for the
    checks of episode sizes), statistics and image shape, and :meth:`features` of each split, computed on first
    use and kept per precision while the backbone's tensors are unchanged (a checkpoint loaded into it after
    they were computed makes them be computed again)."""

    def __init__(self, images: FewShotDataset, backbone: nn.Module, device: torch.device) -> None:
        self.images = images
        self.backbone = backbone
        self.device = device
        self.name, self.splits, self.mean, self.std, self.meta = images.name, images.splits, images.mean, images.std, images.meta
        self._cache: dict[tuple[str, str], tuple[tuple[int, ...], FeatureSplit]] = {}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.images.image_shape

    def _versions(self) -> tuple[int, ...]:
        """In-place writes (``load_state_dict``, an optimiser step) bump a tensor's version."""
        return tuple(t._version for t in (*self.backbone.parameters(), *self.backbone.buffers()))

    def features(self, split: str, precision: str) -> FeatureSplit:
        key = (split, precision)
        versions = self._versions()
        if key not in self._cache or self._cache[key][0] != versions:
            encoded = encode_split(
                self.backbone, self.splits[split], self.mean, self.std, device=self.device, precision=precision,
                description=f"features of the {split} split",
            )  # fmt: skip
            self._cache[key] = (versions, encoded)
        return self._cache[key][1]


class FeatureSampler(EpisodeSampler):
    """:class:`EpisodeSampler` over a split's features (:meth:`FeatureDataset.features`, fetched when first
    sampled, so after a checkpoint is loaded): the same seeded indices, so the same episodes as from its
    images, gathered on the run's device."""

    def __init__(
        self,
        features: Callable[[], FeatureSplit],
        image_split: Split,
        ways: int,
        shots: int,
        queries: int,
        *,
        seed: int,
        device: torch.device,
        split_name: str = "train",
    ) -> None:
        check_episode(image_split, ways, shots, queries, split_name)
        self.features = features
        self.device = self.output_device = torch.device(device)
        self.ways, self.shots, self.queries = ways, shots, queries
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.transform, self.channels_last, self.fused = None, False, False

    @property
    def split(self) -> FeatureSplit:
        return self.features()

    def images_at(self, index: torch.Tensor) -> torch.Tensor:
        return self.split.images.flatten(0, 1).index_select(0, index)
