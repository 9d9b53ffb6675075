"""Plain per-task reference implementations the batched algorithms are checked against.

Written the textbook way: one task at a time, a copy of the model per task,
``torch.autograd.grad(create_graph=True)`` for the inner steps, no
``torch.func`` transform anywhere.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call

from metarun.bench.references import Classifier, maml_query_loss
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
    """Mean over tasks of the MAML meta-gradient (and the per-task running statistics), with the per-task code
    ``metarun bench`` times (:func:`metarun.bench.references.maml_query_loss`) on a fresh copy of the network per task.

    ``lrs``: per-parameter learning rates (Meta-SGD), differentiated too;
    ``head_only``: ANIL. Returns ``(grads by parameter name, lr grads, running stats)``.
    """
    grads, lr_grads, stats = None, None, []
    for t in range(xs.shape[0]):
        model = Classifier(copy.deepcopy(algo.backbone), copy.deepcopy(algo.head))
        params = dict(model.named_parameters())
        theta = list(params.values())
        alphas = None
        if lrs is not None:
            alphas = {n: a.detach().clone().requires_grad_() for n, a in zip(params, lrs, strict=True)}
        meta = maml_query_loss(
            model, params, (xs[t], ys[t], xq[t], yq[t]), steps=steps, first_order=first_order, inner_lr=algo.inner_lr,
            lrs=alphas, head_only=head_only,
        )  # fmt: skip
        wrt = theta + list((alphas or {}).values())
        gt = torch.autograd.grad(meta, wrt, allow_unused=True)
        gt = [torch.zeros_like(w) if x is None else x for w, x in zip(wrt, gt, strict=True)]
        n = len(theta)
        grads = gt[:n] if grads is None else [a + b for a, b in zip(grads, gt[:n], strict=True)]
        if alphas is not None:
            lr_grads = gt[n:] if lr_grads is None else [a + b for a, b in zip(lr_grads, gt[n:], strict=True)]
        stats.append({k: v.clone() for k, v in model.backbone.named_buffers() if v.is_floating_point()})
    T = xs.shape[0]
    grads = [g / T for g in grads]
    lr_grads = [g / T for g in lr_grads] if lr_grads is not None else None
    return grads, lr_grads, stats


def reference_protomaml(algo, xs, ys, xq, yq, ways: int, steps: int, first_order: bool):
    """Mean over tasks of the Proto-MAML meta-gradient with respect to the backbone, per task on a fresh copy of the
    network: the support features through the meta-learned backbone (batch statistics), the class means ``c_k``
    class by class, a head ``W = 2 c_k``, ``b = -||c_k||²``, then :func:`maml_query_loss` from the backbone and that
    head, differentiated through the head's construction. Returns ``(grads, heads)``, the heads it started from."""
    params = dict(algo.backbone.named_parameters())
    grads, heads = None, []
    for t in range(xs.shape[0]):
        backbone = copy.deepcopy(algo.backbone)
        z = functional_call(backbone, params, (xs[t],))
        protos = torch.stack([z[ys[t] == k].mean(0) for k in range(ways)])
        head = nn.Linear(protos.shape[1], ways).to(protos.dtype)
        # clones: the inner steps' gradients are taken with the head held fixed, not through its construction
        weights = {f"backbone.{n}": p.clone() for n, p in params.items()}
        weights |= {"head.weight": 2 * protos, "head.bias": -(protos**2).sum(1)}
        heads.append((weights["head.weight"].detach(), weights["head.bias"].detach()))
        meta = maml_query_loss(
            Classifier(backbone, head), weights, (xs[t], ys[t], xq[t], yq[t]), steps=steps, first_order=first_order,
            inner_lr=algo.inner_lr,
        )  # fmt: skip
        gt = torch.autograd.grad(meta, list(params.values()))
        grads = list(gt) if grads is None else [a + b for a, b in zip(grads, gt, strict=True)]
    return [g / xs.shape[0] for g in grads], heads
