"""The local inference server: Open Inference Protocol over HTTP/1.1, on 127.0.0.1 by default.

A threaded server from the standard library (one thread per keep-alive connection), so the device
installs nothing more for it. Routes::

    GET  /v2                                     server metadata
    GET  /v2/health/live | /v2/health/ready      liveness / readiness
    GET  /metrics                                Prometheus text: requests, latency, drift
    GET  /v2/models/{name}[/versions/{v}]        model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready  model readiness
    POST /v2/models/{name}[/versions/{v}]/infer  inference (JSON or binary tensor extension)

Every request goes through :meth:`edgepack.agent._runtime.Runtime.infer`. Bad requests get a 4xx
with ``{"error": "..."}`` saying what was wrong; a valid request on which the model itself fails
(:class:`~edgepack.agent.exceptions.InferenceError`: onnxruntime raised) gets a 500 with the same
JSON body. Nothing a client sends can stop the server.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import sys
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import edgepack
from edgepack.agent._inference_protocol import (
    decode_infer_request,
    encode_infer_response,
    model_metadata,
)
from edgepack.agent._runtime import Runtime
from edgepack.agent.exceptions import EdgepackError, InferenceError, RequestError

__all__ = ["InferenceServer"]

log = logging.getLogger("edgepack.agent.http")

_MODEL_PATH = re.compile(
    r"^/v2/models/(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]{0,63})(?:/versions/(?P<version>\d{1,18}))?"
    r"(?P<action>/ready|/infer)?/?$"
)
HEADER_LENGTH = "Inference-Header-Content-Length"
# A byte count is ASCII digits only: str.isdigit() also takes '²' or '٣', which int() refuses.
_BYTE_COUNT = re.compile(r"^[ \t]*[0-9]{1,18}[ \t]*$", re.ASCII)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # A half-sent request or an idle keep-alive connection frees its thread after this long.
    timeout = 60
    server_version = f"edgepack-agent/{edgepack.__version__}"
    server: _Server

    def setup(self) -> None:
        super().setup()
        # Small request/response pairs on a keep-alive connection: don't wait for Nagle.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s - " + format, self.address_string(), *args)

    def _send(
        self,
        status: int,
        body: bytes,
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")  # so keep-alive clients do not reuse it
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, data: Any) -> None:
        self._send(status, json.dumps(data, separators=(",", ":")).encode())

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors the standard library raises itself (a malformed request line, headers too
        long, an unknown method) answer in JSON like every other error."""
        if code == HTTPStatus.NOT_IMPLEMENTED:  # a method we do not serve
            self._method_not_allowed()
            return
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # an unparsable request line: answer in 1.1
            self.request_version = self.protocol_version
        with contextlib.suppress(OSError):  # the client may be gone
            self._error(code, message or HTTPStatus(code).phrase)

    def _method_not_allowed(self) -> None:
        self.close_connection = True  # its body (if any) is never read
        error = {"error": f"method {self.command[:20]} is not allowed here; use GET or POST"}
        self._send(405, json.dumps(error).encode(), {"Allow": "GET, POST"})

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        runtime = self.server.runtime
        if path in ("/v2", "/v2/"):
            self._json(
                200,
                {
                    "name": "edgepack-agent",
                    "version": edgepack.__version__,
                    "extensions": ["binary_tensor_data"],
                },
            )
            return
        if path == "/metrics":
            body = self.server.metrics().encode()
            self._send(200, body, content_type="text/plain; version=0.0.4; charset=utf-8")
            return
        if path == "/v2/health/live":
            self._json(200, {"live": True})
            return
        if path == "/v2/health/ready":
            ready = self.server.ready()
            self._json(200 if ready else 503, {"ready": ready})
            return
        match = _MODEL_PATH.match(path)
        if not match or match["action"] == "/infer":
            self._error(404, f"no such endpoint: GET {path}")
            return
        try:
            served = runtime.get(match["name"], int(match["version"]) if match["version"] else None)
        except RequestError as e:
            self._error(e.status, str(e))
            return
        if match["action"] == "/ready":
            self._json(200, {"name": served.name, "ready": True})
            return
        outputs = served.manifest.outputs
        self._json(
            200, model_metadata(served.name, [served.version], served.manifest.inputs, outputs)
        )

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        match = _MODEL_PATH.match(path)
        if not match or match["action"] != "/infer":
            self._drain_or_close()
            self._error(404, f"no such endpoint: POST {path}")
            return
        if self.headers.get("Transfer-Encoding") is not None:
            self.close_connection = True
            self._error(411, "chunked request bodies are not supported; send Content-Length")
            return
        lengths = self.headers.get_all("Content-Length") or []
        if len(lengths) > 1:
            # Two lengths (even equal ones) are how requests get smuggled past proxies.
            self.close_connection = True
            self._error(400, f"{len(lengths)} Content-Length headers; send exactly one")
            return
        if not lengths or not _BYTE_COUNT.match(lengths[0]):
            self.close_connection = True
            if not lengths:
                self._error(411, "a Content-Length header is required")
            else:
                self._error(400, f"Content-Length must be a byte count, got {lengths[0][:40]!r}")
            return
        length = int(lengths[0])
        limit = self.server.max_request_bytes
        if length > limit:
            # Read (and discard) a moderately large body so the client gets our 413 instead of
            # a connection reset; past the cap, just hang up after answering.
            self._discard(length, cap=max(4 * limit, 64 * 1024**2))
            self.close_connection = True
            self._error(413, f"request body is {length} bytes, above the limit of {limit}")
            return
        body = self.rfile.read(length)
        try:
            request = decode_infer_request(body, _header_length(self.headers.get(HEADER_LENGTH)))
            version = int(match["version"]) if match["version"] else None
            served = self.server.runtime.get(match["name"], version)
            # run on the model we hold: a hot swap right now must not fail this request
            outputs = self.server.runtime.run(served, request.inputs, request.outputs or None)
            payload, header_length = encode_infer_response(
                served.name, served.version, request, outputs
            )
        except RequestError as e:
            self._error(e.status, str(e))
            return
        except InferenceError as e:  # a valid request the model fails on: the model's fault
            log.warning("%s", e)
            self._error(e.status, str(e))
            return
        except ValueError as e:
            self._error(400, f"bad request: {e}")
            return
        except EdgepackError as e:
            self._error(500, str(e))
            return
        except Exception as e:
            log.exception("inference failed")
            self._error(500, f"inference failed: {str(e).splitlines()[0] if str(e) else e!r}")
            return
        if header_length is None:
            self._send(200, payload)
        else:
            self._send(
                200,
                payload,
                {HEADER_LENGTH: str(header_length)},
                content_type="application/octet-stream",
            )

    def _discard(self, length: int, cap: int) -> None:
        remaining = length if length <= cap else 0
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 1 << 20))
            if not chunk:
                break
            remaining -= len(chunk)

    def _drain_or_close(self) -> None:
        lengths = self.headers.get_all("Content-Length") or ["0"]
        ok = len(lengths) == 1 and _BYTE_COUNT.match(lengths[0])
        length = int(lengths[0]) if ok else -1
        if 0 <= length <= self.server.max_request_bytes:
            self.rfile.read(length)
        else:
            self.close_connection = True


