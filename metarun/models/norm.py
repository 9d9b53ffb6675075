"""Batch norm that knows which samples of an episode it may look at.

Few-shot evaluation with batch norm is a known trap: normalising queries with
their own batch statistics (the MAML paper's choice) is transductive, and
comparisons between methods are only fair when they all use the same rule.
Every backbone uses this layer, and :func:`norm_statistics` sets the rule for
a forward pass:

* ``batch`` - statistics of the batch being forwarded (training; ``transductive`` evaluation);
* ``support`` - statistics of the first ``support_size`` samples only (the
  support set, forwarded in front of the queries), so each query is classified
  independently of the others;
* ``running`` - the running averages collected during training.

Running averages are updated only in training mode. Under ``torch.func``
transforms the algorithms pass the buffers in explicitly, so the same code
updates per-task copies.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class EpisodeBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over groups: ``tasks`` consecutive blocks of the batch are normalised separately.

    Folding the tasks of a meta-batch into one batch keeps convolutions large
    while every task still sees only its own statistics.
    """

    stats_mode: str = "batch"
    support_size: int = 0
    tasks: int = 1

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in (2, 4):
            raise ValueError(f"expected a 2-D or 4-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stats_mode == "running":
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        update = self.training and self.track_running_stats
        momentum = self.momentum if self.momentum is not None else 0.1
        rm, rv = (self.running_mean, self.running_var) if update else (None, None)
        if self.stats_mode == "batch" and self.tasks == 1:
            return F.batch_norm(x, rm, rv, self.weight, self.bias, True, momentum, self.eps)
        if self.stats_mode == "batch":
            # tasks as instances, each task's images as a spatial dim: native kernels, per-task statistics
            xt = x.view(self.tasks, -1, *x.shape[1:]).transpose(1, 2)
            y = F.instance_norm(xt, rm, rv, self.weight, self.bias, True, momentum, self.eps)
            return y.transpose(1, 2).reshape(x.shape)
        # support: each task normalised by the statistics of its first support_size samples
        xg = x.view(self.tasks, -1, *x.shape[1:])
        dims = [1, *range(3, xg.dim())]
        var, mean = torch.var_mean(xg[:, : self.support_size], dims, correction=0, keepdim=True)
        shape = [1, 1, -1] + [1] * (xg.dim() - 3)
        y = (xg - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.view_as(x)


BN_MODES = {"transductive": "batch", "support": "support", "running": "running"}


@contextmanager
def norm_statistics(model: nn.Module, mode: str, support_size: int = 0, tasks: int = 1) -> Iterator[None]:
    """Use ``mode`` (``batch``, ``support`` or ``running``) in every norm layer of ``model``,
    with the batch made of ``tasks`` equal blocks normalised separately."""
    layers = [m for m in model.modules() if isinstance(m, EpisodeBatchNorm)]
    saved = [(m.stats_mode, m.support_size, m.tasks) for m in layers]
    for m in layers:
        m.stats_mode, m.support_size, m.tasks = mode, support_size, tasks
    try:
        yield
    finally:
        for m, state in zip(layers, saved):
            m.stats_mode, m.support_size, m.tasks = state
