import json
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from metarun.data.sinusoid import Sinusoid
from metarun.evaluation import eval_precision, score_episodes, setting_seed
from metarun.results import mean_ci95
from tests.conftest import run_cli


def test_ci95_by_hand():
    mean, ci = mean_ci95([0.5, 0.7, 0.9, 0.7])
    std = math.sqrt(((0.2**2) + 0 + (0.2**2) + 0) / 3)
    assert mean == pytest.approx(0.7)
    assert ci == pytest.approx(1.96 * std / 2)


def test_ci_shrinks_with_more_episodes():
    rng = np.random.default_rng(0)
    _, ci_small = mean_ci95(rng.random(100))
    _, ci_large = mean_ci95(rng.random(10_000))
    assert ci_large < ci_small / 5


def test_setting_seeds_differ_between_settings_but_not_between_calls():
    assert setting_seed(1, 5, 1) == setting_seed(1, 5, 1)
    assert len({setting_seed(1, 5, 1), setting_seed(1, 5, 5), setting_seed(1, 20, 1), setting_seed(2, 5, 1)}) == 4


def test_eval_repeats_the_runs_own_evaluation_and_applies_only_what_the_command_line_changes(tmp_path, tiny):
    run = tmp_path / "run"
    trained = run_cli("train", *tiny, "eval.settings=[{ways:3,shots:1},{ways:4,shots:2}]", "eval.seed=7", f"hydra.run.dir={run}")
    assert trained.returncode == 0, trained.stderr
    after_train = json.loads((run / "eval.json").read_text())["results"]

    again = run_cli("eval", f"checkpoint={run}", "logger=none", f"hydra.run.dir={tmp_path / 'eval'}")
    assert again.returncode == 0, again.stderr
    assert json.loads((run / "eval.json").read_text())["results"] == after_train

    fewer = run_cli("eval", f"checkpoint={run}", "eval.episodes=4", "logger=none", f"hydra.run.dir={tmp_path / 'eval2'}")
    assert fewer.returncode == 0, fewer.stderr
    results = json.loads((run / "eval.json").read_text())["results"]
    assert [(r["ways"], r["shots"], r["episodes"]) for r in results] == [(3, 1, 4), (4, 2, 4)]


def test_a_fixed_way_head_skips_other_ways_with_a_note(tmp_path, tiny):
    """MAML's head has task.ways outputs; a dataset's default 5- and 20-way settings must not crash it."""
    run = tmp_path / "run"
    trained = run_cli(
        "train", *tiny, "algo=fomaml", "task.ways=3", "task.meta_batch=2", "trainer.steps=2",
        "eval.settings=[{ways:3,shots:1},{ways:5,shots:1}]", f"hydra.run.dir={run}",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    assert "skipping the 5-way settings" in trained.stdout + trained.stderr
    results = json.loads((run / "eval.json").read_text())["results"]
    assert [(r["ways"], r["shots"]) for r in results] == [(3, 1)]

    none_left = run_cli(
        "eval", f"checkpoint={run}", "eval.settings=[{ways:5,shots:1}]", "logger=none", f"hydra.run.dir={tmp_path / 'e'}"
    )
    assert none_left.returncode != 0 and "evaluates 3-way tasks only" in none_left.stderr

    # with no setting it can serve, training stops before its first step, not after its last
    doomed = tmp_path / "doomed"
    refused = run_cli(
        "train", *tiny, "algo=fomaml", "task.ways=3", "task.meta_batch=2", "eval.settings=[{ways:5,shots:1}]",
        f"hydra.run.dir={doomed}",
    )  # fmt: skip
    assert refused.returncode != 0 and "evaluates 3-way tasks only" in refused.stderr
    assert not (doomed / "checkpoints").exists()


class AutocastProbe(torch.nn.Module):
    """Scores each episode 1 when it was evaluated under the expected autocast, else 0."""

    score = "mse"

    def __init__(self, dtype):
        super().__init__()
        self.dtype = dtype

    def evaluate(self, episode, bn_mode):
        cast = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")
        seen = cast == self.dtype if self.dtype is not None else not torch.is_autocast_enabled("cpu")
        return torch.full((episode.num_tasks,), float(seen))


@pytest.mark.parametrize(("precision", "dtype"), [("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_episodes_are_scored_under_the_precisions_autocast(precision, dtype):
    sampler = Sinusoid().sampler("test", ways=1, shots=5, queries=5, seed=0, device="cpu")
    scores = score_episodes(
        AutocastProbe(dtype), sampler, episodes=5, seed=1, batch_tasks=2, bn_mode="transductive", precision=precision
    )
    assert scores.tolist() == [1.0] * 5


def test_evaluation_precision_defaults_to_the_runs_training_precision():
    trainer = OmegaConf.create({"precision": "bf16"})
    assert eval_precision(OmegaConf.create({"precision": None}), trainer) == "bf16"
    assert eval_precision(OmegaConf.create({"precision": "fp32"}), trainer) == "fp32"
    assert eval_precision(OmegaConf.create({}), None) == "fp32"  # a run config without a trainer section


def test_a_bf16_channels_last_run_is_validated_and_tested_as_it_was_trained(tmp_path, tiny):
    run = tmp_path / "run"
    trained = run_cli(
        "train", *tiny, "algo=anil", "task.meta_batch=2", "trainer.precision=bf16", "trainer.channels_last=true",
        f"hydra.run.dir={run}",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    record = json.loads((run / "eval.json").read_text())
    assert record["precision"] == "bf16"
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in record["results"])

    fp32 = run_cli("eval", f"checkpoint={run}", "eval.precision=fp32", "logger=none", f"hydra.run.dir={tmp_path / 'e'}")
    assert fp32.returncode == 0, fp32.stderr
    again = json.loads((run / "eval.json").read_text())
    assert again["precision"] == "fp32"
    for a, b in zip(record["results"], again["results"], strict=True):
        assert abs(a["accuracy"] - b["accuracy"]) < 0.1  # the same model: rounding moves few of the 50 predictions
