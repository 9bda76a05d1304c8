"""Simulated devices for the fleet benchmarks: thousands of MQTT clients on one epoll thread.

Each :class:`SimDevice` speaks the agent's protocol (``edgepack.agent._fleet_link.DeviceLink``): a
paho-mqtt 2.x client set up like the agent's (:mod:`edgepack._mqtt`: MQTT 5, persistent session, a
Last Will marking it offline) that on connect subscribes to its device and group job topics and its
``pending`` answers, publishes its retained state and asks the collector for pending work. A command
is verified for real with :func:`edgepack.formats.commands.open_command` (signature, target,
expiry), its bundle for the device's profile looked up, and the job reported as the agent reports
it: ``QUEUED → IN_PROGRESS (downloading) → IN_PROGRESS (health-check) → SUCCEEDED``, followed by a
new retained state. Every payload is built and parsed by :mod:`edgepack.formats.messages`, as the
agent's are. Nothing is downloaded and no model is loaded: the simulator exercises the
fan-out path (broker → devices → broker → collector → store), not the install itself.

For staged rollouts (tests/test_fleet_rollout_e2e.py) a device can also start with models
installed (``models``), fail the health check of chosen versions (``fail_versions``: reported
``FAILED`` after ``rolling-back``, as the agent does), run rollback commands (back to the previous
version), and send telemetry and drift reports for what it serves (:meth:`SimFleet.report`),
with figures the caller picks per device and version (:class:`SimFigures`).

Why one thread: a paho ``loop_start()`` thread per client uses ``select()``, which cannot watch
descriptors above 1024 (FD_SETSIZE); past about 339 clients (three sockets each) those threads
die silently. :class:`SimFleet` instead drives every client from one thread through paho's
external event loop API: ``on_socket_open``/``on_socket_close`` register a client's socket with
an :class:`selectors.EpollSelector`, ``on_socket_register_write``/``on_socket_unregister_write``
toggle write interest, and the loop calls ``loop_read``/``loop_write`` on readiness and
``loop_misc`` once a second (keepalive). Clients connect through a sliding window, so the broker
never sees thousands of SYNs at once. Every client is touched only by that thread; the caller
hands it work through a queue and a wake-up socket, and reads counters.
"""

from __future__ import annotations

import collections
import contextlib
import selectors
import socket
import threading
import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric import ec

from edgepack._mqtt import ClientSettings, Will, connect_options, make_client
from edgepack.formats.commands import open_command
from edgepack.formats.exceptions import MessageError
from edgepack.formats.messages import (
    JobStatus,
    JobStep,
    ModelState,
    ReportKind,
    build_device_offline,
    build_device_state,
    build_job_status,
    build_pending_get,
    build_report,
    parse_pending_answer,
)
from edgepack.formats.topics import Topics

__all__ = ["SimDevice", "SimFigures", "SimFleet"]

# The updates the agent reports for an install (edgepack.agent._jobs: lifecycle state -> step).
STEPS = (
    (JobStatus.QUEUED, None),
    (JobStatus.IN_PROGRESS, JobStep.DOWNLOADING),
    (JobStatus.IN_PROGRESS, JobStep.HEALTH_CHECK),
    (JobStatus.SUCCEEDED, None),
)


FAILED_STEPS = (
    (JobStatus.QUEUED, None),
    (JobStatus.IN_PROGRESS, JobStep.DOWNLOADING),
    (JobStatus.IN_PROGRESS, JobStep.HEALTH_CHECK),
    (JobStatus.IN_PROGRESS, JobStep.ROLLING_BACK),
    (JobStatus.FAILED, None),
)


@dataclass(frozen=True)
class SimFigures:
    """What a simulated device reports for one model version in one round of reports."""

    requests: int = 100
    errors: int = 0
    p95_ms: float = 2.0
    drift: str = "ok"  # the drift window's status: ok, warning or drift


