"""The check every algorithm that trains task by task on a CPU (:func:`metarun.algorithms.base.loss_task_by_task`) shares."""

from __future__ import annotations

import copy

import torch


def assert_step_equals_one_call(net: torch.nn.Module, episode) -> None:
    """``net.training_loss`` (a CPU step, task by task) against ``net.tasks_loss`` on the whole meta-batch, every
    task's forward before one backward, in float64: the loss and its metrics, every gradient, and every running
    statistic, each of which moved."""
    initial = copy.deepcopy(net)
    whole = copy.deepcopy(net)
    loss, metrics = net.training_loss(episode)
    loss.backward()
    expected, acc = whole.tasks_loss(episode)
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(metrics["loss"], expected.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(metrics["acc"], acc)
    for (name, p), q in zip(net.named_parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12, msg=name)
    statistics = [
        (name, a, b) for (name, a), b in zip(net.named_buffers(), whole.buffers(), strict=True) if a.is_floating_point()
    ]
    assert statistics
    for name, a, b in statistics:
        assert not torch.equal(a, initial.get_buffer(name)), name
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=name)
