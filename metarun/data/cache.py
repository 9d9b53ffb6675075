"""The decoded-dataset cache in ``dataset.root``.

Decoding thousands of PNGs takes longer than many training runs, so the result
is saved once, keyed by everything that determines it (source files' sizes and
mtimes, preprocessing options, code version). Writes go to a temporary file
that is fsynced and renamed, under a file lock, so several jobs of a sweep can
build the same cache at once and none ever reads a half-written file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from filelock import FileLock

from metarun.data.split import FewShotDataset

CACHE_FORMAT = 1


def file_fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cache_key(parts: dict) -> str:
    blob = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def atomic_torch_save(obj, path: Path) -> None:
    """Save so that ``path`` is either the old file or the complete new one, even across a power cut.

    The temporary file is created with the umask's permissions (not
    ``mkstemp``'s owner-only ones), so checkpoints and caches in a shared
    folder stay readable by the people sharing it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # makes the rename durable where the file system allows it (not all do)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def cached_dataset(root: Path, name: str, key_parts: dict, build: Callable[[], FewShotDataset]) -> FewShotDataset:
    """Return the dataset from ``root/.metarun-cache``, building and saving it on a miss."""
    cache_dir = Path(root) / ".metarun-cache"
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        probe = cache_dir / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError:  # a read-only dataset folder: decode every time rather than fail
        print(f"note: {cache_dir} is not writable; the decoded {name} dataset is not cached", file=sys.stderr)
        return build()
    path = cache_dir / f"{name}-{cache_key(key_parts)}.pt"
    with FileLock(str(path) + ".lock"):
        if path.exists():
            try:
                return FewShotDataset.from_state(torch.load(path, map_location="cpu", weights_only=False))
            except Exception:  # a cache from an older torch or a damaged disk: rebuild it
                path.unlink(missing_ok=True)
        dataset = build()
        try:
            atomic_torch_save(dataset.state(), path)
        except OSError as ex:  # the cache only saves time: a full disk must not stop the run
            print(f"note: the decoded {name} dataset is not cached ({ex.strerror} writing {path})", file=sys.stderr)
        return dataset
