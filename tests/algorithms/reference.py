"""Plain per-task reference implementations the batched algorithms are checked against.

Written the textbook way: one task at a time, a copy of the model per task,
``torch.autograd.grad(create_graph=True)`` for the inner steps, no
``torch.func`` transform anywhere.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metarun.models.conv4 import Conv4
from metarun.models.mlp import MLP


def tiny_backbone(kind: str) -> nn.Module:
    if kind == "conv4":
        return Conv4((1, 8, 8), hidden=4, layers=2)  # two conv blocks, each with an affine batch norm
    return MLP((1, 4, 4), hidden=(6, 5))


def tiny_tasks(tasks: int = 3, ways: int = 3, shots: int = 2, queries: int = 2, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(tasks, ways * shots, 1, 8, 8, generator=g, dtype=dtype)
    xq = torch.randn(tasks, ways * queries, 1, 8, 8, generator=g, dtype=dtype)
    ys = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1)
    yq = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1)
    return xs, ys, xq, yq


def tiny_mlp_tasks(tasks: int = 3, ways: int = 3, shots: int = 2, queries: int = 2, seed: int = 0, dtype=torch.float64):
    xs, ys, xq, yq = tiny_tasks(tasks, ways, shots, queries, seed, dtype)
    return xs[..., :4, :4], ys, xq[..., :4, :4], yq


def reference_maml(algo, xs, ys, xq, yq, steps: int, first_order: bool, lrs=None, head_only: bool = False):
    """Mean over tasks of the MAML meta-gradient (and the per-task running statistics).

    ``lrs``: per-parameter learning rates (Meta-SGD), differentiated too;
    ``head_only``: ANIL. Returns ``(grads by parameter name, lr grads, running stats)``.
    """
    names = [n for n, _ in algo.backbone.named_parameters()]
    grads, lr_grads, stats = None, None, []
    for t in range(xs.shape[0]):
        backbone, head = copy.deepcopy(algo.backbone), copy.deepcopy(algo.head)
        theta = [p for _, p in backbone.named_parameters()] + [head.weight, head.bias]
        alphas = [a.detach().clone().requires_grad_() for a in lrs] if lrs is not None else None
        fast = list(theta)

        def forward(weights, x, backbone=backbone):
            z = functional_call(backbone, dict(zip(names, weights[: len(names)], strict=True)), (x,))
            return F.linear(z, weights[-2], weights[-1])

        for _ in range(steps):
            loss = F.cross_entropy(forward(fast, xs[t]), ys[t])
            adapted = fast[-2:] if head_only else fast
            g = torch.autograd.grad(loss, adapted, create_graph=not first_order)
            if first_order:
                g = [x.detach() for x in g]
            lr = alphas if alphas is not None else [algo.inner_lr] * len(fast)
            lr = lr[-2:] if head_only else lr
            new = [p - a * gi for p, a, gi in zip(adapted, lr, g, strict=True)]
            fast = fast[:-2] + new if head_only else new
        meta = F.cross_entropy(forward(fast, xq[t]), yq[t])
        wrt = theta + (alphas or [])
        gt = torch.autograd.grad(meta, wrt, allow_unused=True)
        gt = [torch.zeros_like(w) if x is None else x for w, x in zip(wrt, gt, strict=True)]
        n = len(theta)
        grads = gt[:n] if grads is None else [a + b for a, b in zip(grads, gt[:n], strict=True)]
        if alphas is not None:
            lr_grads = gt[n:] if lr_grads is None else [a + b for a, b in zip(lr_grads, gt[n:], strict=True)]
        stats.append({k: v.clone() for k, v in backbone.named_buffers() if v.is_floating_point()})
    T = xs.shape[0]
    grads = [g / T for g in grads]
    lr_grads = [g / T for g in lr_grads] if lr_grads is not None else None
    return grads, lr_grads, stats
