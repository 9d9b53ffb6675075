"""Shared fixtures: composing real configs and a tiny glyphs dataset cached once per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metarun.config import compose

REPO = Path(__file__).resolve().parents[1]
OMNIGLOT = (REPO.parent / "shared" / "data" / "omniglot").resolve()


@pytest.fixture(scope="session")
def glyph_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("glyphs")


@pytest.fixture(scope="session")
def tiny(glyph_root) -> list[str]:
    """Overrides for a run that takes seconds: a small glyphs set, narrow Conv4, a few steps."""
    return [
        f"dataset.root={glyph_root}",
        "dataset.num_classes=80",
        "dataset.val_classes=15",
        "dataset.test_classes=20",
        "backbone.hidden=16",
        "trainer.steps=6",
        "trainer.val_every=3",
        "trainer.val_episodes=6",
        "trainer.log_every=2",
        "trainer.progress=false",
        "eval.episodes=10",
        "eval.queries=5",
        "task.queries=5",
        "logger=none",
    ]


@pytest.fixture
def one_thread():
    """One intra-op thread: the timing these runs are sized for, and the same sums on any machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def compose_config():
    """``compose_config("train", [...])`` -> the composed DictConfig, as the CLI would build it."""
    return compose


def run_cli(
    *args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300, patches: dict | None = None
) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess (``python -m metarun``), as a user runs it; ``patches``: see tests/helpers/patched_cli.py."""
    module = ["metarun"] if patches is None else ["tests.helpers.patched_cli", json.dumps(patches)]
    return subprocess.run(
        [sys.executable, "-m", *module, *args], cwd=cwd or REPO, env=cli_env(env), capture_output=True, text=True, timeout=timeout
    )


def cli_env(env: dict | None = None) -> dict:
    """A CLI subprocess's environment: this checkout importable, W&B off, tracebacks not forced on."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return full_env


def dataset_config(name: str, **overrides):
    """The composed ``dataset`` node of ``dataset=<name>``, with keys overridden."""
    return compose("train", [f"dataset={name}", *(f"dataset.{k}={v}" for k, v in overrides.items())]).dataset
