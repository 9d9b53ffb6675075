"""Several datasets as one: ``dataset=multi dataset.sources=[omniglot,glyphs]``.

Meta-Dataset (Triantafillou et al., 2020) trains on episodes that each come
from one of several datasets, so that a learner meets many domains, but no
episode mixes classes of two of them. Here every source keeps its own splits
and its own :class:`~metarun.data.episodes.EpisodeSampler`; a
:class:`MultiSourceSampler` picks the source of each episode and asks that
source's sampler for it:

* training episodes: each task's source is drawn by ``weights`` (default:
  equal), independently, from the sampler's seeded generator; the tasks of a
  meta-batch are grouped by source (source order), so each source's images
  are one gather, and the meta-batch is one tensor;
* validation and test episodes: the same number from every source (the first
  ``episodes / sources`` from the first source, and so on), so the score is the
  mean over sources, each weighted alike, and an evaluation's ``per_episode``
  list splits into sources by position (:func:`per_source`).

Sources are the dataset options of ``conf/dataset/`` (not ``multi`` itself, nor
generated tasks such as ``sinusoid``), each a name or a mapping of its name and
keys: ``dataset.sources=[{name: omniglot, root: DIR}, glyphs]``. Their images
must have one shape (set ``image_size``/``channels`` to agree). All are
normalised with one mean and standard deviation, those of the pooled training
images of every source, as one model sees them all; a checkpoint records them.
``dataset.augment`` applies to every source.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from metarun.data.episodes import Batch, Episode, EpisodeIndices, EpisodeSampler
from metarun.data.split import FewShotDataset
from metarun.errors import ConfigError

#: dataset options that cannot be sources: this one, and datasets that generate their tasks instead of holding classes
NOT_SOURCES = ("multi", "sinusoid")


@dataclass
class MultiIndices:
    """A batch of tasks drawn from several sources: each task's source, and its indices into that source's split."""

    source: torch.Tensor  # int64 [tasks], non-decreasing
    episodes: EpisodeIndices

    def __getitem__(self, item) -> MultiIndices:
        return MultiIndices(self.source[item], self.episodes[item])

    def __len__(self) -> int:
        return len(self.source)


@dataclass
class MultiSourceDataset:
    """Named source datasets, the weights of their training episodes and the pooled normalisation."""

    name: str
    sources: dict[str, FewShotDataset]
    weights: tuple[float, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    meta: dict = field(default_factory=dict)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return next(iter(self.sources.values())).image_shape

    @property
    def num_train_classes(self) -> int:
        """Classes a pre-training head tells apart: every source's training classes, source after source."""
        return sum(d.splits["train"].num_classes for d in self.sources.values())

    def sampler(
        self, split: str, *, ways: int, shots: int, queries: int, seed: int, device, build_sampler, **engine
    ) -> MultiSourceSampler:
        """Episodes of ``split`` from every source, each built by ``build_sampler``
        (:func:`metarun.factory.build_sampler`, which passes itself) with the ``engine`` options."""
        samplers = {}
        for i, (name, source) in enumerate(self.sources.items()):
            normalised = FewShotDataset(source.name, source.splits, self.mean, self.std, source.meta)
            try:
                # each source's sampler gets its own seed, so two sources never draw the same random numbers
                samplers[name] = build_sampler(
                    normalised, split, ways=ways, shots=shots, queries=queries, seed=seed + 1000003 * i, device=device, **engine
                )
            except ConfigError as e:
                raise ConfigError(f"dataset.sources[{i}]={name}: {e}") from None
        return MultiSourceSampler(samplers, self.weights if split == "train" else None, seed, device)


