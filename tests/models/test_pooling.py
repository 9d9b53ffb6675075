"""Max-pooling through the channels_last kernel against torch's own, to second order."""

import pytest
import torch

from metarun.models.conv4 import Conv4
from metarun.models.pooling import MaxPool2d, max_pool2d


@pytest.mark.parametrize("channels", [6, 384])  # planes regrouped 2 and 128 to an image
@pytest.mark.parametrize(
    "pool", [torch.nn.MaxPool2d(2), torch.nn.MaxPool2d(3, stride=2, padding=1), torch.nn.MaxPool2d(2, ceil_mode=True)]
)
def test_channels_last_max_pool_equals_the_native_one_to_second_order(pool, channels):
    """Same maxima (ties included: ReLU outputs are full of zeros), same first- and second-order gradients."""
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(2, channels, 7, 7, generator=g, dtype=torch.float64)).round(decimals=1)
    w = torch.randn(pool(x).shape, generator=g, dtype=torch.float64)

    def values_and_grads(f):
        xi = x.clone().requires_grad_()
        y = f(xi)
        (gx,) = torch.autograd.grad((y * w).square().sum(), xi, create_graph=True)
        (ggx,) = torch.autograd.grad((gx * x).sum(), xi)
        return y, gx, ggx

    for a, b in zip(values_and_grads(pool), values_and_grads(lambda v: max_pool2d(v, pool)), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.no_grad():  # the path without indices
        out = max_pool2d(x, pool)
    torch.testing.assert_close(out, pool(x), rtol=0, atol=0)
    assert out.is_contiguous()


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_the_pooling_layer_keeps_values_gradients_and_layout(layout):
    """Conv4's layer: torch's values and first- and second-order gradients, and a channels_last input stays
    channels_last (the runs with trainer.channels_last=true must not be turned back to NCHW)."""
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(3, 8, 6, 6, generator=g, dtype=torch.float64))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(3, 8, 3, 3, generator=g, dtype=torch.float64)
    results = []
    for pool in (torch.nn.MaxPool2d(2), MaxPool2d(2)):
        xi = x.clone().requires_grad_()
        y = pool(xi)
        (gx,) = torch.autograd.grad((y * w).square().sum(), xi, create_graph=True)
        (ggx,) = torch.autograd.grad((gx * x).sum(), xi)
        results.append((y, gx, ggx))
        assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_conv4_pools_through_the_fast_layer():
    assert sum(isinstance(m, MaxPool2d) for m in Conv4((1, 28, 28)).modules()) == 4


def test_the_pooling_layer_works_under_torch_func_transforms():
    """vmap and grad (the MAML family's strategies) cannot run a custom autograd.Function without setup_context."""
    from torch.func import grad, vmap

    pool = MaxPool2d(2)
    x = torch.randn(3, 2, 4, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(vmap(pool)(x), torch.stack([torch.nn.functional.max_pool2d(t, 2) for t in x]))
    g = grad(lambda t: pool(t).square().sum())(x[0])
    t = x[0].clone().requires_grad_()
    (expected,) = torch.autograd.grad(torch.nn.functional.max_pool2d(t, 2).square().sum(), t)
    torch.testing.assert_close(g, expected)
