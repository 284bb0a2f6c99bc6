"""A real HTTP server on loopback that serves model archives, for the artifact tests.

``ArchiveServer`` serves ``files`` (URL path -> bytes) from a thread; ``plan``
(path -> list of "ok" | "corrupt" | "truncate" | an HTTP status | other bytes) says what each
successive GET of a path gets, "ok" once the list is used up. ``gets`` counts
the GETs per path.
"""

from __future__ import annotations

import collections
import http.server
import io
import os
import threading

from meshserve.common.artifacts import pack


def bundle_of(folder) -> bytes:
    out = io.BytesIO()
    pack(folder, out)
    return out.getvalue()


def corrupted(data: bytes) -> bytes:
    """The same archive with one byte of its last file's content flipped (a tar still readable)."""
    at = len(data) - 1024 - 512 - 1 if len(data) > 3000 else len(data) // 2
    while data[at] == 0 and at > 0:
        at -= 1
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


class ArchiveServer:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.plan: dict[str, list] = collections.defaultdict(list)
        self.gets: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                with server._lock:
                    server.gets[self.path] += 1
                    step = server.plan[self.path].pop(0) if server.plan[self.path] else "ok"
                data = server.files.get(self.path)
                if data is None:
                    step = 404
                if isinstance(step, int):
                    self.send_error(step)
                    return
                body = step if isinstance(step, bytes) else corrupted(data) if step == "corrupt" else data
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if step == "truncate" else body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def __enter__(self) -> ArchiveServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


def make_model(folder, factor: int = 2, weights: int = 0) -> os.PathLike:
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(f"# factor {factor}\n")
    (folder / "1" / "model.py").write_text(f"FACTOR = {factor}\n")
    if weights:
        (folder / "1" / "weights.bin").write_bytes(os.urandom(weights))
    return folder
