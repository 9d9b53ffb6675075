"""``make bench`` / ``metarun bench``: how fast the package is, as ratios to plain code timed in the same run.

Absolute times say more about the machine, and whatever else runs on it, than
about the code, so every figure stands beside a reference implementation
(:mod:`metarun.bench_reference`) timed in the same process, interleaved with it
round by round so that a change of load hits both; the ratio is the headline.
Each path is warmed up first (vmap tracing, oneDNN primitive caches, compiled
graphs), then timed for at least ``repeats`` rounds and ``--min-seconds``; the median is kept.

The fast path is built from the same calls as ``metarun train`` (the config's
algorithm and optimiser through :mod:`metarun.factory`, the episode engine,
:func:`metarun.device.autocast`, ``GradScaler``, channels_last, optional
``torch.compile``) with the settings the README recommends for the device, so
the figures are what a user gets with those settings. Data are random bytes in
the shapes of Omniglot and miniImageNet: speed does not depend on the pixels,
and a fresh clone needs no download.

Writes ``bench.json`` (machine, and one row per figure: value, reference,
ratio, target, peak memory) and ``bench.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import psutil
import torch
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from metarun import bench_reference as ref
from metarun.allocator import keep_freed_memory
from metarun.config import EvalConfig, compose
from metarun.data.episodes import EpisodeSampler, fixed_episodes
from metarun.data.split import FewShotDataset, Split
from metarun.device import autocast, compile_step, resolve_device, synchronize
from metarun.evaluation import resolve_bn_mode, score_episodes
from metarun.factory import build_algorithm, build_optimizer, build_sampler

GRADIENT_BASED = ("maml", "fomaml", "anil", "metasgd", "reptile")
SAMPLER_ROUNDS = 20  # meta-batches sampled per timed call
EVAL_BATCH_TASKS = EvalConfig().batch_tasks  # episodes an evaluation call scores, as `metarun eval` does
MAX_ROUNDS = 25  # timed rounds per figure, at most
ALGORITHMS = (*GRADIENT_BASED, "protonet", "finetune")


@dataclass(frozen=True)
class Shape:
    name: str
    image: tuple[int, int, int]
    hidden: int  # Conv4 filters
    ways: int
    shots: int
    queries: int
    meta_batch: int
    train_classes: int
    images_per_class: int


OMNIGLOT = Shape("omniglot-5w1s15q", (1, 28, 28), 64, 5, 1, 15, 32, 1000, 20)
SHAPES = {
    s.name: s
    for s in (
        OMNIGLOT,
        replace(OMNIGLOT, name="omniglot-5w1s1q", queries=1),  # the MAML paper's Omniglot setting
        replace(OMNIGLOT, name="omniglot-5w5s15q", shots=5),
        Shape("miniimagenet-5w1s15q", (3, 84, 84), 32, 5, 1, 15, 4, 64, 60),
    )
}


@dataclass(frozen=True)
class Settings:
    """The trainer settings of a fast path (``trainer.channels_last``, ``.precision``, ``.compile``, ``.fused_sampling``)."""

    channels_last: bool = False
    precision: str = "fp32"
    compile: bool = False
    fused_sampling: bool = False

    def describe(self) -> str:
        flags = ("channels_last", "compile", "fused_sampling")
        return "+".join([self.precision] + [flag for flag in flags if getattr(self, flag)])


def recommended(name: str, device: torch.device) -> Settings:
    """The settings the README recommends (and this benchmark measures) per algorithm and device.

    On a CPU with AVX-512 BF16, bf16 halves the memory traffic of the elementwise work (batch norm, its
    double backward, ReLU) on Conv4's 28x28 activations, which is most of a gradient-based meta-step.
    channels_last pays where the convolutions' weights are shared by all tasks (ProtoNet, finetune,
    ANIL's backbone); on the grouped per-task convolutions of MAML and its kin it cost 12-19%
    (``metarun bench --quick``, 2 cores). Fused sampling applies where the data live on a CPU.
    """
    channels_last = device.type == "cuda" or name in ("protonet", "finetune", "anil")
    return Settings(channels_last=channels_last, precision="bf16", fused_sampling=device.type == "cpu")


# -- targets: (operator, threshold) on the ratio ------------------------------------------------
def target(name: str, metric: str, shape: str) -> tuple[str, float] | None:
    if name == "sampler":
        return (">=", 10.0) if metric == "episodes_per_s" else ("<", 0.01)
    if metric == "eval_episodes_per_s":
        return (">=", 3.0)
    if shape == "omniglot-5w1s1q" and name == "maml":
        return (">=", 2.5)
    if shape == "omniglot-5w1s1q" and name in ("fomaml", "anil"):
        return (">=", 3.0)
    if name == "protonet" and shape == OMNIGLOT.name:
        return (">=", 1.5)
    return (">=", 1.0)  # no shape slower than the reference


# -- measuring ---------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory of the process above its level at entry, in MB: CUDA allocations on a GPU, RSS otherwise.

    Linux resets the RSS high-water mark on request (``/proc/self/clear_refs``),
    so each measurement gets its own peak; elsewhere the lifetime peak of
    ``getrusage`` is the best available.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mb = 0.0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            release_free_memory()
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
            self.start = psutil.Process().memory_info().rss
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = rss_peak()
        self.mb = max(peak - self.start, 0) / 2**20


def release_free_memory() -> None:
    """Hands freed heap memory back to the OS (glibc), so that RSS counts what a measurement allocates anew."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_peak() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@dataclass
