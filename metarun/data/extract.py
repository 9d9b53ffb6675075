"""Unpacking a downloaded dataset archive (tar, tar.gz or zip) into the dataset's folder, once.

The datasets of Meta-Dataset ship as archives of thousands of images that are
decoded once into the cache; unpacking them next to the archive lets the
decoder read files in parallel and lets a user who unpacked by hand skip this
step. A marker file written after the last member records a finished
extraction, so one cut short (Ctrl-C, a full disk) is redone rather than
decoded with files missing. Members that would land outside the folder
(absolute paths, ``..``) are refused; links are not created.
"""

from __future__ import annotations

import shutil
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

from metarun.data.download import ensure_file
from metarun.errors import DataError
from metarun.progress import progress_bar


def marker(archive: Path, into: Path) -> Path:
    return into / f".{archive.name}.extracted"


def extract(archive: Path, into: Path) -> Path:
    """Unpack ``archive`` into ``into`` unless a previous call finished; returns ``into``."""
    archive, into = Path(archive), Path(into)
    done = marker(archive, into)
    if done.exists():
        return into
    into.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, into)
        else:
            _extract_tar(archive, into)
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise DataError(
            f"{archive} is not a complete archive ({type(e).__name__}: {e}): delete it and download it again"
        ) from None
    except OSError as e:
        raise DataError(
            f"cannot unpack {archive} into {into} ({e.strerror or e}): free some space or unpack it by hand"
        ) from None
    done.touch()
    return into


def _inside(into: Path, name: str, archive: Path) -> Path:
    target = (into / name).resolve()
    if not target.is_relative_to(into.resolve()):
        raise DataError(f"{archive} holds {name}, which would be written outside {into}: it is not the dataset's archive")
    return target


def _extract_tar(archive: Path, into: Path) -> None:
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        with progress_bar(len(members), f"unpacking {archive.name}", transient=True) as advance:
            for member in members:
                target = _inside(into, member.name, archive)
                if member.isdir():  # (links and devices are skipped: no dataset archive needs them)
                    target.mkdir(parents=True, exist_ok=True)
                elif member.isfile():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(member) as source, open(target, "wb") as dest:  # type: ignore[union-attr]
                        shutil.copyfileobj(source, dest, 1 << 20)
                advance(1)


def _extract_zip(archive: Path, into: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        with progress_bar(len(members), f"unpacking {archive.name}", transient=True) as advance:
            for member in members:
                _inside(into, member.filename, archive)
                zf.extract(member, into)
                advance(1)


def fetch_unpacked(
    root: Path, find: Callable[[Path], Path | None], archives: Sequence[tuple[str, str, str]], download: bool, what: str
) -> Path:
    """The unpacked dataset under ``root`` (``find`` says where, or None when it is not there), downloading and
    unpacking each ``(file name, url, md5)`` of ``archives`` into ``root`` first when it is missing."""
    found = find(root)
    if found is not None:
        return found
    for name, url, md5 in archives:
        if not (root / name).exists() and not download:
            raise DataError(
                f"{what} is not in {root}: put {', '.join(a[0] for a in archives)} there, unpacked or not "
                f"(or set dataset.download=true to download {'them' if len(archives) > 1 else 'it'})"
            )
        archive = ensure_file(root / name, url, md5, download)
        if not name.endswith((".mat", ".json")):
            extract(archive, root)
    found = find(root)
    if found is None:
        raise DataError(
            f"{', '.join(a[0] for a in archives)} in {root} did not unpack into {what}'s layout: delete them and download them again"
        )
    return found
