"""The local inference server: Open Inference Protocol over HTTP/1.1, on 127.0.0.1 by default.

One event loop (:mod:`selectors`, epoll on Linux) on a thread of its own reads and writes every
connection; HTTP/1.1 is parsed here, in a few dozen lines, because the protocol this server
speaks is small (no chunked bodies, no upgrades) and a framework would cost more per request
than the model does. (asyncio would do the same job, but importing it loads ssl too: 7 MiB of
RSS on a device that serves plain HTTP on loopback.) Inference runs on ``workers`` threads
(onnxruntime releases the GIL, so two requests compute at once on two cores), or on the loop
itself with ``workers = 0``. Routes::

    GET  /v2                                     server metadata
    GET  /v2/health/live | /v2/health/ready      liveness / readiness
    GET  /metrics                                Prometheus text: requests, latency, drift
    GET  /v2/models/{name}[/versions/{v}]        model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready  model readiness
    POST /v2/models/{name}[/versions/{v}]/infer  inference (JSON or binary tensor extension)
    POST /v2/models/{name}/feedback              ground truth for earlier requests, by id

Every request goes through :meth:`edgepack.agent._runtime.Runtime.run`; while a model has a split
experiment, :meth:`~edgepack.agent._runtime.Runtime.route` picks the version that answers, sticky
per caller (the ``X-Edgepack-Caller`` header, or ``parameters.caller``), and the response's
``model_version`` names it. Bad requests get a 4xx
with ``{"error": "..."}`` saying what was wrong; a valid request on which the model itself fails
(:class:`~edgepack.agent.exceptions.InferenceError`: onnxruntime raised) gets a 500 with the same
JSON body. Nothing a client sends can stop the server, and no client can hold it:

* a request must arrive whole within ``request_timeout`` seconds of its first byte, and an idle
  keep-alive connection is closed after ``idle_timeout`` (a slow or silent client costs a few
  hundred bytes until then, never a thread);
* at ``max_connections`` the longest-idle keep-alive connection is closed to make room, and only
  when every connection is mid-request does a newcomer get a 503;
* a client that does not read its answers stops being read (no unbounded buffers), and one
  connection's requests are answered one at a time, in order.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import re
import selectors
import socket
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import edgepack
from edgepack.agent._experiment import CALLER_HEADER
from edgepack.agent._inference_protocol import (
    decode_feedback,
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
    r"(?P<action>/ready|/infer|/feedback)?/?$"
)
HEADER_LENGTH = "Inference-Header-Content-Length"
# A byte count is ASCII digits only: str.isdigit() also takes '²' or '٣', which int() refuses.
_BYTE_COUNT = re.compile(r"^[ \t]*[0-9]{1,18}[ \t]*$", re.ASCII)
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$", re.ASCII)
MAX_HEAD_BYTES = 64 * 1024  # request line and headers together
MAX_HEADERS = 100
_SERVER = f"edgepack-agent/{edgepack.__version__}".encode()
_JSON = "application/json"
Response = tuple[int, bytes, str, tuple[tuple[str, str], ...]]  # status, body, type, headers


class _Request:
    __slots__ = ("body", "close", "headers", "method", "target")

    def __init__(
        self, method: str, target: str, headers: dict[str, list[str]], close: bool
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.close = close
        self.body = b""

    def header(self, name: str) -> str | None:
        values = self.headers.get(name)
        return values[0] if values else None


class _BadRequestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _json(status: int, data: Any) -> Response:
    return status, json.dumps(data, separators=(",", ":")).encode(), _JSON, ()


def _error(status: int, message: str) -> Response:
    return _json(status, {"error": message})


def _parse_head(head: bytes) -> _Request:
    """The request line and headers (``head`` ends before the blank line)."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise _BadRequestError(400, f"bad request line {lines[0][:80]!r}")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        if re.fullmatch(r"HTTP/[0-9]+\.[0-9]+", version):
            raise _BadRequestError(505, f"{version[:20]} is not supported; use HTTP/1.1")
        raise _BadRequestError(400, f"bad request line {lines[0][:80]!r}")
    if len(lines) - 1 > MAX_HEADERS:
        raise _BadRequestError(431, f"more than {MAX_HEADERS} headers")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.match(name):  # obsolete line folding included
            raise _BadRequestError(400, f"bad header line {line[:80]!r}")
        headers.setdefault(name.lower(), []).append(value.strip(" \t"))
    connection = ",".join(headers.get("connection", ())).lower()
    # HTTP/1.1 keeps the connection unless told to close; HTTP/1.0 closes unless told to keep
    close = "close" in connection if version == "HTTP/1.1" else "keep-alive" not in connection
    return _Request(method, target, headers, close)


