"""ViT-S/16 against DINO's forward written out in float64, and its position embeddings at other sizes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metarun.models.vit import ViTS16, resize_grid


def dino_forward(state: dict[str, torch.Tensor], x: torch.Tensor, pos: torch.Tensor, depth: int = 12) -> torch.Tensor:
    """DINO's ``VisionTransformer.forward`` (vit_small, patch 16) from a state dict, attention as DINO writes it."""
    p = {k: v.double() for k, v in state.items()}
    x = x.double()
    tokens = F.conv2d(x, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=16).flatten(2).transpose(1, 2)
    tokens = torch.cat([p["cls_token"].expand(len(x), -1, -1), tokens], 1) + pos.double()
    n, t, d = tokens.shape
    for b in range(depth):
        w = {k.removeprefix(f"blocks.{b}."): v for k, v in p.items() if k.startswith(f"blocks.{b}.")}
        h = F.layer_norm(tokens, (d,), w["norm1.weight"], w["norm1.bias"], 1e-6)
        qkv = (h @ w["attn.qkv.weight"].T + w["attn.qkv.bias"]).reshape(n, t, 3, 6, d // 6).permute(2, 0, 3, 1, 4)
        attn = ((qkv[0] @ qkv[1].transpose(-2, -1)) * (d // 6) ** -0.5).softmax(-1)
        y = (attn @ qkv[2]).transpose(1, 2).reshape(n, t, d) @ w["attn.proj.weight"].T + w["attn.proj.bias"]
        tokens = tokens + y
        h = F.layer_norm(tokens, (d,), w["norm2.weight"], w["norm2.bias"], 1e-6)
        h = F.gelu(h @ w["mlp.fc1.weight"].T + w["mlp.fc1.bias"]) @ w["mlp.fc2.weight"].T + w["mlp.fc2.bias"]
        tokens = tokens + h
    return F.layer_norm(tokens, (d,), p["norm.weight"], p["norm.bias"], 1e-6)[:, 0]


class TwoBlockViT(ViTS16):
    """ViT-S/16 with 2 of its 12 identical blocks: the float64 comparison at a sixth of the cost."""

    depth = 2


@pytest.fixture(scope="module")
def vit32() -> ViTS16:
    torch.manual_seed(0)
    model = TwoBlockViT((3, 32, 32), image_size=32, weights="none")
    with torch.no_grad():  # larger than DINO's init, so that every layer moves the output
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_forward_matches_dinos_written_out_in_float64(vit32):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = vit32.double()(x.double())
        ref = dino_forward(vit32.state_dict(), x, vit32.position_embeddings(2), depth=2)
    assert out.shape == (2, 384)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def keys_cubic(t: float, a: float = -0.75) -> float:
    """The bicubic convolution kernel (Keys 1981) with PyTorch's a = -0.75."""
    t = abs(t)
    if t <= 1:
        return (a + 2) * t**3 - (a + 3) * t**2 + 1
    if t < 2:
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
    return 0.0


def resize_1d(values: np.ndarray, size: int) -> np.ndarray:
    """Half-pixel-centred bicubic resampling along axis 0, edge samples repeated beyond the ends."""
    n = values.shape[0]
    out = np.zeros((size, *values.shape[1:]))
    for i in range(size):
        src = (i + 0.5) * n / size - 0.5
        base = math.floor(src)
        for k in range(base - 1, base + 3):
            out[i] += keys_cubic(src - k) * values[min(max(k, 0), n - 1)]
    return out


@pytest.mark.parametrize("size", [2, 4, 28])
def test_position_grid_is_resized_bicubically(size):
    g = torch.Generator().manual_seed(1)
    pos = torch.randn(1, 14 * 14, 5, generator=g, dtype=torch.float64)
    grid = pos.reshape(14, 14, 5).numpy()
    expected = resize_1d(resize_1d(grid, size).transpose(1, 0, 2), size).transpose(1, 0, 2)  # rows, then columns
    out = resize_grid(pos, size).reshape(size, size, 5).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


def test_two_by_two_grid_takes_the_samples_under_its_centres():
    pos = torch.randn(1, 14 * 14, 3, dtype=torch.float64)
    out = resize_grid(pos, 2).reshape(2, 2, 3)
    grid = pos.reshape(14, 14, 3)
    # centres at (i + 0.5) * 7 - 0.5 = 3 and 10: exactly on samples, where the cubic kernel is 1 and 0
    torch.testing.assert_close(out, grid[[3, 10]][:, [3, 10]], rtol=0, atol=1e-12)


def test_at_224_the_published_embeddings_are_used_as_they_are_and_load_across_sizes():
    source = ViTS16((3, 84, 84), image_size=224)
    assert torch.equal(source.position_embeddings(14), source.pos_embed)
    at224 = ViTS16((3, 84, 84), image_size=224)
    at224.load_published(source.state_dict())
    x = torch.randn(1, 3, 84, 84)
    with torch.no_grad():
        torch.testing.assert_close(at224.eval()(x), source.eval()(x), rtol=0, atol=0)
    at32 = ViTS16((3, 84, 84), image_size=32)
    at32.load_published(source.state_dict())  # the same published shapes at every image size
    with torch.no_grad():
        out = at32.eval()(x)
    assert out.shape == (1, 384) and torch.isfinite(out).all()
