"""Meta-SGD: the batched meta-gradient, learning rates included, against the per-task reference."""

from __future__ import annotations

import pytest
import torch

from metarun.algorithms.metasgd import MetaSGD
from metarun.data.episodes import Episode
from tests.algorithms.reference import reference_maml, tiny_backbone, tiny_mlp_tasks, tiny_tasks

TOL = 1e-5


def build(kind: str, **kwargs) -> MetaSGD:
    torch.manual_seed(0)
    algo = MetaSGD(tiny_backbone(kind), 3, inner_lr=0.3, inner_steps=2, **kwargs).double()
    with torch.no_grad():  # learned rates differ per weight: a shared rate would hide an indexing mistake
        for lr in algo.lrs:
            lr.uniform_(0.1, 0.5)
    return algo


@pytest.mark.parametrize("strategy", ["grouped", "vmap", "loop"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("kind", ["conv4", "mlp"])
def test_meta_gradients_of_weights_and_learning_rates_match_the_reference(kind, first_order, strategy):
    algo = build(kind, first_order=first_order, strategy=strategy)
    xs, ys, xq, yq = tiny_tasks(tasks=3) if kind == "conv4" else tiny_mlp_tasks(tasks=3)
    grads, lr_grads, _ = reference_maml(algo, xs, ys, xq, yq, steps=2, first_order=first_order, lrs=list(algo.lrs))
    loss, _ = algo.training_loss(Episode(xs, ys, xq, yq, 3))
    weights = [*algo.backbone.parameters(), algo.head.weight, algo.head.bias]
    got = torch.autograd.grad(loss, weights + list(algo.lrs))
    n = len(weights)
    assert max((a - b).abs().max().item() for a, b in zip(got[:n], grads, strict=True)) < TOL
    assert max((a - b).abs().max().item() for a, b in zip(got[n:], lr_grads, strict=True)) < TOL
    names = [name for name, _ in algo.backbone.named_parameters()] + ["head.weight", "head.bias"]
    # a convolution's bias in front of batch norm cancels out, and so has no gradient (exactly none where the
    # norm is folded into the convolution): the rates of every other weight must get one
    cancelled = [kind == "conv4" and name.endswith(".0.bias") for name in names]
    assert all(g.abs().sum() > 0 for g, c in zip(got[n:], cancelled, strict=True) if not c)


def test_learning_rates_start_at_inner_lr_and_are_checkpointed():
    algo = MetaSGD(tiny_backbone("mlp"), 3, inner_lr=0.25)
    assert all(torch.all(lr == 0.25) for lr in algo.lrs)
    assert [lr.shape for lr in algo.lrs] == [p.shape for p in [*algo.backbone.parameters(), *algo.head.parameters()]]
    assert any(k.startswith("lrs.") for k in algo.state_dict())
