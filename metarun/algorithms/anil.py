"""ANIL: almost no inner loop (Raghu et al. 2020).

MAML in which the inner loop adapts only the classifier head; the backbone is
still meta-learned through the outer loop (second order by default). Since the
backbone does not change within a task, each task's features are computed
once and the inner steps touch only the head, which makes the inner loop
nearly free. Everything else, including the batched per-task meta-gradient,
is MAML's (:mod:`metarun.algorithms.maml`).
"""

from __future__ import annotations

from metarun.algorithms.maml import MAML


class ANIL(MAML):
    default_bn_mode = "transductive"  # as MAML, whose code the paper uses
    adapts_backbone = False
