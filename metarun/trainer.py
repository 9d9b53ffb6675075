"""The meta-training recipe: ``metarun train``.

:func:`train` reads as its four steps:

1. :func:`setup_run` - check the config, build data, model and optimiser, restore a checkpoint when resuming;
2. :func:`train_step` - sample a meta-batch on the device, compute the algorithm's loss, back-propagate,
   average gradients across processes, clip, step (the NaN policy decides about non-finite losses);
3. :func:`validate` - score the validation episodes, keep the best and the last checkpoint;
4. :func:`finish` - evaluate the best checkpoint on the test split and print the summary.

Metrics stay on the device between log rows (:class:`MetricWindow`), so a step never waits for the host.
``metarun bench`` times the same :func:`train_step` on a :class:`Step` built by :func:`build_step`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, ListConfig, OmegaConf
from rich.table import Table

from metarun.algorithms.base import Algorithm
from metarun.checkpoint import (
    load_checkpoint,
    load_model_state,
    prune_checkpoints,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from metarun.config import TrainConfig, algorithm_class, algorithm_schemas, check_values
from metarun.data.episodes import EpisodeSampler, check_episode
from metarun.data.features import FeatureDataset
from metarun.data.multi import MultiSourceDataset
from metarun.data.split import FewShotDataset
from metarun.device import autocast, compile_step, refuse_compile, resolve_device
from metarun.distributed import (
    Topology,
    average,
    average_gradients,
    check_divisible,
    from_main,
    init_distributed,
    largest,
    on_every_rank,
    shutdown,
)
from metarun.errors import CheckpointError, ConfigError, MetarunError
from metarun.evaluation import by_source, check_settings, eval_precision, resolve_bn_mode, run_evaluation, score_episodes
from metarun.factory import (
    build_algorithm,
    build_dataset,
    build_optimizer,
    build_sampler,
    build_scheduler,
    data_device,
    with_frozen_features,
)
from metarun.interrupt import StopRequest
from metarun.loggers import build_logger
from metarun.progress import console
from metarun.results import better, mean_ci95
from metarun.speed_settings import AUTO, resolve_speed_settings
from metarun.training_progress import TrainingProgress


# -- the metrics of one log row -----------------------------------------------------------------
class MetricWindow:
    """Sums of the step metrics since the last log row, on the device, and the steps and time they took.

    Time spent validating is not training time: :meth:`paused` leaves it out of ``steps_per_s``.
    Checkpoints carry the window (:meth:`state_dict`), so a resumed run writes the rows the uninterrupted
    one would.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.last_finite = torch.zeros((), device=device)  # the last finite loss (NaN policy ``stop``)
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0  # steps whose metrics were added
        self.skipped = 0  # steps skipped for a non-finite loss
        self.taken = 0  # steps run (added or skipped) since the row started, for steps_per_s
        self.seconds = 0.0  # training time of those steps, validation excluded
        self.started = time.perf_counter()

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        self.steps += 1
        self.taken += 1
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0) + v.float()

    def skip(self) -> None:
        self.skipped += 1
        self.taken += 1

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time inside does not count as training time."""
        self.seconds += time.perf_counter() - self.started
        try:
            yield
        finally:
            self.started = time.perf_counter()

    def row(self, world: int, lr: float) -> dict[str, float]:
        """The log row (averaged over processes: rank 0 logs the whole meta-batch's metrics)."""
        average(list(self.sums.values()), world)
        row = {k: float(v) / max(self.steps, 1) for k, v in self.sums.items()}
        if self.skipped:
            row["skipped_steps"] = self.skipped
        seconds = self.seconds + time.perf_counter() - self.started
        return row | {"lr": lr, "steps_per_s": self.taken / max(seconds, 1e-9)}

    def state_dict(self) -> dict:
        return {"sums": self.sums, "steps": self.steps, "skipped": self.skipped, "last_finite": self.last_finite}

    def load_state_dict(self, state: dict) -> None:
        self.sums = {k: v.to(self.device) for k, v in state["sums"].items()}
        self.steps, self.skipped = state["steps"], state["skipped"]
        self.last_finite = state["last_finite"].to(self.device)


# -- one meta-training step ---------------------------------------------------------------------------
@dataclass
class Step:
    """Everything one meta-training step touches; built by :func:`build_step`, run by :func:`train_step`."""

    algorithm: Algorithm
    sampler: EpisodeSampler
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    meta_batch: int
    precision: str
    grad_clip: float
    nan_policy: str
    topo: Topology = field(default_factory=Topology)
    compiled: bool = False
    #: steps taken so far
    number: int = 0

    def __post_init__(self) -> None:
        self.device = next(self.algorithm.parameters()).device
        self.loss_fn = compile_step(self.algorithm) if self.compiled else self.algorithm.training_loss
        self.params = [p for p in self.algorithm.parameters() if p.requires_grad]
        self.running_stats = [b for b in self.algorithm.buffers() if b.is_floating_point()]
        self.window = MetricWindow(self.device)
        #: the first step whose loss was not finite (0: none), on the device: checked where the host waits anyway
        self.bad_step = torch.zeros((), dtype=torch.long, device=self.device)


def build_step(
    cfg: DictConfig, dataset: FewShotDataset, algorithm: Algorithm, *, topo: Topology | None = None, where=None
) -> Step:
    """The step of ``cfg``'s recipe for ``algorithm`` (already on its device) on ``dataset``'s training split."""
    t, tr = cfg.task, cfg.trainer
    device = next(algorithm.parameters()).device
    optimizer = build_optimizer(algorithm, tr.optimizer, tr.lr, tr.weight_decay)
    sampler = build_sampler(
        dataset, "train", ways=t.ways, shots=t.shots, queries=t.queries, seed=tr.seed, device=device,
        augment=cfg.dataset.get("augment", False), channels_last=tr.channels_last, data_device=where,
        fused=tr.get("fused_sampling", False), precision=tr.precision, protocol=t.get("protocol", "fixed"),
    )  # fmt: skip
    return Step(
        algorithm=algorithm,
        sampler=sampler,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, tr.schedule, tr.steps),
        scaler=torch.amp.GradScaler(device.type, enabled=tr.precision == "fp16"),
        meta_batch=t.meta_batch,
        precision=tr.precision,
        grad_clip=tr.grad_clip,
        nan_policy=tr.nan_policy,
        topo=topo or Topology(),
        compiled=tr.compile,
    )


