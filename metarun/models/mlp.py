"""A fully connected backbone for vector inputs (images are flattened)."""

from __future__ import annotations

import math

from torch import nn


class MLP(nn.Module):
    #: forward is ``self.features(x)`` (see :mod:`metarun.models.grouped`)
    sequential = True

    def __init__(self, in_shape: tuple[int, ...], hidden: tuple[int, ...] = (40, 40)) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        cin = math.prod(in_shape)
        for h in hidden:
            layers += [nn.Linear(cin, h), nn.ReLU()]
            cin = h
        self.features = nn.Sequential(*layers)
        self.out_features = cin

    def forward(self, x):
        return self.features(x)
