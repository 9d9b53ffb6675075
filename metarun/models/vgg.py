"""VGG-16 (Simonyan & Zisserman 2015) under torchvision's parameter names (``vgg16``, without batch norm).

The feature extractor is torchvision's ``features``: thirteen 3x3 convolutions with ReLU in five
stages of 64-128-256-512-512 channels, each closed by a 2x2 max-pool (``features.0`` ...
``features.30``, convolutions at 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28), then global
average pooling to a 512-d vector. torchvision's ``classifier`` (fc6, fc7 and the 1000-way layer,
120 million weights sized for a 7x7 map of 224-pixel images) is not built and is dropped from
published files: the transfer recipe puts a new head on the convolutional features, and the
pooled vector serves any image size from 32 up.
"""

from __future__ import annotations

import torch
from torch import nn

from metarun.models.pretrained import PretrainedBackbone

#: torchvision's configuration "D": output channels of each convolution, "M" a max-pool
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16(PretrainedBackbone):
    """``[n, C, h, w]`` images -> ``[n, 512]``: torchvision's ``vgg16().features``, globally average-pooled."""

    arch = "vgg16"
    head_prefixes = ("classifier.",)
    min_image_size = 32  # five 2x2 max-pools

    def build(self) -> None:
        layers: list[nn.Module] = []
        cin = 3
        for v in VGG16_LAYOUT:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                conv = nn.Conv2d(cin, v, 3, padding=1)
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # torchvision's
                nn.init.zeros_(conv.bias)
                layers += [conv, nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.out_features = cin

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean((2, 3))