def train_step(step: Step) -> None:
    """Sample, loss, backward, all-reduce, clip, optimiser and schedule step; a non-finite loss follows the NaN policy."""
    batch = step.algorithm.sample_batch(step.sampler, step.meta_batch, step.topo.shard)
    with autocast(step.device, step.precision):
        loss, metrics = step.loss_fn(batch)
    finite = torch.isfinite(loss.detach())
    if step.nan_policy == "skip" and not bool(on_every_rank(finite, step.topo.world)):  # the one host sync skipping costs
        step.window.skip()
    else:
        step.optimizer.zero_grad(set_to_none=True)
        step.scaler.scale(loss).backward()
        average_gradients(step.params, step.topo.world, step.running_stats)
        if step.grad_clip > 0:
            step.scaler.unscale_(step.optimizer)
            torch.nn.utils.clip_grad_norm_(step.params, step.grad_clip)
        step.scaler.step(step.optimizer)
        step.scaler.update()
        step.window.add(metrics)
    step.scheduler.step()  # also on a skipped step: the schedule follows the step count
    step.number += 1
    if step.nan_policy == "stop":
        step.bad_step = torch.where(finite | (step.bad_step > 0), step.bad_step, step.number)
        step.window.last_finite = torch.where(step.bad_step > 0, step.window.last_finite, loss.detach().float())


