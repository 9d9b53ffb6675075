"""Meta-LSTM: the batched unroll against a per-task reference in float64, the preprocessing, the real runner."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from metarun.algorithms.metalstm import MetaLSTM, preprocess
from metarun.algorithms.task_batching import tasks_per_call
from metarun.data.episodes import Episode
from metarun.errors import ConfigError
from metarun.models.conv4 import Conv4
from metarun.models.norm import norm_statistics
from metarun.trainer import train
from tests.algorithms.test_learning import learns

WAYS, SHOTS, QUERIES = 3, 2, 2


def build(**kwargs) -> MetaLSTM:
    torch.manual_seed(0)
    model = MetaLSTM(Conv4((1, 12, 12), hidden=3, layers=2), WAYS, inner_steps=3, hidden=4, **kwargs).double()
    with torch.no_grad():  # gates away from their saturated start, so that every term of the update matters
        model.input.bias.fill_(-1.0)
        model.forget.bias.fill_(1.0)
        for p in [*model.lstm.parameters(), model.input.weight, model.forget.weight]:
            p.normal_(0.0, 0.5)
    return model


def random_episode(tasks=3) -> Episode:
    g = torch.Generator().manual_seed(0)
    return Episode(
        torch.randn(tasks, WAYS * SHOTS, 1, 12, 12, generator=g, dtype=torch.float64),
        torch.arange(WAYS).repeat_interleave(SHOTS).expand(tasks, -1),
        torch.randn(tasks, WAYS * QUERIES, 1, 12, 12, generator=g, dtype=torch.float64),
        torch.arange(WAYS).repeat_interleave(QUERIES).expand(tasks, -1),
        WAYS,
    )


def test_preprocessing_by_hand():
    """e^-10 = 4.54e-5 separates the two forms."""
    x = torch.tensor([2.0, -0.5, 1e-4, -1e-5, 0.0], dtype=torch.float64)
    e = math.exp(10)
    expected = [[math.log(2.0) / 10, 1.0], [math.log(0.5) / 10, -1.0], [math.log(1e-4) / 10, 1.0], [-1.0, -e * 1e-5], [-1.0, 0.0]]
    torch.testing.assert_close(preprocess(x), torch.tensor(expected, dtype=torch.float64))


def reference_task_loss(model: MetaLSTM, xs, ys, xq, yq, second_order: bool) -> torch.Tensor:
    """One task's unroll, parameter tensor by parameter tensor and coordinate-wise LSTM written out."""
    names = [f"backbone.{k}" for k, _ in model.backbone.named_parameters()] + ["head.weight", "head.bias"]
    theta = {k: p for k, p in model.named_parameters() if k in names}
    learner = torch.nn.ModuleDict({"backbone": model.backbone, "head": model.head})

    def forward(weights, x, mode, support=0):
        with norm_statistics(model.backbone, mode, support_size=support):
            z = functional_call(learner["backbone"], {k[9:]: v for k, v in weights.items() if k.startswith("backbone.")}, (x,))
        return z @ weights["head.weight"].T + weights["head.bias"]

    lstm = model.lstm
    state = {
        k: (torch.zeros(*p.shape, model.hidden, dtype=p.dtype), torch.zeros(*p.shape, model.hidden, dtype=p.dtype))
        for k, p in theta.items()
    }
    f_prev = {k: torch.zeros_like(p) for k, p in theta.items()}
    i_prev = {k: torch.zeros_like(p) for k, p in theta.items()}
    for _ in range(model.inner_steps):
        loss = F.cross_entropy(forward(theta, xs, "batch"), ys)
        grads = torch.autograd.grad(loss, list(theta.values()), create_graph=second_order)
        new = {}
        for (k, w), g in zip(theta.items(), grads, strict=True):
            g = g if second_order else g.detach()
            loss_in = loss.detach() if not second_order else loss
            x = torch.cat([preprocess(g), preprocess(loss_in.expand_as(w))], -1)
            h, c = state[k]
            gates = x @ lstm.weight_ih.T + lstm.bias_ih + h @ lstm.weight_hh.T + lstm.bias_hh
            gi, gf, gg, go = gates.chunk(4, -1)
            c = torch.sigmoid(gf) * c + torch.sigmoid(gi) * torch.tanh(gg)
            h = torch.sigmoid(go) * torch.tanh(c)
            state[k] = (h, c)
            f = torch.sigmoid(
                torch.cat([h, w[..., None], f_prev[k][..., None]], -1) @ model.forget.weight[0] + model.forget.bias[0]
            )
            i = torch.sigmoid(
                torch.cat([h, w[..., None], i_prev[k][..., None]], -1) @ model.input.weight[0] + model.input.bias[0]
            )
            f_prev[k], i_prev[k] = f, i
            new[k] = f * w - i * g
        theta = new
    out = forward(theta, torch.cat([xs, xq]), "support", support=len(xs))[len(xs) :]
    return F.cross_entropy(out, yq)


