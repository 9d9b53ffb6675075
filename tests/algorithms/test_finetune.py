"""The transfer baseline: pre-training on ordinary mini-batches, a new classifier fitted per test episode."""

from __future__ import annotations

import pytest
import torch

from metarun.algorithms.finetune import Finetune, head_logits
from metarun.data.episodes import Batch, Episode, EpisodeSampler
from metarun.data.split import Split
from metarun.errors import ConfigError
from metarun.models.conv4 import Conv4


def tiny_split(classes=7, per_class=6) -> Split:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (classes, per_class, 1, 8, 8), generator=g, dtype=torch.uint8)
    return Split(images, [f"c{i}" for i in range(classes)])


def build(**kwargs) -> Finetune:
    torch.manual_seed(0)
    return Finetune(Conv4((1, 8, 8), hidden=4, layers=2), 3, num_train_classes=7, **kwargs).double()


def episode(tasks=3, ways=3, shots=2, queries=2) -> Episode:
    sampler = EpisodeSampler(tiny_split(), ways, shots, queries, (0.5,), (0.25,), seed=0)
    ep = sampler.sample(tasks)
    return Episode(ep.support_x.double(), ep.support_y, ep.query_x.double(), ep.query_y, ways)


def test_pre_training_uses_mini_batches_of_images_over_all_training_classes():
    algo = build(batch_size=10)
    sampler = EpisodeSampler(tiny_split(), 3, 2, 2, (0.5,), (0.25,), seed=0)
    batch = algo.sample_batch(sampler, num_tasks=4)
    assert isinstance(batch, Batch) and batch.x.shape == (10, 1, 8, 8) and batch.y.max() < 7
    loss, metrics = algo.training_loss(Batch(batch.x.double(), batch.y))
    loss.backward()
    assert algo.classifier.weight.grad.shape == (7, 16)
    assert set(metrics) == {"loss", "acc"}


@pytest.mark.parametrize("head", ["linear", "cosine"])
@pytest.mark.parametrize("bn_mode", ["transductive", "support", "running"])
def test_tasks_fitted_together_score_as_fitted_alone(head, bn_mode):
    algo = build(head=head, finetune_steps=20, finetune_lr=0.05)
    algo.eval()
    ep = episode()
    together = algo.evaluate(ep, bn_mode)
    alone = torch.cat([
        algo.evaluate(Episode(ep.support_x[t : t + 1], ep.support_y[t : t + 1], ep.query_x[t : t + 1], ep.query_y[t : t + 1], 3), bn_mode)
        for t in range(3)
    ])  # fmt: skip
    assert together.shape == (3,) and torch.equal(together, alone)


def test_fitted_heads_separate_the_support_set():
    algo = build(finetune_steps=200, finetune_lr=0.05)
    algo.eval()
    ep = episode()
    with torch.no_grad():
        zs, _ = algo.features(ep, "running")
    weight, bias = algo.fit_heads(zs, ep.support_y, 3)
    assert weight.shape == (3, 3, 16) and bias.shape == (3, 3)
    acc = (head_logits(zs, weight, bias, "linear", 1.0).argmax(-1) == ep.support_y).float().mean()
    assert acc == 1.0


def test_the_backbone_is_frozen_at_test_time():
    algo = build(finetune_steps=5)
    algo.eval()
    before = {k: v.clone() for k, v in algo.state_dict().items()}
    algo.evaluate(episode(), "running")
    assert all(torch.equal(v, before[k]) for k, v in algo.state_dict().items())


@pytest.mark.parametrize("kwargs", [{"head": "mlp"}, {"num_train_classes": None}, {"task_kind": "regression"}, {"batch_size": 0}])
def test_bad_options_are_config_errors(kwargs):
    args = {"num_train_classes": 7, **kwargs}
    with pytest.raises(ConfigError):
        Finetune(Conv4((1, 8, 8), hidden=4, layers=2), 3, **args)
