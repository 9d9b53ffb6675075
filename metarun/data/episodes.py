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

import warnings
from collections.abc import Callable
from dataclasses import dataclass

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

    def select(self, tasks: slice) -> Episode:
        return Episode(self.support_x[tasks], self.support_y[tasks], self.query_x[tasks], self.query_y[tasks], self.ways)

    def to(self, device: torch.device) -> Episode:
        tensors = (self.support_x, self.support_y, self.query_x, self.query_y)
        return Episode(*(x.to(device, non_blocking=True) for x in tensors), self.ways)


@dataclass
class Batch:
    """An ordinary mini-batch of images labelled by their class in the split (for pre-training baselines)."""

    x: torch.Tensor
    y: torch.Tensor


@dataclass
class EpisodeIndices:
    classes: torch.Tensor  # int64 [tasks, ways]
    images: torch.Tensor  # int64 [tasks, ways, shots + queries]

    def __getitem__(self, item) -> EpisodeIndices:
        return EpisodeIndices(self.classes[item], self.images[item])


def check_episode(
    split: Split, ways: int, shots: int, queries: int, split_name: str, keys: tuple[str, str, str] = ("ways", "shots", "queries")
) -> None:
    """Reject impossible episodes before any work is done, naming the numbers and the config ``keys`` that set them."""
    ways_key, shots_key, queries_key = keys
    for key, value in zip(keys, (ways, shots, queries), strict=True):
        if value <= 0:
            raise ConfigError(f"{key}={value}: episode sizes must be positive")
    if split.num_classes == 0:  # e.g. traffic_sign, whose classes are all for testing (as in Meta-Dataset)
        raise ConfigError(
            f"the dataset's {split_name} split has no classes: it is for evaluation only, so train on another dataset "
            "and evaluate the run on this one"
        )
    if ways > split.num_classes:
        raise ConfigError(f"{ways_key}={ways} but the {split_name} split has only {split.num_classes} classes: lower {ways_key}")
    per_class = split.min_images_per_class
    if shots + queries > per_class:
        raise ConfigError(
            f"{shots_key} + {queries_key} = {shots} + {queries} = {shots + queries} but the {split_name} split has "
            f"only {per_class} images in its smallest class: lower {shots_key} or {queries_key}"
        )


MIN_STD = 1e-3  # in [0, 1] pixel units: a quarter of one grey level
CHUNK_BYTES = 8 << 20  # of float output per gather-and-normalise pass on a CPU (a part of a typical L3)


def gather_normalise(
    pool: torch.Tensor, index: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, channels_last: bool, dtype: torch.dtype
) -> torch.Tensor:
    """Images ``index`` of ``pool`` normalised in float and stored as ``dtype``: what :class:`FusedGather`
    compiles into one pass."""
    x = (pool.index_select(0, index).float() * scale + shift).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class FusedGather:
    """:func:`gather_normalise` compiled into one loop that reads each byte and writes each float once.

    Eagerly, the gather, the conversion to float and the normalisation are separate passes over the
    output, which is memory-bound on a CPU; compiled they are one, with identical values
    (``docs/performance.md``). Compiling costs seconds once per process (symbolic shapes: one kernel
    serves every episode size). Where compiling fails (no C++ compiler, a Python
    that dynamo does not support), the sampler warns once and stays eager.
    """

    def __init__(self) -> None:
        self.compiled: Callable[..., torch.Tensor] | None = None
        self.failed = False

    def __call__(self, *args) -> torch.Tensor | None:
        """The gathered images, or None once compiling has failed in this process."""
        if self.failed:
            return None
        if self.compiled is None:
            self.compiled = torch.compile(gather_normalise, dynamic=True)
        try:
            return self.compiled(*args)
        except Exception as e:  # compiler, dynamo or inductor errors: any of them means "use the eager passes"
            self.failed = True
            reason = (str(e).strip().splitlines() or [""])[0][:200]
            warnings.warn(f"fused episode sampling unavailable, sampling eagerly ({type(e).__name__}: {reason})", stacklevel=2)
            return None


fused_gather = FusedGather()