class Timing:
    seconds: float
    peak_mb: float
    rounds: int = 1


def measure(
    paths: dict[str, Callable[[], None]],
    repeats: int,
    warmup: int,
    device: torch.device,
    warm: dict[str, Callable[[], None]] | None = None,
    min_seconds: float = 0.0,
) -> dict[str, Timing]:
    """Median seconds per call of each path, the paths interleaved round by round (order alternating).

    ``warm``: a cheaper call per path for the warm-up, with the same shapes (a few of 600 episodes).
    Peak memory is taken on one more call after the timed ones: measuring it hands the freed heap
    back to the OS first, and a timed call after that would fault all its memory in again, a cost a
    training run pays once, not every step.

    At least ``repeats`` rounds are timed, and more (up to ``MAX_ROUNDS``) until the rounds add up to
    ``min_seconds``: a median of 3 calls of a 0.1 s step swung a ratio by 10% from run to run.
    """
    untimed = {name: (warm or {}).get(name, fn) for name, fn in paths.items()}
    for call in untimed.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {k: [] for k in paths}

    def timed_round(r: int) -> None:
        for name in list(paths) if r % 2 == 0 else list(paths)[::-1]:
            synchronize(device)
            t0 = time.perf_counter()
            paths[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)

    timed_round(0)  # tells how many rounds fit in min_seconds
    spent = sum(t[0] for t in times.values())
    rounds = max(repeats, min(MAX_ROUNDS, math.ceil(min_seconds / spent))) if spent > 0 else repeats
    for r in range(1, rounds):
        timed_round(r)
    peaks = {}
    for name, call in untimed.items():
        with PeakMemory(device) as mem:
            call()
        peaks[name] = mem.mb
    return {k: Timing(statistics.median(v), peaks[k], len(v)) for k, v in times.items()}


def flops(fn: Callable[[], None]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


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


def compose_run_config(algo: str, shape: Shape):
    """The composed ``metarun train`` config of ``algo`` (its recipe) at ``shape``."""
    overrides = [
        f"algo={algo}",
        "backbone=conv4",
        f"backbone.hidden={shape.hidden}",
        f"task.ways={shape.ways}",
        f"task.shots={shape.shots}",
        f"task.queries={shape.queries}",
        f"task.meta_batch={shape.meta_batch}",
    ]
    return compose("train", overrides)


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
) -> Row:
    ratio = value / reference_value
    goal = target(name, metric, shape)
    met = None if goal is None else (ratio >= goal[1] if goal[0] == ">=" else ratio < goal[1])
    return Row(
        name, metric, value, reference, reference_value, ratio,
        None if goal is None else f"{goal[0]} {goal[1]:g}", met,
        round(fast.peak_mb, 1), round(slow.peak_mb, 1), shape, settings, gflop_per_s, fast.rounds,
    )  # fmt: skip