class SimDevice:
    """One simulated device: its client, what it installed, and when things happened."""

    def __init__(self, fleet: SimFleet, name: str) -> None:
        self.fleet, self.name = fleet, name
        self.groups = list(fleet.groups)
        self.session = uuid.uuid4().hex[:12]
        self.models: dict[str, ModelState] = dict(fleet.initial_models)
        self.seq = {ReportKind.TELEMETRY: 0, ReportKind.DRIFT: 0}
        self.finished: dict[str, int | None] = {}  # job id -> version installed
        self.attempts = 0
        self.command_at: float | None = None  # first command received (monotonic)
        self.succeeded_at: float | None = None  # broker acknowledged the SUCCEEDED update
        self._success_mid: int | None = None
        self.settings = ClientSettings(
            client_id=f"edgepack-{name}",
            host=fleet.host,
            port=fleet.port,
            keepalive=fleet.keepalive,
            persistent=True,
            session_expiry=3600,
            max_queued=10_000,
        )
        offline = build_device_offline(name, self.session)
        client = make_client(self.settings, will=Will(fleet.topics.state(name), offline))
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_disconnect = self._on_disconnect
        client.on_socket_open = fleet._socket_open
        client.on_socket_close = fleet._socket_close
        client.on_socket_register_write = fleet._want_write
        client.on_socket_unregister_write = fleet._no_write
        client.user_data_set(self)
        self.client = client

    # -- on the network thread only --------------------------------------------------------------

    def connect(self) -> None:
        self.attempts += 1
        s = self.settings
        self.client.connect(s.host, s.port, s.keepalive, **connect_options(s))

    def _publish(self, topic: str, payload: bytes, retain: bool = False) -> int:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            self.fleet.fail(f"{self.name}: publish to {topic}: {mqtt.error_string(info.rc)}")
        return info.mid

    def publish_state(self) -> None:
        state = build_device_state(
            self.name,
            profile=self.fleet.profile,
            agent_version="sim",
            groups=self.groups,
            models=self.models,
            health="ok",
            session=self.session,
        )
        self._publish(self.fleet.topics.state(self.name), state, retain=True)

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            self.fleet.fail(f"{self.name}: broker refused the connection: {reason}")
            return
        topics = self.fleet.topics
        wanted = [topics.device_jobs(self.name), topics.pending(self.name)]
        wanted += [topics.group_jobs(group) for group in self.groups]
        client.subscribe([(topic, 1) for topic in wanted])
        self.publish_state()
        self._publish(topics.pending_get(self.name), build_pending_get(self.name, self.groups))

    def _on_subscribe(self, *_args: Any) -> None:
        self.fleet.connecting -= 1
        self.fleet.ready += 1

    def _on_disconnect(self, *_args: Any) -> None:
        if not self.fleet.stopping:
            self.fleet.fail(f"{self.name}: disconnected by the broker")

    def _on_publish(self, _c: Any, _u: Any, mid: int, _reason: Any, _p: Any) -> None:
        if mid == self._success_mid:
            self.succeeded_at = time.monotonic()
            self.fleet.succeeded += 1

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        payload = bytes(message.payload)
        if not payload:
            return  # a cleared retained command
        if message.topic == self.fleet.topics.pending(self.name):
            try:
                answer = parse_pending_answer(payload, device=self.name)
            except MessageError as e:
                self.fleet.fail(f"{self.name}: a malformed pending answer: {e}")
                return
            for raw in answer.commands:
                self.handle(raw)
        else:
            self.handle(payload)

    def handle(self, raw: bytes) -> None:
        """Verify a command like a device does, then report the install's updates."""
        if self.command_at is None:
            self.command_at = time.monotonic()
        try:
            command = open_command(raw, self.fleet.keys, device=self.name, groups=self.groups)
            if command.kind == "deploy":
                command.bundle_for(self.fleet.profile)  # a device needs its profile's bundle
        except MessageError as e:  # a CommandError: the reason a device reports REJECTED
            self.fleet.fail(f"{self.name}: rejected a command: {e}")
            return
        topic = self.fleet.topics.job_status(self.name, command.job_id)
        if command.job_id in self.finished:  # delivered again: re-report, like the agent
            update = build_job_status(
                command.job_id, self.name, JobStatus.SUCCEEDED, model=command.model, seq=len(STEPS)
            )
            self._publish(topic, update)
            return
        current = self.models.get(command.model)
        before = current.active if current else None
        if command.kind == "rollback":
            self._rollback(command.job_id, command.model, current, topic)
            return
        if command.version in self.fleet.fail_versions:
            for seq, (status, step) in enumerate(FAILED_STEPS, start=1):
                done = status is JobStatus.FAILED
                update = build_job_status(
                    command.job_id, self.name, status, model=command.model, step=step,
                    version_before=before, version_after=before if done else None, seq=seq,
                    reason="health check failed: outputs differ from golden.npz" if done else None,
                )  # fmt: skip
                self._publish(topic, update)
            self.finished[command.job_id] = before
            return
        for seq, (status, step) in enumerate(STEPS, start=1):
            done = status is JobStatus.SUCCEEDED
            update = build_job_status(
                command.job_id,
                self.name,
                status,
                model=command.model,
                step=step,
                version_before=before,
                version_after=command.version if done else None,
                seq=seq,
            )
            mid = self._publish(topic, update)
            if done:
                self._success_mid = mid
        self.finished[command.job_id] = command.version
        self.models[command.model] = ModelState(command.version, before, command.version)
        self.publish_state()

    def _rollback(self, job_id: str, model: str, current: ModelState | None, topic: str) -> None:
        """Back to the previous version, or REJECTED when there is none (as the agent does)."""
        if current is None or current.previous is None:
            update = build_job_status(job_id, self.name, JobStatus.REJECTED, model=model, seq=1,
                                      reason=f"{model} has no previous version")  # fmt: skip
            self._publish(topic, update)
            return
        before, after = current.active, current.previous
        steps = ((JobStatus.QUEUED, None), (JobStatus.IN_PROGRESS, JobStep.HEALTH_CHECK),
                 (JobStatus.SUCCEEDED, None))  # fmt: skip
        for seq, (status, step) in enumerate(steps, start=1):
            done = status is JobStatus.SUCCEEDED
            update = build_job_status(
                job_id, self.name, status, model=model, step=step, version_before=before,
                version_after=after if done else None, seq=seq,
            )  # fmt: skip
            self._publish(topic, update)
        self.finished[job_id] = after
        self.models[model] = ModelState(after, None, after)
        self.publish_state()

    def report(self, figures: Callable[[str, str, int], SimFigures | None]) -> int:
        """One telemetry report (every model it serves) and one drift report per model, with
        ``figures(device, model, version)``; returns how many reports it sent."""
        entries, sent = [], 0
        for model, state in sorted(self.models.items()):
            found = figures(self.name, model, state.active) if state.active is not None else None
            if found is None:
                continue
            entries.append({
                "model": model, "version": state.active, "requests": found.requests,
                "errors": {"runtime": found.errors} if found.errors else {},
                "latency_ms": {"p50": found.p95_ms / 2, "p95": found.p95_ms,
                               "p99": found.p95_ms * 1.2},
            })  # fmt: skip
            share = 1.0 if found.drift == "drift" else 0.0
            drift = {"model": model, "version": state.active, "status": found.drift, "n": 250,
                     "features": [], "drifted_share": share}  # fmt: skip
            sent += self._send_report(ReportKind.DRIFT, drift)
        if entries:
            sent += self._send_report(ReportKind.TELEMETRY, {"models": entries})
        return sent

    def _send_report(self, kind: ReportKind, body: Mapping[str, Any]) -> int:
        self.seq[kind] += 1
        topic = (self.fleet.topics.telemetry(self.name) if kind is ReportKind.TELEMETRY
                 else self.fleet.topics.drift(self.name))  # fmt: skip
        self._publish(topic, build_report(kind, self.name, self.seq[kind], body))
        return 1


