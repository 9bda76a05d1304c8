"""Collector scale-out: 2-4 collectors share one subscription and write into one PostgreSQL.

Real parts only: mosquitto on a free loopback port (:mod:`tests.brokers`), a throwaway
PostgreSQL server (:mod:`tests.postgres`), 2, 3 and 4 :class:`edgepack.fleet._collector.Collector`
instances (one round each, on a fresh database) with ``share="collectors"`` and their own client
ids and connections, and 40 simulated devices, each its own MQTT connection, publishing their
state, 9,600 job status updates, 1,200 telemetry reports and 1,200 copies of them (a QoS 1
redelivery, on purpose) shuffled in. The broker hands each message of a shared subscription to
one collector; the collectors write batches in one lock order, the store reruns a deadlocked
transaction whole, unique keys make a copy change nothing, and counters move only after a
commit: so every message is stored, and counted, exactly once, every round. The last test checks
the same on SQLite with a single collector.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from brokers import Broker, mosquitto
from postgres import fresh_database, postgres_server

from edgepack.fleet._broker import BrokerOptions, connect
from edgepack.fleet._collector import Collector, CollectorStats
from edgepack.fleet._database import FleetStore, open_store
from edgepack.formats.messages import (
    JobStatus,
    JobStep,
    ModelState,
    ReportKind,
    build_device_state,
    build_job_status,
    build_report,
)
from edgepack.formats.topics import Topics

DEVICES = 40
STEPS = (
    (JobStatus.QUEUED, None),
    (JobStatus.IN_PROGRESS, JobStep.DOWNLOADING),
    (JobStatus.IN_PROGRESS, JobStep.VERIFYING),
    (JobStatus.IN_PROGRESS, JobStep.INSTALLING),
    (JobStatus.IN_PROGRESS, JobStep.HEALTH_CHECK),
    (JobStatus.IN_PROGRESS, JobStep.COMMITTING),
    (JobStatus.IN_PROGRESS, JobStep.COMMITTING),
    (JobStatus.SUCCEEDED, None),
)
# Per round, by default: 40 devices x 30 jobs x 8 steps = 9,600 status updates, 40 x 30 telemetry
# reports = 1,200, and 1,200 copies redelivered on purpose, shuffled in among the originals:
# 12,040 messages with the states; 36,120 over the three rounds. EDGEPACK_SCALEOUT_JOBS=50 gives
# 20,040 a round (PostgreSQL round trips, about 1,000 messages/s on a busy 2-core machine, are
# what sets the pace).
JOBS = int(os.environ.get("EDGEPACK_SCALEOUT_JOBS", "30"))
REPORTS = JOBS
COPIES = DEVICES * JOBS
T0 = dt.datetime(2026, 11, 26, 16, 30, tzinfo=dt.timezone.utc)
WAIT = 60.0

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with mosquitto(tmp_path_factory.mktemp("broker")) as running:
        yield running


@pytest.fixture(scope="module")
def postgres_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("psycopg", reason="PostgreSQL tests need psycopg (edgepack[postgres])")
    with contextlib.ExitStack() as stack:
        try:
            dsn = stack.enter_context(postgres_server(tmp_path_factory))
        except RuntimeError as e:  # installed, but initdb or pg_ctl failed here
            pytest.skip(f"PostgreSQL could not be started: {e}")
        yield dsn


def options_for(broker: Broker) -> BrokerOptions:
    """A prefix of its own, so one test's retained states never reach another's collectors."""
    return BrokerOptions(port=broker.port, prefix=f"edgepack/t{uuid.uuid4().hex[:8]}")


def wait_for(done: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.02)


def handled(collectors: list[Collector]) -> int:
    return sum(c.stats.written + c.stats.duplicates + c.stats.rejected for c in collectors)


def total(collectors: list[Collector]) -> CollectorStats:
    out = CollectorStats()
    for c in collectors:
        for name, value in c.stats.__dict__.items():
            setattr(out, name, getattr(out, name) + value)
    return out


@contextlib.contextmanager
def devices(options: BrokerOptions, count: int) -> Iterator[dict[str, mqtt.Client]]:
    """``count`` device connections, ``dev-00`` and up."""
    clients: dict[str, mqtt.Client] = {}
    try:
        for i in range(count):
            name = f"dev-{i:02d}"
            clients[name] = connect(options, client_id=f"edgepack-{name}")
        yield clients
    finally:
        for client in clients.values():
            client.disconnect()
            client.loop_stop()


def send(clients: dict[str, mqtt.Client], messages: list[tuple[str, str, bytes, bool]]) -> None:
    """Publish ``(device, topic, payload, retain)`` at QoS 1; wait for every PUBACK."""
    infos = [clients[d].publish(topic, body, qos=1, retain=r) for d, topic, body, r in messages]
    for info in infos:
        info.wait_for_publish(WAIT)
        assert info.is_published()


def status_updates(topics: Topics) -> list[tuple[str, str, bytes, bool]]:
    """Every device runs every job through the eight steps: seq 1-8 each."""
    out = []
    for job in range(JOBS):
        job_id = f"deploy-20261126T16{job:04d}-abcdef"
        for i in range(DEVICES):
            device = f"dev-{i:02d}"
            for seq, (status, step) in enumerate(STEPS, start=1):
                body = build_job_status(
                    job_id, device, status, model="iris", step=step, version_before=1,
                    version_after=2 if status is JobStatus.SUCCEEDED else None, seq=seq, ts=T0,
                )  # fmt: skip
                out.append((device, topics.job_status(device, job_id), body, False))
    return out


def reports(topics: Topics) -> list[tuple[str, str, bytes, bool]]:
    out = []
    for i in range(DEVICES):
        device = f"dev-{i:02d}"
        for seq in range(1, REPORTS + 1):
            body = build_report(ReportKind.TELEMETRY, device, seq, {"requests": seq}, ts=T0)
            out.append((device, topics.telemetry(device), body, False))
    return out


def states(topics: Topics) -> list[tuple[str, str, bytes, bool]]:
    out = []
    for i in range(DEVICES):
        device = f"dev-{i:02d}"
        state = build_device_state(
            device, profile="x86_64-cpu", agent_version="0.1.0", groups=["line-1"],
            models={"iris": ModelState(2, 1, 2)}, health="ok", session=f"s{i}", ts=T0,
        )  # fmt: skip
        out.append((device, topics.state(device), state, True))
    return out


def snapshot(dsn: str) -> dict[str, Any]:
    """Counts and the current executions, read straight from PostgreSQL."""
    import psycopg

    with psycopg.connect(dsn) as conn:
        one: Callable[[str], Any] = lambda sql: conn.execute(sql).fetchone()[0]  # noqa: E731
        return {
            "history": one("SELECT count(*) FROM execution_history"),
            "events": one("SELECT count(*) FROM events"),
            "devices": one("SELECT count(*) FROM devices"),
            "groups": one("SELECT count(*) FROM device_groups"),
            "executions": conn.execute(
                "SELECT status, step, seq, version_after, count(*) FROM executions"
                " GROUP BY 1, 2, 3, 4"
            ).fetchall(),
        }


@contextlib.contextmanager
def shared_collectors(
    broker: Broker, postgres_dsn: str, count: int
) -> Iterator[tuple[list[Collector], list[FleetStore], str, Topics]]:
    """``count`` collectors sharing ``$share/collectors/...``, each with its own PostgreSQL
    session, on a fresh database and a fresh prefix."""
    dsn = fresh_database(postgres_dsn, f"scaleout_{uuid.uuid4().hex[:8]}")
    options = options_for(broker)
    stores: list[FleetStore] = []
    collectors: list[Collector] = []
    try:
        for n in range(count):
            stores.append(open_store(dsn))
            collector = Collector(options, stores[-1], share="collectors", client_id=f"coll-{n}")
            collectors.append(collector.start())
        yield collectors, stores, dsn, Topics(options.prefix)
    finally:
        for collector in collectors:
            collector.stop(drain_timeout=5)
        for store in stores:
            store.close()


@pytest.mark.parametrize("count", [2, 3, 4])
def test_collectors_sharing_the_load_store_each_message_exactly_once(
    broker: Broker, postgres_dsn: str, count: int
) -> None:
    """12,040 messages (1,200 of them copies, shuffled in so that two collectors often write
    the same rows at once) through ``count`` collectors into one PostgreSQL: every row once,
    every counter exact, every job at its last step, whatever deadlocks were rerun."""
    started = time.monotonic()
    with shared_collectors(broker, postgres_dsn, count) as (collectors, stores, dsn, topics):
        updates, telemetry, device_states = status_updates(topics), reports(topics), states(topics)
        unique = updates + telemetry
        shuffle = random.Random(count)
        stream = unique + shuffle.sample(unique, COPIES)
        shuffle.shuffle(stream)
        options = collectors[0].options
        with devices(options, DEVICES) as clients:
            send(clients, device_states + stream)
            expected = len(device_states) + len(stream)
            wait_for(lambda: handled(collectors) >= expected, f"{count} collectors writing")

        seen = total(collectors)
        assert seen.received == expected  # each message reached exactly one collector
        assert (seen.rejected, seen.errors, seen.dropped) == (0, 0, 0)
        assert seen.written == len(device_states) + len(unique)  # counted after each commit
        assert seen.duplicates == COPIES
        for collector in collectors:  # round robin: none left idle
            assert collector.stats.received > expected // (4 * count), [c.stats for c in collectors]
        rows = snapshot(dsn)
        assert rows["history"] == len(updates)
        assert rows["events"] == len(telemetry)
        assert (rows["devices"], rows["groups"]) == (DEVICES, DEVICES)
        assert rows["executions"] == [("SUCCEEDED", None, len(STEPS), 2, DEVICES * JOBS)]
        retried = sum(store.transactions_retried for store in stores)
    print(
        f"\n{count} collectors: {expected:,} messages ({COPIES:,} copies) stored exactly once"
        f" in {time.monotonic() - started:.1f} s; {retried} transaction(s) rerun"
    )


def test_a_redelivered_status_is_a_duplicate_on_sqlite(broker: Broker, tmp_path: Path) -> None:
    options = options_for(broker)
    topics = Topics(options.prefix)
    store = open_store(tmp_path / "fleet.db")
    collector = Collector(options, store, client_id="collector-solo").start()
    job = "deploy-20261126T160000-abcdef"
    try:
        with devices(options, 1) as clients:
            topic = topics.job_status("dev-00", job)
            queued = build_job_status(job, "dev-00", JobStatus.QUEUED, model="iris", seq=1, ts=T0)
            done = build_job_status(
                job, "dev-00", JobStatus.SUCCEEDED, model="iris", version_after=2, seq=2, ts=T0
            )
            send(clients, [("dev-00", topic, queued, False), ("dev-00", topic, done, False)])
            wait_for(lambda: collector.stats.written == 2, "the updates written")
            (current,) = store.executions(job)

            send(clients, [("dev-00", topic, done, False), ("dev-00", topic, queued, False)])
            wait_for(lambda: collector.stats.duplicates == 2, "the copies counted")
    finally:
        collector.stop(drain_timeout=5)
    assert collector.stats.written == 2
    assert store.executions(job) == [current]
    assert (current.status, current.seq) == ("SUCCEEDED", 2)  # the late QUEUED moved nothing
    assert [row.seq for row in store.history(job, "dev-00")] == [1, 2]
    store.close()