class EpisodeSampler:
    """Seeded episodes from one split, produced on ``device``.

    ``transform`` maps float images in [0, 1] to what the model sees
    (augmentation); normalisation by ``mean``/``std`` always follows it.
    ``output_device``, when it differs from ``device``, is where finished
    episodes are sent: a GPU run whose split did not fit in GPU memory samples
    on the CPU and moves only the episodes. ``fused`` (``trainer.fused_sampling``)
    samples through :data:`fused_gather` where the split lives on a CPU and there
    is no ``transform``; on a GPU the passes stay eager, a few kernel launches a
    meta-batch. The attribute says whether it applies.

    ``dtype`` is the images' dtype: a run under bf16 or fp16 autocast gets them in that precision,
    normalised in float and rounded once, the values its first layer's autocast would round the float
    images to. Half the bytes are written, which makes sampling on a CPU, bound by memory traffic, faster.
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
        output_device: torch.device | str | None = None,
        fused: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        check_episode(split, ways, shots, queries, split_name)
        self.device = torch.device(device)
        self.output_device = self.device if output_device is None else torch.device(output_device)
        self.split = split if split.images.device == self.device else split.to(self.device)
        self.ways, self.shots, self.queries = ways, shots, queries
        c = split.images.shape[2]
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(c, 1, 1)
        # a channel that never varies (a constant plane in a user's images) is centred, not divided by zero
        self.inv_std = 1.0 / torch.tensor(std, dtype=torch.float32, device=self.device).clamp_min(MIN_STD).view(c, 1, 1)
        # bytes -> normalised floats: x * scale + shift
        self.scale, self.shift = self.inv_std / 255.0, -self.mean * self.inv_std
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.transform = transform
        self.channels_last = channels_last
        self.fused = fused and self.device.type == "cpu" and transform is None
        self.dtype = dtype

    # -- indices -------------------------------------------------------------
    def sample_indices(self, num_tasks: int, generator: torch.Generator | None = None) -> EpisodeIndices:
        """Classes without replacement per task, images without replacement per class."""
        g = generator or self.generator
        dev = g.device
        n_classes, n_images = self.split.images.shape[:2]
        # the smallest keys in ascending order: argsort(...)[:k] without sorting the rest
        classes = torch.rand(num_tasks, n_classes, generator=g, device=dev).topk(self.ways, dim=1, largest=False).indices
        keys = torch.rand(num_tasks, self.ways, n_images, generator=g, device=dev)
        if self.split.counts is not None:
            counts = self.split.counts.to(dev)[classes]  # [tasks, ways]
            keys = keys.masked_fill(torch.arange(n_images, device=dev) >= counts[..., None], 2.0)
        images = keys.topk(self.shots + self.queries, dim=-1, largest=False).indices
        return EpisodeIndices(classes, images)

    def gather(self, idx: EpisodeIndices) -> Episode:
        """One gather of every support image, then every query image, so both sets are views of one tensor."""
        classes, images = idx.classes.to(self.device), idx.images.to(self.device)
        t, w, _ = images.shape
        s, q = self.shots, self.queries
        flat = classes[..., None] * self.split.images.shape[1] + images  # [t, w, s + q] into [classes * n] images
        x = self.images_at(torch.cat([flat[..., :s].flatten(), flat[..., s:].flatten()]))  # [t*w*s + t*w*q, C, H, W]
        labels = torch.arange(w, device=self.device)
        episode = Episode(
            x[: t * w * s].view(t, w * s, *x.shape[1:]),
            labels.repeat_interleave(s).expand(t, -1),
            x[t * w * s :].view(t, w * q, *x.shape[1:]),
            labels.repeat_interleave(q).expand(t, -1),
            w,
        )
        return episode if self.output_device == self.device else episode.to(self.output_device)

    def images_at(self, index: torch.Tensor) -> torch.Tensor:
        """Normalised images (in ``dtype``) number ``index`` of the split's flattened [classes * n] images.

        Without a transform, a CPU gathers, converts and normalises ``CHUNK_BYTES`` of output at a
        time: the three passes over each chunk then run in cache instead of in memory. A GPU does it in
        one go. Fused, it is one compiled pass.
        """
        pool = self.split.images.flatten(0, 1)
        if self.fused:
            x = fused_gather(pool, index, self.scale, self.shift, self.channels_last, self.dtype)
            if x is not None:
                return x
        if self.transform is not None:
            x = pool.index_select(0, index)
            x = self.transform(x.float().div_(255.0), self.generator).sub_(self.mean).mul_(self.inv_std).to(self.dtype)
            return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        out = torch.empty((len(index), *pool.shape[1:]), device=self.device, dtype=self.dtype, memory_format=layout)
        per_chunk = max(1, len(index) if self.device.type != "cpu" else CHUNK_BYTES // (pool[0].numel() * 4))
        # normalised in float; in a reduced precision through a float chunk, rounded once when stored
        floats = None if self.dtype == torch.float32 else torch.empty_like(out[:per_chunk], dtype=torch.float32)
        for o, i in zip(out.split(per_chunk), index.split(per_chunk), strict=True):
            f = o if floats is None else floats[: len(i)]
            f.copy_(pool.index_select(0, i)).mul_(self.scale).add_(self.shift)  # bytes -> normalised floats
            if floats is not None:
                o.copy_(f)
        return out

    # -- what the algorithms ask for --------------------------------------------
    def sample(self, num_tasks: int, shard: tuple[int, int] = (0, 1)) -> Episode:
        """``num_tasks`` episodes; with ``shard=(rank, world)`` only this rank's contiguous slice of them.

        Augmentation draws its random numbers image by image, so with a
        ``transform`` every rank augments the whole meta-batch and keeps its
        slice: N processes then see exactly the images one process would.
        """
        idx = self.sample_indices(num_tasks)
        rank, world = shard
        if world == 1:
            return self.gather(idx)
        mine = slice(rank * (num_tasks // world), (rank + 1) * (num_tasks // world))
        return self.gather(idx).select(mine) if self.transform is not None else self.gather(idx[mine])

    def sample_images(self, batch_size: int, shard: tuple[int, int] = (0, 1)) -> Batch:
        """Uniformly drawn images with their class index, for pre-training on all training classes."""
        g = self.generator
        n_classes, n_images = self.split.images.shape[:2]
        classes = torch.randint(n_classes, (batch_size,), generator=g, device=self.device)
        limit = self.split.counts[classes] if self.split.counts is not None else n_images
        images = (torch.rand(batch_size, generator=g, device=self.device) * limit).long()
        rank, world = shard
        mine = slice(rank * (batch_size // world), (rank + 1) * (batch_size // world))
        if self.transform is None:  # (with one, every rank augments the whole batch, as in sample)
            classes, images = classes[mine], images[mine]
        x = self.images_at(classes * n_images + images)
        if self.transform is not None:
            x, classes = x[mine], classes[mine]
        return Batch(x.to(self.output_device, non_blocking=True), classes.to(self.output_device, non_blocking=True))

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def fixed_episodes(sampler: EpisodeSampler, episodes: int, seed: int) -> EpisodeIndices:
    """The same ``episodes`` tasks for every run, algorithm and device: drawn on the CPU from ``seed`` alone."""
    return sampler.sample_indices(episodes, torch.Generator().manual_seed(seed))
