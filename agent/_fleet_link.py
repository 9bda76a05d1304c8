"""The device's MQTT link: learns of jobs, reports their progress and the device's state.

paho-mqtt 2.x (``CallbackAPIVersion.VERSION2``) with a persistent session (``clean_start=False``
and a session expiry on MQTT 5; ``clean_session=False`` on 3.1.1), so commands queued while the
agent was down are delivered when it returns. On every connect the link subscribes to its own
and its groups' job topics (retained: a device that was offline or is new converges), publishes
its retained state (a Last Will marks it offline), and asks the collector for pending work,
rather than trusting the broker's queue alone.

Callbacks never block: they put messages in a queue; one worker thread verifies and runs them
through :class:`edgepack.agent._jobs.JobRunner`, oldest command first. Topics and payloads come from
:mod:`edgepack.formats.messages`. Configuration is the ``[mqtt]`` table of ``agent.toml``.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

import edgepack
from edgepack.agent._daemon import Agent
from edgepack.agent._jobs import JobRunner, StatusUpdate
from edgepack.agent._outbox import Outbox
from edgepack.agent.exceptions import ConfigError, EdgepackError, KeyFormatError
from edgepack.formats.keys import load_public_key
from edgepack.formats.messages import (
    DEFAULT_PREFIX,
    MAX_MESSAGE_BYTES,
    Topics,
    decode_json,
    encode,
    job_status,
    utcnow,
)

__all__ = ["DeviceLink", "MqttConfig"]

log = logging.getLogger("edgepack.agent.mqtt")


@dataclass(frozen=True)
class MqttConfig:
    """The ``[mqtt]`` table of ``agent.toml``."""

    host: str = "127.0.0.1"
    port: int = 1883
    prefix: str = DEFAULT_PREFIX
    protocol: str = "5"  # "5" or "3.1.1"
    client_id: str = ""  # default: edgepack-<device_id>
    username: str = ""
    password_file: str = ""
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""  # client certificate (mTLS)
    key_file: str = ""
    keepalive: int = 30
    session_expiry: int = 7 * 24 * 3600
    reconnect_min: int = 1
    reconnect_max: int = 60
    command_keys: tuple[str, ...] = ()  # operator public keys trusted to sign commands
    outbox_max_messages: int = 10_000  # store-and-forward bound (telemetry dropped first)

    @classmethod
    def from_agent(cls, raw: Mapping[str, Any], source: str, base: Path) -> MqttConfig:
        """Validate the raw ``[mqtt]`` table; ConfigError names the field."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in known:
                raise ConfigError(f"{source}: unknown key [mqtt].{key}")
            default = getattr(cls, key)
            if isinstance(default, bool) and not isinstance(value, bool):
                raise ConfigError(f"{source}: [mqtt].{key} must be true or false")
            if (
                isinstance(default, int)
                and not isinstance(default, bool)
                and (isinstance(value, bool) or not isinstance(value, int) or value < 0)
            ):
                raise ConfigError(f"{source}: [mqtt].{key} must be a non-negative integer")
            if isinstance(default, str) and not isinstance(value, str):
                raise ConfigError(f"{source}: [mqtt].{key} must be a string")
            if key == "command_keys":
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ConfigError(f"{source}: [mqtt].command_keys must be a list of paths")
                values[key] = tuple(str(base / v) for v in value)
            elif key in ("password_file", "ca_file", "cert_file", "key_file") and value:
                values[key] = str(base / value)
            else:
                values[key] = value
        config = cls(**values)
        if config.protocol not in ("5", "3.1.1"):
            raise ConfigError(f'{source}: [mqtt].protocol must be "5" or "3.1.1"')
        if not config.command_keys:
            raise ConfigError(f"{source}: [mqtt].command_keys is empty; no command would verify")
        return config

    def keys(self) -> list[Any]:
        out = []
        for path in self.command_keys:
            try:
                out.append(load_public_key(Path(path).read_bytes(), source=path))
            except OSError as e:
                raise ConfigError(f"[mqtt] command key {path} cannot be read: {e.strerror}") from e
            except KeyFormatError as e:
                raise ConfigError(f"[mqtt] command key: {e}") from e
        return out


