"""Conv4: the standard few-shot backbone (Vinyals et al. 2016; Snell et al. 2017; Finn et al. 2017)."""

from __future__ import annotations

from torch import nn

from metarun.models.norm import EpisodeBatchNorm
from metarun.models.pooling import MaxPool2d


def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), EpisodeBatchNorm(cout), nn.ReLU(inplace=True), MaxPool2d(2))


class Conv4(nn.Module):
    """4 × [conv 3×3, BatchNorm, ReLU, 2×2 max-pool], flattened."""

    #: forward is ``self.features(x)``: per-task copies can run as one grouped network (:mod:`metarun.models.grouped`)
    sequential = True

    def __init__(self, in_shape: tuple[int, int, int], hidden: int = 64, layers: int = 4) -> None:
        super().__init__()
        c, h, w = in_shape
        blocks = []
        for i in range(layers):
            blocks.append(conv_block(c if i == 0 else hidden, hidden))
            h, w = h // 2, w // 2
        self.features = nn.Sequential(*blocks, nn.Flatten())
        self.out_features = hidden * h * w

    def forward(self, x):
        return self.features(x)
