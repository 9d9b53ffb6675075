"""``backbone.freeze``: which parts of a pre-trained backbone stay as they were published.

* ``all`` - every weight fixed (``requires_grad=False``) and batch norm on its running statistics;
  only what the algorithm adds on top (a head, prototypes) learns;
* ``bn`` - batch norm's running statistics fixed and used in every forward pass (as a network in eval
  mode does), everything else trained, batch norm's scale and shift included: statistics estimated
  from millions of images are not replaced by those of five-image episodes;
* ``none`` - everything trained, batch norm as in the other backbones (``eval.bn_mode``).

A frozen batch-norm layer ignores training mode and the algorithms' statistics rule
(:func:`metarun.models.norm.norm_statistics`), so no call to ``train()`` can undo the freeze.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metarun.errors import ConfigError
from metarun.models.norm import EpisodeBatchNorm

FREEZE_MODES = ("none", "bn", "all")


class FrozenBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm that always normalises with its running statistics and never updates them.

    Same parameters and buffers (names and shapes) as the layer it replaces, so checkpoints and
    published files load into it unchanged."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in (2, 4):
            raise ValueError(f"expected a 2-D or 4-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def frozen_copy(layer: nn.modules.batchnorm._BatchNorm) -> FrozenBatchNorm:
    frozen = FrozenBatchNorm(layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats)
    frozen.load_state_dict(layer.state_dict())
    return frozen.to(layer.running_mean.device)


def apply_freeze(model: nn.Module, mode: str, name: str) -> None:
    """Freezes ``model`` in place (``mode`` one of :data:`FREEZE_MODES`; ``name`` for messages)."""
    if mode not in FREEZE_MODES:
        raise ConfigError(f"backbone.freeze={mode}: valid values are {', '.join(FREEZE_MODES)}")
    if mode == "none":
        return
    norms = [(n, m) for n, m in model.named_modules() if isinstance(m, EpisodeBatchNorm)]
    if mode == "bn" and not norms:
        raise ConfigError(f"backbone.freeze=bn: {name} has no batch norm; use all or none")
    for full_name, layer in norms:
        parent_name, _, child = full_name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, frozen_copy(layer))
    if mode == "all":
        for p in model.parameters():
            p.requires_grad_(False)


def is_fixed(backbone: nn.Module) -> bool:
    """Whether nothing in ``backbone`` can change during a run: no weight trains and no batch norm follows an
    episode's statistics (each image's features are then a function of that image alone)."""
    if any(p.requires_grad for p in backbone.parameters()):
        return False
    return not any(isinstance(m, EpisodeBatchNorm) for m in backbone.modules())


class FeatureInput(nn.Module):
    """Stands in for a fixed backbone whose features were computed once (:mod:`metarun.data.features`): its
    forward passes them through, and it shares the backbone's parameters, buffers and submodules (the same
    objects, under the same names), so state dicts, checkpoints and ``.to()`` see the backbone itself."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        for key in ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules"):
            self.__dict__[key] = backbone.__dict__[key]
        self.out_features = getattr(backbone, "out_features", None)
        self.wrapped = type(backbone).__name__

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features

    def extra_repr(self) -> str:
        return f"features of a fixed {self.wrapped}, computed once"
