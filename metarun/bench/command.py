"""The ``metarun bench`` command: how fast the package is, as ratios to plain code timed in the same run.

Absolute times say more about the machine, and whatever else runs on it, than
about the code, so every figure stands beside a reference implementation
(:mod:`metarun.bench.references`) timed in the same process, interleaved with it
round by round so that a change of load hits both; the ratio is the headline.
Each path is warmed up first (vmap tracing, oneDNN primitive caches, compiled
graphs), then timed for at least ``repeats`` rounds and ``--min-seconds``; the median is kept.

A training row times the trainer's own :func:`metarun.trainer.train_step` (sampling, loss, backward,
all-reduce, clipping, optimiser and schedule steps, NaN policy) on a :class:`~metarun.trainer.Step`
built from the algorithm's composed ``metarun train`` config, with the settings ``metarun train``
chooses by default on the device (``auto``, :mod:`metarun.speed_settings`; ``--precision fp32`` forces
fp32), so the figures are what a user gets by typing the README's commands. Data are random bytes in
the shapes of Omniglot and miniImageNet: speed does not depend on the pixels,
and a fresh clone needs no download.

``--peer learn2learn`` adds rows whose reference is a peer library's own code rather than plain code
(:mod:`metarun.bench.peer_learn2learn`; ``--only peer`` for those alone): they have no target.

Writes ``bench.json`` (machine, and one row per figure: value, reference,
ratio, target, peak memory) and ``bench.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import psutil
import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from metarun.algorithms.base import Algorithm
from metarun.allocator import keep_freed_memory
from metarun.bench import references as ref
from metarun.bench.shapes import ALGORITHMS, GRADIENT_BASED, OMNIGLOT, SHAPES, Shape, default_settings, target
from metarun.bench.timing import MAX_ROUNDS, SAMPLER_ROUNDS, Timing, flops, measure
from metarun.config import EvalConfig, compose, config_dir
from metarun.data.episodes import EpisodeSampler, fixed_episodes
from metarun.data.split import FewShotDataset, Split
from metarun.device import resolve_device
from metarun.errors import MetarunError
from metarun.evaluation import resolve_bn_mode, score_episodes
from metarun.factory import build_algorithm, build_sampler, with_frozen_features
from metarun.speed_settings import SpeedSettings as Settings
from metarun.trainer import Step, build_step, train_step

EVAL_BATCH_TASKS = EvalConfig().batch_tasks  # episodes an evaluation call scores, as `metarun eval` does


# -- what is measured ---------------------------------------------------------------------------
def random_dataset(shape: Shape, name: str) -> FewShotDataset:
    g = torch.Generator().manual_seed(0)

    def split(classes: int) -> Split:
        images = torch.randint(0, 256, (classes, shape.images_per_class, *shape.image), dtype=torch.uint8, generator=g)
        return Split(images, [f"c{i}" for i in range(classes)])

    c = shape.image[0]
    return FewShotDataset(
        name, {"train": split(shape.train_classes), "val": split(20), "test": split(20)}, (0.5,) * c, (0.25,) * c
    )


def compose_run_config(algo: str, shape: Shape, settings: Settings | None = None):
    """The composed ``metarun train`` config of ``algo`` (its recipe) at ``shape``, with a fast path's ``settings``."""
    settings = settings or Settings()
    return compose(
        "train",
        [
            f"algo={algo}",
            "backbone=conv4",
            f"backbone.hidden={shape.hidden}",
            f"task.ways={shape.ways}",
            f"task.shots={shape.shots}",
            f"task.queries={shape.queries}",
            f"task.meta_batch={shape.meta_batch}",
            f"trainer.precision={settings.precision}",
            f"trainer.channels_last={settings.channels_last}",
            f"trainer.compile={settings.compile}",
            f"trainer.fused_sampling={settings.fused_sampling}",
        ],
    )


@dataclass
class Training:
    """What :meth:`Bench.training` builds: the composed config, the algorithm, its trainer step, a reference."""

    cfg: DictConfig
    algorithm: Algorithm
    step: Step
    reference: object | None = None


