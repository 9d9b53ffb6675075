"""Dynamic few-shot learning without forgetting (Gidaris & Komodakis 2018): a generator of classifier weights.

The meta-learner's input is a novel class's support features; its output is
that class's weight in a cosine classifier whose base-class weights were
learned by pre-training. For support features ``z̄'_i`` (L2-normalised):

    w' = φ_avg ⊙ mean_i z̄'_i  +  φ_att ⊙ mean_i Σ_b softmax_b(γ cos(W_q z̄'_i, k_b)) w̄_b

(the paper's eq. 7-9: feature averaging plus attention over the normalised
base-class weights ``w̄_b`` with a learned key ``k_b`` per base class), and a
query's logits are ``s cos(z, w)`` with a learned scale ``s``.

Stage 1 is ordinary pre-training of backbone + cosine classifier over all
training classes, as ``algo=finetune algo.head=cosine`` (this class extends
:class:`~metarun.algorithms.finetune.Finetune`: its mini-batches, loss and
classifier, with the scale learned). Stage 2 trains the generator on episodes
of the training classes with the backbone frozen (features under its running
statistics): the episode's classes play the novel ones, their own base weights
are left out of the attention and out of the classifier (the paper's "fake
novel" classes), and a query is classified among the novel and the remaining
base classes.

Both stages run in one ``metarun train``: the first ``algo.pretrain_steps``
steps pre-train, the rest train the generator (``trainer.steps`` counts both).
That keeps one command, one run folder, one schedule and exact resume (the
step count is a buffer of the model, saved in its checkpoints). Alternatively,
``algo.pretrain_steps=0 trainer.init_from=RUN`` starts from an earlier
``algo=finetune algo.head=cosine`` run (its backbone and its classifier become the
base weights): every step is stage 2, on the fixed backbone's features computed
once (``trainer.frozen_features``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metarun.algorithms.base import accuracy
from metarun.algorithms.finetune import Finetune
from metarun.algorithms.pretrained_init import episode_features, fix_backbone
from metarun.algorithms.protonet import prototypes
from metarun.data.episodes import Batch, Episode
from metarun.errors import CheckpointError
from metarun.models.norm import check_bn_mode
from metarun.schema import at_least


@dataclass
class WeightGenConfig:
    _target_: str = "metarun.algorithms.weightgen.WeightGen"
    #: stage 1: steps of pre-training on mini-batches of all training classes (0: the backbone and base classifier
    #: come from trainer.init_from, an algo=finetune algo.head=cosine run, and stay fixed)
    pretrain_steps: int = at_least(0, 1000)
    #: stage 1: images per step
    batch_size: int = at_least(1, 64)
    #: where the learned cosine scale starts
    cosine_scale: float = at_least(0.0, 10.0)
    #: where the learned attention scale gamma starts
    attention_scale: float = at_least(0.0, 10.0)


@dataclass
class ClassEpisode(Episode):
    """An episode that also says which training classes its ways are (``classes`` ``[tasks, ways]``)."""

    classes: torch.Tensor | None = None


def sample_with_classes(sampler, num_tasks: int, shard: tuple[int, int]) -> ClassEpisode:
    """:meth:`EpisodeSampler.sample`, keeping each task's class indices in the split."""
    idx = sampler.sample_indices(num_tasks)
    rank, world = shard
    if world == 1:
        episode, classes = sampler.gather(idx), idx.classes
    else:
        mine = slice(rank * (num_tasks // world), (rank + 1) * (num_tasks // world))
        episode = sampler.gather(idx).select(mine) if sampler.transform is not None else sampler.gather(idx[mine])
        classes = idx.classes[mine]
    e = episode
    return ClassEpisode(e.support_x, e.support_y, e.query_x, e.query_y, e.ways, classes.to(e.support_x.device))


class WeightGen(Finetune):
    Config = WeightGenConfig
    default_bn_mode = "running"  # a frozen, pre-trained network, evaluated in eval mode
    compiles = False  # the stage is read from a buffer between steps

    def __init__(
        self,
        backbone: nn.Module,
        ways: int,
        num_train_classes: int | None = None,
        pretrain_steps: int = 1000,
        batch_size: int = 64,
        cosine_scale: float = 10.0,
        attention_scale: float = 10.0,
        task_kind: str = "classification",
    ) -> None:
        super().__init__(
            backbone, ways, num_train_classes, head="cosine", batch_size=batch_size, finetune_steps=0,
            cosine_scale=cosine_scale, task_kind=task_kind,
        )  # fmt: skip
        d = backbone.out_features
        self.cosine_scale = nn.Parameter(torch.tensor(float(cosine_scale)))  # learned, as in the paper
        self.attention_scale = nn.Parameter(torch.tensor(float(attention_scale)))
        self.query = nn.Linear(d, d)
        self.keys = nn.Parameter(torch.randn(num_train_classes, d) * (2.0 / d) ** 0.5)
        self.phi_avg = nn.Parameter(torch.ones(d))
        self.phi_att = nn.Parameter(torch.ones(d))
        with torch.no_grad():  # the paper's start: the query map near the identity
            self.query.weight.copy_(torch.eye(d) + torch.randn(d, d) * 0.001)
            self.query.bias.zero_()
        self.pretrain_steps = pretrain_steps
        #: training steps taken: stage 1 while below pretrain_steps (a buffer, so that a resumed run continues in its stage)
        self.register_buffer("steps_taken", torch.zeros((), dtype=torch.long))
        if pretrain_steps == 0:  # the backbone comes from trainer.init_from and stays as it was trained
            fix_backbone(backbone, "weightgen")

    @classmethod
    def needs_pretrained(cls, options) -> str | None:
        return "algo.pretrain_steps=0" if options.get("pretrain_steps") == 0 else None

    def start_from(self, state: dict[str, torch.Tensor], config: dict, source: str) -> None:
        """Without stage 1 (``algo.pretrain_steps=0``): the backbone and the cosine classifier of an
        ``algo=finetune algo.head=cosine`` run, whose classifier's weights are the base classes' weights. With it:
        any earlier run's backbone, where stage 1 starts."""
        super().start_from(state, config, source)
        if self.pretrain_steps:
            return
        weight = state.get("classifier.weight")
        if weight is None or weight.shape != self.classifier.weight.shape:
            raise CheckpointError(
                f"trainer.init_from={source}: no classifier over this dataset's {self.classifier.out_features} training "
                "classes in it: give a run of algo=finetune (algo.head=cosine) on the same dataset"
            )
        with torch.no_grad():
            self.classifier.weight.copy_(weight)

    def in_stage_one(self) -> bool:
        return int(self.steps_taken) < self.pretrain_steps

    # -- the two stages -------------------------------------------------------------------
    def sample_batch(self, sampler, num_tasks: int, shard: tuple[int, int] = (0, 1)) -> Batch | ClassEpisode:
        if self.in_stage_one():
            return sampler.sample_images(self.batch_size, shard)
        return sample_with_classes(sampler, num_tasks, shard)

    def training_loss(self, batch: Batch | ClassEpisode):
        self.steps_taken += 1
        if isinstance(batch, Batch):
            return super().training_loss(batch)  # stage 1: Finetune's cosine pre-training, with a learned scale
        return self.generator_loss(batch)

    def generate(self, zs: torch.Tensor, ys: torch.Tensor, ways: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """Novel weights ``[tasks, ways, d]`` from support features ``[tasks, n, d]``; ``exclude`` ``[tasks, C]`` marks base
        classes left out of the attention."""
        z = F.normalize(zs, dim=-1)
        q = F.normalize(self.query(z), dim=-1)
        scores = self.attention_scale * q @ F.normalize(self.keys, dim=-1).T  # [t, n, C]
        if exclude is not None:
            scores = scores.masked_fill(exclude[:, None, :], float("-inf"))
        attended = scores.softmax(-1) @ F.normalize(self.classifier.weight, dim=-1)  # [t, n, d]
        return self.phi_avg * prototypes(z, ys, ways) + self.phi_att * prototypes(attended, ys, ways)

    def cosine_logits(self, z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.cosine_scale * F.normalize(z, dim=-1) @ F.normalize(weights, dim=-1).transpose(-1, -2)

    def generator_loss(self, batch: ClassEpisode):
        """Stage 2: the episode's classes as novel ones, classified among themselves and the other base classes."""
        zs, zq = episode_features(self.backbone, batch.support_x, batch.query_x, "running", frozen=True)
        dtype = self.query.weight.dtype
        zs, zq = zs.to(dtype), zq.to(dtype)
        t, ways = batch.num_tasks, batch.ways
        own = F.one_hot(batch.classes, self.classifier.out_features).any(1)  # [t, C]: the fake novel classes
        novel = self.generate(zs, batch.support_y, ways, own)
        weights = torch.cat([novel, self.classifier.weight.expand(t, -1, -1)], 1)
        logits = self.cosine_logits(zq, weights)
        logits = torch.cat([logits[..., :ways], logits[..., ways:].masked_fill(own[:, None, :], float("-inf"))], -1)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch.query_y.flatten())
        return loss, {"loss": loss.detach(), "acc": accuracy(logits[..., :ways], batch.query_y).mean().detach()}

    def predict_logits(self, episode: Episode, bn_mode: str) -> torch.Tensor:
        check_bn_mode(bn_mode)
        with torch.no_grad():
            zs, zq = self.features(episode, bn_mode)
            dtype = self.query.weight.dtype
            novel = self.generate(zs.to(dtype), episode.support_y, episode.ways)
            return self.cosine_logits(zq.to(dtype), novel)
