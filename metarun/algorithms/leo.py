"""Latent Embedding Optimization (Rusu et al. 2019): classifier weights decoded from per-class latent codes,
adapted by gradient steps in the latent space.

The meta-learner's input is the support set's features; its output is the
weights of a linear classifier over those features. Per task:

1. encoder + relation net: every support feature is encoded to ``latent``
   dims; the relation net (an MLP of ``2 latent`` on every pair of encoded
   support examples of the task) averaged over the pairs of each example and
   over the shots of each class gives a Gaussian per class; its sample (its
   mean at evaluation) is the class's latent code, with a KL penalty against
   N(0, I);
2. decoder: a linear map (orthogonality penalty on its weight, as in the
   paper) from a code to a Gaussian over the class's classifier weight
   ``[d]``, sampled in training (the mean at evaluation);
3. inner loop: ``inner_steps`` gradient steps on the support loss with respect
   to the codes, decoding after each, with a meta-learned step per latent
   dim; then ``finetune_steps`` steps on the decoded weights themselves with a
   meta-learned step per feature dim;
4. meta-loss: the adapted classifier's query loss + ``kl_weight`` KL +
   ``encoder_penalty`` ``|z' - z|²`` (the adapted codes, held constant, against
   the encoder's) + ``orthogonality_penalty`` times the decoder's.

Every task of a meta-batch runs at once as ``[tasks, ways, ...]`` tensors (the
tasks share no parameter inside the inner loop, so the gradient of the sum of
the per-task support losses is every task's own gradient), differentiated to
second order with ``torch.autograd.grad(create_graph=True)``. The paper runs
LEO on frozen pre-trained features (a WRN-28-10); here it takes the backbone's
features and trains the backbone jointly, unless ``algo.freeze_backbone=true``
with ``trainer.init_from`` (e.g. a run of ``algo=finetune``). The paper's L2 penalty
on all weights is ``trainer.weight_decay``; dropout (``algo.dropout``) is applied
once to an episode's features rather than at every use of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from metarun.algorithms.base import Algorithm, accuracy
from metarun.algorithms.pretrained_init import episode_features, fix_backbone
from metarun.algorithms.protonet import prototypes
from metarun.data.episodes import Episode
from metarun.errors import ConfigError
from metarun.models.norm import check_bn_mode
from metarun.schema import at_least


@dataclass
class LEOConfig:
    _target_: str = "metarun.algorithms.leo.LEO"
    #: dims of a class's latent code
    latent: int = at_least(1, 64)
    #: gradient steps on the latent codes (training and evaluation)
    inner_steps: int = at_least(0, 5)
    #: gradient steps on the decoded classifier weights after them
    finetune_steps: int = at_least(0, 5)
    #: where the meta-learned step per latent dim starts
    inner_lr: float = at_least(0.0, 1.0)
    #: where the meta-learned step per feature dim of the fine-tuning starts
    finetune_lr: float = at_least(0.0, 0.001)
    #: weight of the codes' KL divergence to N(0, I)
    kl_weight: float = at_least(0.0, 0.001)
    #: weight of |adapted codes - encoded codes|^2
    encoder_penalty: float = at_least(0.0, 1e-9)
    #: weight of the decoder's orthogonality penalty
    orthogonality_penalty: float = at_least(0.0, 0.001)
    #: dropout on the features in training
    dropout: float = at_least(0.0, 0.3)
    #: second-order meta-gradient through the inner steps (false: the inner gradients are constants)
    second_order: bool = True
    #: keep the (pre-trained) backbone fixed, as the paper; needs trainer.init_from (or published weights)
    freeze_backbone: bool = False


class Noise(NamedTuple):
    """The standard normal draws of one meta-step: ``codes`` ``[tasks, ways, latent]`` and ``weights``
    ``[inner_steps + 1, tasks, ways, d]`` (one per decoding). Drawn up front, so that the same draws can be
    handed to another implementation (the tests' per-task reference)."""

    codes: torch.Tensor
    weights: torch.Tensor


def gaussian(params: torch.Tensor, offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation from ``[..., 2k]`` parameters: ``exp(u) - 1 + offset``, floored at 1e-10 (the
    paper's code: a deviation near ``offset`` at ``u = 0``)."""
    mean, u = params.chunk(2, -1)
    return mean, (torch.exp(u) - (1.0 - offset)).clamp_min(1e-10)


def normal_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return -((x - mean) / std).square() / 2 - std.log() - 0.5 * math.log(2 * math.pi)


def orthogonality(weight: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between the correlation matrix of the decoder's input dims (the columns of
    its ``[out, latent]`` weight) and the identity (the paper's penalty)."""
    norms = weight.norm(dim=0, keepdim=True) + 1e-32
    corr = (weight.T @ weight) / (norms.T @ norms)
    return (corr - torch.eye(corr.shape[0], dtype=corr.dtype, device=corr.device)).square().mean()


def support_loss(z: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-task cross-entropy ``[tasks]`` of the linear classifier ``weights`` ``[tasks, ways, d]`` on ``z`` ``[tasks, n, d]``."""
    logits = z @ weights.transpose(1, 2)
    return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)


class LEO(Algorithm):
    reads_backbone_features = True
    Config = LEOConfig
    default_bn_mode = "running"  # the paper's features come from a network evaluated in eval mode
    fixed_ways = False  # codes are per class: any number of ways

    def __init__(
        self,
        backbone: nn.Module,
        ways: int,
        latent: int = 64,
        inner_steps: int = 5,
        finetune_steps: int = 5,
        inner_lr: float = 1.0,
        finetune_lr: float = 0.001,
        kl_weight: float = 0.001,
        encoder_penalty: float = 1e-9,
        orthogonality_penalty: float = 0.001,
        dropout: float = 0.3,
        second_order: bool = True,
        freeze_backbone: bool = False,
        task_kind: str = "classification",
    ) -> None:
        super().__init__(backbone, ways)
        if task_kind != "classification":
            raise ConfigError("algo=leo decodes classifier weights per class: it needs a classification dataset")
        if latent < 1 or inner_steps < 0 or finetune_steps < 0:
            raise ConfigError(f"algo.latent={latent}, algo.inner_steps={inner_steps}, algo.finetune_steps={finetune_steps}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"algo.dropout={dropout}: must be in [0, 1)")
        if freeze_backbone:
            fix_backbone(backbone, "leo")
        self.frozen = freeze_backbone
        self.inner_steps, self.finetune_steps, self.second_order = inner_steps, finetune_steps, second_order
        self.kl_weight, self.encoder_penalty, self.orthogonality_penalty = kl_weight, encoder_penalty, orthogonality_penalty
        self.dropout = dropout
        d = backbone.out_features
        self.features = d
        self.encoder = nn.Linear(d, latent)
        self.relation = nn.Sequential(
            nn.Linear(2 * latent, 2 * latent), nn.ReLU(), nn.Linear(2 * latent, 2 * latent), nn.ReLU(),
            nn.Linear(2 * latent, 2 * latent),
        )  # fmt: skip
        self.decoder = nn.Linear(latent, 2 * d, bias=False)
        self.inner_lr = nn.Parameter(torch.full((latent,), float(inner_lr)))
        self.finetune_lr = nn.Parameter(torch.full((d,), float(finetune_lr)))

    # -- the meta-learner ---------------------------------------------------------------
    def encode(self, zs: torch.Tensor, ys: torch.Tensor, ways: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-class Gaussian ``(mean, std)`` ``[tasks, ways, latent]`` of the support set."""
        e = self.encoder(zs)  # [t, n, k]
        n = e.shape[1]
        pairs = torch.cat([e.unsqueeze(2).expand(-1, -1, n, -1), e.unsqueeze(1).expand(-1, n, -1, -1)], -1)
        relations = self.relation(pairs).mean(2)  # [t, n, 2k]: example i against every example of its task
        return gaussian(prototypes(relations, ys, ways), 0.0)

    def decode(self, codes: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """Classifier weights ``[tasks, ways, d]`` from codes: the decoded Gaussian's sample (its mean without noise)."""
        ways = codes.shape[1]
        mean, std = gaussian(self.decoder(codes), math.sqrt(2.0 / (ways + self.features)))
        return mean if noise is None else mean + std * noise

    def task_losses(self, zs, ys, zq, yq, ways: int, noise: Noise | None, create_graph: bool):
        """Per task: the meta-loss terms ``(query loss, KL, encoder penalty)`` ``[tasks]`` and the query logits.

        Without ``noise`` the codes and weights are the Gaussians' means (evaluation)."""
        mean, std = self.encode(zs, ys, ways)
        if noise is None:
            codes, kl = mean, torch.zeros(zs.shape[0], dtype=zs.dtype, device=zs.device)
        else:
            codes = mean + std * noise.codes
            kl = normal_log_prob(codes, mean, std) - normal_log_prob(codes, torch.zeros_like(codes), torch.ones_like(codes))
            kl = kl.flatten(1).mean(1)
        start = codes
        weights = self.decode(codes, None if noise is None else noise.weights[0])
        for step in range(self.inner_steps):
            # tasks are independent, so the gradient of the sum is every task's own gradient
            (g,) = torch.autograd.grad(support_loss(zs, ys, weights).sum(), codes, create_graph=create_graph)
            codes = codes - self.inner_lr * g
            weights = self.decode(codes, None if noise is None else noise.weights[step + 1])
        for _ in range(self.finetune_steps):
            (g,) = torch.autograd.grad(support_loss(zs, ys, weights).sum(), weights, create_graph=create_graph)
            weights = weights - self.finetune_lr * g
        penalty = (codes.detach() - start).square().flatten(1).mean(1)
        logits = zq @ weights.transpose(1, 2)
        query = F.cross_entropy(logits.transpose(1, 2), yq, reduction="none").mean(1)
        return (query, kl, penalty), logits

    def draw_noise(self, tasks: int, ways: int, like: torch.Tensor) -> Noise:
        latent = self.inner_lr.shape[0]
        return Noise(
            torch.randn(tasks, ways, latent, dtype=like.dtype, device=like.device),
            torch.randn(self.inner_steps + 1, tasks, ways, self.features, dtype=like.dtype, device=like.device),
        )

    # -- the Algorithm interface ---------------------------------------------------------------
    def training_loss(self, batch: Episode, noise: Noise | None = None):
        """The meta-loss; ``noise`` (default: drawn here) fixes the Gaussians' draws."""
        zs, zq = episode_features(self.backbone, batch.support_x, batch.query_x, "transductive", self.frozen)
        dtype = self.encoder.weight.dtype
        zs, zq = F.dropout(zs.to(dtype), self.dropout), F.dropout(zq.to(dtype), self.dropout)
        if noise is None:
            noise = self.draw_noise(batch.num_tasks, batch.ways, zs)
        create_graph = self.second_order and torch.is_grad_enabled()
        (query, kl, penalty), logits = self.task_losses(zs, batch.support_y, zq, batch.query_y, batch.ways, noise, create_graph)
        loss = (query + self.kl_weight * kl + self.encoder_penalty * penalty).mean()
        loss = loss + self.orthogonality_penalty * orthogonality(self.decoder.weight)
        acc = accuracy(logits, batch.query_y).mean()
        return loss, {"loss": query.mean().detach(), "acc": acc.detach(), "kl": kl.mean().detach()}

    def predict_logits(self, episode: Episode, bn_mode: str) -> torch.Tensor:
        check_bn_mode(bn_mode)
        with torch.no_grad():
            zs, zq = episode_features(self.backbone, episode.support_x, episode.query_x, bn_mode, self.frozen)
        dtype = self.encoder.weight.dtype
        with torch.enable_grad():  # the inner steps' gradients (a small graph: one episode chunk's codes and weights)
            _, logits = self.task_losses(
                zs.to(dtype), episode.support_y, zq.to(dtype), episode.query_y, episode.ways, None, create_graph=False
            )
        return logits.detach()
