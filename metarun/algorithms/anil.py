"""ANIL: almost no inner loop (Raghu et al. 2020).

MAML in which the inner loop adapts only the classifier head; the backbone is
meta-learned through the outer loop (second order by default). Since the
backbone does not change within a task, it runs once per meta-step for all
tasks, folded into one batch (each task normalised with its own statistics, as
in ProtoNet), and only the head's inner loop is batched over tasks with
``vmap(grad(...))``. That per-task gradient is taken with respect to the head
*and the task's features*; the backbone's share of the meta-gradient is then
one ordinary backward pass of the folded forward with those feature gradients
(the surrogate loss below). That is exact (autograd never runs through a
``vmap``) and much cheaper than per-task weight gradients of shared
convolutions under vmap, which were slower even than a loop over tasks
(``docs/performance.md``). On a CPU, large tasks
instead take their backbone forward and backward one task at a time
(:meth:`ANIL.task_by_task`), with the same meta-gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_flatten, tree_map

from metarun.algorithms.base import surrogate_loss
from metarun.algorithms.inner_loop import Params, inner_loop
from metarun.algorithms.maml import MAML, MAMLConfig
from metarun.algorithms.task_batching import fold_features, map_tasks
from metarun.data.episodes import Episode
from metarun.models.norm import check_bn_mode, one_task_per_call

#: On a CPU, tasks of more images than this take their backbone forward and backward one at a time
#: (:meth:`ANIL.task_by_task`)
TASK_BY_TASK_IMAGES = 40


@dataclass
class ANILConfig(MAMLConfig):
    _target_: str = "metarun.algorithms.anil.ANIL"


class ANIL(MAML):
    reads_backbone_features = True
    channels_last_pays = True  # its convolutions are shared by all tasks of a call
    Config = ANILConfig
    default_bn_mode = "transductive"  # as MAML, whose code the paper uses
    adapts_backbone = False

    def head_strategy(self) -> str:
        """The head alone is a matrix product per task, which vmap batches into one (unless a loop is asked for)."""
        return "loop" if self.strategy == "loop" else "vmap"

    def adapt_head(self, head: Params, zs, ys, zq, steps: int, first_order: bool) -> torch.Tensor:
        """One task: ``steps`` inner steps of the head on the support features, then the query outputs."""

        def head_loss(h, step):
            loss = self.loss(self.head_forward({"head": h}, zs), ys)[0]
            return loss.sum(), loss.detach()

        fast, _, _ = inner_loop(head_loss, head, self.inner_lr, steps, first_order, self.inner_optimizer)
        return self.head_forward({"head": fast}, zq)

    def task_meta_gradient(self, head: Params, zs, ys, zq, yq):
        """Per task: the meta-gradient with respect to the head and to the task's features."""

        def meta_loss(h, zs_, zq_):
            loss, score = self.loss(self.adapt_head(h, zs_, ys, zq_, self.inner_steps, self.first_order), yq)
            return loss.mean(), (loss.detach(), score.detach())

        grads, (loss, score) = torch.func.grad(meta_loss, argnums=(0, 1, 2), has_aux=True)(head, zs, zq)
        return grads, loss, score

    def training_loss(self, batch: Episode):
        head = self.model_parameters()["head"]
        if self.task_by_task(batch):
            return self.training_loss_task_by_task(batch, head)
        zs, zq = fold_features(self.backbone, batch.support_x, batch.query_x, "transductive")
        tasks = batch.num_tasks
        (g_head, g_zs, g_zq), loss, score = map_tasks(
            self.task_meta_gradient,
            (self.detached(head),),
            (zs.detach(), batch.support_y, zq.detach(), batch.query_y),
            self.head_strategy(),
            self.chunk_size,
        )
        mean_head = tree_map(lambda g: g.mean(0), g_head)
        # d/dθ of Σ_t <z_t(θ), g_t> / T is the mean over tasks of the backbone's meta-gradient
        surrogate = surrogate_loss(tree_flatten(head)[0], tree_flatten(mean_head)[0]) + surrogate_loss(
            [zs, zq], [g_zs / tasks, g_zq / tasks]
        )
        return surrogate, {"loss": loss.mean().detach(), self.metric_name: score.mean().detach()}

    @staticmethod
    def task_by_task(batch: Episode) -> bool:
        """On a CPU, for tasks of more than ``TASK_BY_TASK_IMAGES`` images: one task's activations at a time
        are faster and hold less memory than one folded call, and as fast as grouped calls
        (:func:`~metarun.algorithms.task_batching.fold_features`) with less memory held."""
        images = batch.support_x.shape[1] + batch.query_x.shape[1]
        return batch.support_x.device.type == "cpu" and batch.num_tasks > 1 and images > TASK_BY_TASK_IMAGES

    def training_loss_task_by_task(self, batch: Episode, head: Params):
        """Each task's backbone forward and backward in turn, so that one task's activations are alive
        at a time, not the meta-batch's (see :meth:`task_by_task`). The meta-gradient is accumulated
        here and handed over as a surrogate, as MAML's is."""
        # a frozen backbone (backbone.freeze=all) has no weights to differentiate
        backbone = {k: p for k, p in self.backbone.named_parameters() if p.requires_grad}
        fixed_head = self.detached(head)
        sums, losses, scores = None, [], []
        with one_task_per_call(self.backbone) as next_task:
            for t in range(batch.num_tasks):
                zs, zq = fold_features(self.backbone, batch.support_x[t : t + 1], batch.query_x[t : t + 1], "transductive")
                (g_head, g_zs, g_zq), loss, score = self.task_meta_gradient(
                    fixed_head, zs[0].detach(), batch.support_y[t], zq[0].detach(), batch.query_y[t]
                )
                g_backbone = torch.autograd.grad([zs, zq], list(backbone.values()), [g_zs[None], g_zq[None]]) if backbone else ()
                next_task()
                grads = [*tree_flatten(g_head)[0], *g_backbone]
                sums = grads if sums is None else [a + b for a, b in zip(sums, grads, strict=True)]
                losses.append(loss)
                scores.append(score)
        params = [*tree_flatten(head)[0], *backbone.values()]
        surrogate = surrogate_loss(params, [g / batch.num_tasks for g in sums])
        return surrogate, {"loss": torch.stack(losses).mean(), self.metric_name: torch.stack(scores).mean()}

    def predict_logits(self, episode: Episode, bn_mode: str) -> torch.Tensor:
        check_bn_mode(bn_mode)
        head = self.detached(self.model_parameters()["head"])

        def task_outputs(h, zs, ys, zq):
            return self.adapt_head(h, zs, ys, zq, self.inner_steps_eval, True)

        with torch.no_grad():
            zs, zq = fold_features(self.backbone, episode.support_x, episode.query_x, bn_mode)
            return map_tasks(task_outputs, (head,), (zs, episode.support_y, zq), self.head_strategy(), self.chunk_size)