class Bench:
    def __init__(
        self, device: torch.device, repeats: int, warmup: int, eval_episodes: int, console: Console, min_seconds: float = 0.0
    ) -> None:
        self.device, self.repeats, self.warmup, self.eval_episodes = device, repeats, warmup, eval_episodes
        self.min_seconds = min_seconds
        self.console = console
        self.datasets: dict[tuple, FewShotDataset] = {}
        self.rows: list[Row] = []
        self.protonet_step: dict[str, Timing] = {}
        self.sample_seconds: dict[str, tuple[Timing, str]] = {}  # and the sampler's settings

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
            shape.ways,
            shape.shots,
            q,
            0,
            self.device,
            channels_last=settings.channels_last,
            fused=settings.fused_sampling,
            precision=settings.precision,
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
        settings = recommended("sampler", self.device)  # images in the precision the steps take them in
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
        self.add(
            make_row(
                "sampler",
                "episodes_per_s",
                shape.name,
                t / fast.seconds,
                best,
                t / slow.seconds,
                fast,
                slow,
                note,
            )
        )
        self.sample_seconds[shape.name] = (fast, note)

    def bench_sampler_share(self, shape: Shape) -> None:
        """Sampling a meta-batch as a fraction of the ProtoNet meta-step that consumes it (both timed above)."""
        (fast, note), step = self.sample_seconds[shape.name], self.protonet_step[shape.name]
        self.add(
            make_row(
                "sampler",
                "share_of_protonet_step",
                shape.name,
                fast.seconds,
                "protonet_step",
                step.seconds,
                fast,
                step,
                note,
            )
        )

    # -- meta-training ---------------------------------------------------------------------------
    def bench_train(self, name: str, shape: Shape, settings: Settings) -> None:
        cfg = compose_run_config(name, shape)
        dataset = self.dataset(shape)
        torch.manual_seed(0)
        algorithm = build_algorithm(cfg, dataset).to(self.device)
        reference = self.reference(name, algorithm, cfg.trainer.lr)
        if settings.channels_last:
            algorithm = algorithm.to(memory_format=torch.channels_last)
        algorithm.train()
        tr = cfg.trainer
        optimizer = build_optimizer(algorithm, tr.optimizer, tr.lr, tr.weight_decay)
        scaler = torch.amp.GradScaler(self.device.type, enabled=settings.precision == "fp16")
        loss_fn = compile_step(algorithm) if settings.compile else algorithm.training_loss
        sampler = self.sampler(shape, "train", settings)
        plain = self.sampler(shape, "train", Settings())
        t = shape.meta_batch

        def fast() -> None:
            batch = algorithm.sample_batch(sampler, t)
            with autocast(self.device, settings.precision):
                loss, _ = loss_fn(batch)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

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
            self.add(
                make_row(
                    name,
                    "images_per_s",
                    shape.name,
                    images / f.seconds,
                    "eager_fp32_step",
                    images / s.seconds,
                    f,
                    s,
                    settings.describe(),
                )
            )
            return
        gflops = None
        if name == "protonet":
            self.protonet_step[shape.name] = f
            gflops = flops(fast) / f.seconds / 1e9
        what = "per_task_loop" if name in GRADIENT_BASED else "eager_fp32_per_task"
        self.add(make_row(name, "tasks_per_s", shape.name, t / f.seconds, what, t / s.seconds, f, s, settings.describe(), gflops))

    def reference(self, name: str, algorithm, lr: float):
        kind = {"protonet": ref.ProtoNetReference, "reptile": ref.ReptileReference, "finetune": ref.FinetuneReference}
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
            score_episodes(algorithm, sampler, episodes, 1, batch_tasks, bn_mode, precision=settings.precision)

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
        self.add(
            make_row(
                name,
                "eval_episodes_per_s",
                shape.name,
                n / f.seconds,
                "one_episode_loop",
                n / s.seconds,
                f,
                s,
                f"{settings.describe()}, batch_tasks={batch_tasks}",
                gflops,
            )
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
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


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
    ap.add_argument("--only", default=None, help="comma-separated names to run (e.g. sampler,protonet)")
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
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
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
    wanted = [n for n in ("sampler", *ALGORITHMS) if only is None or n in only]
    machine = machine_info(device)
    quick = args.quick
    repeats = args.repeats or (2 if quick else 3)
    min_seconds = args.min_seconds if args.min_seconds is not None else (1.0 if quick else 6.0)
    # quick: one evaluation call (Reptile's 50 inner steps an episode took half the run at 32 episodes)
    bench = Bench(device, repeats, 1, EVAL_BATCH_TASKS if quick else 600, console, min_seconds)
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
    for name in wanted[1:] if "sampler" in wanted else wanted:
        settings = recommended(name, device)
        for shape in shapes.values():
            if name in GRADIENT_BASED or shape.queries == 15 and shape.shots == 1:
                bench.bench_train(name, shape, settings)
        bench.bench_eval(name, shapes[OMNIGLOT.name], settings, batch_tasks=EVAL_BATCH_TASKS)
    if "sampler" in wanted and "protonet" in wanted:
        for name in bench.protonet_step:
            bench.bench_sampler_share(shapes[name])

    notes = [f"total time {time.perf_counter() - t0:.0f} s; load average at the end {[round(x, 2) for x in os.getloadavg()]}"]
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
