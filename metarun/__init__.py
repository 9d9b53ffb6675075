"""metarun: a config-driven meta-learning experiment runner.

``metarun.load(RUN)`` (:func:`metarun.predictor.load`) is imported on first use, so ``import metarun`` stays
light (no torch) for the CLI's quick answers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from metarun.version import __version__

if TYPE_CHECKING:
    from metarun.predictor import load

__all__ = ["__version__", "load"]


def __getattr__(name: str):
    if name == "load":
        from metarun.predictor import load

        return load
    raise AttributeError(f"module 'metarun' has no attribute '{name}'")
