"""Another dataset seen through a trained model's eyes: images converted to the checkpoint's input shape.

Cross-domain evaluation (``metarun eval checkpoint=RUN dataset=cub``) scores a model on a dataset it
never trained on. Its network takes the input shape of its own training data, so every split of the new
dataset is converted once, as uint8: resized (area-averaged when shrinking, bilinear with antialiasing
when enlarging), grey to colour by repeating the channel, colour to grey by luminance (ITU-R BT.601
weights). The images are then normalised with the checkpoint's statistics, as the model was trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metarun.data.split import FewShotDataset, Split
from metarun.errors import ConfigError

#: ITU-R BT.601 luma weights (what Pillow's ``convert("L")`` uses)
LUMA = (0.299, 0.587, 0.114)
#: classes converted per call, to bound the float copy's memory
CLASSES_PER_CALL = 8


def convert_images(images: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """uint8 ``[..., C, H, W]`` -> uint8 ``[..., *shape]``."""
    c, h, w = shape
    lead = images.shape[:-3]
    x = images.reshape(-1, *images.shape[-3:]).float()
    if x.shape[1] != c:
        if x.shape[1] == 1 and c == 3:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] == 3 and c == 1:
            x = (x * torch.tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
        else:
            raise ConfigError(f"cannot convert {x.shape[1]}-channel images to the model's {c} channels")
    if x.shape[-2:] != (h, w):
        shrink = x.shape[-2] >= h and x.shape[-1] >= w
        x = (
            F.interpolate(x, size=(h, w), mode="area")
            if shrink
            else F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        )
    return x.round().clamp(0, 255).to(torch.uint8).reshape(*lead, c, h, w)


def as_input_of(
    dataset: FewShotDataset, shape: tuple[int, ...], mean: tuple[float, ...], std: tuple[float, ...]
) -> FewShotDataset:
    """``dataset`` converted to a model's input ``shape`` and normalised with its ``mean``/``std``."""
    if len(shape) != 3 or not hasattr(dataset, "splits"):
        raise ConfigError(
            f"dataset={dataset.name} gives images, but the checkpoint's model takes inputs of shape {tuple(shape)}: "
            "cross-domain evaluation converts between image datasets only"
        )
    if len(mean) != shape[0] or len(std) != shape[0]:
        raise ConfigError(f"the checkpoint's normalisation has {len(mean)} channels for a {shape[0]}-channel input")
    splits = {}
    for name, split in dataset.splits.items():
        parts = [
            convert_images(split.images[i : i + CLASSES_PER_CALL], tuple(shape))
            for i in range(0, max(split.num_classes, 1), CLASSES_PER_CALL)
        ]
        images = torch.cat(parts) if split.num_classes else split.images.new_zeros(0, split.images.shape[1], *shape)
        splits[name] = Split(images, split.class_names, split.counts)
    return FewShotDataset(dataset.name, splits, tuple(mean), tuple(std), dict(dataset.meta))
