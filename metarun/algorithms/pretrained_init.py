"""Starting an algorithm from the backbone of an earlier run (``algo.init_from``), optionally frozen.

Two-stage methods (LEO on pre-trained features, the weight generator on a
pre-trained cosine classifier, a sequence model on pre-trained features) start
from the backbone of any earlier metarun run: its ``backbone.*`` weights and
running statistics are copied in the algorithm's constructor, so the trainer
needs no change, and ``algo.freeze_backbone=true`` then keeps them fixed
(no gradients, batch norm on the loaded running statistics, as ``backbone.freeze=all``
does), which lets the run sample episodes of features computed once
(``trainer.frozen_features``). The loaded
weights are saved in the run's own checkpoints, so resuming or evaluating
the run reads them from there; the constructor still needs ``init_from`` to
exist when the run is rebuilt.
"""

from __future__ import annotations

import torch
from torch import nn

from metarun.algorithms.task_batching import fold_features
from metarun.checkpoint import load_checkpoint
from metarun.errors import CheckpointError, ConfigError
from metarun.models.freeze import apply_freeze

PREFIX = "backbone."


def load_backbone_weights(backbone: nn.Module, path: str) -> dict[str, torch.Tensor]:
    """Copies the ``backbone.*`` tensors of the metarun checkpoint at ``path`` (a run folder or a ``.pt``) into
    ``backbone``; returns the checkpoint's whole model state (a caller may want more of it, e.g. a classifier).

    Names and shapes must match exactly: a backbone of another architecture or width is refused with one line.
    """
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"algo.init_from: {e}") from None
    state = ckpt["model"]
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
        trained = ckpt["config"].get("backbone", {})
        raise CheckpointError(
            f"algo.init_from={path}: its backbone ({trained.get('_target_', '?').rsplit('.', 1)[-1]}"
            f"{', hidden=' + str(trained['hidden']) if 'hidden' in trained else ''}) does not match this run's "
            f"({'; '.join(parts)}): pick the same backbone options as the run it comes from"
        )
    backbone.load_state_dict(theirs)
    return state


def prepare_backbone(backbone: nn.Module, algo: str, init_from: str | None, freeze: bool) -> dict[str, torch.Tensor] | None:
    """Loads ``init_from`` into ``backbone`` (when given) and freezes it (when asked); returns the loaded model state.

    A frozen backbone that was never trained would only ever give random features, so freezing needs ``init_from``.
    """
    if freeze and not init_from:
        raise ConfigError(
            f"algo={algo} algo.freeze_backbone=true needs a pre-trained backbone: set algo.init_from=RUN_OR_PT "
            "(e.g. a run of algo=finetune) or leave the backbone trainable"
        )
    state = load_backbone_weights(backbone, init_from) if init_from else None
    if freeze:
        apply_freeze(backbone, "all", algo)
    return state


def episode_features(backbone: nn.Module, xs: torch.Tensor, xq: torch.Tensor, bn_mode: str, frozen: bool):
    """Features ``[tasks, n, d]`` of support and query, each task with its own statistics (:func:`fold_features`).

    A frozen backbone runs without gradients, on its loaded running statistics (a fixed feature extractor,
    as the two-stage papers use one, whose statistics must not drift); otherwise ``bn_mode`` applies.
    """
    if not frozen:
        return fold_features(backbone, xs, xq, bn_mode)
    with torch.no_grad():
        return fold_features(backbone, xs, xq, "running" if backbone.training else bn_mode)