def _header_length(value: str | None) -> int | None:
    if value is None:
        return None
    if not _BYTE_COUNT.match(value):
        raise RequestError(f"{HEADER_LENGTH} must be a byte count, got {value[:40]!r}")
    return int(value)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        runtime: Runtime,
        max_request_bytes: int,
        ready: Callable[[], bool],
        metrics: Callable[[], str],
        max_connections: int,
    ) -> None:
        self.runtime = runtime
        self.max_request_bytes = max_request_bytes
        self.ready = ready
        self.metrics = metrics
        self.max_connections = max_connections
        self._active = 0
        self._active_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """One thread per connection, up to ``max_connections``; beyond, a 503 at once, so
        held or idle connections can never exhaust the process's threads."""
        with self._active_lock:
            full = self._active >= self.max_connections
            if not full:
                self._active += 1
        if full:
            body = b'{"error":"too many connections; retry shortly"}'
            with contextlib.suppress(OSError):
                request.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                    b"Retry-After: 1\r\nConnection: close\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self._active_lock:
            self._active -= 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up or timed out is routine; anything else is logged with its trace."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            log.debug("client %s went away: %s", client_address, error)
        else:
            log.exception("unexpected error serving %s", client_address)


class InferenceServer:
    """Runs the HTTP server on a background thread.

    Args:
        runtime: what to serve.
        host, port: where to listen (port 0 picks a free one; see :attr:`port`).
        max_request_bytes: larger bodies get 413 without being read.
        ready: returns whether the agent is ready (for ``/v2/health/ready``).
        metrics: returns the Prometheus text for ``/metrics``.
        max_connections: connections served at once; more get a 503 and are closed.
    """

    def __init__(
        self,
        runtime: Runtime,
        host: str = "127.0.0.1",
        port: int = 8080,
        max_request_bytes: int = 16 * 1024**2,
        ready: Callable[[], bool] = lambda: True,
        metrics: Callable[[], str] = lambda: "",
        max_connections: int = 128,
    ) -> None:
        try:
            self._server = _Server(
                (host, port), runtime, max_request_bytes, ready, metrics, max_connections
            )
        except OSError as e:
            raise EdgepackError(
                f"cannot listen on {host}:{port}: {e.strerror or e} (is another agent running? "
                "change [server].port in agent.toml)"
            ) from e
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            name="edgepack-http",
            kwargs={"poll_interval": 0.2},
            daemon=True,
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = self._server.server_address[0]
        return f"http://{host!s}:{self.port}"

    def start(self) -> InferenceServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
