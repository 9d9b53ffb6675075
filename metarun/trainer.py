"""The meta-training recipe: ``metarun train``.

Read top to bottom: build data, model and optimiser from the config; restore a
checkpoint when resuming; then the loop — sample a meta-batch on the device,
compute the algorithm's loss, back-propagate, average gradients across
processes, step; log, validate and checkpoint at their intervals; finally
evaluate the best checkpoint on the test split. Metrics stay on the device
between log steps, so a step never waits for the host.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf
from rich.table import Table

from metarun.checkpoint import (
    load_checkpoint,
    load_model_state,
    prune_checkpoints,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from metarun.config import TrainConfig, check_values
from metarun.data.episodes import check_episode
from metarun.device import autocast, compile_step, resolve_device
from metarun.distributed import (
    average,
    average_gradients,
    check_divisible,
    from_main,
    init_distributed,
    largest,
    on_every_rank,
    shutdown,
)
from metarun.errors import ConfigError, MetarunError
from metarun.evaluation import check_settings, eval_precision, mean_ci95, resolve_bn_mode, run_evaluation, score_episodes
from metarun.factory import build_algorithm, build_dataset, build_optimizer, build_sampler, build_scheduler, data_device
from metarun.interrupt import StopRequest
from metarun.loggers import build_logger
from metarun.progress import console
from metarun.sweep import run_job, run_labels
from metarun.training_progress import TrainingProgress


def train_task(cfg: DictConfig) -> float | None:
    """Hydra's task function: returns the best validation score (for sweepers); None for a failed sweep job."""
    hydra = HydraConfig.get()
    run_dir = Path(hydra.runtime.output_dir)
    name, group = run_labels(hydra, cfg)
    return run_job(lambda: train(cfg, run_dir, name, group), run_dir)


