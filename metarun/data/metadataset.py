"""Meta-Dataset episodes: a varying number of classes and of images per class (``task.protocol=metadataset``).

The procedure of Triantafillou et al. 2020 (Appendix; google-research/meta-dataset,
``meta_dataset/data/sampling.py``), for each episode:

1. ways uniform in ``[5, min(50, classes in the split)]``, the classes uniformly without replacement;
2. queries per class ``min(10, floor(min over the chosen classes of their images / 2))``;
3. a support set of ``min(500, Σ_c floor(β · min(100, images_c - queries) + 1))`` images, β ~ U[0, 1);
4. split over the classes by the proportions ``images_c · exp(u_c)``, u_c ~ U(log 0.5, log 2), normalised:
   class c gets ``min(floor(p_c · (support - ways)) + 1, images_c - queries)``, so at least one.

Episodes of a meta-batch therefore differ in shape. Their descriptions and image indices are drawn for the
whole meta-batch at once, by tensor operations on the sampler's device, laid out padded to the procedure's
bounds; :meth:`MetaDatasetSampler.gather` trims them to the call's largest episode and does one gather
through the engine's path (:meth:`~metarun.data.episodes.EpisodeSampler.images_at`). The host learns the
episodes' sizes once a meta-batch (the padded shape), and each episode's size with them, so that an
algorithm can run a task at its real size where batch norm must not see the padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from metarun.data.episodes import Episode, EpisodeSampler
from metarun.data.split import Split
from metarun.errors import ConfigError

PROTOCOLS = ("fixed", "metadataset")
#: episodes whose image indices are drawn in one pass: bounds the keys' memory for evaluation's hundreds
INDEX_CHUNK_TASKS = 64


@dataclass(frozen=True)
class EpisodeSpec:
    """The procedure's constants, with the paper's values."""

    min_ways: int = 5
    max_ways: int = 50
    #: queries per class, at most
    max_query: int = 10
    #: support images of an episode, at most
    max_support: int = 500
    #: a class's contribution to the support set's size, at most (not a bound on its images)
    max_support_per_class: int = 100
    min_log_weight: float = math.log(0.5)
    max_log_weight: float = math.log(2.0)

    def ways_range(self, num_classes: int) -> tuple[int, int]:
        return self.min_ways, min(self.max_ways, num_classes)


@dataclass
class PaddedEpisode(Episode):
    """Tasks of different sizes padded to the largest: ``support_x`` ``[tasks, S, ...]`` with ``support_mask``
    ``[tasks, S]`` true for real images, likewise the query set, and ``class_mask`` ``[tasks, ways]`` true for the
    task's real classes (``ways`` is the largest task's). Real samples come first in each row; padding repeats a
    real image with label 0, so nothing downstream sees out-of-range values. ``sizes``: each task's
    ``(ways, support, query)``, known to the host."""

    support_mask: torch.Tensor
    query_mask: torch.Tensor
    class_mask: torch.Tensor
    sizes: list[tuple[int, int, int]]

    def select(self, tasks: slice) -> PaddedEpisode:
        return PaddedEpisode(
            self.support_x[tasks], self.support_y[tasks], self.query_x[tasks], self.query_y[tasks], self.ways,
            self.support_mask[tasks], self.query_mask[tasks], self.class_mask[tasks], self.sizes[tasks],
        )  # fmt: skip

    def to(self, device: torch.device) -> PaddedEpisode:
        tensors = (self.support_x, self.support_y, self.query_x, self.query_y)
        moved = (x.to(device, non_blocking=True) for x in tensors)
        masks = (m.to(device, non_blocking=True) for m in (self.support_mask, self.query_mask, self.class_mask))
        return PaddedEpisode(*moved, self.ways, *masks, self.sizes)

    def task(self, i: int) -> Episode:
        """Task ``i`` at its real size, as a one-task :class:`Episode`."""
        w, s, q = self.sizes[i]
        return Episode(
            self.support_x[i : i + 1, :s],
            self.support_y[i : i + 1, :s],
            self.query_x[i : i + 1, :q],
            self.query_y[i : i + 1, :q],
            w,
        )


@dataclass
class VariableEpisodeIndices:
    """What :meth:`MetaDatasetSampler.sample_indices` draws for ``tasks`` episodes (all int64)."""

    classes: torch.Tensor  # [tasks, max_ways]: the split's classes in label order (beyond ways: unused)
    ways: torch.Tensor  # [tasks]
    shots: torch.Tensor  # [tasks, max_ways]: support images per class, 0 beyond ways
    queries: torch.Tensor  # [tasks]: query images per class
    support: torch.Tensor  # [tasks, max_support]: image numbers into the split's [classes * n] images, class-major
    support_y: torch.Tensor  # [tasks, max_support]
    query: torch.Tensor  # [tasks, max_ways * max_query]
    query_y: torch.Tensor  # [tasks, max_ways * max_query]

    @property
    def support_size(self) -> torch.Tensor:
        return self.shots.sum(1)

    @property
    def query_size(self) -> torch.Tensor:
        return self.ways * self.queries

    def __getitem__(self, item) -> VariableEpisodeIndices:
        return VariableEpisodeIndices(*(getattr(self, f)[item] for f in self.__dataclass_fields__))


def check_split(split: Split, split_name: str, spec: EpisodeSpec) -> None:
    """A split the procedure can draw from: ``min_ways`` classes, two images in each (half of the smallest are queries)."""
    if split.num_classes < spec.min_ways:
        raise ConfigError(
            f"task.protocol=metadataset draws {spec.min_ways} to {spec.max_ways} classes an episode, "
            f"but the {split_name} split has only {split.num_classes} classes"
        )
    if split.min_images_per_class < 2:
        raise ConfigError(
            f"task.protocol=metadataset takes half of a class's images as queries, but the {split_name} split has a class "
            f"of {split.min_images_per_class} image(s): every class needs at least 2"
        )


def sample_descriptions(counts: torch.Tensor, num_tasks: int, spec: EpisodeSpec, g: torch.Generator):
    """Classes, ways, support images per class and queries per class of ``num_tasks`` episodes, drawn on ``g``'s device
    from the split's image ``counts`` per class (steps 1-4 of the module's procedure, for all episodes at once).

    Returns ``(classes [tasks, W], ways [tasks], shots [tasks, W], queries [tasks])`` with ``W`` the largest ways."""
    dev = g.device
    lo, hi = spec.ways_range(counts.numel())
    ways = torch.randint(lo, hi + 1, (num_tasks,), generator=g, device=dev)
    # the smallest keys in ascending order: a uniform subset of every size, in a random order
    classes = torch.rand(num_tasks, counts.numel(), generator=g, device=dev).topk(hi, dim=1, largest=False).indices
    real = torch.arange(hi, device=dev) < ways[:, None]
    images = counts.to(dev)[classes]  # [tasks, W]
    smallest = images.masked_fill(~real, torch.iinfo(images.dtype).max).amin(1)
    queries = torch.clamp(smallest // 2, max=spec.max_query)
    remaining = images - queries[:, None]
    # float64 as numpy computes them, so that floor() breaks at the same values
    beta = torch.rand(num_tasks, 1, generator=g, device=dev, dtype=torch.float64)
    contributions = torch.floor(beta * remaining.clamp(max=spec.max_support_per_class) + 1) * real
    size = contributions.sum(1).clamp(max=spec.max_support)
    log_w = torch.rand(num_tasks, hi, generator=g, device=dev, dtype=torch.float64)
    weights = images * torch.exp(spec.min_log_weight + (spec.max_log_weight - spec.min_log_weight) * log_w) * real
    proportions = weights / weights.sum(1, keepdim=True)
    shots = torch.floor(proportions * (size - ways)[:, None]).long() + 1
    shots = torch.minimum(shots, remaining) * real
    return classes, ways, shots, queries


class MetaDatasetSampler(EpisodeSampler):
    """Seeded Meta-Dataset episodes from one split, on ``device``: :class:`EpisodeSampler`'s options, its gather,
    normalisation and state, with :meth:`sample_indices` and :meth:`gather` for episodes of varying shape."""

    def __init__(
        self,
        split: Split,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        seed: int,
        *,
        split_name: str = "train",
        spec: EpisodeSpec = EpisodeSpec(),
        **options,
    ) -> None:
        check_split(split, split_name, spec)
        # the smallest valid fixed episode, for the base class's own check, which the one above implies
        super().__init__(split, spec.min_ways, 1, 1, mean, std, seed, split_name=split_name, **options)
        self.spec = spec
        n_classes, n_images = split.images.shape[:2]
        counts = split.counts if split.counts is not None else torch.full((n_classes,), n_images, dtype=torch.long)
        self.counts = counts.to(self.device, torch.long)

    @property
    def ways_range(self) -> tuple[int, int]:
        return self.spec.ways_range(self.split.num_classes)

    def sample_indices(self, num_tasks: int, generator: torch.Generator | None = None) -> VariableEpisodeIndices:
        """Descriptions of ``num_tasks`` episodes, then their images: each class's images in a random order, the
        first ``shots`` to the support set, the next ``queries`` to the query set."""
        g = generator or self.generator
        dev, spec = g.device, self.spec
        counts = self.counts.to(dev)
        classes, ways, shots, queries = sample_descriptions(counts, num_tasks, spec, g)
        w = classes.shape[1]
        n_images = self.split.images.shape[1]
        # no class gives more than max_support + max_query images to an episode
        k = min(n_images, spec.max_support + spec.max_query)
        support = torch.zeros(num_tasks, spec.max_support + 1, dtype=torch.long, device=dev)  # + a column for padding
        support_y = torch.zeros_like(support)
        query = torch.zeros(num_tasks, w * spec.max_query + 1, dtype=torch.long, device=dev)
        query_y = torch.zeros_like(query)
        labels = torch.arange(w, device=dev)
        for start in range(0, num_tasks, INDEX_CHUNK_TASKS):
            rows = slice(start, start + INDEX_CHUNK_TASKS)
            c, s, q = classes[rows], shots[rows], queries[rows]
            t = c.shape[0]
            keys = torch.rand(t, w, n_images, generator=g, device=dev)
            keys = keys.masked_fill(torch.arange(n_images, device=dev) >= counts[c][..., None], 2.0)
            order = keys.topk(k, dim=-1, largest=False).indices  # [t, w, k]: positions within each class
            flat = c[..., None] * n_images + order  # image numbers
            # support: class c's first s_c images at slots offset_c .. offset_c + s_c - 1, class after class
            ks = torch.arange(k, device=dev)
            offset = s.cumsum(1) - s
            slot = torch.where(ks < s[..., None], offset[..., None] + ks, spec.max_support)
            support[rows].scatter_(1, slot.flatten(1), flat.flatten(1))
            support_y[rows].scatter_(1, slot.flatten(1), labels[:, None].expand(t, w, k).flatten(1))
            # queries: the next q images of each class, at slots c * q .. c * q + q - 1
            kq = torch.arange(spec.max_query, device=dev)
            real = (kq < q[:, None, None]) & (labels[:, None] < ways[rows, None, None])
            picked = flat.gather(2, (s[..., None] + kq).clamp(max=k - 1))
            slot = torch.where(real, labels[:, None] * q[:, None, None] + kq, w * spec.max_query)
            query[rows].scatter_(1, slot.flatten(1), picked.flatten(1))
            query_y[rows].scatter_(1, slot.flatten(1), labels[:, None].expand(t, w, spec.max_query).flatten(1))
        return VariableEpisodeIndices(
            classes, ways, shots, queries, support[:, :-1], support_y[:, :-1], query[:, :-1], query_y[:, :-1]
        )

    def gather(self, idx: VariableEpisodeIndices) -> PaddedEpisode:
        """The episodes padded to the largest of them, support images then query images in one gather."""
        sizes = [tuple(r) for r in torch.stack([idx.ways, idx.support_size, idx.query_size], 1).tolist()]  # one sync
        w, s, q = (max(col) for col in zip(*sizes, strict=True))
        t = len(sizes)
        support, query = idx.support[:, :s].to(self.device), idx.query[:, :q].to(self.device)
        x = self.images_at(torch.cat([support.flatten(), query.flatten()]))
        dev = self.device
        episode = PaddedEpisode(
            x[: t * s].view(t, s, *x.shape[1:]),
            idx.support_y[:, :s].to(dev),
            x[t * s :].view(t, q, *x.shape[1:]),
            idx.query_y[:, :q].to(dev),
            w,
            torch.arange(s, device=dev) < idx.support_size.to(dev)[:, None],
            torch.arange(q, device=dev) < idx.query_size.to(dev)[:, None],
            torch.arange(w, device=dev) < idx.ways.to(dev)[:, None],
            sizes,
        )
        return episode if self.output_device == self.device else episode.to(self.output_device)
