"""How the tasks of a meta-batch run: the task-batching strategies and backbone features per task.

Execution strategy (``algo.strategy``):

* ``grouped`` - the tasks' copies of a sequential backbone (Conv4, MLP) run as
  one network whose channels are grouped by task
  (:mod:`metarun.models.grouped`); the per-task function is called once with
  every tensor carrying a leading task dimension, and plain autograd
  (:func:`autograd_grad`; no vmap, so exact to second order) differentiates it.
  The fastest on a CPU at every task size measured
  (``python scripts/maml_strategy.py``; :data:`GROUPED_IMAGES_PER_CALL`);
* ``vmap`` - ``torch.func.vmap`` over tasks (per-task weights become grouped
  convolutions, with batch dimensions moved between operations);
* ``loop`` - a Python loop over tasks;
* ``auto`` - for a convolutional backbone, ``grouped`` where the backbone allows
  it, else ``vmap`` while a task forwards few images and ``loop`` above; ``vmap``
  for a fully connected one (:func:`auto_strategy`).

All run the same per-task function, so they agree to rounding. Written once for
both forms, it sums per-task losses for inner gradients (each task's weights
then get their own task's gradient) and averages them for meta-gradients.

The measurements behind the constants below are in ``docs/performance.md``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import vmap
from torch.utils._pytree import tree_flatten, tree_map

from metarun.device import compute_dtype
from metarun.models.grouped import grouped_forward, grouped_layers
from metarun.models.norm import BN_MODES, norm_statistics, one_task_per_call

STRATEGIES = ("auto", "grouped", "vmap", "loop")

#: A grouped call (``strategy=grouped``) takes as many tasks as keep it at about this many images
#: (``algo.chunk_size`` overrides): larger calls outgrow the caches. Images count in 28x28 Omniglot
#: images computed in bf16 (autocast's): a 3x84x84 image is 27, so miniImageNet tasks go one a call,
#: and an fp32 one counts twice, since its activations take twice the bytes.
GROUPED_IMAGES_PER_CALL = 512
OMNIGLOT_IMAGE_NUMEL = 28 * 28
COUNTED_ELEMENT_BYTES = 2  # bf16


def tasks_per_call(images_per_task: int, images: torch.Tensor) -> int | None:
    """Tasks in one grouped call whose tasks each put ``images_per_task`` images like those of ``images``
    (``[tasks, n, *image]``) through it; None: all of them. The limits above are about a CPU's caches: a
    GPU runs a meta-batch fastest as one call, since its cost is kernel launches, not cache misses."""
    if images.device.type != "cpu":
        return None
    element_bytes = compute_dtype(images).itemsize
    size = max(1.0, images.shape[2:].numel() / OMNIGLOT_IMAGE_NUMEL) * max(1.0, element_bytes / COUNTED_ELEMENT_BYTES)
    return max(1, int(GROUPED_IMAGES_PER_CALL // max(images_per_task * size, 1)))


#: Without grouping, ``algo.strategy=auto`` uses vmap while a task forwards at most this many
#: images through a convolutional backbone per inner step (support + query of one task), and a
#: loop over tasks above it, where vmap's grouped convolutions become the slower of the two
#: (``python scripts/maml_strategy.py`` re-measures it). Fully connected backbones (no
#: convolutions) batch into plain matmuls and vmap is never slower, so they always use it.
AUTO_VMAP_MAX_IMAGES = 40


def auto_strategy(images_per_task: int, convolutional: bool, groupable: bool = False) -> str:
    if not convolutional:
        return "vmap"
    if groupable:
        return "grouped"
    return "vmap" if images_per_task <= AUTO_VMAP_MAX_IMAGES else "loop"


def map_tasks(fn: Callable, shared: tuple, batched: tuple, strategy: str, chunk_size: int | None = None):
    """``fn(*shared, *task_i)`` for every task ``i`` of the ``batched`` pytrees (leading dim), outputs stacked.

    ``vmap`` evaluates all tasks as one batched computation (``chunk_size``
    tasks at a time when set); ``loop`` calls ``fn`` once per task and stacks.
    """
    if strategy == "vmap":
        in_dims = (None,) * len(shared) + (0,) * len(batched)
        return vmap(fn, in_dims=in_dims, chunk_size=chunk_size)(*shared, *batched)
    if strategy != "loop":
        raise ValueError(f"unknown strategy {strategy}")
    leaves, _ = tree_flatten(batched)
    tasks = leaves[0].shape[0]
    outs = [fn(*shared, *tree_map(lambda b, i=i: b[i], batched)) for i in range(tasks)]
    return tree_map(lambda *xs: torch.stack(xs), outs[0], *outs[1:])


def map_chunks(fn: Callable, batched: tuple, size: int | None):
    """``fn(*chunk)`` on consecutive chunks of ``size`` (None: one chunk) along the leading dim of the
    ``batched`` pytrees, outputs concatenated (a grouped call's tasks, or a sub-call of them)."""
    tasks = tree_flatten(batched)[0][0].shape[0]
    size = size or tasks
    outs = [fn(*tree_map(lambda b, start=start: b[start : start + size], batched)) for start in range(0, tasks, size)]
    return outs[0] if len(outs) == 1 else tree_map(lambda *xs: torch.cat(xs), outs[0], *outs[1:])


def fold_features(backbone: nn.Module, xs: torch.Tensor, xq: torch.Tensor, bn_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``[tasks, n, d]`` of every task's support and query set through a backbone shared by all
    tasks, each task normalised with its own statistics (``eval.bn_mode``; ``transductive`` in training:
    support and query each with their own).

    On an accelerator all tasks go in one folded call. On a CPU, where gradients will be taken, a
    sequential backbone (Conv4) runs as one grouped network with shared weights, :func:`tasks_per_call`
    tasks a call (:func:`_grouped_features`). Otherwise tasks go one a call, whose activations stay
    cache-sized: faster there than one folded call and, without gradients, than grouped calls, with the
    running statistics averaged over the calls (:func:`one_task_per_call`).
    """
    t = xs.shape[0]
    if xs.device.type != "cpu" or t == 1:
        return _fold_features(backbone, xs, xq, bn_mode)
    layers = grouped_layers(backbone)
    if layers is not None and torch.is_grad_enabled():
        return _grouped_features(backbone, layers, xs, xq, bn_mode)
    parts = []
    with one_task_per_call(backbone) as next_task:
        for i in range(t):
            parts.append(_fold_features(backbone, xs[i : i + 1], xq[i : i + 1], bn_mode))
            next_task()
    return torch.cat([s for s, _ in parts]), torch.cat([q for _, q in parts])


def _grouped_features(backbone: nn.Module, layers, xs: torch.Tensor, xq: torch.Tensor, bn_mode: str):
    """:func:`fold_features` as grouped calls: the tasks are channel groups (each normalised on its own)
    of a network whose convolutions are ordinary ones over all their images, faster with gradients than
    one call per task.

    A training forward updates every task's own copy of the running statistics, support then query as
    one task's calls would, and they become the mean over tasks."""
    params = dict(backbone.named_parameters())
    buffers = {k: b for k, b in backbone.named_buffers() if b.is_floating_point()}  # running mean and variance
    update = backbone.training and bn_mode == "transductive" and bool(buffers)
    tasks = xs.shape[0]
    size = tasks_per_call(xs.shape[1] + xq.shape[1], xs)
    per_task = {k: b.detach().expand(tasks, *b.shape).clone() for k, b in buffers.items()} if update else {}
    zs, zq = [], []
    for start in range(0, tasks, size):
        s, q = xs[start : start + size], xq[start : start + size]
        own = {k: v[start : start + size] for k, v in per_task.items()} if update else buffers  # views: updated in place
        if bn_mode == "transductive":
            zs.append(grouped_forward(layers, params, own, s, "batch", update_stats=update))
            zq.append(grouped_forward(layers, params, own, q, "batch", update_stats=update))
        else:
            z = grouped_forward(layers, params, own, torch.cat([s, q], 1), BN_MODES[bn_mode], support_size=s.shape[1])
            zs.append(z[:, : s.shape[1]])
            zq.append(z[:, s.shape[1] :])
    if update:
        with torch.no_grad():
            for k, b in buffers.items():
                b.copy_(per_task[k].mean(0))
    return torch.cat(zs), torch.cat(zq)


def _fold_features(backbone: nn.Module, xs: torch.Tensor, xq: torch.Tensor, bn_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    t, ns, nq = xs.shape[0], xs.shape[1], xq.shape[1]
    if bn_mode == "transductive":
        with norm_statistics(backbone, "batch", tasks=t):
            return backbone(xs.flatten(0, 1)).view(t, ns, -1), backbone(xq.flatten(0, 1)).view(t, nq, -1)
    with norm_statistics(backbone, BN_MODES[bn_mode], support_size=ns, tasks=t):
        z = backbone(torch.cat([xs, xq], 1).flatten(0, 1)).view(t, ns + nq, -1)
    return z[:, :ns], z[:, ns:]
