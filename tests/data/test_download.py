"""Downloads against a local server that resumes, cuts connections and goes away."""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from metarun.data import download as dl
from metarun.errors import DataError
from tests.helpers.http_server import LocalHTTPServer

PAYLOAD = os.urandom(300_000)
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dl, "BACKOFF_S", 0.0)


@pytest.fixture
def server() -> Iterator[LocalHTTPServer]:
    with LocalHTTPServer() as running:
        yield running


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_with_md5(server: LocalHTTPServer, tmp_path: Path) -> None:
    server.files["/data.zip"] = PAYLOAD
    dest = tmp_path / "sub" / "data.zip"
    assert dl.download(f"{server.url}/data.zip", dest, md5=PAYLOAD_MD5) == dest
    assert dest.read_bytes() == PAYLOAD
    assert dl.md5sum(dest) == PAYLOAD_MD5
    assert not (tmp_path / "sub" / "data.zip.part").exists()


def test_resumes_after_cut_with_range(server: LocalHTTPServer, tmp_path: Path) -> None:
    server.files["/data.zip"] = PAYLOAD
    server.cut["/data.zip"] = 1
    dest = tmp_path / "data.zip"
    dl.download(f"{server.url}/data.zip", dest, md5=PAYLOAD_MD5, retries=1)
    assert dest.read_bytes() == PAYLOAD
    first, second = server.requests
    assert first.range is None
    assert second.range == f"bytes={len(PAYLOAD) // 2}-"
    assert not dest.with_name("data.zip.part").exists()


def test_restarts_when_server_ignores_range(tmp_path: Path) -> None:
    dest = tmp_path / "data.zip"
    dest.with_name("data.zip.part").write_bytes(b"stale bytes from another file")
    with LocalHTTPServer(files={"/data.zip": PAYLOAD}, supports_range=False) as server:
        dl.download(f"{server.url}/data.zip", dest, md5=PAYLOAD_MD5)
        assert server.requests[0].range is not None
    assert dest.read_bytes() == PAYLOAD


def test_restarts_when_partial_file_is_too_long(server: LocalHTTPServer, tmp_path: Path) -> None:
    server.files["/data.zip"] = PAYLOAD
    dest = tmp_path / "data.zip"
    dest.with_name("data.zip.part").write_bytes(bytes(len(PAYLOAD) + 1))
    dl.download(f"{server.url}/data.zip", dest, md5=PAYLOAD_MD5, retries=1)
    assert [r.range for r in server.requests] == [f"bytes={len(PAYLOAD) + 1}-", None]
    assert dest.read_bytes() == PAYLOAD


def test_cut_without_retries_leaves_no_file_under_final_name(server: LocalHTTPServer, tmp_path: Path) -> None:
    server.files["/data.zip"] = PAYLOAD
    server.cut["/data.zip"] = 1
    dest = tmp_path / "data.zip"
    with pytest.raises(DataError, match="after 1 attempts"):
        dl.download(f"{server.url}/data.zip", dest, retries=0)
    assert not dest.exists()
    assert dest.with_name("data.zip.part").stat().st_size == len(PAYLOAD) // 2


def test_md5_mismatch_moves_file_aside(server: LocalHTTPServer, tmp_path: Path) -> None:
    server.files["/data.zip"] = PAYLOAD
    dest = tmp_path / "data.zip"
    with pytest.raises(DataError) as info:
        dl.download(f"{server.url}/data.zip", dest, md5="0" * 32)
    message = str(info.value)
    assert "data.zip" in message and "0" * 32 in message and PAYLOAD_MD5 in message
    assert not dest.exists()
    assert not dest.with_name("data.zip.part").exists()
    assert dest.with_name("data.zip.md5-mismatch").read_bytes() == PAYLOAD


def test_server_down_is_one_line(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_unused_port()}/data.zip"
    dest = tmp_path / "data.zip"
    with pytest.raises(DataError) as info:
        dl.download(url, dest, retries=2, timeout=2.0)
    message = str(info.value)
    assert "\n" not in message
    assert url in message and f"put data.zip in {tmp_path}" in message and "after 3 attempts" in message
    assert not dest.exists()


def test_http_404_fails_without_retrying(server: LocalHTTPServer, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="HTTP 404"):
        dl.download(f"{server.url}/nothing.zip", tmp_path / "nothing.zip", retries=3)
    assert len(server.requests) == 1


def test_ensure_file_missing_not_allowed(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data.zip missing: put data.zip in .* \(or set dataset.download=true\)$"):
        dl.ensure_file(tmp_path / "data.zip", "http://127.0.0.1:1/data.zip", PAYLOAD_MD5, download_allowed=False)
    with pytest.raises(DataError, match=r"data.zip missing: put data.zip in [^(]*$"):
        dl.ensure_file(tmp_path / "data.zip", None, PAYLOAD_MD5, download_allowed=True)


def test_ensure_file_keeps_good_file_and_replaces_bad_one(server: LocalHTTPServer, tmp_path: Path) -> None:
    server.files["/data.zip"] = PAYLOAD
    path = tmp_path / "data.zip"
    url = f"{server.url}/data.zip"
    assert dl.ensure_file(path, url, PAYLOAD_MD5, download_allowed=True) == path
    assert len(server.requests) == 1
    dl.ensure_file(path, url, PAYLOAD_MD5, download_allowed=True)
    assert len(server.requests) == 1  # present and verified: no second download

    path.write_bytes(b"damaged")
    dl.ensure_file(path, url, PAYLOAD_MD5, download_allowed=True)
    assert path.read_bytes() == PAYLOAD
    assert tmp_path.joinpath("data.zip.md5-mismatch").read_bytes() == b"damaged"

    path.write_bytes(b"damaged again")
    with pytest.raises(DataError, match="expected " + PAYLOAD_MD5):
        dl.ensure_file(path, url, PAYLOAD_MD5, download_allowed=False)
    assert not path.exists()
