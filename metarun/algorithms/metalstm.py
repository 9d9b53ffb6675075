"""Meta-learner LSTM (Ravi & Larochelle 2017, Optimization as a Model for Few-Shot Learning).

The meta-learner outputs the learner's *update rule*. The learner is the
backbone + a linear head; its flattened weights are the cell state ``c`` of an
LSTM that runs coordinate-wise (one small LSTM shared by every weight). At
step ``t`` of an episode, for every coordinate:

* the learner's support loss ``L_t`` and gradient ``∇_t`` at ``c_{t-1}`` are
  preprocessed as in Andrychowicz et al. 2016 (``(log|x| / p, sign x)`` when
  ``|x| >= e^-p``, else ``(-1, e^p x)``, ``p = 10``) and fed to a first LSTM
  layer of ``hidden`` (20) units;
* its output ``h_t``, the previous weight ``c_{t-1}`` and the previous gate give
  the forget gate ``f_t = σ(W_f [h_t, c_{t-1}, f_{t-1}] + b_f)`` (a learned
  weight decay) and the input gate ``i_t = σ(W_i [h_t, c_{t-1}, i_{t-1}] + b_i)``
  (a learned learning rate);
* ``c_t = f_t ⊙ c_{t-1} − i_t ⊙ ∇_t``.

``c_0`` is the learner's initialisation, learned with the meta-learner: it is
the module's own backbone and head, so checkpoints hold it as they hold MAML's.
The gates' biases start at ``b_f`` in [4, 6] and ``b_i`` in [-5, -4] (the
paper's code): the update starts as plain gradient descent with a small step.
The meta-loss is the query loss after ``inner_steps`` updates; its gradient
flows through the unroll into the meta-learner and ``c_0`` but, as in the
paper, not through the learner's gradient and loss (inputs held constant);
``second_order=true`` keeps those paths too.

Batch norm follows the paper's code: statistics are the episode's own (the
support batch's while adapting) and queries are normalised with the support
set's statistics, in training and, by default, at test (``eval.bn_mode=support``).
Every update uses the whole support set (the paper: mini-batches of it over a
few epochs). The tasks of a meta-batch run through the functional learner's
strategies (:mod:`metarun.algorithms.learner`: grouped calls, vmap or a loop);
the meta-learner is elementwise, so it runs on a task's ``[n]`` weights or on a
grouped call's ``[tasks, n]`` alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.func import grad

from metarun.algorithms.inner_loop import Params, autograd_grad
from metarun.algorithms.learner import FunctionalLearner
from metarun.algorithms.task_batching import STRATEGIES
from metarun.data.episodes import Episode
from metarun.errors import ConfigError
from metarun.models.norm import check_bn_mode
from metarun.schema import at_least, choice

#: the preprocessing's p (Andrychowicz et al. 2016, as in the paper)
P = 10.0


def preprocess(x: torch.Tensor, p: float = P, dim: int = -1) -> torch.Tensor:
    """``[...]`` -> ``[..., 2]`` (the pair stacked at ``dim``): ``(log|x| / p, sign x)`` where ``|x| >= e^-p``, else
    ``(-1, e^p x)``."""
    big = x.abs() >= math.exp(-p)
    magnitude = torch.where(big, x.abs().clamp_min(math.exp(-p)).log() / p, -torch.ones_like(x))
    direction = torch.where(big, x.sign(), math.exp(p) * x)
    return torch.stack([magnitude, direction], dim)


# The meta-learner's state is hidden-major: ``h`` and ``cell`` are ``[..., hidden, n]`` and each of the four gates is
# a tensor of its own, so that an elementwise op on a gate reads one contiguous block; coordinate-major, with the gates
# chunked from one ``[n, 4 x hidden]`` tensor, each op reads a strided quarter of every row (``docs/performance.md``).


def gate_inputs(x, shared, h, lstm: Params) -> list[torch.Tensor]:
    """``nn.LSTMCell``'s four pre-activations ``(i, f, g, o)``, each ``[..., hidden, n]``, on inputs ``[x, shared]``:
    ``x`` ``[..., in - k, n]`` of each coordinate and ``shared`` ``[..., k, 1]`` that every coordinate has in common
    (the loss), whose share is computed once, not ``n`` times."""
    k = shared.shape[-2]
    weight_ih, weight_hh = lstm["weight_ih"], lstm["weight_hh"]
    common = (weight_ih[:, -k:] @ shared + (lstm["bias_ih"] + lstm["bias_hh"])[:, None]).chunk(4, -2)
    lead = torch.broadcast_shapes(h.shape[:-2], x.shape[:-2])  # the first step broadcasts c0's state over the tasks
    hx = torch.cat([h.expand(*lead, *h.shape[-2:]), x.expand(*lead, *x.shape[-2:])], -2)
    weights = torch.cat([weight_hh, weight_ih[:, :-k]], 1).chunk(4, 0)
    return [w @ hx + b for w, b in zip(weights, common, strict=True)]


def lstm_cell(x, shared, h, c, lstm: Params):
    """``nn.LSTMCell``'s step, functionally and hidden-major (inputs as in :func:`gate_inputs`)."""
    i, f, g, o = gate_inputs(x, shared, h, lstm)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def gate(h: torch.Tensor, c: torch.Tensor, previous: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``σ(W [h, c, previous] + b)`` for every coordinate, without concatenating the three."""
    hidden = h.shape[-2]
    return torch.sigmoid(
        (weight[:, :hidden] @ h).squeeze(-2) + c * weight[0, hidden] + previous * weight[0, hidden + 1] + bias[0]
    )


def meta_update(g, shared, h, cell, f, i, c, lstm: Params, gates: Params):
    """One step of the coordinate-wise meta-learner: ``(h, cell, f, i, c)`` after the learner's gradient ``g``
    ``[..., n]`` and its preprocessed loss ``shared`` ``[..., 2, 1]``."""
    h, cell = lstm_cell(preprocess(g, dim=-2), shared, h, cell, lstm)
    f = gate(h, c, f, gates["forget.weight"], gates["forget.bias"])
    i = gate(h, c, i, gates["input.weight"], gates["input.bias"])
    return h, cell, f, i, f * c - i * g


@torch.no_grad()
def meta_update_in_place(g, shared, h, cell, f, i, c, lstm: Params, gates: Params):
    """:func:`meta_update` where no gradient is taken (evaluation), its activations, sums and products written into
    tensors it has just made rather than into new ones: on a CPU each new ``[hidden, n]`` tensor is another pass
    over memory."""
    hidden = h.shape[-2]
    zi, zf, zg, zo = gate_inputs(preprocess(g, dim=-2), shared, h, lstm)
    cell = zf.sigmoid_().mul_(cell).addcmul_(zi.sigmoid_(), zg.tanh_())
    h = zo.sigmoid_().mul_(torch.tanh(cell))

    def gate_in_place(previous, weight, bias):
        out = (weight[:, :hidden] @ h).squeeze(-2)
        return out.addcmul_(c, weight[0, hidden]).addcmul_(previous, weight[0, hidden + 1]).add_(bias[0]).sigmoid_()

    f = gate_in_place(f, gates["forget.weight"], gates["forget.bias"])
    i = gate_in_place(i, gates["input.weight"], gates["input.bias"])
    return h, cell, f, i, (f * c).addcmul_(i, g, value=-1.0)


@dataclass
class MetaLSTMConfig:
    _target_: str = "metarun.algorithms.metalstm.MetaLSTM"
    #: learner updates per episode (training and test)
    inner_steps: int = at_least(1, 5)
    #: units of the coordinate-wise LSTM (the paper: 20)
    hidden: int = at_least(1, 20)
    #: differentiate through the learner's gradient too (the paper: no)
    second_order: bool = False
    #: how the tasks of a batch run (auto: by task size, see metarun/algorithms/task_batching.py)
    strategy: str = choice(*STRATEGIES)
    #: with vmap, this many tasks at a time (null: all at once), to bound memory
    chunk_size: Optional[int] = None


class MetaLSTM(FunctionalLearner):
    Config = MetaLSTMConfig
    default_bn_mode = "support"  # the paper's code: statistics of the episode's support set

    def __init__(
        self,
        backbone,
        ways: int,
        inner_steps: int = 5,
        hidden: int = 20,
        second_order: bool = False,
        task_kind: str = "classification",
        strategy: str = "auto",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(backbone, ways, task_kind, strategy, chunk_size)
        if inner_steps < 1 or hidden < 1:
            raise ConfigError(f"algo.inner_steps={inner_steps}, algo.hidden={hidden}: must be at least 1")
        self.inner_steps, self.hidden, self.second_order = inner_steps, hidden, second_order
        self.lstm = nn.LSTMCell(4, hidden)
        self.forget = nn.Linear(hidden + 2, 1)
        self.input = nn.Linear(hidden + 2, 1)
        with torch.no_grad():
            for p in [*self.lstm.parameters(), *self.forget.parameters(), *self.input.parameters()]:
                p.uniform_(-0.01, 0.01)
            self.forget.bias.uniform_(4.0, 6.0)  # forget gate near 1: keep the weights
            self.input.bias.uniform_(-5.0, -4.0)  # input gate near 0.01: a small gradient step
        learner = super().meta_parameters()
        self.names = [(g, k) for g in ("backbone", "head") for k in learner[g]]
        self.shapes = [learner[g][k].shape for g, k in self.names]

    def meta_parameters(self) -> Params:
        params = super().meta_parameters()
        params["lstm"] = dict(self.lstm.named_parameters())
        params["gates"] = {f"{m}.{k}": v for m in ("forget", "input") for k, v in getattr(self, m).named_parameters()}
        return params

    # -- the learner's weights as one flat cell state -----------------------------------------
    def flatten(self, learner: Params) -> torch.Tensor:
        """``{"backbone", "head"}`` -> ``[n]`` (``[tasks, n]`` in a grouped call)."""
        lead = 1 if self.in_grouped_call else 0
        return torch.cat([learner[g][k].flatten(lead) for g, k in self.names], -1)

    def unflatten(self, flat: torch.Tensor) -> Params:
        lead = flat.shape[:-1]
        parts = flat.split([s.numel() for s in self.shapes], -1)
        out: Params = {"backbone": {}, "head": {}}
        for (g, k), shape, part in zip(self.names, self.shapes, parts, strict=True):
            out[g][k] = part.reshape(*lead, *shape)
        return out

    def tasks_per_call(self, images_per_task: int, images: torch.Tensor) -> int | None:
        """One task a grouped call in a training step on a CPU: the coordinate-wise LSTM's gates, kept for the
        backward, are ``4 x hidden`` values per learner weight (36 MB a task for Conv4-64 in fp32), beyond the caches
        already, where counting images alone would put six Omniglot tasks in a call and run at 0.6x the speed
        (``docs/performance.md``). Evaluation keeps nothing for a backward, and the images' count."""
        if images.device.type == "cpu" and torch.is_grad_enabled():
            return 1
        return super().tasks_per_call(images_per_task, images)

    # -- one task (or a grouped call's tasks) ---------------------------------------------------
    def unroll(self, meta_params: Params, buffers: Params, xs, ys, xq, bn_mode: str, second_order: bool) -> torch.Tensor:
        """``inner_steps`` updates of the learner by the meta-learner on ``(xs, ys)``, then the outputs on ``xq``."""
        lstm, gates = meta_params["lstm"], meta_params["gates"]
        c = self.flatten(self.per_task({"backbone": meta_params["backbone"], "head": meta_params["head"]}))
        h = cell = torch.zeros(*c.shape[:-1], self.hidden, c.shape[-1], dtype=c.dtype, device=c.device)
        f = i = torch.zeros_like(c)
        inner = self.inner_mode(bn_mode)

        def support_loss(flat):
            loss = self.loss(self.predict(self.unflatten(flat), buffers, xs, inner), ys)[0]
            # the sum: every task of a grouped call gets its own gradient; the loss, an input of the meta-learner, is a
            # constant unless second order
            return loss.sum(), loss if second_order else loss.detach()

        take_grad = (
            autograd_grad(support_loss, has_aux=True, create_graph=second_order)
            if self.in_grouped_call
            else grad(support_loss, has_aux=True)
        )
        for _ in range(self.inner_steps):
            g, loss = take_grad(c)
            if not second_order:
                g = g.detach()  # the paper's simplification: the learner's gradient is an input, not a function of c
            # the meta-learner in the weights' own precision, not autocast's: its products ([n, 4] x [4, 4 hidden]) are
            # memory-bound, so bf16 only adds conversions, and would round the gates that scale every update
            with torch.autocast(c.device.type, enabled=False):
                # the inputs: each coordinate's preprocessed gradient, and the task's preprocessed loss that all share
                shared = preprocess(loss.to(c.dtype).unsqueeze(-1), dim=-2)  # [..., 2, 1]; g is already in c's dtype
                # in place without gradients; not under vmap, which has no batching rule for addcmul_
                in_place = not torch.is_grad_enabled() and not torch._C._functorch.is_functorch_wrapped_tensor(g)
                update = meta_update_in_place if in_place else meta_update
                h, cell, f, i, c = update(g, shared, h, cell, f, i, c, lstm, gates)
        fast = self.unflatten(c)
        return self.head_forward(fast, self.embed_query(fast, buffers, xs, xq, bn_mode))

    def task_meta_gradient(self, meta_params: Params, fixed: Params, stats: Params, xs, ys, xq, yq):
        buffers = {**fixed, **stats}

        def meta_loss(mp):
            loss, score = self.loss(self.unroll(mp, buffers, xs, ys, xq, "support", self.second_order), yq)
            return loss.mean(), (loss.detach(), score.detach())

        grads, (loss, score) = self.grad(meta_loss, has_aux=True)(meta_params)
        return (self.as_per_task(grads), loss, score), stats

    # -- the Algorithm interface (its meta-step is FunctionalLearner.training_loss) ---------------------
    def predict_logits(self, episode: Episode, bn_mode: str) -> torch.Tensor:
        check_bn_mode(bn_mode)
        params = self.detached(self.meta_parameters())

        def task_outputs(mp, fixed, stats, xs, ys, xq):
            return self.unroll(mp, {**fixed, **stats}, xs, ys, xq, bn_mode, False), stats

        with torch.no_grad():
            tasks = (episode.support_x, episode.support_y, episode.query_x)
            return self.run_tasks(task_outputs, (params,), tasks, episode.support_x.shape[1] + episode.query_x.shape[1])