# -- the run ------------------------------------------------------------------------------------------
@dataclass
class Run:
    """A meta-training run: its config and folder, data, the training step, validation and checkpoint state."""

    cfg: DictConfig
    run_dir: Path
    device: torch.device
    topo: Topology
    dataset: FewShotDataset
    step: Step
    val_sampler: EpisodeSampler
    bn_mode: str
    val_precision: str
    logger: object | None
    best: float | None = None
    saved_step: int | None = None

    @property
    def algorithm(self) -> Algorithm:
        return self.step.algorithm

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def due(self, every: int) -> bool:
        return self.step.number % every == 0 or self.step.number == self.cfg.trainer.steps

    def checkpoint(self, name: str) -> None:
        if not self.topo.is_main:
            return
        s = self.step
        save_checkpoint(
            self.ckpt_dir / name,
            model=self.algorithm.state_dict(),
            optimizer=s.optimizer.state_dict(),
            scheduler=s.scheduler.state_dict(),
            scaler=s.scaler.state_dict(),
            sampler=s.sampler.state_dict(),
            step=s.number,
            best=self.best,
            mean=list(getattr(self.dataset, "mean", ())),
            std=list(getattr(self.dataset, "std", ())),
            # what rebuilding the model for another dataset needs (cross-domain evaluation)
            dataset_name=self.dataset.name,
            input_shape=list(getattr(self.dataset, "image_shape", ())),
            train_classes=self.dataset.splits["train"].num_classes if hasattr(self.dataset, "splits") else None,
            config=OmegaConf.to_container(self.cfg, resolve=True),
            window=s.window.state_dict(),
        )
        if name == "last.pt":
            self.saved_step = s.number

    def stop_if_not_finite(self) -> None:
        """Called where the host waits anyway (log rows, validation, checkpoints), so a step never waits for it."""
        if self.step.nan_policy != "stop" or not int(self.step.bad_step):
            return
        kept = (
            f"{self.ckpt_dir / 'last.pt'} from step {self.saved_step} is the last good checkpoint"
            if self.saved_step is not None
            else "no checkpoint was written before it"
        )
        raise MetarunError(
            f"loss is not finite at step {int(self.step.bad_step)} (last finite loss "
            f"{float(self.step.window.last_finite):.4g}); {kept}: lower trainer.lr, or set trainer.nan_policy=skip to skip such steps"
        )

    def stop_signal(self, stop: StopRequest) -> int:
        """The signal that asked any process to stop (0: none), the same on every rank."""
        return int(largest(torch.tensor(stop.signal or 0, device=self.device), self.topo.world))

    def stop_now(self, stop: StopRequest) -> bool:
        """One process stops as soon as it is asked; several agree at log steps, so they all stop at the same step."""
        if self.topo.world == 1:
            return stop.requested
        return self.step.number % self.cfg.trainer.log_every == 0 and self.stop_signal(stop) > 0


def train(
    cfg: DictConfig,
    run_dir: Path,
    *,
    run_name: str | None = None,
    run_group: str | None = None,
    overrides: Sequence[str] = (),
) -> float:
    """Meta-trains ``cfg`` into ``run_dir`` and returns the best validation score. ``overrides`` are the ones the
    user typed: a resumed run refuses those that would change its saved config."""
    run = setup_run(cfg, run_dir, overrides=overrides, run_name=run_name, run_group=run_group)
    with (
        StopRequest() as stop,
        TrainingProgress(run.cfg.trainer.steps, run.step.number, enabled=run.cfg.trainer.progress and run.topo.is_main) as bar,
    ):
        while run.step.number < run.cfg.trainer.steps and not run.stop_now(stop):
            train_step(run.step)
            if run.due(run.cfg.trainer.log_every):
                log_row(run, bar)
            if run.due(run.cfg.trainer.val_every):
                with run.step.window.paused():
                    validate(run, bar)
    if signum := run.stop_signal(stop):
        interrupted(run, signum)
    return finish(run)


