"""The functional learner the gradient-based meta-learners share (MAML, FOMAML, Meta-SGD, ANIL, Reptile).

:class:`FunctionalLearner` is backbone + head called functionally with explicit
parameters, the batch-norm statistics rule of a forward pass, and per-task
copies of the running statistics that are averaged back into the model after
the batched call. The update rules are in :mod:`metarun.algorithms.inner_loop`,
the task-batching strategies in :mod:`metarun.algorithms.task_batching`.

Why per-task meta-gradients are taken *inside* the batched computation:
autograd's ``backward()`` (or ``torch.func.grad``) run *through*
``vmap(task_loss)`` gives wrong second-order gradients for normalisation
layers with affine parameters (pytorch/functorch#534). The algorithms
therefore compute ``vmap(grad(task_meta_loss))``, average the per-task
gradients and hand the trainer :func:`metarun.algorithms.base.surrogate_loss`,
whose gradient is that average. All strategies run the same per-task function,
so they agree to rounding. Written once for both forms, it sums per-task
losses for inner gradients (each task's weights then get their own task's
gradient) and averages them for meta-gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad
from torch.utils._pytree import tree_flatten, tree_map

from metarun.algorithms.base import Algorithm, accuracy, surrogate_loss
from metarun.algorithms.inner_loop import Params, autograd_grad
from metarun.algorithms.task_batching import STRATEGIES, auto_strategy, map_chunks, map_tasks, tasks_per_call
from metarun.data.episodes import Episode
from metarun.errors import ConfigError
from metarun.models.grouped import grouped_forward, grouped_layers
from metarun.models.norm import BN_MODES, norm_statistics

TASK_KINDS = ("classification", "regression")


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

    def evaluate(self, episode, bn_mode: str) -> torch.Tensor:
        """The query outputs' accuracy, or their MSE for a regression learner."""
        return self.loss(self.predict_logits(episode, bn_mode), episode.query_y)[1]

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
            chunk = self.chunk_size or self.tasks_per_call(call_images or images_per_task, first)
            out, updated = self.run_grouped(fn, (*shared, fixed), (per_task, *batched), chunk)
        else:
            out, updated = map_tasks(fn, (*shared, fixed), (per_task, *batched), strategy, self.chunk_size)
        if stats:
            self.write_back_stats(stats, updated)
        return out

    def tasks_per_call(self, images_per_task: int, images: torch.Tensor) -> int | None:
        """Tasks in one grouped call (None: all): as many as keep its activations in the caches
        (:func:`~metarun.algorithms.task_batching.tasks_per_call`)."""
        return tasks_per_call(images_per_task, images)

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

    # -- the meta-step every subclass with a per-task meta-gradient shares ----------------------------------
    def task_meta_gradient(self, meta_params: Params, fixed: Params, stats: Params, xs, ys, xq, yq):
        """One task's ``((meta-gradient, loss, score), updated statistics)``; the learner's own rule (MAML's inner loop,
        Meta-LSTM's unrolled updates)."""
        raise NotImplementedError

    def training_loss(self, batch: Episode):
        """The mean of the tasks' meta-gradients (:meth:`task_meta_gradient`), as a surrogate loss."""
        params = self.meta_parameters()
        images = batch.support_x.shape[1] + batch.query_x.shape[1]
        grads, loss, score = self.run_tasks(
            self.task_meta_gradient,
            (self.detached(params),),
            (batch.support_x, batch.support_y, batch.query_x, batch.query_y),
            images,
        )
        mean_grads = tree_map(lambda g: g.mean(0), grads)
        surrogate = surrogate_loss(tree_flatten(params)[0], tree_flatten(mean_grads)[0])
        return surrogate, {"loss": loss.mean().detach(), self.metric_name: score.mean().detach()}

    @property
    def metric_name(self) -> str:
        return "mse" if self.regression else "acc"
