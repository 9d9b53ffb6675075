"""Sweeps (``metarun train -m``): every job its own run folder and W&B run, one failure never ends the sweep.

Hydra's BasicSweeper raises the first failed job's exception once its batch is
done: the other failures go unreported, later batches never start and
``on_multirun_end`` is never called. So in a multirun the task function catches
a job's exception itself (:func:`run_job`) and writes it to ``failed.txt`` in
the job's folder, the one place every launcher (in-process, submitit, SLURM)
shares with the process that started the sweep; :class:`SweepSummary` reads
those files back at the end, lists the failed jobs and makes the command fail.

The labels that tie a job to its sweep (its readable name, the sweep's group)
come from Hydra's runtime config, which only this layer reads.
"""

from __future__ import annotations

import re
import shlex
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from metarun.errors import MetarunError, describe
from metarun.progress import console

FAILURE_FILE = "failed.txt"
#: override keys the run name already shows, that the group shows (the search), or that only say where results go
UNNAMED = re.compile(r"^(algo|dataset|task\.ways|task\.shots|hparams_search|logger(\..*)?)$")
MAX_NAME = 128


def natural_key(path: Path) -> list:
    """Job folders in job order: ``2`` before ``10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def folder_label(path: str | Path) -> str:
    """``2026-11-23/11-05-42``: the default sweep folder's name alone is only a time of day."""
    return "/".join(Path(path).parts[-2:])


def short(value: str) -> str:
    """``0.0012520653814999472`` (as Optuna samples it) reads as ``0.001252``; files keep every digit."""
    try:
        number = float(value)
    except ValueError:
        return value
    return value if "." not in value or len(value) <= 8 else f"{number:.4g}"


def run_labels(hydra: DictConfig, cfg: DictConfig) -> tuple[str, str | None]:
    """A readable run name (``maml-omniglot-5w1s lr=0.003``) and, in a multirun, the sweep as its group."""
    name = f"{hydra.runtime.choices.algo}-{hydra.runtime.choices.dataset}-{cfg.task.ways}w{cfg.task.shots}s"
    for override in hydra.overrides.task:
        key, _, value = override.lstrip("+~").partition("=")
        if not UNNAMED.match(key):
            name += f" {key.rsplit('.', 1)[-1]}={short(value)}"
    group = folder_label(hydra.sweep.dir) if hydra.mode == RunMode.MULTIRUN else None
    return name[:MAX_NAME], group


def error_line(ex: BaseException) -> str:
    """The line the CLI would print for ``ex`` in a single run."""
    return describe(ex)[0]


def run_job(job: Callable[[], Any], run_dir: Path, *, multirun: bool) -> Any:
    """Runs one job; in a multirun a failure is recorded and the job returns None instead of raising.

    None rather than NaN: the Optuna sweeper fails a trial cleanly on a value
    that is not a float, but crashes the whole study on NaN.
    """
    if not multirun:
        return job()
    try:
        return job()
    except Exception as ex:
        line = error_line(ex)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / FAILURE_FILE).write_text(line + "\n\n" + traceback.format_exc())
        console.print(f"[red]job failed[/] ({run_dir}): {line}", soft_wrap=True)
        if "wandb" in sys.modules:  # only then can a W&B run have been started
            from metarun.loggers.wandb import finish_abandoned_run

            finish_abandoned_run()
        return None


def read_overrides(run_dir: Path) -> dict[str, str]:
    """A job's command-line overrides (``.hydra/overrides.yaml``) as ``{key: value}``."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return {}
    return dict(item.lstrip("+~").partition("=")[::2] for item in OmegaConf.load(path))


def varying_keys(overrides: list[dict[str, str]]) -> list[str]:
    """The override keys whose value differs between jobs (or is missing from some): what the sweep varied."""
    keys = list(dict.fromkeys(k for o in overrides for k in o))
    return [k for k in keys if len({o.get(k) for o in overrides}) > 1]


def sync_command(sweep_dir: Path) -> str | None:
    """``wandb sync`` for every offline W&B run of the sweep: one glob when the jobs are the sweep's subfolders."""
    runs = sorted(sweep_dir.rglob("wandb/offline-run-*"), key=natural_key)
    if not runs:
        return None
    if set(runs) == set(sweep_dir.glob("*/wandb/offline-run-*")):
        return f"wandb sync {shlex.quote(str(sweep_dir))}/*/wandb/offline-run-*"
    return "wandb sync " + " ".join(shlex.quote(str(run)) for run in runs)


class SweepSummary(Callback):
    """At the end of a sweep: how to upload its offline W&B runs, which jobs failed and why.

    With a failed job the command exits with status 1; it exits rather than
    raising because Hydra turns a callback's exception into a warning.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_dir = Path(config.hydra.sweep.dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if command := sync_command(self.sweep_dir):
            console.print(f"W&B runs saved offline; upload them with: {command}", soft_wrap=True, markup=False, highlight=False)
        failed = sorted(self.sweep_dir.rglob(FAILURE_FILE), key=natural_key)
        if not failed:
            return
        jobs = sorted((p.parent.parent for p in self.sweep_dir.rglob(".hydra/overrides.yaml")), key=natural_key)
        overrides = {job: read_overrides(job) for job in jobs}
        keys = varying_keys(list(overrides.values()))
        console.print(f"[bold red]{len(failed)} of {len(jobs)} jobs failed:[/]")
        for path in failed:
            swept = " ".join(f"{k}={v}" for k, v in overrides.get(path.parent, {}).items() if k in keys)
            console.print(f"  {path.parent}  {swept}: {path.read_text().splitlines()[0]}", soft_wrap=True)
        print(
            f"error: {len(failed)} of {len(jobs)} sweep jobs failed (each job's traceback is in its {FAILURE_FILE})",
            file=sys.stderr,
        )
        raise SystemExit(MetarunError.exit_code)