@pytest.mark.parametrize("strategy", ["grouped", "grouped-3", "vmap", "loop"])  # grouped: a task a call on a CPU
@pytest.mark.parametrize("second_order", [False, True])
def test_batched_meta_gradient_equals_a_per_task_reference(strategy, second_order):
    strategy, _, chunk = strategy.partition("-")
    model = build(second_order=second_order, strategy=strategy, chunk_size=int(chunk) if chunk else None)
    model.train()
    ep = random_episode()
    params = [p for p in model.parameters()]
    surrogate, metrics = model.training_loss(ep)
    batched = torch.autograd.grad(surrogate, params)
    reference = torch.stack([
        reference_task_loss(model, ep.support_x[t], ep.support_y[t], ep.query_x[t], ep.query_y[t], second_order)
        for t in range(ep.num_tasks)
    ]).mean()  # fmt: skip
    torch.testing.assert_close(metrics["loss"], reference.detach(), rtol=1e-10, atol=1e-12)
    expected = torch.autograd.grad(reference, params)
    for (name, _), a, b in zip(model.named_parameters(), batched, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)
    names = [n for n, _ in model.named_parameters()]
    assert all(g.abs().sum() > 0 for n, g in zip(names, batched, strict=True) if not n.endswith("0.bias")), names


def test_a_grouped_call_of_a_training_step_takes_one_task_on_a_cpu_and_every_task_elsewhere():
    """The coordinate-wise LSTM's state, not the images, decides a grouped call's size on a CPU."""
    model = build(strategy="grouped")
    assert model.tasks_per_call(4, torch.zeros(8, 4, 1, 12, 12)) == 1
    assert model.tasks_per_call(4, torch.zeros(8, 4, 1, 12, 12, device="meta")) is None
    with torch.no_grad():  # evaluation: nothing kept for a backward, calls sized by their images
        assert model.tasks_per_call(4, torch.zeros(8, 4, 1, 12, 12)) == tasks_per_call(4, torch.zeros(8, 4, 1, 12, 12)) > 1
    sizes = []
    real = model.run_grouped
    model.run_grouped = lambda fn, shared, batched, size: sizes.append(size) or real(fn, shared, batched, size)
    model.training_loss(random_episode())
    assert sizes == [1]


