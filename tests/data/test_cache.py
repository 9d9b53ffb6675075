"""The dataset cache when several jobs of a sweep build it at the same moment."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

from metarun.data import glyphs
from tests.conftest import REPO, cli_env

JOBS = 4
SIZE = {"num_classes": 120, "val_classes": 10, "test_classes": 10, "image_size": 16}

# Each job signals that it is ready (torch imported), then waits for "go", so that all of them load at once.
JOB = """
import sys, time
from pathlib import Path
from metarun.data import glyphs
from tests.data.test_cache import SIZE, digest
root, ready, go = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
ready.touch()
while not go.exists():
    time.sleep(0.005)
print(digest(glyphs.load(str(root), **SIZE)))
"""


def digest(ds) -> str:
    return hashlib.sha256(b"".join(ds.splits[s].images.numpy().tobytes() for s in ("train", "val", "test"))).hexdigest()


def test_jobs_building_the_same_cache_at_once_all_get_the_same_data(tmp_path: Path) -> None:
    root, go = tmp_path / "glyphs", tmp_path / "go"
    ready = [tmp_path / f"ready-{i}" for i in range(JOBS)]
    jobs = [
        subprocess.Popen(
            [sys.executable, "-c", JOB, str(root), str(r), str(go)],
            cwd=REPO,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in ready
    ]
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in ready) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    results = [job.communicate(timeout=300) for job in jobs]
    for job, (_, err) in zip(jobs, results, strict=True):
        assert job.returncode == 0, err
    assert {out.strip() for out, _ in results} == {digest(glyphs.load(str(root), **SIZE))}  # the last from the cache they wrote
    files = sorted(p.name for p in (root / ".metarun-cache").iterdir())
    assert len([f for f in files if f.endswith(".pt")]) == 1
    assert not [f for f in files if f.endswith(".tmp")]
