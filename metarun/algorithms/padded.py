"""Algorithms on padded episodes (:class:`~metarun.data.metadataset.PaddedEpisode`, ``task.protocol=metadataset``).

The backbone sees each task at its real size, so that batch norm's statistics never include padding (and
running statistics move as a grouped call of the real tasks would move them, :func:`one_task_per_call`);
everything after the features runs on the padded meta-batch at once, with the episode's masks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from metarun.data.episodes import Episode
from metarun.data.metadataset import PaddedEpisode
from metarun.models.norm import one_task_per_call


def is_padded(episode) -> bool:
    return isinstance(episode, PaddedEpisode)


def per_task_features(
    backbone: nn.Module, episode: PaddedEpisode, features: Callable[[Episode], tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``features(task)`` of each task at its real size, padded with zeros to ``[tasks, S, d]`` and ``[tasks, Q, d]``."""
    s, q = episode.support_x.shape[1], episode.query_x.shape[1]
    zs, zq = [], []
    with one_task_per_call(backbone) as next_task:
        for i in range(episode.num_tasks):
            a, b = features(episode.task(i))
            zs.append(F.pad(a[0], (0, 0, 0, s - a.shape[1])))
            zq.append(F.pad(b[0], (0, 0, 0, q - b.shape[1])))
            next_task()
    return torch.stack(zs), torch.stack(zq)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the last dim of the entries where ``mask`` is true (``torch.where``: padding never reaches a sum)."""
    return torch.where(mask, values, 0).sum(-1) / mask.sum(-1).clamp_min(1)


def mask_classes(logits: torch.Tensor, class_mask: torch.Tensor) -> torch.Tensor:
    """``[tasks, n, ways]`` logits with a task's padded classes at -inf: softmax gives them nothing, argmax never picks them."""
    return logits.masked_fill(~class_mask[:, None, :], float("-inf"))


def task_losses(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task mean cross-entropy and accuracy ``[tasks]`` over the real samples of ``[tasks, n, ways]`` logits."""
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
    return masked_mean(ce, mask), masked_mean((logits.argmax(-1) == labels).float(), mask)
