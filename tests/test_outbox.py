"""Store-and-forward: the device's outbox keeps order and its bound, and nothing is lost or doubled.

First :class:`Outbox` alone: the order survives a process restart (close, then a new ``Outbox`` on
the same file), and the bound drops the oldest telemetry first, then the oldest drift reports,
counted, and never a job update (an outbox of job updates alone grows past the bound).

Then the whole path through a real mosquitto: a collector writing to SQLite, and one device (an
:class:`Agent` with its :class:`DeviceLink`) serving iris with requests flowing, so that drift
reports (windows of 50 rows) and telemetry (every 0.5 s) keep coming. Twice the broker is stopped
while a deploy job runs: the job's progress and the drift reports are produced while it is down.
The second time the agent itself is stopped during the outage with those messages undelivered,
and a new agent on the same state directory starts once the broker is back. In the end every job
update and every drift report is in the collector's store exactly once, in order, numbered
without a gap.

The device reaches the broker through a relay of ours that the test can cut. It is cut while the
broker is down and reopened only once the collector has subscribed again: the broker keeps no
sessions across a restart here, so a device that reconnected first would hand its backlog to a
broker with no subscriber. The last test lets the device come back first: it must hold its
reports until the collector announces itself again (collector presence).
"""

from __future__ import annotations

import collections
import contextlib
import json
import random
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from brokers import Broker, free_port, start_mosquitto
from conftest import KeyPair, _write_pair, write_agent_config
from paho.mqtt.enums import CallbackAPIVersion

from edgepack.agent import _fleet_link as fleet_link
from edgepack.agent._config import DownloadConfig, load_config
from edgepack.agent._daemon import Agent
from edgepack.agent._download import HttpFetcher
from edgepack.agent._fleet_link import DeviceLink
from edgepack.agent._outbox import KINDS, Outbox
from edgepack.fleet._broker import BrokerOptions, connect, publish_and_wait
from edgepack.fleet._bundle_server import BundleServer
from edgepack.fleet._collector import Collector
from edgepack.fleet._commands import find_bundles, publish_command
from edgepack.fleet._database import FleetStore, open_store
from edgepack.formats.keys import load_private_key
from edgepack.formats.messages import TERMINAL, ReportKind, build_report

WAIT = 30.0  # the longest any single wait may take
OUTAGE = 3.0  # seconds the broker stays down, at least

# --- the outbox alone -----------------------------------------------------------------------------


def drain(box: Outbox) -> list[tuple[int, str, bytes]]:
    """Deliver everything, oldest first, as the MQTT link does: peek, then remove."""
    out = []
    while (message := box.peek()) is not None:
        out.append((message.id, message.kind, message.payload))
        box.remove(message.id)
    return out


def test_order_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    box = Outbox(path)
    for i in range(30):
        box.put(KINDS[i % len(KINDS)], f"t/{i}", str(i).encode())
    delivered = [payload for _, _, payload in drain_some(box, 10)]
    assert delivered == [str(i).encode() for i in range(10)]
    assert [box.next_seq("drift") for _ in range(3)] == [1, 2, 3]
    box.close()

    box = Outbox(path)  # the agent restarted
    assert len(box) == 20
    for i in range(30, 35):
        box.put(KINDS[i % len(KINDS)], f"t/{i}", str(i).encode())
    rest = drain(box)
    assert [payload for _, _, payload in rest] == [str(i).encode() for i in range(10, 35)]
    kinds = [KINDS[i % len(KINDS)] for i in range(10, 35)]
    assert [topic_kind for _, topic_kind, _ in rest] == kinds
    assert box.next_seq("drift") == 4  # report numbers continue, never restart
    assert box.next_seq("telemetry") == 1
    last_id = rest[-1][0]
    box.close()

    box = Outbox(path)  # empty now: a new message must still sort after every older one
    box.put("job", "t/new", b"new")
    message = box.peek()
    assert message is not None
    assert message.id > last_id
    assert (path.stat().st_mode & 0o777) == 0o600
    box.close()


