"""What ``metarun bench`` measures: the episode shapes, the settings of the fast paths, and the targets."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

GRADIENT_BASED = ("maml", "fomaml", "anil", "metasgd", "reptile")
#: the algorithms with a reference of their own (:mod:`metarun.bench.references`), in the order they are measured
ALGORITHMS = (*GRADIENT_BASED, "protonet", "finetune")


@dataclass(frozen=True)
class Shape:
    name: str
    image: tuple[int, int, int]
    hidden: int  # Conv4 filters
    ways: int
    shots: int
    queries: int
    meta_batch: int
    train_classes: int
    images_per_class: int


OMNIGLOT = Shape("omniglot-5w1s15q", (1, 28, 28), 64, 5, 1, 15, 32, 1000, 20)
SHAPES = {
    s.name: s
    for s in (
        OMNIGLOT,
        replace(OMNIGLOT, name="omniglot-5w1s1q", queries=1),  # the MAML paper's Omniglot setting
        replace(OMNIGLOT, name="omniglot-5w5s15q", shots=5),
        Shape("miniimagenet-5w1s15q", (3, 84, 84), 32, 5, 1, 15, 4, 64, 60),
    )
}


@dataclass(frozen=True)
class Settings:
    """The trainer settings of a fast path (``trainer.channels_last``, ``.precision``, ``.compile``, ``.fused_sampling``)."""

    channels_last: bool = False
    precision: str = "fp32"
    compile: bool = False
    fused_sampling: bool = False

    def describe(self) -> str:
        flags = ("channels_last", "compile", "fused_sampling")
        return "+".join([self.precision] + [flag for flag in flags if getattr(self, flag)])


def recommended(name: str, device: torch.device) -> Settings:
    """The settings the README recommends (and this benchmark measures) per algorithm and device.

    On a CPU with AVX-512 BF16, bf16 halves the memory traffic of the elementwise work (batch norm, its
    double backward, ReLU) on Conv4's 28x28 activations, which is most of a gradient-based meta-step.
    channels_last pays where the convolutions' weights are shared by all tasks (ProtoNet, finetune,
    ANIL's backbone); on the grouped per-task convolutions of MAML and its kin it cost 12-19%
    (``metarun bench --quick``, 2 cores). Fused sampling applies where the data live on a CPU.
    """
    channels_last = device.type == "cuda" or name in ("protonet", "finetune", "anil")
    return Settings(channels_last=channels_last, precision="bf16", fused_sampling=device.type == "cpu")


# -- targets: (operator, threshold) on the ratio ------------------------------------------------
def target(name: str, metric: str, shape: str) -> tuple[str, float] | None:
    if name == "sampler":
        return (">=", 10.0) if metric == "episodes_per_s" else ("<", 0.01)
    if metric == "eval_episodes_per_s":
        return (">=", 3.0)
    if shape == "omniglot-5w1s1q" and name == "maml":
        return (">=", 2.5)
    if shape == "omniglot-5w1s1q" and name in ("fomaml", "anil"):
        return (">=", 3.0)
    if name == "protonet" and shape == OMNIGLOT.name:
        return (">=", 1.5)
    return (">=", 1.0)  # no shape slower than the reference
