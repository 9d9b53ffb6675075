import json
import math

import numpy as np
import pytest

from metarun.evaluation import mean_ci95, setting_seed
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