class _Server:
    """What every connection shares: the routes, the limits and the connections themselves."""

    def __init__(
        self,
        runtime: Runtime,
        max_request_bytes: int,
        ready: Callable[[], bool],
        metrics: Callable[[], str],
        max_connections: int,
        workers: int,
        request_timeout: float,
        idle_timeout: float,
    ) -> None:
        self.runtime = runtime
        self.max_request_bytes = max_request_bytes
        self.ready = ready
        self.metrics = metrics
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self.connections: set[_Connection] = set()
        self.pool = (
            concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="edgepack-infer")
            if workers > 0
            else None
        )
        self.date = b""
        self.tick()

    def tick(self) -> None:
        """Once a second: the Date header, and connections past their deadline are closed."""
        self.date = _http_date(time.time())
        now = time.monotonic()
        for connection in list(self.connections):
            if connection.deadline <= now:
                connection.expire()

    def admit(self, newcomer: _Connection) -> bool:
        """Make room for ``newcomer``: close the longest-idle connection when full."""
        if len(self.connections) >= self.max_connections:
            idle = [c for c in self.connections if c.idle]
            if not idle:
                return False
            min(idle, key=lambda c: c.since).close()
        self.connections.add(newcomer)
        return True

    # -- routes ----------------------------------------------------------------------------------

    def get(self, path: str) -> Response:
        if path in ("/v2", "/v2/"):
            info = {
                "name": "edgepack-agent",
                "version": edgepack.__version__,
                "extensions": ["binary_tensor_data"],
            }
            return _json(200, info)
        if path == "/metrics":
            return 200, self.metrics().encode(), "text/plain; version=0.0.4; charset=utf-8", ()
        if path == "/v2/health/live":
            return _json(200, {"live": True})
        if path == "/v2/health/ready":
            ready = self.ready()
            return _json(200 if ready else 503, {"ready": ready})
        match = _MODEL_PATH.match(path)
        if not match or match["action"] in ("/infer", "/feedback"):
            return _error(404, f"no such endpoint: GET {path}")
        try:
            served = self.runtime.get(
                match["name"], int(match["version"]) if match["version"] else None
            )
        except RequestError as e:
            return _error(e.status, str(e))
        if match["action"] == "/ready":
            return _json(200, {"name": served.name, "ready": True})
        manifest = served.manifest
        return _json(
            200, model_metadata(served.name, [served.version], manifest.inputs, manifest.outputs)
        )

    def infer(
        self, match: re.Match[str], request: _Request, reply: Callable[[Response], None]
    ) -> None:
        """``POST …/infer`` (on a worker thread, or on the loop with no workers). ``reply``
        gets the answer, from this thread or, for a model that batches, the batcher's."""
        try:
            wanted = _header_length(request.header(HEADER_LENGTH.lower()))
            decoded = decode_infer_request(request.body, wanted)
            version = int(match["version"]) if match["version"] else None
            if self.runtime.experiments.running:  # a split picks the version that answers
                caller = request.header(CALLER_HEADER) or decoded.caller
                if caller is not None and len(caller) > 256:
                    raise RequestError(f"the {CALLER_HEADER} header must be at most 256 characters")
                served = self.runtime.route(match["name"], version, caller)
            else:
                served = self.runtime.get(match["name"], version)
            monitor = self.runtime.monitor
            if monitor is not None and monitor.quality_config.enabled:
                if decoded.id is None:  # an id of its own, returned, so feedback can name it
                    decoded = dataclasses.replace(decoded, id=os.urandom(16).hex())
                runtime = self.runtime

                def done(outputs: dict[str, Any] | None, error: BaseException | None) -> None:
                    if outputs is not None:
                        runtime.remember(served, decoded.id, outputs)
                    reply(_answer(served, decoded, outputs, error))
            else:

                def done(outputs: dict[str, Any] | None, error: BaseException | None) -> None:
                    reply(_answer(served, decoded, outputs, error))

            # run on the model we hold: a hot swap right now must not fail this request
            if self.runtime.batching(served) and self.runtime.run_async(
                served, decoded.inputs, decoded.outputs or None, done
            ):
                return
            outputs = self.runtime.run(served, decoded.inputs, decoded.outputs or None)
        except Exception as e:  # noqa: BLE001 - every failure is answered, by its kind
            reply(_failure(e))
            return
        done(outputs, None)

    def feedback(self, match: re.Match[str], request: _Request) -> Response:
        """``POST /v2/models/NAME/feedback``: ground truth for earlier requests, by id."""
        monitor = self.runtime.monitor
        if monitor is None or not monitor.quality_config.enabled:
            return _error(404, "feedback is off on this agent ([quality] enabled = false)")
        try:
            items = decode_feedback(request.body)
            results: list[dict[str, Any]] = []
            unknown: list[str] = []
            errors: list[str] = []
            for request_id, labels, targets in items:
                try:
                    results.append(
                        monitor.feedback(match["name"], request_id, labels=labels, targets=targets)
                    )
                except RequestError as e:
                    (unknown if e.status == 404 else errors).append(str(e))
        except RequestError as e:
            return _error(e.status, str(e))
        if len(items) == 1 and (unknown or errors):
            return _error(404 if unknown else 400, (unknown or errors)[0])
        body = {"accepted": sum(r["accepted"] for r in results), "results": results}
        if unknown or errors:
            body["errors"] = unknown + errors
        return _json(200, body)


