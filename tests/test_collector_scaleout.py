"""Collector scale-out: two collectors share one subscription and write into one PostgreSQL.

Real parts only: mosquitto on a free loopback port (:mod:`tests.brokers`), a throwaway
PostgreSQL server (:mod:`tests.postgres`), two :class:`edgepack.fleet._collector.Collector`
instances with ``share="collectors"`` and their own client ids and connections, and 50 simulated
devices, each its own MQTT connection, publishing job status updates and their state. The broker
hands each message of a shared subscription to one collector; the store's unique constraints make a
second copy (a QoS 1 redelivery) change nothing. The last test checks the same on SQLite with
a single collector.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
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
    build_device_state,
    build_job_status,
)
from edgepack.formats.topics import Topics

DEVICES, JOBS = 50, 10
STEPS = (
    (JobStatus.QUEUED, None),
    (JobStatus.IN_PROGRESS, JobStep.DOWNLOADING),
    (JobStatus.IN_PROGRESS, JobStep.HEALTH_CHECK),
    (JobStatus.SUCCEEDED, None),
)
M = DEVICES * JOBS * len(STEPS)  # 2,000 status updates
T0 = dt.datetime(2026, 11, 26, 16, 30, tzinfo=dt.timezone.utc)
WAIT = 20.0

pytestmark = pytest.mark.timeout(60)


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
    """Every device runs every job through the four steps: M updates, seq 1-4 each."""
    out = []
    for job in range(JOBS):
        job_id = f"deploy-20261126T1600{job:02d}-abcdef"
        for i in range(DEVICES):
            device = f"dev-{i:02d}"
            for seq, (status, step) in enumerate(STEPS, start=1):
                body = build_job_status(
                    job_id, device, status, model="iris", step=step, version_before=1,
                    version_after=2 if status is JobStatus.SUCCEEDED else None, seq=seq,
                )  # fmt: skip
                out.append((device, topics.job_status(device, job_id), body, False))
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
    """Counts and the full current tables, read straight from PostgreSQL."""
    import psycopg

    with psycopg.connect(dsn) as conn:
        one: Callable[[str], Any] = lambda sql: conn.execute(sql).fetchone()[0]  # noqa: E731
        return {
            "history": one("SELECT count(*) FROM execution_history"),
            "distinct": one(
                "SELECT count(*) FROM"
                " (SELECT DISTINCT job_id, device, seq FROM execution_history) AS d"
            ),
            "executions": conn.execute(
                "SELECT job_id, device, status, step, seq, version_after, updated_at"
                " FROM executions ORDER BY job_id, device"
            ).fetchall(),
            "devices": conn.execute(
                "SELECT device, online, profile, models::text, health, session_id, state_ts,"
                " last_seen FROM devices ORDER BY device"
            ).fetchall(),
            "groups": conn.execute("SELECT * FROM device_groups ORDER BY 1, 2").fetchall(),
        }


@pytest.fixture
def shared_pair(broker: Broker, postgres_dsn: str) -> Iterator[tuple[list[Collector], str, Topics]]:
    """Two collectors sharing ``$share/collectors/...``, each with its own PostgreSQL session."""
    dsn = fresh_database(postgres_dsn, f"scaleout_{uuid.uuid4().hex[:8]}")
    options = options_for(broker)
    stores: list[FleetStore] = []
    collectors: list[Collector] = []
    try:
        for name in ("collector-a", "collector-b"):
            stores.append(open_store(dsn))
            collector = Collector(options, stores[-1], share="collectors", client_id=name)
            collectors.append(collector.start())
        yield collectors, dsn, Topics(options.prefix)
    finally:
        for collector in collectors:
            collector.stop(drain_timeout=5)
        for store in stores:
            store.close()


def test_two_collectors_share_the_load_and_write_everything_once(
    shared_pair: tuple[list[Collector], str, Topics],
) -> None:
    collectors, dsn, topics = shared_pair
    updates, device_states = status_updates(topics), states(topics)
    options = collectors[0].options
    with devices(options, DEVICES) as clients:
        send(clients, device_states + updates)
        expected = M + DEVICES
        wait_for(lambda: handled(collectors) >= expected, "both collectors writing")
        time.sleep(0.2)  # anything extra (a copy delivered to both) would show up now

        first = total(collectors)
        assert (first.received, first.written) == (expected, expected)  # each message once
        assert first.duplicates == first.rejected == 0
        for collector in collectors:  # round robin: far from all on one collector
            assert collector.stats.written > expected // 10, [c.stats for c in collectors]

        before = snapshot(dsn)
        assert before["history"] == before["distinct"] == M
        assert len(before["executions"]) == DEVICES * JOBS
        assert {(row[2], row[3], row[4], row[5]) for row in before["executions"]} == {
            ("SUCCEEDED", None, 4, 2)
        }  # whatever order the two collectors wrote the steps in
        assert [row[0] for row in before["devices"]] == sorted(clients)
        assert all(row[1] and row[2] == "x86_64-cpu" for row in before["devices"])
        assert json.loads(before["devices"][0][3])["iris"]["active"] == 2
        assert len(before["groups"]) == DEVICES

        # QoS 1 redelivery: a random fifth of the updates and of the states arrive again.
        again = random.Random(7).sample(updates, M // 5) + device_states[::5]
        send(clients, again)
        wait_for(lambda: handled(collectors) >= expected + len(again), "the copies handled")
        time.sleep(0.2)

    second = total(collectors)
    assert second.duplicates == M // 5  # every copied update recognised as one
    assert second.received == second.written + second.duplicates == expected + len(again)
    assert snapshot(dsn) == before  # not one row added or changed


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
