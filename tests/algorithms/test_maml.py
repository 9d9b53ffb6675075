"""MAML's batched meta-gradient against a plain per-task reference, and its evaluation modes."""

from __future__ import annotations

import pytest
import torch

from metarun.algorithms import task_batching
from metarun.algorithms.maml import MAML
from metarun.algorithms.task_batching import AUTO_VMAP_MAX_IMAGES, auto_strategy
from metarun.data.episodes import Episode
from metarun.errors import ConfigError
from tests.algorithms.reference import reference_maml, tiny_backbone, tiny_mlp_tasks, tiny_tasks

TOL = 1e-5  # float64; the backward-through-vmap bug (functorch#534) is off by ~2e-2 on these shapes


def build(kind: str, cls=MAML, **kwargs) -> MAML:
    torch.manual_seed(0)
    return cls(tiny_backbone(kind), 3, **kwargs).double()


def data_for(kind: str, **kwargs):
    return tiny_tasks(**kwargs) if kind == "conv4" else tiny_mlp_tasks(**kwargs)


def episode(data) -> Episode:
    xs, ys, xq, yq = data
    return Episode(xs, ys, xq, yq, 3)


def meta_gradient(algo, data):
    loss, metrics = algo.training_loss(episode(data))
    params = [*algo.backbone.parameters(), algo.head.weight, algo.head.bias]
    return torch.autograd.grad(loss, params), metrics


@torch.no_grad()
def randomize_running_statistics(algo) -> None:
    """Non-trivial running statistics, so that a mode that uses them is told from one that does not."""
    for m in algo.backbone.modules():
        if hasattr(m, "running_mean"):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)


