"""Field helpers for typed configs: what a type cannot say about a key.

Kept free of torch and Hydra so that :mod:`metarun.config` and every
algorithm's own ``Config`` dataclass (declared in the algorithm's module, see
:class:`metarun.algorithms.base.Algorithm`) share them; :func:`metarun.config.check_values`
reads the metadata they write.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any


def choice(default: Any, *others: Any) -> Any:
    """A field that takes one of a few values; :func:`metarun.config.check_values` rejects the rest before any work is done."""
    return field(default=default, metadata={"choices": (default, *others)})


def at_least(low: float, default: float) -> Any:
    """A number with a lower bound (a type cannot say that a count must be positive)."""
    return field(default=default, metadata={"min": low})
