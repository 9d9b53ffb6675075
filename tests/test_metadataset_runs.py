"""``task.protocol=metadataset`` through the trainer, ``metarun eval`` and ``metarun report``, and what refuses it."""

from __future__ import annotations

import json
import os
import signal

import pytest

from metarun import report, trainer
from metarun.errors import ConfigError
from tests.conftest import run_cli

MD = ["task.protocol=metadataset", "task.meta_batch=2"]


def no_data(*args, **kwargs):
    raise AssertionError("the dataset was built before the config was checked")


@pytest.mark.parametrize("algo", ["maml", "fomaml", "anil", "metasgd", "reptile"])
def test_fixed_way_algorithms_refuse_the_protocol_before_the_dataset_loads(algo, tmp_path, compose_config, tiny, monkeypatch):
    monkeypatch.setattr(trainer, "build_dataset", no_data)
    with pytest.raises(ConfigError, match="serves episodes of task.ways classes only") as refused:
        trainer.train(compose_config("train", [*tiny, *MD, f"algo={algo}"]), tmp_path)
    assert "algo=protonet" in str(refused.value) and "\n" not in str(refused.value)


def test_compile_is_refused_for_episodes_that_change_shape(tmp_path, compose_config, tiny, monkeypatch):
    monkeypatch.setattr(trainer, "build_dataset", no_data)
    with pytest.raises(ConfigError, match="change shape every step"):
        trainer.train(compose_config("train", [*tiny, *MD, "trainer.compile=true"]), tmp_path)


def test_the_refusal_is_one_line_from_the_cli(tmp_path, tiny):
    done = run_cli("train", *tiny, *MD, "algo=maml", f"hydra.run.dir={tmp_path}")
    assert done.returncode == 2
    assert "task.protocol=metadataset: MAML serves episodes of task.ways classes only" in done.stderr.strip().splitlines()[-1]


def check_results(results: list[dict], episodes: int, classes: int) -> None:
    """The overall row, then one per ways bucket that has episodes, which together hold every episode once."""
    overall, *buckets = results
    assert overall["ways"] == f"5-{classes}" and overall["shots"] == "variable" and overall["episodes"] == episodes
    assert len(overall["per_episode"]) == len(overall["per_episode_ways"]) == episodes
    assert 0 <= overall["accuracy"] <= 1 and overall["ci95"] > 0
    assert set(overall["per_episode_ways"]) <= set(range(5, classes + 1))
    assert sum(b["episodes"] for b in buckets) == episodes
    for b in buckets:
        lo, _, hi = b["ways"].partition("-")
        assert all(int(lo) <= w <= int(hi or lo) for w in b["per_episode_ways"])
        chosen = [
            s for s, w in zip(overall["per_episode"], overall["per_episode_ways"], strict=True) if int(lo) <= w <= int(hi or lo)
        ]
        assert b["per_episode"] == chosen
    assert [b["ways"] for b in buckets] == [w for w in ("5-9", "10-19", "20") if any(b["ways"] == w for b in buckets)]


def test_protonet_trains_validates_and_tests_on_metadataset_episodes(tmp_path, compose_config, tiny):
    run = tmp_path / "run"
    best = trainer.train(compose_config("train", [*tiny, *MD, "eval.episodes=24"]), run)
    assert 0 < best <= 1
    payload = json.loads((run / "eval.json").read_text())
    assert payload["protocol"] == "metadataset"
    check_results(payload["results"], episodes=24, classes=20)  # tiny: 20 test classes

    again = run_cli("eval", f"checkpoint={run}", "logger=none", f"hydra.run.dir={tmp_path / 'eval'}")
    assert again.returncode == 0, again.stderr
    assert "5-20-way variable-shot" in again.stdout
    assert json.loads((run / "eval.json").read_text())["results"] == payload["results"]  # the same seeded episodes

    assert report.main([str(run)]) == 0
    assert "md5-20w" in (run / "report.md").read_text()


def test_finetune_validates_and_tests_on_metadataset_episodes(tmp_path, compose_config, tiny):
    overrides = [*tiny, *MD, "algo=finetune", "algo.batch_size=16", "algo.finetune_steps=5", "eval.episodes=6"]
    trainer.train(compose_config("train", overrides), tmp_path)
    check_results(json.loads((tmp_path / "eval.json").read_text())["results"], episodes=6, classes=20)


def test_protomaml_on_metadataset_episodes_resumes_to_the_uninterrupted_run(tmp_path, compose_config, tiny, monkeypatch):
    from metarun.algorithms.protomaml import ProtoMAML
    from metarun.loggers.jsonl import TIMING_FIELDS, read_metrics

    def rows(path):
        return [{k: v for k, v in row.items() if k not in TIMING_FIELDS} for row in read_metrics(path)]

    overrides = [
        *tiny,
        *MD,
        "algo=protomaml",
        "algo.inner_steps_eval=2",
        "trainer.steps=4",
        "trainer.val_every=2",
        "eval.episodes=6",
    ]
    cfg = compose_config("train", overrides)
    trainer.train(cfg, tmp_path / "whole")
    results = json.loads((tmp_path / "whole" / "eval.json").read_text())["results"]
    check_results(results, episodes=6, classes=20)

    original, calls = ProtoMAML.training_loss, []

    def interrupting(self, batch):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch)

    monkeypatch.setattr(ProtoMAML, "training_loss", interrupting)
    with pytest.raises(SystemExit):
        trainer.train(cfg, tmp_path / "cut")
    monkeypatch.setattr(ProtoMAML, "training_loss", original)
    trainer.train(compose_config("train", [*overrides, f"resume={tmp_path / 'cut'}"]), tmp_path / "ignored")
    assert rows(tmp_path / "cut" / "metrics.jsonl") == rows(tmp_path / "whole" / "metrics.jsonl")
    assert json.loads((tmp_path / "cut" / "eval.json").read_text())["results"] == results
