"""Model-agnostic meta-learning (Finn et al. 2017), second order by default.

Each task adapts a copy of the weights with ``inner_steps`` gradient steps on
its support set; the meta-loss is the adapted model's loss on the query set,
differentiated through the adaptation (``first_order=true``: FOMAML, which
treats the inner gradients as constants). The inner loop of all tasks of a
meta-batch runs as one batched computation: the per-task meta-gradient is
taken inside ``vmap`` (``vmap(grad(task_meta_loss))``), the gradients are
averaged, and :meth:`training_loss` returns a surrogate whose gradient is that
average (see :mod:`metarun.algorithms.learner` for why, and
:mod:`metarun.algorithms.task_batching` for the ``strategy`` that replaces vmap
by grouped calls or a loop over tasks where those are faster).

Regression datasets (``task_kind=regression``, e.g. ``dataset=sinusoid``)
use an MSE loss and ``score = "mse"``; the head then has ``ways`` outputs
(1 for the sinusoid).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from metarun.algorithms.inner_loop import Params, inner_loop
from metarun.algorithms.learner import FunctionalLearner
from metarun.algorithms.task_batching import STRATEGIES, map_chunks
from metarun.data.episodes import Episode
from metarun.errors import ConfigError
from metarun.models.norm import check_bn_mode
from metarun.schema import at_least, choice


@dataclass
class MAMLConfig:
    _target_: str = "metarun.algorithms.maml.MAML"
    #: step size of the inner (per-task) gradient steps
    inner_lr: float = at_least(0.0, 0.4)
    #: inner steps per task in meta-training (0: no adaptation, i.e. joint training)
    inner_steps: int = at_least(0, 1)
    #: inner steps per task at validation and test time
    inner_steps_eval: int = at_least(0, 3)
    #: drop the second-order terms (FOMAML)
    first_order: bool = False
    #: how the tasks of a batch run (auto: by task size, see metarun/algorithms/task_batching.py)
    strategy: str = choice(*STRATEGIES)
    #: with vmap, this many tasks at a time (null: all at once), to bound memory
    chunk_size: Optional[int] = None


class MAML(FunctionalLearner):
    Config = MAMLConfig
    default_bn_mode = "transductive"  # the paper's: query batches normalised by their own statistics
    #: the inner loop's update rule (Reptile may use Adam)
    inner_optimizer = "sgd"

    def __init__(
        self,
        backbone,
        ways: int,
        inner_lr: float = 0.4,
        inner_steps: int = 1,
        inner_steps_eval: int = 3,
        first_order: bool = False,
        task_kind: str = "classification",
        strategy: str = "auto",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(backbone, ways, task_kind, strategy, chunk_size)
        if inner_steps < 0 or inner_steps_eval < 0:
            raise ConfigError(f"algo.inner_steps={inner_steps}, algo.inner_steps_eval={inner_steps_eval}: must be >= 0")
        self.inner_lr, self.inner_steps, self.inner_steps_eval = inner_lr, inner_steps, inner_steps_eval
        self.first_order = first_order

    @classmethod
    def compiles_with(cls, options) -> bool:
        """Compiled second-order meta-gradients through the backbone came out wrong; ANIL's through its head
        alone matched the eager ones (1e-5), and so did first-order ones."""
        return bool(options.get("first_order", False)) or not cls.adapts_backbone

    @property
    def compiles(self) -> bool:
        return self.compiles_with({"first_order": self.first_order})

    # -- what differs between MAML, ANIL and Meta-SGD ------------------------------------
    def inner_lrs(self, meta_params: Params) -> Params | float:
        """The inner learning rate(s) for the adapted parameters (Meta-SGD: learned, per parameter)."""
        return self.inner_lr

    def initial_weights(self, meta_params: Params, buffers: Params, xs, ys, inner: str) -> Params:
        """The weights a task's inner loop starts from: the meta-learned ones (Proto-MAML: with a head made from
        the task's support set)."""
        return self.per_task({"backbone": meta_params["backbone"], "head": meta_params["head"]})

    def carried_moments(self, meta_params: Params) -> tuple[Params, Params, torch.Tensor] | None:
        """The Adam state an inner loop starts from (Reptile's, carried across tasks); None: zero."""
        return None

    # -- one task ------------------------------------------------------------------------
    def solve(
        self, meta_params: Params, buffers: Params, xs, ys, xq, steps: int, bn_mode: str, first_order: bool, batches=None
    ) -> torch.Tensor:
        """Adapts to ``(xs, ys)`` with ``steps`` inner steps and predicts ``xq`` (one task, or a grouped call's tasks).

        ``batches`` (``[steps, b]`` support indices) gives each step a mini-batch; None: the whole support set."""
        lrs = self.inner_lrs(meta_params)
        inner = self.inner_mode(bn_mode)
        model = self.initial_weights(meta_params, buffers, xs, ys, inner)

        def support_loss(p, step):
            x, y = (
                (xs, ys)
                if batches is None
                else (xs.index_select(self.sample_dim, batches[step]), ys.index_select(self.sample_dim, batches[step]))
            )
            loss = self.loss(self.predict(p, buffers, x, inner), y)[0]
            return loss.sum(), loss.detach()

        fast, _, _ = inner_loop(
            support_loss, model, lrs, steps, first_order, self.inner_optimizer, autograd=self.in_grouped_call,
            moments=self.carried_moments(meta_params),
        )  # fmt: skip

        def query_outputs(weights: Params, support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
            return self.head_forward(weights, self.embed_query(weights, buffers, support, query, bn_mode))

        if not self.in_grouped_call or self.training:
            return query_outputs(fast, xs, xq)
        # Evaluation sizes a grouped call by the support images of one inner step (run_tasks'
        # call_images); its query forward, without gradients, then runs one task a call on a CPU, where
        # that task's network runs channels_last (grouped_forward), faster than in sub-calls of many tasks.
        # Outside training every buffer is shared by the tasks.
        return map_chunks(query_outputs, (fast, xs, xq), 1 if xq.device.type == "cpu" else None)

    def task_meta_gradient(self, meta_params: Params, fixed: Params, stats: Params, xs, ys, xq, yq):
        """Per-task meta-gradient, loss and score; ``stats`` are this task's running statistics (updated in place)."""
        buffers = {**fixed, **stats}

        def meta_loss(mp):
            out = self.solve(mp, buffers, xs, ys, xq, self.inner_steps, "transductive", self.first_order)
            loss, score = self.loss(out, yq)
            return loss.mean(), (loss.detach(), score.detach())

        grads, (loss, score) = self.grad(meta_loss, has_aux=True)(meta_params)
        return (self.as_per_task(grads), loss, score), stats

    # -- the Algorithm interface ---------------------------------------------------------------
    def task_outputs(self, meta_params: Params, fixed: Params, stats: Params, xs, ys, xq, bn_mode: str, batches=None):
        out = self.solve(meta_params, {**fixed, **stats}, xs, ys, xq, self.inner_steps_eval, bn_mode, True, batches)
        return out, stats

    def eval_batches(self, support_size: int, device: torch.device) -> torch.Tensor | None:
        """The support mini-batch of each evaluation inner step (``[steps, b]`` indices); None: the whole set."""
        return None

    def predict_logits(self, episode: Episode, bn_mode: str) -> torch.Tensor:
        check_bn_mode(bn_mode)
        params = self.detached(self.meta_parameters())
        support = episode.support_x.shape[1]
        batches = self.eval_batches(support, episode.support_x.device)
        step_images = support if batches is None else batches.shape[1]

        def fn(mp, fixed, stats, xs, ys, xq):
            return self.task_outputs(mp, fixed, stats, xs, ys, xq, bn_mode, batches)

        with torch.no_grad():
            tasks = (episode.support_x, episode.support_y, episode.query_x)
            return self.run_tasks(fn, (params,), tasks, support + episode.query_x.shape[1], step_images)
