"""The grouped forward (tasks as channel groups of one network) against each task's own forward."""

import pytest
import torch
from torch.func import functional_call

from metarun.models import grouped
from metarun.models.conv4 import Conv4
from metarun.models.grouped import conv2d, grouped_forward, grouped_layers
from metarun.models.mlp import MLP
from metarun.models.norm import norm_statistics
from metarun.models.pooling import max_pool2d
from metarun.models.resnet12 import ResNet12

TASKS, N, SUPPORT = 3, 6, 4


def per_task_params(backbone, tasks):
    """Every task its own, different copy of the weights (``[tasks, ...]``), and random running statistics."""
    g = torch.Generator().manual_seed(1)
    params = {
        k: p.detach() + 0.3 * torch.randn(tasks, *p.shape, generator=g, dtype=p.dtype) for k, p in backbone.named_parameters()
    }
    buffers = {}
    for k, b in backbone.named_buffers():
        if b.is_floating_point():
            noise = torch.rand(tasks, *b.shape, generator=g, dtype=b.dtype)
            buffers[k] = (noise + 0.5) if k.endswith("running_var") else noise - 0.5
    return params, buffers


def one_task(backbone, params, buffers, t, x, mode, support_size):
    mine = {k: v[t] for k, v in params.items()}
    stats = {k: v[t].clone() for k, v in buffers.items()}
    with norm_statistics(backbone, mode, support_size=support_size):
        out = functional_call(backbone, (mine, stats), (x,))
    return out, stats


def assert_same_gradients_to_second_order(out, expected, weights):
    """First- and second-order gradients with respect to ``weights`` of a loss of ``out`` and of ``expected`` agree."""
    probe = torch.randn_like(expected)

    def grads(y):
        first = torch.autograd.grad((y * probe).square().sum(), weights, create_graph=True)
        second = torch.autograd.grad(sum((g * g.detach().sign()).sum() for g in first), weights)
        return first, second

    for got, want in zip(grads(out), grads(expected), strict=True):
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("mode", ["batch", "support", "running"])
@pytest.mark.parametrize("kind", ["conv4", "mlp"])
def test_equals_each_task_run_on_its_own(kind, mode):
    torch.manual_seed(0)
    backbone = (Conv4((1, 8, 8), hidden=4, layers=2) if kind == "conv4" else MLP((1, 4, 4), hidden=(6, 5))).double()
    backbone.train()
    params, buffers = per_task_params(backbone, TASKS)
    x = torch.randn(TASKS, N, 1, *((8, 8) if kind == "conv4" else (4, 4)), dtype=torch.float64)
    grouped_stats = {k: v.clone() for k, v in buffers.items()}
    out = grouped_forward(grouped_layers(backbone), params, grouped_stats, x, mode, SUPPORT, update_stats=mode == "batch")
    for t in range(TASKS):
        expected, stats = one_task(backbone, params, buffers, t, x[t], mode, SUPPORT)
        torch.testing.assert_close(out[t], expected)
        for k in stats:  # the running statistics move exactly as the task's own training forward moves them
            torch.testing.assert_close(grouped_stats[k][t], stats[k])