def setup_run(
    cfg: DictConfig,
    run_dir: Path,
    *,
    overrides: Sequence[str] = (),
    run_name: str | None = None,
    run_group: str | None = None,
) -> Run:
    """Everything a run needs, built from its config; restored from ``cfg.resume``'s last checkpoint when set."""
    resume = None
    if cfg.resume:
        resume = load_checkpoint(cfg.resume, prefer="last.pt")
        cfg = resumed_config(cfg, resume["config"], overrides)
        run_dir = resume["path"].parent.parent
    check_config(cfg)
    t, tr, typed = cfg.task, cfg.trainer, cfg.trainer

    device = resolve_device(cfg.device.type)
    topo, device = init_distributed(device)
    run_dir = Path(from_main(str(run_dir), topo.world))
    check_divisible(t.meta_batch, topo.world)
    seed_everything(tr.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    dataset = build_dataset(cfg.dataset)
    protocol = t.get("protocol", "fixed")  # (a run saved before the key existed is fixed)
    if not hasattr(dataset, "sampler") and protocol == "fixed":  # generated tasks serve any episode; metadataset checks its own
        check_episode(dataset.splits["train"], t.ways, t.shots, t.queries, "train", ("task.ways", "task.shots", "task.queries"))
        check_episode(
            dataset.splits["val"], t.ways, t.shots, cfg.eval.queries, "val", ("task.ways", "task.shots", "eval.queries")
        )
    where = data_device(dataset, device, str(cfg.dataset.get("on_device", "auto")))
    cfg, tr = with_speed_settings(cfg, device, where)
    # a resumed run's checkpoint holds the backbone: its published weight file is not read again
    algorithm = build_algorithm(cfg, dataset, pretrained_weights=resume is None).to(device)
    if resume is None and tr.get("init_from"):  # a resumed run has the weights in its own checkpoint
        start_from_run(algorithm, tr.init_from)
    if cfg.eval.after_train:
        check_settings(dataset, cfg.eval, algorithm, protocol=protocol)
    if tr.channels_last:
        algorithm = algorithm.to(memory_format=torch.channels_last)
    dataset = with_frozen_features(cfg, dataset, algorithm, device, eval_protocol=cfg.eval.protocol)
    step = build_step(cfg, dataset, algorithm, topo=topo, where=where)
    val_precision = eval_precision(cfg.eval, tr)
    val_sampler = build_sampler(
        dataset, "val", ways=t.ways, shots=t.shots, queries=cfg.eval.queries, seed=tr.seed, device=device,
        channels_last=tr.channels_last, data_device=where, fused=tr.get("fused_sampling", False), precision=val_precision,
        protocol=protocol,
    )  # fmt: skip
    best = saved_step = None
    if resume is not None:
        load_model_state(algorithm, resume["model"], resume["path"])
        step.optimizer.load_state_dict(resume["optimizer"])
        step.scheduler.load_state_dict(resume["scheduler"])
        step.scaler.load_state_dict(resume["scaler"])
        step.sampler.load_state_dict(resume["sampler"])
        set_rng_state(resume["rng"])
        step.number, best, saved_step = resume["step"], resume["best"], resume["step"]
        if "window" in resume:  # a checkpoint from before windows were saved starts a new one
            step.window.load_state_dict(resume["window"])
    logger = None
    if topo.is_main:
        logger = build_logger(
            cfg.logger, run_dir, cfg, resume_step=step.number if resume else None, name=run_name, group=run_group
        )
    run = Run(cfg, run_dir, device, topo, dataset, step, val_sampler, resolve_bn_mode(algorithm, cfg.eval.bn_mode),
              val_precision, logger, best, saved_step)  # fmt: skip
    if topo.is_main:
        console.print(
            f"[bold]metarun train[/] → {run_dir}  ({type(algorithm).__name__}, {dataset.name}, {device}, "
            f"{topo.world} process(es), eval.bn_mode={run.bn_mode}, {speed_line(tr, typed)})",
            soft_wrap=True,
        )
        if isinstance(dataset, FeatureDataset):
            console.print(
                "the backbone is fixed: each split's images go through it once and episodes are drawn from their "
                "features (trainer.frozen_features=false runs it on every episode instead)",
                soft_wrap=True, markup=False, highlight=False,
            )  # fmt: skip
    return run


def start_from_run(algorithm: Algorithm, source: str) -> None:
    """``trainer.init_from``: the algorithm takes what it needs of an earlier run's best checkpoint."""
    try:
        start = load_checkpoint(source)
    except CheckpointError as e:
        raise CheckpointError(f"trainer.init_from: {e}") from None
    algorithm.start_from(start["model"], start["config"], str(source))


def with_speed_settings(cfg: DictConfig, device: torch.device, where: torch.device) -> tuple[DictConfig, DictConfig]:
    """``cfg`` with every ``auto`` of ``trainer.precision``/``channels_last``/``fused_sampling`` resolved
    (:mod:`metarun.speed_settings`): the saved config, and so a resumed or re-evaluated run, keeps the values."""
    tr = cfg.trainer
    settings = resolve_speed_settings(
        precision=tr.precision, channels_last=tr.channels_last, fused_sampling=tr.get("fused_sampling", False),
        compile=tr.compile, device=device, channels_last_pays=algorithm_class(cfg.algo).channels_last_pays,
        steps=tr.steps, data_on_cpu=where.type == "cpu", augment=bool(cfg.dataset.get("augment", False)),
    )  # fmt: skip
    cfg = copy.deepcopy(cfg)
    for key in ("precision", "channels_last", "fused_sampling"):
        cfg.trainer[key] = getattr(settings, key)
    return cfg, cfg.trainer


def speed_line(tr: DictConfig, typed: DictConfig) -> str:
    """``precision=bf16 (auto), channels_last=false, ...``: what the run uses, and which values ``auto`` chose."""
    parts = []
    for key in ("precision", "channels_last", "fused_sampling"):
        value = tr[key]
        shown = str(value).lower() if isinstance(value, bool) else value
        parts.append(f"{key}={shown}" + (" (auto)" if typed.get(key, AUTO) == AUTO else ""))
    return ", ".join(parts)


def check_config(cfg: DictConfig) -> None:
    """What can be refused before any data are loaded: ranges, choices, keys, and settings the algorithm cannot run."""
    check_values(cfg, TrainConfig)
    if cfg.trainer.compile and not algorithm_class(cfg.algo).compiles_with(cfg.algo):
        raise refuse_compile()
    if cfg.task.get("protocol", "fixed") == "metadataset":
        refuse_fixed_ways(cfg)
    option = algorithm_class(cfg.algo).needs_pretrained(cfg.algo)
    if option and not cfg.trainer.get("init_from") and str(cfg.backbone.get("weights", "none")).lower() == "none":
        raise ConfigError(
            f"{option} needs a pre-trained backbone: set trainer.init_from=RUN_OR_PT (a run of algo=finetune, say) "
            "or pick a backbone with published weights"
        )


def refuse_fixed_ways(cfg: DictConfig) -> None:
    """``task.protocol=metadataset`` needs an algorithm that serves episodes of any ways and shots, and shapes
    that may change from step to step."""
    cls = algorithm_class(cfg.algo)
    if not cls.variable_ways:
        serving = sorted(name for name, schema in algorithm_schemas().items() if get_class(schema._target_).variable_ways)
        raise ConfigError(
            f"task.protocol=metadataset: {cls.__name__} serves episodes of task.ways classes only, not of 5 to 50; "
            f"use {', '.join(f'algo={n}' for n in serving)}, or task.protocol=fixed"
        )
    if cfg.trainer.compile:
        raise ConfigError(
            "trainer.compile=true compiles for fixed shapes, but task.protocol=metadataset episodes change shape every step"
        )


def log_row(run: Run, bar: TrainingProgress) -> None:
    run.stop_if_not_finite()
    row = run.step.window.row(run.topo.world, run.step.scheduler.get_last_lr()[0])
    if run.logger:
        run.logger.log(run.step.number, row)
    bar.update(run.step.number, row)
    run.step.window.reset()


def validate(run: Run, bar: TrainingProgress) -> None:
    """Scores the validation episodes on rank 0; keeps best.pt, last.pt and the step-numbered checkpoints."""
    run.stop_if_not_finite()
    if not run.topo.is_main:
        return
    cfg, algorithm, step = run.cfg, run.algorithm, run.step.number
    scores = score_episodes(
        algorithm,
        run.val_sampler,
        episodes=cfg.trainer.val_episodes,
        seed=cfg.eval.seed + 1,
        batch_tasks=cfg.eval.batch_tasks,
        bn_mode=run.bn_mode,
        description="validation",
        precision=run.val_precision,
    )
    val, ci = mean_ci95(scores)
    is_best = run.best is None or better(algorithm.score, val, run.best)
    run.best = val if is_best else run.best
    row = {f"val/{algorithm.score}": val, f"val/{algorithm.score}_ci95": ci, "val/best": run.best}
    if isinstance(run.dataset, MultiSourceDataset):  # dataset=multi: each source's share of the episodes too
        for name, part in by_source(scores, list(run.dataset.sources), algorithm.score).items():
            row |= {f"val/{name}/{algorithm.score}": part[algorithm.score], f"val/{name}/{algorithm.score}_ci95": part["ci95"]}
    run.logger.log(step, row)
    bar.validation(step, algorithm.score, val, run.best)
    if is_best:
        run.checkpoint("best.pt")
        run.logger.log_checkpoint(run.ckpt_dir / "best.pt")
    run.checkpoint("last.pt")
    if cfg.trainer.keep_checkpoints > 0:
        run.checkpoint(f"step-{step}.pt")
        prune_checkpoints(run.ckpt_dir, cfg.trainer.keep_checkpoints)


def interrupted(run: Run, signum: int) -> None:
    """Stopped by a signal: keep everything, say how to continue, exit with 128 + the signal."""
    run.stop_if_not_finite()
    run.checkpoint("last.pt")
    if run.logger:
        run.logger.close()
    if run.topo.is_main:
        console.print(
            f"interrupted at step {run.step.number}/{run.cfg.trainer.steps}; resume with: metarun train resume={run.run_dir}",
            soft_wrap=True,
            markup=False,
            highlight=False,
        )
    shutdown()
    raise SystemExit(128 + signum)


def finish(run: Run) -> float:
    """Evaluates the best checkpoint on the test split (with the run's own dataset and model) and prints the summary."""
    if run.topo.is_main and run.best is None:
        run.checkpoint("best.pt")
    results = []
    if run.topo.is_main and run.cfg.eval.after_train:
        results = run_evaluation(
            run.cfg, run.cfg.eval, run.ckpt_dir / "best.pt", run.device, run.run_dir, run.logger, console,
            dataset=run.dataset, algorithm=run.algorithm,
        )  # fmt: skip
    if run.topo.is_main:
        console.print(summary_table(run.run_dir, run.step.number, run.best, run.algorithm.score, results))
        run.logger.close()
    shutdown()
    return float(run.best) if run.best is not None else float("nan")


def resumed_config(cfg: DictConfig, saved: dict, overrides: Sequence[str] = ()) -> DictConfig:
    """The saved config of the run to continue.

    Only that config reproduces the uninterrupted run, so an override on the
    command line that would change it is refused rather than silently ignored
    (repeating the run's own overrides, as a requeued job script does, is fine).
    """
    run = OmegaConf.create(saved)
    changed = []
    for text in overrides:
        key = text.split("=", 1)[0].lstrip("+~").split("@", 1)[0]
        if key == "resume":
            continue
        new, old = _leaves(OmegaConf.select(cfg, key), key), _leaves(OmegaConf.select(run, key), key)
        changed += [
            f"{k}={new.get(k)} (the run has {old.get(k)})" for k in sorted(new.keys() | old.keys()) if new.get(k) != old.get(k)
        ]
    if changed:
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise ConfigError(
            f"resume={cfg.resume} continues the run with its saved config, but {', '.join(changed[:3])}{more}: "
            "drop these overrides, or start a new run to change them"
        )
    return run


def _leaves(value, key: str) -> dict:
    """``{dotted key: value}`` of a config node's leaves (lists count as one leaf)."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {k: v for name, item in value.items() for k, v in _leaves(item, f"{key}.{name}").items()}
    return {key: value}


def summary_table(run_dir: Path, steps: int, best: float | None, score: str, results: list[dict]) -> Table:
    table = Table(title="run summary", show_header=False)
    table.add_row("run folder", str(run_dir))
    table.add_row("steps", str(steps))
    if best is not None:
        table.add_row(f"best validation {score}", f"{100 * best:.2f}%" if score == "accuracy" else f"{best:.4f}")
    for r in results:
        if "accuracy" in r:
            table.add_row(f"test {r['ways']}-way {r['shots']}-shot", f"{100 * r['accuracy']:.2f}% ± {100 * r['ci95']:.2f}")
    return table
