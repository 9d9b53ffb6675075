"""Weights & Biases for real, offline, on a machine that never logged in: what the run folder's W&B runs hold."""

from __future__ import annotations

import glob
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from metarun.loggers.wandb import INIT_TIMEOUT
from tests.helpers.wandb_records import (
    env_without_credentials,
    offline_runs,
    read_run,
    run_without_credentials,
    with_default_logger,
)

#: a WandbLogger outside the trainer: the results of any protocol, logged and closed
LOG_EVAL = """
import json, sys
from pathlib import Path
from omegaconf import OmegaConf
from metarun.config import WandbConfig
from metarun.loggers.wandb import WandbLogger
run_dir, mode, results, protocol = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
logger = WandbLogger(OmegaConf.structured(WandbConfig(mode=mode)), run_dir, OmegaConf.create({"seed": 1}))
logger.log_eval(results, protocol)
logger.close()
"""
FAKE_KEY = "a" * 40


def log_eval(
    tmp_path: Path, mode: str, results: list[dict], protocol: str, **env: str
) -> tuple[subprocess.CompletedProcess, Path]:
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-c", LOG_EVAL, str(run_dir), mode, json.dumps(results), protocol],
        env=env_without_credentials(tmp_path / "home", **env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    return out, run_dir


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny):
    """One tiny training with the default logger and no credentials."""
    root = tmp_path_factory.mktemp("wandb-train")
    run_dir = root / "run"
    out = run_without_credentials(
        "train",
        *with_default_logger(tiny),
        "logger.wandb.log_checkpoints=true",
        "logger.wandb.tags=[smoke,ci]",
        f"hydra.run.dir={run_dir}",
        home=root / "home",
        cwd=root,
    )
    assert out.returncode == 0, out.stderr
    return run_dir, out


def test_training_without_credentials_goes_offline_into_the_run_folder(trained):
    run_dir, out = trained
    (path,) = offline_runs(run_dir / "wandb")
    lines = [ln for ln in out.stderr.splitlines() if "W&B" in ln]
    assert lines == [f"W&B run saved offline; upload it with: wandb sync {path.parent}"]
    run = read_run(path)
    assert json.loads((run_dir / "wandb_run.json").read_text())["id"] == run.id
    assert run.job_type == "train" and run.tags == ["smoke", "ci"]
    assert run.name.startswith("protonet-glyphs-5w1s")
    assert run.config["trainer"]["steps"] == 6 and run.config["logger"]["backend"] == "wandb"


def test_training_curves_are_logged_at_their_steps(trained):
    run = read_run(offline_runs(trained[0] / "wandb")[0])
    train_steps = [row["_step"] for row in run.history if "train/loss" in row]
    val_steps = [row["_step"] for row in run.history if "val/accuracy" in row]
    assert train_steps == [2, 4, 6] and val_steps == [3, 6]
    assert all({"train/acc", "train/lr", "train/steps_per_s"} <= set(row) for row in run.history if "train/loss" in row)
    assert 0 <= run.summary["val/best"] <= 1


def test_test_results_are_in_the_summary_in_percent_and_in_a_table(trained):
    run_dir = trained[0]
    (path,) = offline_runs(run_dir / "wandb")
    run = read_run(path)
    results = json.loads((run_dir / "eval.json").read_text())["results"]
    for r in results:
        setting = f"test/{r['ways']}w{r['shots']}s"
        assert run.summary[f"{setting}/acc"] == pytest.approx(100 * r["accuracy"])
        assert run.summary[f"{setting}/ci95"] == pytest.approx(100 * r["ci95"])
    table = json.loads((path.parent / "files" / run.summary["test/results/path"]).read_text())
    assert table["columns"] == ["setting", "ways", "shots", "queries", "episodes", "accuracy", "ci95"]
    assert [row[0] for row in table["data"]] == ["5w1s", "5w5s"]
    assert [row[4] for row in table["data"]] == [10, 10]


def test_best_checkpoint_is_uploaded_as_an_artifact(trained):
    run = read_run(offline_runs(trained[0] / "wandb")[0])
    assert f"model-{run.id}" in run.artifacts


