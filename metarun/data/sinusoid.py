"""Sinusoid regression, the MAML paper's toy problem (Finn et al. 2017, section 5.1).

A task is ``y = A sin(x − φ)`` with amplitude ``A ~ U[0.1, 5]``, phase
``φ ~ U[0, π]`` and inputs ``x ~ U[−5, 5]``; a learner sees ``K = task.shots``
points of a new task and is scored by the mean squared error on
``task.queries`` (``eval.queries`` at evaluation) more. There are no files and
no classes: the dataset object generates tasks, and ``metarun.factory.build_sampler``
asks it for a sampler (:meth:`Sinusoid.sampler`) with the protocol of
:class:`metarun.data.episodes.EpisodeSampler`. Episodes hold ``x`` and ``y`` as
float ``[tasks, K, 1]``; ``ways`` is always 1 (one output). The splits are the
same distribution and differ only by their random stream: each split mixes
its own constant into every seed, so validation and test tasks never repeat
training tasks even when the seeds coincide.

Use with ``backbone=mlp`` (two hidden layers of 40, the paper's) and a
regression-capable algorithm (``algo=maml``, ``fomaml``, ``metasgd``, ``anil``,
``reptile``): ``experiment=maml_sinusoid`` sets everything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from metarun.data.episodes import Episode
from metarun.errors import ConfigError

#: mixed into the seeds of each split's random stream
SPLIT_SALT = {"train": 0x5EED_0001, "val": 0x5EED_0002, "test": 0x5EED_0003}


@dataclass
class SinusoidTasks:
    """What :meth:`SinusoidSampler.sample_indices` draws: everything that defines a batch of tasks."""

    amplitude: torch.Tensor  # [tasks]
    phase: torch.Tensor  # [tasks]
    x: torch.Tensor  # [tasks, shots + queries]

    def __getitem__(self, item) -> SinusoidTasks:
        return SinusoidTasks(self.amplitude[item], self.phase[item], self.x[item])

    def __len__(self) -> int:
        return self.amplitude.shape[0]


class SinusoidSampler:
    """Seeded sinusoid tasks of one split, on ``device``, with the episode sampler's protocol."""

    def __init__(self, split: str, shots: int, queries: int, seed: int, device, amplitude, phase, x_range) -> None:
        if split not in SPLIT_SALT:
            raise ConfigError(f"sinusoid: unknown split {split}; valid splits are {', '.join(SPLIT_SALT)}")
        if shots <= 0 or queries <= 0:
            raise ConfigError(f"sinusoid: shots={shots}, queries={queries}: both must be positive")
        self.split, self.ways, self.shots, self.queries = split, 1, shots, queries
        self.device = torch.device(device)
        self.amplitude, self.phase, self.x_range = tuple(amplitude), tuple(phase), tuple(x_range)
        self.salt = SPLIT_SALT[split]
        self.generator = torch.Generator(device=self.device).manual_seed((seed ^ self.salt) % 2**63)

    def sample_indices(self, num_tasks: int, generator: torch.Generator | None = None) -> SinusoidTasks:
        if generator is None:
            g = self.generator
        else:  # a caller's generator (fixed evaluation episodes): a stream of this split derived from it
            seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
            g = torch.Generator(device=generator.device).manual_seed(seed ^ self.salt)

        def uniform(lo_hi, *shape):
            lo, hi = lo_hi
            return lo + (hi - lo) * torch.rand(*shape, generator=g, device=g.device)

        return SinusoidTasks(
            uniform(self.amplitude, num_tasks),
            uniform(self.phase, num_tasks),
            uniform(self.x_range, num_tasks, self.shots + self.queries),
        )

    def gather(self, tasks: SinusoidTasks) -> Episode:
        a, p, x = (t.to(self.device) for t in (tasks.amplitude, tasks.phase, tasks.x))
        y = a[:, None] * torch.sin(x - p[:, None])
        x, y = x[..., None], y[..., None]  # [tasks, K + Q, 1]
        k = self.shots
        return Episode(x[:, :k], y[:, :k], x[:, k:], y[:, k:], 1)

    def sample(self, num_tasks: int, shard: tuple[int, int] = (0, 1)) -> Episode:
        tasks = self.sample_indices(num_tasks)
        rank, world = shard
        if world > 1:
            per = num_tasks // world
            tasks = tasks[rank * per : (rank + 1) * per]
        return self.gather(tasks)

    def sample_images(self, batch_size: int, shard: tuple[int, int] = (0, 1)):
        raise ConfigError("dataset=sinusoid has no classes to pre-train on (algo=finetune needs a classification dataset)")

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class Sinusoid:
    """The dataset object: generates tasks, holds no data."""

    name = "sinusoid"
    image_shape = (1,)
    task_kind = "regression"

    def __init__(self, amplitude=(0.1, 5.0), phase=(0.0, math.pi), x_range=(-5.0, 5.0)) -> None:
        for key, (lo, hi) in (("amplitude", amplitude), ("phase", phase), ("x_range", x_range)):
            if not lo <= hi:
                raise ConfigError(f"dataset.{key}=[{lo}, {hi}]: the lower end must not exceed the upper")
        self.amplitude, self.phase, self.x_range = tuple(amplitude), tuple(phase), tuple(x_range)

    def sampler(self, split: str, ways: int, shots: int, queries: int, seed: int, device) -> SinusoidSampler:
        if ways != 1:
            raise ConfigError(
                f"dataset=sinusoid has one output, so ways must be 1 (got {ways}): set task.ways=1 and eval.settings=[{{ways:1,shots:10}}], or use experiment=maml_sinusoid"
            )
        return SinusoidSampler(split, shots, queries, seed, device, self.amplitude, self.phase, self.x_range)


def load(amplitude=(0.1, 5.0), phase=(0.0, math.pi), x_range=(-5.0, 5.0)) -> Sinusoid:
    return Sinusoid(amplitude, phase, x_range)
