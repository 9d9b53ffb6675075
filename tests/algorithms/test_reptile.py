"""Reptile's meta-update against closed forms on a linear least-squares problem."""

from __future__ import annotations

import pytest
import torch

from metarun.algorithms.reptile import CARRIED_STATE, Reptile
from metarun.checkpoint import load_model_state
from metarun.data.episodes import Episode
from metarun.errors import CheckpointError, ConfigError
from metarun.models.mlp import MLP
from tests.algorithms.reference import tiny_backbone, tiny_tasks


def linear_reptile(**kwargs) -> Reptile:
    """``y ≈ w·x + b``: an MLP with no hidden layer is a flatten, the head is the linear model."""
    torch.manual_seed(0)
    return Reptile(MLP((3,), hidden=()), 1, task_kind="regression", **kwargs).double()


def regression_tasks(tasks=3, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tasks, 2 * n, 3, generator=g, dtype=torch.float64)
    y = torch.randn(tasks, 2 * n, 1, generator=g, dtype=torch.float64)
    return Episode(x[:, :n], y[:, :n], x[:, n:], y[:, n:], 1)


def theta(algo) -> torch.Tensor:
    return torch.cat([algo.head.weight.detach().flatten(), algo.head.bias.detach()])


@pytest.mark.parametrize("strategy", ["grouped", "vmap", "loop"])
def test_sgd_meta_gradient_is_the_closed_form(strategy):
    """k full-batch SGD steps on ``mean((A θ − y)²)`` from θ₀: ``φ = θ* + (I − 2η/n AᵀA)^k (θ₀ − θ*)``."""
    k, lr = 4, 0.05
    algo = linear_reptile(inner_lr=lr, inner_steps=k, inner_optimizer="sgd", strategy=strategy)
    ep = regression_tasks()
    theta0 = theta(algo)
    phis = []
    for t in range(ep.num_tasks):
        x = torch.cat([ep.support_x[t], ep.query_x[t]])  # Reptile trains on support and query
        y = torch.cat([ep.support_y[t], ep.query_y[t]]).squeeze(1)
        a = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        star = torch.linalg.lstsq(a, y).solution
        m = torch.eye(4, dtype=x.dtype) - 2 * lr / len(x) * a.T @ a
        phis.append(star + torch.linalg.matrix_power(m, k) @ (theta0 - star))
    expected = theta0 - torch.stack(phis).mean(0)

    loss, metrics = algo.training_loss(ep)
    gw, gb = torch.autograd.grad(loss, [algo.head.weight, algo.head.bias])
    assert torch.allclose(torch.cat([gw.flatten(), gb]), expected, atol=1e-12)
    assert set(metrics) == {"loss", "mse"}


def test_an_sgd_outer_step_of_one_moves_the_initialisation_to_the_mean_adapted_weights():
    algo = linear_reptile(inner_lr=0.05, inner_steps=3, inner_optimizer="sgd")
    ep = regression_tasks()
    theta0 = theta(algo)
    loss, _ = algo.training_loss(ep)
    delta = torch.cat([g.flatten() for g in torch.autograd.grad(loss, [algo.head.weight, algo.head.bias])])
    opt = torch.optim.SGD(algo.parameters(), lr=1.0)
    opt.zero_grad()
    algo.training_loss(ep)[0].backward()
    opt.step()
    assert torch.allclose(theta(algo), theta0 - delta)  # θ + 1·(mean φ − θ) = mean φ


def test_adam_first_step_is_a_normalised_gradient_step():
    """Adam with β₁ = 0 after one step: ``φ = θ − η g / (|g| + ε)`` (bias-corrected moments are g and g²)."""
    lr = 0.01
    algo = linear_reptile(inner_lr=lr, inner_steps=1, inner_optimizer="adam")
    ep = regression_tasks(tasks=2)
    theta0 = theta(algo)
    expected = []
    for t in range(2):
        x = torch.cat([ep.support_x[t], ep.query_x[t]])
        y = torch.cat([ep.support_y[t], ep.query_y[t]]).squeeze(1)
        a = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        g = 2 / len(x) * a.T @ (a @ theta0 - y)
        expected.append(lr * g / (g.abs() + 1e-8))
    loss, _ = algo.training_loss(ep)
    got = torch.cat([g.flatten() for g in torch.autograd.grad(loss, [algo.head.weight, algo.head.bias])])
    assert torch.allclose(got, torch.stack(expected).mean(0), atol=1e-12)