@pytest.mark.parametrize("mode", ["batch", "support", "running"])
def test_a_batch_norm_folded_into_the_convolution_of_images_is_exact_to_second_order(mode, monkeypatch):
    """Where gradients are taken on a CPU, the first layer's batch norm is folded into its convolution's
    per-task weights: outputs, running statistics and first- and second-order gradients as each task's
    own forward through the batch norm gives them."""
    torch.manual_seed(0)
    backbone = Conv4((1, 8, 8), hidden=4, layers=2).double().train()
    params, buffers = per_task_params(backbone, TASKS)
    params = {k: v.requires_grad_() for k, v in params.items()}
    x = torch.randn(TASKS, N, 1, 8, 8, dtype=torch.float64)
    norms, norm = [], grouped._norm
    monkeypatch.setattr(grouped, "_norm", lambda m, name, *a: norms.append(name) or norm(m, name, *a))
    grouped_stats = {k: v.clone() for k, v in buffers.items()}
    out = grouped_forward(grouped_layers(backbone), params, grouped_stats, x, mode, SUPPORT, update_stats=mode == "batch")
    assert norms == ["features.1.1"]  # the first block's norm was folded
    runs = [one_task(backbone, params, buffers, t, x[t], mode, SUPPORT) for t in range(TASKS)]
    expected = torch.stack([o for o, _ in runs])
    torch.testing.assert_close(out, expected)
    for k in buffers:
        torch.testing.assert_close(grouped_stats[k], torch.stack([stats[k] for _, stats in runs]))
    assert_same_gradients_to_second_order(out, expected, list(params.values()))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("mode", ["batch", "support", "running"])
