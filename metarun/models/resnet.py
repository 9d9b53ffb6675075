"""ResNet-18 and ResNet-50 (He et al. 2016) under torchvision's parameter names, so its ImageNet files load.

The layout is torchvision's ``resnet.py``: a 7x7 stride-2 stem and a 3x3 max-pool, four stages of
basic blocks (ResNet-18: 2-2-2-2) or bottlenecks with the stride on the 3x3 convolution (ResNet-50,
"v1.5": 3-4-6-3), a 1x1 convolution + batch norm (``downsample``) on the shortcut where the shape
changes, and global average pooling. The feature is the pooled vector (512 or 2048); torchvision's
classifier ``fc`` is not built and is dropped from published files. Batch norm is
:class:`~metarun.models.norm.EpisodeBatchNorm` (the same parameters and buffers as
``nn.BatchNorm2d``), so ``eval.bn_mode`` applies as in the other backbones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metarun.models.norm import EpisodeBatchNorm
from metarun.models.pretrained import PretrainedBackbone


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(cin, planes, stride)
        self.bn1 = EpisodeBatchNorm(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = EpisodeBatchNorm(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)  # out of place: under vmap the two may be batched differently


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv1x1(cin, planes)
        self.bn1 = EpisodeBatchNorm(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = EpisodeBatchNorm(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = EpisodeBatchNorm(planes * self.expansion)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet(PretrainedBackbone):
    """torchvision's ResNet without its classifier: ``[n, C, h, w]`` images -> ``[n, 512 * expansion]``."""

    block: type[BasicBlock | Bottleneck] = BasicBlock
    depths: tuple[int, int, int, int] = (2, 2, 2, 2)
    head_prefixes = ("fc.",)

    def build(self) -> None:
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = EpisodeBatchNorm(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = 64
        for i, (planes, depth) in enumerate(zip((64, 128, 256, 512), self.depths, strict=True)):
            stride = 1 if i == 0 else 2
            out = planes * self.block.expansion
            downsample = None
            if stride != 1 or cin != out:
                downsample = nn.Sequential(conv1x1(cin, out, stride), EpisodeBatchNorm(out))
            blocks = [self.block(cin, planes, stride, downsample)]
            blocks += [self.block(out, planes) for _ in range(depth - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = out
        self.out_features = cin
        for m in self.modules():  # torchvision's initialisation (batch norm starts at 1 and 0 already)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean((2, 3))


class ResNet18(ResNet):
    arch = "resnet18"


class ResNet50(ResNet):
    arch = "resnet50"
    block = Bottleneck
    depths = (3, 4, 6, 3)
