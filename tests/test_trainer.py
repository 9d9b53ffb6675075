import json

import torch

from metarun.checkpoint import load_checkpoint
from metarun.loggers.jsonl import TIMING_FIELDS, read_metrics
from metarun.trainer import train
from tests.conftest import run_cli


def learning_rows(path):
    return [{k: v for k, v in row.items() if k not in TIMING_FIELDS} for row in read_metrics(path)]


def test_same_seed_gives_the_same_metrics_and_eval(tmp_path, compose_config, tiny):
    cfg = compose_config("train", tiny)
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        train(cfg, run)
    a, b = (learning_rows(r / "metrics.jsonl") for r in runs)
    assert len(a) >= 4 and a == b
    assert any("val/accuracy" in row for row in a)
    ea, eb = (json.loads((r / "eval.json").read_text()) for r in runs)
    assert ea["results"] == eb["results"]
    assert [(r["ways"], r["shots"], r["episodes"]) for r in ea["results"]] == [(5, 1, 10), (5, 5, 10)]
    for r in ea["results"]:
        assert len(r["per_episode"]) == 10 and abs(sum(r["per_episode"]) / 10 - r["accuracy"]) < 1e-9


def test_checkpoint_holds_everything_needed_to_resume(tmp_path, compose_config, tiny):
    train(compose_config("train", tiny), tmp_path)
    ckpt = load_checkpoint(tmp_path, prefer="last.pt")
    assert ckpt["step"] == 6
    assert {"python", "numpy", "torch"} <= set(ckpt["rng"])
    assert {"model", "optimizer", "scheduler", "sampler", "config", "best"} <= set(ckpt)
    assert ckpt["config"]["trainer"]["steps"] == 6
    assert (tmp_path / "checkpoints" / "best.pt").is_file()


def test_metarun_eval_reproduces_the_accuracy_train_printed(tmp_path, compose_config, tiny):
    train(compose_config("train", tiny), tmp_path)
    trained = json.loads((tmp_path / "eval.json").read_text())
    (tmp_path / "eval.json").unlink()
    out = run_cli("eval", f"checkpoint={tmp_path}", "eval.episodes=10", "eval.queries=5", "logger=none", f"hydra.run.dir={tmp_path / 'eval-job'}")
    assert out.returncode == 0, out.stderr
    again = json.loads((tmp_path / "eval.json").read_text())
    assert [r["accuracy"] for r in again["results"]] == [r["accuracy"] for r in trained["results"]]
    assert "5-way 1-shot" in out.stdout


def test_untrained_model_is_evaluated_with_zero_steps(tmp_path, compose_config, tiny):
    train(compose_config("train", [*tiny, "trainer.steps=0"]), tmp_path)
    result = json.loads((tmp_path / "eval.json").read_text())["results"][0]
    assert 0.0 < result["accuracy"] < 1.0
    assert torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=False)["step"] == 0