def test_one_task_without_gradients_equals_its_own_forward(mode, channels):
    """The path evaluation's query forward takes on a CPU (channels_last throughout; one image channel
    convolved as a product with the unfolded images)."""
    torch.manual_seed(0)
    backbone = Conv4((channels, 12, 12), hidden=4, layers=3).double()
    params, buffers = per_task_params(backbone, 1)
    x = torch.randn(1, N, channels, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        out = grouped_forward(grouped_layers(backbone), params, buffers, x, mode, SUPPORT)
        expected, _ = one_task(backbone, params, buffers, 0, x[0], mode, SUPPORT)
    torch.testing.assert_close(out[0], expected)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("mode", ["batch", "support"])
def test_one_task_of_colour_images_with_gradients_runs_channels_last_exactly_to_second_order(mode, channels, monkeypatch):
    """miniImageNet's tasks go one a call; with several image channels the call runs channels_last (its
    convolutions get NHWC inputs), with the same outputs, running statistics and first- and second-order
    gradients as the task's own forward. One-channel images keep NCHW, where it was faster."""
    torch.manual_seed(0)
    backbone = Conv4((channels, 12, 12), hidden=4, layers=3).double().train()
    params, buffers = per_task_params(backbone, 1)
    params = {k: v.requires_grad_() for k, v in params.items()}
    x = torch.randn(1, N, channels, 12, 12, dtype=torch.float64)
    layouts, conv = [], grouped._conv
    monkeypatch.setattr(grouped, "_conv", lambda h, *a: layouts.append(h.is_contiguous()) or conv(h, *a))
    grouped_stats = {k: v.clone() for k, v in buffers.items()}
    out = grouped_forward(grouped_layers(backbone), params, grouped_stats, x, mode, SUPPORT, update_stats=mode == "batch")
    assert len(layouts) == 3
    assert not any(layouts) if channels == 3 else all(layouts)
    expected, stats = one_task(backbone, params, buffers, 0, x[0], mode, SUPPORT)
    torch.testing.assert_close(out[0], expected)
    for k in stats:
        torch.testing.assert_close(grouped_stats[k][0], stats[k])
    assert_same_gradients_to_second_order(out[0], expected, list(params.values()))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("mode", ["batch", "running"])
def test_shared_weights_are_one_convolution_of_every_tasks_images(mode, layout):
    """Weights without a task dim (ANIL's backbone) go through ordinary convolutions, also from a
    channels_last model: outputs and weight gradients as each task run on its own."""
    torch.manual_seed(0)
    backbone = Conv4((1, 8, 8), hidden=4, layers=2).double().eval().to(memory_format=layout)
    shared = dict(backbone.named_parameters())
    x = torch.randn(TASKS, N, 1, 8, 8, dtype=torch.float64)
    out = grouped_forward(grouped_layers(backbone), shared, dict(backbone.named_buffers()), x, mode)
    with norm_statistics(backbone, mode):
        expected = torch.stack([backbone(x[t]) for t in range(TASKS)])
    torch.testing.assert_close(out, expected)
    probe = torch.randn_like(out)
    got = torch.autograd.grad((out * probe).sum(), list(shared.values()))
    want = torch.autograd.grad((expected * probe).sum(), list(shared.values()))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_only_plain_sequences_can_be_grouped():
    assert grouped_layers(Conv4((1, 8, 8), hidden=4, layers=2)) is not None
    assert grouped_layers(ResNet12((3, 16, 16), channels=(4, 4, 4, 4))) is None


@pytest.mark.parametrize(
    ("conv", "precision"),
    [
        (torch.nn.Conv2d(1, 4, 3, padding=1), torch.float64),
        (torch.nn.Conv2d(1, 4, 3, stride=2, padding=2, dilation=2), torch.float64),
        (torch.nn.Conv2d(1, 4, 3, padding=1), torch.bfloat16),  # under autocast, as trainer.precision=bf16 runs it
    ],
)
def test_grouped_convolution_of_images_equals_the_native_one_to_second_order(conv, precision):
    """One input channel per task (Omniglot's first layer): weight and bias gradients of the first and second order."""
    g = torch.Generator().manual_seed(0)
    tasks = 3
    dtype = torch.float64 if precision == torch.float64 else torch.float32
    x = torch.randn(5, tasks, 9, 9, generator=g, dtype=dtype)
    w0 = torch.randn(tasks * 4, 1, 3, 3, generator=g, dtype=dtype)
    b0 = torch.randn(tasks * 4, generator=g, dtype=dtype)

    def native_conv(x, w, b):
        return torch.nn.functional.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, tasks)

    r = torch.randn(native_conv(x, w0, b0).shape, generator=g, dtype=dtype)

    def grads(f, autocast=precision == torch.bfloat16, dtype=dtype):
        w, b = w0.to(dtype).clone().requires_grad_(), b0.to(dtype).clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = f(x.to(dtype), w, b)
        gw, gb = torch.autograd.grad((y.to(dtype) * r.to(dtype)).square().sum(), (w, b), create_graph=True)
        ggw, ggb = torch.autograd.grad((gw * w0.to(dtype)).sum() + (gb * b0.to(dtype)).sum(), (w, b))
        return y, gw, gb, ggw, ggb

    native = grads(native_conv)
    grouped = grads(lambda x, w, b: conv2d(x, w, b, conv, tasks))
    if precision != torch.bfloat16:
        for a, b in zip(native, grouped, strict=True):
            torch.testing.assert_close(a, b)
        return
    # in bf16, both kernels within two roundings (2^-7) of each value's scale of the float64 result
    exact = grads(native_conv, autocast=False, dtype=torch.float64)
    for a, b, z in zip(native, grouped, exact, strict=True):
        bound = 2**-7 * z.abs().max().item()
        assert (a.double() - z).abs().max() <= bound and (b.double() - z).abs().max() <= bound


def test_max_pool_runs_before_the_relu_in_front_of_it_with_the_same_values_and_gradients():
    """Integer inputs, so that windows hold ties: equal maxima, and all-negative windows that the ReLU
    turns into ties at zero. Values, gradients and second-order gradients match the layers' own order."""
    kinds = [type(m).__name__ for _, m in grouped_layers(Conv4((1, 8, 8), hidden=4, layers=2))]
    assert kinds[:4] == ["Conv2d", "EpisodeBatchNorm", "MaxPool2d", "ReLU"]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2, 3, (3, 4, 8, 8), generator=g).double().requires_grad_()
    out = torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64).requires_grad_()
    pool = torch.nn.MaxPool2d(2)
    results = []
    for f in (lambda t: torch.relu(max_pool2d(t, pool)), lambda t: max_pool2d(torch.relu(t), pool)):
        y = f(x)
        (gx,) = torch.autograd.grad(y, x, out, create_graph=True)
        results.append((y, gx, *torch.autograd.grad((gx * x).sum(), (out,))))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    assert results[0][1].abs().sum() > 0
