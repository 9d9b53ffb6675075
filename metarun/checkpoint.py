"""Checkpoints that let a run continue exactly where it stopped.

A checkpoint holds everything that determines the rest of the run: model,
optimiser and scheduler state, the step, the RNG states of Python, NumPy and
torch (CPU and CUDA), the episode sampler's generator, and the composed
config, so ``resume=<run folder>`` reproduces the uninterrupted run's metrics.
Writes are atomic (temporary file, fsync, rename): a crash or a full disk
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import errno
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metarun.algorithms.base import Algorithm
from metarun.data.cache import atomic_torch_save
from metarun.errors import CheckpointError
from metarun.version import __version__

FORMAT = 1


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save_checkpoint(path: Path, **payload: Any) -> None:
    """Writes ``path`` atomically; a full disk is the user's to fix, so it is a one-line error, not a traceback."""
    try:
        atomic_torch_save({"format": FORMAT, "version": __version__, "rng": rng_state(), **payload}, path)
    except OSError as ex:
        if ex.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise CheckpointError(
            f"no space left writing {path}; the previous checkpoint is intact: free some space, then continue with "
            f"metarun train resume={path.parent.parent}"
        ) from None


def resolve_checkpoint(path: str | Path, prefer: str = "best.pt") -> Path:
    """A run folder (its ``checkpoints/<prefer>``, else ``last.pt``) or a checkpoint file."""
    p = Path(path).expanduser()
    if p.is_dir():
        for name in (prefer, "last.pt"):
            if (p / "checkpoints" / name).is_file():
                return p / "checkpoints" / name
        raise CheckpointError(f"no checkpoint in {p}: expected {p / 'checkpoints' / prefer} (is this a metarun run folder?)")
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist: give a run folder or a .pt file")
    return p


def load_checkpoint(path: str | Path, prefer: str = "best.pt") -> dict:
    p = resolve_checkpoint(path, prefer)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as ex:
        raise CheckpointError(
            f"checkpoint {p} is unreadable or truncated ({type(ex).__name__}): use another checkpoint of the run"
        ) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{p} is not a metarun checkpoint")
    if ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{p} was written by metarun {ckpt.get('version', '?')} in checkpoint format {ckpt.get('format')}; "
            f"this metarun ({__version__}) reads format {FORMAT}: use metarun {ckpt.get('version', '?')} for it, or train again"
        )
    ckpt["path"] = p
    return ckpt


def load_model_state(model: Algorithm, state: dict, source: Path) -> None:
    """Loads weights, naming the keys that differ when the model config does not match."""
    state = model.upgrade_state(state)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if keys:
                parts.append(f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}")
        raise CheckpointError(
            f"checkpoint {source} does not match the model its config builds ({'; '.join(parts)}): "
            "was it written by another version of metarun or of the model code?"
        )
    model.load_state_dict(state)


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Keeps the ``keep`` newest ``step-*.pt`` files."""
    steps = sorted(folder.glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    for p in steps[: max(len(steps) - keep, 0)]:
        p.unlink(missing_ok=True)
