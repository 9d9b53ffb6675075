"""Matching networks: the batched loss and logits against a per-task loop written out here, in float64."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from metarun.algorithms.matching import MatchingNet, attention_logits
from metarun.data.episodes import Episode
from metarun.errors import ConfigError
from metarun.models.conv4 import Conv4
from metarun.models.mlp import MLP
from metarun.models.norm import norm_statistics
from metarun.trainer import train
from tests.algorithms.test_learning import learns
from tests.conftest import run_cli
from tests.helpers.task_by_task import assert_step_equals_one_call


def random_episode(tasks=3, ways=4, shots=2, queries=3, dtype=torch.float64) -> Episode:
    g = torch.Generator().manual_seed(0)
    return Episode(
        torch.randn(tasks, ways * shots, 1, 28, 28, generator=g, dtype=dtype),
        torch.arange(ways).repeat_interleave(shots).expand(tasks, -1),
        torch.randn(tasks, ways * queries, 1, 28, 28, generator=g, dtype=dtype),
        torch.arange(ways).repeat_interleave(queries).expand(tasks, -1),
        ways,
    )


def model(fce: bool, steps: int = 3) -> MatchingNet:
    torch.manual_seed(0)
    return MatchingNet(Conv4((1, 28, 28), hidden=8), ways=4, fce=fce, fce_steps=steps, scale=3.0).double()


# -- the reference: one task at a time, the paper's equations written out ------------------------------
def lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh):
    i, f, g, o = (w_ih @ x + b_ih + w_hh @ h + b_hh).chunk(4)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def reference_fce(net: MatchingNet, g: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One task's ``[n, d]`` support and ``[q, d]`` query embeddings -> g(x_i, S), f(x, S), vector by vector."""
    lstm, cell, d = net.context.support_lstm, net.context.query_cell, g.shape[1]
    fwd_w = (lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0)
    bwd_w = (lstm.weight_ih_l0_reverse, lstm.weight_hh_l0_reverse, lstm.bias_ih_l0_reverse, lstm.bias_hh_l0_reverse)
    zero = g.new_zeros(d)
    h, c, forward = zero, zero, []
    for x in g:
        h, c = lstm_cell(x, h, c, *fwd_w)
        forward.append(h)
    h, c, backward = zero, zero, []
    for x in g.flip(0):
        h, c = lstm_cell(x, h, c, *bwd_w)
        backward.append(h)
    g_full = torch.stack([g[i] + forward[i] + backward[len(g) - 1 - i] for i in range(len(g))])
    out = []
    for x in f:
        h, c = x, zero
        for _ in range(net.context.steps):
            a = torch.softmax(torch.stack([h @ gi for gi in g_full]), 0)
            r = sum(a[i] * g_full[i] for i in range(len(g_full)))
            h_hat, c = lstm_cell(torch.cat([x, r]), h, c, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
            h = h_hat + x
        out.append(h)
    return g_full, torch.stack(out)


def reference_probabilities(net: MatchingNet, ep: Episode, task: int, training: bool) -> torch.Tensor:
    """``[q, ways]``: attention over the support set, softmax of scaled cosines, one-hot labels summed."""
    backbone = net.backbone
    backbone.train(training)
    if training:  # batch statistics: the support set and the queries each their own
        g, f = backbone(ep.support_x[task]), backbone(ep.query_x[task])
    else:
        with norm_statistics(backbone, "running"):
            g, f = backbone(ep.support_x[task]), backbone(ep.query_x[task])
    if net.context is not None:
        g, f = reference_fce(net, g, f)
    probs = []
    for x in f:
        cos = torch.stack([torch.dot(x, gi) / (x.norm() * gi.norm()) for gi in g])
        a = torch.softmax(net.scale * cos, 0)
        probs.append(sum(a[i] * F.one_hot(ep.support_y[task, i], ep.ways).to(a.dtype) for i in range(len(g))))
    return torch.stack(probs)


@pytest.mark.parametrize("fce", [False, True], ids=["plain", "fce"])
def test_training_loss_and_gradients_equal_a_per_task_loop(fce):
    net = model(fce)
    ref = copy.deepcopy(net)
    ep = random_episode()
    net.train()
    loss, metrics = net.training_loss(ep)
    grads = torch.autograd.grad(loss, list(net.parameters()))
    nll = [-reference_probabilities(ref, ep, t, training=True).gather(1, ep.query_y[t][:, None]).log().mean() for t in range(3)]
    expected = torch.stack(nll).mean()
    expected_grads = torch.autograd.grad(expected, list(ref.parameters()))
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    for (name, _), a, b in zip(net.named_parameters(), grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=name)
    assert 0.0 <= metrics["acc"].item() <= 1.0
    if fce:
        assert grads[-1].abs().sum() > 0  # the attention LSTM is trained


@pytest.mark.parametrize("fce", [False, True], ids=["plain", "fce"])
def test_a_cpu_step_task_by_task_equals_one_call_of_every_task_with_the_running_statistics(fce):
    net = model(fce).train()
    calls = []
    net.backbone.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    assert_step_equals_one_call(net, random_episode())
    assert calls == [8, 12] * 3  # a task a call, its support then its queries (the one call is a grouped network)


@pytest.mark.parametrize("fce", [False, True], ids=["plain", "fce"])
def test_evaluation_logits_equal_a_per_task_loop_with_running_statistics(fce):
    net = model(fce)
    ep = random_episode()
    net.train()
    for _ in range(3):  # give the running statistics something to hold
        net.training_loss(ep)
    net.eval()
    ref = copy.deepcopy(net)
    with torch.no_grad():
        probs = torch.softmax(net.logits(ep, "running"), -1)
        expected = torch.stack([reference_probabilities(ref, ep, t, training=False) for t in range(3)])
    torch.testing.assert_close(probs, expected, rtol=1e-10, atol=1e-12)


def test_logits_by_hand():
    """Two support vectors of class 0 at 0 and 90 degrees from the query, one of class 1 opposite it."""
    support = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]]], dtype=torch.float64)
    query = torch.tensor([[[5.0, 0.0]]], dtype=torch.float64)
    logits = attention_logits(query, support, torch.tensor([[0, 0, 1]]), 2)
    e = torch.exp(torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64))
    torch.testing.assert_close(torch.softmax(logits, -1)[0, 0], torch.stack([e[0] + e[1], e[2]]) / e.sum())


