"""Supervision: the sd_notify protocol against a real datagram socket, heartbeats judged by an
injected clock, the watchdog withholding its heartbeat while a component is wedged, and worker
threads restarted after they crash."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgepack.agent._supervise import Heartbeats, SupervisedThread, Watchdog
from edgepack.agent._systemd import Notifier, watchdog_interval


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    """A real AF_UNIX datagram socket, as systemd listens on for a Type=notify service."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(5)
    yield sock
    sock.close()


def received(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.split("\n"))


def nothing_pending(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(4096)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(5)
    return False


def test_notifier_speaks_the_sd_notify_protocol(
    notify_socket: socket.socket, tmp_path: Path
) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")})
    assert notifier.enabled
    assert notifier.ready("serving churn v7")
    assert received(notify_socket) == {"READY": "1", "STATUS": "serving churn v7"}
    assert notifier.watchdog()
    assert received(notify_socket) == {"WATCHDOG": "1"}
    assert notifier.status("line one\nline two")
    assert received(notify_socket) == {"STATUS": "line one line two"}  # one line, always
    assert notifier.stopping()
    assert received(notify_socket) == {"STOPPING": "1"}


def test_notifier_reaches_an_abstract_socket() -> None:
    name = f"edgepack-test-{os.getpid()}-{threading.get_ident()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready("up")
        assert received(sock) == {"READY": "1", "STATUS": "up"}
    finally:
        sock.close()


def test_outside_systemd_and_with_a_dead_socket_notifying_is_harmless(tmp_path: Path) -> None:
    assert not Notifier({}).enabled
    assert Notifier({}).ready("up") is False
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert gone.enabled
    assert gone.watchdog() is False  # logged, never raised


def test_watchdog_interval_is_half_of_what_systemd_asks_and_only_for_us() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    mine = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(mine) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "junk"}) is None
    assert watchdog_interval({}) is None


def test_heartbeats_go_stale_and_announced_work_is_bounded() -> None:
    clock = FakeClock()
    beats = Heartbeats(clock)
    beats.register("commands", stale_after=60)
    beats.register("http", stale_after=30)
    assert beats.stale() == []
    clock.now += 31
    assert beats.stale() == ["http (silent for 31 s)"]
    beats.beat("http")
    with beats.busy("commands", seconds=600):
        clock.now += 500  # a long install inside its deadline is not a wedge
        beats.beat("http")
        assert beats.stale() == []
        clock.now += 200
        beats.beat("http")
        assert beats.stale() == ["commands (busy past its deadline by 100 s)"]
    assert beats.stale() == []  # the work ended: it beat on the way out
    beats.unregister("commands")
    clock.now += 100
    assert beats.stale() == ["http (silent for 100 s)"]


def test_watchdog_withholds_the_heartbeat_while_a_component_is_wedged(
    notify_socket: socket.socket, tmp_path: Path
) -> None:
    clock = FakeClock()
    beats = Heartbeats(clock)
    beats.register("commands", stale_after=60)
    probe_answer: list[str | None] = [None]
    dog = Watchdog(
        Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")}),
        beats,
        interval=15,
        probes=(lambda: probe_answer[0],),
    )
    assert dog.check() == ()
    assert received(notify_socket) == {"WATCHDOG": "1"}
    clock.now += 61
    assert dog.check() == ("commands (silent for 61 s)",)
    assert received(notify_socket) == {"STATUS": "unhealthy: commands (silent for 61 s)"}
    assert nothing_pending(notify_socket)  # no WATCHDOG=1: systemd will restart the unit
    beats.beat("commands")
    probe_answer[0] = "http: no answer from 127.0.0.1:8080 within 5 s"
    assert dog.check() == ("http: no answer from 127.0.0.1:8080 within 5 s",)
    received(notify_socket)  # the new status line
    assert nothing_pending(notify_socket)
    probe_answer[0] = None
    assert dog.check() == ()
    assert received(notify_socket) == {"STATUS": "serving"}
    assert received(notify_socket) == {"WATCHDOG": "1"}


def test_a_crashing_probe_is_an_unhealthy_probe(tmp_path: Path) -> None:
    def probe() -> str | None:
        raise RuntimeError("socket exploded")

    dog = Watchdog(Notifier({}), Heartbeats(FakeClock()), interval=1, probes=(probe,))
    assert dog.check() == ("probe failed: socket exploded",)


def test_a_worker_that_dies_is_restarted_and_each_crash_reported() -> None:
    crashes: list[tuple[str, str]] = []
    runs = threading.Semaphore(0)
    calls = {"n": 0}

    def loop(stop: threading.Event) -> None:
        calls["n"] += 1
        runs.release()
        if calls["n"] <= 2:
            raise RecursionError("maximum recursion depth exceeded")  # what deep JSON does
        if calls["n"] == 3:
            return  # returning while not stopped is a crash too
        stop.wait()

    worker = SupervisedThread(
        "commands", loop, on_crash=lambda n, e, t: crashes.append((n, e)), backoff=0.001
    ).start()
    for _ in range(4):
        assert runs.acquire(timeout=10)
    assert worker.is_alive()
    worker.stop()
    assert not worker.is_alive()
    assert worker.crashes == 3
    assert crashes[0] == ("commands", "RecursionError: maximum recursion depth exceeded")
    assert crashes[2] == ("commands", "the worker loop returned without being stopped")


def test_a_failing_crash_report_does_not_stop_the_restart() -> None:
    runs = threading.Semaphore(0)

    def loop(stop: threading.Event) -> None:
        runs.release()
        raise ValueError("Exceeds the limit (4300 digits) for integer string conversion")

    def report(name: str, error: str, trace: str) -> None:
        raise OSError("disk full")

    worker = SupervisedThread("presence", loop, on_crash=report, backoff=0.001).start()
    for _ in range(3):
        assert runs.acquire(timeout=10)
    worker.stop()
    assert worker.crashes >= 3
