"""A sequential backbone run for many tasks at once, each with its own weights, as one network.

MAML-style inner loops give every task its own copy of the weights. Under
``torch.func.vmap`` those per-task convolutions become grouped convolutions
whose batch dimension vmap moves around between operations; on a CPU the
elementwise work of batch norm's double backward on such strided tensors
then costs more than the convolutions. Here the tasks are laid out as channel
groups from the start: activations are ``[n, tasks * channels, h, w]``,
convolutions are grouped with ``groups=tasks``, batch norm over ``tasks *
channels`` channels gives every task its own statistics, and a linear layer
is one batched matrix product. Every operation is an ordinary contiguous
kernel, and since no ``vmap`` is involved, autograd through it (second-order
MAML) is exact.

Only backbones that are a plain sequence of the layers below (Conv4, MLP)
can be grouped; :func:`grouped_layers` says which, and the algorithms fall
back to ``vmap`` or a loop for the others (ResNet-12's residual blocks).

The measurements behind the CPU paths below are in ``docs/performance.md``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metarun.device import compute_dtype
from metarun.models.norm import EpisodeBatchNorm, batch_norm, normalize_by, running_momentum
from metarun.models.pooling import max_pool2d

SUPPORTED = (nn.Conv2d, EpisodeBatchNorm, nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.Linear)


def grouped_layers(backbone: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """``(name, layer)`` of a backbone whose forward is ``self.features(x)`` made of supported layers, else None.

    A ReLU followed by a max-pool is run after it: the two commute exactly (values, and gradients of
    any order, since ReLU passes a gradient only where its output is positive), and the ReLU then
    acts on a quarter of the elements.
    """
    features = getattr(backbone, "features", None)
    if not getattr(backbone, "sequential", False) or not isinstance(features, nn.Sequential):
        return None
    layers = [(f"features.{name}", m) for name, m in features.named_modules() if name and not isinstance(m, nn.Sequential)]
    for _, m in layers:
        if not isinstance(m, SUPPORTED) or (isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros")):
            return None
        if isinstance(m, nn.Flatten) and (m.start_dim, m.end_dim) != (1, -1):
            return None
    for i in range(len(layers) - 1):
        if isinstance(layers[i][1], nn.ReLU) and isinstance(layers[i + 1][1], nn.MaxPool2d):
            layers[i], layers[i + 1] = layers[i + 1], layers[i]
    return layers


def _each(t: torch.Tensor, tasks: int, dims: int) -> torch.Tensor:
    """``[tasks, *shape]``: ``t`` as it is when already per task, else (``dims``-dimensional, shared) repeated."""
    return t.expand(tasks, *t.shape) if t.dim() == dims else t


def _per_task(t: torch.Tensor, tasks: int, dims: int) -> torch.Tensor:
    """Every task's copy of ``t`` stacked along its first dim, ``[tasks * shape[0], ...]``: grouped-conv weights, channels."""
    return _each(t, tasks, dims).flatten(0, 1)