class SimFleet:
    """``count`` simulated devices in group(s) ``groups``, driven by one network thread.

    Args:
        host, port: the broker.
        keys: operator public keys the devices trust for commands.
        count: how many devices; they are named ``{name_prefix}-00000`` and up.
        prefix: the topic prefix.
        window: at most this many clients connecting (CONNECT sent, SUBACK not yet) at once.
    """

    def __init__(
        self,
        host: str,
        port: int,
        keys: Sequence[ec.EllipticCurvePublicKey],
        count: int,
        *,
        prefix: str,
        groups: Sequence[str] = ("bench",),
        profile: str = "x86_64-cpu",
        name_prefix: str = "sim",
        window: int = 200,
        keepalive: int = 30,
        models: Mapping[str, ModelState] | None = None,
        fail_versions: Collection[int] = (),
    ) -> None:
        self.host, self.port, self.keys = host, port, list(keys)
        self.initial_models, self.fail_versions = dict(models or {}), set(fail_versions)
        self.topics, self.groups, self.profile = Topics(prefix), tuple(groups), profile
        self.window, self.keepalive = window, keepalive
        self.ready = self.connecting = self.succeeded = 0
        self.errors: list[str] = []
        self.stopping = False
        self._sel = selectors.EpollSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self._to_connect: collections.deque[SimDevice] = collections.deque()
        self._quit = False
        self._thread = threading.Thread(target=self._run, name="simdevices-net", daemon=True)
        self.devices = [SimDevice(self, f"{name_prefix}-{i:05d}") for i in range(count)]

    def fail(self, message: str) -> None:
        if len(self.errors) < 100:
            self.errors.append(message)

    # -- the caller's side -----------------------------------------------------------------------

    def start(self) -> SimFleet:
        self._thread.start()
        return self

    def _call(self, fn: Callable[[], None]) -> None:
        self._calls.append(fn)
        with contextlib.suppress(BlockingIOError):
            self._wake_w.send(b"x")

    def wait(self, done: Callable[[], bool], timeout: float, what: str) -> float:
        """Seconds until ``done()`` (polled every 10 ms); RuntimeError after ``timeout``."""
        start = time.monotonic()
        while not done():
            if not self._thread.is_alive():
                raise RuntimeError(f"the simulator's network thread died: {self.errors[:3]}")
            if time.monotonic() - start > timeout:
                raise RuntimeError(f"{what}: not done within {timeout:.0f} s ({self.errors[:3]})")
            time.sleep(0.01)
        return time.monotonic() - start

    def connect_all(self, timeout: float) -> float:
        """Connect and subscribe every device; returns the seconds it took."""
        self._call(lambda: self._to_connect.extend(self.devices))
        count = len(self.devices)
        return self.wait(lambda: self.ready >= count, timeout, f"{count} devices connecting")

    def report(self, figures: Callable[[str, str, int], SimFigures | None]) -> int:
        """Every device sends one round of telemetry and drift reports (on the network thread);
        returns how many reports that is, once they are handed to the clients."""
        done: list[int] = []
        self._call(lambda: done.append(sum(d.report(figures) for d in self.devices)))
        self.wait(lambda: bool(done), 10.0, "a round of reports")
        return done[0]

    def stop(self, timeout: float = 10.0) -> None:
        """Disconnect every device cleanly (no Last Will), stop the thread, close sockets."""
        self.stopping = True
        if self._thread.is_alive():
            self._call(self._disconnect_all)
            with contextlib.suppress(RuntimeError):
                self.wait(lambda: len(self._sel.get_map()) <= 1, timeout, "disconnecting")
            self._quit = True
            self._call(lambda: None)
            self._thread.join(timeout)
        for device in self.devices:
            sock = device.client.socket()
            if sock is not None:
                sock.close()
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- the network thread ----------------------------------------------------------------------

    def _disconnect_all(self) -> None:
        self._to_connect.clear()
        for device in self.devices:
            if device.client.socket() is not None:
                device.client.disconnect()

    def _socket_open(self, client: mqtt.Client, device: SimDevice, sock: Any) -> None:
        self._sel.register(sock, selectors.EVENT_READ, device)

    def _socket_close(self, client: mqtt.Client, device: SimDevice, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(sock)

    def _want_write(self, client: mqtt.Client, device: SimDevice, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, device)

    def _no_write(self, client: mqtt.Client, device: SimDevice, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._sel.modify(sock, selectors.EVENT_READ, device)

    def _start_connects(self) -> None:
        while self._to_connect and self.connecting < self.window:
            device = self._to_connect.popleft()
            try:
                device.connect()
            except OSError as e:  # a refused or timed-out SYN: try again later, a few times
                if device.attempts < 5:
                    self._to_connect.append(device)
                else:
                    self.fail(f"{device.name}: cannot connect: {e}")
                continue
            self.connecting += 1

    def _run(self) -> None:
        next_misc = time.monotonic() + 1.0
        while not self._quit:
            while self._calls:
                self._calls.popleft()()
            self._start_connects()
            for key, mask in self._sel.select(0.05):
                device = key.data
                if device is None:
                    with contextlib.suppress(BlockingIOError):
                        self._wake_r.recv(4096)
                    continue
                client = device.client
                try:
                    if mask & selectors.EVENT_READ:
                        client.loop_read()
                    if mask & selectors.EVENT_WRITE and client.socket() is not None:
                        client.loop_write()
                except Exception as e:  # noqa: BLE001 - record it; one device must not stop all
                    self.fail(f"{device.name}: {type(e).__name__}: {e}")
            now = time.monotonic()
            if now >= next_misc:
                next_misc = now + 1.0
                for device in self.devices:
                    if device.client.socket() is not None:
                        device.client.loop_misc()