@pytest.mark.parametrize("fce", [False, True], ids=["plain", "fce"])
@pytest.mark.parametrize("bn_mode", ["transductive", "support", "running"])
def test_every_bn_mode_evaluates_tasks_together_as_alone(bn_mode, fce):
    net = model(fce)
    ep = random_episode()
    net.train()
    net.training_loss(ep)
    net.eval()
    together = net.evaluate(ep, bn_mode)
    assert together.shape == (3,) and ((0 <= together) & (together <= 1)).all()
    with torch.no_grad():
        logits = net.logits(ep, bn_mode)
        alone = torch.cat([net.logits(ep.select(slice(t, t + 1)), bn_mode) for t in range(3)])
    torch.testing.assert_close(logits, alone)


@pytest.mark.parametrize("fce", [False, True], ids=["plain", "fce"])
def test_a_query_is_classified_independently_of_the_other_queries(fce):
    """The attention LSTM reads the support set only: with support or running statistics, changing every other query
    leaves a query's logits as they were. Transductive batch norm is the one mode where they may move."""
    net = model(fce).eval()
    ep = random_episode(tasks=1)
    shifted = Episode(ep.support_x, ep.support_y, ep.query_x.clone(), ep.query_y, ep.ways)
    shifted.query_x[0, 1:] = 3.0 * shifted.query_x[0, 1:].flip(0) + 1.0  # every query but the first
    with torch.no_grad():
        for mode, independent in (("support", True), ("running", True), ("transductive", False)):
            a, b = net.logits(ep, mode)[0, 0], net.logits(shifted, mode)[0, 0]
            assert torch.allclose(a, b, rtol=0, atol=1e-12) is independent, mode


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="needs a classification dataset"):
        MatchingNet(MLP((1, 4, 4)), 5, task_kind="regression")
    with pytest.raises(ConfigError, match="fce_steps"):
        MatchingNet(MLP((1, 4, 4)), 5, fce=True, fce_steps=0)
    with pytest.raises(ConfigError, match="out_features"):
        MatchingNet(torch.nn.Flatten(), 5, fce=True)


@pytest.mark.parametrize("fce", ["false", "true"])
def test_metarun_train_then_eval(fce, tmp_path, compose_config, tiny):
    train(compose_config("train", [*tiny, "algo=matching", f"algo.fce={fce}", "device=cpu"]), tmp_path)
    trained = json.loads((tmp_path / "eval.json").read_text())
    assert trained["bn_mode"] == "running"
    (tmp_path / "eval.json").unlink()
    out = run_cli("eval", f"checkpoint={tmp_path}", "device=cpu", "logger=none", f"hydra.run.dir={tmp_path / 'eval-job'}")
    assert out.returncode == 0, out.stderr
    again = json.loads((tmp_path / "eval.json").read_text())
    assert [r["accuracy"] for r in again["results"]] == [r["accuracy"] for r in trained["results"]]


#: per ``algo.fce``: the short run (on top of the shared overrides of :func:`learns`)
RUNS = {
    "false": ["backbone.hidden=32", "trainer.steps=2000"],
    "true": ["backbone.hidden=32", "trainer.steps=1000", "algo.fce=true"],
}


@pytest.mark.slow
@pytest.mark.parametrize("fce", list(RUNS))
def test_short_training_scores_far_above_chance(fce, tmp_path, compose_config, glyph_root, one_thread):
    """Measured on one CPU thread (torch 2.13, 100 test episodes, 95% CI about ±0.02), with the trainer's
    auto settings on a CPU with native bf16 (bf16, channels_last) and, in brackets, in fp32:

        algo.fce   steps   untrained       trained         wall time (2 shared, loaded cores)
        false       2000   0.587 (0.592)   0.811 (0.824)   about 2 min
        true        1000   0.230 (0.230)   0.848 (0.845)   about 1 min

    Plain cosine attention learns more slowly than ProtoNet's distances (0.742 after ProtoNet's 300
    steps, 0.793 after 1200): the similarities lie in [-1, 1], so the softmax over the support set
    stays soft. Untrained, the attention LSTM scrambles the embeddings (0.230).
    """
    learns("matching", RUNS[fce], compose_config, glyph_root, tmp_path)
