"""The inference server's connection handling, with real sockets on 127.0.0.1: idle connections
make room for newcomers, a half-sent request gets its 408, pipelined requests are answered in
order, a client that never reads its answers holds nobody else up, and 300 idle connections
cost the others nothing. (Routes and request errors: tests/test_agent_server.py.)"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from email.utils import formatdate
from http.client import HTTPResponse
from typing import Any

import pytest

from edgepack.agent._cli import http_probe
from edgepack.agent._config import RuntimeConfig
from edgepack.agent._http_server import InferenceServer, _http_date
from edgepack.agent._runtime import Runtime

WAIT = 10.0  # the longest a socket read may block


@pytest.fixture
def serve() -> Iterator[Any]:
    servers: list[InferenceServer] = []

    def start(**kwargs: Any) -> InferenceServer:
        server = InferenceServer(Runtime(RuntimeConfig()), port=0, **kwargs).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def connect(server: InferenceServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)


def answer(sock: socket.socket) -> tuple[int, dict[str, Any], HTTPResponse]:
    response = HTTPResponse(sock)
    response.begin()
    return response.status, json.loads(response.read()), response


def read_pipelined(stream: Any) -> dict[str, Any]:
    status = stream.readline()
    assert status.startswith(b"HTTP/1.1 200"), status
    length = 0
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    return dict(json.loads(stream.read(length)))


def get(path: str = "/v2/health/live") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


def test_an_idle_connection_makes_room_for_a_newcomer(serve: Any) -> None:
    server = serve(max_connections=2)
    first, second = connect(server), connect(server)
    for sock in (first, second):  # both answered once, then idle on keep-alive
        sock.sendall(get())
        assert answer(sock)[0] == 200
    with connect(server) as newcomer:
        newcomer.sendall(get())
        status, body, _ = answer(newcomer)
        assert (status, body) == (200, {"live": True})
    assert first.recv(1) == b""  # the longest-idle one was closed for it
    second.sendall(get())  # the other still works
    assert answer(second)[0] == 200
    first.close()
    second.close()


def test_connections_mid_request_are_not_evicted_and_the_newcomer_gets_a_503(
    serve: Any,
) -> None:
    server = serve(max_connections=2)
    held = [connect(server) for _ in range(2)]
    for sock in held:
        sock.sendall(b"POST /v2/models/m/infer HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
    time.sleep(0.3)  # the server has read both beginnings (as test_agent_bounds does)
    with connect(server) as probe:
        probe.sendall(get())
        status, body, _ = answer(probe)
    assert status == 503
    assert "too many connections" in body["error"]
    for sock in held:
        sock.close()


def test_a_half_sent_request_gets_a_408_at_the_read_timeout(serve: Any) -> None:
    server = serve(request_timeout=0.3)
    with connect(server) as sock:
        sock.sendall(b'POST /v2/models/m/infer HTTP/1.1\r\nContent-Length: 50\r\n\r\n{"in')
        status, body, response = answer(sock)  # blocks until the server gives up (≤ WAIT)
        assert status == 408
        assert "did not arrive in time" in body["error"]
        assert response.getheader("Connection") == "close"
        assert sock.recv(1) == b""


def test_a_trickling_client_is_cut_at_the_read_timeout_not_per_byte(serve: Any) -> None:
    server = serve(request_timeout=0.5)
    with connect(server) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\n")
        sock.settimeout(0.1)
        sent = 0
        while True:  # one header byte per 0.1 s keeps every per-read timeout happy
            try:
                data = sock.recv(4096)
            except TimeoutError:
                sent += 1
                assert sent < WAIT / 0.1, "the server never cut the trickle"
                sock.sendall(b"X")
                continue
            break
        assert data.startswith(b"HTTP/1.1 408")


def test_pipelined_requests_are_answered_in_order(serve: Any) -> None:
    server = serve()
    with connect(server) as sock:
        sock.sendall(get("/v2/health/live") + get("/v2") + get("/v2/health/ready"))
        stream = sock.makefile("rb")  # one reader: HTTPResponse would buffer past its answer
        bodies = [read_pipelined(stream) for _ in range(3)]
    assert bodies[0] == {"live": True}
    assert bodies[1]["name"] == "edgepack-agent"
    assert bodies[2] == {"ready": True}


def test_a_client_that_never_reads_holds_nobody_else_up(serve: Any) -> None:
    server = serve()
    greedy = connect(server)
    greedy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    greedy.setblocking(False)
    request = get("/v2")
    pushed = 0
    try:  # pipeline until the kernel buffers on both sides are full: the server stopped reading
        while pushed < 200_000:
            greedy.send(request * 64)
            pushed += 1
    except BlockingIOError:
        pass
    assert pushed < 200_000, "the server kept reading from a client that reads nothing"
    with connect(server) as other:
        other.sendall(get())
        assert answer(other)[0] == 200
    greedy.close()


def test_three_hundred_idle_connections_cost_the_others_nothing(serve: Any) -> None:
    server = serve()
    idle = [connect(server) for _ in range(300)]
    try:
        for sock in idle[::50]:  # they are really open: each still answers
            sock.sendall(get())
            assert answer(sock)[0] == 200
        with connect(server) as other:
            for _ in range(20):
                other.sendall(get())
                assert answer(other)[0] == 200
    finally:
        for sock in idle:
            sock.close()


def test_unknown_http_versions_and_garbage_are_refused_in_json(serve: Any) -> None:
    server = serve()
    for line, status in ((b"GET / HTTP/2.0", 505), (b"\x16\x03\x01garbage", 400)):
        with connect(server) as sock:
            sock.sendall(line + b"\r\n\r\n")
            got, body, _ = answer(sock)
            assert got == status
            assert body["error"]


def test_headers_beyond_the_limit_get_a_431(serve: Any) -> None:
    server = serve()
    with connect(server) as sock:
        sock.sendall(b"GET /v2 HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 70_000 + b"\r\n\r\n")
        status, body, _ = answer(sock)
    assert status == 431
    assert "too large" in body["error"]


@pytest.mark.parametrize("seconds", [0.0, 951_782_400.0, 1_796_193_632.5, 4_102_444_799.0])
def test_the_date_header_is_an_imf_fixdate(seconds: float) -> None:
    assert _http_date(seconds).decode() == formatdate(seconds, usegmt=True)


def test_the_watchdog_probe_reads_liveness_without_http_client(serve: Any) -> None:
    server = serve()
    assert http_probe(server.url, timeout=WAIT)() is None
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    said = http_probe(f"http://127.0.0.1:{port}", timeout=WAIT)()
    assert said is not None
    assert said.startswith(f"http: no answer from http://127.0.0.1:{port}")


def test_the_watchdog_probe_reports_a_status_that_is_not_200() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def answer_once() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")

        thread = threading.Thread(target=answer_once, daemon=True)
        thread.start()
        said = http_probe(f"http://127.0.0.1:{port}", timeout=WAIT)()
        thread.join(WAIT)
    assert said == "http: /v2/health/live answered 500"
