"""A local HTTP file server for dataset download tests.

Tests must not reach the internet, yet the download code has to meet what real
servers do: Range requests answered with 206, servers that ignore Range, and
connections that drop half-way through a body. This server serves in-memory
files on 127.0.0.1 and can be told to do each of those, and it records every
request so a test can check what the client asked for.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Request:
    path: str
    range: str | None


@dataclass
class LocalHTTPServer:
    """Serves ``files`` (URL path -> bytes) until :meth:`stop`; a context manager, so a fixture is
    ``with LocalHTTPServer() as server: yield server``.

    ``cut`` maps a path to how many of its next responses end half-way through
    the body (after announcing the full Content-Length); ``supports_range=False``
    answers every request with the whole file, as some servers do.
    """

    files: dict[str, bytes] = field(default_factory=dict)
    cut: dict[str, int] = field(default_factory=dict)
    supports_range: bool = True
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        """Stop serving; later connections to :attr:`url` are refused."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def __enter__(self) -> LocalHTTPServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _take_cut(self, path: str) -> bool:
        with self._lock:
            if self.cut.get(path, 0) > 0:
                self.cut[path] -= 1
                return True
            return False

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                range_header = self.headers.get("Range")
                with server._lock:
                    server.requests.append(Request(self.path, range_header))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
                if server.supports_range and match:
                    start = int(match.group(1))
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                    self.send_header("Accept-Ranges", "bytes" if server.supports_range else "none")
                payload = body[start:]
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if server._take_cut(self.path):
                    payload = payload[: len(payload) // 2]
                self.wfile.write(payload)
                self.wfile.flush()

            def log_message(self, format: str, *args) -> None:  # keep test output clean
                pass

        return Handler
