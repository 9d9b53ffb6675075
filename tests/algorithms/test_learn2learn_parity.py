"""metarun's MAML meta-gradient equals learn2learn's, on the same Conv4 weights and tasks, in float64.

learn2learn is a peer we measure against, not a dependency: this test runs in
the environment ``scripts/install_learn2learn.sh`` builds (learn2learn 0.2.0
with metarun installed beside it) and is skipped where learn2learn does not
import. Its model is learn2learn's own ``CNN4Backbone(max_pool=True)`` (conv,
batch norm, ReLU, 2x2 max-pool, four times: metarun's Conv4) and a linear head,
given metarun's weights; its meta-gradient is learn2learn's idiom, per task
``MAML(model, lr).clone()``, ``adapt(support loss)`` per inner step, then the
query loss backpropagated, averaged over the tasks.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from metarun.algorithms.maml import MAML
from metarun.data.episodes import Episode
from metarun.models.conv4 import Conv4

with warnings.catch_warnings():  # gym and torchvision warn at import about their own age
    warnings.simplefilter("ignore")
    l2l = pytest.importorskip("learn2learn")

TOL = 1e-9
WAYS, SHOTS, QUERIES, TASKS, SIDE, HIDDEN = 5, 1, 3, 4, 16, 8


def tasks(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(TASKS, WAYS * SHOTS, 1, SIDE, SIDE, generator=g, dtype=torch.float64)
    xq = torch.randn(TASKS, WAYS * QUERIES, 1, SIDE, SIDE, generator=g, dtype=torch.float64)
    ys = torch.arange(WAYS).repeat_interleave(SHOTS).expand(TASKS, -1)
    yq = torch.arange(WAYS).repeat_interleave(QUERIES).expand(TASKS, -1)
    return xs, ys, xq, yq


def learn2learn_model(algo: MAML) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """learn2learn's Conv4 and a linear head holding ``algo``'s weights, and its parameters in ``algo``'s order (its
    blocks register the batch norm before the convolution)."""
    backbone = l2l.vision.models.CNN4Backbone(hidden_size=HIDDEN, layers=4, channels=1, max_pool=True)
    model = torch.nn.Sequential(backbone, torch.nn.Linear(algo.backbone.out_features, WAYS)).double()
    ours = [p for block in algo.backbone.features[:4] for p in (block[0].weight, block[0].bias, block[1].weight, block[1].bias)]
    theirs = [p for block in backbone for p in (block.conv.weight, block.conv.bias, block.normalize.weight, block.normalize.bias)]
    with torch.no_grad():
        for mine, other in zip([*ours, algo.head.weight, algo.head.bias], [*theirs, model[1].weight, model[1].bias], strict=True):
            other.copy_(mine)
    return model, [*theirs, model[1].weight, model[1].bias]


def learn2learn_meta_gradient(model_and_params, data, lr: float, steps: int, first_order: bool) -> list[torch.Tensor]:
    model, params = model_and_params
    xs, ys, xq, yq = data
    maml = l2l.algorithms.MAML(model, lr=lr, first_order=first_order)
    maml.zero_grad()
    for t in range(TASKS):
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(F.cross_entropy(learner(xs[t]), ys[t]))
        (F.cross_entropy(learner(xq[t]), yq[t]) / TASKS).backward()
    return [p.grad for p in params]


@pytest.mark.parametrize("strategy", ["grouped", "loop"])  # (vmap agrees with both: tests/algorithms/test_maml.py)
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("steps", [1, 2])
def test_maml_meta_gradient_equals_learn2learns(strategy, first_order, steps):
    torch.manual_seed(0)
    algo = MAML(
        Conv4((1, SIDE, SIDE), hidden=HIDDEN, layers=4), WAYS, inner_lr=0.4, inner_steps=steps, first_order=first_order,
        strategy=strategy,
    ).double()  # fmt: skip
    data = tasks()
    model = learn2learn_model(algo)
    expected = learn2learn_meta_gradient(model, data, 0.4, steps, first_order)

    loss, _ = algo.training_loss(Episode(*data, WAYS))
    got = torch.autograd.grad(loss, [*algo.backbone.parameters(), algo.head.weight, algo.head.bias])
    assert len(got) == len(expected)
    for mine, theirs in zip(got, expected, strict=True):
        assert theirs.abs().max() > 0  # every parameter takes part (a test of zeros would pass vacuously)
        torch.testing.assert_close(mine, theirs, rtol=0, atol=TOL)


def test_first_and_second_order_meta_gradients_differ():
    """The comparison above can tell the two apart: the second-order term is not negligible on these tasks."""
    torch.manual_seed(0)
    algo = MAML(Conv4((1, SIDE, SIDE), hidden=HIDDEN, layers=4), WAYS, inner_lr=0.4).double()
    second = learn2learn_meta_gradient(learn2learn_model(algo), tasks(), 0.4, 1, False)
    first = learn2learn_meta_gradient(learn2learn_model(algo), tasks(), 0.4, 1, True)
    assert max((a - b).abs().max().item() for a, b in zip(first, second, strict=True)) > 1e-4
