"""Matching networks (Vinyals et al. 2016).

A query is classified by attention over the support set: a softmax over the
cosine similarities between its embedding and every support embedding, the
support labels (one-hot) summed with those weights. The loss is the negative
log of the probability this mixture gives the true class; for it the logits
are, per class, the log-sum-exp of the similarities to that class's support
images, whose softmax is exactly the mixture.

``fce=true`` adds the full-context embeddings of the paper's appendix on top
of the backbone's embeddings g' and f': the support set's
``g(x_i) = h_fwd_i + h_bwd_i + g'(x_i)`` through a bidirectional LSTM over the
support set (in the episode's order, by class), and each query's
``f(x) = attLSTM(f'(x), g(S), K)``: ``fce_steps`` (K) steps of an LSTM whose
input is ``f'(x)`` and whose state is ``[h_{k-1}, r_{k-1}]`` with the read-out
``r_{k-1} = sum_i softmax(h_{k-1}^T g(x_i)) g(x_i)``, and
``h_k = h^_k + f'(x)``. The paper leaves the first state open: here
``h_0 = f'(x)`` (the residual alone) and ``c_0 = 0``. A query's f depends on
the support set and on itself only, never on the other queries.

Tasks are batched: embeddings are ``[tasks, n, d]`` tensors, the LSTMs run over
every task's support set and every query of every task at once, and the
backbone normalises each task with its own statistics
(:func:`metarun.algorithms.task_batching.fold_features`; in training, support
and query each with their own batch statistics). On a CPU a training step
runs task by task (:func:`~metarun.algorithms.base.loss_task_by_task`): as
fast as grouped calls, holding one task's activations instead of the
meta-batch's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metarun.algorithms.base import Algorithm, accuracy, loss_task_by_task
from metarun.algorithms.task_batching import fold_features
from metarun.data.episodes import Episode
from metarun.errors import ConfigError
from metarun.models.norm import check_bn_mode
from metarun.schema import at_least


def attention_logits(
    query: torch.Tensor, support: torch.Tensor, labels: torch.Tensor, ways: int, scale: float = 1.0
) -> torch.Tensor:
    """``[tasks, q, d]`` and ``[tasks, n, d]`` embeddings -> ``[tasks, q, ways]`` logits whose softmax is the
    cosine-attention mixture of the support labels: per class, the log-sum-exp of its support similarities
    (times ``scale``, the attention softmax's inverse temperature)."""
    cosine = scale * F.normalize(query, dim=-1) @ F.normalize(support, dim=-1).transpose(1, 2)  # [t, q, n]
    member = F.one_hot(labels, ways).bool()[:, None]  # [t, 1, n, ways]
    return cosine[..., None].masked_fill(~member, float("-inf")).logsumexp(2)


class FullContext(nn.Module):
    """The full-context embeddings g(x_i, S) and f(x, S) of a task's support set and queries (see the module doc)."""

    def __init__(self, dim: int, steps: int) -> None:
        super().__init__()
        self.steps = steps
        self.support_lstm = nn.LSTM(dim, dim, batch_first=True, bidirectional=True)
        # input [f'(x), r_{k-1}] with hidden state h_{k-1}: the paper's LSTM(f'(x), [h_{k-1}, r_{k-1}], c_{k-1})
        self.query_cell = nn.LSTMCell(2 * dim, dim)

    def support(self, g: torch.Tensor) -> torch.Tensor:
        """``[tasks, n, d]`` -> g(x_i, S): both directions' hidden states plus the embedding itself."""
        h, _ = self.support_lstm(g)
        forward, backward = h.chunk(2, dim=-1)
        return g + forward + backward

    def query(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``[tasks, q, d]`` query embeddings, ``[tasks, n, d]`` g(S) -> f(x, S), each query on its own."""
        t, q, d = f.shape
        h, c = f, torch.zeros_like(f)
        for _ in range(self.steps):
            read = torch.softmax(h @ g.transpose(1, 2), -1) @ g  # r_{k-1}, [t, q, d]
            h_hat, c = self.query_cell(torch.cat([f, read], -1).reshape(t * q, 2 * d), (h.reshape(t * q, d), c.reshape(t * q, d)))
            h, c = h_hat.view(t, q, d) + f, c.view(t, q, d)
        return h


@dataclass
class MatchingConfig:
    _target_: str = "metarun.algorithms.matching.MatchingNet"
    #: full-context embeddings (the paper's appendix): a bidirectional LSTM over the support set, an attention LSTM per query
    fce: bool = False
    #: read steps K of the queries' attention LSTM (with fce)
    fce_steps: int = at_least(1, 5)
    #: inverse temperature of the attention softmax over cosine similarities. The paper's is 1: with cosines in
    #: [-1, 1] a 20-way softmax can put at most 28% on one class, its gradients fade and Omniglot-small
    #: training stalled (README); 10 is the cosine scale Baseline++ (algo=finetune head=cosine) uses
    scale: float = at_least(0.0, 10.0)


class MatchingNet(Algorithm):
    reads_backbone_features = True
    Config = MatchingConfig
    channels_last_pays = True  # its convolutions are shared by all tasks of a call
    default_bn_mode = "running"  # an ordinary network at test time, and no query sees another (with or without fce)

    def __init__(
        self,
        backbone: nn.Module,
        ways: int,
        fce: bool = False,
        fce_steps: int = 5,
        scale: float = 10.0,
        task_kind: str = "classification",
    ) -> None:
        super().__init__(backbone, ways)
        self.scale = scale
        if task_kind != "classification":
            raise ConfigError("algo=matching classifies by attention over the support labels: it needs a classification dataset")
        if fce_steps < 1:
            raise ConfigError(f"algo.fce_steps={fce_steps}: must be at least 1")
        dim = getattr(backbone, "out_features", None)
        if fce and dim is None:
            raise ConfigError(
                "algo.fce=true sizes its LSTMs by the backbone's out_features, which this backbone does not declare"
            )
        self.context = FullContext(dim, fce_steps) if fce else None

    def logits(self, episode: Episode, bn_mode: str) -> torch.Tensor:
        g, f = fold_features(self.backbone, episode.support_x, episode.query_x, bn_mode)
        # the head in at least fp32: it is small next to the backbone, and autocast would run the LSTMs in bf16
        dtype = torch.promote_types(g.dtype, torch.float32)
        with torch.autocast(g.device.type, enabled=False):
            g, f = g.to(dtype), f.to(dtype)
            if self.context is not None:
                g = self.context.support(g)
                f = self.context.query(f, g)
            return attention_logits(f, g, episode.support_y, episode.ways, self.scale)

    def training_loss(self, batch: Episode):
        return loss_task_by_task(self, batch, self.tasks_loss)

    def tasks_loss(self, batch: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.logits(batch, "transductive")  # batch statistics: support and query each their own
        return F.cross_entropy(logits.flatten(0, 1), batch.query_y.flatten()), accuracy(logits, batch.query_y).mean()

    @torch.inference_mode()
    def predict_logits(self, episode: Episode, bn_mode: str) -> torch.Tensor:
        return self.logits(episode, check_bn_mode(bn_mode))