def grouped_forward(
    layers: list[tuple[str, nn.Module]],
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    x: torch.Tensor,
    mode: str,
    support_size: int = 0,
    update_stats: bool = False,
) -> torch.Tensor:
    """Features ``[tasks, n, d]`` of ``x = [tasks, n, *sample]``.

    ``params``/``buffers`` use the backbone's names; each tensor has a leading
    ``tasks`` dimension (its own per task) or not (shared). ``mode`` is the
    norm layers' statistics rule (``batch``, ``support``, ``running``; see
    :mod:`metarun.models.norm`); with ``update_stats`` the per-task running
    statistics are updated in place, as a training forward would.
    """
    tasks, n = x.shape[:2]
    h = x.transpose(0, 1).flatten(1, 2) if x.dim() > 3 else x.transpose(0, 1)  # [n, tasks * c, ...] or [n, tasks, d]
    channels_last = runs_channels_last(h, tasks)
    if channels_last:  # so that the first convolution's output is too (one-channel images already are both layouts)
        h = h.contiguous(memory_format=torch.channels_last)
    folded = None  # the norm layer folded into the convolution before it
    for i, (name, m) in enumerate(layers):
        if name == folded:
            continue
        if isinstance(m, nn.Conv2d) and i + 1 < len(layers) and folds_into(h, m, layers[i + 1][1]):
            folded = layers[i + 1][0]
            w, b = folded_weights(
                h, conv=m, norm=layers[i + 1][1], conv_name=name, norm_name=folded, params=params, buffers=buffers,
                tasks=tasks, mode=mode, support_size=support_size, update_stats=update_stats,
            )  # fmt: skip
            params = {**params, f"{name}.weight": w, f"{name}.bias": b}
        if isinstance(m, nn.Conv2d) and channels_last and h.shape[1] == 1:
            h = images_conv2d_channels_last(h, _per_task(params[f"{name}.weight"], 1, 4), _bias(params, name), m)
        elif isinstance(m, nn.Conv2d):
            h = _conv(h, params[f"{name}.weight"], params.get(f"{name}.bias"), m, tasks)
            if channels_last:
                h = h.contiguous(memory_format=torch.channels_last)
        elif isinstance(m, nn.Linear):
            w, b = params[f"{name}.weight"], params.get(f"{name}.bias")
            h = torch.einsum("ntd,tkd->ntk", h, _each(w, tasks, 2))
            if b is not None:
                h = h + b
        elif isinstance(m, EpisodeBatchNorm):
            h = _norm(m, name, params, buffers, h, tasks, mode, support_size, update_stats)
        elif isinstance(m, nn.ReLU):
            h = F.relu(h)
        elif isinstance(m, nn.MaxPool2d):
            h = max_pool2d(h, m)  # a channels_last h keeps torch's own kernel and layout
        else:  # Flatten: [n, tasks * c, h, w] -> [n, tasks, c * h * w]
            h = h.reshape(n, tasks, -1)
    return h.transpose(0, 1)


def runs_channels_last(h: torch.Tensor, tasks: int) -> bool:
    """Whether a grouped call of ``h = [n, tasks * c, height, width]`` runs channels_last.

    One task a call on a CPU is a plain network, which runs faster channels_last: without gradients
    (evaluation's query forward) always, and with them for images of several channels (miniImageNet's
    tasks, which go one a call: meta-steps 1.4-1.8x in fp32). Omniglot's one-channel images with
    gradients, and every grouped call of several tasks, ran slower so (docs/performance.md).
    """
    if h.device.type != "cpu" or h.dim() != 4 or tasks != 1:
        return False
    return not torch.is_grad_enabled() or h.shape[1] > 1


def folds_into(h: torch.Tensor, conv: nn.Conv2d, norm: nn.Module) -> bool:
    """Whether ``norm`` folds into ``conv`` (:func:`folded_weights`): single-channel images on a CPU, where
    gradients will be taken."""
    images = conv.in_channels == 1 and not h.requires_grad
    return isinstance(norm, EpisodeBatchNorm) and images and h.device.type == "cpu" and torch.is_grad_enabled()