def max_error(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("strategy", ["grouped", "vmap", "loop"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("kind", ["conv4", "mlp"])
def test_meta_gradient_matches_the_per_task_reference(kind, first_order, strategy):
    algo = build(kind, inner_lr=0.3, inner_steps=2, first_order=first_order, strategy=strategy)
    data = data_for(kind, tasks=4)
    expected, _, _ = reference_maml(algo, *data, steps=2, first_order=first_order)
    got, metrics = meta_gradient(algo, data)
    assert max_error(got, expected) < TOL
    assert set(metrics) == {"loss", "acc"} and all(v.dim() == 0 and not v.requires_grad for v in metrics.values())


@pytest.mark.parametrize("kind", ["conv4", "mlp"])
def test_the_reference_tells_first_from_second_order(kind):
    """Guards the test above: the two orders differ by far more than its tolerance."""
    algo = build(kind, inner_lr=0.3, inner_steps=2)
    data = data_for(kind)
    second, _, _ = reference_maml(algo, *data, steps=2, first_order=False)
    first, _, _ = reference_maml(algo, *data, steps=2, first_order=True)
    assert max_error(second, first) > 1e3 * TOL


def test_chunked_vmap_gives_the_same_meta_gradient():
    data = data_for("conv4", tasks=5)
    whole, _ = meta_gradient(build("conv4", inner_steps=2, strategy="vmap"), data)
    chunked, _ = meta_gradient(build("conv4", inner_steps=2, strategy="vmap", chunk_size=2), data)
    assert max_error(whole, chunked) < 1e-10


@pytest.mark.parametrize("strategy", ["grouped", "vmap", "loop"])
def test_running_statistics_are_the_mean_of_the_per_task_updates(strategy):
    algo = build("conv4", inner_steps=2, strategy=strategy)
    data = data_for("conv4")
    _, _, per_task = reference_maml(algo, *data, steps=2, first_order=False)
    algo.train()
    meta_gradient(algo, data)
    buffers = dict(algo.backbone.named_buffers())
    for name in per_task[0]:
        expected = torch.stack([s[name] for s in per_task]).mean(0)
        assert torch.allclose(buffers[name], expected, atol=1e-12), name
    assert not torch.equal(buffers["features.0.1.running_mean"], torch.zeros(4, dtype=torch.float64))


def test_eval_mode_leaves_running_statistics_alone():
    algo = build("conv4")
    before = {k: v.clone() for k, v in algo.backbone.named_buffers()}
    algo.eval()
    for mode in ("transductive", "support", "running"):
        algo.evaluate(episode(data_for("conv4")), mode)
    assert all(torch.equal(v, before[k]) for k, v in algo.backbone.named_buffers())


@pytest.mark.parametrize("bn_mode", ["transductive", "support", "running"])
def test_evaluation_is_the_same_with_either_strategy(bn_mode):
    data = data_for("conv4", tasks=4)
    scores = []
    for strategy in ("grouped", "vmap", "loop"):
        algo = build("conv4", inner_steps_eval=3, strategy=strategy)
        randomize_running_statistics(algo)
        algo.eval()
        out = algo.evaluate(episode(data), bn_mode)
        assert out.shape == (4,) and ((out >= 0) & (out <= 1)).all()
        scores.append(out)
    assert torch.equal(scores[0], scores[1])


@pytest.mark.parametrize("bn_mode", ["transductive", "support", "running"])
def test_grouped_evaluation_runs_its_queries_in_sub_calls_with_the_loops_predictions(bn_mode, monkeypatch):
    """A grouped evaluation call is sized by the support images of an inner step; its query forward
    runs one task a call (channels_last on a CPU), which must not change a single logit."""
    monkeypatch.setattr(task_batching, "GROUPED_IMAGES_PER_CALL", 96)  # 4 tasks of 6 float64 support images a call
    data = data_for("conv4", tasks=5, queries=4)
    logits = {}
    for strategy in ("grouped", "loop"):
        algo = build("conv4", inner_steps_eval=2, strategy=strategy)
        randomize_running_statistics(algo)
        algo.eval()
        seen, loss = [], algo.loss
        monkeypatch.setattr(algo, "loss", lambda out, y, seen=seen, loss=loss: (seen.append(out), loss(out, y))[1])
        algo.evaluate(episode(data), bn_mode)
        logits[strategy] = torch.cat([o.reshape(-1, 3) for o in seen if o.shape[-2] == 12])  # queries, not support
    assert logits["grouped"].shape == (5 * 12, 3)
    torch.testing.assert_close(logits["grouped"], logits["loop"], rtol=1e-9, atol=1e-9)


def test_bn_modes_decide_what_a_query_is_normalised_with():
    """support and running: a query's prediction ignores the other queries; transductive: it does not."""
    algo = build("conv4", inner_steps_eval=1)
    algo.eval()
    xs, ys, xq, yq = data_for("conv4", tasks=1)
    buffers = {k: v for k, v in algo.backbone.named_buffers()}
    params = algo.detached(algo.meta_parameters())

    def first_query_logits(xq_):
        return {
            mode: algo.solve(params, buffers, xs[0], ys[0], xq_[0], 1, mode, True)[0]
            for mode in ("transductive", "support", "running")
        }

    a = first_query_logits(xq)
    other = xq.clone()
    other[:, 1:] = 3 * other[:, 1:] + 1  # the other queries change, the first does not
    b = first_query_logits(other)
    assert torch.allclose(a["support"], b["support"]) and torch.allclose(a["running"], b["running"])
    assert not torch.allclose(a["transductive"], b["transductive"])


def test_zero_inner_steps_is_joint_training():
    algo = build("mlp", inner_steps=0)
    data = data_for("mlp")
    got, _ = meta_gradient(algo, data)
    expected, _, _ = reference_maml(algo, *data, steps=0, first_order=False)
    assert max_error(got, expected) < TOL


def test_regression_uses_mse_and_reports_it():
    torch.manual_seed(0)
    algo = MAML(tiny_backbone("mlp"), 1, inner_lr=0.01, task_kind="regression").double()
    assert algo.score == "mse"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 10, 1, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randn(3, 10, 1, generator=g, dtype=torch.float64)
    ep = Episode(x[:, :5], y[:, :5], x[:, 5:], y[:, 5:], 1)
    loss, metrics = algo.training_loss(ep)
    assert set(metrics) == {"loss", "mse"} and torch.isclose(metrics["loss"], metrics["mse"])
    algo.eval()
    mse = algo.evaluate(ep, "transductive")
    assert mse.shape == (3,) and (mse > 0).all()


def test_auto_strategy_rule():
    assert auto_strategy(10, convolutional=True, groupable=True) == "grouped"
    assert auto_strategy(100, convolutional=True, groupable=True) == "grouped"
    assert auto_strategy(10, convolutional=False, groupable=True) == "vmap"
    assert auto_strategy(10, convolutional=True) == "vmap"
    assert auto_strategy(AUTO_VMAP_MAX_IMAGES + 1, convolutional=True) == "loop"
    assert auto_strategy(10_000, convolutional=False) == "vmap"


def test_grouped_call_sizes_follow_the_cpus_caches_and_take_everything_on_a_gpu():
    limit = task_batching.GROUPED_IMAGES_PER_CALL

    omniglot = torch.zeros(2, 3, 1, 28, 28, dtype=torch.bfloat16)
    assert task_batching.tasks_per_call(10, omniglot) == limit // 10
    assert task_batching.tasks_per_call(limit + 1, omniglot) == 1
    assert task_batching.tasks_per_call(10, omniglot.float()) == limit // 20  # fp32 activations take twice the bytes
    assert task_batching.tasks_per_call(10, omniglot.double()) == limit // 40
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the activations' precision is autocast's
        assert task_batching.tasks_per_call(10, omniglot.float()) == limit // 10
    mini = torch.zeros(2, 3, 3, 84, 84, dtype=torch.bfloat16)
    assert task_batching.tasks_per_call(10, mini) == 1  # 10 miniImageNet images are 270 Omniglot ones
    cifar = torch.zeros(2, 3, 3, 32, 32, dtype=torch.bfloat16)
    assert task_batching.tasks_per_call(1, cifar) == limit * 784 // (3 * 1024)
    for x in (omniglot, mini):
        assert task_batching.tasks_per_call(10, x.to("meta")) is None  # off the CPU (as on a GPU): all tasks in one call
    calls = []
    out = task_batching.map_chunks(lambda x: calls.append(len(x)) or x * 2, (torch.arange(7),), None)
    assert calls == [7] and out.tolist() == [2 * i for i in range(7)]


def test_grouped_calls_in_chunks_give_the_same_meta_gradient():
    data = tiny_tasks(tasks=5)
    whole, _ = meta_gradient(build("conv4", inner_steps=2, strategy="grouped", chunk_size=5), data)
    chunked, _ = meta_gradient(build("conv4", inner_steps=2, strategy="grouped", chunk_size=2), data)
    assert max_error(whole, chunked) < TOL


def test_grouped_needs_a_sequential_backbone():
    from metarun.models.resnet12 import ResNet12

    assert MAML(tiny_backbone("conv4"), 3).strategy_for(10) == "grouped"
    resnet = ResNet12((3, 16, 16), channels=(4, 4, 4, 4))
    assert MAML(resnet, 3).strategy_for(10) == "vmap"  # auto falls back
    with pytest.raises(ConfigError, match="strategy=grouped"):
        MAML(resnet, 3, strategy="grouped")


@pytest.mark.parametrize("kwargs", [{"strategy": "fast"}, {"chunk_size": 0}, {"inner_steps": -1}, {"task_kind": "ranking"}])
def test_bad_options_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        MAML(tiny_backbone("mlp"), 3, **kwargs)


@pytest.mark.slow
def test_maml_sinusoid_beats_joint_pretraining_with_the_same_fine_tuning(tmp_path, compose_config):
    """The MAML paper's regression: a short ``experiment=maml_sinusoid`` run, after one inner step from
    K = 10 points on held-out tasks, against the same network trained on all tasks jointly
    (``inner_steps=0``: the loss of the initialisation itself) and fine-tuned the same way."""
    import json

    from metarun.trainer import train

    short = [
        "experiment=maml_sinusoid",
        "trainer.steps=2000",
        "trainer.val_every=1000",
        "trainer.val_episodes=50",
        "trainer.progress=false",
        "eval.episodes=200",
        "eval.settings=[{ways:1,shots:10}]",
        "logger=none",
    ]
    mse = {}
    for name, extra in (("maml", []), ("pretrained", ["algo.inner_steps=0"])):
        train(compose_config("train", [*short, *extra]), tmp_path / name)
        result = json.loads((tmp_path / name / "eval.json").read_text())["results"][0]
        assert result["shots"] == 10 and "mse" in result
        mse[name] = result["mse"]
    assert mse["maml"] < 0.5 * mse["pretrained"], mse
