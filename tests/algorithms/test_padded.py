"""ProtoNet and finetune on padded Meta-Dataset episodes against each episode computed alone, unpadded, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from metarun.algorithms.finetune import Finetune
from metarun.algorithms.padded import masked_mean
from metarun.algorithms.protonet import ProtoNet
from metarun.data.episodes import Episode
from metarun.data.metadataset import EpisodeSpec, MetaDatasetSampler, PaddedEpisode
from metarun.data.split import Split
from metarun.models.conv4 import Conv4

#: small episodes (5 to 8 ways, 1 to 3 queries a class), so a float64 Conv4 runs them in a moment
SPEC = EpisodeSpec(max_ways=8, max_query=3, max_support=30)


def padded_episode(tasks: int = 3, seed: int = 0) -> PaddedEpisode:
    g = torch.Generator().manual_seed(seed)
    counts = [7, 12, 9, 6, 15, 8, 10, 11, 7, 9]
    images = torch.randint(0, 256, (10, 15, 1, 8, 8), dtype=torch.uint8, generator=g)
    split = Split(images, [f"c{i}" for i in range(10)], torch.tensor(counts))
    sampler = MetaDatasetSampler(split, (0.5,), (0.25,), seed, spec=SPEC)
    ep = sampler.sample(tasks)
    assert len({s for _, s, _ in ep.sizes}) > 1 and len({w for w, _, _ in ep.sizes}) > 1  # shapes really differ
    return PaddedEpisode(
        ep.support_x.double(), ep.support_y, ep.query_x.double(), ep.query_y, ep.ways,
        ep.support_mask, ep.query_mask, ep.class_mask, ep.sizes,
    )  # fmt: skip


def with_garbage_padding(ep: PaddedEpisode) -> PaddedEpisode:
    """The same episode with every padded image replaced by large random values and every padded label by the last class."""
    sx, qx, sy, qy = ep.support_x.clone(), ep.query_x.clone(), ep.support_y.clone(), ep.query_y.clone()
    sx[~ep.support_mask] = 1e3 * torch.randn_like(sx[~ep.support_mask])
    qx[~ep.query_mask] = 1e3 * torch.randn_like(qx[~ep.query_mask])
    sy[~ep.support_mask] = ep.ways - 1
    qy[~ep.query_mask] = ep.ways - 1
    return PaddedEpisode(sx, sy, qx, qy, ep.ways, ep.support_mask, ep.query_mask, ep.class_mask, ep.sizes)


def protonet() -> ProtoNet:
    torch.manual_seed(0)
    return ProtoNet(Conv4((1, 8, 8), hidden=4, layers=2), ways=5).double()


def reference_protonet_loss(backbone, ep: PaddedEpisode) -> tuple[torch.Tensor, list[dict]]:
    """Mean over episodes of each one's query cross-entropy, each at its real size with its own copy of the running
    statistics: support and query through the backbone together (batch statistics), prototypes class by class.
    Returns the loss and each copy's running statistics."""
    losses, stats = [], []
    params = dict(backbone.named_parameters())
    for t, (w, s, q) in enumerate(ep.sizes):
        own = {k: v.clone() for k, v in backbone.named_buffers()}  # this episode's copy of the running statistics
        z = functional_call(backbone, {**params, **own}, (torch.cat([ep.support_x[t, :s], ep.query_x[t, :q]]),))
        zs, zq, ys = z[:s], z[s:], ep.support_y[t, :s]
        protos = torch.stack([zs[ys == c].mean(0) for c in range(w)])
        logits = -((zq[:, None, :] - protos[None]) ** 2).sum(-1)
        losses.append(F.cross_entropy(logits, ep.query_y[t, :q]))
        stats.append({k: v for k, v in own.items() if v.is_floating_point()})
    return torch.stack(losses).mean(), stats


def test_padded_protonet_loss_and_gradient_equal_each_episode_alone():
    model, ep = protonet(), padded_episode()
    model.train()
    expected, per_episode_stats = reference_protonet_loss(model.backbone, ep)
    expected_grads = torch.autograd.grad(expected, list(model.backbone.parameters()))
    loss, metrics = model.training_loss(ep)
    grads = torch.autograd.grad(loss, list(model.backbone.parameters()))
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    assert set(metrics) == {"loss", "acc"}
    # running statistics: the mean of each episode's update, as for fixed episodes
    buffers = dict(model.backbone.named_buffers())
    for name in per_episode_stats[0]:
        torch.testing.assert_close(buffers[name], torch.stack([s[name] for s in per_episode_stats]).mean(0), msg=name)


def test_padding_never_reaches_a_loss_a_score_or_a_statistic():
    ep = padded_episode(seed=1)
    garbage = with_garbage_padding(ep)
    clean, noisy = protonet(), protonet()
    clean.train(), noisy.train()
    a, b = clean.training_loss(ep)[0], noisy.training_loss(garbage)[0]
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for x, y in zip(clean.backbone.buffers(), noisy.backbone.buffers(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    clean.eval()
    for mode in ("transductive", "support", "running"):
        assert torch.equal(clean.evaluate(ep, mode), clean.evaluate(garbage, mode)), mode


@pytest.mark.parametrize("bn_mode", ["transductive", "support", "running"])
def test_padded_protonet_scores_equal_each_episode_alone(bn_mode):
    model, ep = protonet(), padded_episode(seed=2)
    model.train()
    model.training_loss(ep)  # running statistics that differ from the initial ones
    model.eval()
    scores = model.evaluate(ep, bn_mode)
    alone = torch.cat([model.evaluate(ep.task(t), bn_mode) for t in range(ep.num_tasks)])
    torch.testing.assert_close(scores, alone, rtol=0, atol=1e-12)


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_padded_finetune_scores_equal_each_episode_alone(head):
    torch.manual_seed(0)
    model = Finetune(Conv4((1, 8, 8), hidden=4, layers=2), ways=5, num_train_classes=10, head=head, finetune_steps=20).double()
    model.eval()
    ep = padded_episode(seed=3)
    scores = model.evaluate(ep, "running")
    alone = torch.cat([model.evaluate(ep.task(t), "running") for t in range(ep.num_tasks)])
    torch.testing.assert_close(scores, alone, rtol=0, atol=1e-12)
    assert torch.equal(model.evaluate(with_garbage_padding(ep), "running"), scores)


def test_masked_mean_by_hand():
    values = torch.tensor([[1.0, 2.0, float("inf")], [4.0, float("nan"), 6.0]])
    mask = torch.tensor([[True, True, False], [True, False, True]])
    assert masked_mean(values, mask).tolist() == [1.5, 5.0]


def test_a_task_of_a_padded_episode_is_an_ordinary_episode():
    ep = padded_episode()
    task = ep.task(1)
    assert type(task) is Episode and task.num_tasks == 1