@dataclass
class Row:
    name: str
    metric: str
    value: float
    reference: str
    reference_value: float
    ratio: float
    target: str | None
    met: bool | None
    peak_mem_mb: float
    reference_peak_mem_mb: float
    shape: str
    settings: str
    gflop_per_s: float | None = None
    rounds: int = 1  # timed calls of each path; the figures are their medians


def make_row(
    *,
    name: str,
    metric: str,
    shape: str,
    value: float,
    reference: str,
    reference_value: float,
    fast: Timing,
    slow: Timing,
    settings: str,
    gflop_per_s: float | None = None,
    has_target: bool = True,
) -> Row:
    ratio = value / reference_value
    goal = target(name, metric, shape) if has_target else None
    met = None if goal is None else (ratio >= goal[1] if goal[0] == ">=" else ratio < goal[1])
    return Row(
        name, metric, value, reference, reference_value, ratio,
        None if goal is None else f"{goal[0]} {goal[1]:g}", met,
        round(fast.peak_mb, 1), round(slow.peak_mb, 1), shape, settings, gflop_per_s, fast.rounds,
    )  # fmt: skip


class Bench:
    def __init__(
        self,
        device: torch.device,
        repeats: int,
        warmup: int,
        eval_episodes: int,
        console: Console,
        min_seconds: float = 0.0,
        precision: str = "auto",
    ) -> None:
        self.device, self.repeats, self.warmup, self.eval_episodes = device, repeats, warmup, eval_episodes
        self.min_seconds = min_seconds
        self.precision = precision
        self.console = console
        self.datasets: dict[tuple, FewShotDataset] = {}
        self.rows: list[Row] = []
        self.protonet_step: dict[str, Timing] = {}
        self.sample_seconds: dict[str, tuple[Timing, str]] = {}  # and the sampler's settings
        self.notes: list[str] = []

    def dataset(self, shape: Shape) -> FewShotDataset:
        key = (shape.image, shape.train_classes, shape.images_per_class)
        if key not in self.datasets:
            self.datasets[key] = random_dataset(shape, shape.name.split("-")[0])
        return self.datasets[key]

    def sampler(self, shape: Shape, split: str, settings: Settings, queries: int | None = None) -> EpisodeSampler:
        q = shape.queries if queries is None else queries
        return build_sampler(
            self.dataset(shape),
            split,
            ways=shape.ways,
            shots=shape.shots,
            queries=q,
            seed=0,
            device=self.device,
            channels_last=settings.channels_last,
            fused=settings.fused_sampling,
            precision=settings.precision,
        )

    def add_rate(
        self,
        name: str,
        metric: str,
        shape: str,
        *,
        count: int,
        fast: Timing,
        slow: Timing,
        reference: str,
        settings: str,
        gflop_per_s: float | None = None,
        has_target: bool = True,
    ) -> None:
        """A row of ``count`` items (tasks, episodes, images) per second, of the fast path and of its reference
        (``has_target=False``: a comparison without a target, such as a peer library's rows)."""
        self.add(
            make_row(
                name=name,
                metric=metric,
                shape=shape,
                value=count / fast.seconds,
                reference=reference,
                reference_value=count / slow.seconds,
                fast=fast,
                slow=slow,
                settings=settings,
                gflop_per_s=gflop_per_s,
                has_target=has_target,
            )  # fmt: skip
        )

    def add(self, row: Row) -> None:
        self.rows.append(row)
        note = f"  {row.gflop_per_s:.1f} GFLOP/s" if row.gflop_per_s else ""
        self.console.print(
            f"  {row.name:9s} {row.shape:21s} {row.metric:20s} {row.value:10.2f}  ×{row.ratio:.2f} vs {row.reference}{note}",
            highlight=False,
        )

    # -- the episode engine -----------------------------------------------------------------
    def bench_sampler(self, shape: Shape) -> None:
        split, ds = self.dataset(shape).splits["train"], self.dataset(shape)
        settings = default_settings("sampler", self.device, precision=self.precision)  # images in the steps' precision
        engine = self.sampler(shape, "train", settings)
        t = shape.meta_batch

        def loader(workers: int) -> ref.DataLoaderEpisodes:
            return ref.DataLoaderEpisodes(split, ds.mean, ds.std, shape.ways, shape.shots, shape.queries, workers=workers)

        # A meta-batch samples in milliseconds, where one scheduler hiccup is a large error (single
        # calls measured 3x-11x the reference from run to run): each timed call samples many.
        def repeated(sample: Callable[[int], object]) -> Callable[[], None]:
            def run() -> None:
                for _ in range(SAMPLER_ROUNDS):
                    sample(t)

            return run

        timing = measure(
            {"engine": repeated(engine.sample), "dataloader(workers=0)": repeated(loader(0).sample)},
            self.repeats,
            self.warmup,
            self.device,
            min_seconds=self.min_seconds,
        )
        # Worker processes refill their prefetch queue between calls, on the same 2 cores: timed
        # alone, and shut down before anything else is timed.
        workers = loader(2)
        timing |= measure(
            {"dataloader(workers=2)": repeated(workers.sample)},
            self.repeats,
            self.warmup,
            self.device,
            min_seconds=self.min_seconds,
        )
        del workers
        timing = {k: replace(v, seconds=v.seconds / SAMPLER_ROUNDS) for k, v in timing.items()}  # per meta-batch
        best = min((k for k in timing if k != "engine"), key=lambda k: timing[k].seconds)
        fast, slow = timing["engine"], timing[best]
        note = f"device={self.device.type}, {settings.precision}" + (", fused" if engine.fused else "")  # (where it applies)
        self.add_rate(
            "sampler", "episodes_per_s", shape.name, count=t, fast=fast, slow=slow,
            reference=best, settings=note,
        )  # fmt: skip
        self.sample_seconds[shape.name] = (fast, note)

    def bench_metadataset_sampler(self, shape: Shape) -> None:
        """Meta-batches of ``shape.meta_batch`` Meta-Dataset episodes (``task.protocol=metadataset``) from a split of
        ``shape``'s images, against drawing them one episode and one image at a time."""
        ds = self.dataset(shape)
        settings = default_settings("sampler", self.device, precision=self.precision)
        engine = build_sampler(
            ds, "train", ways=0, shots=0, queries=0, seed=0, device=self.device, channels_last=settings.channels_last,
            fused=settings.fused_sampling, precision=settings.precision, protocol="metadataset",
        )  # fmt: skip
        reference = ref.MetaDatasetEpisodes(ds.splits["train"], ds.mean, ds.std)
        t = shape.meta_batch

        def repeated(sample: Callable[[int], object]) -> Callable[[], None]:
            def run() -> None:
                for _ in range(SAMPLER_ROUNDS):
                    sample(t)

            return run

        timing = measure(
            {"engine": repeated(engine.sample), "one episode at a time": repeated(reference.sample)},
            self.repeats,
            self.warmup,
            self.device,
            min_seconds=self.min_seconds,
        )
        fast, slow = (replace(timing[k], seconds=timing[k].seconds / SAMPLER_ROUNDS) for k in ("engine", "one episode at a time"))
        self.add_rate(
            "sampler", "metadataset_episodes_per_s", f"{shape.name.split('-')[0]}-metadataset", count=t, fast=fast, slow=slow,
            reference="one episode at a time",
            settings=f"device={self.device.type}, {settings.precision}, {t} episodes a call" + (", fused" if engine.fused else ""),
        )  # fmt: skip

    def bench_sampler_share(self, shape: Shape) -> None:
        """Sampling a meta-batch as a fraction of the ProtoNet meta-step that consumes it (both timed above)."""
        (fast, note), step = self.sample_seconds[shape.name], self.protonet_step[shape.name]
        self.add(
            make_row(
                name="sampler",
                metric="share_of_protonet_step",
                shape=shape.name,
                value=fast.seconds,
                reference="protonet_step",
                reference_value=step.seconds,
                fast=fast,
                slow=step,
                settings=note,
            )  # fmt: skip
        )

    # -- meta-training ---------------------------------------------------------------------------
    def training(self, name: str, shape: Shape, settings: Settings, with_reference: bool = False) -> Training:
        """``metarun train algo=<name>``'s model and trainer step at ``shape`` with ``settings`` (and the per-task
        reference on a plain copy of the same weights, taken before any memory-format change)."""
        cfg = compose_run_config(name, shape, settings)
        dataset = self.dataset(shape)
        torch.manual_seed(0)
        algorithm = build_algorithm(cfg, dataset).to(self.device)
        reference = self.reference(name, algorithm, cfg.trainer.lr) if with_reference else None
        if settings.channels_last:
            algorithm = algorithm.to(memory_format=torch.channels_last)
        algorithm.train()
        return Training(cfg, algorithm, build_step(cfg, dataset, algorithm), reference)

    def bench_train(self, name: str, shape: Shape, settings: Settings) -> None:
        """The trainer's own :func:`~metarun.trainer.train_step` against the per-task reference's step."""
        run = self.training(name, shape, settings, with_reference=True)
        algorithm, step, reference = run.algorithm, run.step, run.reference
        plain = self.sampler(shape, "train", Settings())
        t = shape.meta_batch

        def fast() -> None:
            train_step(step)

        if name == "finetune":  # pre-training: ordinary mini-batches of images
            images = algorithm.batch_size

            def slow() -> None:
                batch = plain.sample_images(images)
                reference.step(batch.x, batch.y)
        else:

            def slow() -> None:
                reference.step(plain.sample(t))

        timing = measure({"fast": fast, "reference": slow}, self.repeats, self.warmup, self.device, min_seconds=self.min_seconds)
        f, s = timing["fast"], timing["reference"]
        if name == "finetune":
            self.add_rate(
                name, "images_per_s", shape.name, count=images, fast=f, slow=s,
                reference="eager_fp32_step", settings=settings.describe(),
            )  # fmt: skip
            return
        gflops = None
        if name == "protonet":
            self.protonet_step[shape.name] = f
            gflops = flops(fast) / f.seconds / 1e9
        what = "per_task_loop" if name in GRADIENT_BASED or isinstance(reference, ref.MAMLReference) else "eager_fp32_per_task"
        self.add_rate(
            name, "tasks_per_s", shape.name, count=t, fast=f, slow=s,
            reference=what, settings=settings.describe(), gflop_per_s=gflops,
        )  # fmt: skip

    # -- any other algorithm: its batched call against its own code one task at a time -------------
    def bench_per_task(self, name: str, shape: Shape, settings: Settings, batch_tasks: int) -> None:
        """Algorithms without a hand-written reference (any ``conf/algo`` option not in :data:`ALGORITHMS`): the
        trainer's step on a meta-batch against the same step on one task at a time, and evaluation in calls of
        ``batch_tasks`` episodes against one episode a call (what batching over tasks buys, with no second copy
        of the algorithm to keep in step), or against plain per-episode code where the references have it
        (:data:`~metarun.bench.references.EVALUATION_REFERENCES`)."""
        cfg = compose_run_config(name, shape, settings)
        dataset = self.dataset(shape)
        try:
            torch.manual_seed(0)
            algorithm = build_algorithm(cfg, dataset).to(self.device)
        except MetarunError as e:  # e.g. a two-stage learner that needs an earlier run's weights
            self.console.print(f"  {name:9s} skipped: {e}", highlight=False)
            return
        if getattr(algorithm, "pretrain_steps", 0):  # two stages (the weight generator): time the one that meta-learns
            algorithm.steps_taken.fill_(algorithm.pretrain_steps)
        if settings.channels_last:
            algorithm = algorithm.to(memory_format=torch.channels_last)
        algorithm.train()
        t = shape.meta_batch
        batched = build_step(cfg, dataset, algorithm)
        one = build_step(cfg, dataset, algorithm)
        one.meta_batch = 1

        def loop() -> None:
            for _ in range(t):
                train_step(one)

        timing = measure(
            {"fast": lambda: train_step(batched), "reference": loop}, self.repeats, self.warmup, self.device,
            min_seconds=self.min_seconds,
        )  # fmt: skip
        f, s = timing["fast"], timing["reference"]
        self.add_rate(
            name, "tasks_per_s", shape.name, count=t, fast=f, slow=s,
            reference="same_code_per_task", settings=settings.describe(),
        )  # fmt: skip
        bn_mode = resolve_bn_mode(algorithm, None)
        sampler = self.sampler(shape, "test", settings, queries=15)
        n = self.eval_episodes

        def score(calls_of: int, episodes: int = n) -> None:
            score_episodes(
                algorithm, sampler, episodes=episodes, seed=1, batch_tasks=calls_of, bn_mode=bn_mode,
                precision=settings.precision,
            )  # fmt: skip

        def reference(episodes: int = n) -> None:
            score(1, episodes)

        what = "same_code_one_episode"
        if name in ref.EVALUATION_REFERENCES:  # plain per-episode code, as the hand-written references score
            plain_scorer = ref.EVALUATION_REFERENCES[name](algorithm)
            plain = self.sampler(shape, "test", Settings(), queries=15)
            indices = fixed_episodes(plain, n, 1)
            what = "one_episode_loop"

            def reference(episodes: int = n) -> None:
                for i in range(episodes):
                    plain_scorer.score(plain.gather(indices[i : i + 1]))

        timing = measure(
            {"fast": lambda: score(batch_tasks), "reference": reference}, self.repeats, min(self.warmup, 1),
            self.device, {"fast": lambda: score(batch_tasks, batch_tasks), "reference": lambda: reference(2)},
            self.min_seconds,
        )  # fmt: skip
        f, s = timing["fast"], timing["reference"]
        self.add_rate(
            name, "eval_episodes_per_s", shape.name, count=n, fast=f, slow=s,
            reference=what, settings=f"{settings.describe()}, batch_tasks={batch_tasks}",
        )  # fmt: skip

    def reference(self, name: str, algorithm, lr: float):
        kind = {
            "protonet": ref.ProtoNetReference, "reptile": ref.ReptileReference, "finetune": ref.FinetuneReference,
            "relation": ref.RelationReference, "matching": ref.MatchingReference, "incontext": ref.InContextReference,
            "metalstm": ref.MetaLSTMReference, "protomaml": ref.ProtoMAMLReference,
        }  # fmt: skip
        return kind.get(name, ref.MAMLReference)(algorithm, lr)

    # -- evaluation ----------------------------------------------------------------------------
    def bench_eval(self, name: str, shape: Shape, settings: Settings, batch_tasks: int) -> None:
        cfg = compose_run_config(name, shape)
        torch.manual_seed(0)
        algorithm = build_algorithm(cfg, self.dataset(shape)).to(self.device)
        reference = self.reference(name, algorithm, cfg.trainer.lr)
        if settings.channels_last:
            algorithm = algorithm.to(memory_format=torch.channels_last)
        bn_mode = resolve_bn_mode(algorithm, None)
        sampler = self.sampler(shape, "test", settings, queries=15)
        plain = self.sampler(shape, "test", Settings(), queries=15)
        n = self.eval_episodes
        indices = fixed_episodes(plain, n, 1)

        def fast(episodes: int = n) -> None:
            score_episodes(
                algorithm, sampler, episodes=episodes, seed=1, batch_tasks=batch_tasks, bn_mode=bn_mode,
                precision=settings.precision,
            )  # fmt: skip

        def slow(episodes: int = n) -> None:
            for i in range(episodes):
                reference.score(plain.gather(indices[i : i + 1]))

        # warm-up on a full call and the last, partial one: Reptile's 600 episodes take minutes a path
        warm = {"fast": lambda: fast(min(n, batch_tasks + n % batch_tasks)), "reference": lambda: slow(2)}
        timing = measure(
            {"fast": fast, "reference": slow}, self.repeats, min(self.warmup, 1), self.device, warm, self.min_seconds
        )
        f, s = timing["fast"], timing["reference"]
        gflops = None
        if name == "protonet":
            gflops = flops(fast) / f.seconds / 1e9
        self.add_rate(
            name, "eval_episodes_per_s", shape.name, count=n, fast=f, slow=s,
            reference="one_episode_loop", settings=f"{settings.describe()}, batch_tasks={batch_tasks}", gflop_per_s=gflops,
        )  # fmt: skip

    # -- the frozen-feature pipeline --------------------------------------------------------------
    def bench_frozen_features(self, settings: Settings) -> None:
        """Evaluation with a frozen ResNet-18 at 84x84 (ProtoNet on its features): episodes drawn from the test
        split's features, computed once, against the backbone run on every episode; the pass itself is a note."""
        shape = SHAPES["miniimagenet-5w1s15q"]
        overrides = ["backbone=resnet18", "backbone.weights=none", "backbone.freeze=all", "backbone.image_size=84"]
        cfg = compose("train", ["algo=protonet", *overrides, "trainer.steps=0", f"trainer.precision={settings.precision}"])
        dataset = self.dataset(shape)
        torch.manual_seed(0)
        direct = build_algorithm(cfg, dataset).to(self.device)
        cached = build_algorithm(cfg, dataset).to(self.device)
        features = with_frozen_features(cfg, dataset, cached, self.device)
        samplers = {
            "fast": build_sampler(features, "test", ways=5, shots=1, queries=15, seed=0, device=self.device),
            "reference": self.sampler(shape, "test", replace(settings, channels_last=False), queries=15),
        }
        models = {"fast": cached, "reference": direct}
        n = min(self.eval_episodes, 4 * EVAL_BATCH_TASKS)  # per-episode ResNet-18 forwards take seconds an episode
        bn_mode = resolve_bn_mode(direct, None)

        def scorer(path: str) -> Callable[[], None]:
            return lambda: score_episodes(
                models[path], samplers[path], episodes=n, seed=1, batch_tasks=EVAL_BATCH_TASKS, bn_mode=bn_mode,
                precision=settings.precision,
            )  # fmt: skip

        start = time.perf_counter()
        split = features.features("test", settings.precision)  # what the first evaluation of a run pays once
        seconds = time.perf_counter() - start
        images = split.num_classes * split.images.shape[1]
        timing = measure(
            {"fast": scorer("fast"), "reference": scorer("reference")}, self.repeats, 1, self.device, None, self.min_seconds
        )
        f, s = timing["fast"], timing["reference"]
        self.add_rate(
            "frozen_features", "eval_episodes_per_s", f"{shape.name}-resnet18", count=n, fast=f, slow=s,
            reference="backbone_every_episode", settings=f"{settings.describe()}, batch_tasks={EVAL_BATCH_TASKS}",
        )  # fmt: skip
        self.notes.append(
            f"frozen ResNet-18 84x84: one pass over the {images}-image test split took {seconds:.1f} s "
            f"({images / seconds:.0f} images/s); 600 episodes with a pass over a miniImageNet-sized test split "
            f"(12000 images) first: {12000 / images * seconds + 600 * f.seconds / n:.0f} s, against "
            f"{600 * s.seconds / n:.0f} s with the backbone on every episode"
        )


