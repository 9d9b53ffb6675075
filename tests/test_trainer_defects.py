"""Defects of the training recipe, each pinned by a test that failed before its fix."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from metarun import factory, trainer
from metarun.checkpoint import save_checkpoint
from metarun.errors import ConfigError
from metarun.loggers.jsonl import read_metrics


class FakeClock:
    """``time.perf_counter`` that moves only when told: a training step costs 1 s, a validation 10 s."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_steps_per_s_leaves_out_validation_when_val_every_is_not_a_multiple_of_log_every(
    tmp_path, compose_config, tiny, monkeypatch
):
    clock = FakeClock()
    monkeypatch.setattr(trainer, "time", clock)
    real_step, real_validate = trainer.train_step, trainer.validate

    def step(s):
        real_step(s)
        clock.now += 1.0

    def validate(run, bar):
        real_validate(run, bar)
        clock.now += 10.0

    monkeypatch.setattr(trainer, "train_step", step)
    monkeypatch.setattr(trainer, "validate", validate)
    trainer.train(compose_config("train", [*tiny, "trainer.steps=8", "trainer.log_every=2", "trainer.val_every=3"]), tmp_path)
    rates = [row["steps_per_s"] for row in read_metrics(tmp_path / "metrics.jsonl") if "steps_per_s" in row]
    assert len(rates) == 4
    assert rates == pytest.approx([1.0] * 4)  # one step a second, whatever validation took in between


def test_compile_of_second_order_maml_is_refused_before_the_dataset_loads(tmp_path, compose_config, tiny, monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("the dataset was built before the config was checked")

    monkeypatch.setattr(trainer, "build_dataset", no_data)
    with pytest.raises(ConfigError, match="torch.compile gets second-order meta-gradients wrong"):
        trainer.train(compose_config("train", [*tiny, "algo=maml", "trainer.compile=true"]), tmp_path)


@pytest.mark.parametrize(
    ("algo", "key", "value", "message"),
    [
        ("maml", "inner_steps", -1, "algo.inner_steps=-1: must be at least 0"),
        ("protonet", "bogus", 1, "unknown key 'algo.bogus'"),
    ],
)
def test_resume_checks_the_saved_configs_group_nodes(tmp_path, compose_config, tiny, monkeypatch, algo, key, value, message):
    saved = OmegaConf.to_container(compose_config("train", [*tiny, f"algo={algo}"]), resolve=True)
    saved["algo"][key] = value
    save_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", model={}, config=saved)
    monkeypatch.setattr(trainer, "build_dataset", lambda *a, **k: pytest.fail("the saved config was not checked first"))
    with pytest.raises(ConfigError, match=message):
        trainer.train(compose_config("train", [*tiny, f"resume={tmp_path / 'run'}"]), tmp_path / "new")


def test_final_evaluation_uses_the_runs_own_dataset_and_model(tmp_path, compose_config, tiny, monkeypatch):
    built = {"datasets": 0, "algorithms": 0}
    real_dataset, real_algorithm = factory.build_dataset, factory.build_algorithm

    def count(kind, build):
        def wrapper(*args, **kwargs):
            built[kind] += 1
            return build(*args, **kwargs)

        return wrapper

    for module in (factory, trainer):
        monkeypatch.setattr(module, "build_dataset", count("datasets", real_dataset))
        monkeypatch.setattr(module, "build_algorithm", count("algorithms", real_algorithm))
    trainer.train(compose_config("train", tiny), tmp_path)
    assert (tmp_path / "eval.json").is_file()
    assert built == {"datasets": 1, "algorithms": 1}


def test_metric_window_round_trips_through_a_checkpoint():
    window = trainer.MetricWindow(torch.device("cpu"))
    window.add({"loss": torch.tensor(2.0)})
    window.add({"loss": torch.tensor(4.0)})
    window.skip()
    again = trainer.MetricWindow(torch.device("cpu"))
    again.load_state_dict(window.state_dict())
    row = again.row(world=1, lr=0.5)
    assert row["loss"] == 3.0 and row["skipped_steps"] == 1 and row["lr"] == 0.5
