"""Every gradient-based algorithm and the transfer baseline through the real runner: train, validate,
checkpoint, evaluate, and resume an interrupted run to exactly the uninterrupted run's metrics."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from metarun.loggers.jsonl import TIMING_FIELDS, read_metrics
from metarun.trainer import train
from tests.conftest import run_cli

ALGOS = ["maml", "fomaml", "metasgd", "anil", "reptile", "finetune", "protomaml"]
CLASSES = {
    "maml": "metarun.algorithms.maml.MAML",
    "fomaml": "metarun.algorithms.maml.MAML",
    "metasgd": "metarun.algorithms.metasgd.MetaSGD",
    "anil": "metarun.algorithms.anil.ANIL",
    "reptile": "metarun.algorithms.reptile.Reptile",
    "finetune": "metarun.algorithms.finetune.Finetune",
    "protomaml": "metarun.algorithms.protomaml.ProtoMAML",
}


def small(tiny, algo: str) -> list[str]:
    """The shared tiny run, with a meta-batch and inner loops small enough for seconds."""
    extra = {
        "maml": ["algo.inner_steps_eval=2"],
        "fomaml": ["algo.inner_steps_eval=2"],
        "metasgd": ["algo.inner_steps_eval=2"],
        "anil": ["algo.inner_steps=2", "algo.inner_steps_eval=2"],
        "reptile": ["algo.inner_steps=2", "algo.inner_steps_eval=3", "algo.inner_batch=4"],
        "finetune": ["algo.batch_size=16", "algo.finetune_steps=5"],
        "protomaml": ["algo.inner_steps_eval=2"],
    }[algo]
    return [*tiny, f"algo={algo}", "task.meta_batch=2", "trainer.steps=4", "trainer.val_every=2", *extra]


def rows(path):
    return [{k: v for k, v in row.items() if k not in TIMING_FIELDS} for row in read_metrics(path)]


@pytest.mark.parametrize("algo", ALGOS)
def test_train_evaluate_and_resume(algo, tmp_path, compose_config, tiny, monkeypatch):
    overrides = small(tiny, algo)
    cfg = compose_config("train", overrides)
    assert cfg.algo._target_ == CLASSES[algo]
    whole = tmp_path / "whole"
    train(cfg, whole)
    results = json.loads((whole / "eval.json").read_text())["results"]
    assert [(r["ways"], r["shots"]) for r in results] == [(5, 1), (5, 5)]
    assert all(0.0 <= r["accuracy"] <= 1.0 and len(r["per_episode"]) == 10 for r in results)
    ckpt = torch.load(whole / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["step"] == 4 and ckpt["config"]["algo"]["_target_"] == CLASSES[algo]
    logged = rows(whole / "metrics.jsonl")
    assert any("val/accuracy" in r for r in logged) and any("acc" in r for r in logged)

    # interrupted after its second step (SIGTERM, as a pre-empted job gets), then resumed
    module, name = CLASSES[algo].rsplit(".", 1)
    cls = getattr(__import__(module, fromlist=[name]), name)
    original, calls = cls.training_loss, []

    def interrupting(self, batch):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch)

    monkeypatch.setattr(cls, "training_loss", interrupting)
    cut = tmp_path / "cut"
    with pytest.raises(SystemExit):
        train(cfg, cut)
    monkeypatch.setattr(cls, "training_loss", original)
    assert torch.load(cut / "checkpoints" / "last.pt", weights_only=False)["step"] == 2
    train(compose_config("train", [*overrides, f"resume={cut}"]), tmp_path / "ignored")
    assert rows(cut / "metrics.jsonl") == logged
    assert json.loads((cut / "eval.json").read_text())["results"] == results


def test_cli_train_then_eval_with_another_bn_mode(tmp_path, tiny):
    """The commands as a user types them, for a MAML run evaluated again with running statistics."""
    run = tmp_path / "run"
    out = run_cli("train", *small(tiny, "maml"), "trainer.steps=2", f"hydra.run.dir={run}")
    assert out.returncode == 0, out.stderr
    printed = (out.stdout + out.stderr).replace("\n", "")
    assert "MAML" in printed and "eval.bn_mode=transductive" in printed
    out = run_cli(
        "eval",
        f"checkpoint={run}",
        "eval.episodes=4",
        "eval.queries=5",
        "eval.bn_mode=running",
        "logger=none",
        f"hydra.run.dir={tmp_path / 'eval'}",
    )
    assert out.returncode == 0, out.stderr
    assert json.loads((run / "eval.json").read_text())["bn_mode"] == "running"


def test_sinusoid_run_reports_mse(tmp_path, compose_config):
    cfg = compose_config(
        "train",
        [
            "experiment=maml_sinusoid",
            "trainer.steps=3",
            "trainer.val_every=3",
            "trainer.val_episodes=4",
            "trainer.progress=false",
            "eval.episodes=8",
            "logger=none",
        ],
    )
    train(cfg, tmp_path)
    results = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert [r["shots"] for r in results] == [5, 10, 20] and all(r["mse"] > 0 for r in results)
    assert any("val/mse" in r for r in read_metrics(tmp_path / "metrics.jsonl"))
