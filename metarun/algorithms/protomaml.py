"""Proto-MAML (Triantafillou et al. 2020): MAML whose linear head is made for each episode from its support set.

The head starts as the prototypical network's classifier written as a linear layer: with ``c_k`` the mean
feature of class ``k``'s support images (through the meta-learned backbone, with the inner loop's batch-norm
rule), ``W_k = 2 c_k`` and ``b_k = -||c_k||²``, so that ``W z + b = ||z||² - ||z - c_k||²`` ranks the classes as
ProtoNet does. The backbone and that head are then adapted by MAML's inner loop, and the meta-gradient reaches
the backbone also through the prototypes. First order by default, as the paper's fo-Proto-MAML (and
Meta-Dataset's code): the inner gradients are constants, the head's dependence on the backbone is not.

The head has a row per class of the episode, so any number of ways is served: an ordinary meta-batch runs
through MAML's batched strategies, and a padded Meta-Dataset one (``task.protocol=metadataset``) task by task at
each task's real size, so that batch norm never sees padding.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_flatten, tree_map

from metarun.algorithms.base import surrogate_loss
from metarun.algorithms.inner_loop import Params
from metarun.algorithms.maml import MAML, MAMLConfig
from metarun.algorithms.padded import is_padded
from metarun.data.episodes import Episode
from metarun.errors import ConfigError
from metarun.models.norm import one_task_per_call


@dataclass
class ProtoMAMLConfig(MAMLConfig):
    _target_: str = "metarun.algorithms.protomaml.ProtoMAML"
    #: the paper's fo-Proto-MAML; false: differentiate through the inner steps too
    first_order: bool = True


def prototype_head(z: torch.Tensor, labels: torch.Tensor, ways: int) -> Params:
    """``{"weight": 2 c, "bias": -||c||²}`` from support features ``[..., n, d]`` and labels ``[..., n]``, ``c`` the
    ``[..., ways, d]`` class means (computed in at least float32)."""
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    # a comparison rather than F.one_hot, which reads the labels' values and so cannot run under vmap
    onehot = (labels[..., None] == torch.arange(ways, device=labels.device)).to(z.dtype)
    protos = onehot.transpose(-1, -2) @ z / onehot.sum(-2)[..., None]
    return {"weight": 2 * protos, "bias": -protos.square().sum(-1)}


class ProtoMAML(MAML):
    Config = ProtoMAMLConfig
    default_bn_mode = "transductive"  # MAML's, whose inner loop it runs
    fixed_ways = False  # the head is made per episode, with a row per class
    variable_ways = True

    def __init__(
        self,
        backbone,
        ways: int,
        inner_lr: float = 0.1,
        inner_steps: int = 1,
        inner_steps_eval: int = 3,
        first_order: bool = True,
        task_kind: str = "classification",
        strategy: str = "auto",
        chunk_size: int | None = None,
    ) -> None:
        if task_kind != "classification":
            raise ConfigError("algo=protomaml makes its head from class prototypes: it needs a classification dataset")
        super().__init__(backbone, ways, inner_lr, inner_steps, inner_steps_eval, first_order, task_kind, strategy, chunk_size)
        del self.head  # made for each episode
        #: the classes of the tasks being solved (every task of a batched call has as many)
        self.episode_ways = ways

    @contextmanager
    def solving(self, ways: int) -> Iterator[None]:
        """Tasks of ``ways`` classes inside."""
        saved, self.episode_ways = self.episode_ways, ways
        try:
            yield
        finally:
            self.episode_ways = saved

    def model_parameters(self) -> Params:
        return {"backbone": dict(self.backbone.named_parameters())}

    def initial_weights(self, meta_params: Params, buffers: Params, xs, ys, inner: str) -> Params:
        backbone = self.per_task({"backbone": meta_params["backbone"]})
        head = prototype_head(self.body(backbone, buffers, xs, inner), ys, self.episode_ways)
        # The inner loop starts from views of the backbone, not from the tensors the head was computed from: plain
        # autograd (a grouped call) would otherwise add the path through the head to the inner gradient, which
        # holds the head fixed; the meta-gradient follows both.
        return {"backbone": tree_map(lambda p: p.view_as(p), backbone["backbone"]), "head": head}

    # -- the Algorithm interface ---------------------------------------------------------------
    def training_loss(self, batch: Episode):
        if is_padded(batch):
            return self.training_loss_task_by_task(batch)
        with self.solving(batch.ways):
            return super().training_loss(batch)

    def training_loss_task_by_task(self, batch: Episode):
        """Each task at its real size, its meta-gradient accumulated, running statistics averaged over the tasks as
        a batched call averages them; the mean meta-gradient is handed over as a surrogate, as MAML's is."""
        params = self.meta_parameters()
        fixed = self.detached(params)
        sums, losses, scores = None, [], []
        with one_task_per_call(self.backbone) as next_task:
            for i in range(batch.num_tasks):
                task = batch.task(i)
                with self.solving(task.ways):
                    grads, loss, score = self.run_tasks(
                        self.task_meta_gradient,
                        (fixed,),
                        (task.support_x, task.support_y, task.query_x, task.query_y),
                        task.support_x.shape[1] + task.query_x.shape[1],
                    )
                next_task()
                grads = [g[0] for g in tree_flatten(grads)[0]]
                sums = grads if sums is None else [a + b for a, b in zip(sums, grads, strict=True)]
                losses.append(loss)
                scores.append(score)
        surrogate = surrogate_loss(tree_flatten(params)[0], [g / batch.num_tasks for g in sums])
        return surrogate, {"loss": torch.cat(losses).mean().detach(), self.metric_name: torch.cat(scores).mean().detach()}

    def predict_logits(self, episode: Episode, bn_mode: str) -> torch.Tensor:
        with self.solving(episode.ways):
            return super().predict_logits(episode, bn_mode)

    def evaluate(self, episode: Episode, bn_mode: str) -> torch.Tensor:
        if is_padded(episode):
            return torch.cat([self.evaluate(episode.task(i), bn_mode) for i in range(episode.num_tasks)])
        with self.solving(episode.ways):
            return super().evaluate(episode, bn_mode)