# -- reporting ----------------------------------------------------------------------------------
def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores_logical": psutil.cpu_count(logical=True),
        "cores_physical": psutil.cpu_count(logical=False),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        # the bf16 recommendation holds where bf16 arithmetic is native; elsewhere autocast emulates it
        "cpu_native_bf16": bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "device": str(device),
        "load_average": load_average(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def algorithm_options() -> list[str]:
    """Every ``algo=`` option (``conf/algo/*.yaml``)."""
    return sorted(p.stem for p in Path(config_dir(), "algo").glob("*.yaml"))


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, where the platform has them (not on Windows)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def results_table(rows: list[Row]) -> Table:
    table = Table(title="metarun bench (ratio = value / reference value, both measured in this run)")
    for col in (
        "name",
        "shape",
        "metric",
        "value",
        "reference",
        "ref. value",
        "ratio",
        "target",
        "peak MB",
        "ref. peak MB",
        "settings",
    ):
        table.add_column(col, justify="left" if col in ("name", "shape", "metric", "reference", "settings") else "right")
    for r in rows:
        met = "" if r.met is None else (" ✓" if r.met else " ✗")
        value = f"{r.value:.4f} s" if r.metric == "share_of_protonet_step" else f"{r.value:.1f}"
        ref_value = f"{r.reference_value:.3f} s" if r.metric == "share_of_protonet_step" else f"{r.reference_value:.1f}"
        if r.gflop_per_s:
            value += f" ({r.gflop_per_s:.0f} GFLOP/s)"
        table.add_row(
            r.name,
            r.shape,
            r.metric,
            value,
            r.reference,
            ref_value,
            f"{r.ratio:.3g}",
            (r.target or "") + met,
            f"{r.peak_mem_mb:.0f}",
            f"{r.reference_peak_mem_mb:.0f}",
            r.settings,
        )
    return table


def markdown(machine: dict, rows: list[Row], notes: list[str]) -> str:
    head = "| name | shape | metric | value | reference | reference value | ratio | target | met | peak MB | reference peak MB | settings |"
    lines = [
        "# metarun bench",
        "",
        f"{machine['cpu']}, {machine['cores_logical']} cores ({machine['cpu_capability']}), torch {machine['torch']}, "
        f"{machine['threads']} threads, device {machine['device']}" + (f" ({machine['gpu']})" if "gpu" in machine else ""),
        f"load average at start: {machine['load_average']}",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for r in rows:
        met = "" if r.met is None else ("yes" if r.met else "**no**")
        lines.append(
            f"| {r.name} | {r.shape} | {r.metric} | {r.value:.4g}"
            + (f" ({r.gflop_per_s:.1f} GFLOP/s)" if r.gflop_per_s else "")
            + f" | {r.reference} | {r.reference_value:.4g} | {r.ratio:.3g} | {r.target or ''} | {met} | {r.peak_mem_mb:.0f} | {r.reference_peak_mem_mb:.0f} | {r.settings} |"
        )
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


# -- the command ------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="metarun bench", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="a short run (about 2 minutes on 2 CPU cores): smaller meta-batches, fewer shapes, rounds and episodes",
    )
    ap.add_argument("--out", default="outputs/bench", help="folder for bench.json and bench.md (default: outputs/bench)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="the fast paths' trainer.precision (default: auto, what `metarun train` chooses on this device)",
    )
    ap.add_argument(
        "--only",
        default=None,
        help="comma-separated names to run (e.g. sampler,protonet,frozen_features); 'peer' names the --peer rows (--peer learn2learn --only peer: those alone)",
    )
    ap.add_argument(
        "--peer",
        default=None,
        choices=("learn2learn",),
        help="also time a peer library's own code against metarun's on the same shapes and Conv4: learn2learn's "
        "TaskDataset, MAML clone/adapt (second and first order), ANIL and ProtoNet steps; run from the environment "
        "`bash scripts/install_learn2learn.sh` builds (.venv-learn2learn/bin/metarun bench --peer learn2learn)",
    )
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds per figure, at least (default: 3, quick: 2)")
    ap.add_argument(
        "--min-seconds",
        type=float,
        default=None,
        help=f"more rounds (up to {MAX_ROUNDS}) until a figure's timed calls add up to this (default: 6, quick: 1)",
    )
    args = ap.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        ap.error(f"--repeats {args.repeats}: at least one round is timed")
    if args.min_seconds is not None and args.min_seconds < 0:
        ap.error(f"--min-seconds {args.min_seconds}: must be >= 0")
    if args.only and "peer" in args.only.split(",") and not args.peer:
        ap.error("--only peer: the peer rows need --peer learn2learn")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    peer = None
    if args.peer:  # before anything is timed: without the peer there is nothing to compare
        from metarun.bench.peer_learn2learn import import_learn2learn

        peer = import_learn2learn()
    keep_freed_memory()  # as the CLI does: both the package and the references run with it
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    console = Console()
    if not console.is_terminal:
        console = Console(width=220)  # a file or a pipe: keep the table's rows on one line each
    only = set(args.only.split(",")) if args.only else None
    others = [n for n in algorithm_options() if n not in ALGORITHMS]  # measured against their own per-task calls
    wanted = [n for n in ("sampler", *ALGORITHMS, *others) if only is None or n in only]
    machine = machine_info(device)
    if peer is not None:
        machine["learn2learn"] = peer.__version__
    quick = args.quick
    repeats = args.repeats or (2 if quick else 3)
    min_seconds = args.min_seconds if args.min_seconds is not None else (1.0 if quick else 6.0)
    # quick: one evaluation call (Reptile's 50 inner steps an episode took half the run at 32 episodes)
    bench = Bench(device, repeats, 1, EVAL_BATCH_TASKS if quick else 600, console, min_seconds, args.precision)
    shapes = dict(SHAPES)
    if quick:  # fewer tasks per meta-step where tasks are large; the MAML paper's small tasks keep the targets' 32
        shapes = {
            k: replace(s, meta_batch=max(2, s.meta_batch // 4)) if s.queries > 1 else s
            for k, s in shapes.items()
            if k in (OMNIGLOT.name, "omniglot-5w1s1q")
        }
    console.print(
        f"[bold]metarun bench[/]{' --quick' if quick else ''}: {machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}, {device}"
    )
    t0 = time.perf_counter()
    if "sampler" in wanted:
        for shape in shapes.values():
            if shape.queries == 15 and shape.shots == 1:
                bench.bench_sampler(shape)
                bench.bench_metadataset_sampler(shape)
    for name in wanted[1:] if "sampler" in wanted else wanted:
        settings = default_settings(name, device, precision=args.precision)
        if name in others:
            bench.bench_per_task(name, shapes[OMNIGLOT.name], settings, batch_tasks=EVAL_BATCH_TASKS)
            continue
        for shape in shapes.values():
            if name in GRADIENT_BASED or shape.queries == 15 and shape.shots == 1:
                bench.bench_train(name, shape, settings)
        bench.bench_eval(name, shapes[OMNIGLOT.name], settings, batch_tasks=EVAL_BATCH_TASKS)
    if "sampler" in wanted and "protonet" in wanted:
        for name in bench.protonet_step:
            bench.bench_sampler_share(shapes[name])
    if only is not None and "frozen_features" in only or only is None and not quick:
        bench.bench_frozen_features(default_settings("protonet", device, precision=args.precision))
    peer_notes = []
    if peer is not None and (only is None or "peer" in only):
        from metarun.bench.peer_learn2learn import bench_learn2learn

        peer_notes = bench_learn2learn(peer, bench, quick)

    notes = [f"total time {time.perf_counter() - t0:.0f} s; load average at the end {load_average()}", *bench.notes, *peer_notes]
    conv = build_algorithm(compose_run_config("protonet", OMNIGLOT), bench.dataset(OMNIGLOT))
    x = torch.randn(100, *OMNIGLOT.image)
    episode_flops = flops(lambda: conv.backbone(x).sum().backward())
    notes.append(f"Conv4 forward + backward on one 100-image 28x28 episode: {episode_flops / 1e9:.2f} GFLOP (FlopCounterMode)")
    misses = [f"{r.name} {r.metric} {r.shape}: ×{r.ratio:.3g} (target {r.target})" for r in bench.rows if r.met is False]
    notes.append("targets missed: " + ("; ".join(misses) if misses else "none"))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": machine | {"quick": quick, "repeats": repeats, "min_seconds": min_seconds},
        "results": [asdict(r) for r in bench.rows],
        "notes": notes,
    }
    (out / "bench.json").write_text(json.dumps(payload, indent=1))
    (out / "bench.md").write_text(markdown(machine, bench.rows, notes))
    console.print(results_table(bench.rows))
    for n in notes:
        console.print(f"- {n}", highlight=False)
    console.print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0