def _answer(
    served: Any, decoded: Any, outputs: dict[str, Any] | None, error: BaseException | None
) -> Response:
    """The response to an inference: the encoded outputs, or what went wrong."""
    if error is not None or outputs is None:
        return _failure(error or RuntimeError("no outputs"))
    try:
        payload, header_length = encode_infer_response(
            served.name, served.version, decoded, outputs
        )
    except Exception as e:  # noqa: BLE001 - answered by its kind
        return _failure(e)
    if header_length is None:
        return 200, payload, _JSON, ()
    return 200, payload, "application/octet-stream", ((HEADER_LENGTH, str(header_length)),)


def _failure(error: BaseException) -> Response:
    if isinstance(error, RequestError):
        return _error(error.status, str(error))
    if isinstance(error, InferenceError):  # a valid request the model fails on: its fault
        log.warning("%s", error)
        return _error(error.status, str(error))
    if isinstance(error, ValueError):
        return _error(400, f"bad request: {error}")
    if isinstance(error, EdgepackError):
        return _error(500, str(error))
    log.error("inference failed", exc_info=error)
    text = str(error).splitlines()[0] if str(error) else repr(error)
    return _error(500, f"inference failed: {text}")


def _header_length(value: str | None) -> int | None:
    if value is None:
        return None
    if not _BYTE_COUNT.match(value):
        raise RequestError(f"{HEADER_LENGTH} must be a byte count, got {value[:40]!r}")
    return int(value)


