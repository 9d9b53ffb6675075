"""Reads back what W&B wrote for an offline run, so tests check the real output.

An offline run keeps everything (config, history, summary) only in its
``run-<id>.wandb`` transaction log: a LevelDB-style log of protobuf records in
32 KiB blocks after a 7-byte file header.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

HEADER = 7
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    """Every protobuf record of a ``.wandb`` file, in order."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, chunks = HEADER, []
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # the block's tail is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if length == 0 and kind == 0:
            break
        chunks.append(data[pos + HEADER : pos + HEADER + length])
        pos += HEADER + length
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def _value(item) -> object:
    return json.loads(item.value_json)


def _key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


@dataclass
class OfflineRun:
    """What a run's ``.wandb`` file says: the run record, config, history rows and final summary."""

    id: str = ""
    name: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)


def read_run(path: Path) -> OfflineRun:
    run = OfflineRun()
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            run.id, run.name, run.group, run.job_type, run.tags = r.run_id, r.display_name, r.run_group, r.job_type, list(r.tags)
            run.config.update({_key(i): _value(i) for i in r.config.update})
            run.summary.update({_key(i): _value(i) for i in r.summary.update})
        elif kind == "config":
            run.config.update({_key(i): _value(i) for i in rec.config.update})
        elif kind == "history":
            run.history.append({_key(i): _value(i) for i in rec.history.item})
        elif kind == "summary":
            run.summary.update({_key(i): _value(i) for i in rec.summary.update})
            for i in rec.summary.remove:
                run.summary.pop(_key(i), None)
        elif kind == "artifact":
            run.artifacts.append(rec.artifact.name)
    return run


def offline_runs(root: Path) -> list[Path]:
    """The ``.wandb`` files of every offline run under ``root``, oldest first."""
    return sorted(Path(root).rglob("offline-run-*/run-*.wandb"))


def with_default_logger(overrides: list[str]) -> list[str]:
    """Test overrides minus ``logger=...``: the run logs to W&B as it would by default."""
    return [o for o in overrides if not o.startswith("logger=")]


def env_without_credentials(home: Path, **env: str) -> dict[str, str]:
    """A machine that never logged in to W&B: no API key, no netrc, no W&B settings, no WANDB_MODE."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k not in ("NETRC", "HYDRA_FULL_ERROR")}
    return {**clean, "HOME": str(home), "PYTHONPATH": str(Path(__file__).resolve().parents[2]), **env}


def run_without_credentials(*args: str, home: Path, cwd: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """The real CLI (``metarun <args>``) in a subprocess, on such a machine."""
    return subprocess.run(
        [sys.executable, "-m", "metarun", *args],
        cwd=cwd,
        env=env_without_credentials(home, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
