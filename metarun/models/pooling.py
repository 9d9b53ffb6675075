"""Max-pooling that runs torch's fast kernel on a CPU whatever the activations' memory layout.

Torch's NCHW max-pool kernel on a CPU is several times slower than its channels_last one, even
counting the copy into channels_last (``docs/performance.md``, ``max_pool2d``); Conv4's pooling layers
(:class:`MaxPool2d`) and the grouped networks of :mod:`metarun.models.grouped` go through
:func:`max_pool2d`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` whose forward is :func:`max_pool2d`: same values and gradients, faster on a CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_pool2d(x, self)


def channels_last(x: torch.Tensor) -> bool:
    """Whether a 4-d ``x`` is laid out channels_last (and not also NCHW, as a one-channel or 1x1 tensor is)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def max_pool2d(x: torch.Tensor, m: nn.MaxPool2d) -> torch.Tensor:
    """``m(x)``, with the forward of an NCHW ``x`` run by the channels_last kernel on a CPU.

    There torch's NCHW max-pool kernel is several times slower than its channels_last one, even
    counting the copy into channels_last. Both kernels pick the same maxima, and the backward is the
    native NCHW one, so values and gradients (of every order) are unchanged. Where no gradient will be
    taken (a query forward of several tasks a call; one task runs channels_last throughout, see
    :func:`metarun.models.grouped.grouped_forward`) the kernel runs without indices, which is cheaper.
    """
    # under torch.func transforms (vmap, grad: the MAML family's vmap and loop strategies) torch's own op,
    # which they know how to batch and differentiate
    functorch = torch._C._are_functorch_transforms_active()
    if functorch or x.device.type != "cpu" or x.dim() != 4 or channels_last(x):
        return F.max_pool2d(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
    if not (torch.is_grad_enabled() and x.requires_grad):
        y = F.max_pool2d(_channels_last_planes(x), m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
        return y.contiguous().view(*x.shape[:2], *y.shape[2:])
    args = [_pair(v) for v in (m.kernel_size, m.stride if m.stride is not None else m.kernel_size, m.padding, m.dilation)]
    return _MaxPoolChannelsLast.apply(x, *args, m.ceil_mode)


#: channels per image in the layout the channels_last pooling kernel gets
POOL_CHANNELS = 128


def _channels_last_planes(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[n, c, h, w]`` as a channels_last ``[n * c / g, g, h, w]``, ``g = gcd(c, POOL_CHANNELS)``.

    A grouped call has ``tasks * channels`` channels, and with thousands of them both the copy into
    channels_last and the kernel slow down. Pooling treats every plane alone, so planes can be
    regrouped freely into images of ``POOL_CHANNELS`` channels, where both run well.
    """
    return x.reshape(-1, math.gcd(x.shape[1], POOL_CHANNELS), *x.shape[2:]).contiguous(memory_format=torch.channels_last)


def _pair(v) -> list[int]:
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


class _MaxPoolChannelsLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation, ceil_mode):
        y, indices = torch.ops.aten.max_pool2d_with_indices(
            _channels_last_planes(x), kernel, stride, padding, dilation, ceil_mode
        )
        shape = (*x.shape[:2], *y.shape[2:])
        indices = indices.contiguous().view(shape)  # offsets within each plane, whatever the planes' grouping
        ctx.save_for_backward(x, indices)
        ctx.args = (kernel, stride, padding, dilation, ceil_mode)
        return y.contiguous().view(shape)

    @staticmethod
    def backward(ctx, grad):
        # differentiable (autograd records the native op when a second-order gradient is being built)
        x, indices = ctx.saved_tensors
        return torch.ops.aten.max_pool2d_with_indices_backward(grad, x, *ctx.args, indices), None, None, None, None, None
