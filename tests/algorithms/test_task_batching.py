"""Features of a backbone shared by all tasks: the CPU's grouped calls against one folded call."""

from __future__ import annotations

import copy

import pytest
import torch

from metarun.algorithms import task_batching
from metarun.algorithms.task_batching import _fold_features, fold_features
from tests.algorithms.reference import tiny_backbone, tiny_tasks


def backbone_with_stats() -> torch.nn.Module:
    """The tiny Conv4 with running statistics away from their initial zeros and ones."""
    torch.manual_seed(0)
    backbone = tiny_backbone("conv4").double()
    with torch.no_grad():
        for name, b in backbone.named_buffers():
            if b.is_floating_point():
                b.copy_(torch.rand_like(b) + (0.5 if name.endswith("running_var") else -0.5))
    return backbone


@pytest.mark.parametrize("training", [True, False], ids=["training", "evaluation"])
@pytest.mark.parametrize("bn_mode", ["transductive", "support", "running"])
def test_grouped_calls_equal_one_folded_call(bn_mode, training, monkeypatch):
    """Five tasks in grouped calls of two, two and one, against the accelerators' single folded call
    (instance norm over the tasks): features, the backbone's gradient through them, and the running
    statistics a training forward leaves behind."""
    monkeypatch.setattr(task_batching, "tasks_per_call", lambda *args: 2)
    backbone = backbone_with_stats().train(training)
    folded, initial = copy.deepcopy(backbone), [b.clone() for b in backbone.buffers()]
    xs, _, xq, _ = tiny_tasks(tasks=5)
    g = torch.Generator().manual_seed(1)
    probes = [torch.randn(5, 6, 16, generator=g, dtype=torch.float64) for _ in range(2)]

    got = fold_features(backbone, xs, xq, bn_mode)
    expected = _fold_features(folded, xs, xq, bn_mode)

    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    grads = [
        torch.autograd.grad(sum((z * p).sum() for z, p in zip(features, probes, strict=True)), list(m.parameters()))
        for m, features in ((backbone, got), (folded, expected))
    ]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert grads[0][0].abs().sum() > 0
    for (name, a), b in zip(backbone.named_buffers(), folded.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=name)
    moved = any(not torch.equal(a, b) for a, b in zip(backbone.buffers(), initial, strict=True))
    assert moved == (training and bn_mode == "transductive")
