"""The transfer baseline: pre-train, then fit a new classifier per task (Chen et al. 2019).

Training is ordinary supervised learning: backbone + a classifier over all
``num_train_classes`` meta-training classes, cross-entropy on mini-batches of
``batch_size`` images drawn uniformly from the training split
(``sampler.sample_images``), with no episodes. At test time the backbone is
frozen; each episode's support and query images go through it once (batch
norm by ``eval.bn_mode``, default the running statistics, as in the paper's
code), and a fresh classifier is fitted on each task's support features with
``finetune_steps`` full-batch Adam steps at ``finetune_lr``. The classifiers of
all tasks of an evaluation chunk are fitted together as one ``[tasks, ways, d]``
tensor: the loss is the sum of the per-task losses, so each task's gradient
(and Adam's per-element update) is exactly that of fitting it alone.

``head``: ``linear`` (Baseline) or ``cosine`` (Baseline++: logits are
``cosine_scale`` times the cosine similarity between features and class
weights, both at pre-training and at test time).
Validation during training still runs on episodes, through :meth:`evaluate`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metarun.algorithms.base import Algorithm, accuracy
from metarun.algorithms.padded import is_padded, mask_classes, masked_mean, per_task_features
from metarun.algorithms.task_batching import fold_features
from metarun.data.episodes import Batch, Episode
from metarun.errors import ConfigError
from metarun.models.norm import check_bn_mode
from metarun.schema import at_least, choice

HEADS = ("linear", "cosine")


def head_logits(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kind: str, scale: float) -> torch.Tensor:
    """``[..., n, d]`` features and ``[..., ways, d]`` weights -> ``[..., n, ways]`` logits."""
    if kind == "cosine":
        return scale * F.normalize(z, dim=-1) @ F.normalize(weight, dim=-1).transpose(-1, -2)
    out = z @ weight.transpose(-1, -2)
    return out if bias is None else out + bias.unsqueeze(-2)


@dataclass
class FinetuneConfig:
    _target_: str = "metarun.algorithms.finetune.Finetune"
    #: linear (Baseline) | cosine (Baseline++)
    head: str = choice(*HEADS)
    #: images per pre-training step, drawn from all training classes
    batch_size: int = at_least(1, 64)
    #: full-batch Adam steps fitting each test episode's new classifier
    finetune_steps: int = at_least(0, 100)
    finetune_lr: float = at_least(0.0, 0.01)
    #: logit scale of the cosine head
    cosine_scale: float = at_least(0.0, 10.0)


class Finetune(Algorithm):
    reads_backbone_features = True
    channels_last_pays = True  # its convolutions are shared by all tasks of a call
    Config = FinetuneConfig
    default_bn_mode = "running"  # the backbone is an ordinary network, evaluated in eval mode
    variable_ways = True

    def __init__(
        self,
        backbone: nn.Module,
        ways: int,
        num_train_classes: int | None = None,
        head: str = "linear",
        batch_size: int = 64,
        finetune_steps: int = 100,
        finetune_lr: float = 0.01,
        cosine_scale: float = 10.0,
        task_kind: str = "classification",
    ) -> None:
        super().__init__(backbone, ways)
        if task_kind != "classification":
            raise ConfigError(
                "algo=finetune pre-trains a classifier over the training classes: it needs a classification dataset"
            )
        if num_train_classes is None:
            raise ConfigError("algo=finetune needs a dataset with a training split of classes")
        if head not in HEADS:
            raise ConfigError(f"algo.head={head}: valid heads are {', '.join(HEADS)}")
        if batch_size < 1 or finetune_steps < 0:
            raise ConfigError(f"algo.batch_size={batch_size}, algo.finetune_steps={finetune_steps}: need >= 1 and >= 0")
        self.head_kind, self.batch_size = head, batch_size
        self.finetune_steps, self.finetune_lr, self.cosine_scale = finetune_steps, finetune_lr, cosine_scale
        d = backbone.out_features
        self.classifier = nn.Linear(d, num_train_classes, bias=head == "linear")

    # -- pre-training ---------------------------------------------------------------------
    def sample_batch(self, sampler, num_tasks: int, shard: tuple[int, int] = (0, 1)) -> Batch:
        return sampler.sample_images(self.batch_size, shard)

    def training_loss(self, batch: Batch):
        logits = head_logits(
            self.backbone(batch.x), self.classifier.weight, self.classifier.bias, self.head_kind, self.cosine_scale
        )
        loss = F.cross_entropy(logits, batch.y)
        return loss, {"loss": loss.detach(), "acc": accuracy(logits, batch.y).detach()}

    # -- test time ------------------------------------------------------------------------
    def features(self, episode: Episode, bn_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen-backbone features ``[tasks, n, d]`` of support and query, each task with its own statistics."""
        if is_padded(episode):  # each task at its real size, so that batch norm never sees padding
            return per_task_features(
                self.backbone, episode, lambda task: fold_features(self.backbone, task.support_x, task.query_x, bn_mode)
            )
        return fold_features(self.backbone, episode.support_x, episode.query_x, bn_mode)

    def fit_heads(
        self, zs: torch.Tensor, ys: torch.Tensor, ways: int, episode: Episode | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A new classifier per task, ``[tasks, ways, d]`` (+ bias), fitted on the support features (of a padded
        ``episode``: on its real samples, over its real classes)."""
        padded = episode is not None and is_padded(episode)
        t, _, d = zs.shape
        g = torch.Generator(device=zs.device).manual_seed(0)  # the same start for every task and run
        bound = 1.0 / d**0.5  # nn.Linear's initialisation
        start = (torch.rand(ways, d, generator=g, device=zs.device, dtype=zs.dtype) * 2 - 1) * bound
        weight = start.expand(t, ways, d).clone().requires_grad_()
        bias = torch.zeros(t, ways, device=zs.device, dtype=zs.dtype, requires_grad=True) if self.head_kind == "linear" else None
        params = [weight] + ([bias] if bias is not None else [])
        opt = torch.optim.Adam(params, lr=self.finetune_lr)
        with torch.enable_grad():
            for _ in range(self.finetune_steps):
                logits = head_logits(zs, weight, bias, self.head_kind, self.cosine_scale)
                if padded:
                    logits = mask_classes(logits, episode.class_mask)
                # sum over tasks of each task's mean loss: per-task gradients are independent
                loss = F.cross_entropy(logits.flatten(0, 1), ys.flatten(), reduction="none").view(t, -1)
                loss = masked_mean(loss, episode.support_mask).sum() if padded else loss.mean(1).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return weight.detach(), None if bias is None else bias.detach()

    def predict_logits(self, episode: Episode, bn_mode: str) -> torch.Tensor:
        check_bn_mode(bn_mode)
        with torch.no_grad():
            zs, zq = self.features(episode, bn_mode)
        weight, bias = self.fit_heads(zs, episode.support_y, episode.ways, episode)
        with torch.no_grad():
            return head_logits(zq, weight, bias, self.head_kind, self.cosine_scale)
