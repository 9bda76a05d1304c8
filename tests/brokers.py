"""A real mosquitto broker for tests: started on a free loopback port, stopped afterwards.

When mosquitto is not installed and we are root with apt-get (CI), it is installed first.
Tests that need a broker get one through :func:`mosquitto`; without one they are skipped with
the reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "mosquitto", "mosquitto-clients"]
    if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, check=False)
        subprocess.run(install, env=env, capture_output=True, check=False)
    return shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )


@dataclass
class Broker:
    host: str
    port: int
    directory: Path
    process: subprocess.Popen[bytes]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def kill(self) -> None:
        """SIGKILL: no goodbye to clients, no persistence written on the way out."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start_mosquitto(directory: Path, extra_config: str = "", port: int | None = None) -> Broker:
    """Start mosquitto with ``extra_config`` appended to a loopback listener config."""
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    directory.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    config = directory / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\n"
        + ("allow_anonymous true\n" if "allow_anonymous" not in extra_config else "")
        + ("persistence false\n" if "persistence" not in extra_config else "")
        + "max_queued_messages 10000\n"
        + extra_config
    )
    log = (directory / "mosquitto.log").open("wb")
    process = subprocess.Popen([binary, "-c", str(config)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mosquitto exited: {(directory / 'mosquitto.log').read_text()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return Broker("127.0.0.1", port, directory, process)
        time.sleep(0.05)
    process.kill()
    raise RuntimeError("mosquitto did not start listening within 10 s")


@contextlib.contextmanager
def mosquitto(directory: Path, extra_config: str = "") -> Iterator[Broker]:
    broker = start_mosquitto(directory, extra_config)
    try:
        yield broker
    finally:
        broker.stop()
