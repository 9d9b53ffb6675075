"""The episode engine: every algorithm, every dataset, training and evaluation.

A split lives on the run's device as one uint8 tensor; an episode is drawn by
sampling index tensors and doing a single gather, then converting to float and
normalising on the device. There are no workers and no per-image Python, so
sampling costs a small fraction of a meta-step even on a CPU.

Indices are drawn for a whole meta-batch at once from one generator. A process
that holds only part of the meta-batch (data-parallel training) draws the same
indices and gathers only its own tasks, so N processes see exactly the tasks
one process would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from metarun.data.split import Split
from metarun.errors import ConfigError


@dataclass
class Episode:
    """A batch of tasks: ``[tasks, ways * shots, ...]`` support and ``[tasks, ways * queries, ...]`` query."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    ways: int

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]


@dataclass
class Batch:
    """An ordinary mini-batch of images labelled by their class in the split (for pre-training baselines)."""

    x: torch.Tensor
    y: torch.Tensor


@dataclass
class EpisodeIndices:
    classes: torch.Tensor  # int64 [tasks, ways]
    images: torch.Tensor  # int64 [tasks, ways, shots + queries]

    def __getitem__(self, item) -> "EpisodeIndices":
        return EpisodeIndices(self.classes[item], self.images[item])


def check_episode(split: Split, ways: int, shots: int, queries: int, split_name: str) -> None:
    """Reject impossible episodes before any work is done, naming the numbers."""
    for key, value in (("ways", ways), ("shots", shots), ("queries", queries)):
        if value <= 0:
            raise ConfigError(f"{key}={value}: episode sizes must be positive")
    if ways > split.num_classes:
        raise ConfigError(f"ways={ways} but the {split_name} split has only {split.num_classes} classes: lower the ways")
    per_class = split.min_images_per_class
    if shots + queries > per_class:
        raise ConfigError(
            f"shots + queries = {shots} + {queries} = {shots + queries} but the {split_name} split has "
            f"only {per_class} images in its smallest class: lower shots or queries"
        )


class EpisodeSampler:
    """Seeded episodes from one split, produced on ``device``.

    ``transform`` maps float images in [0, 1] to what the model sees
    (augmentation); normalisation by ``mean``/``std`` always follows it.
    """

    def __init__(
        self,
        split: Split,
        ways: int,
        shots: int,
        queries: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        seed: int,
        device: torch.device | str = "cpu",
        split_name: str = "train",
        transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
        channels_last: bool = False,
    ) -> None:
        check_episode(split, ways, shots, queries, split_name)
        self.device = torch.device(device)
        self.split = split if split.images.device == self.device else split.to(self.device)
        self.ways, self.shots, self.queries = ways, shots, queries
        c = split.images.shape[2]
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(c, 1, 1)
        self.inv_std = 1.0 / torch.tensor(std, dtype=torch.float32, device=self.device).view(c, 1, 1)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.transform = transform
        self.channels_last = channels_last

    # -- indices -------------------------------------------------------------
    def sample_indices(self, num_tasks: int, generator: torch.Generator | None = None) -> EpisodeIndices:
        """Classes without replacement per task, images without replacement per class."""
        g = generator or self.generator
        dev = g.device
        n_classes, n_images = self.split.images.shape[:2]
        classes = torch.rand(num_tasks, n_classes, generator=g, device=dev).argsort(dim=1)[:, : self.ways]
        keys = torch.rand(num_tasks, self.ways, n_images, generator=g, device=dev)
        if self.split.counts is not None:
            counts = self.split.counts.to(dev)[classes]  # [tasks, ways]
            keys = keys.masked_fill(torch.arange(n_images, device=dev) >= counts[..., None], 2.0)
        images = keys.argsort(dim=-1)[..., : self.shots + self.queries]
        return EpisodeIndices(classes, images)

    def gather(self, idx: EpisodeIndices) -> Episode:
        idx = EpisodeIndices(idx.classes.to(self.device), idx.images.to(self.device))
        t, w, k = idx.images.shape
        x = self.split.images[idx.classes[..., None], idx.images]  # uint8 [t, w, k, C, H, W]
        x = self.to_float(x.reshape(t * w * k, *x.shape[3:]), self.transform).view(t, w, k, *x.shape[3:])
        s, q = self.shots, self.queries
        labels = torch.arange(w, device=self.device)
        support_x = x[:, :, :s].reshape(t, w * s, *x.shape[3:])
        query_x = x[:, :, s:].reshape(t, w * q, *x.shape[3:])
        return Episode(
            support_x,
            labels.repeat_interleave(s).expand(t, -1),
            query_x,
            labels.repeat_interleave(q).expand(t, -1),
            w,
        )

    def to_float(self, x: torch.Tensor, transform=None) -> torch.Tensor:
        x = x.float().div_(255.0)
        if transform is not None:
            x = transform(x, self.generator)
        x = (x - self.mean) * self.inv_std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    # -- what the algorithms ask for --------------------------------------------
    def sample(self, num_tasks: int, shard: tuple[int, int] = (0, 1)) -> Episode:
        """``num_tasks`` episodes; with ``shard=(rank, world)`` only this rank's contiguous slice of them."""
        idx = self.sample_indices(num_tasks)
        rank, world = shard
        if world > 1:
            per = num_tasks // world
            idx = idx[rank * per : (rank + 1) * per]
        return self.gather(idx)

    def sample_images(self, batch_size: int, shard: tuple[int, int] = (0, 1)) -> Batch:
        """Uniformly drawn images with their class index, for pre-training on all training classes."""
        g = self.generator
        n_classes, n_images = self.split.images.shape[:2]
        classes = torch.randint(n_classes, (batch_size,), generator=g, device=self.device)
        limit = self.split.counts[classes] if self.split.counts is not None else n_images
        images = (torch.rand(batch_size, generator=g, device=self.device) * limit).long()
        rank, world = shard
        if world > 1:
            per = batch_size // world
            classes, images = classes[rank * per : (rank + 1) * per], images[rank * per : (rank + 1) * per]
        return Batch(self.to_float(self.split.images[classes, images], self.transform), classes)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def fixed_episodes(sampler: EpisodeSampler, episodes: int, seed: int) -> EpisodeIndices:
    """The same ``episodes`` tasks for every run, algorithm and device: drawn on the CPU from ``seed`` alone."""
    return sampler.sample_indices(episodes, torch.Generator().manual_seed(seed))
