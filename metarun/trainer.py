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
from omegaconf import DictConfig, OmegaConf
from rich.table import Table

from metarun.checkpoint import load_checkpoint, load_model_state, prune_checkpoints, save_checkpoint, seed_everything, set_rng_state
from metarun.device import autocast, resolve_device
from metarun.distributed import average_gradients, check_divisible, init_distributed, shutdown
from metarun.errors import MetarunError
from metarun.evaluation import mean_ci95, resolve_bn_mode, run_evaluation, score_episodes
from metarun.factory import build_algorithm, build_dataset, build_optimizer, build_sampler, build_scheduler, data_device
from metarun.interrupt import StopRequest
from metarun.loggers import build_logger
from metarun.progress import console
from metarun.training_progress import TrainingProgress


def train_task(cfg: DictConfig) -> float:
    """Hydra's task function: returns the best validation score (for sweepers)."""
    return train(cfg, Path(HydraConfig.get().runtime.output_dir))


def train(cfg: DictConfig, run_dir: Path) -> float:
    # -- resume: the saved config and run folder replace this job's ----------------
    resume = None
    if cfg.resume:
        resume = load_checkpoint(cfg.resume, prefer="last.pt")
        cfg = OmegaConf.create(resume["config"])
        run_dir = resume["path"].parent.parent
    t, tr = cfg.task, cfg.trainer

    # -- build everything ----------------------------------------------------
    device = resolve_device(cfg.device.type)
    topo, device = init_distributed(device)
    check_divisible(t.meta_batch, topo.world)
    seed_everything(tr.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    dataset = build_dataset(cfg.dataset)
    where = data_device(dataset, device, str(cfg.dataset.get("on_device", "auto")))
    algorithm = build_algorithm(cfg, dataset).to(device)
    if tr.channels_last:
        algorithm = algorithm.to(memory_format=torch.channels_last)
    bn_mode = resolve_bn_mode(algorithm, cfg.eval.bn_mode)
    train_sampler = build_sampler(dataset, "train", t.ways, t.shots, t.queries, tr.seed, where, cfg.dataset.get("augment", False), tr.channels_last)
    val_sampler = build_sampler(dataset, "val", t.ways, t.shots, cfg.eval.queries, tr.seed, where, channels_last=tr.channels_last)
    optimizer = build_optimizer(algorithm, tr.optimizer, tr.lr, tr.weight_decay)
    scheduler = build_scheduler(optimizer, tr.schedule, tr.steps)
    scaler = torch.amp.GradScaler(device.type, enabled=tr.precision == "fp16")
    loss_fn = torch.compile(algorithm.training_loss) if tr.compile else algorithm.training_loss
    params = [p for p in algorithm.parameters() if p.requires_grad]
    step, best = 0, None
    if resume is not None:
        load_model_state(algorithm, resume["model"], resume["path"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        train_sampler.load_state_dict(resume["sampler"])
        set_rng_state(resume["rng"])
        step, best = resume["step"], resume["best"]
    ckpt_dir = run_dir / "checkpoints"
    logger = build_logger(cfg.logger, run_dir, cfg, resume_step=step if resume else None) if topo.is_main else None
    better = (lambda a, b: a > b) if algorithm.score == "accuracy" else (lambda a, b: a < b)

    def checkpoint(name: str) -> None:
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
            )

    # -- the loop ------------------------------------------------------------------
    if topo.is_main:
        console.print(f"[bold]metarun train[/] → {run_dir}  ({algorithm.__class__.__name__}, {dataset.name}, {device}, {topo.world} process(es), eval.bn_mode={bn_mode})")
    sums: dict[str, torch.Tensor] = {}
    last_finite = torch.zeros((), device=device)
    window_start, window_steps = time.perf_counter(), 0
    with StopRequest() as stop, TrainingProgress(tr.steps, step, enabled=tr.progress and topo.is_main) as bar:
        while step < tr.steps and not stop.requested:
            batch = algorithm.sample_batch(train_sampler, t.meta_batch, topo.shard)
            with autocast(device, tr.precision):
                loss, metrics = loss_fn(batch)
            finite = torch.isfinite(loss)
            if tr.nan_policy == "skip" and not bool(finite):
                step += 1
                continue
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            average_gradients(params, topo.world)
            if tr.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, tr.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            window_steps += 1
            last_finite = torch.where(finite, metrics["loss"].float(), last_finite)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v.float()

            if step % tr.log_every == 0 or step == tr.steps:
                row = {k: float(v) / window_steps for k, v in sums.items()}
                if not all(map(lambda v: v == v and abs(v) != float("inf"), row.values())):
                    checkpoint_note = "the last good checkpoint is kept in " + str(ckpt_dir)
                    raise MetarunError(f"non-finite loss by step {step} (last finite loss {float(last_finite):.4f}); {checkpoint_note}; lower trainer.lr or set trainer.nan_policy=skip")
                elapsed = time.perf_counter() - window_start
                row |= {"lr": scheduler.get_last_lr()[0], "steps_per_s": window_steps / max(elapsed, 1e-9)}
                if logger:
                    logger.log(step, row)
                bar.update(step, row)
                sums, window_start, window_steps = {}, time.perf_counter(), 0

            if step % tr.val_every == 0 or step == tr.steps:
                if topo.is_main:
                    scores = score_episodes(algorithm, val_sampler, tr.val_episodes, cfg.eval.seed + 1, cfg.eval.batch_tasks, bn_mode, "validation")
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
    if stop.requested:
        checkpoint("last.pt")
        if logger:
            logger.close()
        console.print(f"interrupted at step {step}/{tr.steps}; resume with: metarun train resume={run_dir}")
        shutdown()
        raise SystemExit(stop.exit_code)

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
