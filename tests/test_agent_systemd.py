"""``edgepack-agent run`` under a service manager: READY=1 only once it serves, WATCHDOG=1 while
it is healthy, STOPPING=1 on SIGTERM, spoken to a real ``NOTIFY_SOCKET`` datagram socket the way
systemd listens for a ``Type=notify`` unit."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
from brokers import free_port
from conftest import BIN, KeyPair, write_agent_config


def messages(sock: socket.socket, until: str, deadline: float) -> list[dict[str, str]]:
    """Datagrams received until one holds ``until`` (a KEY), or the deadline passes."""
    seen: list[dict[str, str]] = []
    while time.monotonic() < deadline:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            data = sock.recv(4096).decode()
        except TimeoutError:
            break
        fields = dict(line.split("=", 1) for line in data.split("\n") if "=" in line)
        seen.append(fields)
        if until in fields:
            break
    return seen


def test_run_notifies_ready_watchdog_and_stopping(
    tmp_path: Path, keys: KeyPair, iris_bundles: dict[str, Path]
) -> None:
    port = free_port()
    config = write_agent_config(tmp_path, keys, port=port)
    installed = subprocess.run(
        [BIN / "edgepack-agent", "--config", config, "install", iris_bundles["v1"]],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "1000000"}
    agent = subprocess.Popen(
        [BIN / "edgepack-agent", "--config", config, "run"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        got = messages(sock, "READY", time.monotonic() + 60)
        assert got, "no notification within 60 s"
        assert got[-1]["READY"] == "1"
        assert "iris v1" in got[-1]["STATUS"]
        # READY means serving: the model answers at once
        ready = httpx.get(f"http://127.0.0.1:{port}/v2/models/iris/ready", timeout=5)
        assert ready.status_code == 200
        beats = messages(sock, "WATCHDOG", time.monotonic() + 10)
        assert beats[-1] == {"WATCHDOG": "1"}  # healthy: heartbeats every 0.5 s
        agent.send_signal(signal.SIGTERM)
        assert {"STOPPING": "1"} in messages(sock, "STOPPING", time.monotonic() + 10)
        assert agent.wait(timeout=30) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        sock.close()