def folded_weights(
    h: torch.Tensor,
    *,
    conv: nn.Conv2d,
    norm: EpisodeBatchNorm,
    conv_name: str,
    norm_name: str,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    tasks: int,
    mode: str,
    support_size: int,
    update_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task weights ``[tasks, c, cin, kh, kw]`` and bias ``[tasks, c]`` of ``conv`` followed by ``norm``, as one convolution.

    The convolution's output is linear in each image patch, so its per-task batch statistics follow from
    the patches' mean and covariance: ``mu = w.m + b``, ``var = w' S w``. Batch norm's affine map after the
    normalisation then folds into the weights: ``w * gamma / sqrt(var + eps)``, and a bias. For Omniglot's
    first layer (9 taps) the covariance is a few thousand flops a task, and the batch norm's passes over
    the largest activation of the network (``[n, tasks * 64, 28, 28]``), forward and backward (and its
    double backward in a second-order step), are gone; gradients flow through the small tensors here,
    exactly (the conv bias, which the normalisation cancels, gets a gradient of exactly 0). Forwards
    without gradients keep the batch norm, and so do 3-channel images, where the patches' covariance
    costs more than it saves (:func:`folds_into`).
    """
    w = _each(params[f"{conv_name}.weight"], tasks, 4)
    c = w.shape[1]
    dtype = torch.promote_types(w.dtype, torch.float32)  # statistics at least in float, as batch norm's
    b = params.get(f"{conv_name}.bias")
    b = None if b is None else _each(b, tasks, 1).to(dtype)
    device = h.device.type
    if torch.is_autocast_enabled(device):  # the images as the convolution gets them: rounded by autocast
        h = h.to(torch.get_autocast_dtype(device))
    with torch.autocast(device, enabled=False):
        w3 = w.reshape(tasks, c, -1).to(dtype)
        if mode == "running":
            mean = _each(buffers[f"{norm_name}.running_mean"], tasks, 1).to(dtype)
            var = _each(buffers[f"{norm_name}.running_var"], tasks, 1).to(dtype)
        else:
            images = h[:support_size] if mode == "support" else h
            n = images.shape[0]
            patches = F.unfold(images.to(dtype), conv.kernel_size, conv.dilation, conv.padding, conv.stride)
            patches = patches.view(n, tasks, w3.shape[2], -1).permute(1, 2, 0, 3).flatten(2)  # [tasks, taps, n * positions]
            count = patches.shape[2]
            m = patches.mean(2, keepdim=True)
            centred = patches - m
            mean = (w3 @ m).squeeze(-1)  # of the convolution's output
            if b is not None:
                mean = mean + b
            var = ((w3 @ (centred @ centred.transpose(1, 2) / count)) * w3).sum(-1)
            if update_stats and norm.track_running_stats:
                with torch.no_grad():
                    momentum = running_momentum(norm)
                    for key, value in (("running_mean", mean), ("running_var", var * count / max(count - 1, 1))):
                        buf = buffers[f"{norm_name}.{key}"]
                        buf.copy_(((1 - momentum) * buf.view(tasks, c) + momentum * value).view(buf.shape))
        # what the normalisation subtracts from w.x; with batch statistics the conv bias cancels out of it
        # (written so that the bias stays in the graph, with a gradient of exactly 0)
        shift = mean if b is None else mean - b
        gamma, beta = (_each(params[f"{norm_name}.{k}"], tasks, 1) for k in ("weight", "bias")) if norm.affine else (1, 0)
        scale = torch.rsqrt(var + norm.eps) * gamma
        return (w3 * scale[..., None]).view(w.shape), beta - shift * scale


def _bias(params, name: str) -> torch.Tensor | None:
    b = params.get(f"{name}.bias")
    return None if b is None else _per_task(b, 1, 1)


def images_conv2d_channels_last(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, m: nn.Conv2d) -> torch.Tensor:
    """``m``'s convolution of single-channel images into a channels_last output, as one product of the
    unfolded images with the weights (evaluation's query forward of one task).

    The native kernel's output for one input channel is NCHW, and copying it into channels_last took
    as long as the convolution itself.
    """
    cols, weights, size = _unfold_images(x, w, b, m.stride, m.padding, m.dilation, 1)
    y = torch.matmul(cols.transpose(2, 3), weights.transpose(1, 2))  # [n, 1, positions, out channels]
    return y.view(x.shape[0], *size, w.shape[0]).permute(0, 3, 1, 2)


def _unfold_images(x, w, b, stride, padding, dilation, groups):
    """``x``'s neighbourhoods under ``w``'s kernel, ``[n, groups, taps (+1), positions]``, and the weights,
    ``[groups, out channels per group, taps (+1)]``, in the compute dtype (autocast's), with the bias as
    a row of ones, so that each output is summed and rounded once; and the output's spatial size."""
    dtype = compute_dtype(w)
    n, size = (
        x.shape[0],
        tuple(
            (length + 2 * p - d * (k - 1) - 1) // s + 1
            for length, k, s, p, d in zip(x.shape[2:], w.shape[2:], stride, padding, dilation, strict=True)
        ),
    )
    positions = size[0] * size[1]
    cols = F.unfold(x.to(dtype), w.shape[2:], dilation, padding, stride).view(n, groups, -1, positions)
    weights = w.to(dtype).view(groups, -1, cols.shape[2])
    if b is not None:
        cols = torch.cat([cols, cols.new_ones(n, groups, 1, positions)], 2)
        weights = torch.cat([weights, b.to(dtype).view(groups, -1, 1)], 2)
    return cols, weights, size


def _conv(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, m: nn.Conv2d, tasks: int) -> torch.Tensor:
    if w.dim() == 4:
        # Weights shared by every task (ANIL's backbone): one ordinary convolution of the n * tasks images,
        # whose output is already [n, tasks * c, h, w], and faster than grouped convolutions. Weights with
        # NCHW strides keep the output in that layout under a channels_last model (``contiguous()`` is not
        # enough: a one-channel weight counts as contiguous in either layout).
        n = h.shape[0]
        w = w.clone(memory_format=torch.contiguous_format)
        y = F.conv2d(h.reshape(n * tasks, -1, *h.shape[2:]), w, b, m.stride, m.padding, m.dilation)
        return y.view(n, -1, *y.shape[2:])
    return conv2d(h, _per_task(w, tasks, 4), None if b is None else _per_task(b, tasks, 1), m, tasks)


def conv2d(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, m: nn.Conv2d, groups: int) -> torch.Tensor:
    """``m``'s convolution, grouped by task; on a CPU, that of single-channel images (Omniglot's first layer)
    with the weight gradient of :class:`_ConvOfImages`, which beats the native kernel there; with 3 channels
    (miniImageNet's) it does not, so those keep the native one."""
    images = x.device.type == "cpu" and groups > 1 and w.shape[1] == 1 and not x.requires_grad
    if images and torch.is_grad_enabled() and w.requires_grad:
        return _ConvOfImages.apply(x, w, b, m.stride, m.padding, m.dilation, groups)
    return F.conv2d(x, w, b, m.stride, m.padding, m.dilation, groups)


class _ConvOfImages(torch.autograd.Function):
    """A grouped convolution of an input that needs no gradient, as one batched matrix product of each
    task's weights with the unfolded input, and the weight gradient as one of the output gradient with it.

    On a CPU, oneDNN's grouped weight-gradient kernel is slow for Conv4's first layer (one input
    channel per task; six calls of it in a second-order MAML step). The forward as a product (the bias
    as a row of ones, so that the sum is rounded once) unfolds the input once for both passes. The
    backward is written in differentiable operations, so a second-order gradient flows through it as
    through the native one.
    """

    @staticmethod
    def forward(ctx, x, w, b, stride, padding, dilation, groups):
        cols, weights, size = _unfold_images(x, w, b, stride, padding, dilation, groups)
        ctx.save_for_backward(cols)
        ctx.shape = w.shape
        return torch.matmul(weights, cols).view(x.shape[0], w.shape[0], *size)

    @staticmethod
    def backward(ctx, grad):
        (cols,) = ctx.saved_tensors
        n, groups, taps = cols.shape[0], cols.shape[1], ctx.shape[2] * ctx.shape[3]
        # [gw | gb] in one product where the bias row is there
        product = torch.matmul(grad.reshape(n, groups, -1, grad.shape[2] * grad.shape[3]), cols.to(grad.dtype).transpose(2, 3))
        product = product.sum(0)
        gw = product[..., :taps].reshape(ctx.shape)
        gb = product[..., taps].reshape(-1) if ctx.needs_input_grad[2] else None
        return None, gw, gb, None, None, None, None


def _norm(m: EpisodeBatchNorm, name: str, params, buffers, h, tasks: int, mode: str, support_size: int, update_stats: bool):
    shape = h.shape
    h = h.flatten(1, 2) if h.dim() == 3 else h  # linear features [n, tasks, d] -> [n, tasks * d]
    weight = _per_task(params[f"{name}.weight"], tasks, 1) if m.affine else None
    bias = _per_task(params[f"{name}.bias"], tasks, 1) if m.affine else None
    if mode == "support":
        y = normalize_by(h, h[:support_size], 1, m.eps, weight, bias)
    else:
        running = mode == "running"
        stats = running or (update_stats and m.track_running_stats)
        mean = _per_task(buffers[f"{name}.running_mean"], tasks, 1) if stats else None
        var = _per_task(buffers[f"{name}.running_var"], tasks, 1) if stats else None
        if running:
            y = F.batch_norm(h, mean, var, weight, bias, False, 0.0, m.eps)
        else:
            y = batch_norm(h, weight, bias, mean, var, running_momentum(m), m.eps)
    return y.view(shape)