class MultiSourceSampler:
    """Episodes each drawn from one source's :class:`EpisodeSampler`: by ``weights`` (training) or in equal blocks
    (``weights=None``: validation and test)."""

    def __init__(
        self, samplers: dict[str, EpisodeSampler], weights: Sequence[float] | None, seed: int, device: torch.device | str
    ) -> None:
        self.samplers = list(samplers.values())
        self.names = list(samplers)
        self.weights = None if weights is None else torch.tensor(weights, dtype=torch.float64)
        first = self.samplers[0]
        self.device = first.device
        self.ways, self.shots, self.queries = first.ways, first.shots, first.queries
        self.transform = next((s.transform for s in self.samplers if s.transform is not None), None)
        # on the CPU: the sources' task counts decide the gathers' sizes, and reading them from a GPU would wait for it
        self.generator = torch.Generator().manual_seed(seed)
        # class numbers of each source's training classes in a pre-training head over all of them
        self.class_offsets = torch.tensor([0, *torch.tensor([s.split.num_classes for s in self.samplers]).cumsum(0)[:-1]])

    def assign(self, num_tasks: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Each task's source (CPU, non-decreasing): drawn by weight, or equal blocks without weights."""
        if self.weights is None:
            return torch.arange(num_tasks) * len(self.samplers) // max(num_tasks, 1)
        g = generator if generator is not None and generator.device.type == "cpu" else self.generator
        return torch.multinomial(self.weights, num_tasks, replacement=True, generator=g).sort().values

    def sample_indices(self, num_tasks: int, generator: torch.Generator | None = None) -> MultiIndices:
        """Sources by :meth:`assign`, then each source's tasks from its sampler (its own generator, or ``generator``:
        evaluation's fixed episodes)."""
        source = self.assign(num_tasks, generator)
        parts = [
            sampler.sample_indices(n, generator)
            for sampler, n in zip(self.samplers, torch.bincount(source, minlength=len(self.samplers)).tolist(), strict=True)
            if n
        ]
        devices = {p.classes.device for p in parts}
        if len(devices) > 1:  # evaluation's CPU generator and a source's own one never mix, but be safe
            parts = [EpisodeIndices(p.classes.cpu(), p.images.cpu()) for p in parts]
        return MultiIndices(source, EpisodeIndices(torch.cat([p.classes for p in parts]), torch.cat([p.images for p in parts])))

    def source_of(self, idx: MultiIndices) -> list[str]:
        """The source name of each task of ``idx``."""
        return [self.names[k] for k in idx.source.tolist()]

    def gather(self, idx: MultiIndices) -> Episode:
        """Each source's tasks gathered by its own sampler, concatenated in task order (grouped by source)."""
        ends = torch.bincount(idx.source, minlength=len(self.samplers)).cumsum(0).tolist()
        parts = [
            sampler.gather(idx.episodes[start:end])
            for sampler, start, end in zip(self.samplers, [0, *ends[:-1]], ends, strict=True)
            if end > start
        ]
        if len(parts) == 1:
            return parts[0]
        tensors = zip(*((p.support_x, p.support_y, p.query_x, p.query_y) for p in parts), strict=True)
        return Episode(*(torch.cat(t) for t in tensors), self.ways)

    def sample(self, num_tasks: int, shard: tuple[int, int] = (0, 1)) -> Episode:
        """As :meth:`EpisodeSampler.sample`: with ``shard=(rank, world)``, this rank's contiguous slice of the tasks."""
        idx = self.sample_indices(num_tasks)
        rank, world = shard
        if world == 1:
            return self.gather(idx)
        mine = slice(rank * (num_tasks // world), (rank + 1) * (num_tasks // world))
        return self.gather(idx).select(mine) if self.transform is not None else self.gather(idx[mine])

    def sample_images(self, batch_size: int, shard: tuple[int, int] = (0, 1)) -> Batch:
        """A pre-training mini-batch from one source (drawn by weight), labelled by class over all sources."""
        k = int(self.assign(1)[0]) if self.weights is not None else 0
        batch = self.samplers[k].sample_images(batch_size, shard)
        return Batch(batch.x, batch.y + int(self.class_offsets[k]))

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "sources": [s.state_dict() for s in self.samplers]}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        for sampler, saved in zip(self.samplers, state["sources"], strict=True):
            sampler.load_state_dict(saved)


def per_source(scores: Sequence[float], sources: Sequence[str]) -> dict[str, list[float]]:
    """An evaluation's ``per_episode`` scores by source: the equal blocks :meth:`MultiSourceSampler.assign` made."""
    blocks = torch.arange(len(scores)) * len(sources) // max(len(scores), 1)
    return {name: [s for s, b in zip(scores, blocks.tolist(), strict=True) if b == k] for k, name in enumerate(sources)}


def load(sources: Sequence, weights: Sequence[float] | None = None, *, build_dataset) -> MultiSourceDataset:
    """The datasets named in ``sources`` (names, or mappings of ``name`` and that dataset's keys), each built by
    ``build_dataset`` (:func:`metarun.factory.build_dataset`, which passes itself)."""
    from metarun.config import SCHEMAS, check_values, unknown_key

    if not sources:
        raise ConfigError("dataset.sources is empty: name two or more datasets, e.g. dataset.sources=[omniglot,glyphs]")
    datasets: dict[str, FewShotDataset] = {}
    for i, entry in enumerate(sources):
        options = {"name": entry} if isinstance(entry, str) else dict(entry)
        name = options.pop("name", None)
        if name not in SCHEMAS["dataset"] or name in NOT_SOURCES:
            choices = ", ".join(n for n in SCHEMAS["dataset"] if n not in NOT_SOURCES)
            raise ConfigError(f"dataset.sources[{i}]={name}: a source is one of {choices} (a name or {{name: ..., key: value}})")
        schema = SCHEMAS["dataset"][name]
        try:
            node = OmegaConf.merge(OmegaConf.structured(schema), options)
        except ConfigKeyError as e:
            raise unknown_key(f"dataset.sources[{i}].{e.key}", schema) from None
        except ValidationError as e:
            raise ConfigError(f"dataset.sources[{i}].{e.key}: {e.msg}") from None
        assert isinstance(node, DictConfig)
        check_values(node, schema, f"dataset.sources[{i}].")
        label = name if name not in datasets else f"{name}#{i}"
        datasets[label] = build_dataset(node)
        if not isinstance(datasets[label], FewShotDataset) or not datasets[label].splits["train"].num_classes:
            raise ConfigError(f"dataset.sources[{i}]={name} has no training classes: it cannot be a source of training episodes")
    if weights is None:
        weights = [1.0] * len(datasets)
    if len(weights) != len(datasets) or any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(
            f"dataset.weights={list(weights)}: give one non-negative weight per source ({len(datasets)}), not all zero"
        )
    shapes = {label: d.image_shape for label, d in datasets.items()}
    if len(set(shapes.values())) > 1:
        shown = ", ".join(f"{label} {'x'.join(map(str, s))}" for label, s in shapes.items())
        raise ConfigError(
            f"dataset.sources give images of different shapes ({shown}): set their image_size and channels to agree"
        )
    mean, std = pooled_stats(list(datasets.values()))
    total = float(sum(weights))
    return MultiSourceDataset("+".join(datasets), datasets, tuple(float(w) / total for w in weights), mean, std)


def pooled_stats(datasets: Sequence[FewShotDataset]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of every source's training pixels together, from each source's own statistics."""
    counts = torch.tensor(
        [
            float(d.splits["train"].images.shape[1] * d.splits["train"].num_classes)
            if d.splits["train"].counts is None
            else float(d.splits["train"].counts.sum())
            for d in datasets
        ],
        dtype=torch.float64,
    )[:, None]
    means = torch.tensor([d.mean for d in datasets], dtype=torch.float64)
    squares = torch.tensor([d.std for d in datasets], dtype=torch.float64) ** 2 + means**2
    mean = (counts * means).sum(0) / counts.sum()
    var = ((counts * squares).sum(0) / counts.sum() - mean**2).clamp_min(0)
    return tuple(mean.tolist()), tuple(var.sqrt().tolist())
