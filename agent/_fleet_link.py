"""The device's MQTT link: learns of jobs, reports their progress and the device's state.

paho-mqtt 2.x (``CallbackAPIVersion.VERSION2``) with a persistent session (``clean_start=False``
and a session expiry on MQTT 5; ``clean_session=False`` on 3.1.1), so commands queued while the
agent was down are delivered when it returns. On every connect the link subscribes to its own
and its groups' job topics (retained: a device that was offline or is new converges), publishes
its retained state (a Last Will marks it offline), and asks the collector for pending work,
rather than trusting the broker's queue alone.

Callbacks never block: they put messages in a queue; one worker thread verifies and runs them
through :class:`edgepack.agent._jobs.JobRunner`, cancels first, then oldest command first.

Every message is hostile until proven otherwise. The callback on paho's network thread catches
everything (a topic that is not UTF-8, a payload over the size cap, a malformed presence) and
only logs it; the worker handles each message inside its own guard, so a message that breaks a
parser costs a log line and, where its job id is readable, a REJECTED status, never the thread.
The worker and the outbox sender run under :class:`~edgepack.agent._supervise.SupervisedThread`
(restarted if they die anyway, the crash reported as a lifecycle event), and the worker beats
the agent's heartbeats so systemd's watchdog restarts an agent whose command path is wedged.
Trust documents (key rotation, :mod:`edgepack.agent._trust`) arrive retained on the trust topic.

Topics come from :mod:`edgepack.formats.topics` (whose one parser reads every topic received),
payloads from :mod:`edgepack.formats.messages`, and the paho client is set up by
:mod:`edgepack._mqtt`, as the fleet's are. Configuration is the ``[mqtt]`` table of
``agent.toml``, parsed with the rest of it (:class:`edgepack.agent._config.MqttConfig`). The
monitor's telemetry and drift reports reach the outbox through the agent's
:class:`~edgepack.agent._monitor.ReportRelay`, which the link connects when it is built.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

import edgepack
from edgepack._mqtt import ClientSettings, Will, connect_options, make_client
from edgepack.agent._config import MqttConfig
from edgepack.agent._daemon import Agent
from edgepack.agent._jobs import JobRunner, StatusUpdate
from edgepack.agent._outbox import Outbox
from edgepack.agent._supervise import SupervisedThread
from edgepack.agent.exceptions import EdgepackError
from edgepack.formats.exceptions import MessageError
from edgepack.formats.messages import (
    MAX_MESSAGE_BYTES,
    ModelState,
    ReportKind,
    build_device_offline,
    build_device_state,
    build_job_status,
    build_pending_get,
    build_presence_ping,
    build_report,
    parse_collector_presence,
    parse_pending_answer,
)
from edgepack.formats.topics import TopicKind, Topics

__all__ = ["HEARTBEAT", "DeviceLink"]

HEARTBEAT = "commands"  # the worker's name in the agent's heartbeats
# A job announces this much bounded work to the watchdog (its download and health check have
# their own, shorter deadlines; this only catches a worker that is truly wedged).
JOB_BUDGET = 3 * 3600.0
BATCH_MAX = 64  # messages in one batch of the worker, at most
BATCH_AGE = 1.0  # seconds a batch may stay open, at most

ACK_WAIT = 10.0  # seconds the sender waits for the broker's PUBACK before it looks again
log = logging.getLogger("edgepack.agent.mqtt")


class DeviceLink:
    """Connects one :class:`~edgepack.agent._daemon.Agent` to the fleet over MQTT.

    Args:
        agent: the device's agent; its monitor's reports are routed to this link's outbox.
        config: the ``[mqtt]`` table (``agent.config.mqtt``).
        clock: monotonic seconds, for jobs' in-progress timeouts (tests inject one).
    """

    def __init__(
        self, agent: Agent, config: MqttConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.agent = agent
        self.config = config
        self.device = agent.config.device_id
        self.groups = agent.config.groups
        self.topics = Topics(config.prefix)
        self.runner = JobRunner(
            agent, agent.trust.command_keys, self._publish_status, self.groups, clock=clock
        )
        self.connected = threading.Event()
        self._connection = 0  # counts accepted connections (see _send_loop)
        # Ties state messages to this agent run, so a late Last Will of an earlier run cannot
        # mark the device offline after it came back.
        self.session = uuid.uuid4().hex[:12]
        self.outbox = Outbox(agent.config.state_dir / "outbox.db", config.outbox_max_messages)
        self._collectors: dict[str, bool] = {}
        self._collector_seen = "seq_collector_seen" in self.outbox.counters()
        agent.reports.connect(self._queue_report)
        self._stopping = threading.Event()
        self._inbox: queue.Queue[tuple[str, bytes] | None] = queue.Queue(maxsize=10_000)
        crash = agent.thread_crashed
        self._sender = SupervisedThread("edgepack-outbox", self._send_loop, on_crash=crash)
        self._worker = SupervisedThread("edgepack-jobs", self._work, on_crash=crash)
        agent.heartbeats.register(HEARTBEAT, stale_after=60)
        self._client = self._make_client()

    # -- connection ------------------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        c = self.config
        self._settings = ClientSettings(
            client_id=c.client_id or f"edgepack-{self.device}",
            host=c.host,
            port=c.port,
            protocol=c.protocol,
            keepalive=c.keepalive,
            username=c.username,
            password_file=c.password_file,
            tls=c.tls,
            ca_file=c.ca_file,
            cert_file=c.cert_file,
            key_file=c.key_file,
            persistent=True,  # keep the session: commands queued while away survive
            session_expiry=c.session_expiry,
            reconnect_min=c.reconnect_min,
            reconnect_max=c.reconnect_max,
            max_queued=10_000,
        )
        offline = build_device_offline(self.device, self.session)
        client = make_client(self._settings, will=Will(self.topics.state(self.device), offline))
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    def start(self) -> DeviceLink:
        """Connect in the background (retrying with backoff while the broker is down)."""
        self._worker.start()
        self._sender.start()
        c = self._settings
        self._client.connect_async(c.host, c.port, c.keepalive, **connect_options(c))
        self._client.loop_start()
        if self.agent.recovered is not None:
            self.runner.finish_recovered(self.agent.recovered)
        return self

    def stop(self) -> None:
        """Say offline, disconnect, stop the worker."""
        self.agent.reports.connect(None)  # the outbox closes below; later reports go nowhere
        if self.connected.is_set():
            info = self._client.publish(
                self.topics.state(self.device),
                build_device_offline(self.device, self.session),
                qos=1,
                retain=True,
            )
            info.wait_for_publish(timeout=2)
        self._sender.stop_event.set()  # before the loops can see _stopping: not a crash
        self._worker.stop_event.set()
        self._stopping.set()
        self.outbox.added.set()
        self._sender.stop()
        self._client.disconnect()
        self._client.loop_stop()
        self._inbox.put(None)
        self._worker.stop()
        self.agent.heartbeats.unregister(HEARTBEAT)
        self.outbox.close()

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            log.error("broker refused the connection: %s", reason)
            return
        self._connection += 1  # before paho resends what was in flight (after this callback)
        topics = [
            self.topics.device_jobs(self.device),
            self.topics.pending(self.device),
            self.topics.collector(),
        ]
        topics += [self.topics.group_jobs(group) for group in self.groups]
        topics.append(self.topics.trust())
        client.subscribe([(topic, 1) for topic in topics])
        self.connected.set()
        log.info("connected to %s:%d as %s", self.config.host, self.config.port, self.device)
        self.publish_state()
        self._publish(self.topics.presence_ping(), build_presence_ping(self.device))
        self._publish(
            self.topics.pending_get(self.device), build_pending_get(self.device, self.groups)
        )

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        self.connected.clear()
        self._collectors.clear()  # learned again from the retained presence on reconnect
        log.warning("disconnected from the broker (%s); reconnecting", reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        """paho's callback, on its network thread: nothing may escape from here."""
        try:
            self._receive(message)
        except Exception:
            log.exception("ignoring a message that could not be handled")

    def _receive(self, message: mqtt.MQTTMessage) -> None:
        try:
            topic = message.topic  # paho decodes it: a topic that is not UTF-8 raises here
        except UnicodeDecodeError:
            log.warning("ignoring a message whose topic is not UTF-8")
            return
        payload = bytes(message.payload)
        if len(payload) > MAX_MESSAGE_BYTES:
            log.warning(
                "ignoring a %d-byte message on %s (the limit is %d)",
                len(payload), topic, MAX_MESSAGE_BYTES,
            )  # fmt: skip
            return
        try:
            where = self.topics.parse(topic)
        except MessageError as e:
            log.warning("ignoring a message: %s", e)
            return
        if where.kind is TopicKind.COLLECTOR:
            self._collector_presence(topic, payload, message.retain)
            return
        if where.kind not in _WORKER_KINDS:
            log.warning("ignoring a %s message: devices do not take them", where.kind.value)
            return
        try:  # never block the network thread
            self._inbox.put_nowait((topic, payload))
        except queue.Full:
            log.error("job inbox full; dropping a message on %s", topic)

    # -- publishing ------------------------------------------------------------------------------

    def _publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            log.error("publish to %s failed: %s", topic, mqtt.error_string(info.rc))
        elif info.rc == mqtt.MQTT_ERR_NO_CONN:
            log.info("offline: %s queued until the broker is back", topic)

    def _publish_status(self, update: StatusUpdate) -> None:
        self.outbox.put(
            "job",
            self.topics.job_status(self.device, update.job_id),
            build_job_status(
                update.job_id,
                self.device,
                update.status,
                model=update.model,
                step=update.step,
                reason=update.reason,
                version_before=update.version_before,
                version_after=update.version_after,
                seq=update.seq,
            ),
        )

    def _queue_report(self, kind: str, report: dict[str, Any]) -> None:
        """Monitor sink: telemetry and drift reports go through the outbox, numbered."""
        what = ReportKind(kind)
        if what is ReportKind.TELEMETRY:
            topic = self.topics.telemetry(self.device)
            report = {**report, "outbox": {"queued": len(self.outbox), **self.outbox.counters()}}
        elif what is ReportKind.QUALITY:
            topic = self.topics.quality(self.device)
        else:
            topic = self.topics.drift(self.device)
        try:
            payload = build_report(what, self.device, self.outbox.next_seq(what.value), report)
        except MessageError as e:  # too large
            log.error("%s", e)
            return
        self.outbox.put(what.value, topic, payload)

    def _collector_presence(self, topic: str, payload: bytes, retained: bool) -> None:
        """Track collectors' presence (called on the network thread: cheap).

        A retained "online" may be stale (a broker restarted from its persistence file while
        the collector was away), so only a live announcement counts as listening; the device
        asks for one on every connect (``presence/ping``)."""
        try:
            online = parse_collector_presence(payload).online
        except MessageError as e:
            log.debug("ignoring a malformed collector presence: %s", e)
            return
        if not online or not retained:
            self._collectors[topic] = online
        if online and not self._collector_seen:
            self._collector_seen = True
            self.outbox.next_seq("collector_seen")  # remembered across restarts

    def _collector_listening(self) -> bool:  # (see _send_loop)
        """Whether reports can go now: a collector is online, or none was ever seen (a fleet
        without a collector must not fill the outbox forever)."""
        return not self._collector_seen or any(self._collectors.values())

    def _send_loop(self, stop: threading.Event) -> None:
        """Drain the outbox in order: publish, wait for the broker's PUBACK, then forget.

        Once a collector has been seen, reports wait while no collector is online (after a
        broker restart the device often reconnects first; what it published then would reach
        nobody and be gone from the outbox).
        """
        while not self._stopping.is_set():
            if not self.connected.wait(0.5):
                continue
            if not self._collector_listening():
                self._stopping.wait(0.2)
                continue
            message = self.outbox.peek()
            if message is None:
                self.outbox.added.wait(0.5)
                self.outbox.added.clear()
                continue
            connection = self._connection
            try:
                info = self._client.publish(message.topic, message.payload, qos=1)
            except ValueError as e:  # a topic paho refuses (never produced by this agent)
                log.error("dropping an unpublishable message on %r: %s", message.topic, e)
                self.outbox.remove(message.id)
                continue
            with contextlib.suppress(ValueError, RuntimeError):
                info.wait_for_publish(timeout=ACK_WAIT)
            if info.is_published() and self._connection == connection:
                self.outbox.remove(message.id)
            elif info.is_published():
                # Sent on one connection, acknowledged on a later one: paho resent it at the
                # reconnect, before this device knew whether any collector listens (after a
                # broker restart it may reach nobody). It goes again through the gate above;
                # the collector drops the duplicate by its seq.
                log.debug("resending %s: acknowledged only after a reconnect", message.topic)
            else:  # disconnected meanwhile: the same message goes again after the reconnect
                self._stopping.wait(0.5)

    def publish_state(self) -> None:
        """Publish this device's retained state: online, profile, models, health."""
        status = self.agent.status()
        models = {
            name: ModelState(m["active"], m["previous"], m["serving"])
            for name, m in status["models"].items()
        }
        unhealthy = [
            n
            for n, m in status["models"].items()
            if m["active"] is not None and m["serving"] is None
        ]
        self._publish(
            self.topics.state(self.device),
            build_device_state(
                self.device,
                profile=self.agent.config.profile,
                agent_version=edgepack.__version__,
                groups=self.groups,
                models=models,
                health="degraded" if unhealthy else "ok",
                session=self.session,
            ),
            retain=True,
        )

    # -- the worker ------------------------------------------------------------------------------

    def _work(self, stop: threading.Event) -> None:
        """The command path: one batch of messages at a time, each in its own guard."""
        beats = self.agent.heartbeats
        while not stop.is_set():
            beats.beat(HEARTBEAT)
            try:
                item = self._inbox.get(timeout=1.0)
            except queue.Empty:
                continue
            if item is None:
                return
            batch = [item]
            # Commands arriving together (retained ones on connect) run oldest first; a batch
            # closes after 0.3 s without a message, or at BATCH_MAX messages or BATCH_AGE
            # seconds, so a steady trickle of junk can never hold a valid command back.
            opened = time.monotonic()
            try:
                while len(batch) < BATCH_MAX and time.monotonic() - opened < BATCH_AGE:
                    more = self._inbox.get(timeout=0.3)
                    if more is None:
                        self._inbox.put(None)
                        break
                    batch.append(more)
            except queue.Empty:
                pass
            beats.beat(HEARTBEAT)
            commands: list[bytes] = []
            for topic, payload in batch:
                commands.extend(self._guarded(self._messages_in, topic, payload) or [])
            with beats.busy(HEARTBEAT, JOB_BUDGET):
                for raw in sorted(commands, key=_order):
                    self._guarded(self.runner.handle, raw)
            if commands:
                self._guarded(self.publish_state)

    def _guarded(self, work: Any, *args: Any) -> Any:
        """Run one piece of message handling; whatever it raises is logged, not fatal."""
        try:
            return work(*args)
        except Exception:
            log.exception("handling a message failed; the command path carries on")
            return None

    def _messages_in(self, topic: str, payload: bytes) -> list[bytes]:
        """The commands a queued message carries (applying a trust document on the way)."""
        kind = self.topics.parse(topic).kind  # parsed before it was queued
        if kind is TopicKind.TRUST:
            if payload:  # empty: a cleared retained message
                self._apply_trust(payload)
            return []
        if kind is TopicKind.PENDING:
            try:
                answer = parse_pending_answer(payload, device=self.device)
            except MessageError as e:
                log.warning("ignoring a malformed pending answer: %s", e)
                return []
            if answer.trust:
                self._apply_trust(answer.trust)
            return list(answer.commands)
        if not payload:
            return []  # a cleared retained message
        return [payload]

    def _apply_trust(self, raw: bytes) -> None:
        try:
            applied = self.agent.trust.apply(raw)
        except MessageError as e:  # TrustError: refused, nothing changed
            log.warning("refusing a trust document: %s", e)
            return
        except EdgepackError as e:  # could not be saved: nothing changed
            log.error("cannot apply a trust document: %s", e)
            return
        if applied is not None:
            self.agent.monitor.telemetry.event(f"trust:v{applied.version}")


_WORKER_KINDS = frozenset(
    {TopicKind.DEVICE_JOBS, TopicKind.GROUP_JOBS, TopicKind.PENDING, TopicKind.TRUST}
)


def _order(raw: bytes) -> tuple[int, str]:
    try:
        return JobRunner.order(raw)
    except Exception:  # noqa: BLE001 - an unreadable command sorts first and is rejected
        return (1, "")
