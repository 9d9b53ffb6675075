"""The sinusoid regression toy: a generated dataset with the episode sampler's protocol."""

from __future__ import annotations

import math

import pytest
import torch

from metarun.data.sinusoid import Sinusoid, load
from metarun.errors import ConfigError
from metarun.evaluation import score_episodes
from metarun.factory import build_dataset, build_sampler
from tests.conftest import dataset_config


def sampler(split="train", shots=10, queries=7, seed=0):
    return Sinusoid().sampler(split, ways=1, shots=shots, queries=queries, seed=seed, device="cpu")


def test_episodes_are_sinusoids_with_the_papers_ranges():
    ep = sampler().sample(500)
    assert ep.support_x.shape == (500, 10, 1) and ep.query_y.shape == (500, 7, 1) and ep.ways == 1
    assert ep.support_y.dtype == torch.float32
    x = torch.cat([ep.support_x, ep.query_x], 1)
    y = torch.cat([ep.support_y, ep.query_y], 1)
    assert x.min() >= -5 and x.max() <= 5
    assert y.abs().max() <= 5
    # every task is A sin(x - phase): recover A and phase from two points by least squares
    basis = torch.cat([torch.sin(x), torch.cos(x)], -1)  # A sin(x - p) = A cos p sin x - A sin p cos x
    coef = torch.linalg.lstsq(basis, y).solution.squeeze(-1)
    amplitude = coef.norm(dim=-1)
    phase = torch.atan2(-coef[:, 1], coef[:, 0])
    torch.testing.assert_close(basis @ coef.unsqueeze(-1), y, atol=1e-4, rtol=0)
    assert 0.1 - 1e-4 <= amplitude.min() and amplitude.max() <= 5 + 1e-4
    assert -1e-4 <= phase.min() and phase.max() <= math.pi + 1e-4


def test_seeded_resumable_and_split_streams_differ():
    a, b = sampler(), sampler()
    torch.testing.assert_close(a.sample(4).support_y, b.sample(4).support_y)
    state = a.state_dict()
    nxt = a.sample(4).query_y
    b.load_state_dict(state)
    torch.testing.assert_close(b.sample(4).query_y, nxt)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731 - the evaluation's fixed episodes
    val, test = sampler("val").sample_indices(5, g()), sampler("test").sample_indices(5, g())
    assert not torch.equal(val.amplitude, test.amplitude)
    torch.testing.assert_close(sampler("val").sample_indices(5, g()).x, val.x)
    assert not torch.equal(sampler("train", seed=0).sample(2).support_x, sampler("val", seed=0).sample(2).support_x)


def test_indices_slice_like_the_episode_engines():
    s = sampler()
    idx = s.sample_indices(6, torch.Generator().manual_seed(0))
    part = idx[2:4]
    assert len(part) == 2
    torch.testing.assert_close(s.gather(part).support_y, s.gather(idx).support_y[2:4])
    whole = sampler().sample(4)
    half = sampler().sample(4, shard=(1, 2))
    torch.testing.assert_close(half.support_x, whole.support_x[2:])


def test_ways_other_than_one_is_a_config_error():
    with pytest.raises(ConfigError, match="ways must be 1"):
        Sinusoid().sampler("train", ways=5, shots=10, queries=10, seed=0, device="cpu")


def test_the_yaml_builds_the_dataset_and_the_factory_asks_it_for_samplers():
    dataset = build_dataset(dataset_config("sinusoid"))
    assert dataset.name == "sinusoid" and dataset.image_shape == (1,) and dataset.task_kind == "regression"
    s = build_sampler(dataset, "test", ways=1, shots=5, queries=3, seed=0, device=torch.device("cpu"))
    assert s.sample(2).support_x.shape == (2, 5, 1)
    assert load().amplitude == (0.1, 5.0)


def test_score_episodes_runs_on_generated_tasks():
    class Zero(torch.nn.Module):
        score = "mse"

        def evaluate(self, episode, bn_mode):
            return episode.query_y.pow(2).mean((1, 2))

    scores = score_episodes(Zero(), sampler(queries=50), episodes=40, seed=1, batch_tasks=16, bn_mode="transductive")
    assert scores.shape == (40,)
    assert 2.5 < scores.mean() < 6.0  # E[A²]/2 ≈ 4.2 for A ~ U[0.1, 5]