def test_eval_joins_the_training_run_or_starts_an_eval_run(trained, tmp_path):
    run_dir, _ = trained
    training = read_run(offline_runs(run_dir / "wandb")[0])
    common = ["eval", f"checkpoint={run_dir}", "eval.episodes=8", "eval.queries=5", f"hydra.run.dir={tmp_path / 'job'}"]

    out = run_without_credentials(*common, home=tmp_path / "home", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    parts = f"{run_dir / 'wandb'}/offline-run-*-{training.id}"  # both parts, uploaded in order into the one run
    assert f"W&B run saved offline; upload it with: wandb sync {parts}\n" in out.stderr
    assert len(glob.glob(parts)) == 2
    joined = read_run(offline_runs(run_dir / "wandb")[-1])
    assert joined.id == training.id and joined.config == {"_wandb": {}}
    accuracy = json.loads((run_dir / "eval.json").read_text())["results"][0]["accuracy"]
    assert joined.summary["test/5w1s/acc"] == pytest.approx(100 * accuracy)

    out = run_without_credentials(*common, "logger.wandb.new_run=true", home=tmp_path / "home", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    separate = read_run(offline_runs(run_dir / "wandb")[-1])
    assert separate.id != training.id and separate.job_type == "eval"
    assert (separate.name, separate.group) == (training.name, training.group)
    assert separate.config["checkpoint"] == str(run_dir) and separate.config["eval"]["episodes"] == 8
    assert json.loads((run_dir / "wandb_run.json").read_text())["id"] == training.id


@pytest.mark.parametrize(
    "protocol, result, keys",
    [
        (
            "episodes",
            {"ways": 1, "shots": 10, "queries": 10, "episodes": 3, "mse": 0.25, "ci95": 0.05, "per_episode": [0.2, 0.3, 0.25]},
            ("test/1w10s/mse", 0.25, 0.05),
        ),
        (
            "omniglot_runs",
            {"ways": 20, "shots": 1, "runs": 2, "error": 0.05, "ci95": 0.02, "per_run": [0.04, 0.06]},
            ("test/20w1s_runs/error", 5.0, 2.0),
        ),
    ],
)
def test_any_score_is_logged_under_its_own_name(tmp_path, protocol, result, keys):
    out, run_dir = log_eval(tmp_path, "auto", [result], protocol)
    assert out.returncode == 0, out.stderr
    run = read_run(offline_runs(run_dir / "wandb")[0])
    key, value, ci = keys
    assert run.summary[key] == pytest.approx(value)
    assert run.summary[key.rsplit("/", 1)[0] + "/ci95"] == pytest.approx(ci)


def test_unreachable_server_falls_back_to_offline_at_once_unless_online_is_forced(tmp_path):
    unreachable = {"WANDB_API_KEY": FAKE_KEY, "WANDB_BASE_URL": "http://127.0.0.1:9"}
    result = [{"ways": 5, "shots": 1, "queries": 15, "episodes": 2, "accuracy": 0.5, "ci95": 0.1, "per_episode": [0.4, 0.6]}]
    started = time.monotonic()
    out, run_dir = log_eval(tmp_path / "auto", "auto", result, "episodes", **unreachable)
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - started < INIT_TIMEOUT  # wandb.init alone would wait out its timeout
    assert "W&B server unreachable (127.0.0.1:9: Connection refused); logging offline instead" in out.stderr
    assert "W&B run saved offline" in out.stderr
    assert read_run(offline_runs(run_dir / "wandb")[0]).summary["test/5w1s/acc"] == pytest.approx(50.0)

    out, _ = log_eval(tmp_path / "online", "online", result, "episodes", **unreachable, WANDB_INIT_TIMEOUT="2")
    assert out.returncode != 0
    assert re.search(r"MetarunError: W&B could not start the run \(online\): .*logger\.wandb\.mode=offline", out.stderr)


def test_behind_a_proxy_wandb_init_decides_and_its_failure_still_falls_back(tmp_path):
    """The direct connection may be blocked where the proxy gets through: no probe, wandb.init's own timeout."""
    env = {
        "WANDB_API_KEY": FAKE_KEY,
        "WANDB_BASE_URL": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "WANDB_INIT_TIMEOUT": "2",
    }
    result = [{"ways": 5, "shots": 1, "queries": 15, "episodes": 2, "accuracy": 0.5, "ci95": 0.1, "per_episode": [0.4, 0.6]}]
    out, run_dir = log_eval(tmp_path, "auto", result, "episodes", **env)
    assert out.returncode == 0, out.stderr
    assert "W&B server unreachable" not in out.stderr
    assert "W&B could not start the run online (" in out.stderr and "logging offline instead" in out.stderr
    assert read_run(offline_runs(run_dir / "wandb")[0]).summary["test/5w1s/acc"] == pytest.approx(50.0)


def test_disabled_writes_nothing(tmp_path):
    result = [{"ways": 5, "shots": 1, "queries": 15, "episodes": 2, "accuracy": 0.5, "ci95": 0.1, "per_episode": [0.4, 0.6]}]
    out, run_dir = log_eval(tmp_path, "disabled", result, "episodes")
    assert out.returncode == 0, out.stderr
    assert not (run_dir / "wandb").exists() and not (run_dir / "wandb_run.json").exists()
