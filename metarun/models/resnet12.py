"""ResNet-12 as used across few-shot papers (Oreshkin et al. 2018; Lee et al. 2019): 64-160-320-640."""

from __future__ import annotations

from torch import nn

from metarun.models.norm import EpisodeBatchNorm


class Block(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        layers = []
        for i in range(3):
            layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1, bias=False), EpisodeBatchNorm(cout)]
            if i < 2:
                layers.append(nn.LeakyReLU(0.1))
        self.body = nn.Sequential(*layers)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), EpisodeBatchNorm(cout))
        self.out = nn.Sequential(nn.LeakyReLU(0.1), nn.MaxPool2d(2))

    def forward(self, x):
        return self.out(self.body(x) + self.shortcut(x))


class ResNet12(nn.Module):
    def __init__(self, in_shape: tuple[int, int, int], channels: tuple[int, ...] = (64, 160, 320, 640)) -> None:
        super().__init__()
        blocks, cin = [], in_shape[0]
        for cout in channels:
            blocks.append(Block(cin, cout))
            cin = cout
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_features = cin

    def forward(self, x):
        return self.features(x)
