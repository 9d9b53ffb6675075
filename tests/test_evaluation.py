import math

import numpy as np
import pytest

from metarun.evaluation import mean_ci95, setting_seed


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
