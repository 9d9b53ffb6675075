"""Prototypical networks (Snell et al. 2017).

Each class is the mean embedding of its support images; a query is classified
by a softmax over negative squared Euclidean distances to the prototypes.
Batch norm sees one task at a time, so results do not depend on how tasks are
batched or split across processes: an accelerator takes a meta-batch in one
forward pass, a CPU one task a call (:meth:`ProtoNet.embed`; a training step
task by task, :func:`~metarun.algorithms.base.loss_task_by_task`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metarun.algorithms.base import Algorithm, accuracy, loss_task_by_task
from metarun.algorithms.padded import is_padded, mask_classes, per_task_features, task_losses
from metarun.data.episodes import Episode
from metarun.errors import ConfigError
from metarun.models.norm import norm_statistics, one_task_per_call


def prototypes(support: torch.Tensor, labels: torch.Tensor, ways: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[tasks, n, d]`` embeddings -> ``[tasks, ways, d]`` class means; ``mask`` ``[tasks, n]``: the real samples of a
    padded episode (a padded class's prototype is then zero)."""
    onehot = F.one_hot(labels, ways).to(support.dtype)  # [t, n, w]
    if mask is not None:
        onehot = onehot * mask[..., None].to(onehot.dtype)
        return onehot.transpose(1, 2) @ support / onehot.sum(1).clamp_min(1)[..., None]
    return onehot.transpose(1, 2) @ support / onehot.sum(1)[..., None]


def logits_from_distances(query: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """Negative squared Euclidean distances, ``[tasks, q, ways]``."""
    return -(query.pow(2).sum(-1, keepdim=True) - 2 * query @ protos.transpose(1, 2) + protos.pow(2).sum(-1)[:, None, :])


def at_least_float(x: torch.Tensor) -> torch.Tensor:
    """Distances in float32 from bf16 or fp16 features; float64 ones (the tests' references) stay float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@dataclass
class ProtoNetConfig:
    _target_: str = "metarun.algorithms.protonet.ProtoNet"


class ProtoNet(Algorithm):
    reads_backbone_features = True
    channels_last_pays = True  # its convolutions are shared by all tasks of a call
    Config = ProtoNetConfig
    default_bn_mode = "running"  # as in the paper's code: the model in eval mode at test time
    variable_ways = True

    def __init__(self, backbone, ways: int, task_kind: str = "classification") -> None:
        super().__init__(backbone, ways)
        if task_kind != "classification":
            raise ConfigError("algo=protonet classifies by the nearest class prototype: it needs a classification dataset")

    def embed(self, episode: Episode, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeds support and query of every task with per-task statistics.

        ``mode`` is ``batch`` (training: support and query together, as in the
        paper), or an ``eval.bn_mode``. On a CPU each task goes through the
        backbone on its own: its activations stay cache-sized, and batch norm
        takes its native single-group path, faster than one call for a
        meta-batch of Omniglot tasks (``docs/performance.md``). An accelerator
        takes all tasks in one call.
        """
        if is_padded(episode):  # each task at its real size, so that batch norm never sees padding
            return per_task_features(self.backbone, episode, lambda task: self.embed_tasks(task.support_x, task.query_x, mode))
        t = episode.num_tasks
        if episode.support_x.device.type != "cpu" or t == 1:
            return self.embed_tasks(episode.support_x, episode.query_x, mode)
        parts = []
        with one_task_per_call(self.backbone) as next_task:
            for i in range(t):
                parts.append(self.embed_tasks(episode.support_x[i : i + 1], episode.query_x[i : i + 1], mode))
                next_task()
        return torch.cat([s for s, _ in parts]), torch.cat([q for _, q in parts])

    def embed_tasks(self, support_x: torch.Tensor, query_x: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        t, ns, nq = support_x.shape[0], support_x.shape[1], query_x.shape[1]
        if mode == "transductive":
            with norm_statistics(self.backbone, "batch", tasks=t):
                return self.backbone(support_x.flatten(0, 1)).view(t, ns, -1), self.backbone(query_x.flatten(0, 1)).view(
                    t, nq, -1
                )
        x = torch.cat([support_x, query_x], 1).flatten(0, 1)
        with norm_statistics(self.backbone, mode, support_size=ns, tasks=t):
            z = self.backbone(x).view(t, ns + nq, -1)
        return z[:, :ns], z[:, ns:]

    def logits(self, episode: Episode, stats: str) -> torch.Tensor:
        s, q = self.embed(episode, stats)
        s, q = at_least_float(s), at_least_float(q)
        if not is_padded(episode):
            return logits_from_distances(q, prototypes(s, episode.support_y, episode.ways))
        protos = prototypes(s, episode.support_y, episode.ways, episode.support_mask)
        return mask_classes(logits_from_distances(q, protos), episode.class_mask)

    def training_loss(self, batch: Episode):
        if is_padded(batch):  # each episode weighs the same, whatever its number of queries
            losses, accs = task_losses(self.logits(batch, "batch"), batch.query_y, batch.query_mask)
            loss = losses.mean()
            return loss, {"loss": loss.detach(), "acc": accs.mean().detach()}
        return loss_task_by_task(self, batch, self.tasks_loss)

    def tasks_loss(self, batch: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.logits(batch, "batch")
        return F.cross_entropy(logits.flatten(0, 1), batch.query_y.flatten()), accuracy(logits, batch.query_y).mean()

    @torch.inference_mode()
    def predict_logits(self, episode: Episode, bn_mode: str) -> torch.Tensor:
        return self.logits(episode, bn_mode)
