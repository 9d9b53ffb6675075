"""Meta-SGD (Li et al. 2017): MAML with a learned learning rate for every weight.

The inner step is ``θ' = θ − α ∘ ∇L_support(θ)`` where ``α`` has the shape of
``θ``, is initialised at ``algo.inner_lr`` and is meta-learned with ``θ`` by
the outer optimiser (its meta-gradient flows through the inner update, also
when ``first_order=true``). The rates are parameters of the module
(``lrs.<i>``, in the order of the backbone's then the head's
parameters), so they are checkpointed with the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from metarun.algorithms.inner_loop import Params
from metarun.algorithms.maml import MAML, MAMLConfig


@dataclass
class MetaSGDConfig(MAMLConfig):
    _target_: str = "metarun.algorithms.metasgd.MetaSGD"


class MetaSGD(MAML):
    Config = MetaSGDConfig
    default_bn_mode = "transductive"

    def __init__(self, backbone, ways: int, **maml_options) -> None:
        """Takes MAML's options; ``inner_lr`` is where every per-weight rate starts."""
        super().__init__(backbone, ways, **maml_options)
        model = super().meta_parameters()
        self.names = [("backbone", k) for k in model["backbone"]] + [("head", k) for k in model["head"]]
        self.lrs = nn.ParameterList([nn.Parameter(torch.full_like(model[g][k].detach(), self.inner_lr)) for g, k in self.names])

    def meta_parameters(self) -> Params:
        params = super().meta_parameters()
        params["lrs"] = {f"{g}.{k}": lr for (g, k), lr in zip(self.names, self.lrs, strict=True)}
        return params

    def inner_lrs(self, meta_params: Params) -> Params:
        lrs = meta_params["lrs"]
        out: Params = {"backbone": {}, "head": {}}
        for g, k in self.names:
            out[g][k] = lrs[f"{g}.{k}"]
        return out