class _Connection:
    """One client connection: parse, answer in order, enforce the deadlines. (Its callbacks are
    asyncio's Protocol's, called by :class:`_Transport`.)"""

    def __init__(self, server: _Server, loop: _Loop) -> None:
        self.server = server
        self.loop = loop
        self.transport: _Transport | None = None
        self.buffer = bytearray()
        self.request: _Request | None = None  # head parsed, body still arriving
        self.length = 0
        self.discard = 0  # bytes of a refused body still to be swallowed before answering
        self._refused: Response = _error(413, "request body too large")
        self.busy = False  # a request is being answered
        self.writable = True
        self.closing = False
        self.since = time.monotonic()
        self.deadline = self.since + server.idle_timeout

    @property
    def idle(self) -> bool:
        return not self.busy and not self.buffer and self.request is None and not self.discard

    # -- the transport's callbacks ---------------------------------------------------------------

    def connection_made(self, transport: _Transport) -> None:
        self.transport = transport
        if not self.server.admit(self):
            body = b'{"error":"too many connections; retry shortly"}'
            transport.write(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )
            self.closing = True
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.connections.discard(self)

    def pause_writing(self) -> None:
        self.writable = False
        if self.transport is not None:
            self.transport.pause_reading()  # a client that does not read gets nothing more

    def resume_writing(self) -> None:
        self.writable = True
        if self.transport is not None and not self.closing:
            self.transport.resume_reading()
            self._advance()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self.discard:
            taken = min(self.discard, len(data))
            self.discard -= taken
            data = data[taken:]
            if self.discard:
                return
            self._answer_refused()
            return
        if not self.buffer and self.request is None and not self.busy:  # a new request begins
            self.deadline = time.monotonic() + self.server.request_timeout
        self.buffer += data
        self._advance()

    def expire(self) -> None:
        """Past the deadline: an idle connection just closes; a half-sent request gets a 408."""
        if self.busy:  # the model is computing; its own deadline (request_timeout) applies
            return
        if self.request is not None or self.buffer:
            self._write(_error(408, "the request did not arrive in time"), close=True)
        self.close()

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    # -- requests --------------------------------------------------------------------------------

    def _advance(self) -> None:
        """Answer every complete request in the buffer, one at a time."""
        while not self.busy and self.writable and not self.closing:
            if self.request is None:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buffer) > MAX_HEAD_BYTES:
                        self._fail(431, "request headers are too large")
                    return
                if end > MAX_HEAD_BYTES:
                    self._fail(431, "request headers are too large")
                    return
                head = bytes(self.buffer[:end])
                del self.buffer[: end + 4]
                try:
                    self.request = _parse_head(head)
                    self.length = self._body_length(self.request)
                except _BadRequestError as e:
                    self._fail(e.status, str(e))
                    return
                if self.length < 0:  # refused: swallow what the client already sends
                    return
            if len(self.buffer) < self.length:
                return
            request, self.request = self.request, None
            request.body = bytes(self.buffer[: self.length])
            del self.buffer[: self.length]
            self._dispatch(request)

    def _body_length(self, request: _Request) -> int:
        """The body's length, or -1 when the request was refused for its length."""
        if request.headers.get("transfer-encoding") is not None:
            raise _BadRequestError(
                411, "chunked request bodies are not supported; send Content-Length"
            )
        lengths = request.headers.get("content-length", [])
        if len(lengths) > 1:
            # Two lengths (even equal ones) are how requests get smuggled past proxies.
            raise _BadRequestError(400, f"{len(lengths)} Content-Length headers; send exactly one")
        if not lengths:
            if request.method == "POST":
                raise _BadRequestError(411, "a Content-Length header is required")
            return 0
        if not _BYTE_COUNT.match(lengths[0]):
            raise _BadRequestError(
                400, f"Content-Length must be a byte count, got {lengths[0][:40]!r}"
            )
        length = int(lengths[0])
        limit = self.server.max_request_bytes
        if length > limit:
            # Swallow a moderately large body so the client gets our 413 instead of a
            # connection reset; past the cap, answer at once and hang up.
            self._refused = _error(
                413, f"request body is {length} bytes, above the limit of {limit}"
            )
            self.request = None
            self.discard = length if length <= max(4 * limit, 64 * 1024**2) else 0
            taken = min(self.discard, len(self.buffer))
            del self.buffer[:taken]
            self.discard -= taken
            if not self.discard:
                self._answer_refused()
            return -1
        return length

    def _answer_refused(self) -> None:
        self._write(self._refused, close=True)
        self.close()

    def _fail(self, status: int, message: str) -> None:
        self._write(_error(status, message), close=True)
        self.close()

    def _dispatch(self, request: _Request) -> None:
        server = self.server
        path = request.target.split("?", 1)[0]
        if request.method == "GET":
            try:
                response = server.get(path)
            except Exception as e:  # /metrics or readiness raised: a bug, not the client's
                log.exception("GET %s failed", path[:200])
                response = _error(500, f"GET {path[:200]} failed: {e!r}")
            self._respond(request, response)
            return
        if request.method != "POST":
            error = f"method {request.method[:20]} is not allowed here; use GET or POST"
            status, body, kind, _ = _error(405, error)
            self._write((status, body, kind, (("Allow", "GET, POST"),)), close=True)
            self.close()
            return
        match = _MODEL_PATH.match(path)
        if match and match["action"] == "/feedback":
            self._respond(request, server.feedback(match, request))
            return
        if not match or match["action"] != "/infer":
            self._respond(request, _error(404, f"no such endpoint: POST {path}"))
            return
        self.busy = True
        assert self.transport is not None
        self.transport.pause_reading()  # one request at a time per connection

        def reply(response: Response) -> None:  # from any thread
            self.loop.call_soon_threadsafe(self._finish, request, response)

        if server.pool is None:
            server.infer(match, request, reply)
        else:
            server.pool.submit(server.infer, match, request, reply)

    def _finish(self, request: _Request, response: Response) -> None:
        self.busy = False
        self._respond(request, response)
        if not self.closing and self.transport is not None:
            if self.writable:
                self.transport.resume_reading()
            self._advance()

    def _respond(self, request: _Request, response: Response) -> None:
        self._write(response, close=request.close)
        if request.close:
            self.close()
        else:
            now = time.monotonic()
            self.since = now
            self.deadline = now + (
                self.server.request_timeout if self.buffer else self.server.idle_timeout
            )

    def _write(self, response: Response, close: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        status, body, kind, extra = response
        head = [
            b"HTTP/1.1 %d %s\r\nServer: %s\r\nDate: %s\r\n"
            % (status, _PHRASES[status], _SERVER, self.server.date),
            b"Content-Type: %s\r\nContent-Length: %d\r\n" % (kind.encode(), len(body)),
        ]
        for key, value in extra:
            head.append(b"%s: %s\r\n" % (key.encode(), value.encode()))
        if close:
            head.append(b"Connection: close\r\n")  # so keep-alive clients do not reuse it
        head.append(b"\r\n")
        self.transport.write(b"".join(head) + body)


_PHRASES = {int(s): s.phrase.encode() for s in HTTPStatus}
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _http_date(seconds: float) -> bytes:
    """RFC 9110's IMF-fixdate (what email.utils.formatdate writes, without importing email)."""
    t = time.gmtime(seconds)
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
    ).encode()