def drain_some(box: Outbox, n: int) -> list[tuple[int, str, bytes]]:
    out = []
    for _ in range(n):
        message = box.peek()
        assert message is not None
        out.append((message.id, message.kind, message.payload))
        box.remove(message.id)
    return out


def test_bound_drops_telemetry_first_then_drift_never_jobs(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db", max_messages=50)
    for i in range(40):
        box.put("job", "jobs", f"job-{i}".encode())
    for i in range(100):
        box.put("telemetry", "telemetry", f"telemetry-{i}".encode())
    assert len(box) == 50
    assert box.counters() == {"dropped_telemetry": 90}
    for i in range(20):
        box.put("drift", "drift", f"drift-{i}".encode())
    assert len(box) == 50
    # the first 10 drift reports pushed out the last 10 telemetry; then drift made room for drift
    assert box.counters() == {"dropped_telemetry": 100, "dropped_drift": 10}
    kept = [payload.decode() for _, _, payload in drain(box)]
    assert kept == [f"job-{i}" for i in range(40)] + [f"drift-{i}" for i in range(10, 20)]
    with pytest.raises(ValueError, match="unknown outbox kind"):
        box.put("state", "x", b"")
    box.close()


def test_job_updates_are_kept_beyond_the_bound(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db", max_messages=50)
    for i in range(45):
        box.put("job", "jobs", f"job-{i}".encode())
    for i in range(5):
        box.put("drift", "drift", f"drift-{i}".encode())
    for i in range(45, 100):
        box.put("job", "jobs", f"job-{i}".encode())
    assert len(box) == 100  # grew: losing a job update would blind the operator
    assert box.counters() == {"dropped_drift": 5}
    box.put("telemetry", "telemetry", b"late")  # nothing else to drop: the newcomer goes
    assert len(box) == 100
    assert box.counters() == {"dropped_drift": 5, "dropped_telemetry": 1}
    assert [p.decode() for _, _, p in drain(box)] == [f"job-{i}" for i in range(100)]
    box.close()


def test_bound_holds_under_a_random_mix(tmp_path: Path) -> None:
    """Seeded puts and deliveries against a model of the documented policy: past the bound the
    oldest telemetry goes, then the oldest drift report, never a job update; every drop counted."""
    box = Outbox(tmp_path / "outbox.db", max_messages=50)
    rng = random.Random(11)
    model: list[tuple[int, str]] = []  # what the outbox should hold, oldest first
    dropped: collections.Counter[str] = collections.Counter()
    for step in range(1500):
        if rng.random() < 0.05:
            count = min(len(model), rng.randint(1, 20))
            got = [int(payload) for _, _, payload in drain_some(box, count)]
            assert got == [s for s, _ in model[:count]]
            del model[:count]
            continue
        kind = rng.choices(KINDS, weights=(1, 1, 3, 6))[0]
        box.put(kind, kind, str(step).encode())
        model.append((step, kind))
        excess = len(model) - 50
        for droppable in ("telemetry", "drift", "quality"):
            while excess > 0 and any(k == droppable for _, k in model):
                model.remove(next(m for m in model if m[1] == droppable))
                dropped[droppable] += 1
                excess -= 1
        assert len(box) == len(model)
        assert len(box) <= max(50, sum(k == "job" for _, k in model))
    assert [int(p) for _, _, p in drain(box)] == [s for s, _ in model]
    assert box.counters() == {f"dropped_{kind}": n for kind, n in dropped.items()}
    assert dropped["telemetry"] > dropped["drift"] > 0  # the mix did reach both stages
    box.close()


# --- the whole path through a real broker ---------------------------------------------------------

DEVICE = "dev-1"


class Relay:
    """A loopback TCP relay to the broker that the test can cut, like a network that fails."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = int(self._listener.getsockname()[1])
        self._open = threading.Event()
        self._open.set()
        self._silent = threading.Event()  # a black hole: bytes go in, nothing comes out
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._open.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream), timeout=2)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if not self._silent.is_set():
                    dst.sendall(data)
        for sock in (src, dst):
            _hang_up(sock)

    def cut(self) -> None:
        """Drop every connection and refuse new ones."""
        self._open.clear()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            _hang_up(sock)

    def allow(self) -> None:
        self._open.set()

    def go_silent(self) -> None:
        """A network cut that says nothing: connections stay up, no byte gets through (no RST,
        no FIN), so each side notices only by its own keepalive."""
        self._silent.set()

    def heal(self) -> None:
        """The network is back: streams that lost bytes are dead, new connections work."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            _hang_up(sock)
        self._silent.clear()

    def close(self) -> None:
        self._closing.set()
        self.cut()
        self._thread.join(5)
        self._listener.close()


def _hang_up(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


class GatedFetcher:
    """Downloads bundles over HTTP, but each download first waits for the test to open the gate."""

    def __init__(self) -> None:
        self.inner = HttpFetcher(DownloadConfig(retries=2, backoff_initial=0.05))
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()

    def hold(self) -> None:
        self.entered.clear()
        self.gate.clear()

    def fetch(self, source: str, dest: Path, max_bytes: int, **kwargs: Any) -> None:
        self.entered.set()
        assert self.gate.wait(WAIT), "the test never opened the download gate"
        self.inner.fetch(source, dest, max_bytes, **kwargs)


class Traffic:
    """One thread calling ``agent.infer`` with iris-like rows, bounded in calls and time."""

    ROWS = 10  # five requests fill a 50-row drift window

    def __init__(self) -> None:
        self.errors: list[BaseException] = []
        self.calls = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, agent: Agent) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(agent,), daemon=True)
        self._thread.start()

    def _run(self, agent: Agent) -> None:
        rng = np.random.default_rng(self.calls)
        centre, spread = np.array([5.8, 3.0, 3.8, 1.2]), np.array([0.8, 0.4, 1.7, 0.7])
        deadline = time.monotonic() + 120
        for _ in range(20_000):
            if self._stop.is_set() or time.monotonic() > deadline:
                return
            rows = np.abs(rng.normal(centre, spread, (self.ROWS, 4))).astype(np.float32)
            try:
                agent.infer("iris", {"input": rows})
            except Exception as e:
                self.errors.append(e)
                return
            self.calls += 1
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            assert not self._thread.is_alive()


class Observer:
    """A plain subscriber of its own that notes every drift report and job update as it arrives."""

    def __init__(self, options: BrokerOptions) -> None:
        self.topics = [
            (f"{options.prefix}/devices/+/drift", 1),
            (f"{options.prefix}/devices/+/jobs/+/status", 1),
        ]
        self.arrived: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"observer-{time.time_ns()}"
        )
        self.client.reconnect_delay_set(1, 1)
        self.subscribed = threading.Event()
        self.client.on_connect = lambda client, *_: client.subscribe(self.topics)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(options.host, options.port)
        self.client.loop_start()
        assert self.subscribed.wait(WAIT), "the observer did not subscribe"

    def _on_message(self, _client: Any, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        kind = "drift" if message.topic.endswith("/drift") else "job"
        with self._lock:
            self.arrived.append((kind, json.loads(message.payload)))

    def seen(self, kind: str, device: str) -> list[dict[str, Any]]:
        with self._lock:
            return [data for k, data in self.arrived if k == kind and data["device"] == device]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class World:
    """Broker (restartable on its port), bundle server, collector, observer, one device."""

    def __init__(
        self, root: Path, keys: KeyPair, ops: KeyPair, dist: Path, *, persistent: bool = False
    ) -> None:
        self.root, self.keys, self.ops, self.dist = root, keys, ops, dist
        self.port = free_port()
        # persistent: the broker keeps sessions and their queued messages across a restart
        self.broker_config = (
            f"persistence true\npersistence_location {root / 'broker'}/\n" if persistent else ""
        )
        self.broker: Broker | None = start_mosquitto(
            root / "broker", self.broker_config, port=self.port
        )
        try:  # a broker left running would outlive the test run
            self.relay = Relay(self.port)  # the device's way to the broker
            self.collector_relay = Relay(self.port)  # the collector's
            self.prefix = f"t{time.monotonic_ns()}/v1"
            self.options = BrokerOptions(host="127.0.0.1", port=self.port, prefix=self.prefix)
            self.server = BundleServer(dist, port=0).start()
            self.store: FleetStore = open_store(root / "fleet.db")
            collector_options = BrokerOptions(
                host="127.0.0.1", port=self.collector_relay.port, prefix=self.prefix
            )
            self.collector = Collector(collector_options, self.store).start()
            self.observer = Observer(self.options)
            self.fetcher = GatedFetcher()
            self.traffic = Traffic()
            self.agent: Agent | None = None
            self.link: DeviceLink | None = None
            self.probes = 0
            self.outage_started = 0.0
            self.ops_key = load_private_key(ops.private.read_bytes())
        except BaseException:
            self.broker.stop()
            raise

    # -- the device --------------------------------------------------------------------------

    def start_device(self, keepalive: int = 30) -> Agent:
        extra = (
            f'[mqtt]\nhost = "127.0.0.1"\nport = {self.relay.port}\nprefix = "{self.prefix}"\n'
            f'command_keys = ["{self.ops.public}"]\nreconnect_max = 1\nkeepalive = {keepalive}\n'
            "[telemetry]\ninterval = 0.5\n[drift]\nwindow = 100\nmin_rows = 100\n"
        )
        path = write_agent_config(self.root / DEVICE, self.keys, extra=extra)
        text = path.read_text().replace('device_id = "test-device"', f'device_id = "{DEVICE}"')
        path.write_text(text.replace("[server]\n", "[server]\nenabled = false\n"))
        config = load_config(path)
        agent = Agent(config, fetcher=self.fetcher).start(serve_http=False)
        assert config.mqtt is not None
        self.agent, self.link = agent, DeviceLink(agent, config.mqtt).start()
        assert self.link.connected.wait(WAIT), "the device did not connect"
        return agent

    def stop_device(self) -> None:
        assert self.agent is not None
        assert self.link is not None
        self.link.stop()
        self.agent.stop()
        self.agent = self.link = None

    @property
    def outbox_path(self) -> Path:
        return self.root / DEVICE / "state" / "outbox.db"

    def queued(self) -> collections.Counter[str]:
        """What waits in the device's outbox, by kind (read through a connection of our own)."""
        with contextlib.closing(sqlite3.connect(self.outbox_path)) as db:
            return collections.Counter(
                dict(db.execute("SELECT kind, COUNT(*) FROM outbox GROUP BY kind").fetchall())
            )

    def counter(self, name: str) -> int:
        with contextlib.closing(sqlite3.connect(self.outbox_path)) as db:
            row = db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    # -- jobs and outages --------------------------------------------------------------------

    def deploy(self, version: int) -> str:
        bundles = find_bundles("iris", version, self.server.url, self.dist)
        published = publish_command(
            self.options,
            "deploy",
            "iris",
            {"device": DEVICE},
            self.ops_key,
            version=version,
            bundles=bundles,
        )
        return published.job_id

    def stop_broker(self, *, kill: bool = False) -> None:
        assert self.broker is not None
        self.relay.cut()
        self.collector_relay.cut()
        if kill:
            self.broker.kill()
        else:
            self.broker.stop()
        self.broker = None
        self.outage_started = time.monotonic()

    def start_broker(self, *, device_first: bool = False) -> None:
        """Restart on the same port after an outage of at least ``OUTAGE`` seconds.

        The device is let in once the collector and the observer have subscribed again, or, with
        ``device_first``, before the collector is.
        """
        time.sleep(max(0.0, self.outage_started + OUTAGE - time.monotonic()))
        self.broker = start_mosquitto(self.root / "broker", self.broker_config, port=self.port)
        if device_first:
            self.relay.allow()
            return
        self.collector_relay.allow()
        self.wait_for_subscribers()
        self.relay.allow()

    def wait_for_subscribers(self) -> None:
        """Publish a probe until the collector has stored it and the observer has seen it."""
        self.probes += 1
        probe = build_report(ReportKind.DRIFT, "probe", self.probes, {})
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            client = connect(self.options)
            try:
                publish_and_wait(client, f"{self.prefix}/devices/probe/drift", probe, retain=False)
            finally:
                client.disconnect()
                client.loop_stop()
            time.sleep(0.2)
            stored = {str(d["seq"]) for _, _, d in self.store.events("drift", "probe")}
            observed = {d["seq"] for d in self.observer.seen("drift", "probe")}
            if str(self.probes) in stored and self.probes in observed:
                return
        raise AssertionError("the collector or the observer did not subscribe again")

    def close(self) -> None:
        self.traffic.stop()
        if self.link is not None:
            self.stop_device()
        self.observer.close()
        self.collector.stop()
        self.store.close()
        self.server.stop()
        self.relay.close()
        self.collector_relay.close()
        if self.broker is not None:
            self.broker.stop()


def wait_until(what: str, condition: Callable[[], Any], *, required: bool = True) -> Any:
    """Poll ``condition`` for up to WAIT seconds; unless ``required``, let the caller's asserts
    say what is missing."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.05)
    if required:
        raise AssertionError(f"not within {WAIT:.0f} s: {what}")
    return condition()


@pytest.fixture
def world(tmp_path: Path, keys: KeyPair, iris_bundles: dict[str, Path]) -> Iterator[World]:
    ops = _write_pair(tmp_path / "ops", "ops")
    running = World(tmp_path, keys, ops, iris_bundles["v1"].parent)
    try:
        yield running
    finally:
        running.close()


def terminal(world: World, job: str) -> bool:
    return any(e.status in TERMINAL for e in world.store.executions(job))


def run_job_during_outage(world: World, version: int, *, kill: bool = False) -> str:
    """Deploy ``version``; stop (or SIGKILL) the broker once the device has started, let the job
    finish and drift reports pile up while it is down. The broker stays down."""
    assert world.link is not None
    world.fetcher.hold()
    job = world.deploy(version)
    assert world.fetcher.entered.wait(WAIT), "the device never started the job"
    world.stop_broker(kill=kill)
    link = world.link
    wait_until("the device notices the outage", lambda: not link.connected.is_set())
    world.fetcher.gate.set()
    wait_until("the job finishes offline", lambda: job in link.runner.ledger.finished)
    wait_until("drift reports pile up", lambda: world.queued()["drift"] >= 5)
    queued = world.queued()
    assert queued["job"] >= 3, queued  # at least installing, health-check, SUCCEEDED
    assert queued["drift"] >= 5, queued
    return job


def test_outage_and_restart_lose_and_double_nothing(world: World) -> None:
    agent = world.start_device()
    first = world.deploy(1)
    wait_until("v1 deployed", lambda: terminal(world, first))
    world.traffic.start(agent)
    wait_until("drift reports flow", lambda: world.counter("seq_drift") >= 3)

    # 1. the broker goes down while a job runs and requests flow; it comes back
    second = run_job_during_outage(world, 2)
    world.start_broker()
    wait_until("job 2 reported", lambda: terminal(world, second))

    # 2. down again; this time the agent stops too, with messages undelivered
    third = run_job_during_outage(world, 3)
    world.traffic.stop()
    time.sleep(1.0)  # the monitor counts the last queued requests
    world.stop_device()
    left = world.queued()
    assert left["job"] >= 3, left
    assert left["drift"] >= 5, left
    world.start_broker()
    agent = world.start_device()  # a new process on the same state directory
    restarted_at = world.counter("seq_drift")
    world.traffic.start(agent)
    wait_until("new drift reports", lambda: world.counter("seq_drift") >= restarted_at + 3)
    world.traffic.stop()
    time.sleep(1.0)
    assert world.traffic.errors == []

    assert_delivered_exactly_once(world, [first, second, third])


def assert_delivered_exactly_once(world: World, jobs: list[str]) -> None:
    """Every job update and every report the device made is in the collector's store exactly
    once, in order, numbered without a gap; on the wire nothing overtook anything."""
    drift_sent = world.counter("seq_drift")
    telemetry_sent = world.counter("seq_telemetry")
    wait_until("the outbox drains", lambda: world.queued()["drift"] + world.queued()["job"] == 0)
    wait_until("the last job reported", lambda: terminal(world, jobs[-1]))
    stored = lambda kind: world.store.events(kind, DEVICE, limit=100_000)  # noqa: E731
    wait_until("drift stored", lambda: len(stored("drift")) >= drift_sent, required=False)
    wait_until(
        "telemetry stored", lambda: len(stored("telemetry")) >= telemetry_sent, required=False
    )
    assert world.link is not None
    finished = world.link.runner.ledger.finished  # what the device did, by its own record

    # exactly once and in order, at the collector's store
    for job in jobs:
        history = world.store.history(job, DEVICE)
        assert [h.seq for h in history] == list(range(1, len(history) + 1)), history
        assert history[0].status == "QUEUED"
        assert [h.status in TERMINAL for h in history].count(True) == 1
        assert history[-1].status == "SUCCEEDED"
        assert history[-1].seq == finished[job]["seq"]  # the last update the device made
        assert {"downloading", "installing", "health-check"} <= {h.step for h in history}
    reports = [data for _, _, data in stored("drift")]  # by arrival at the collector
    assert [int(d["seq"]) for d in reports] == list(range(1, drift_sent + 1))
    versions = [d["version"] for d in reports]  # windows of v1, then v2, then v3
    assert versions == sorted(versions)
    assert set(versions) == set(range(1, len(jobs) + 1))
    telemetry = [int(data["seq"]) for _, _, data in stored("telemetry")]
    assert telemetry[:telemetry_sent] == list(range(1, telemetry_sent + 1))

    # and on the wire: first arrivals in order (a QoS 1 copy may follow, nothing may overtake)
    assert first_arrivals(world.observer.seen("drift", DEVICE)) == list(range(1, drift_sent + 1))
    for job in jobs:
        updates = [d for d in world.observer.seen("job", DEVICE) if d["job_id"] == job]
        arrivals = first_arrivals(updates)
        assert arrivals == list(range(1, len(arrivals) + 1)), arrivals


def first_arrivals(messages: list[dict[str, Any]]) -> list[int]:
    seen: list[int] = []
    for data in messages:
        if data["seq"] not in seen:
            seen.append(data["seq"])
    return seen


@pytest.fixture
def persistent_world(
    tmp_path: Path, keys: KeyPair, iris_bundles: dict[str, Path]
) -> Iterator[World]:
    ops = _write_pair(tmp_path / "ops", "ops")
    running = World(tmp_path, keys, ops, iris_bundles["v1"].parent, persistent=True)
    try:
        yield running
    finally:
        running.close()


def test_reports_survive_a_device_that_reconnects_before_the_collector(
    persistent_world: World,
) -> None:
    world = persistent_world  # mosquitto keeps sessions across its restart here
    agent = world.start_device()
    first = world.deploy(1)
    wait_until("v1 deployed", lambda: terminal(world, first))
    world.traffic.start(agent)
    wait_until("drift reports flow", lambda: world.counter("seq_drift") >= 3)
    link = world.link
    assert link is not None
    world.stop_broker()
    wait_until("the device notices the outage", lambda: not link.connected.is_set())
    wait_until("drift reports pile up", lambda: world.queued()["drift"] >= 5)
    world.start_broker(device_first=True)  # as a slower collector backoff makes it happen
    wait_until("the device is back", link.connected.is_set)
    held = world.queued()["drift"]
    time.sleep(2.0)  # no collector online: the device holds its reports instead of losing them
    assert world.queued()["drift"] >= held
    world.collector_relay.allow()
    world.wait_for_subscribers()
    world.traffic.stop()
    time.sleep(1.0)
    sent = world.counter("seq_drift")
    wait_until("the outbox drains", lambda: world.queued()["drift"] == 0)
    time.sleep(1.0)
    stored = [int(d["seq"]) for _, _, d in world.store.events("drift", DEVICE, limit=100_000)]
    assert stored == list(range(1, sent + 1))


def test_a_report_in_flight_across_a_broker_restart_is_sent_again(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A report published into a silent network sits in paho's in-flight queue; the broker
    restarts without its sessions and the device is back before the collector. paho resends
    the report at the reconnect and the broker acknowledges it, although nobody subscribes:
    an acknowledgement on a later connection than the publish must not count as delivered."""
    monkeypatch.setattr(fleet_link, "ACK_WAIT", WAIT * 4)  # still waiting at the reconnect
    agent = world.start_device(keepalive=2)
    first = world.deploy(1)
    wait_until("v1 deployed", lambda: terminal(world, first))
    world.traffic.start(agent)
    wait_until("drift reports flow", lambda: world.counter("seq_drift") >= 2)
    link = world.link
    assert link is not None
    world.relay.go_silent()
    wait_until("the device notices the silence", lambda: not link.connected.is_set())
    world.stop_broker()  # no persistence: the collector's session is gone with it
    world.relay.heal()
    world.start_broker(device_first=True)
    wait_until("the device is back", link.connected.is_set)
    world.collector_relay.allow()
    world.wait_for_subscribers()
    world.traffic.stop()
    time.sleep(1.0)  # the monitor counts the last queued requests
    assert_delivered_exactly_once(world, [first])


def test_a_killed_broker_and_a_silent_network_cut_lose_and_double_nothing(
    world: World, long_factor: int
) -> None:
    """SIGKILL the broker while a job runs, then cut the device's network without a word (a
    black hole: it notices only by its 2 s keepalive) for 6 s, or three minutes with --long."""
    cut = 6.0 if long_factor == 1 else 180.0
    agent = world.start_device(keepalive=2)
    first = world.deploy(1)
    wait_until("v1 deployed", lambda: terminal(world, first))
    world.traffic.start(agent)
    wait_until("drift reports flow", lambda: world.counter("seq_drift") >= 3)

    second = run_job_during_outage(world, 2, kill=True)
    world.start_broker()
    wait_until("job 2 reported", lambda: terminal(world, second))

    before = world.counter("seq_drift")
    world.relay.go_silent()
    link = world.link
    assert link is not None
    wait_until("the device notices the silence", lambda: not link.connected.is_set())
    deadline = time.monotonic() + cut
    while time.monotonic() < deadline:  # reports pile up while nothing gets through
        time.sleep(0.2)
    assert world.counter("seq_drift") > before
    world.relay.heal()
    third = world.deploy(3)
    wait_until("job 3 reported", lambda: terminal(world, third))
    # a window of v3 stored (counting reports is not enough: a monitor behind on a busy
    # machine may still be closing windows of v2 after job 3 reported)
    wait_until(
        "a window of v3 stored",
        lambda: any(
            d.get("version") == 3 for _, _, d in world.store.events("drift", DEVICE, limit=100_000)
        ),
    )
    world.traffic.stop()
    time.sleep(1.0)  # the monitor counts the last queued requests
    assert world.traffic.errors == []
    assert_delivered_exactly_once(world, [first, second, third])
