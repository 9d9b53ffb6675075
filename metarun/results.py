"""Reading ``eval.json`` results: which key is the score, how a setting is named and shown.

Results are dicts as :mod:`metarun.evaluation` writes them: classification
carries ``accuracy``, the Omniglot runs protocol ``error``, regression its loss
(``mse``); everything else describes the setting. Loggers and the report name
settings and scale scores the same way, so a W&B summary key and a report
column mean the same thing.
"""

from __future__ import annotations

import math

import numpy as np

#: result keys that describe a setting or hold raw scores, never the score itself
SETTING_KEYS = ("ways", "shots", "queries", "episodes", "runs", "ci95", "per_episode", "per_run", "per_episode_ways")
#: scores shown in percent
PERCENT = ("accuracy", "error")


def score_key(result: dict) -> str:
    return next(k for k in result if k not in SETTING_KEYS)


def higher_is_better(key: str) -> bool:
    return key == "accuracy"


def better(key: str, a: float, b: float) -> bool:
    """Whether score ``a`` beats ``b`` for the score named ``key``."""
    return a > b if higher_is_better(key) else a < b


def mean_ci95(values) -> tuple[float, float]:
    """Mean and the half-width ``1.96 · std / sqrt(n)`` of its 95% normal interval (sample std)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        return float(v.mean()) if v.size else float("nan"), float("nan")
    return float(v.mean()), float(1.96 * v.std(ddof=1) / math.sqrt(v.size))


def setting_name(result: dict, protocol: str) -> str:
    """``5w1s``; ``20w1s_runs`` for the Omniglot runs protocol, whose runs are fixed rather than sampled;
    ``md5-50w`` (all episodes) and ``md10-19w`` (a ways bucket) for Meta-Dataset episodes."""
    if protocol == "metadataset":
        return f"md{result['ways']}w"
    return f"{result['ways']}w{result['shots']}s" + ("_runs" if protocol == "omniglot_runs" else "")


def scaled(key: str, value: float) -> float:
    return 100 * value if key in PERCENT else value


def per_item(result: dict) -> list[float]:
    """The per-episode (or per-run) scores behind the mean."""
    return result.get("per_episode", result.get("per_run", []))
