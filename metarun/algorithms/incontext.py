"""In-context learning: a Transformer reads the episode and outputs each query's class (SNAIL, Mishra et al.
2018; CAML, Fifty et al. 2024).

The meta-learner is a sequence model whose input is the task itself: one token
per support image, its backbone features projected to ``d_model - d_model // 2``
and concatenated with a learned embedding of its label (``d_model // 2``), and
one per query image, with the embedding of an "unknown" label. A Transformer
encoder of ``layers`` pre-norm layers reads them; each query's output token,
mapped to the label-embedding space, is scored against the embedding of each
class of the episode. There is no inner loop and no second-order gradient:
adaptation is the forward pass. The first layer starts as a matcher
(:meth:`InContext.start_as_matching`).

Each query attends to the support tokens and to itself only, and support
tokens to support tokens only (an attention mask over one ``[support + query]``
sequence per task), so no query sees another: the prediction for a query does
not depend on the other queries (not transductive), as in CAML. The tokens
carry no position, so the order of the support set does not matter.

Labels: the model has ``max_ways`` label embeddings. Each
training task maps its classes to a random subset of them, so every embedding
is trained and any number of ways up to ``max_ways`` can be evaluated,
whatever ``task.ways`` was in training; at evaluation class ``c`` uses
embedding ``c``. The backbone trains jointly by default; ``trainer.init_from`` and
``algo.freeze_backbone`` start from, or keep, a pre-trained one (CAML's frozen
feature extractor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metarun.algorithms.base import Algorithm, accuracy
from metarun.algorithms.pretrained_init import episode_features, fix_backbone
from metarun.data.episodes import Episode
from metarun.errors import ConfigError
from metarun.models.norm import check_bn_mode
from metarun.schema import at_least


@dataclass
class InContextConfig:
    _target_: str = "metarun.algorithms.incontext.InContext"
    #: width of the tokens and of the Transformer
    d_model: int = at_least(1, 128)
    #: Transformer encoder layers
    layers: int = at_least(1, 2)
    #: attention heads per layer (must divide d_model)
    heads: int = at_least(1, 4)
    #: dropout inside the Transformer
    dropout: float = at_least(0.0, 0.0)
    #: label embeddings: the most ways an episode may have, in training or evaluation
    max_ways: int = at_least(1, 20)
    #: keep the (pre-trained) backbone fixed; needs trainer.init_from (or published weights)
    freeze_backbone: bool = False


def attention_mask(support: int, query: int, device: torch.device | None = None) -> torch.Tensor:
    """``[n, n]`` boolean, True where attention is blocked: support tokens see the support set, a query token
    sees the support set and itself."""
    n = support + query
    key = torch.arange(n, device=device)
    allowed = (key[None, :] < support) | (key[None, :] == key[:, None])
    return ~allowed


class InContext(Algorithm):
    reads_backbone_features = True
    Config = InContextConfig
    default_bn_mode = "running"  # as ProtoNet: the backbone is an ordinary network, evaluated in eval mode
    fixed_ways = False  # any number of ways up to max_ways

    def __init__(
        self,
        backbone: nn.Module,
        ways: int,
        d_model: int = 128,
        layers: int = 2,
        heads: int = 4,
        dropout: float = 0.0,
        max_ways: int = 20,
        freeze_backbone: bool = False,
        task_kind: str = "classification",
    ) -> None:
        super().__init__(backbone, ways)
        if task_kind != "classification":
            raise ConfigError("algo=incontext predicts a query's class from labelled examples: it needs a classification dataset")
        if d_model < 1 or heads < 1 or layers < 1 or d_model % heads:
            raise ConfigError(
                f"algo.d_model={d_model}, algo.heads={heads}, algo.layers={layers}: d_model must be a positive multiple of heads"
            )
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"algo.dropout={dropout}: must be in [0, 1)")
        if ways > max_ways:
            raise ConfigError(f"task.ways={ways} but algo.max_ways={max_ways}: raise algo.max_ways to at least {ways}")
        if freeze_backbone:
            fix_backbone(backbone, "incontext")
        self.frozen = freeze_backbone
        self.max_ways = max_ways
        label_dim = d_model // 2
        # a token is [projected feature, label embedding]: concatenated, not added, so that attention can match
        # features while the values carry labels (CAML's layout)
        self.project = nn.Linear(backbone.out_features, d_model - label_dim)
        self.labels = nn.Embedding(max_ways + 1, label_dim)  # the last one: a query's unknown label
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False)
        # a query's output token is read out in label-embedding space and scored against each class's embedding
        self.readout = nn.Linear(d_model, label_dim)
        self.start_as_matching(d_model - label_dim)

    @torch.no_grad()
    def start_as_matching(self, feature_dim: int) -> None:
        """Adds to the first layer's random initialisation queries and keys that compare the feature parts and values
        that carry the label parts, and a read-out of the label part: at the start a query already leans towards the
        labels of the support tokens most like it. From the plain initialisation, 300 steps on glyphs stayed at
        chance (the long plateau sequence models are known to sit on before they learn to copy labels)."""
        d = self.labels.embedding_dim + feature_dim
        attn = self.encoder.layers[0].self_attn
        eye = torch.eye(d)
        # (queries and keys scaled down by 0.5 or 0.3, for a softer start, learned no faster on glyphs)
        attn.in_proj_weight[:d, :feature_dim] += torch.eye(d, feature_dim)  # queries: the feature part
        attn.in_proj_weight[d : 2 * d, :feature_dim] += torch.eye(d, feature_dim)  # keys: the feature part
        attn.in_proj_weight[2 * d :, feature_dim:] += eye[:, feature_dim:]  # values: the label part
        attn.out_proj.weight += eye
        self.readout.weight[:, feature_dim:] += torch.eye(d - feature_dim)
        self.labels.weight[-1] = 0.0  # the unknown label: no pull towards any class's embedding

    def logits(self, zs: torch.Tensor, ys: torch.Tensor, zq: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``[tasks, q, ways]`` logits from support features ``[tasks, s, d]`` with labels ``[tasks, s]`` and query
        features ``[tasks, q, d]``; ``ids`` ``[tasks, ways]`` is the label embedding each class of a task uses."""
        ns, nq = zs.shape[1], zq.shape[1]
        dtype = self.project.weight.dtype
        unknown = self.labels.weight[self.max_ways].expand(*zq.shape[:2], -1)
        support = torch.cat([self.project(zs.to(dtype)), self.labels(ids.gather(1, ys))], -1)
        query = torch.cat([self.project(zq.to(dtype)), unknown], -1)
        out = self.encoder(torch.cat([support, query], 1), mask=attention_mask(ns, nq, zs.device))[:, ns:]
        return self.readout(out) @ self.labels(ids).transpose(1, 2)

    def check_ways(self, ways: int) -> None:
        if ways > self.max_ways:
            raise ConfigError(f"a {ways}-way episode but algo.max_ways={self.max_ways}: train with algo.max_ways>={ways}")

    def training_loss(self, batch: Episode):
        self.check_ways(batch.ways)
        zs, zq = episode_features(self.backbone, batch.support_x, batch.query_x, "transductive", self.frozen)
        t = batch.num_tasks
        # every task its own random choice of label embeddings, so that all max_ways of them are trained
        ids = torch.rand(t, self.max_ways, device=zs.device).argsort(1)[:, : batch.ways]
        logits = self.logits(zs, batch.support_y, zq, ids)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch.query_y.flatten())
        return loss, {"loss": loss.detach(), "acc": accuracy(logits, batch.query_y).mean().detach()}

    @torch.no_grad()
    def predict_logits(self, episode: Episode, bn_mode: str) -> torch.Tensor:
        check_bn_mode(bn_mode)
        self.check_ways(episode.ways)
        zs, zq = episode_features(self.backbone, episode.support_x, episode.query_x, bn_mode, self.frozen)
        ids = torch.arange(episode.ways, device=zs.device).expand(episode.num_tasks, -1)
        return self.logits(zs, episode.support_y, zq, ids)
