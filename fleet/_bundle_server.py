"""A small HTTP server for signed bundles: what ``edgepack-fleet serve dist/`` runs.

Devices download with edgepack.agent._download (streamed, resumed with ``Range`` + ``If-Range``,
sha256 checked); this serves what that needs and nothing more: the regular files directly inside one
directory (no subdirectories, dotfiles, symlinks or ``..``), GET and HEAD, a strong sha256 ETag,
Last-Modified, single byte ranges (``a-b``, ``a-``, ``-n``) as 206 or 416, and the whole file (200)
when ``If-Range`` does not match. ``/`` is a JSON index of the ``*.edgepack`` files with size and
sha256. Any HTTP server or object store that supports ranges serves devices as well.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import logging
import os
import re
import stat
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlsplit

from edgepack._files import sha256_stream

__all__ = ["BundleServer"]

log = logging.getLogger("edgepack.fleet")

_CHUNK = 256 * 1024
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class BundleServer:
    """Serves the bundles in ``directory`` over HTTP until :meth:`stop`.

    Args:
        directory: the folder whose files are served (``dist/``).
        host: the address to listen on (loopback unless asked otherwise).
        port: the port; 0 picks a free one (read it back from :attr:`port`).
    """

    def __init__(self, directory: Path, host: str = "127.0.0.1", port: int = 8000) -> None:
        self.directory = Path(directory).resolve()
        self._hashes: dict[tuple[str, int, int], str] = {}
        self._httpd = ThreadingHTTPServer((host, port), _Handler)
        self._httpd.bundles = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None
        self.port = int(self._httpd.server_address[1])
        self.url = f"http://{host}:{self.port}"

    def start(self) -> BundleServer:
        """Serve in a background thread; returns self."""
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()
        return self

    def serve(self) -> None:
        """Serve in this thread until interrupted (the CLI's foreground mode); then stop()."""
        self._httpd.serve_forever()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def sha256(self, name: str, handle: BinaryIO, st: os.stat_result) -> str:
        """sha256 of an open file, cached by (name, mtime, size)."""
        key = (name, st.st_mtime_ns, st.st_size)
        digest = self._hashes.get(key)  # two threads may both hash a new file: same answer
        if digest is None:
            digest = self._hashes[key] = sha256_stream(handle).hexdigest()
            handle.seek(0)
        return digest

    def index(self) -> list[dict[str, Any]]:
        """Name, size and sha256 of every ``*.edgepack`` file served."""
        entries = []
        for path in sorted(self.directory.glob("[!.]*.edgepack")):
            try:
                with _open_regular(path) as handle:
                    st = os.fstat(handle.fileno())
                    digest = self.sha256(path.name, handle, st)
            except OSError:
                continue  # not a regular file, or removed while listing
            entries.append({"name": path.name, "size": st.st_size, "sha256": digest})
        return entries


def _open_regular(path: Path) -> BinaryIO:
    """Open a regular file, not through a symlink; OSError for anything else."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    handle = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        handle.close()
        raise OSError(f"{path} is not a regular file")
    return handle


def _byte_range(header: str, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a single ``Range``; ``None``: send it all; ValueError: a 416."""
    got = _RANGE.fullmatch(header.strip())
    if got is None or got[1] == got[2] == "":
        return None
    if got[1] == "":  # the last n bytes
        if int(got[2]) == 0 or size == 0:
            raise ValueError("empty suffix range")
        return max(0, size - int(got[2])), size - 1
    first = int(got[1])
    last = int(got[2]) if got[2] else size - 1
    if got[2] and last < first:
        return None  # not a valid range: ignored
    if first >= size:
        raise ValueError("range starts past the end")
    return first, min(last, size - 1)


class _Handler(BaseHTTPRequestHandler):
    server_version = "edgepack-bundles"
    protocol_version = "HTTP/1.1"
    timeout = 60  # a client that stops reading or sending frees its thread

    def do_GET(self) -> None:
        bundles: BundleServer = self.server.bundles  # type: ignore[attr-defined]
        path = unquote(urlsplit(self.path).path)
        if path == "/":
            index = json.dumps({"bundles": bundles.index()}, indent=2) + "\n"
            self._small(HTTPStatus.OK, index, "application/json")
            return
        name = path[1:]
        try:
            if name.startswith(".") or any(c in name for c in "/\\\0"):
                raise OSError("only files directly inside the directory are served")
            handle = _open_regular(bundles.directory / name)
        except OSError:
            self._small(HTTPStatus.NOT_FOUND, "not found\n", "text/plain")
            return
        with handle:
            st = os.fstat(handle.fileno())
            etag = f'"{bundles.sha256(name, handle, st)}"'
            headers = {
                "Content-Type": "application/octet-stream",
                "ETag": etag,
                "Last-Modified": email.utils.formatdate(st.st_mtime, usegmt=True),
                "Accept-Ranges": "bytes",
            }
            wanted = self.headers.get("Range")
            if self.headers.get("If-Range", etag) != etag:
                wanted = None  # the client's copy is of another file: it gets this one whole
            try:
                span = _byte_range(wanted, st.st_size) if wanted else None
            except ValueError:
                headers["Content-Range"] = f"bytes */{st.st_size}"
                self._head(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, 0, headers)
                return
            if span is None:
                span = (0, st.st_size - 1)
                self._head(HTTPStatus.OK, st.st_size, headers)
            else:
                headers["Content-Range"] = f"bytes {span[0]}-{span[1]}/{st.st_size}"
                self._head(HTTPStatus.PARTIAL_CONTENT, span[1] - span[0] + 1, headers)
            remaining = span[1] - span[0] + 1 if self.command == "GET" else 0
            handle.seek(span[0])
            while remaining > 0:  # streamed: a bundle may be larger than this host's memory
                chunk = handle.read(min(_CHUNK, remaining))
                if not chunk:
                    break  # the file shrank while serving: the client sees a short body
                self.wfile.write(chunk)
                remaining -= len(chunk)

    do_HEAD = do_GET  # noqa: N815 - the stdlib's name

    def _head(self, status: HTTPStatus, length: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def _small(self, status: HTTPStatus, text: str, content_type: str) -> None:
        data = text.encode()
        self._head(status, len(data), {"Content-Type": content_type})
        if self.command == "GET":
            self.wfile.write(data)

    def handle(self) -> None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, TimeoutError):
            super().handle()  # a device that hangs up resumes later with a Range request

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)