@pytest.mark.parametrize("first_step", [True, False])
def test_the_in_place_update_of_evaluation_equals_the_differentiable_one(first_step):
    """Without gradients the meta-learner's step runs in place (one sigmoid, the cell gate's tanh as 2σ(2x) - 1): the
    same numbers as :func:`meta_update` in float64, its inputs untouched; at the first step of a grouped call the
    state is one learner's, broadcast over the tasks."""
    from metarun.algorithms.metalstm import meta_update, meta_update_in_place

    model = build()
    g = torch.Generator().manual_seed(3)
    tasks, n, hidden = 3, 11, model.hidden
    lead = () if first_step else (tasks,)
    state = [
        torch.randn(*lead, hidden, n, generator=g, dtype=torch.float64),  # h
        torch.randn(*lead, hidden, n, generator=g, dtype=torch.float64),  # cell
        torch.rand(*lead, n, generator=g, dtype=torch.float64),  # f
        torch.rand(*lead, n, generator=g, dtype=torch.float64),  # i
        torch.randn(*lead, n, generator=g, dtype=torch.float64),  # c
    ]
    grad = torch.randn(tasks, n, generator=g, dtype=torch.float64) * 1e-3
    shared = preprocess(torch.rand(tasks, 1, generator=g, dtype=torch.float64), dim=-2)
    meta = model.meta_parameters()
    before = [t.clone() for t in (*state, grad, shared)]
    with torch.no_grad():
        expected = meta_update(grad, shared, *state, meta["lstm"], meta["gates"])
        got = meta_update_in_place(grad, shared, *state, meta["lstm"], meta["gates"])
    for a, b in zip(got, expected, strict=True):
        assert a.shape == b.shape == (tasks, *b.shape[1:])
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for a, b in zip((*state, grad, shared), before, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("strategy", ["grouped", "loop", "vmap"])
def test_evaluation_scores_as_with_the_differentiable_update(monkeypatch, strategy):
    import metarun.algorithms.metalstm as metalstm

    ep = random_episode(tasks=3)
    model = build(strategy=strategy).eval()
    got = model.predict_logits(ep, "support")
    monkeypatch.setattr(metalstm, "meta_update_in_place", metalstm.meta_update)
    torch.testing.assert_close(got, model.predict_logits(ep, "support"), rtol=1e-10, atol=1e-12)


def test_second_order_changes_the_meta_gradient():
    ep = random_episode()
    grads = []
    for second_order in (False, True):
        model = build(second_order=second_order)
        surrogate, _ = model.training_loss(ep)
        grads.append(torch.autograd.grad(surrogate, model.lstm.weight_ih)[0])
    assert not torch.allclose(grads[0], grads[1])


def test_the_gates_start_as_a_small_gradient_step():
    """The paper's initial biases: forget gate near 1 (keep the weights), input gate near 0.01 (the step size)."""
    torch.manual_seed(0)
    model = MetaLSTM(Conv4((1, 12, 12), hidden=3, layers=2), WAYS)
    assert 0.98 < torch.sigmoid(model.forget.bias).item() and 0.006 < torch.sigmoid(model.input.bias).item() < 0.018
    assert model.lstm.weight_ih.abs().max() <= 0.01


@pytest.mark.parametrize("bn_mode", ["transductive", "support", "running"])
def test_evaluation_strategies_agree(bn_mode):
    ep = random_episode(tasks=4)
    scores = [build(strategy=s).eval().evaluate(ep, bn_mode) for s in ("grouped", "vmap", "loop")]
    assert scores[0].shape == (4,) and torch.equal(scores[0], scores[1]) and torch.equal(scores[0], scores[2])


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError):
        MetaLSTM(Conv4((1, 12, 12), hidden=3, layers=2), WAYS, inner_steps=0)


def test_train_and_evaluate_through_the_runner(tmp_path, compose_config, tiny):
    cfg = compose_config("train", [*tiny, "algo=metalstm", "algo.inner_steps=2", "task.meta_batch=2", "eval.bn_mode=running"])
    assert cfg.trainer.grad_clip == 0.25
    train(cfg, tmp_path / "run")
    results = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert results["bn_mode"] == "running"
    assert [(r["ways"], r["shots"]) for r in results["results"]] == [(5, 1), (5, 5)]


@pytest.mark.slow
def test_learns(tmp_path, compose_config, glyph_root, one_thread):
    """Measured outside pytest with the same overrides (one thread, sharing 2 cores with another run): 0.751 after
    300 steps of 4 tasks (training accuracy 0.73 after 150), in 8 minutes: too slow for this test's budget, and the
    untrained score was not measured; see the report of this change."""
    learns("metalstm", ["backbone.hidden=16", "trainer.steps=300"], compose_config, glyph_root, tmp_path)