def design(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)


def adam_from(theta0, a, y, lr, steps, state):
    """``steps`` steps of ``torch.optim.Adam`` (β₁ = 0) on ``mean((A θ − y)²)``, from ``state`` (None: fresh)."""
    phi = theta0.clone().requires_grad_()
    opt = torch.optim.Adam([phi], lr=lr, betas=(0.0, 0.999), eps=1e-8)
    if state is not None:
        opt.state[phi] = {k: v.clone() for k, v in state.items()}
    for _ in range(steps):
        opt.zero_grad()
        (a @ phi - y).square().mean().backward()
        opt.step()
    return phi.detach(), opt.state[phi]


@pytest.mark.parametrize("carry", [True, False])
@pytest.mark.parametrize("strategy", ["grouped", "vmap", "loop"])
def test_adam_state_carries_over_tasks_and_meta_steps_as_torch_adam_continued(carry, strategy):
    """``carry_adam_state``: each task of a meta-step continues Adam from the mean state the tasks of the
    step before ended with (the paper's code runs tasks in sequence with one optimiser); else afresh."""
    lr, k = 0.01, 3
    algo = linear_reptile(inner_lr=lr, inner_steps=k, inner_optimizer="adam", carry_adam_state=carry, strategy=strategy)
    theta0, state = theta(algo), None
    for step in range(3):
        ep = regression_tasks(seed=step)
        phis, states = [], []
        for t in range(ep.num_tasks):
            a = design(torch.cat([ep.support_x[t], ep.query_x[t]]))
            y = torch.cat([ep.support_y[t], ep.query_y[t]]).squeeze(1)
            phi, end = adam_from(theta0, a, y, lr, k, state if carry else None)
            phis.append(phi)
            states.append(end)
        state = {key: torch.stack([s[key] for s in states]).mean(0) for key in ("exp_avg", "exp_avg_sq")}
        state["step"] = states[0]["step"]
        loss, _ = algo.training_loss(ep)
        got = torch.cat([g.flatten() for g in torch.autograd.grad(loss, [algo.head.weight, algo.head.bias])])
        torch.testing.assert_close(got, theta0 - torch.stack(phis).mean(0), rtol=1e-9, atol=1e-12)
    if carry:
        torch.testing.assert_close(algo.adam_v, state["exp_avg_sq"])
        assert int(algo.adam_steps) == 3 * k
    else:
        assert not hasattr(algo, "adam_v")


def test_evaluation_starts_from_the_carried_adam_state():
    lr, k = 0.01, 4
    algo = linear_reptile(inner_lr=lr, inner_steps=2, inner_steps_eval=k, inner_optimizer="adam")
    algo.training_loss(regression_tasks(seed=1))  # moves the carried state away from zero
    state = {"exp_avg": algo.adam_m.clone(), "exp_avg_sq": algo.adam_v.clone(), "step": algo.adam_steps.double()}
    algo.eval()
    ep = regression_tasks(seed=2)
    expected = []
    for t in range(ep.num_tasks):
        phi, _ = adam_from(theta(algo), design(ep.support_x[t]), ep.support_y[t, :, 0], lr, k, state)
        expected.append((design(ep.query_x[t]) @ phi - ep.query_y[t, :, 0]).square().mean())
    torch.testing.assert_close(algo.evaluate(ep, "transductive"), torch.stack(expected))
    torch.testing.assert_close(algo.adam_v, state["exp_avg_sq"])  # evaluation leaves the state as it was


def test_a_non_finite_step_leaves_the_carried_state_as_it_was():
    algo = linear_reptile(inner_steps=2)
    algo.training_loss(regression_tasks())
    before = [b.clone() for b in (algo.adam_m, algo.adam_v, algo.adam_steps)]
    bad = regression_tasks(seed=1)
    bad.query_y[0, 0] = float("nan")
    loss, _ = algo.training_loss(bad)
    assert not torch.isfinite(loss)
    assert all(torch.equal(a, b) for a, b in zip(before, (algo.adam_m, algo.adam_v, algo.adam_steps), strict=True))
    algo.training_loss(regression_tasks(seed=2))
    assert torch.isfinite(algo.adam_v).all() and int(algo.adam_steps) == 4


