"""The collector: keeps what the fleet says (state, jobs, job executions) in a store.

It subscribes to every device's retained state, every job execution update, every job command
(so ``status`` knows what was asked), every telemetry and drift report, the retained trust
document, and every device's request for pending work, which it answers from the store. Topics
are read by :func:`edgepack.formats.topics.parse_topic` and payloads by
:mod:`edgepack.formats.messages` and :func:`edgepack.formats.commands.read_command`, which cap
the size, depth and number length before anything is read.

**Every input is hostile.** Messages are handed from paho's network thread to one writer thread
through a bounded queue, so a slow database never blocks the MQTT connection. Each of paho's
callbacks is wrapped: no exception of any kind, whatever the topic's bytes or the payload, gets
out of one into paho's network thread. In the writer, a malformed message is logged and counted
(``rejected``), anything else unexpected is logged with its traceback and counted (``errors``),
and neither ends the thread or spoils the rest of its batch.

**Exactly once.** The writer parses a batch of queued messages first, sorts them by the rows
they write (one lock order for every collector), and writes them in one transaction
(:meth:`~edgepack.fleet._database.FleetStore.batch`), which the store reruns whole on a
deadlock. Counters are bumped and pending answers published only after the commit, so a rerun
neither counts nor answers twice.

Scale-out: start several collectors with the same ``share`` name against a clustered broker; the
high-volume topics are then subscribed as MQTT shared subscriptions (``$share/NAME/...``) and each
message reaches one collector. Job commands and the trust document are retained and stay plain
subscriptions, so every collector records every job (inserts are idempotent).

**Job controls.** A command's ``in_progress_timeout`` is kept beside its job; every
``sweep_interval`` the writer marks ``TIMED_OUT`` the executions still ``IN_PROGRESS`` whose device
has been silent for longer than that plus ``job_grace`` (a device that is up bounds the job itself
and reports ``TIMED_OUT``; this catches one that died or lost its link). A signed ``cancel``
(published by ``edgepack-fleet jobs cancel``, :func:`edgepack.fleet._commands.cancel_job`) is
recorded as the job's cancellation, when it verifies against ``command_keys`` (a collector
without them ignores cancels it hears; ``jobs cancel`` records its own in the store): the
executions that never started become ``CANCELED`` and the job is no longer served in pending
answers.

**Policies.** With a :class:`~edgepack.fleet._policies.PolicyEngine` (``--policies FILE``), a
thread of its own evaluates the rules against the store every ``policy_interval`` seconds and
acts (flags, asks approval, rolls back), off the writer thread, so a slow broker never holds up
what devices report.

**Audit trail.** In the same transaction as what they record, the writer appends to the
hash-chained audit trail (:mod:`edgepack.fleet._audit`) every job command (the signed envelope),
every device's final job status and every trust document; each once, however many copies or
collectors see it.

**Pending answers** carry the newest unfinished command per model addressed to the device or to
a group the *operator* assigned it to (``edgepack-fleet devices assign``), never one the device
claims, plus the latest trust document.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric import ec

from edgepack._clock import Clock, utc_now
from edgepack.fleet import _audit as audit
from edgepack.fleet import _audit_facts as facts
from edgepack.fleet._alerts import Alerter
from edgepack.fleet._broker import BrokerOptions, connect
from edgepack.fleet._database import FleetStore, JobRow, StoreError
from edgepack.fleet._policies import PolicyEngine
from edgepack.fleet._trust import peek_trust, verify_trust
from edgepack.fleet._views import job_devices
from edgepack.fleet.exceptions import BrokerError
from edgepack.formats.commands import Command, CommandKind, read_command
from edgepack.formats.exceptions import EdgepackError, MessageError
from edgepack.formats.messages import (
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
_BATCH = 500


@dataclass
class CollectorStats:
    """Counters an operator (and the benchmark) can read."""

    received: int = 0
    written: int = 0
    duplicates: int = 0
    rejected: int = 0  # malformed or hostile messages, each logged
    answered: int = 0
    dropped: int = 0
    errors: int = 0  # unexpected exceptions caught (a bug, or a store failing for good)


@dataclass(frozen=True)
class _Outcome:
    """What one write did; applied to the counters (and published) after the commit."""

    new: bool | None = None  # True: written, False: a duplicate, None: nothing to count
    publish: tuple[str, bytes] | None = None
    alert: tuple[str, str, dict[str, Any]] | None = None  # (kind, device, payload) to observe


@dataclass(frozen=True)
class _Record:
    """A parsed message: the rows it writes (its place in the lock order) and how to write it."""

    key: tuple[int, str, str, int]
    topic: str
    write: Callable[[], _Outcome]


# The order in which a batch takes its locks: by table, then by the row's key.
_RANK = {TopicKind.DEVICE_JOBS: 0, TopicKind.GROUP_JOBS: 0, TopicKind.STATE: 1,
         TopicKind.JOB_STATUS: 2, TopicKind.TELEMETRY: 3, TopicKind.DRIFT: 3,
         TopicKind.QUALITY: 3, TopicKind.TRUST: 4, TopicKind.PENDING_GET: 5}  # fmt: skip


class Collector:
    """Subscribes to the fleet's topics and writes what arrives into ``store``.

    Args:
        options: the broker.
        store: where to write (SQLite or PostgreSQL).
        share: a shared-subscription group name, for several collectors sharing the load.
        command_keys: operator keys; when given, job commands must verify to be recorded.
        root_keys: offline root keys; when given, trust documents must verify to be recorded.
        client_id: the MQTT client id (default ``edgepack-collector-HOST[-SHARE]``).
        session_expiry: seconds the broker keeps this collector's session while it is away.
        clock: the time received messages are stamped with.
        alerter: told of every committed report and job update, to fire and resolve alerts.
        job_grace: seconds past a job's in-progress timeout before a silent device's execution
            is marked ``TIMED_OUT``.
        sweep_interval: seconds between two such sweeps (on ``clock``).
        policies: evaluated and acted on every ``policy_interval`` seconds (wall time).
    """

    def __init__(
        self,
        options: BrokerOptions,
        store: FleetStore,
        *,
        share: str | None = None,
        command_keys: Sequence[ec.EllipticCurvePublicKey] | None = None,
        root_keys: Sequence[ec.EllipticCurvePublicKey] | None = None,
        client_id: str | None = None,
        session_expiry: int = 86_400,
        clock: Clock = utc_now,
        alerter: Alerter | None = None,
        job_grace: float = 300.0,
        sweep_interval: float = 30.0,
        policies: PolicyEngine | None = None,
        policy_interval: float = 60.0,
    ) -> None:
        self.options = options
        self.alerter = alerter
        self.store = store
        self.share = share
        self.keys = list(command_keys) if command_keys else None
        self.root_keys = list(root_keys) if root_keys else None
        self.topics = Topics(options.prefix)
        self.stats = CollectorStats()
        self._client_id = client_id or f"edgepack-collector-{socket.gethostname()}" + (
            f"-{share}" if share else ""
        )
        self.session_expiry = session_expiry
        self._clock = clock
        self.job_grace, self.sweep_interval = job_grace, sweep_interval
        self._swept = clock()
        self._queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue(maxsize=100_000)
        self._writer = threading.Thread(
            target=self._write_loop, name="edgepack-collector", daemon=True
        )
        self._client: mqtt.Client | None = None
        self.ready = threading.Event()
        self.policies, self.policy_interval = policies, policy_interval
        self._stopping = threading.Event()
        self._policy_thread = threading.Thread(
            target=self._policy_loop, name="edgepack-policies", daemon=True
        )

    def _subscriptions(self) -> list[tuple[str, int]]:
        t = self.topics
        shared = [
            t.state("+"),
            t.job_status("+", "+"),
            t.pending_get("+"),
            t.telemetry("+"),
            t.drift("+"),
            t.quality("+"),
        ]
        if self.share:
            shared = [f"$share/{self.share}/{topic}" for topic in shared]
        plain = [t.device_jobs("+"), t.group_jobs("+"), t.presence_ping(), t.trust()]
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
        client.on_message = self._guarded(self._on_message)
        client.on_connect = self._guarded(self._on_connect)
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
        if self.policies is not None:
            self._policy_thread.start()
        log.info(
            "collector subscribed on %s:%d%s",
            self.options.host,
            self.options.port,
            f" (shared as {self.share})" if self.share else "",
        )
        return self

    def _guarded(self, callback: Callable[..., None]) -> Callable[..., None]:
        """``callback`` for paho: whatever it raises is logged and counted, never let into
        paho's network thread (which would end it: no MQTT, no reconnect)."""

        def guarded(*args: Any) -> None:
            try:
                callback(*args)
            except Exception:  # every kind: this thread must survive any message
                self.stats.errors += 1
                log.exception("collector: %s failed; the message is skipped", callback.__name__)

        return guarded

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

    def _policy_loop(self) -> None:
        assert self.policies is not None
        while not self._stopping.wait(self.policy_interval):
            try:
                for action in self.policies.run():
                    log.warning("policy %s: %s v%s %s (%s)", action.rule, action.model,
                                action.version, action.state, action.action_id)  # fmt: skip
            except Exception:  # a store or broker failure: logged, tried again next interval
                self.stats.errors += 1
                log.exception("collector: evaluating the policies failed")

    def stop(self, drain_timeout: float = 10.0) -> None:
        """Stop receiving, write what is queued, close."""
        self._stopping.set()
        if self._policy_thread.is_alive():
            self._policy_thread.join(timeout=drain_timeout)
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
        payload = bytes(message.payload)
        try:
            topic = message.topic  # paho decodes it as UTF-8 here, and may fail
        except UnicodeDecodeError:
            self.stats.rejected += 1
            log.warning("ignoring a message whose topic is not UTF-8")
            return
        if topic == self.topics.presence_ping():
            try:
                parse_presence_ping(payload)
            except MessageError as e:
                self.stats.rejected += 1
                log.debug("ignoring a malformed presence ping: %s", e)
                return
            self._announce(client)  # a device asks who listens: answer live
            return
        self.stats.received += 1
        try:
            # Blocking here is deliberate back-pressure: paho stops reading and the broker
            # queues for us, instead of this collector acknowledging and losing messages.
            self._queue.put((topic, payload), timeout=60)
        except queue.Full:
            self.stats.dropped += 1
            log.error("collector queue full for 60 s: dropping %s (the store is too slow)", topic)

    def _write_loop(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                self._sweep_due()
                continue
            if item is None:
                return
            batch, stop = [item], False
            while len(batch) < _BATCH:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            try:
                self.process(batch)
            except Exception:  # process() catches everything; this thread must outlive a bug
                self.stats.errors += 1
                log.exception("collector: a batch of %d failed", len(batch))
            self._sweep_due()
            if stop:
                return

    def _sweep_due(self) -> None:
        now = self._clock()
        if (now - self._swept).total_seconds() < self.sweep_interval:
            return
        self._swept = now
        try:
            self.time_out_silent(now)
        except StoreError as e:
            self.stats.errors += 1
            log.error("could not time out silent job executions: %s", e)

    def time_out_silent(self, now: datetime | None = None) -> list[tuple[str, str]]:
        """Mark ``TIMED_OUT`` the executions whose device went silent past the job's
        in-progress timeout plus ``job_grace`` (the writer does this every ``sweep_interval``).

        Returns:
            The ``(job_id, device)`` pairs marked.

        Raises:
            StoreError: the store failed.
        """
        moment, store = now or self._clock(), self.store

        def sweep() -> list[tuple[str, str]]:
            marked = store.time_out_silent(moment, self.job_grace)
            for job_id, device in marked:  # the collector's verdict is an outcome too
                job = store.job(job_id)
                payload = {"job_id": job_id, "status": "TIMED_OUT", "marked_by": "collector",
                           "reason": "silent past the job's in-progress timeout and grace"}
                _audited(functools.partial(
                    audit.append, store, "outcome", payload, at=moment,
                    model=job.model if job else None, version=job.version if job else None,
                    device=device, fact=f"outcome:{job_id}:{device}:timed-out-by-collector",
                ))  # fmt: skip
            return marked

        marked = store.batch(sweep)
        for job_id, device in marked:
            log.warning("job %s on %s: silent past its in-progress timeout", job_id, device)
        return marked

    def process(self, batch: Sequence[tuple[str, bytes]]) -> None:
        """Write a batch of received ``(topic, payload)`` messages; never raises.

        Everything queued meanwhile goes into one transaction: one commit per batch instead of
        one fsync per message. The writer thread calls this; tests and tools replaying captures
        may too. If the batch's transaction fails, each message is tried on its own.
        """
        records = [r for r in (self._parse_counted(t, p) for t, p in batch) if r is not None]
        records.sort(key=lambda r: r.key)  # one lock order for every collector
        try:
            outcomes = self.store.batch(lambda: [r.write() for r in records])
        except Exception as e:  # noqa: BLE001 (a StoreError, or one record's bug: the others count)
            log.error(
                "store write failed for a batch of %d: %s; retrying one by one", len(records), e
            )
            for record in records:
                try:
                    self._apply(self.store.batch(record.write))
                except StoreError as again:
                    self.stats.errors += 1
                    log.error("store write failed for %s: %s", record.topic, again)
                except Exception:  # this record alone is lost, and says why
                    self.stats.errors += 1
                    log.exception("collector: writing the message on %s failed", record.topic)
            return
        for outcome in outcomes:
            self._apply(outcome)

    def handle(self, topic: str, payload: bytes) -> None:
        """Parse and write one message in its own transaction.

        Raises:
            MessageError: the topic or the payload is malformed (CommandError: a bad command).
            StoreError: the store failed.
        """
        record = self._parse(topic, payload)
        if record is not None:
            self._apply(self.store.batch(record.write))

    def _parse_counted(self, topic: str, payload: bytes) -> _Record | None:
        try:
            return self._parse(topic, payload)
        except MessageError as e:  # CommandError and TrustError included
            self.stats.rejected += 1
            log.warning("ignoring a malformed message on %s: %s", topic[:200], e)
        except Exception:  # a parser bug must not take the batch down with it
            self.stats.errors += 1
            log.exception("collector: parsing a message on %s failed", topic[:200])
        return None

    def _apply(self, outcome: _Outcome) -> None:
        if outcome.new is True:
            self.stats.written += 1
        elif outcome.new is False:
            self.stats.duplicates += 1
        if outcome.new is True and outcome.alert is not None and self.alerter is not None:
            try:
                self.alerter.observe(*outcome.alert)
            except Exception:  # alerting must never take message handling down
                self.stats.errors += 1
                log.exception("collector: alert evaluation failed")
        if outcome.publish is not None and self._client is not None:
            topic, answer = outcome.publish
            self._client.publish(topic, answer, qos=1)
            self.stats.answered += 1

    def _parse(self, topic: str, payload: bytes) -> _Record | None:
        """Read one message into the write it asks for; None for a cleared retained message.

        Raises:
            MessageError: the topic or the payload is malformed.
        """
        if not payload:
            return None
        where = self.topics.parse(topic)
        kind, device, now, store = where.kind, where.device or "", self._clock(), self.store
        rank = _RANK.get(kind)
        if rank is None:  # pending answers and presence are for devices
            raise MessageError(f"the collector does not read {kind} topics")
        if kind in (TopicKind.DEVICE_JOBS, TopicKind.GROUP_JOBS):
            command = read_command(payload, self.keys)
            if command.kind is CommandKind.CANCEL:
                if self.keys is None:  # unverified, it could withdraw anyone's job here
                    log.info("not recording cancel %s of %s: without --command-key the "
                             "collector cannot verify it (`jobs cancel` records its own)",
                             command.job_id, command.cancels)  # fmt: skip
                    return None
                return _Record(
                    (rank, str(command.cancels), "", 1), topic, lambda: _cancel(store, command)
                )
            job = _job_row(command)

            def write_job() -> _Outcome:
                new = store.record_job(job)
                if command.in_progress_timeout is not None:
                    store.record_timeout(job.job_id, command.in_progress_timeout)
                _audited(lambda: facts.record_command(store, command, by="collector"))
                return _Outcome(new)

            return _Record((rank, job.job_id, "", 0), topic, write_job)
        if kind is TopicKind.STATE:
            state = parse_device_state(payload, device=device)

            def write_state() -> _Outcome:
                store.record_state(device, state, now)
                return _Outcome(True)

            return _Record((rank, device, "", 0), topic, write_state)
        if kind is TopicKind.JOB_STATUS:
            update = parse_job_status(payload, device=device)
            if update.job_id != where.job_id:
                raise MessageError(
                    f"status of job {update.job_id!r} on the topic of {where.job_id}"
                )
            key = (rank, update.job_id, device, update.seq)
            job_alert = ("job", device, {
                "job_id": update.job_id, "status": str(update.status), "model": update.model,
                "step": None if update.step is None else str(update.step),
                "reason": update.reason, "version_before": update.version_before,
                "version_after": update.version_after,
            })  # fmt: skip

            def write_update() -> _Outcome:
                new = store.record_execution(update, now)
                if new:  # a device's final status joins the audit trail (once per seq)
                    _audited(lambda: facts.record_outcome(store, update, now))
                return _Outcome(new, alert=job_alert)

            return _Record(key, topic, write_update)
        if kind in (TopicKind.TELEMETRY, TopicKind.DRIFT, TopicKind.QUALITY):
            r = parse_report(payload, ReportKind(kind.value), device=device)
            key = (rank, f"{r.kind}/{device}", "", r.seq)
            return _Record(
                key,
                topic,
                lambda: _Outcome(
                    store.record_event(r.kind, device, r.payload, r.seq, now),
                    alert=(str(r.kind), device, dict(r.payload)),
                ),
            )
        if kind is TopicKind.TRUST:
            version = (
                verify_trust(payload, self.root_keys).version
                if self.root_keys
                else peek_trust(payload).version
            )

            def write_trust() -> _Outcome:
                new = store.record_trust(version, payload, now)
                _audited(lambda: facts.record_trust(store, payload, now))  # a key rotation
                return _Outcome(new)

            return _Record((rank, "", "", version), topic, write_trust)
        request = parse_pending_get(payload, device=device)  # its claimed groups are ignored
        return _Record((rank, device, "", 0), topic, lambda: self._answer(request.device, now))

    def _answer(self, device: str, now: datetime) -> _Outcome:
        """Inside the batch's transaction: what is pending for ``device`` (by the operator's
        group assignments only) and the latest trust document; published after the commit."""
        jobs = self.store.pending_for(device, now)
        trust = self.store.latest_trust()
        answer = build_pending_answer(
            device, [job.envelope for job in jobs], None if trust is None else trust.document
        )
        log.debug("answering %s with %d pending command(s)", device, len(jobs))
        return _Outcome(None, (self.topics.pending(device), answer))


def _cancel(store: FleetStore, cancel: Command) -> _Outcome:
    """Record a cancel command: the job's cancellation, and CANCELED where it never started."""
    assert cancel.cancels is not None  # read_command requires it of a cancel
    job = store.job(cancel.cancels)
    if job is not None and job.model != cancel.model:
        log.warning(
            "ignoring cancel %s: it names job %s of %s as a job of %s",
            cancel.job_id,
            job.job_id,
            job.model,
            cancel.model,
        )
        return _Outcome(False)
    devices = [] if job is None else job_devices(store, job)
    new = store.record_cancel(
        cancel.cancels, cancel.issued_at, cancel.key_id, cancel.job_id, devices
    )
    _audited(lambda: facts.record_command(store, cancel, by="collector"))
    return _Outcome(new)


def _audited(append: Callable[[], object]) -> None:
    """Append to the audit trail in the record's transaction; an entry the audit refuses (a
    malformed field: a bug) is logged and never costs the record itself."""
    try:
        append()
    except (ValueError, EdgepackError):
        log.exception("collector: an audit entry was refused; the record itself is kept")


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
