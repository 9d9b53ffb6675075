"""Data augmentation for training episodes, as batched tensor operations.

Episodes are gathered on the device that trains on them, so augmentation runs
there too, on the whole batch at once: a per-image Python loop (or a CPU
DataLoader) would cost more than the training step. Every random number comes
from the caller's generator, so an episode is augmented identically when a run
is resumed or repeated with the same seed.

The operations are those of the usual few-shot recipes (e.g. for CIFAR-FS and
mini-ImageNet): a random crop of the zero-padded image, a horizontal flip with
probability 1/2, and colour jitter of brightness, contrast and saturation, each
by a factor drawn uniformly from ``[1 - jitter, 1 + jitter]`` per image and
applied in that fixed order (torchvision's ``ColorJitter`` shuffles the order;
a fixed one keeps the ops branch-free and changes little).
"""

from __future__ import annotations

import torch
from torch import Tensor

# ITU-R 601 luma, the weights torchvision and Pillow use for grayscale.
LUMA = (0.299, 0.587, 0.114)


def augment_batch(x: Tensor, generator: torch.Generator, padding: int = 4, flip: bool = True, jitter: float = 0.4) -> Tensor:
    """Augment float images in [0, 1] of shape ``[B, C, H, W]``; ``generator`` must be on ``x.device``."""
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"augment_batch expects float images [B, C, H, W], got {x.dtype} {tuple(x.shape)}")
    if padding > 0:
        x = random_crop(x, generator, padding)
    if flip:
        flipped = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
        x = torch.where(flipped[:, None, None, None], x.flip(-1), x)
    if jitter > 0:
        x = color_jitter(x, generator, jitter)
    return x


def random_crop(x: Tensor, generator: torch.Generator, padding: int) -> Tensor:
    """An ``H x W`` window of each zero-padded image, at a random offset per image, by one gather."""
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=x.device)
    left = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=x.device)
    rows = (top[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (left[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def color_jitter(x: Tensor, generator: torch.Generator, strength: float) -> Tensor:
    """Brightness, contrast and saturation with per-image factors, clamped to [0, 1] after each step as torchvision does."""
    factors = 1 + strength * (2 * torch.rand((3, x.shape[0], 1, 1, 1), generator=generator, device=x.device, dtype=x.dtype) - 1)
    brightness, contrast, saturation = factors.clamp_min(0)
    x = (x * brightness).clamp(0, 1)
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = (mean + contrast * (x - mean)).clamp(0, 1)
    if x.shape[1] == 3:  # a grayscale image has no saturation to change
        gray = _gray(x)
        x = (gray + saturation * (x - gray)).clamp(0, 1)
    return x


def _gray(x: Tensor) -> Tensor:
    if x.shape[1] != 3:
        return x
    weights = torch.tensor(LUMA, device=x.device, dtype=x.dtype)
    return (x * weights[None, :, None, None]).sum(dim=1, keepdim=True)
