"""ANIL: head-only inner loop; the batched meta-gradient against the per-task reference."""

from __future__ import annotations

import pytest
import torch

from metarun.algorithms.anil import ANIL
from metarun.data.episodes import Episode
from metarun.models.grouped import _ConvOfImages
from tests.algorithms.reference import reference_maml, tiny_backbone, tiny_mlp_tasks, tiny_tasks

TOL = 1e-5


@pytest.mark.parametrize("task_by_task", [True, False], ids=["task_by_task", "folded"])
@pytest.mark.parametrize("strategy", ["vmap", "loop"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("kind", ["conv4", "mlp"])
def test_meta_gradient_matches_the_reference(kind, first_order, strategy, task_by_task, monkeypatch):
    """Both backbone passes: task by task (CPUs) and one folded backward (accelerators)."""
    monkeypatch.setattr(ANIL, "task_by_task", staticmethod(lambda batch: task_by_task))
    torch.manual_seed(0)
    algo = ANIL(tiny_backbone(kind), 3, inner_lr=0.5, inner_steps=3, first_order=first_order, strategy=strategy).double()
    xs, ys, xq, yq = tiny_tasks(tasks=3) if kind == "conv4" else tiny_mlp_tasks(tasks=3)
    expected, _, _ = reference_maml(algo, xs, ys, xq, yq, steps=3, first_order=first_order, head_only=True)
    loss, metrics = algo.training_loss(Episode(xs, ys, xq, yq, 3))
    params = [*algo.backbone.parameters(), algo.head.weight, algo.head.bias]
    got = torch.autograd.grad(loss, params)
    assert max((a - b).abs().max().item() for a, b in zip(got, expected, strict=True)) < TOL
    assert got[0].abs().sum() > 0  # the backbone is meta-learned through the head's adaptation
    assert 0 <= metrics["acc"] <= 1


def test_task_by_task_and_folded_passes_update_the_running_statistics_alike(monkeypatch):
    """The reference forwards the backbone at every inner step, so only the two passes are compared here."""
    buffers = {}
    for task_by_task in (True, False):
        monkeypatch.setattr(ANIL, "task_by_task", staticmethod(lambda batch, flag=task_by_task: flag))
        torch.manual_seed(0)
        algo = ANIL(tiny_backbone("conv4"), 3, inner_steps=2).double()
        algo.training_loss(Episode(*tiny_tasks(tasks=3), 3))
        buffers[task_by_task] = {k: v.clone() for k, v in algo.backbone.named_buffers()}
    assert not torch.equal(buffers[True]["features.0.1.running_mean"], torch.zeros(4, dtype=torch.float64))
    for name, value in buffers[True].items():
        torch.testing.assert_close(value, buffers[False][name], rtol=0, atol=1e-12)


@pytest.mark.parametrize("task_by_task", [True, False], ids=["task_by_task", "folded"])
def test_the_backbone_runs_once_per_set_whatever_the_inner_steps(task_by_task, monkeypatch):
    """Convolutions counted: each of the two layers once for the support sets and once for the query
    sets, per task (task by task) or per grouped call of all three tiny tasks (folded, on a CPU, where
    the first layer's is a product of the unfolded images)."""
    monkeypatch.setattr(ANIL, "task_by_task", staticmethod(lambda batch: task_by_task))
    conv2d, product, calls = torch.nn.functional.conv2d, _ConvOfImages.apply, []
    monkeypatch.setattr(torch.nn.functional, "conv2d", lambda *a, **k: calls.append(1) or conv2d(*a, **k))
    monkeypatch.setattr(_ConvOfImages, "apply", lambda *a: calls.append(1) or product(*a))
    counts = []
    for steps in (1, 5):
        torch.manual_seed(0)
        algo = ANIL(tiny_backbone("conv4"), 3, inner_steps=steps, strategy="loop").double()
        calls.clear()
        algo.training_loss(Episode(*tiny_tasks(tasks=3), 3))
        counts.append(len(calls))
    assert counts == [2 * 2 * (3 if task_by_task else 1)] * 2
