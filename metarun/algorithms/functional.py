"""The functional machinery of the gradient-based meta-learners (MAML, FOMAML, Meta-SGD, ANIL, Reptile).

One place holds what those algorithms share:

* :func:`inner_loop` - gradient steps (SGD or Adam) on one task (or on a
  grouped call's tasks at once), taken with ``torch.func.grad`` (or plain
  autograd) so that they can be differentiated through (second order), cut
  (first order), or just run (evaluation);
* :func:`map_tasks` - applies a per-task function to every task of a batch,
  either as one batched computation (``torch.func.vmap``, optionally in
  chunks) or as a Python loop over tasks calling *the same* function;
* :class:`FunctionalLearner` - backbone + head called functionally with
  explicit parameters, the batch-norm statistics rule of a forward pass, and
  per-task copies of the running statistics that are averaged back into the
  model after the batched call.

Why per-task meta-gradients are taken *inside* the batched computation:
autograd's ``backward()`` (or ``torch.func.grad``) run *through*
``vmap(task_loss)`` gives wrong second-order gradients for normalisation
layers with affine parameters (pytorch/functorch#534; errors of ~0.25
measured here). The algorithms therefore compute ``vmap(grad(task_meta_loss))``,
average the per-task gradients and hand the trainer
:func:`metarun.algorithms.base.surrogate_loss`, whose gradient is that average.

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
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from metarun.algorithms.base import Algorithm, accuracy
from metarun.errors import ConfigError
from metarun.models.grouped import grouped_forward, grouped_layers
from metarun.models.norm import BN_MODES, differentiated_twice, norm_statistics, one_task_per_call

Params = dict[str, Any]  # possibly nested dicts of tensors (a pytree)

STRATEGIES = ("auto", "grouped", "vmap", "loop")
INNER_OPTIMIZERS = ("sgd", "adam")
TASK_KINDS = ("classification", "regression")

#: A grouped call (``strategy=grouped``) takes as many tasks as keep it at about this many images
#: (``algo.chunk_size`` overrides): larger calls outgrow the caches. Images count in 28x28 Omniglot
#: images; a 3x84x84 one is 27. Second-order MAML steps of 32 Omniglot tasks (2 threads, bf16, batch
#: norm with its written-out double backward, :func:`metarun.models.norm.batch_norm`), in calls of
#: 1, 2, 4 tasks (and 4, 8, 16 in a second run): 15 queries, 80 images a task, 1562, 1356, 1202 ms
#: (1116, 1058, 1032 ms); 5-shot, 100 images, calls of 1, 4, 8 tasks 1914, 1665, 1617 ms; 1 query,
#: 10 images, calls of 16 and 32 tasks 269 and 250 ms. First-order MAML and Reptile gained alike.
#: miniImageNet tasks go one a call: calls of 1, 2, 4 took 494, 615, 605 ms (second-order MAML, 4
#: tasks of 80 images) and 322, 374, 364 ms (Reptile, inner batches of 10 images).
GROUPED_IMAGES_PER_CALL = 512
OMNIGLOT_IMAGE_NUMEL = 28 * 28


def tasks_per_call(images_per_task: int, device: torch.device, image_numel: int = OMNIGLOT_IMAGE_NUMEL) -> int | None:
    """Tasks in one grouped call; None: all of them. The limits above are about a CPU's caches: a GPU
    runs a meta-batch fastest as one call, since its cost is kernel launches, not cache misses."""
    if device.type != "cpu":
        return None
    images = images_per_task * max(1.0, image_numel / OMNIGLOT_IMAGE_NUMEL)
    return max(1, int(GROUPED_IMAGES_PER_CALL // max(images, 1)))


#: Without grouping, ``algo.strategy=auto`` uses vmap while a task forwards at most this many
#: images through a convolutional backbone per inner step (support + query of
#: one task), and a loop over tasks above it. Measured on 2 CPU cores, torch
#: 2.13, Conv4-64 on 28x28 Omniglot, 16-32 tasks (``python scripts/maml_strategy.py``
#: re-measures it): vmap/loop speed ratio, second order 1 step:
#: 10 images 1.9x, 20 images 1.3x, 40 images 1.0x, 80 images 0.7x, 100 images 0.6x;
#: evaluation (no meta-gradient) crosses over at about the same size.
#: Fully connected backbones (no convolutions) batch into plain matmuls and
#: vmap is never slower, so they always use it.
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


def autograd_grad(fn: Callable, has_aux: bool = False, create_graph: bool = False) -> Callable:
    """``torch.func.grad``'s contract (gradient of ``fn`` with respect to its first argument) with plain autograd.

    Outside any ``vmap`` (the grouped strategy) autograd is exact, and nesting
    ``autograd.grad(create_graph=True)`` was 1.2-1.5x faster than nesting
    ``torch.func.grad`` for second-order MAML on Conv4 here. ``create_graph``
    keeps the result differentiable for an enclosing gradient; gradients are
    taken even under ``torch.no_grad`` (evaluation), as ``torch.func.grad`` does.
    """

    def wrapper(x, *args):
        with torch.enable_grad(), differentiated_twice(create_graph):
            leaves, spec = tree_flatten(x)
            leaves = [t if t.requires_grad else t.detach().requires_grad_() for t in leaves]
            out = fn(tree_unflatten(leaves, spec), *args)
            loss, aux = out if has_aux else (out, None)
            grads = torch.autograd.grad(loss, leaves, create_graph=create_graph)
        grads = tree_unflatten(list(grads), spec)
        return (grads, aux) if has_aux else grads

    return wrapper


def inner_loop(
    loss_fn: Callable[[Params, int], tuple[torch.Tensor, Any]],
    params: Params,
    lrs: Params | float,
    steps: int,
    first_order: bool,
    optimizer: str = "sgd",
    betas: tuple[float, float] = (0.0, 0.999),
    eps: float = 1e-8,
    autograd: bool = False,
    moments: tuple[Params, Params, torch.Tensor] | None = None,
) -> tuple[Params, Any, tuple[Params, Params] | None]:
    """``steps`` gradient steps on ``loss_fn(params, step) -> (loss, aux)`` for one task.

    ``lrs`` is one float or a pytree like ``params`` (Meta-SGD's learned
    per-parameter rates). Gradients are taken with ``torch.func.grad``, so an
    enclosing ``grad`` differentiates through the steps (second order) unless
    ``first_order``, which detaches them (FOMAML; Reptile never differentiates).
    ``adam`` starts from zero moments, or from ``moments`` (first, second, steps
    already taken: Reptile's carried state). ``autograd`` takes the gradients with
    :func:`autograd_grad` instead (grouped calls, never under ``vmap``).
    Returns the adapted parameters, the ``aux`` of the last step (``None``
    for zero steps) and Adam's moments after the last step (``None`` for SGD).
    """
    if optimizer not in INNER_OPTIMIZERS:
        raise ConfigError(f"inner optimizer {optimizer}: valid values are {', '.join(INNER_OPTIMIZERS)}")
    if not isinstance(lrs, dict):
        lrs = tree_map(partial(_constant, lrs), params)
    b1, b2 = betas
    m = v = None
    taken = 0
    if optimizer == "adam" and moments is None:
        m, v = tree_map(torch.zeros_like, params), tree_map(torch.zeros_like, params)
    elif optimizer == "adam":
        m, v = (tree_map(_expand_as, carried, params) for carried in moments[:2])
        taken = moments[2].to(tree_flatten(v)[0][0].dtype)  # a tensor: no host sync; bias corrections in the moments' precision
    aux = None
    take_grad = partial(autograd_grad, create_graph=not first_order) if autograd else grad
    for step in range(steps):
        g, aux = take_grad(loss_fn, has_aux=True)(params, step)
        if first_order:
            g = tree_map(torch.Tensor.detach, g)
        if optimizer == "adam":
            m, v, g = _adam(m, v, g, b1, b2, eps, taken + step + 1)
        params = tree_map(_sgd_step, params, lrs, g)
    return params, aux, None if m is None else (m, v)


def fold_features(backbone: nn.Module, xs: torch.Tensor, xq: torch.Tensor, bn_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``[tasks, n, d]`` of every task's support and query set through a backbone shared by all
    tasks, each task normalised with its own statistics (``eval.bn_mode``; ``transductive`` in training:
    support and query each with their own).

    On an accelerator all tasks go in one folded call. On a CPU, where gradients will be taken, a
    sequential backbone (Conv4) runs as one grouped network with shared weights, :func:`tasks_per_call`
    tasks a call (:func:`_grouped_features`). Otherwise tasks go one a call, which beat one folded call
    there (1.2 s vs 2.1 s forward + backward for 32 tasks of 30 images, Conv4, one thread) and, without
    gradients, grouped calls too (an evaluation of 32 ANIL episodes 0.76x, of finetune 0.83x), with the
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
    of a network whose convolutions are ordinary ones over all their images. ANIL's meta-step of 32
    5-way 1-shot 1-query tasks took 1.6x less time than with one call per task (bf16, 2 threads).

    A training forward updates every task's own copy of the running statistics, support then query as
    one task's calls would, and they become the mean over tasks."""
    params = dict(backbone.named_parameters())
    buffers = {k: b for k, b in backbone.named_buffers() if b.is_floating_point()}  # running mean and variance
    update = backbone.training and bn_mode == "transductive" and bool(buffers)
    tasks = xs.shape[0]
    size = tasks_per_call(xs.shape[1] + xq.shape[1], xs.device, xs.shape[2:].numel())
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


def _constant(value, _):
    return value


def _expand_as(shared, per_task):
    return shared.expand_as(per_task)


def _adam(m: Params, v: Params, g: Params, b1: float, b2: float, eps: float, t) -> tuple[Params, Params, Params]:
    """Adam's moments after gradient ``g`` at step ``t``, and its direction, for every tensor at once.

    ``torch._foreach_*`` dispatches each operation once for all tensors: the update of 16 Conv4 tasks
    (1.8 million weights) took 3.8 ms instead of 6.6 one tensor at a time; a Reptile evaluation was
    1.05x faster, a Reptile meta-step 1.03x. With ``b1 = 0`` (Reptile's) the first moment is the
    gradient itself and its bias correction is 1, a division skipped (a Reptile evaluation 1.02x).
    """
    grads, spec = tree_flatten(g)
    firsts = grads if b1 == 0 else _foreach("lerp", tree_flatten(m)[0], grads, 1 - b1)
    seconds = _foreach("lerp", tree_flatten(v)[0], _foreach("mul", grads, grads), 1 - b2)
    denominators = _foreach("add", _foreach("sqrt", _foreach("div", seconds, 1 - b2**t)), eps)
    directions = _foreach("div", firsts if b1 == 0 else _foreach("div", firsts, 1 - b1**t), denominators)
    return tuple(tree_unflatten(list(x), spec) for x in (firsts, seconds, directions))


def _foreach(op: str, *args):
    """``torch._foreach_<op>`` over the lists in ``args`` (other arguments are shared), or, under
    ``torch.func`` transforms, which have no rule for those, ``torch.<op>`` tensor by tensor."""
    lists = [a for a in args if isinstance(a, list)]
    if not any(torch._C._functorch.is_functorch_wrapped_tensor(t) for a in lists for t in a):
        return getattr(torch, f"_foreach_{op}")(*args)
    return [getattr(torch, op)(*(a[i] if isinstance(a, list) else a for a in args)) for i in range(len(lists[0]))]


def _sgd_step(p, lr, g):
    return p - lr * g


def task_loss(out: torch.Tensor, y: torch.Tensor, regression: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and score of one task's predictions ``[n, out]`` (scalars), or of many, ``[tasks, n, out]`` (``[tasks]``):
    cross-entropy and accuracy, or MSE twice."""
    if regression:
        loss = (out - y).square().flatten(-2).mean(-1)
        return loss, loss
    logits = out.movedim(-1, 1) if out.dim() == 3 else out
    return F.cross_entropy(logits, y, reduction="none").mean(-1), accuracy(out, y)


class FunctionalLearner(Algorithm):
    """Backbone + linear head, called functionally, with one task per batched call.

    ``task_kind`` (passed by the factory from the dataset) selects the loss:
    ``classification`` (cross-entropy; ``score = "accuracy"``) or ``regression``
    (MSE on a ``ways``-dimensional target; ``score = "mse"``).
    """

    default_bn_mode = "transductive"  # the MAML paper's: every set normalised by its own statistics
    fixed_ways = True  # the head is meta-learned with ``ways`` outputs
    #: whether the inner loop adapts the backbone (ANIL: only the head, so its convolutions stay shared)
    adapts_backbone = True

    def __init__(
        self,
        backbone: nn.Module,
        ways: int,
        task_kind: str = "classification",
        strategy: str = "auto",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(backbone, ways)
        if task_kind not in TASK_KINDS:
            raise ConfigError(f"task kind {task_kind}: valid kinds are {', '.join(TASK_KINDS)}")
        if strategy not in STRATEGIES:
            raise ConfigError(f"algo.strategy={strategy}: valid strategies are {', '.join(STRATEGIES)}")
        if chunk_size is not None and chunk_size < 1:
            raise ConfigError(f"algo.chunk_size={chunk_size}: must be at least 1 (or null: all tasks at once)")
        self.head = nn.Linear(backbone.out_features, ways)
        self.regression = task_kind == "regression"
        if self.regression:
            self.score = "mse"
        self.strategy, self.chunk_size = strategy, chunk_size
        self.convolutional = any(isinstance(m, nn.modules.conv._ConvNd) for m in backbone.modules())
        self.layers = grouped_layers(backbone)
        if strategy == "grouped" and self.layers is None:
            raise ConfigError(
                f"algo.strategy=grouped: {type(backbone).__name__} is not a plain sequence of layers; use auto, vmap or loop"
            )
        #: tasks of the grouped call in progress (every tensor then has a leading task dim), else None
        self.grouped_tasks: int | None = None

    # -- functional state -----------------------------------------------------------
    def model_parameters(self) -> Params:
        """``{"backbone": {...}, "head": {...}}`` of the module's own parameters."""
        return {"backbone": dict(self.backbone.named_parameters()), "head": dict(self.head.named_parameters())}

    def meta_parameters(self) -> Params:
        """The parameters the outer loop learns (Meta-SGD adds its learning rates)."""
        return self.model_parameters()

    def split_buffers(self) -> tuple[Params, Params]:
        """``(stats, fixed)``: running statistics updated by a training forward, and the other buffers."""
        stats, fixed = {}, {}
        for name, b in self.backbone.named_buffers():
            (stats if b.is_floating_point() and self.training else fixed)[name] = b
        return stats, fixed

    def per_task_stats(self, stats: Params, tasks: int) -> Params:
        return {k: v.detach().expand(tasks, *v.shape).clone() for k, v in stats.items()}

    @torch.no_grad()
    def write_back_stats(self, stats: Params, updated: Params) -> None:
        """The average over tasks of the per-task running statistics (the mean of per-task updates)."""
        for k, v in updated.items():
            stats[k].copy_(v.mean(0))

    def strategy_for(self, images_per_task: int) -> str:
        """``auto``: the measured rule of :func:`auto_strategy`; convolutions whose weights are shared by all
        tasks (ANIL's backbone) batch into one ordinary convolution, so they count as fully connected."""
        if self.strategy != "auto":
            return self.strategy
        return auto_strategy(images_per_task, self.convolutional and self.adapts_backbone, self.layers is not None)

    # -- the two forms of the per-task function -------------------------------------------------
    @property
    def in_grouped_call(self) -> bool:
        return self.grouped_tasks is not None

    @property
    def sample_dim(self) -> int:
        """Where samples are counted: dim 0 of one task's tensors, dim 1 in a grouped call."""
        return 1 if self.in_grouped_call else 0

    def per_task(self, params: Params) -> Params:
        """In a grouped call, every task's own copy of ``params`` (a leading task dim); else ``params``."""
        if not self.in_grouped_call:
            return params
        return tree_map(lambda p: p.expand(self.grouped_tasks, *p.shape), params)

    def grad(self, fn: Callable, has_aux: bool = False) -> Callable:
        """The gradient transform for the per-task function: plain autograd in a grouped call, else ``torch.func.grad``."""
        return autograd_grad(fn, has_aux=has_aux) if self.in_grouped_call else grad(fn, has_aux=has_aux)

    def as_per_task(self, tree):
        """A value computed for all tasks together (a mean meta-gradient) seen as one row per task, as a loop stacks."""
        if not self.in_grouped_call:
            return tree
        return tree_map(lambda v: v.expand(self.grouped_tasks, *v.shape), tree)

    # -- forward passes of one task -----------------------------------------------------
    def body(self, params: Params, buffers: Params, x: torch.Tensor, mode: str, support_size: int = 0) -> torch.Tensor:
        if self.in_grouped_call:
            update = self.training and mode == "batch"
            return grouped_forward(self.layers, params["backbone"], buffers, x, mode, support_size, update)
        with norm_statistics(self.backbone, mode, support_size=support_size):
            return functional_call(self.backbone, (params["backbone"], buffers), (x,))

    def head_forward(self, params: Params, z: torch.Tensor) -> torch.Tensor:
        w, b = params["head"]["weight"], params["head"]["bias"]
        if w.dim() == 3:  # one head per task: [tasks, n, d] x [tasks, ways, d]
            return torch.baddbmm(b.unsqueeze(1), z, w.transpose(1, 2))
        return F.linear(z, w, b)

    def predict(self, params: Params, buffers: Params, x: torch.Tensor, mode: str) -> torch.Tensor:
        return self.head_forward(params, self.body(params, buffers, x, mode))

    def embed_query(self, params: Params, buffers: Params, xs: torch.Tensor, xq: torch.Tensor, bn_mode: str) -> torch.Tensor:
        """Query features under an ``eval.bn_mode``; ``support`` forwards the support set in front for its statistics."""
        if bn_mode == "support":
            d, ns = self.sample_dim, xs.shape[self.sample_dim]
            return self.body(params, buffers, torch.cat([xs, xq], d), "support", support_size=ns).narrow(d, ns, xq.shape[d])
        return self.body(params, buffers, xq, BN_MODES[bn_mode])

    @staticmethod
    def inner_mode(bn_mode: str) -> str:
        """Statistics while adapting on the support set: its own, unless evaluating with running statistics."""
        return "running" if bn_mode == "running" else "batch"

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return task_loss(out, y, self.regression)

    # -- the batched call every algorithm goes through -----------------------------------
    def run_tasks(self, fn: Callable, shared: tuple, batched: tuple, images_per_task: int, call_images: int | None = None):
        """``fn(*shared, stats, fixed, *task)`` for every task; running statistics are updated per task and averaged.

        ``call_images`` (default ``images_per_task``) sizes a grouped call: the images a task puts through
        each forward of it, when ``fn`` splits its larger forwards into sub-calls itself (evaluation)."""
        stats, fixed = self.split_buffers()
        first = tree_flatten(batched)[0][0]
        tasks = first.shape[0]
        per_task = self.per_task_stats(stats, tasks)
        strategy = self.strategy_for(images_per_task)
        if strategy == "grouped":
            chunk = self.chunk_size or tasks_per_call(call_images or images_per_task, first.device, first.shape[2:].numel())
            out, updated = self.run_grouped(fn, (*shared, fixed), (per_task, *batched), chunk)
        else:
            out, updated = map_tasks(fn, (*shared, fixed), (per_task, *batched), strategy, self.chunk_size)
        if stats:
            self.write_back_stats(stats, updated)
        return out

    def run_grouped(self, fn: Callable, shared: tuple, batched: tuple, size: int | None):
        """``fn`` called on ``size`` tasks at a time with their tensors stacked, outputs concatenated.

        Chunks keep each call's activations small enough for the caches (see
        :data:`GROUPED_IMAGES_PER_CALL`).
        """

        def call(*chunk):
            self.grouped_tasks = tree_flatten(chunk)[0][0].shape[0]
            try:
                return fn(*shared, *chunk)
            finally:
                self.grouped_tasks = None

        return map_chunks(call, batched, size)

    def detached(self, params: Params) -> Params:
        return tree_map(torch.Tensor.detach, params)


def check_bn_mode(bn_mode: str) -> None:
    if bn_mode not in BN_MODES:
        raise ConfigError(f"eval.bn_mode={bn_mode}: valid modes are {', '.join(BN_MODES)}")