_HIGH_WATER = 256 * 1024  # unsent bytes at which a connection stops being read
_LOW_WATER = 64 * 1024
_ACCEPT_BURST = 64  # connections accepted per wake-up (the others wait in the backlog)


class _Transport:
    """What :class:`_Connection` needs of an asyncio transport, over one non-blocking socket:
    buffered writes with high/low water marks, pause/resume reading, close after flushing."""

    def __init__(self, loop: _Loop, sock: socket.socket, protocol: _Connection) -> None:
        self._loop = loop
        self._sock = sock
        self._protocol = protocol
        self._out = bytearray()
        self._reading = True
        self._paused_writing = False
        self._closing = False
        self._closed = False
        self._events = 0
        self._update()

    def get_extra_info(self, name: str) -> Any:
        return self._sock if name == "socket" else None

    def is_closing(self) -> bool:
        return self._closing or self._closed

    def write(self, data: bytes) -> None:
        if self._closing or self._closed:
            return
        if not self._out:
            try:
                sent = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._abort()
                return
            data = data[sent:]
            if not data:
                return
        self._out += data
        self._update()
        if len(self._out) > _HIGH_WATER and not self._paused_writing:
            self._paused_writing = True
            self._protocol.pause_writing()

    def pause_reading(self) -> None:
        self._reading = False
        self._update()

    def resume_reading(self) -> None:
        self._reading = True
        self._update()

    def close(self) -> None:
        """Close once what was written is sent."""
        self._closing = True
        if not self._out:
            self._abort()
        else:
            self._update()

    def _update(self) -> None:
        if self._closed:
            return
        events = (selectors.EVENT_READ if self._reading and not self._closing else 0) | (
            selectors.EVENT_WRITE if self._out else 0
        )
        if events == self._events:
            return
        selector = self._loop.selector
        if not events:
            selector.unregister(self._sock)
        elif not self._events:
            selector.register(self._sock, events, self._ready)
        else:
            selector.modify(self._sock, events, self._ready)
        self._events = events

    def _ready(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush()
        if mask & selectors.EVENT_READ and not self._closed and self._reading:
            try:
                data = self._sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._abort()
                return
            if not data:  # the client is gone (or half-closed: nothing more will come)
                self._abort()
                return
            self._protocol.data_received(data)

    def _flush(self) -> None:
        try:
            sent = self._sock.send(self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._abort()
            return
        del self._out[:sent]
        if self._paused_writing and len(self._out) <= _LOW_WATER:
            self._paused_writing = False
            self._protocol.resume_writing()
        if not self._out and self._closing:
            self._abort()
        else:
            self._update()

    def _abort(self) -> None:
        if self._closed:
            return
        self._closed = self._closing = True
        if self._events:
            self._loop.selector.unregister(self._sock)
            self._events = 0
        with contextlib.suppress(OSError):
            self._sock.close()
        self._protocol.connection_lost(None)


class _Loop:
    """The server's event loop: accept, dispatch socket events, run what worker threads hand
    back (:meth:`call_soon_threadsafe`), and tick the connections' deadlines once a second."""

    def __init__(self, listener: socket.socket, server: _Server) -> None:
        self.selector = selectors.DefaultSelector()
        self._listener = listener
        self._server = server
        self._calls: collections.deque[tuple[Callable[..., None], tuple[Any, ...]]] = (
            collections.deque()
        )
        self._wake_read, self._wake_write = socket.socketpair()
        for sock in (listener, self._wake_read, self._wake_write):
            sock.setblocking(False)
        self.selector.register(listener, selectors.EVENT_READ, self._accept)
        self.selector.register(self._wake_read, selectors.EVENT_READ, self._drain_wake)
        self._stopping = False
        self._thread_id = -1

    def call_soon_threadsafe(self, callback: Callable[..., None], *args: Any) -> None:
        """Run ``callback`` on the loop's thread, after the events at hand (from any thread;
        only another thread's call needs to wake the loop)."""
        self._calls.append((callback, args))
        if threading.get_ident() != self._thread_id:
            with contextlib.suppress(BlockingIOError, OSError):  # full: a wake-up is pending
                self._wake_write.send(b"\0")

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_write.send(b"\0")

    def run(self) -> None:
        self._thread_id = threading.get_ident()
        next_tick = time.monotonic() + 1.0
        try:
            while not self._stopping:
                timeout = max(0.0, next_tick - time.monotonic())
                for key, mask in self.selector.select(timeout):
                    self._guarded(key.data, mask)
                while self._calls:
                    callback, args = self._calls.popleft()
                    self._guarded(callback, *args)
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + 1.0
                    self._guarded(self._server.tick)
        finally:
            for connection in list(self._server.connections):
                if connection.transport is not None:
                    connection.transport._abort()
            self.close()

    def close(self) -> None:
        for sock in (self._listener, self._wake_read, self._wake_write):
            with contextlib.suppress(OSError):
                sock.close()
        self.selector.close()

    def _guarded(self, callback: Callable[..., None], *args: Any) -> None:
        """One connection's bug must not stop the loop that serves the others."""
        try:
            callback(*args)
        except Exception:
            log.exception("http: %s failed; continuing", getattr(callback, "__name__", callback))

    def _drain_wake(self, _mask: int) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while self._wake_read.recv(4096):
                pass

    def _accept(self, _mask: int) -> None:
        for _ in range(_ACCEPT_BURST):
            try:
                sock, _address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of descriptors, say: the backlog waits for the next turn
                log.warning("http: cannot accept a connection: %s", e)
                return
            sock.setblocking(False)
            with contextlib.suppress(OSError):  # small request/response pairs: no Nagle wait
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = _Connection(self._server, self)
            connection.connection_made(_Transport(self, sock, connection))


class InferenceServer:
    """Runs the HTTP server on a background thread.

    Args:
        runtime: what to serve.
        host, port: where to listen (port 0 picks a free one; see :attr:`port`).
        max_request_bytes: larger bodies get 413 without being kept.
        ready: returns whether the agent is ready (for ``/v2/health/ready``).
        metrics: returns the Prometheus text for ``/metrics``.
        max_connections: connections open at once; when full, the longest-idle keep-alive
            connection is closed for a newcomer, and a 503 goes out only when none is idle.
        workers: threads that run inference (0: on the event loop itself).
        request_timeout: seconds a request may take to arrive, from its first byte ([server]
            read_timeout; the inference deadline is [runtime] request_timeout).
        idle_timeout: seconds an idle keep-alive connection stays open.
    """

    def __init__(
        self,
        runtime: Runtime,
        host: str = "127.0.0.1",
        port: int = 8080,
        max_request_bytes: int = 16 * 1024**2,
        ready: Callable[[], bool] = lambda: True,
        metrics: Callable[[], str] = lambda: "",
        max_connections: int = 1024,
        workers: int = 1,
        request_timeout: float = 30.0,
        idle_timeout: float = 60.0,
    ) -> None:
        try:
            self._socket = socket.create_server((host, port), backlog=256)
        except OSError as e:
            raise EdgepackError(
                f"cannot listen on {host}:{port}: {e.strerror or e} (is another agent running? "
                "change [server].port in agent.toml)"
            ) from e
        self._server = _Server(
            runtime,
            max_request_bytes,
            ready,
            metrics,
            min(max_connections, _descriptors_left()),
            workers,
            request_timeout,
            idle_timeout,
        )
        self._loop = _Loop(self._socket, self._server)
        self._thread = threading.Thread(target=self._loop.run, name="edgepack-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._socket.getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://{self._socket.getsockname()[0]!s}:{self.port}"

    def start(self) -> InferenceServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.stop()
            self._thread.join(timeout=5)
        else:
            self._loop.close()
        if self._server.pool is not None:
            self._server.pool.shutdown(wait=False, cancel_futures=True)


def _descriptors_left() -> int:
    """Connections this process can hold: its open-file limit less a margin for the rest."""
    try:
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return 1 << 30
    return 1 << 30 if soft == resource.RLIM_INFINITY else max(16, soft - 64)
