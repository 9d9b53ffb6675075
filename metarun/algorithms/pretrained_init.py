"""Starting a run from the backbone of an earlier one (``trainer.init_from``), optionally frozen.

Two-stage methods (LEO on pre-trained features, the weight generator on a
pre-trained cosine classifier, a sequence model on pre-trained features) start
from the backbone of any earlier metarun run: the trainer hands a fresh run's
algorithm that run's model state (:meth:`metarun.algorithms.base.Algorithm.start_from`),
which copies its ``backbone.*`` weights and running statistics here, after they
are checked against this run's backbone. Resumed and re-evaluated runs read them
from their own checkpoints, so the earlier run may be gone by then.
``algo.freeze_backbone=true`` keeps the backbone fixed from construction (no
gradients, batch norm on its running statistics, as ``backbone.freeze=all``
does), which lets the run sample episodes of features computed once
(``trainer.frozen_features``).
"""

from __future__ import annotations

import torch
from torch import nn

from metarun.algorithms.task_batching import fold_features
from metarun.errors import CheckpointError
from metarun.models.freeze import apply_freeze

PREFIX = "backbone."


def load_backbone_weights(backbone: nn.Module, state: dict[str, torch.Tensor], config: dict, source: str) -> None:
    """Copies the ``backbone.*`` tensors of a run's model ``state`` (trained with ``config``, read from ``source``)
    into ``backbone``. Names and shapes must match exactly: a backbone of another architecture or width is refused
    with one line."""
    theirs = {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}
    own = backbone.state_dict()
    missing = sorted(set(own) - set(theirs))
    unexpected = sorted(set(theirs) - set(own))
    shapes = sorted(k for k in set(own) & set(theirs) if own[k].shape != theirs[k].shape)
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if keys:
                parts.append(f"{label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}")
        trained = config.get("backbone", {})
        raise CheckpointError(
            f"trainer.init_from={source}: its backbone ({trained.get('_target_', '?').rsplit('.', 1)[-1]}"
            f"{', hidden=' + str(trained['hidden']) if 'hidden' in trained else ''}) does not match this run's "
            f"({'; '.join(parts)}): pick the same backbone options as the run it comes from"
        )
    backbone.load_state_dict(theirs)


def fix_backbone(backbone: nn.Module, algo: str) -> None:
    """``algo.freeze_backbone=true``: every weight fixed, batch norm on its running statistics."""
    apply_freeze(backbone, "all", algo)


def episode_features(backbone: nn.Module, xs: torch.Tensor, xq: torch.Tensor, bn_mode: str, frozen: bool):
    """Features ``[tasks, n, d]`` of support and query, each task with its own statistics (:func:`fold_features`).

    A frozen backbone runs without gradients, on its loaded running statistics (a fixed feature extractor,
    as the two-stage papers use one, whose statistics must not drift); otherwise ``bn_mode`` applies.
    """
    if not frozen:
        return fold_features(backbone, xs, xq, bn_mode)
    with torch.no_grad():
        return fold_features(backbone, xs, xq, "running" if backbone.training else bn_mode)
