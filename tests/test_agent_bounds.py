"""Bounds found by an outside attack, each at its mechanism: a trickle of junk cannot hold a valid
command back, a request cannot amplify its size in memory, a model that loops on live inputs is
stopped at the request deadline, held connections cannot exhaust the server's threads, and a
Content-Length of non-ASCII digits gets its 400."""

from __future__ import annotations

import json
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator
from http.client import HTTPResponse
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from conftest import KeyPair, write_agent_config
from test_agent_fuzz import Link, signed_command
from test_probe import looping_model

from edgepack.agent._config import load_config
from edgepack.agent._daemon import Agent
from edgepack.agent._inference_protocol import decode_infer_request
from edgepack.agent._session import run_session
from edgepack.agent.exceptions import InferenceError
from edgepack.formats.keys import generate_private_key, public_key_pem
from edgepack.formats.messages import JobStatus
from edgepack.formats.topics import Topics

DEVICE = "test-device"


@pytest.fixture
def device(tmp_path: Path, keys: KeyPair) -> Iterator[Link]:
    ops = generate_private_key()
    (tmp_path / "ops.pub").write_bytes(public_key_pem(ops))
    config = write_agent_config(
        tmp_path, keys,
        extra=f'[mqtt]\nhost = "127.0.0.1"\nport = 1\ncommand_keys = ["{tmp_path / "ops.pub"}"]\n',
    )  # fmt: skip
    agent = Agent(load_config(config))
    agent.lifecycle.store.ensure()
    link = Link(agent, ops)
    yield link
    link.link._worker.stop_event.set()
    link.link._inbox.put(None)
    link.link._worker.stop()
    link.link.outbox.close()


def test_a_trickle_of_junk_cannot_hold_a_valid_command_back(device: Link) -> None:
    """Junk every 0.2 s for 8 s (the attack kept a batch open until it stopped); a valid
    command queued 0.5 s in must be taken up while the trickle still runs."""
    topic = Topics().device_jobs(DEVICE, "iris")
    seen: list[tuple[float, JobStatus]] = []
    device.link.runner.report = lambda update: seen.append((time.monotonic(), update.status))
    device.link._worker.start()
    stop = threading.Event()

    def trickle() -> None:
        for _ in range(40):
            if stop.wait(0.2):
                return
            device.link._inbox.put((topic, b"not json"))

    junk = threading.Thread(target=trickle, daemon=True)
    started = time.monotonic()
    junk.start()
    time.sleep(0.5)
    device.link._inbox.put((topic, signed_command(device)))
    deadline = started + 8.0
    while not seen and time.monotonic() < deadline:
        time.sleep(0.05)
    still_trickling = junk.is_alive()
    stop.set()
    junk.join(5)
    assert seen, "the valid command was never taken up"
    assert seen[0][1] is JobStatus.QUEUED
    assert still_trickling, "taken up only after the trickle ended"
    assert seen[0][0] - started < 4.0


def test_one_long_string_among_many_short_ones_costs_its_length_not_a_multiple() -> None:
    """Fixed-width text arrays cost 4 bytes x the longest string for every element: 100,000
    characters and 1,000 empty strings were a gigabyte."""
    strings = ["x" * 100_000] + [""] * 1000
    entry = {"name": "text", "shape": [len(strings)], "datatype": "BYTES", "data": strings}
    body = json.dumps({"inputs": [entry]}).encode()
    tracemalloc.start()
    try:
        request = decode_infer_request(body, None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert request.inputs["text"].dtype == object
    assert request.inputs["text"].shape == (1001,)
    assert peak < 10 * 1024**2, f"decoding a {len(body)}-byte body peaked at {peak} bytes"


def test_a_model_that_loops_on_live_inputs_is_stopped_at_the_request_deadline() -> None:
    session = ort.InferenceSession(looping_model(), providers=["CPUExecutionProvider"])
    started = time.monotonic()
    with pytest.raises(InferenceError, match=r"spin v1 did not answer within 0.5 s, was stopped"):
        run_session(session, None, {"input": np.ones((1, 4), np.float32)}, "spin v1", timeout=0.5)
    assert time.monotonic() - started < 10  # stopped: not 2**62 iterations
    # a model that answers in time is not disturbed by the deadline
    fast = ort.InferenceSession(looping_model(trips=3), providers=["CPUExecutionProvider"])
    out = run_session(fast, None, {"input": np.ones((2, 4), np.float32)}, "spin v2", timeout=30)
    assert out[0].shape == (2,)


def test_request_timeout_is_configured_with_bounds(tmp_path: Path, keys: KeyPair) -> None:
    config = write_agent_config(tmp_path, keys, extra="[runtime]\nrequest_timeout = 2.5\n")
    assert load_config(config).runtime.request_timeout == 2.5
    assert load_config(write_agent_config(tmp_path / "b", keys)).runtime.request_timeout == 60.0


def _status(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    response = HTTPResponse(sock)
    response.begin()
    return response.status, json.loads(response.read())


def test_held_connections_cannot_exhaust_the_server(
    tmp_path: Path, keys: KeyPair, iris_bundles: dict[str, Path]
) -> None:
    config = write_agent_config(tmp_path, keys, extra="max_connections = 3\n")
    agent = Agent(load_config(config)).start(serve_http=True)
    try:
        assert agent.server is not None
        port = agent.server.port
        held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
        for sock in held:  # each holds a handler thread: a request that never completes
            sock.sendall(b"POST /v2/models/iris/infer HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
        time.sleep(0.3)  # the server has accepted them
        with socket.create_connection(("127.0.0.1", port), timeout=5) as extra:
            extra.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            status, body = _status(extra)
        assert status == 503
        assert "too many connections" in body["error"]
        held.pop().close()
        deadline = time.monotonic() + 10
        while True:  # the freed slot is reused
            with socket.create_connection(("127.0.0.1", port), timeout=5) as again:
                again.sendall(b"GET /v2/health/live HTTP/1.1\r\nConnection: close\r\n\r\n")
                status, _ = _status(again)
            if status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert status == 200
        for sock in held:
            sock.close()
    finally:
        agent.stop()


def test_a_content_length_of_non_ascii_digits_gets_a_400(
    tmp_path: Path, keys: KeyPair
) -> None:
    agent = Agent(load_config(write_agent_config(tmp_path, keys))).start(serve_http=True)
    try:
        assert agent.server is not None
        for value in (b"\xb2", b"\xd9\xa3", b"1_0"):  # superscript two, Arabic-Indic three
            with socket.create_connection(("127.0.0.1", agent.server.port), timeout=5) as sock:
                sock.sendall(
                    b"POST /v2/models/iris/infer HTTP/1.1\r\nContent-Length: " + value + b"\r\n\r\n"
                )
                status, body = _status(sock)
            assert status == 400
            assert "Content-Length must be a byte count" in body["error"]
    finally:
        agent.stop()
