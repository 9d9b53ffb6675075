import pytest
import torch
from torch import nn

from metarun.algorithms.protonet import ProtoNet, logits_from_distances, prototypes
from metarun.data.episodes import Episode
from metarun.errors import ConfigError
from metarun.models.conv4 import Conv4
from tests.helpers.task_by_task import assert_step_equals_one_call


def test_prototypes_and_distances_by_hand():
    support = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]]])  # two of class 0, one of class 1
    labels = torch.tensor([[0, 0, 1]])
    protos = prototypes(support, labels, 2)
    torch.testing.assert_close(protos, torch.tensor([[[1.0, 0.0], [0.0, 4.0]]]))
    query = torch.tensor([[[1.0, 1.0]]])
    # squared distances: to (1,0) = 1, to (0,4) = 1 + 9 = 10
    torch.testing.assert_close(logits_from_distances(query, protos), torch.tensor([[[-1.0, -10.0]]]))


def random_episode(tasks=3, ways=4, shots=2, queries=3):
    g = torch.Generator().manual_seed(0)
    return Episode(
        torch.randn(tasks, ways * shots, 1, 28, 28, generator=g),
        torch.arange(ways).repeat_interleave(shots).expand(tasks, -1),
        torch.randn(tasks, ways * queries, 1, 28, 28, generator=g),
        torch.arange(ways).repeat_interleave(queries).expand(tasks, -1),
        ways,
    )


def one_task(ep: Episode, t: int) -> Episode:
    return Episode(ep.support_x[t : t + 1], ep.support_y[t : t + 1], ep.query_x[t : t + 1], ep.query_y[t : t + 1], ep.ways)


def test_batched_tasks_equal_one_task_at_a_time_in_every_mode():
    torch.manual_seed(0)
    model = ProtoNet(Conv4((1, 28, 28), hidden=8), ways=4).double()
    ep = random_episode()
    ep = Episode(ep.support_x.double(), ep.support_y, ep.query_x.double(), ep.query_y, ep.ways)
    model.train()
    for _ in range(3):  # give the running statistics something to hold
        model.training_loss(ep)
    model.eval()
    for mode in ("batch", "transductive", "support", "running"):
        together = model.logits(ep, mode)
        alone = torch.cat([model.logits(one_task(ep, t), mode) for t in range(ep.num_tasks)])
        torch.testing.assert_close(together, alone, msg=mode)


def test_bn_modes_differ_where_they_should():
    torch.manual_seed(0)
    model = ProtoNet(Conv4((1, 28, 28), hidden=8), ways=4).eval()
    ep = random_episode(tasks=1)
    shifted = Episode(ep.support_x, ep.support_y, ep.query_x.clone(), ep.query_y, ep.ways)
    shifted.query_x[0, 1:] += 3.0  # change every query but the first
    for mode, independent in (("support", True), ("running", True), ("transductive", False)):
        a = model.logits(ep, mode)[0, 0]
        b = model.logits(shifted, mode)[0, 0]
        assert torch.allclose(a, b, atol=1e-5) is independent, mode


def test_training_loss_is_cross_entropy_over_queries():
    torch.manual_seed(0)
    model = ProtoNet(nn.Flatten(), ways=4)
    ep = random_episode(tasks=1)
    loss, metrics = model.training_loss(ep)
    s, q = ep.support_x.flatten(2), ep.query_x.flatten(2)
    protos = torch.stack([s[0, ep.support_y[0] == c].mean(0) for c in range(4)])
    logits = -torch.cdist(q[0], protos).pow(2)
    torch.testing.assert_close(loss, nn.functional.cross_entropy(logits, ep.query_y[0]), rtol=1e-4, atol=1e-4)
    assert 0.0 <= metrics["acc"].item() <= 1.0


def test_a_regression_dataset_is_a_config_error():
    with pytest.raises(ConfigError, match="needs a classification dataset"):
        ProtoNet(torch.nn.Identity(), 5, task_kind="regression")


def test_task_by_task_cpu_step_has_the_one_call_gradients_loss_and_statistics():
    """On a CPU the meta-step runs each task's forward and backward back to back; it must equal one call (float64)."""
    torch.manual_seed(0)
    net = ProtoNet(Conv4((1, 8, 8), hidden=4, layers=2), 3).double()
    xs, xq = torch.randn(4, 6, 1, 8, 8, dtype=torch.float64), torch.randn(4, 9, 1, 8, 8, dtype=torch.float64)
    ys, yq = torch.arange(3).repeat_interleave(2).expand(4, -1), torch.arange(3).repeat_interleave(3).expand(4, -1)
    calls = []
    net.backbone.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    assert_step_equals_one_call(net, Episode(xs, ys, xq, yq, 3))
    assert calls == [15] * 8  # a task a call (support and queries together), in the step and in the one call alike
