"""Episode images as a pre-trained network expects them: 3 channels, its image size, its normalisation.

The episode engine hands every backbone images normalised with the dataset's mean and std
(:class:`metarun.data.episodes.EpisodeSampler`), so samplers, caches and algorithms stay the same for
every backbone; a pre-trained backbone's first module maps those images, on the device, to what its
weights were trained on. Undoing one per-channel normalisation and applying another is one affine
map per channel, ``x * s_d / s_t + (m_d - m_t) / s_t``, and bilinear resizing commutes with it
(its weights sum to one), so the adapter is an expand, a multiply-add and an interpolation, with no
parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metarun.data.episodes import MIN_STD

#: torchvision's and DINO's normalisation of ImageNet images in [0, 1]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class InputAdapter(nn.Module):
    """Dataset-normalised ``[n, channels, h, w]`` images -> ``[n, 3, size, size]``.

    Grey images are repeated to 3 channels. With ``target`` (a ``(mean, std)`` pair, ImageNet's for
    ImageNet weights) the dataset's normalisation ``(data_mean, data_std)`` is replaced by it; without,
    it is kept. Images are resized bilinearly (antialiased when shrinking) to ``size``.
    """

    def __init__(
        self,
        channels: int,
        size: int,
        data_mean: tuple[float, ...],
        data_std: tuple[float, ...],
        target: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    ) -> None:
        super().__init__()
        self.channels, self.size = channels, size
        self.renormalize = target is not None
        # the sampler divides by the std clamped like this; undoing it must use the same number
        mean = torch.tensor(data_mean, dtype=torch.float32).expand(3)
        std = torch.tensor(data_std, dtype=torch.float32).clamp_min(MIN_STD).expand(3)
        t_mean, t_std = (torch.tensor(v, dtype=torch.float32) for v in (target or ((0.0,) * 3, (1.0,) * 3)))
        # non-persistent: recomputed from the dataset when a model is rebuilt, so checkpoints keep the publisher's keys
        self.register_buffer("scale", (std / t_std).view(3, 1, 1), persistent=False)
        self.register_buffer("shift", ((mean - t_mean) / t_std).view(3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.renormalize:
            x = torch.addcmul(self.shift, x, self.scale)
        if tuple(x.shape[-2:]) != (self.size, self.size):
            shrink = x.shape[-2] > self.size or x.shape[-1] > self.size
            # antialiased shrinking has no bfloat16 kernel on a CPU (torch 2.13): resize in float (autocast rounds it next)
            dtype = x.dtype if not shrink or x.device.type != "cpu" else torch.float32
            x = F.interpolate(x.to(dtype), size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=shrink)
        return x

    def extra_repr(self) -> str:
        return f"channels={self.channels}, size={self.size}, renormalize={self.renormalize}"
