"""Where metrics go: always ``metrics.jsonl`` in the run folder, plus the configured backend."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from metarun.errors import ConfigError
from metarun.loggers.base import Logger, Loggers
from metarun.loggers.jsonl import JsonlLogger


def build_logger(
    cfg: DictConfig,
    run_dir: Path,
    run_config: DictConfig,
    job_type: str = "train",
    resume_step: int | None = None,
    name: str | None = None,
    group: str | None = None,
) -> Logger:
    """``name`` and ``group`` label the run in the backend (a readable name, the sweep); the config's own values win."""
    loggers: list[Logger] = []
    if job_type == "train":
        loggers.append(JsonlLogger(run_dir / "metrics.jsonl", truncate_after=resume_step))
    if cfg.backend == "wandb":
        from metarun.loggers.wandb import WandbLogger

        loggers.append(WandbLogger(cfg.wandb, run_dir, run_config, job_type, name, group, resume=resume_step is not None))
    elif cfg.backend != "none":
        raise ConfigError(f"logger.backend={cfg.backend}: valid backends are none, wandb")
    return Loggers(loggers)
