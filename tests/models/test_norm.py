import pytest
import torch
import torch.nn.functional as F

from metarun.models.conv4 import Conv4
from metarun.models.norm import EpisodeBatchNorm, batch_norm, differentiated_twice, norm_statistics


def reference_bn(x, ref, layer):
    dims = [0, 2, 3]
    mean, var = ref.mean(dims, keepdim=True), ref.var(dims, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + layer.eps) * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)


@pytest.fixture
def layer():
    torch.manual_seed(0)
    bn = EpisodeBatchNorm(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


def test_grouped_batch_statistics_equal_per_task_batch_norm(layer):
    x = torch.randn(3 * 4, 3, 5, 5) * torch.tensor([1.0, 3.0, 0.5]).view(1, 3, 1, 1) + 2
    with norm_statistics(layer, "batch", tasks=3):
        y = layer(x)
    expected = torch.cat([reference_bn(x[i * 4 : (i + 1) * 4], x[i * 4 : (i + 1) * 4], layer) for i in range(3)])
    torch.testing.assert_close(y, expected)


def test_support_statistics_ignore_the_queries(layer):
    s, q = torch.randn(2, 6, 3, 4, 4), torch.randn(2, 5, 3, 4, 4) * 10 + 7
    x = torch.cat([s, q], 1).flatten(0, 1)
    with norm_statistics(layer, "support", support_size=6, tasks=2):
        y = layer(x).view(2, 11, 3, 4, 4)
    for t in range(2):
        torch.testing.assert_close(y[t], reference_bn(torch.cat([s[t], q[t]]), s[t], layer))
    # changing a query changes only that query's output
    q2 = q.clone()
    q2[0, 0] += 100
    with norm_statistics(layer, "support", support_size=6, tasks=2):
        y2 = layer(torch.cat([s, q2], 1).flatten(0, 1)).view(2, 11, 3, 4, 4)
    torch.testing.assert_close(y2[0, 7:], y[0, 7:])


def test_running_statistics_are_updated_in_training_and_used_in_running_mode(layer):
    layer.train()
    x = torch.randn(64, 3, 4, 4) * 2 + 5
    for _ in range(200):
        layer(x)
    torch.testing.assert_close(layer.running_mean, x.mean([0, 2, 3]), atol=1e-3, rtol=1e-3)
    layer.eval()
    with norm_statistics(layer, "running"):
        y = layer(x[:1])
    expected = F.batch_norm(x[:1], layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.0, layer.eps)
    torch.testing.assert_close(y, expected)


def test_grouped_training_updates_running_stats_with_the_mean_task_statistics(layer):
    x = torch.randn(8, 3, 4, 4) + 1
    layer.train()
    with norm_statistics(layer, "batch", tasks=2):
        layer(x)
    # one update with the mean of the per-task statistics
    torch.testing.assert_close(layer.running_mean, 0.1 * (x[:4].mean([0, 2, 3]) + x[4:].mean([0, 2, 3])) / 2)


def test_conv4_feature_sizes():
    assert Conv4((1, 28, 28)).out_features == 64
    assert Conv4((3, 84, 84), hidden=32).out_features == 32 * 5 * 5
    assert Conv4((1, 28, 28))(torch.randn(2, 1, 28, 28)).shape == (2, 64)


def second_derivatives(norm, x, w, b, g, upstream):
    """Derivatives of ``<ggx, gx> + <ggw, gw> + <ggb, gb>`` (the first backward's outputs weighted by
    ``upstream``) with respect to the input, the weight and the output gradient ``g``."""
    gx, gw, gb = torch.autograd.grad(norm(x, w, b), (x, w, b), g, create_graph=True)
    total = sum((a * u).sum() for a, u in zip((gx, gw, gb), upstream, strict=True))
    return torch.autograd.grad(total, (x, w, g))


def twice_differentiable(x, w, b):
    with differentiated_twice():
        return batch_norm(x, w, b, None, None, 0.1, 1e-5)


def native(x, w, b):
    return F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (6, 4)])
def test_written_out_double_backward_equals_the_native_one(shape):
    """In float64, off-centre inputs (mean 3, std 2): gradgradcheck's finite differences, and the native
    second derivatives to rounding."""
    g = torch.Generator().manual_seed(0)
    c = shape[1]
    x = (torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + 3).requires_grad_()
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(c, generator=g, dtype=torch.float64).requires_grad_()
    assert twice_differentiable(x, w, b).grad_fn.name() == "_BatchNormBackward"
    assert torch.autograd.gradgradcheck(twice_differentiable, (x, w, b))
    out = torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()
    upstream = (torch.randn(*shape, generator=g, dtype=torch.float64), torch.randn(c, generator=g, dtype=torch.float64),
                torch.randn(c, generator=g, dtype=torch.float64))  # fmt: skip
    got = second_derivatives(twice_differentiable, x, w, b, out, upstream)
    want = second_derivatives(native, x, w, b, out, upstream)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_written_out_double_backward_in_bf16_is_as_close_to_float64_as_the_native_one():
    """A bf16 input with float32 weights, as under autocast: relative errors against the float64 result
    within 1.5x of the native kernel's (measured: 1.1x for the input, 0.9x for the output gradient, 1e-5x
    for the weight)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 16, 12, 12, generator=g) + 1).bfloat16()
    w, b = torch.rand(16, generator=g) + 0.5, torch.randn(16, generator=g)
    out = torch.randn(4, 16, 12, 12, generator=g).bfloat16()
    upstream = (torch.randn(4, 16, 12, 12, generator=g).bfloat16(), torch.randn(16, generator=g), torch.randn(16, generator=g))

    def run(norm, dtype, weight_dtype):
        args = [t.to(d).requires_grad_() for t, d in ((x, dtype), (w, weight_dtype), (b, weight_dtype), (out, dtype))]
        return second_derivatives(norm, *args, [u.to(dtype if u.dim() > 1 else weight_dtype) for u in upstream])

    truth = run(native, torch.float64, torch.float64)
    errors = {
        name: [
            ((a.double() - t).norm() / t.norm()).item()
            for a, t in zip(run(norm, torch.bfloat16, torch.float32), truth, strict=True)
        ]
        for name, norm in (("native", native), ("written", twice_differentiable))
    }
    for written, native_error in zip(errors["written"], errors["native"], strict=True):
        assert written < 1.5 * native_error + 1e-6