class DeviceLink:
    """Connects one :class:`~edgepack.agent._daemon.Agent` to the fleet over MQTT."""

    def __init__(self, agent: Agent, config: MqttConfig) -> None:
        self.agent = agent
        self.config = config
        self.device = agent.config.device_id
        self.groups = agent.config.groups
        self.topics = Topics(config.prefix)
        self.runner = JobRunner(agent, config.keys(), self._publish_status, self.groups)
        self.connected = threading.Event()
        # Ties state messages to this agent run, so a late Last Will of an earlier run cannot
        # mark the device offline after it came back.
        self.session = uuid.uuid4().hex[:12]
        self.outbox = Outbox(agent.config.state_dir / "outbox.db", config.outbox_max_messages)
        self._collectors: dict[str, bool] = {}
        self._collector_seen = "seq_collector_seen" in self.outbox.counters()
        agent.monitor.sink = self._queue_report
        self._stopping = threading.Event()
        self._sender = threading.Thread(target=self._send_loop, name="edgepack-outbox", daemon=True)
        self._inbox: queue.Queue[tuple[str, bytes] | None] = queue.Queue(maxsize=10_000)
        self._worker = threading.Thread(target=self._work, name="edgepack-jobs", daemon=True)
        self._client = self._make_client()

    # -- connection ------------------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        c = self.config
        v5 = c.protocol == "5"
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=c.client_id or f"edgepack-{self.device}",
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else False,  # keep the session: queued commands survive
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.reconnect_delay_set(c.reconnect_min, c.reconnect_max)
        client.max_queued_messages_set(10_000)
        offline = encode(
            {"device": self.device, "online": False, "session": self.session, "ts": _now()}
        )
        client.will_set(self.topics.state(self.device), offline, qos=1, retain=True)
        if c.username:
            password = Path(c.password_file).read_text().strip() if c.password_file else None
            client.username_pw_set(c.username, password)
        if c.tls:
            client.tls_set(
                ca_certs=c.ca_file or None, certfile=c.cert_file or None, keyfile=c.key_file or None
            )
        return client

    def start(self) -> DeviceLink:
        """Connect in the background (retrying with backoff while the broker is down)."""
        self._worker.start()
        self._sender.start()
        c = self.config
        if c.protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = c.session_expiry
            self._client.connect_async(
                c.host, c.port, c.keepalive, clean_start=False, properties=props
            )
        else:
            self._client.connect_async(c.host, c.port, c.keepalive)
        self._client.loop_start()
        if self.agent.recovered is not None:
            self.runner.finish_recovered(self.agent.recovered)
        return self

    def stop(self) -> None:
        """Say offline, disconnect, stop the worker."""
        if self.connected.is_set():
            info = self._client.publish(
                self.topics.state(self.device),
                encode(
                    {"device": self.device, "online": False, "session": self.session, "ts": _now()}
                ),
                qos=1,
                retain=True,
            )
            info.wait_for_publish(timeout=2)
        self._stopping.set()
        self.outbox.added.set()
        self._sender.join(timeout=10)
        self._client.disconnect()
        self._client.loop_stop()
        self._inbox.put(None)
        self._worker.join(timeout=10)
        self.outbox.close()

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            log.error("broker refused the connection: %s", reason)
            return
        topics = [
            self.topics.device_jobs(self.device),
            self.topics.pending(self.device),
            self.topics.collector(),
        ]
        topics += [self.topics.group_jobs(group) for group in self.groups]
        client.subscribe([(topic, 1) for topic in topics])
        self.connected.set()
        log.info("connected to %s:%d as %s", self.config.host, self.config.port, self.device)
        self.publish_state()
        self._publish(self.topics.presence_ping(), encode({"device": self.device, "ts": _now()}))
        self._publish(
            self.topics.pending_get(self.device),
            encode({"device": self.device, "groups": list(self.groups), "ts": _now()}),
        )

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        self.connected.clear()
        self._collectors.clear()  # learned again from the retained presence on reconnect
        log.warning("disconnected from the broker (%s); reconnecting", reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if self.topics.parse(message.topic)[:1] == ("collectors",):
            self._collector_presence(message.topic, bytes(message.payload), message.retain)
            return
        try:  # never block the network thread
            self._inbox.put_nowait((message.topic, bytes(message.payload)))
        except queue.Full:
            log.error("job inbox full; dropping a message on %s", message.topic)

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
            job_status(
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
        topic = (
            self.topics.telemetry(self.device)
            if kind == "telemetry"
            else self.topics.drift(self.device)
        )
        extra: dict[str, Any] = {}
        if kind == "telemetry":
            extra["outbox"] = {"queued": len(self.outbox), **self.outbox.counters()}
        payload = encode(
            {
                "device": self.device,
                "seq": self.outbox.next_seq(kind),
                "ts": _now(),
                **report,
                **extra,
            }
        )
        if len(payload) > MAX_MESSAGE_BYTES:
            log.error(
                "%s report is %d bytes, above %d; not sent", kind, len(payload), MAX_MESSAGE_BYTES
            )
            return
        self.outbox.put(kind, topic, payload)

    def _collector_presence(self, topic: str, payload: bytes, retained: bool) -> None:
        """Track collectors' presence (called on the network thread: cheap).

        A retained "online" may be stale (a broker restarted from its persistence file while
        the collector was away), so only a live announcement counts as listening; the device
        asks for one on every connect (``presence/ping``)."""
        try:
            data = decode_json(payload, "collector presence") if payload else {}
        except EdgepackError:
            return
        online = bool(data.get("online"))
        if not online or not retained:
            self._collectors[topic] = online
        if online and not self._collector_seen:
            self._collector_seen = True
            self.outbox.next_seq("collector_seen")  # remembered across restarts

    def _collector_listening(self) -> bool:
        """Whether reports can go now: a collector is online, or none was ever seen (a fleet
        without a collector must not fill the outbox forever)."""
        return not self._collector_seen or any(self._collectors.values())

    def _send_loop(self) -> None:
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
            try:
                info = self._client.publish(message.topic, message.payload, qos=1)
            except ValueError as e:  # a topic paho refuses (never produced by this agent)
                log.error("dropping an unpublishable message on %r: %s", message.topic, e)
                self.outbox.remove(message.id)
                continue
            with contextlib.suppress(ValueError, RuntimeError):
                info.wait_for_publish(timeout=10)
            if info.is_published():
                self.outbox.remove(message.id)
            else:  # disconnected meanwhile: the same message goes again after the reconnect
                self._stopping.wait(0.5)

    def publish_state(self) -> None:
        """Publish this device's retained state: online, profile, models, health."""
        status = self.agent.status()
        models = {
            name: {"active": m["active"], "previous": m["previous"], "serving": m["serving"]}
            for name, m in status["models"].items()
        }
        unhealthy = [
            n
            for n, m in status["models"].items()
            if m["active"] is not None and m["serving"] is None
        ]
        self._publish(
            self.topics.state(self.device),
            encode(
                {
                    "device": self.device,
                    "online": True,
                    "profile": self.agent.config.profile,
                    "agent_version": edgepack.__version__,
                    "groups": list(self.groups),
                    "models": models,
                    "health": "degraded" if unhealthy else "ok",
                    "ts": _now(),
                    "session": self.session,
                }
            ),
            retain=True,
        )

    # -- the worker ------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            item = self._inbox.get()
            if item is None:
                return
            batch = [item]
            try:  # commands arriving together (retained ones on connect) run oldest first
                while True:
                    more = self._inbox.get(timeout=0.3)
                    if more is None:
                        self._inbox.put(None)
                        break
                    batch.append(more)
            except queue.Empty:
                pass
            commands = []
            for topic, payload in batch:
                commands.extend(self._commands_in(topic, payload))
            for raw in sorted(commands, key=JobRunner.issued_at):
                try:
                    self.runner.handle(raw)
                except EdgepackError as e:  # the runner reports; this is a last resort
                    log.error("job failed: %s", e)
            if commands:
                self.publish_state()

    def _commands_in(self, topic: str, payload: bytes) -> list[bytes]:
        parts = self.topics.parse(topic)
        if parts[-1:] == ("pending",):
            try:
                answer = decode_json(payload, "pending answer")
            except EdgepackError as e:
                log.warning("ignoring a malformed pending answer: %s", e)
                return []
            commands = answer.get("commands", [])
            return [c.encode() for c in commands if isinstance(c, str)]
        if not payload:
            return []  # a cleared retained message
        return [payload]


def _now() -> str:
    return utcnow().isoformat(timespec="seconds")
