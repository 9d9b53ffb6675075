"""Proto-MAML: its head from the support prototypes, its meta-gradient against a per-task reference, any ways."""

from __future__ import annotations

import pytest
import torch

from metarun.algorithms.protomaml import ProtoMAML, prototype_head
from metarun.data.episodes import Episode
from metarun.data.metadataset import PaddedEpisode
from metarun.errors import ConfigError
from tests.algorithms.reference import reference_protomaml, tiny_backbone, tiny_mlp_tasks, tiny_tasks
from tests.algorithms.test_learning import learns

TOL = 1e-9  # float64


def build(kind: str = "conv4", **kwargs) -> ProtoMAML:
    torch.manual_seed(0)
    return ProtoMAML(tiny_backbone(kind), 3, **kwargs).double()


def data_for(kind: str, **kwargs):
    return tiny_tasks(**kwargs) if kind == "conv4" else tiny_mlp_tasks(**kwargs)


def meta_gradient(algo, episode):
    loss, metrics = algo.training_loss(episode)
    return torch.autograd.grad(loss, list(algo.backbone.parameters())), metrics


def max_error(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def test_prototype_head_by_hand():
    z = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [1.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 2])
    head = prototype_head(z, labels, 3)  # prototypes (1, 0), (0, 4), (1, 1)
    torch.testing.assert_close(head["weight"], torch.tensor([[2.0, 0.0], [0.0, 8.0], [2.0, 2.0]], dtype=torch.float64))
    torch.testing.assert_close(head["bias"], torch.tensor([-1.0, -16.0, -2.0], dtype=torch.float64))
    # W z + b = ||z||² - ||z - c_k||²: the same ranking as ProtoNet's distances
    q = torch.tensor([[0.5, 3.0]], dtype=torch.float64)
    protos = torch.tensor([[1.0, 0.0], [0.0, 4.0], [1.0, 1.0]], dtype=torch.float64)
    logits = q @ head["weight"].T + head["bias"]
    torch.testing.assert_close(logits, (q**2).sum() - ((q[:, None] - protos) ** 2).sum(-1))


@pytest.mark.parametrize("kind", ["conv4", "mlp"])
def test_the_inner_loop_starts_from_the_reference_head(kind):
    algo = build(kind)
    xs, ys, xq, yq = data_for(kind, tasks=2)
    _, heads = reference_protomaml(algo, xs, ys, xq, yq, ways=3, steps=0, first_order=True)
    params, stats = algo.model_parameters(), {k: v.clone() for k, v in algo.backbone.named_buffers()}
    for t, (weight, bias) in enumerate(heads):
        with algo.solving(3):
            start = algo.initial_weights(params, stats, xs[t], ys[t], "batch")
        torch.testing.assert_close(start["head"]["weight"], weight, rtol=0, atol=TOL)
        torch.testing.assert_close(start["head"]["bias"], bias, rtol=0, atol=TOL)


@pytest.mark.parametrize("strategy", ["grouped", "vmap", "loop"])
@pytest.mark.parametrize("first_order", [True, False], ids=["first_order", "second_order"])
@pytest.mark.parametrize("kind", ["conv4", "mlp"])
def test_meta_gradient_matches_the_per_task_reference(kind, first_order, strategy):
    algo = build(kind, inner_lr=0.3, inner_steps=2, first_order=first_order, strategy=strategy)
    xs, ys, xq, yq = data_for(kind, tasks=3)
    expected, _ = reference_protomaml(algo, xs, ys, xq, yq, ways=3, steps=2, first_order=first_order)
    got, metrics = meta_gradient(algo, Episode(xs, ys, xq, yq, 3))
    assert max_error(got, expected) < TOL
    assert set(metrics) == {"loss", "acc"}


def test_the_meta_gradient_flows_through_the_prototypes_in_first_order(monkeypatch):
    """Guards the test above: without the head's dependence on the backbone the first-order gradient differs."""
    algo = build(inner_lr=0.3, inner_steps=2)
    xs, ys, xq, yq = data_for("conv4", tasks=3)
    with_head, _ = reference_protomaml(algo, xs, ys, xq, yq, ways=3, steps=2, first_order=True)

    def detached_head(z, labels, ways):
        return {k: v.detach() for k, v in prototype_head(z, labels, ways).items()}

    monkeypatch.setattr("metarun.algorithms.protomaml.prototype_head", detached_head)
    got, _ = meta_gradient(algo, Episode(xs, ys, xq, yq, 3))
    assert max_error(got, with_head) > 1e3 * TOL


def padded(tasks: list[tuple[int, int, int]], seed: int = 0) -> tuple[PaddedEpisode, list[tuple]]:
    """A padded meta-batch of tasks of ``(ways, shots, queries)``, and each task's own tensors."""
    raw = [tiny_tasks(tasks=1, ways=w, shots=s, queries=q, seed=seed + i) for i, (w, s, q) in enumerate(tasks)]
    w_max = max(w for w, _, _ in tasks)
    s_max, q_max = max(w * s for w, s, _ in tasks), max(w * q for w, _, q in tasks)

    def pad(x, n):
        return torch.nn.functional.pad(x[0], (0, 0) * (x.dim() - 2) + (0, n - x.shape[1]))

    xs = torch.stack([pad(r[0], s_max) for r in raw])
    ys = torch.stack([pad(r[1], s_max) for r in raw])
    xq = torch.stack([pad(r[2], q_max) for r in raw])
    yq = torch.stack([pad(r[3], q_max) for r in raw])
    sizes = [(w, w * s, w * q) for w, s, q in tasks]
    masks = [torch.stack([torch.arange(n) < size[i] for size in sizes]) for i, n in ((1, s_max), (2, q_max), (0, w_max))]
    return PaddedEpisode(xs, ys, xq, yq, w_max, *masks, sizes), raw


def test_padded_episodes_of_different_ways_equal_each_task_alone():
    algo = build(inner_lr=0.3, inner_steps=2)
    ep, raw = padded([(3, 2, 2), (5, 1, 3), (4, 3, 1)])
    got, metrics = meta_gradient(algo, ep)
    per_task = [reference_protomaml(algo, *r, ways=r[1].max().item() + 1, steps=2, first_order=True)[0] for r in raw]
    expected = [torch.stack(g).mean(0) for g in zip(*per_task, strict=True)]
    assert max_error(got, expected) < TOL
    algo.eval()
    scores = algo.evaluate(ep, "transductive")
    alone = torch.cat([algo.evaluate(Episode(*r, r[1].max().item() + 1), "transductive") for r in raw])
    assert torch.equal(scores, alone) and scores.shape == (3,)


def test_it_has_no_meta_learned_head_and_refuses_regression():
    assert not hasattr(build(), "head") and "head.weight" not in build().state_dict()
    with pytest.raises(ConfigError, match="classification"):
        ProtoMAML(tiny_backbone("mlp"), 1, task_kind="regression")


@pytest.mark.slow
def test_short_training_scores_far_above_chance(tmp_path, compose_config, glyph_root, one_thread):
    learns(
        "protomaml",
        ["backbone.hidden=16", "task.meta_batch=4", "trainer.steps=200", "trainer.lr=0.003"],
        compose_config,
        glyph_root,
        tmp_path,
    )