def train(cfg: DictConfig, run_dir: Path, run_name: str | None = None, run_group: str | None = None) -> float:
    # -- resume: the saved config and run folder replace this job's ----------------
    resume = None
    if cfg.resume:
        resume = load_checkpoint(cfg.resume, prefer="last.pt")
        cfg = resumed_config(cfg, resume["config"])
        run_dir = resume["path"].parent.parent
    check_values(cfg, TrainConfig)
    t, tr = cfg.task, cfg.trainer

    # -- build everything ----------------------------------------------------
    device = resolve_device(cfg.device.type)
    topo, device = init_distributed(device)
    run_dir = Path(from_main(str(run_dir), topo.world))
    check_divisible(t.meta_batch, topo.world)
    seed_everything(tr.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    dataset = build_dataset(cfg.dataset)
    if not hasattr(dataset, "sampler"):  # datasets that generate their tasks serve any episode
        check_episode(dataset.splits["train"], t.ways, t.shots, t.queries, "train", ("task.ways", "task.shots", "task.queries"))
        check_episode(
            dataset.splits["val"], t.ways, t.shots, cfg.eval.queries, "val", ("task.ways", "task.shots", "eval.queries")
        )
    where = data_device(dataset, device, str(cfg.dataset.get("on_device", "auto")))
    algorithm = build_algorithm(cfg, dataset).to(device)
    if cfg.eval.after_train:
        check_settings(dataset, cfg.eval, algorithm)
    if tr.channels_last:
        algorithm = algorithm.to(memory_format=torch.channels_last)
    bn_mode = resolve_bn_mode(algorithm, cfg.eval.bn_mode)
    augment, fused = cfg.dataset.get("augment", False), tr.get("fused_sampling", False)  # (runs saved before the key)
    val_precision = eval_precision(cfg.eval, tr)
    train_sampler = build_sampler(
        dataset, "train", t.ways, t.shots, t.queries, tr.seed, device, augment, tr.channels_last, where, fused, tr.precision
    )
    val_sampler = build_sampler(
        dataset, "val", t.ways, t.shots, cfg.eval.queries, tr.seed, device, False, tr.channels_last, where, fused, val_precision
    )
    optimizer = build_optimizer(algorithm, tr.optimizer, tr.lr, tr.weight_decay)
    scheduler = build_scheduler(optimizer, tr.schedule, tr.steps)
    scaler = torch.amp.GradScaler(device.type, enabled=tr.precision == "fp16")
    loss_fn = compile_step(algorithm) if tr.compile else algorithm.training_loss
    params = [p for p in algorithm.parameters() if p.requires_grad]
    running_stats = [b for b in algorithm.buffers() if b.is_floating_point()]
    step, best, saved_step = 0, None, None
    # metrics since the last log row; checkpoints carry them, so a resumed run writes the rows the uninterrupted one would
    window: dict = {"sums": {}, "steps": 0, "skipped": 0, "last_finite": torch.zeros((), device=device)}
    if resume is not None:
        load_model_state(algorithm, resume["model"], resume["path"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        train_sampler.load_state_dict(resume["sampler"])
        set_rng_state(resume["rng"])
        step, best, saved_step = resume["step"], resume["best"], resume["step"]
        saved = resume.get("window", window)  # a checkpoint from before windows were saved starts a new one
        window = {
            **saved,
            "sums": {k: v.to(device) for k, v in saved["sums"].items()},
            "last_finite": saved["last_finite"].to(device),
        }
    ckpt_dir = run_dir / "checkpoints"
    logger = (
        build_logger(cfg.logger, run_dir, cfg, resume_step=step if resume else None, name=run_name, group=run_group)
        if topo.is_main
        else None
    )
    better = (lambda a, b: a > b) if algorithm.score == "accuracy" else (lambda a, b: a < b)

    def checkpoint(name: str) -> None:
        nonlocal saved_step
        if topo.is_main:
            save_checkpoint(
                ckpt_dir / name,
                model=algorithm.state_dict(),
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
                scaler=scaler.state_dict(),
                sampler=train_sampler.state_dict(),
                step=step,
                best=best,
                mean=list(getattr(dataset, "mean", ())),
                std=list(getattr(dataset, "std", ())),
                config=OmegaConf.to_container(cfg, resolve=True),
                window=window,
            )
            saved_step = step if name == "last.pt" else saved_step

    def stop_if_not_finite() -> None:
        """Called where the host waits anyway (log rows, validation, checkpoints), so a step never waits for it."""
        if tr.nan_policy == "stop" and int(bad_step):
            kept = (
                f"{ckpt_dir / 'last.pt'} from step {saved_step} is the last good checkpoint"
                if saved_step is not None
                else "no checkpoint was written before it"
            )
            raise MetarunError(
                f"loss is not finite at step {int(bad_step)} (last finite loss {float(window['last_finite']):.4g}); {kept}: "
                "lower trainer.lr, or set trainer.nan_policy=skip to skip such steps"
            )

    # -- the loop ------------------------------------------------------------------
    if topo.is_main:
        console.print(
            f"[bold]metarun train[/] → {run_dir}  ({algorithm.__class__.__name__}, {dataset.name}, {device}, {topo.world} process(es), eval.bn_mode={bn_mode})",
            soft_wrap=True,
        )

    def stop_signal() -> int:
        """The signal that asked any process to stop (0: none), the same on every rank."""
        return int(largest(torch.tensor(stop.signal or 0, device=device), topo.world))

    def stop_now() -> bool:
        """One process stops as soon as it is asked; several agree at log steps, so they all stop at the same step."""
        if topo.world == 1:
            return stop.requested
        return step % tr.log_every == 0 and stop_signal() > 0

    bad_step = torch.zeros((), dtype=torch.long, device=device)  # the first step whose loss was not finite (0: none)
    window_start, window_done = time.perf_counter(), 0
    with StopRequest() as stop, TrainingProgress(tr.steps, step, enabled=tr.progress and topo.is_main) as bar:
        while step < tr.steps and not stop_now():
            batch = algorithm.sample_batch(train_sampler, t.meta_batch, topo.shard)
            with autocast(device, tr.precision):
                loss, metrics = loss_fn(batch)
            finite = torch.isfinite(loss.detach())
            if tr.nan_policy == "skip" and not bool(
                on_every_rank(finite, topo.world)
            ):  # the one host sync per step that skipping costs
                window["skipped"] += 1
            else:
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                average_gradients(params, topo.world, running_stats)
                if tr.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, tr.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                window["steps"] += 1
                for k, v in metrics.items():
                    window["sums"][k] = window["sums"].get(k, 0) + v.float()
            scheduler.step()  # also on a skipped step: the schedule follows the step count
            step += 1
            window_done += 1
            if tr.nan_policy == "stop":
                bad_step = torch.where(finite | (bad_step > 0), bad_step, step)
                window["last_finite"] = torch.where(bad_step > 0, window["last_finite"], loss.detach().float())

            if step % tr.log_every == 0 or step == tr.steps:
                stop_if_not_finite()
                average(list(window["sums"].values()), topo.world)  # rank 0 logs the whole meta-batch's metrics
                row = {k: float(v) / window["steps"] for k, v in window["sums"].items()}
                if window["skipped"]:
                    row["skipped_steps"] = window["skipped"]
                elapsed = time.perf_counter() - window_start
                row |= {"lr": scheduler.get_last_lr()[0], "steps_per_s": window_done / max(elapsed, 1e-9)}
                if logger:
                    logger.log(step, row)
                bar.update(step, row)
                window |= {"sums": {}, "steps": 0, "skipped": 0}
                window_start, window_done = time.perf_counter(), 0

            if step % tr.val_every == 0 or step == tr.steps:
                stop_if_not_finite()
                if topo.is_main:
                    scores = score_episodes(
                        algorithm,
                        val_sampler,
                        tr.val_episodes,
                        cfg.eval.seed + 1,
                        cfg.eval.batch_tasks,
                        bn_mode,
                        "validation",
                        val_precision,
                    )
                    val, ci = mean_ci95(scores)
                    is_best = best is None or better(val, best)
                    best = val if is_best else best
                    logger.log(step, {f"val/{algorithm.score}": val, f"val/{algorithm.score}_ci95": ci, "val/best": best})
                    bar.validation(step, algorithm.score, val, best)
                    if is_best:
                        checkpoint("best.pt")
                        logger.log_checkpoint(ckpt_dir / "best.pt")
                    checkpoint("last.pt")
                    if tr.keep_checkpoints > 0:
                        checkpoint(f"step-{step}.pt")
                        prune_checkpoints(ckpt_dir, tr.keep_checkpoints)
                window_start = time.perf_counter()

    # -- interrupted: keep everything, say how to continue --------------------------
    signum = stop_signal()
    if signum:
        stop_if_not_finite()
        checkpoint("last.pt")
        if logger:
            logger.close()
        if topo.is_main:
            console.print(
                f"interrupted at step {step}/{tr.steps}; resume with: metarun train resume={run_dir}",
                soft_wrap=True,
                markup=False,
                highlight=False,
            )
        shutdown()
        raise SystemExit(128 + signum)

    # -- final evaluation of the best checkpoint ---------------------------------------
    if topo.is_main and best is None:
        checkpoint("best.pt")
    results = []
    if topo.is_main and cfg.eval.after_train:
        results = run_evaluation(cfg, cfg.eval, ckpt_dir / "best.pt", device, run_dir, logger, console)
    if topo.is_main:
        console.print(summary_table(run_dir, step, best, algorithm.score, results))
        logger.close()
    shutdown()
    return float(best) if best is not None else float("nan")


def resumed_config(cfg: DictConfig, saved: dict) -> DictConfig:
    """The saved config of the run to continue.

    Only that config reproduces the uninterrupted run, so an override on the
    command line that would change it is refused rather than silently ignored
    (repeating the run's own overrides, as a requeued job script does, is fine).
    """
    run = OmegaConf.create(saved)
    typed = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    changed = []
    for text in typed:
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