def test_checkpoints_without_the_carried_state_start_it_at_zero(tmp_path):
    algo = linear_reptile(inner_steps=2)
    algo.training_loss(regression_tasks())
    old = {k: v for k, v in algo.state_dict().items() if k not in CARRIED_STATE}
    fresh = linear_reptile(inner_steps=2)
    load_model_state(fresh, old, tmp_path / "old.pt")
    assert torch.equal(fresh.head.weight, algo.head.weight)
    assert not fresh.adam_v.any() and int(fresh.adam_steps) == 0
    with pytest.raises(CheckpointError, match="unexpected: extra"):
        load_model_state(fresh, {**old, "extra": torch.zeros(1)}, tmp_path / "old.pt")


def test_minibatches_cycle_through_one_permutation():
    algo = linear_reptile(inner_steps=5, inner_batch=3)
    torch.manual_seed(1)
    order = algo.minibatches(8, torch.device("cpu"))
    assert order.shape == (5, 3)
    flat = order.flatten().tolist()
    assert sorted(flat[:8]) == list(range(8)) and flat[8:] == flat[: 15 - 8]


@pytest.mark.parametrize("strategy", ["grouped", "vmap", "loop"])
def test_evaluation_on_support_minibatches_is_plain_sgd_on_them(strategy):
    """``inner_batch_eval``: each evaluation step is an SGD step on its mini-batch, whatever the global RNG does."""
    steps, lr, batch = 5, 0.05, 3
    algo = linear_reptile(inner_lr=lr, inner_steps_eval=steps, inner_optimizer="sgd", inner_batch_eval=batch, strategy=strategy)
    algo.eval()
    ep = regression_tasks(n=7)
    order = algo.eval_batches(7, torch.device("cpu"))
    torch.manual_seed(123)  # the batches come from a fixed seed, not from the global state
    assert torch.equal(algo.eval_batches(7, torch.device("cpu")), order)
    assert order.shape == (steps, batch) and sorted(order.flatten()[:7].tolist()) == list(range(7))
    expected = []
    for t in range(ep.num_tasks):
        phi = theta(algo)
        for pick in order:
            a = torch.cat([ep.support_x[t, pick], torch.ones(batch, 1, dtype=torch.float64)], 1)
            phi = phi - lr * 2 / batch * a.T @ (a @ phi - ep.support_y[t, pick, 0])
        aq = torch.cat([ep.query_x[t], torch.ones(len(ep.query_x[t]), 1, dtype=torch.float64)], 1)
        expected.append((aq @ phi - ep.query_y[t, :, 0]).square().mean())
    scores = algo.evaluate(ep, "transductive")
    torch.testing.assert_close(scores, torch.stack(expected))
    algo.inner_batch_eval = None  # full-batch steps give other scores: the option is used
    assert not torch.allclose(algo.evaluate(ep, "transductive"), scores)


@pytest.mark.parametrize("strategy", ["grouped", "vmap", "loop"])
def test_conv_backbone_with_batch_norm_runs_batched(strategy):
    torch.manual_seed(0)
    algo = Reptile(tiny_backbone("conv4"), 3, inner_steps=2, inner_batch=4, strategy=strategy).double()
    xs, ys, xq, yq = tiny_tasks(tasks=3)
    torch.manual_seed(5)
    loss, metrics = algo.training_loss(Episode(xs, ys, xq, yq, 3))
    loss.backward()
    assert all(p.grad is not None for p in algo.parameters())
    assert 0 <= metrics["acc"] <= 1
    algo.eval()
    for mode in ("transductive", "support", "running"):
        assert algo.evaluate(Episode(xs, ys, xq, yq, 3), mode).shape == (3,)


def test_strategies_agree():
    xs, ys, xq, yq = tiny_tasks(tasks=3)
    grads = []
    for strategy in ("grouped", "vmap", "loop"):
        torch.manual_seed(0)
        algo = Reptile(
            tiny_backbone("conv4"), 3, inner_steps=3, inner_batch=4, inner_optimizer="adam", strategy=strategy
        ).double()
        torch.manual_seed(5)
        loss, _ = algo.training_loss(Episode(xs, ys, xq, yq, 3))
        grads.append(torch.autograd.grad(loss, list(algo.parameters())))
    for other in grads[1:]:
        assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(grads[0], other, strict=True))


@pytest.mark.parametrize(
    "kwargs", [{"inner_optimizer": "rmsprop"}, {"inner_steps": 0}, {"inner_batch": 0}, {"inner_batch_eval": 0}]
)
def test_bad_options_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        Reptile(MLP((3,)), 2, **kwargs)
