"""Reptile (Nichol et al. 2018): move the initialisation toward the weights each task adapts to.

Each task of a meta-batch starts from the meta-initialisation ``θ`` and takes
``inner_steps`` SGD or Adam steps (``inner_optimizer``; Adam with β₁ = 0, as in
the paper) on its training samples, support and query together (the paper's
"train shots" are ``task.shots + task.queries``), in mini-batches of
``inner_batch`` samples cycling through one random permutation (null: all of
them every step). The meta-gradient is ``θ − mean_tasks(φ)``; the trainer's
optimiser applies it, so with ``trainer.optimizer=sgd`` and ``trainer.lr=ε`` the
update is the paper's ``θ ← θ + ε (mean φ − θ)`` and ``trainer.schedule=linear``
anneals ε to zero. No gradient flows through the inner loop.

The adaptation of all tasks is one batched computation (``vmap``, or the loop
chosen by ``strategy``; see :mod:`metarun.algorithms.task_batching`). Evaluation
adapts from ``θ`` on each support set with ``inner_steps_eval`` full-batch
steps of the same optimiser, exactly like MAML's evaluation, or, with
``inner_batch_eval``, steps on mini-batches of the support set (the paper's
evaluation: 50 steps on batches of 5; for 5-shot episodes 5x cheaper than
full-batch steps). Evaluation mini-batches cycle through a permutation drawn
from a fixed seed, so scores do not depend on the global random state.

With ``carry_adam_state`` (the default), Adam's moments and step count carry over
from task to task, as in the paper's code, where one optimiser runs the tasks
in sequence and only the weights are reset between them: every task of a
meta-step starts from the state the tasks of the step before ended with, on
average (as batch norm's running statistics), and evaluation starts from it
too. On Omniglot (the README's 30-minute budget) it scored several points
higher than Adam started afresh per task (``docs/performance.md``).

The reported ``loss``/``acc`` are those of the last inner mini-batch, before
its step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from metarun.algorithms.base import surrogate_loss
from metarun.algorithms.inner_loop import INNER_OPTIMIZERS, Params, inner_loop
from metarun.algorithms.maml import MAML
from metarun.algorithms.task_batching import STRATEGIES
from metarun.data.episodes import Episode
from metarun.errors import ConfigError
from metarun.schema import at_least, choice

#: the buffers of the carried Adam state (``carry_adam_state``): flat first and second moments, steps taken
CARRIED_STATE = ("adam_m", "adam_v", "adam_steps")


@dataclass
class ReptileConfig:
    _target_: str = "metarun.algorithms.reptile.Reptile"
    inner_lr: float = at_least(0.0, 1e-3)
    inner_steps: int = at_least(1, 5)
    inner_steps_eval: int = at_least(0, 50)
    #: adam (beta1 = 0, as in the paper) | sgd
    inner_optimizer: str = choice("adam", *INNER_OPTIMIZERS)
    #: samples per inner step, cycling through each task's support + query (null: all of them)
    inner_batch: Optional[int] = None
    #: support samples per evaluation inner step (null: the whole support set every step)
    inner_batch_eval: Optional[int] = None
    #: Adam's moments carry over from task to task and into evaluation, as in the paper's code
    #: (false: every task starts Adam afresh)
    carry_adam_state: bool = True
    strategy: str = choice(*STRATEGIES)
    chunk_size: Optional[int] = None


class Reptile(MAML):
    Config = ReptileConfig
    default_bn_mode = "transductive"  # the paper's headline numbers are transductive

    @classmethod
    def compiles_with(cls, options) -> bool:
        return True  # first order: it never differentiates through its inner steps

    def __init__(
        self,
        backbone,
        ways: int,
        inner_lr: float = 1e-3,
        inner_steps: int = 5,
        inner_steps_eval: int = 50,
        inner_optimizer: str = "adam",
        inner_batch: int | None = None,
        inner_batch_eval: int | None = None,
        task_kind: str = "classification",
        strategy: str = "auto",
        chunk_size: int | None = None,
        carry_adam_state: bool = True,
    ) -> None:
        super().__init__(
            backbone, ways, inner_lr=inner_lr, inner_steps=inner_steps, inner_steps_eval=inner_steps_eval,
            first_order=True, task_kind=task_kind, strategy=strategy, chunk_size=chunk_size,
        )  # fmt: skip
        if inner_optimizer not in INNER_OPTIMIZERS:
            raise ConfigError(f"algo.inner_optimizer={inner_optimizer}: valid values are {', '.join(INNER_OPTIMIZERS)}")
        if inner_steps < 1:
            raise ConfigError(f"algo.inner_steps={inner_steps}: Reptile needs at least one inner step")
        for key, value in (("inner_batch", inner_batch), ("inner_batch_eval", inner_batch_eval)):
            if value is not None and value < 1:
                raise ConfigError(f"algo.{key}={value}: must be at least 1 (or null: every sample each step)")
        self.inner_optimizer, self.inner_batch, self.inner_batch_eval = inner_optimizer, inner_batch, inner_batch_eval
        self.carry_adam_state = carry_adam_state and inner_optimizer == "adam"
        if self.carry_adam_state:
            size = sum(p.numel() for p in tree_flatten(self.meta_parameters())[0])
            zeros = {"adam_m": torch.zeros(size), "adam_v": torch.zeros(size), "adam_steps": torch.zeros((), dtype=torch.long)}
            for name in CARRIED_STATE:
                self.register_buffer(name, zeros[name])

    def upgrade_state(self, state: dict) -> dict:
        """Checkpoints from before the carried Adam state start it at zero moments and no steps taken,
        with which an inner loop is the per-task Adam they were trained and evaluated with."""
        if not self.carry_adam_state:
            return state
        return {**{name: torch.zeros_like(getattr(self, name)) for name in CARRIED_STATE}, **state}

    def carried_moments(self, meta_params: Params) -> tuple[Params, Params, torch.Tensor] | None:
        if not self.carry_adam_state:
            return None
        leaves, spec = tree_flatten({"backbone": meta_params["backbone"], "head": meta_params["head"]})

        def unflatten(flat: torch.Tensor) -> Params:
            parts = flat.split([p.numel() for p in leaves])
            return tree_unflatten([part.view_as(p) for part, p in zip(parts, leaves, strict=True)], spec)

        return unflatten(self.adam_m), unflatten(self.adam_v), self.adam_steps

    def minibatches(
        self, n: int, device: torch.device, steps: int | None = None, batch: int | None = None, generator=None
    ) -> torch.Tensor:
        """``[steps, b]`` sample indices (default: the training inner loop's): consecutive slices of a random
        permutation, cycled, shared by all tasks."""
        steps = self.inner_steps if steps is None else steps
        batch = self.inner_batch if batch is None else batch
        b = n if batch is None else min(batch, n)
        perm = torch.randperm(n, generator=generator).to(device) if generator is not None else torch.randperm(n, device=device)
        reps = -(-steps * b // n)
        return perm.repeat(reps)[: steps * b].view(steps, b)

    def eval_batches(self, support_size: int, device: torch.device) -> torch.Tensor | None:
        if self.inner_batch_eval is None or self.inner_batch_eval >= support_size or self.inner_steps_eval == 0:
            return None
        fixed = torch.Generator().manual_seed(0)
        return self.minibatches(support_size, device, self.inner_steps_eval, self.inner_batch_eval, fixed)

    def task_update(self, params: Params, fixed: Params, order: torch.Tensor, stats: Params, x, y):
        """``θ − φ`` for one task, with the loss and score of its last inner mini-batch."""
        buffers = {**fixed, **stats}

        def batch_loss(p, step):
            pick = order[step]
            xb, yb = x.index_select(self.sample_dim, pick), y.index_select(self.sample_dim, pick)
            loss, score = self.loss(self.predict(p, buffers, xb, "batch"), yb)
            return loss.sum(), (loss.detach(), score.detach())

        fast, (loss, score), moments = inner_loop(
            batch_loss, self.per_task(params), self.inner_lr, self.inner_steps, True, self.inner_optimizer,
            autograd=self.in_grouped_call, moments=self.carried_moments(params),
        )  # fmt: skip
        carried = (moments,) if self.carry_adam_state else ()
        return (tree_map(torch.sub, params, fast), loss, score, *carried), stats

    def training_loss(self, batch: Episode):
        params = self.meta_parameters()
        x = torch.cat([batch.support_x, batch.query_x], 1)
        y = torch.cat([batch.support_y, batch.query_y], 1)
        order = self.minibatches(x.shape[1], x.device)

        def fn(p, order, fixed, stats, x, y):
            return self.task_update(p, fixed, order, stats, x, y)

        deltas, loss, score, *carried = self.run_tasks(fn, (self.detached(params), order), (x, y), order.shape[1])
        if carried:  # every task started from the same state: carry on from their mean, as batch norm does
            m, v = (torch.cat([t.detach().mean(0).flatten() for t in tree_flatten(moment)[0]]) for moment in carried[0])
            ok = torch.isfinite(v).all()  # a step the trainer skips (nan_policy=skip) must not poison the state
            self.adam_m.copy_(torch.where(ok, m, self.adam_m))
            self.adam_v.copy_(torch.where(ok, v, self.adam_v))
            self.adam_steps += ok * self.inner_steps
        mean = tree_map(lambda d: d.mean(0), deltas)
        surrogate = surrogate_loss(tree_flatten(params)[0], tree_flatten(mean)[0])
        return surrogate, {"loss": loss.mean().detach(), self.metric_name: score.mean().detach()}
