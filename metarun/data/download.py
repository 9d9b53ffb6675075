"""Resumable downloads with an md5 check.

Dataset archives are large and links flaky, so a download goes to
``<dest>.part``, resumes it with an HTTP Range request after a cut, and only
renames it to ``dest`` once the body is complete and its md5 matches: a file
under its final name is always a whole, verified file, and the cache keyed on
it can trust it. A file whose md5 does not match is moved aside rather than
deleted, so a user who supplied it by hand can still inspect it.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from metarun.errors import DataError

CHUNK_BYTES = 1 << 16
BACKOFF_S = 1.0  # first wait between attempts, doubled after each failure
USER_AGENT = "metarun"


class _Truncated(Exception):
    """The server closed the connection before the announced Content-Length."""


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _move_aside(path: Path, dest: Path) -> str:
    """Rename a file whose md5 is wrong so that ``dest`` is never taken for good; returns a phrase for the error message."""
    aside = dest.with_name(dest.name + ".md5-mismatch")
    try:
        os.replace(path, aside)
    except OSError as e:  # a read-only data folder: leave the file, say so
        return f"could not move it aside ({e.strerror})"
    return f"moved aside to {aside}"


def _fetch_once(url: str, part: Path, timeout: float, progress: Progress, task: TaskID) -> None:
    """One HTTP request that appends to (or restarts) ``part`` until the body is complete."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # the .part is not a prefix of this file: start over
            part.unlink()
            raise _Truncated("stale partial file") from e
        raise
    with response:
        resumed = (
            offset > 0 and response.status == 206 and response.headers.get("Content-Range", "").startswith(f"bytes {offset}-")
        )
        if not resumed:
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        progress.update(task, completed=offset, total=total)
        with open(part, "ab" if resumed else "wb") as f:
            received = offset
            while block := response.read(CHUNK_BYTES):
                f.write(block)
                received += len(block)
                progress.update(task, completed=received)
    if total is not None and received != total:
        raise _Truncated(f"got {received} of {total} bytes")


def download(url: str, dest: Path, md5: str | None = None, retries: int = 3, timeout: float = 30.0) -> Path:
    """Download ``url`` to ``dest``, resuming and retrying; ``retries`` counts attempts after the first."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    error: BaseException | None = None
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task(f"downloading {dest.name}", total=None)
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(BACKOFF_S * 2 ** (attempt - 1))
            try:
                _fetch_once(url, part, timeout, progress, task)
                break
            except urllib.error.HTTPError as e:
                if e.code < 500 and e.code != 429:  # the URL is wrong, waiting will not fix it
                    raise DataError(
                        f"cannot download {url} (HTTP {e.code} {e.reason}): put {dest.name} in {dest.parent} to skip the download"
                    ) from None
                error = e
            except (urllib.error.URLError, http.client.HTTPException, OSError, _Truncated) as e:
                error = e
        else:
            reason = getattr(error, "reason", None) or error
            raise DataError(
                f"cannot download {url} after {retries + 1} attempts ({reason}): put {dest.name} in {dest.parent} to skip the download"
            )
    if md5 is not None:
        actual = md5sum(part)
        if actual != md5:
            moved = _move_aside(part, dest)
            raise DataError(
                f"downloaded {dest.name} has md5 {actual}, expected {md5} ({moved}): download it again or put a good copy in {dest.parent}"
            )
    os.replace(part, dest)
    return dest


def ensure_file(path: Path, url: str | None, md5: str | None, download_allowed: bool) -> Path:
    """Return ``path`` once it exists with the expected md5, downloading it when allowed."""
    path = Path(path)
    hint = " (or set dataset.download=true)" if url is not None and not download_allowed else ""
    if path.exists():
        if md5 is None:
            return path
        actual = md5sum(path)
        if actual == md5:
            return path
        moved = _move_aside(path, path)
        if path.exists() or not download_allowed or url is None:  # a file that could not be moved aside cannot be replaced
            raise DataError(
                f"{path} has md5 {actual}, expected {md5} ({moved}): put a good copy of {path.name} in {path.parent}{hint}"
            )
    elif not download_allowed or url is None:
        raise DataError(f"{path.name} missing: put {path.name} in {path.parent}{hint}")
    return download(url, path, md5)
