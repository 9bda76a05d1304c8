"""The collector: keeps what the fleet says (state, jobs, job executions) in a store.

It subscribes to every device's retained state, every job execution update, every job command
(so ``status`` knows what was asked), every telemetry and drift report, and every device's
request for pending work, which it answers from the store. Topics are read by
:func:`edgepack.formats.topics.parse_topic` and payloads by :mod:`edgepack.formats.messages` and
:func:`edgepack.formats.commands.read_command`; a malformed message is counted and skipped.
Messages are handed from paho's network thread to one writer thread through a bounded queue, so
a slow database never blocks the MQTT connection.

Scale-out: start several collectors with the same ``share`` name against a clustered broker; the
high-volume topics are then subscribed as MQTT shared subscriptions (``$share/NAME/...``) and each
message reaches one collector. Job commands are retained and stay plain subscriptions, so every
collector records every job (inserts are idempotent). Writes are idempotent throughout
(edgepack.fleet._database), so a QoS 1 redelivery changes nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric import ec

from edgepack._clock import Clock, utc_now
from edgepack.fleet._broker import BrokerOptions, connect
from edgepack.fleet._database import FleetStore, JobRow, StoreError
from edgepack.fleet.exceptions import BrokerError
from edgepack.formats.commands import Command, read_command
from edgepack.formats.exceptions import MessageError
from edgepack.formats.messages import (
    PendingGet,
    ReportKind,
    build_collector_presence,
    build_pending_answer,
    parse_device_state,
    parse_job_status,
    parse_pending_get,
    parse_presence_ping,
    parse_report,
)
from edgepack.formats.topics import TopicKind, Topics

__all__ = ["Collector", "CollectorStats"]

log = logging.getLogger("edgepack.fleet.collector")


@dataclass
class CollectorStats:
    """Counters an operator (and the benchmark) can read."""

    received: int = 0
    written: int = 0
    duplicates: int = 0
    rejected: int = 0
    answered: int = 0
    dropped: int = 0


class Collector:
    """Subscribes to the fleet's topics and writes what arrives into ``store``.

    Args:
        options: the broker.
        store: where to write (SQLite or PostgreSQL).
        share: a shared-subscription group name, for several collectors sharing the load.
        command_keys: operator keys; when given, job commands must verify to be recorded.
        client_id: the MQTT client id (default ``edgepack-collector-HOST[-SHARE]``).
        session_expiry: seconds the broker keeps this collector's session while it is away.
        clock: the time received messages are stamped with.
    """

    def __init__(
        self,
        options: BrokerOptions,
        store: FleetStore,
        *,
        share: str | None = None,
        command_keys: Sequence[ec.EllipticCurvePublicKey] | None = None,
        client_id: str | None = None,
        session_expiry: int = 86_400,
        clock: Clock = utc_now,
    ) -> None:
        self.options = options
        self.store = store
        self.share = share
        self.keys = list(command_keys) if command_keys else None
        self.topics = Topics(options.prefix)
        self.stats = CollectorStats()
        self._client_id = client_id or f"edgepack-collector-{socket.gethostname()}" + (
            f"-{share}" if share else ""
        )
        self.session_expiry = session_expiry
        self._clock = clock
        self._queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue(maxsize=100_000)
        self._writer = threading.Thread(
            target=self._write_loop, name="edgepack-collector", daemon=True
        )
        self._client: mqtt.Client | None = None
        self.ready = threading.Event()

    def _subscriptions(self) -> list[tuple[str, int]]:
        t = self.topics
        shared = [
            t.state("+"),
            t.job_status("+", "+"),
            t.pending_get("+"),
            t.telemetry("+"),
            t.drift("+"),
        ]
        if self.share:
            shared = [f"$share/{self.share}/{topic}" for topic in shared]
        plain = [t.device_jobs("+"), t.group_jobs("+"), t.presence_ping()]
        return [(topic, 1) for topic in shared + plain]

    def start(self) -> Collector:
        """Connect, subscribe and start writing."""
        self._writer.start()
        # A fixed client id and a persistent session: what devices report while the collector
        # restarts waits at the broker instead of being lost.
        client = connect(
            self.options,
            client_id=self._client_id,
            session_expiry=self.session_expiry,
            will=(self.topics.collector(self._client_id), self._presence(False)),
        )
        client.on_message = self._on_message
        client.on_connect = self._on_connect
        subscribed = threading.Event()
        client.on_subscribe = lambda *_args: subscribed.set()
        client.subscribe(self._subscriptions())
        if not subscribed.wait(10):
            client.disconnect()
            client.loop_stop()
            raise BrokerError(
                f"the broker at {self.options.host}:{self.options.port} did not "
                "confirm the collector's subscriptions within 10 s"
            )
        self._client = client
        self._announce(client)
        self.ready.set()
        log.info(
            "collector subscribed on %s:%d%s",
            self.options.host,
            self.options.port,
            f" (shared as {self.share})" if self.share else "",
        )
        return self

    def _presence(self, online: bool) -> bytes:
        return build_collector_presence(self._client_id, online, self._clock())

    def _announce(self, client: mqtt.Client) -> None:
        """Say (retained) that this collector is subscribed: devices that have seen a collector
        hold their reports until one is, so nothing is published into the void."""
        client.publish(
            self.topics.collector(self._client_id), self._presence(True), qos=1, retain=True
        )

    def _on_connect(self, client: mqtt.Client, *_args: Any) -> None:
        client.subscribe(self._subscriptions())  # again after a reconnect
        self._announce(client)  # after the SUBSCRIBE on the same connection: ordered

    def stop(self, drain_timeout: float = 10.0) -> None:
        """Stop receiving, write what is queued, close."""
        if self._client is not None:
            info = self._client.publish(
                self.topics.collector(self._client_id), self._presence(False), qos=1, retain=True
            )
            with contextlib.suppress(ValueError, RuntimeError):
                info.wait_for_publish(timeout=2)
            self._client.disconnect()
            self._client.loop_stop()
        deadline = time.monotonic() + drain_timeout
        while not self._queue.empty() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._queue.put(None)
        self._writer.join(timeout=drain_timeout)

    def _on_message(self, client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic == self.topics.presence_ping():
            try:
                parse_presence_ping(bytes(message.payload))
            except MessageError as e:
                log.debug("ignoring a malformed presence ping: %s", e)
                return
            self._announce(client)  # a device asks who listens: answer live
            return
        self.stats.received += 1
        try:
            # Blocking here is deliberate back-pressure: paho stops reading and the broker
            # queues for us, instead of this collector acknowledging and losing messages.
            self._queue.put((message.topic, bytes(message.payload)), timeout=60)
        except queue.Full:
            self.stats.dropped += 1
            log.error(
                "collector queue full for 60 s: dropping %s (the store is too slow)", message.topic
            )

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            # Everything queued meanwhile goes into one transaction: one commit per batch
            # instead of one fsync per message (writes are idempotent, so a retried batch
            # changes nothing twice).
            batch = [item]
            stop = False
            while len(batch) < 500:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            try:
                self.store.batch(partial(self._handle_batch, batch))
            except StoreError as e:
                log.error(
                    "store write failed for a batch of %d: %s; retrying one by one", len(batch), e
                )
                for topic, payload in batch:
                    try:
                        self._handle_one(topic, payload)
                    except StoreError as again:
                        log.error("store write failed for %s: %s", topic, again)
            if stop:
                return

    def _handle_batch(self, batch: Sequence[tuple[str, bytes]]) -> None:
        for topic, payload in batch:
            self._handle_one(topic, payload)

    def _handle_one(self, topic: str, payload: bytes) -> None:
        """Handle one message; a malformed one is counted and skipped, not fatal to a batch."""
        try:
            self.handle(topic, payload)
        except MessageError as e:  # CommandError included
            self.stats.rejected += 1
            log.warning("ignoring a malformed message on %s: %s", topic, e)

    def handle(self, topic: str, payload: bytes) -> None:
        """Write one message (public for tests and tools replaying captures).

        Raises:
            MessageError: the topic or the payload is malformed (CommandError: a bad command).
            StoreError: the store failed.
        """
        if not payload:
            return  # a cleared retained message
        where = self.topics.parse(topic)
        kind, device = where.kind, where.device or ""
        now = self._clock()
        if kind in (TopicKind.DEVICE_JOBS, TopicKind.GROUP_JOBS):
            self._count(self.store.record_job(_job_row(read_command(payload, self.keys))))
        elif kind is TopicKind.STATE:
            self.store.record_state(device, parse_device_state(payload, device=device), now)
            self.stats.written += 1
        elif kind is TopicKind.JOB_STATUS:
            update = parse_job_status(payload, device=device)
            if update.job_id != where.job_id:
                raise MessageError(
                    f"status of job {update.job_id!r} on the topic of {where.job_id}"
                )
            self._count(self.store.record_execution(update, now))
        elif kind is TopicKind.PENDING_GET:
            self._answer_pending(parse_pending_get(payload, device=device))
        elif kind in (TopicKind.TELEMETRY, TopicKind.DRIFT):
            report = parse_report(payload, ReportKind(kind.value), device=device)
            new = self.store.record_event(report.kind, device, report.payload, report.seq, now)
            self._count(new)
        # pending answers and presence are for devices; the collector keeps nothing of them

    def _count(self, new: bool) -> None:
        if new:
            self.stats.written += 1
        else:
            self.stats.duplicates += 1

    def _answer_pending(self, request: PendingGet) -> None:
        device = request.device
        # The groups the device's own retained state declared, not what the request claims:
        # a device must not fetch another group's commands by asking for them.
        groups = self.store.groups_of(device)
        jobs = self.store.pending_for(device, groups, self._clock())
        if self._client is None:
            return
        answer = build_pending_answer(device, [job.envelope for job in jobs])
        self._client.publish(self.topics.pending(device), answer, qos=1)
        self.stats.answered += 1
        log.debug("answered %s with %d pending command(s)", device, len(jobs))


def _job_row(command: Command) -> JobRow:
    ((target_type, target),) = command.target.items()
    return JobRow(
        command.job_id,
        command.kind.value,
        command.model,
        command.version,
        target_type,
        target,
        command.issued_at,
        command.expires_at,
        command.raw,
    )


def describe(stats: CollectorStats) -> str:
    """One line for logs."""
    return json.dumps(stats.__dict__)
