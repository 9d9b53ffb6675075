"""Batch norm that knows which samples of an episode it may look at.

Few-shot evaluation with batch norm is a known trap: normalising queries with
their own batch statistics (the MAML paper's choice) is transductive, and
comparisons between methods are only fair when they all use the same rule.
Every backbone uses this layer, and :func:`norm_statistics` sets the rule for
a forward pass:

* ``batch`` - statistics of the batch being forwarded (training; ``transductive`` evaluation);
* ``support`` - statistics of the first ``support_size`` samples only (the
  support set, forwarded in front of the queries), so each query is classified
  independently of the others;
* ``running`` - the running averages collected during training.

Running averages are updated only in training mode. Under ``torch.func``
transforms the algorithms pass the buffers in explicitly, so the same code
updates per-task copies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


class EpisodeBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over groups: ``tasks`` consecutive blocks of the batch are normalised separately.

    Folding the tasks of a meta-batch into one batch keeps convolutions large
    while every task still sees only its own statistics.
    """

    stats_mode: str = "batch"
    support_size: int = 0
    tasks: int = 1

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in (2, 4):
            raise ValueError(f"expected a 2-D or 4-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype and torch._C._functorch.is_functorch_wrapped_tensor(x):
            # autocast inside torch.func: batch norm's vmapped backward rejects a bf16/fp16 input with fp32
            # statistics, so it runs in fp32 there (elsewhere the native mixed-precision kernel is faster)
            return self.normalize(x.to(self.weight.dtype)).to(x.dtype)
        return self.normalize(x)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.stats_mode == "running":
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        update = self.training and self.track_running_stats
        momentum = running_momentum(self)
        rm, rv = (self.running_mean, self.running_var) if update else (None, None)
        if self.stats_mode == "batch" and self.tasks == 1:
            return F.batch_norm(x, rm, rv, self.weight, self.bias, True, momentum, self.eps)
        if self.stats_mode == "batch":
            # tasks as instances, each task's images as a spatial dim: native kernels, per-task statistics
            xt = x.view(self.tasks, -1, *x.shape[1:]).transpose(1, 2)
            y = F.instance_norm(xt, rm, rv, self.weight, self.bias, True, momentum, self.eps)
            return y.transpose(1, 2).reshape(x.shape)
        # support: each task normalised by the statistics of its first support_size samples
        xg = x.view(self.tasks, -1, *x.shape[1:])
        weight, bias = (self.weight, self.bias) if self.affine else (None, None)
        return normalize_by(xg, xg[:, : self.support_size], 2, self.eps, weight, bias).view_as(x)


def running_momentum(layer: nn.modules.batchnorm._BatchNorm) -> float:
    """The layer's momentum for running statistics (``None``, a cumulative average, is not supported: 0.1)."""
    return layer.momentum if layer.momentum is not None else 0.1


def normalize_by(x: torch.Tensor, ref: torch.Tensor, channel_dim: int, eps: float, weight=None, bias=None) -> torch.Tensor:
    """``x`` normalised per channel by the statistics of ``ref``, then the affine map if given.

    Statistics run over the samples (the dim just before ``channel_dim``) and the spatial dims after
    it; dims in front of the samples index tasks, each normalised on its own."""
    dims = [d for d in range(channel_dim - 1, x.dim()) if d != channel_dim]
    var, mean = torch.var_mean(ref, dims, correction=0, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is None:
        return y
    shape = [1] * x.dim()
    shape[channel_dim] = -1
    return y * weight.view(shape) + bias.view(shape)


#: ``eval.bn_mode`` -> the statistics a forward pass uses (the one list of modes)
BN_MODES = {"transductive": "batch", "support": "support", "running": "running"}


def check_bn_mode(bn_mode: str) -> str:
    """``bn_mode`` if it is one of :data:`BN_MODES`, else a one-line error naming them."""
    from metarun.errors import ConfigError

    if bn_mode not in BN_MODES:
        raise ConfigError(f"eval.bn_mode={bn_mode}: valid modes are {', '.join(BN_MODES)}")
    return bn_mode


@contextmanager
def norm_statistics(model: nn.Module, mode: str, support_size: int = 0, tasks: int = 1) -> Iterator[None]:
    """Use ``mode`` (``batch``, ``support`` or ``running``) in every norm layer of ``model``,
    with the batch made of ``tasks`` equal blocks normalised separately."""
    layers = [m for m in model.modules() if isinstance(m, EpisodeBatchNorm)]
    saved = [(m.stats_mode, m.support_size, m.tasks) for m in layers]
    for m in layers:
        m.stats_mode, m.support_size, m.tasks = mode, support_size, tasks
    try:
        yield
    finally:
        for m, state in zip(layers, saved, strict=True):
            m.stats_mode, m.support_size, m.tasks = state


@contextmanager
def one_task_per_call(model: nn.Module) -> Iterator[Callable[[], None]]:
    """For forwarding a batch's tasks one call each; yields ``next_task()``, to be called after each.

    A grouped call (``tasks=T``) moves the running statistics once, towards the
    mean of the tasks' batch statistics; T calls of one task would move them T
    times. Here every call starts from the statistics at entry, and on exit they
    become the mean of the per-call results: the grouped call's value, since
    the update is linear in the batch statistics. Each call updates its own
    copy (autograd keeps the buffers a call used, so they must not change).
    """
    layers = [m for m in model.modules() if isinstance(m, EpisodeBatchNorm) and m.training and m.track_running_stats]
    buffers = [(m.running_mean, m.running_var) for m in layers]
    sums = [(torch.zeros_like(mean), torch.zeros_like(var)) for mean, var in buffers]
    calls = 0

    def fresh_copies() -> None:
        for m, (mean, var) in zip(layers, buffers, strict=True):
            m.running_mean, m.running_var = mean.clone(), var.clone()

    def next_task() -> None:
        nonlocal calls
        calls += 1
        with torch.no_grad():
            for m, (sum_mean, sum_var) in zip(layers, sums, strict=True):
                sum_mean += m.running_mean
                sum_var += m.running_var
        fresh_copies()

    fresh_copies()
    try:
        yield next_task
    finally:
        with torch.no_grad():
            for m, (mean, var), (sum_mean, sum_var) in zip(layers, buffers, sums, strict=True):
                m.running_mean, m.running_var = mean, var
                if calls:
                    mean.copy_(sum_mean / calls)
                    var.copy_(sum_var / calls)


#: whether the forward passes running now will have their gradient differentiated (:func:`differentiated_twice`);
#: a context variable, so the setting belongs to the code inside the ``with`` block and nothing else
_TWICE: ContextVar[bool] = ContextVar("differentiated_twice", default=False)


@contextmanager
def differentiated_twice(enabled: bool = True) -> Iterator[None]:
    """Forward passes inside will have their gradient differentiated again (a second-order inner step)."""
    token = _TWICE.set(enabled)
    try:
        yield
    finally:
        _TWICE.reset(token)


def batch_norm(x: torch.Tensor, weight, bias, running_mean, running_var, momentum: float, eps: float) -> torch.Tensor:
    """``F.batch_norm`` with batch statistics; on a CPU, in :func:`differentiated_twice`, one whose second
    derivative is :class:`_BatchNormBackward`'s.

    PyTorch's double backward of batch norm is some twenty full-size operations that mix a bf16 input
    with fp32 statistics and weights; this one runs every full-size operation in the input's precision,
    several times faster (``docs/performance.md``). A Python function costs more per call than the
    native one, so forward passes whose gradient is taken once keep the native one.
    """
    if not _TWICE.get() or x.device.type != "cpu" or weight is None or not torch.is_grad_enabled():
        return F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)
    return _BatchNorm.apply(x, weight, bias, running_mean, running_var, momentum, eps)


class _BatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
        y, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, mean, invstd = ctx.saved_tensors
        return *_BatchNormBackward.apply(x, weight, mean, invstd, gy, ctx.eps), None, None, None, None


class _BatchNormBackward(torch.autograd.Function):
    """Batch norm's native backward, with the derivative of its outputs ``(gx, gw, gb)`` written out.

    With ``x̂ = (x - μ) r`` and per-channel sums over the ``M`` samples, the forward's backward is
    ``gx = w r (g - mean(g) - x̂ mean(g x̂))``, ``gw = Σ g x̂``, ``gb = Σ g``. For upstream
    ``(ggx, ggw, ggb)``, the derivatives are, with ``s0 = Σ ggx``, ``s1 = Σ ggx x̂`` and
    ``Q = Σ ggx (g - mean(g)) - s1 mean(g x̂)``:

    * with respect to ``g``: ``w r (ggx - mean(ggx) - x̂ s1 / M) + ggw x̂ + ggb``, the native backward
      applied to ``ggx``, plus two terms;
    * with respect to ``w``: ``r Q``;
    * with respect to ``x``: ``A g + B ggx + C1 x̂ + C0``, from the chain rule through ``x̂`` and ``r``
      (``∂x̂_j/∂x_i = r (δ_ij - 1/M - x̂_i x̂_j / M)``, ``∂r/∂x_i = -r² x̂_i / M``); the per-channel
      coefficients are below.

    Every sum comes from a native batch-norm kernel (float accumulation) or from the forward's
    backward, and every full-size operation runs in the input's precision.
    """

    @staticmethod
    def forward(ctx, x, weight, mean, invstd, gy, eps):
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            gy, x, weight, None, None, mean, invstd, True, eps, [True, True, True]
        )
        ctx.save_for_backward(x, weight, mean, invstd, gy, gw, gb)
        ctx.eps = eps
        ctx.set_materialize_grads(False)
        return gx, gw, gb

    @staticmethod
    @once_differentiable
    def backward(ctx, ggx, ggw, ggb):
        x, w, mean, r, g, gw, gb = ctx.saved_tensors
        m = x.numel() // x.shape[1]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        dtype = r.dtype  # the coefficients' precision: float32 for bf16 activations
        w, gw, gb = w.to(dtype), gw.to(dtype), gb.to(dtype)
        g_mean, gx_mean = gb / m, gw / m  # mean(g), mean(g x̂)
        xhat = F.batch_norm(x, mean, r.pow(-2) - ctx.eps, None, None, False, 0.0, ctx.eps)  # (x - μ) r, centred in float
        zero = torch.zeros_like(r)
        ggw_ = zero if ggw is None else ggw.to(dtype)
        d_g = grad_w = None
        s0 = s1 = q = zero
        if ggx is not None:
            d_g, s1, s0 = torch.ops.aten.native_batch_norm_backward(
                ggx, x, w, None, None, mean, r, True, ctx.eps, [True, True, True]
            )
            centred = torch.ops.aten.native_batch_norm_backward(
                ggx, g, None, None, None, g_mean, torch.ones_like(r), True, 0.0, [False, True, False]
            )[1]  # Σ ggx (g - mean(g))
            q = centred - s1 * gx_mean
            grad_w = r * q
        wr = w * r
        a = r * ggw_ - wr * r * s1 / m
        b = -wr * r * gx_mean
        mean_gx = ggw_ * gx_mean - 2 * wr * gx_mean * s1 / m  # mean(G x̂), G the derivative with respect to x̂
        mean_g = ggw_ * g_mean - wr * (g_mean * s1 + s0 / m * gw) / m
        c1 = -r * mean_gx - wr * r * q / m
        c0 = -r * mean_g
        low = x.dtype
        grad_x = g * a.to(low).view(shape)
        if ggx is not None:
            grad_x.addcmul_(ggx, b.to(low).view(shape))
        grad_x.addcmul_(xhat, c1.to(low).view(shape)).add_(c0.to(low).view(shape))
        if ggw is not None:
            d_g = xhat * ggw.to(low).view(shape) if d_g is None else d_g.addcmul_(xhat, ggw.to(low).view(shape))
        if ggb is not None:
            d_g = ggb.to(low).view(shape).expand_as(g).clone() if d_g is None else d_g.add_(ggb.to(low).view(shape))
        return grad_x, grad_w, None, None, d_g, None
