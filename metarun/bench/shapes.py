"""What ``metarun bench`` measures: the episode shapes, the settings of the fast paths, and the targets."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from metarun.speed_settings import AUTO, FUSED_MIN_STEPS, SpeedSettings, resolve_speed_settings

GRADIENT_BASED = ("maml", "fomaml", "anil", "metasgd", "reptile")
#: the algorithms with a reference of their own (:mod:`metarun.bench.references`), in the order they are measured
ALGORITHMS = (*GRADIENT_BASED, "protonet", "finetune", "matching", "relation", "incontext", "metalstm", "protomaml")
#: the algorithms whose evaluation batches episodes into one call: 3x a reference scoring one a call
BATCHED_EVALUATION = (*GRADIENT_BASED, "protonet", "finetune")


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


def default_settings(name: str, device: torch.device, *, precision: str = AUTO) -> SpeedSettings:
    """The settings ``metarun train algo=<name>`` gets on ``device`` when the user sets none (``auto``, a long run),
    or with ``precision`` forced: the same rule as the trainer's (:func:`metarun.speed_settings.resolve_speed_settings`)."""
    from metarun.config import algorithm_class, compose

    algo = compose("train", [f"algo={name}"]).algo if name != "sampler" else None
    pays = algorithm_class(algo).channels_last_pays if algo is not None else False
    return resolve_speed_settings(precision=precision, device=device, channels_last_pays=pays, steps=FUSED_MIN_STEPS)


# -- targets: (operator, threshold) on the ratio ------------------------------------------------
def target(name: str, metric: str, shape: str) -> tuple[str, float] | None:
    if name == "sampler":  # episodes_per_s, metadataset_episodes_per_s; share_of_protonet_step
        return (">=", 10.0) if metric.endswith("episodes_per_s") else ("<", 0.01)
    if metric == "eval_episodes_per_s" and name in BATCHED_EVALUATION:
        return (">=", 3.0)  # against a plain reference that scores one episode a call
    if shape == "omniglot-5w1s1q" and name == "maml":
        return (">=", 2.5)
    if shape == "omniglot-5w1s1q" and name in ("fomaml", "anil"):
        return (">=", 3.0)
    if name == "protonet" and shape == OMNIGLOT.name:
        return (">=", 1.5)
    return (">=", 1.0)  # no shape slower than the reference
