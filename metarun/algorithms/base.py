"""The one interface between the trainer and a meta-learning algorithm.

The trainer never looks inside an algorithm. Each meta-step it asks for a batch
(:meth:`Algorithm.sample_batch`), gets a loss to call ``backward()`` on
(:meth:`Algorithm.training_loss`), and steps the optimiser; at evaluation it
asks for one score per task (:meth:`Algorithm.evaluate`), which scores the query
outputs of :meth:`Algorithm.predict_logits`, the one path evaluation and
``metarun predict`` share. Algorithms that
compute their meta-gradient with ``torch.func`` return a surrogate loss whose
gradient is that meta-gradient, so gradient clipping, mixed precision and the
data-parallel all-reduce stay in the trainer, written once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from metarun.algorithms.pretrained_init import load_backbone_weights
from metarun.data.episodes import Batch, Episode, EpisodeSampler
from metarun.models.norm import one_task_per_call


class Algorithm(nn.Module):
    #: what :meth:`evaluate` returns per task: "accuracy" (higher is better) or "mse"
    score: str = "accuracy"
    #: ``eval.bn_mode`` when the user leaves it unset (documented per algorithm in the README)
    default_bn_mode: str = "transductive"
    #: whether episodes must have ``ways`` classes (a meta-learned head); else any number is served
    fixed_ways: bool = False
    #: whether it serves padded episodes of varying ways and shots (``task.protocol=metadataset``); the others refuse it
    variable_ways: bool = False
    #: whether NHWC pays on a CPU (``trainer.channels_last=auto``): convolutions shared by all tasks of a call do,
    #: per-task grouped ones ran slower in it
    channels_last_pays: bool = False
    #: whether it uses its backbone only as each image's features ``backbone(x)`` (never adapting it or reaching into
    #: its layers), so that a fixed backbone's features can be computed once per split (``trainer.frozen_features``)
    reads_backbone_features: bool = False
    #: the schema of ``algo.*`` (a dataclass declared in the algorithm's module; :func:`metarun.config.algorithm_schemas`)
    Config: type | None = None

    @classmethod
    def compiles_with(cls, options) -> bool:
        """Whether ``torch.compile`` computes the meta-step right with these ``algo.*`` options
        (:func:`metarun.device.compile_step`); asked while checking the config, before any data are loaded."""
        return True

    @property
    def compiles(self) -> bool:
        return self.compiles_with({})

    def __init__(self, backbone: nn.Module, ways: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.ways = ways

    @classmethod
    def needs_pretrained(cls, options) -> str | None:
        """The ``algo.*`` option that makes these options need a pre-trained backbone (``trainer.init_from`` or
        published weights), e.g. ``algo.freeze_backbone=true``; None when a fresh one will do. Asked while checking
        the config."""
        return "algo.freeze_backbone=true" if options.get("freeze_backbone", False) else None

    def start_from(self, state: dict[str, torch.Tensor], config: dict, source: str) -> None:
        """``trainer.init_from``: a fresh run starts from the model ``state`` of an earlier run (trained with
        ``config``, read from ``source``): its backbone, checked against this one's."""
        load_backbone_weights(self.backbone, state, config, source)

    def sample_batch(self, sampler: EpisodeSampler, num_tasks: int, shard: tuple[int, int] = (0, 1)) -> Episode | Batch:
        return sampler.sample(num_tasks, shard)

    def training_loss(self, batch: Episode | Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss to back-propagate and detached 0-d metrics (``loss``, ``acc``) kept on the device."""
        raise NotImplementedError

    def predict_logits(self, episode: Episode, bn_mode: str) -> torch.Tensor:
        """Each query's class scores ``[tasks, queries, ways]`` (softmax gives its probabilities; a regression
        learner's predictions instead) after solving each task from its support set; ``episode.query_y`` is unused.

        A query's scores depend on the support set and that query alone unless ``bn_mode`` is ``transductive``,
        whose batch statistics are the query set's."""
        raise NotImplementedError(f"{type(self).__name__} does not give per-query scores")

    def evaluate(self, episode: Episode, bn_mode: str) -> torch.Tensor:
        """One score per task ``[tasks]`` after solving each task from its support set (padded variable-way
        episodes: over their real classes and queries)."""
        logits = self.predict_logits(episode, bn_mode)
        if getattr(episode, "query_mask", None) is not None:
            from metarun.algorithms.padded import mask_classes, task_losses

            return task_losses(mask_classes(logits, episode.class_mask), episode.query_y, episode.query_mask)[1]
        return accuracy(logits, episode.query_y)

    def upgrade_state(self, state: dict) -> dict:
        """A checkpoint's model state from an earlier version of the algorithm, in this version's keys."""
        return state


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean accuracy over the last-but-one dim: ``[..., n, ways]`` logits -> ``[...]``."""
    return (logits.argmax(-1) == labels).float().mean(-1)


def surrogate_loss(params: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
    """A scalar whose gradient with respect to ``params`` is ``grads``."""
    return sum((p * g.detach().to(p.dtype)).sum() for p, g in zip(params, grads, strict=True))


def loss_task_by_task(
    model: nn.Module, batch: Episode, task_loss: Callable[[Episode], tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:meth:`Algorithm.training_loss` of an algorithm whose loss is the mean of its tasks' losses, from
    ``task_loss(episode) -> (mean loss, mean accuracy)``.

    On a CPU each task's forward and backward run back to back, so that only one task's activations are alive
    (in cache) at a time, as a plain per-episode loop has them, without its optimiser step per task; the mean
    of the tasks' gradients comes back as a :func:`surrogate_loss` whose value is the loss, and the running
    statistics move as one call of all tasks moves them (:func:`one_task_per_call`). An accelerator, or a
    batch of one task, takes the whole batch in one call."""
    params = [p for p in model.parameters() if p.requires_grad]
    t = batch.num_tasks
    if batch.support_x.device.type != "cpu" or t == 1 or not params or not torch.is_grad_enabled():
        loss, acc = task_loss(batch)
        return loss, {"loss": loss.detach(), "acc": acc.detach()}
    grads = [torch.zeros_like(p) for p in params]
    losses, accs = [], []
    with one_task_per_call(model) as next_task:
        for i in range(t):
            loss, acc = task_loss(batch.select(slice(i, i + 1)))
            for g, gi in zip(grads, torch.autograd.grad(loss / t, params, allow_unused=True), strict=True):
                if gi is not None:
                    g.add_(gi)
            losses.append(loss.detach())
            accs.append(acc.detach())
            next_task()
    loss = torch.stack(losses).mean()
    surrogate = surrogate_loss(params, grads)
    return surrogate - surrogate.detach() + loss, {"loss": loss, "acc": torch.stack(accs).mean()}
