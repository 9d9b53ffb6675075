"""Sweeps as users run them: ``metarun train -m`` with the basic sweeper, Optuna presets and submitit."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hydra.types import RunMode
from omegaconf import OmegaConf

from metarun.loggers.jsonl import read_metrics
from metarun.sweep import folder_label, run_labels, sync_command
from tests.helpers.wandb_records import offline_runs, read_run, run_without_credentials, with_default_logger


def hydra_runtime(mode: RunMode, overrides: list[str]):
    return OmegaConf.create(
        {
            "mode": mode,
            "runtime": {"choices": {"algo": "maml", "dataset": "omniglot"}},
            "overrides": {"task": overrides},
            "sweep": {"dir": "outputs/multirun/2026-11-23/11-05-42"},
        }
    )


def test_run_name_reads_like_the_command_and_the_group_is_the_sweep():
    cfg = OmegaConf.create({"task": {"ways": 5, "shots": 1}})
    overrides = [
        "algo=maml",
        "trainer.lr=0.0012520653814999472",
        "algo.inner_steps=3",
        "task.shots=1",
        "hparams_search=maml_inner_lr",
        "logger.wandb.tags=[a]",
    ]
    name, group = run_labels(hydra_runtime(RunMode.MULTIRUN, overrides), cfg)
    assert (name, group) == ("maml-omniglot-5w1s lr=0.001252 inner_steps=3", "2026-11-23/11-05-42")
    assert run_labels(hydra_runtime(RunMode.RUN, []), cfg) == ("maml-omniglot-5w1s", None)


def test_sync_command_covers_every_offline_run_of_the_sweep(tmp_path):
    assert sync_command(tmp_path) is None
    for job in ("0", "1", "10"):
        (tmp_path / job / "wandb" / f"offline-run-2026_{job}").mkdir(parents=True)
    assert sync_command(tmp_path) == f"wandb sync {tmp_path}/*/wandb/offline-run-*"
    (tmp_path / "a b" / "c" / "wandb" / "offline-run-x").mkdir(parents=True)  # a sweep.subdir of two levels
    assert sync_command(tmp_path).split(" ", 2)[2].count("offline-run-") == 4
    assert f"'{tmp_path}/a b/c/wandb/offline-run-x'" in sync_command(tmp_path)


def job_folders(sweep: Path) -> list[Path]:
    return sorted((p.parent.parent for p in sweep.rglob(".hydra/overrides.yaml")), key=lambda p: int(p.name))


@pytest.mark.timeout(240)
def test_failed_job_is_reported_at_the_end_and_the_others_finish(tmp_path, tiny):
    sweep = tmp_path / "sweep"
    out = run_without_credentials(
        "train",
        "-m",
        *with_default_logger(tiny),
        "trainer.optimizer=adam,sgd,bogus",
        f"hydra.sweep.dir={sweep}",
        home=tmp_path / "home",
        cwd=tmp_path,
        timeout=220,
    )
    assert out.returncode == 1, out.stderr
    assert out.stderr.rstrip().splitlines()[-1].startswith("error: 1 of 3 sweep jobs failed")
    jobs = job_folders(sweep)
    assert [(j / "eval.json").exists() for j in jobs] == [True, True, False]
    reason = (jobs[2] / "failed.txt").read_text().splitlines()[0]
    assert reason.startswith("trainer.optimizer=bogus: ")
    assert f"{jobs[2]}  trainer.optimizer=bogus: {reason}" in out.stderr  # the swept value, then why

    runs = [read_run(p) for p in offline_runs(sweep)]
    assert len(runs) == 2 and {r.group for r in runs} == {folder_label(sweep)}
    assert len({r.id for r in runs}) == 2
    assert f"W&B runs saved offline; upload them with: wandb sync {sweep}/*/wandb/offline-run-*\n" in out.stderr
    assert len(list(sweep.glob("*/wandb/offline-run-*"))) == 2

    report = run_without_credentials("report", str(sweep), home=tmp_path / "home", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert "trainer.optimizer" in report.stdout and f"failed: {reason}" in report.stdout


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "preset, searched, extra",
    [("protonet_lr", "trainer.lr", []), ("maml_inner_lr", "algo.inner_lr", ["task.meta_batch=1", "algo.inner_steps_eval=1"])],
)
def test_optuna_preset_runs_its_trials_and_keeps_the_best(tmp_path, tiny, preset, searched, extra):
    sweep = tmp_path / "sweep"
    shorter = ["trainer.steps=2", "trainer.val_every=2", "eval.episodes=4"]
    out = run_without_credentials(
        "train",
        "-m",
        f"hparams_search={preset}",
        "hydra.sweeper.n_trials=3",
        *tiny,
        *shorter,
        *extra,
        f"hydra.sweep.dir={sweep}",
        home=tmp_path / "home",
        cwd=tmp_path,
        timeout=280,
    )
    assert out.returncode == 0, out.stderr
    jobs = job_folders(sweep)
    assert len(jobs) == 3 and all((j / "eval.json").exists() for j in jobs)
    values = {
        float(dict(o.split("=", 1) for o in yaml.safe_load((j / ".hydra/overrides.yaml").read_text()))[searched]) for j in jobs
    }
    assert len(values) == 3  # three different samples
    best_val = max(read_metrics(j / "metrics.jsonl")[-1]["val/best"] for j in jobs)
    assert yaml.safe_load((sweep / "optimization_results.yaml").read_text())["best_value"] == pytest.approx(best_val)


@pytest.mark.timeout(240)
def test_submitit_local_launcher_runs_each_job_in_its_own_process(tmp_path, tiny):
    sweep = tmp_path / "sweep"
    out = run_without_credentials(
        "train",
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=5",
        *with_default_logger(tiny),
        "trainer.lr=0.001,0.003",
        f"hydra.sweep.dir={sweep}",
        home=tmp_path / "home",
        cwd=tmp_path,
        timeout=200,
    )
    assert out.returncode == 0, out.stderr
    assert all((j / "eval.json").exists() for j in job_folders(sweep))
    assert len(list((sweep / ".submitit").rglob("*_result.pkl"))) == 2
    runs = [read_run(p) for p in offline_runs(sweep)]
    assert len(runs) == 2 and {r.group for r in runs} == {folder_label(sweep)}
