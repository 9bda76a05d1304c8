"""The fleet store, run against both backends: SQLite files and a real PostgreSQL server.

Every behaviour test runs twice (``store`` is parametrized); PostgreSQL tests get a fresh
database on one session-wide server from :mod:`tests.postgres`. The concurrency tests write
the same 1,000 job status updates from two processes at once, as two collectors sharing a
subscription (or a QoS 1 redelivery) would, and check that each update landed exactly once.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import json
import multiprocessing
import os
import random
import sqlite3
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from postgres import fresh_database, postgres_server

from edgepack.fleet._database import FleetStore, JobRow, StoreError, open_store
from edgepack.formats.exceptions import MessageError
from edgepack.formats.messages import (
    DeviceOffline,
    JobStatus,
    JobStep,
    JobUpdate,
    ModelState,
    build_device_offline,
    build_device_state,
    build_job_status,
    parse_device_state,
    parse_job_status,
)

T0 = dt.datetime(2026, 11, 26, 16, 0, tzinfo=dt.timezone.utc)
_counter = itertools.count()


@pytest.fixture(scope="session")
def postgres_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("psycopg", reason="PostgreSQL tests need psycopg (edgepack[postgres])")
    with postgres_server(tmp_path_factory) as dsn:
        yield dsn


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'fleet.db'}"
    dsn = request.getfixturevalue("postgres_dsn")
    return fresh_database(dsn, f"fleet_{os.getpid()}_{next(_counter)}")


@pytest.fixture
def store(store_url: str) -> Iterator[FleetStore]:
    opened = open_store(store_url)
    yield opened
    opened.close()


def at(minutes: float) -> dt.datetime:
    return T0 + dt.timedelta(minutes=minutes)


def state(ts: float, **fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "schema": 1,
        "online": True,
        "profile": "rpi5",
        "agent_version": "0.1.0",
        "groups": ["eu", "canary"],
        "models": {"fraud": {"active": 3, "previous": 2}},
        "health": "ok",
        "ts": at(ts).isoformat(),
    }
    return {**base, **fields}


def job(
    job_id: str,
    *,
    model: str = "fraud",
    target: tuple[str, str] = ("device", "cam-1"),
    issued: float = 0,
    ttl_minutes: float = 60,
) -> JobRow:
    return JobRow(
        job_id,
        "deploy",
        model,
        4,
        *target,
        at(issued),
        at(issued + ttl_minutes),
        json.dumps({"job": job_id}).encode(),
    )


def status(
    job_id: str, device: str, seq: int, state_: str = "IN_PROGRESS", **kw: object
) -> JobUpdate:
    """An update as the collector hands it to the store: built, then parsed."""
    raw = build_job_status(job_id, device, JobStatus(state_), seq=seq, ts=T0, **kw)  # type: ignore[arg-type]
    return parse_job_status(raw, device=device)


# -- device state -----------------------------------------------------------------------------


def test_state_upsert_and_last_will(store: FleetStore) -> None:
    store.record_state("cam-1", state(0), at(0))
    store.record_state("cam-1", state(1, models={"fraud": {"active": 4}}), at(1))
    store.record_state("cam-1", {"schema": 1, "online": False}, at(2))  # the last will
    (row,) = store.devices()
    assert row.device == "cam-1"
    assert not row.online
    assert row.models == {"fraud": {"active": 4, "previous": None, "serving": None}}
    assert (row.profile, row.agent_version, row.health) == ("rpi5", "0.1.0", "ok")
    assert row.groups == ["canary", "eu"]
    assert row.last_seen == at(1)
    store.record_state("cam-1", state(1, models={"fraud": {"active": 4}}), at(3))  # redelivered
    assert not store.devices()[0].online
    store.record_state("cam-1", state(5), at(5))  # back online
    assert store.devices()[0].online
    assert store.devices()[0].last_seen == at(5)


def test_stale_state_is_ignored(store: FleetStore) -> None:
    store.record_state("cam-1", state(5, profile="jetson"), at(5))
    store.record_state("cam-1", state(4, profile="rpi5", groups=["us"]), at(6))
    (row,) = store.devices()
    assert row.profile == "jetson"
    assert row.groups == ["canary", "eu"]
    assert row.last_seen == at(5)


def test_last_will_of_an_old_session_is_ignored(store: FleetStore) -> None:
    store.record_state("cam-1", state(0, session="s1"), at(0))
    store.record_state("cam-1", state(1, session="s2"), at(1))  # reconnected
    store.record_state("cam-1", {"online": False, "session": "s1"}, at(2))  # late will
    assert store.devices()[0].online
    store.record_state("cam-1", {"online": False, "session": "s2"}, at(3))
    assert not store.devices()[0].online


def test_last_will_of_an_unknown_device(store: FleetStore) -> None:
    store.record_state("cam-9", {"online": False}, at(0))
    (row,) = store.devices()
    assert (row.device, row.online, row.models, row.groups) == ("cam-9", False, {}, [])
    store.record_state("cam-9", state(1), at(1))
    assert store.devices()[0].online


def test_devices_by_group(store: FleetStore) -> None:
    store.record_state("cam-1", state(0, groups=["eu", "canary"]), at(0))
    store.record_state("cam-2", state(0, groups=["eu"]), at(0))
    store.record_state("cam-3", state(0, groups=[]), at(0))
    assert [d.device for d in store.devices()] == ["cam-1", "cam-2", "cam-3"]
    assert [d.device for d in store.devices(group="eu")] == ["cam-1", "cam-2"]
    assert [d.device for d in store.devices(group="canary")] == ["cam-1"]
    assert store.devices(group="nowhere") == []
    store.record_state("cam-1", state(1, groups=["us"]), at(1))  # groups move with the state
    assert [d.device for d in store.devices(group="eu")] == ["cam-2"]


def test_parsed_state_and_will_as_the_collector_hands_them_over(store: FleetStore) -> None:
    online = build_device_state(
        "cam-1",
        profile="rpi5",
        agent_version="0.1.0",
        groups=["eu"],
        models={"fraud": ModelState(3, 2, 3)},
        health="ok",
        session="s1",
        ts=at(1),
    )
    store.record_state("cam-1", parse_device_state(online, device="cam-1"), at(1))
    (row,) = store.devices()
    assert (row.online, row.profile, row.groups, row.last_seen) == (True, "rpi5", ["eu"], at(1))
    assert row.models == {"fraud": {"active": 3, "previous": 2, "serving": 3}}
    will = parse_device_state(build_device_offline("cam-1", "s1", ts=at(0)), device="cam-1")
    assert isinstance(will, DeviceOffline)
    store.record_state("cam-1", will, at(2))
    assert not store.devices()[0].online


def test_malformed_state_is_refused(store: FleetStore) -> None:
    with pytest.raises(MessageError, match="groups"):
        store.record_state("cam-1", state(0, groups="eu"), at(0))
    with pytest.raises(MessageError, match="ts"):
        store.record_state("cam-1", {**state(0), "ts": "yesterday"}, at(0))
    with pytest.raises(MessageError, match="'cam-2' on the topic of 'cam-1'"):
        store.record_state("cam-1", {**state(0), "device": "cam-2"}, at(0))
    assert store.devices() == []


# -- jobs and executions ----------------------------------------------------------------------


def test_job_insert_if_absent(store: FleetStore) -> None:
    first = job("deploy-1")
    assert store.record_job(first)
    assert not store.record_job(job("deploy-1", model="other"))
    assert store.job("deploy-1") == first
    assert store.job("missing") is None
    store.record_job(job("deploy-2", issued=5))
    store.record_job(job("deploy-3", model="churn", issued=2))
    assert [j.job_id for j in store.jobs()] == ["deploy-2", "deploy-3", "deploy-1"]
    assert [j.job_id for j in store.jobs(model="fraud", limit=1)] == ["deploy-2"]


def test_execution_updates_are_idempotent(store: FleetStore) -> None:
    update = status("deploy-1", "cam-1", 1, "QUEUED")
    assert store.record_execution(update)
    assert not store.record_execution(update)
    failed = dataclasses.replace(update, status=JobStatus.FAILED)
    assert not store.record_execution(failed)  # same seq: first wins
    assert len(store.history("deploy-1", "cam-1")) == 1
    (current,) = store.executions("deploy-1")
    assert (current.status, current.seq) == ("QUEUED", 1)


def test_out_of_order_updates_keep_the_highest_seq(store: FleetStore) -> None:
    done = status("deploy-1", "cam-1", 3, "SUCCEEDED", version_before=3, version_after=4)
    assert store.record_execution(done)
    assert store.record_execution(status("deploy-1", "cam-1", 2, step=JobStep.DOWNLOADING))
    assert store.record_execution(status("deploy-1", "cam-2", 1, "REJECTED", reason="expired"))
    cam1, cam2 = store.executions("deploy-1")
    assert (cam1.device, cam1.status, cam1.seq, cam1.version_after) == ("cam-1", "SUCCEEDED", 3, 4)
    assert (cam2.device, cam2.status, cam2.reason) == ("cam-2", "REJECTED", "expired")
    assert [(h.seq, h.step) for h in store.history("deploy-1", "cam-1")] == [
        (2, "downloading"),
        (3, None),
    ]
    assert [h.updated_at for h in store.history("deploy-1", "cam-1")] == [T0, T0]  # its own ts


def test_an_update_without_ts_takes_the_time_it_arrived(store: FleetStore) -> None:
    update = dataclasses.replace(status("deploy-1", "cam-1", 1, "QUEUED"), ts=None)
    assert store.record_execution(update, at(7))
    assert store.executions("deploy-1")[0].updated_at == at(7)


def test_pending_for(store: FleetStore) -> None:
    now = at(30)
    store.record_job(job("fraud-old", issued=0))
    store.record_job(job("fraud-new", target=("group", "eu"), issued=10))  # supersedes old
    store.record_job(job("churn-1", model="churn", issued=5))
    store.record_job(job("expired", model="vision", issued=0, ttl_minutes=20))
    store.record_job(job("other-device", model="audio", target=("device", "cam-2")))
    store.record_job(job("other-group", model="text", target=("group", "us")))
    assert [j.job_id for j in store.pending_for("cam-1", now)] == ["churn-1", "fraud-old"]
    assert store.assign("cam-1", ["eu", "canary"], at(0)) == ["canary", "eu"]
    pending = store.pending_for("cam-1", now)
    assert [j.job_id for j in pending] == ["churn-1", "fraud-new"]

    store.record_execution(status("fraud-new", "cam-1", 1, "IN_PROGRESS"))
    assert [j.job_id for j in store.pending_for("cam-1", now)] == ["churn-1", "fraud-new"]
    store.record_execution(status("fraud-new", "cam-1", 2, "SUCCEEDED"))
    store.record_execution(status("churn-1", "cam-1", 1, "REJECTED", reason="no bundle"))
    assert store.pending_for("cam-1", now) == []  # the older fraud job stays superseded
    store.assign("cam-3", ["eu"], at(0))
    assert [j.job_id for j in store.pending_for("cam-3", now)] == ["fraud-new"]
    assert [j.job_id for j in store.pending_for("cam-2", now)] == ["other-device"]


def test_group_commands_follow_the_operators_records_not_the_devices_claims(
    store: FleetStore,
) -> None:
    """cam-1 declares canary in its own state; only the operator's assignment counts."""
    store.record_state("cam-1", state(0, groups=["canary"]), at(0))
    store.record_job(job("canary-1", target=("group", "canary")))
    assert store.pending_for("cam-1", at(1)) == []
    (row,) = store.devices()
    assert (row.groups, row.assigned) == (["canary"], [])  # the mismatch is visible

    assert store.assign("cam-1", ["canary"], at(1)) == ["canary"]
    assert store.assign("cam-1", ["canary"], at(2)) == []  # idempotent
    assert [j.job_id for j in store.pending_for("cam-1", at(1))] == ["canary-1"]
    assert store.devices()[0].assigned == ["canary"]
    assert store.memberships() == {"cam-1": ["canary"]}

    assert store.unassign("cam-1", ["canary", "eu"]) == ["canary"]
    assert store.pending_for("cam-1", at(1)) == []
    assert store.memberships() == {}


def test_devices_by_group_include_the_assigned_and_the_declaring(store: FleetStore) -> None:
    store.record_state("cam-1", state(0, groups=["eu"]), at(0))
    store.record_state("cam-2", state(0, groups=[]), at(0))
    store.assign("cam-2", ["eu"], at(0))
    store.assign("cam-9", ["eu"], at(0))  # never seen: a membership, not a device row
    rows = store.devices(group="eu")
    assert [(d.device, d.groups, d.assigned) for d in rows] == [
        ("cam-1", ["eu"], []),
        ("cam-2", [], ["eu"]),
    ]
    assert store.memberships() == {"cam-2": ["eu"], "cam-9": ["eu"]}


def test_trust_documents_are_recorded_once_per_version(store: FleetStore) -> None:
    assert store.latest_trust() is None
    assert store.record_trust(1, b"doc-1", at(0))
    assert store.record_trust(3, b"doc-3", at(2))
    assert not store.record_trust(3, b"other", at(3))
    assert store.record_trust(2, b"doc-2", at(4))
    latest = store.latest_trust()
    assert latest is not None
    assert (latest.version, latest.document, latest.recorded_at) == (3, b"doc-3", at(2))


# -- events -----------------------------------------------------------------------------------


def test_events_are_idempotent(store: FleetStore) -> None:
    assert store.record_event("telemetry", "cam-1", {"p95_ms": 4.1}, 1, at(0))
    assert not store.record_event("telemetry", "cam-1", {"p95_ms": 9.9}, 1, at(1))
    assert store.record_event("telemetry", "cam-2", {"p95_ms": 5.0}, 1, at(1))
    assert store.record_event("drift", "cam-1", {"psi": 0.3}, "2026-11-26T16:02", at(2))
    assert store.record_event("telemetry", "cam-1", {"p95_ms": 4.3}, 2, at(3))
    assert store.events("telemetry") == [
        ("cam-1", at(0), {"p95_ms": 4.1}),
        ("cam-2", at(1), {"p95_ms": 5.0}),
        ("cam-1", at(3), {"p95_ms": 4.3}),
    ]
    assert [e[2] for e in store.events("telemetry", device="cam-1", since=at(1))] == [
        {"p95_ms": 4.3}
    ]
    assert [e[1] for e in store.events("telemetry", limit=2)] == [at(1), at(3)]
    assert store.events("drift") == [("cam-1", at(2), {"psi": 0.3})]


# -- opening ----------------------------------------------------------------------------------


def test_store_survives_reopening(store_url: str) -> None:
    first = open_store(store_url)
    first.record_job(job("deploy-1"))
    first.close()
    second = open_store(store_url)
    assert second.job("deploy-1") == job("deploy-1")
    second.close()


def test_sqlite_file_is_private_and_wal(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "fleet.db"
    open_store(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_open_errors_say_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match=r"cannot open store .*check the path"):
        open_store(tmp_path / "file" / "fleet.db")
    with pytest.raises(StoreError, match=r"cannot open store mysql://.*unknown scheme"):
        open_store("mysql://db/fleet")
    pytest.importorskip("psycopg")
    with pytest.raises(StoreError, match=r"cannot open store postgresql://u:\*\*\*@127"):
        open_store("postgresql://u:secret@127.0.0.1:1/fleet?connect_timeout=2")


def test_a_version_1_store_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    with sqlite3.connect(path) as conn:  # what edgepack before memberships created
        conn.execute("CREATE TABLE schema_version (id INTEGER PRIMARY KEY, version INTEGER)")
        conn.execute("INSERT INTO schema_version VALUES (1, 1)")
    store = open_store(path)
    assert store.assign("cam-1", ["eu"], at(0)) == ["eu"]
    store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchone() == (4,)
    tables = {"memberships", "job_controls", "rollouts", "rollout_leases", "audit_log"}
    assert store_tables(path) >= tables


def store_tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {name for (name,) in rows}


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    open_store(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(StoreError, match="upgrade edgepack"):
        open_store(path)


# -- two collectors at once -------------------------------------------------------------------

JOBS, DEVICES, STEPS = 50, 4, ("QUEUED", "IN_PROGRESS", "IN_PROGRESS", "IN_PROGRESS", "SUCCEEDED")


def _updates() -> list[JobUpdate]:
    return [
        status(f"job-{j}", f"cam-{d}", seq, name)
        for j in range(JOBS)
        for d in range(DEVICES)
        for seq, name in enumerate(STEPS, start=1)
    ]


def _write_all(url: str, seed: int, start: threading.Barrier) -> int:
    updates = _updates()
    random.Random(seed).shuffle(updates)  # each "collector" sees its own order
    store = open_store(url)
    start.wait(timeout=30)  # both writers race from here
    try:
        new = 0
        for n, update in enumerate(updates):
            new += store.record_execution(update)
            if n % 50 == 49:
                # SQLite's busy handler backs off in sleeps of up to 100 ms, so one writer could
                # otherwise finish before the other gets a turn; meeting often keeps them racing.
                start.wait(timeout=30)
        return new
    finally:
        store.close()


def test_two_processes_write_the_same_updates(store_url: str) -> None:
    open_store(store_url).close()  # the schema exists before the race starts
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, context.Pool(2) as pool:
        start = manager.Barrier(2)
        results = [pool.apply_async(_write_all, (store_url, seed, start)) for seed in (1, 2)]
        new = [result.get(timeout=60) for result in results]
    assert sum(new) == len(_updates()) == 1000  # every update was new for exactly one writer
    store = open_store(store_url)
    try:
        for j in range(JOBS):
            current = store.executions(f"job-{j}")
            assert [(c.device, c.status, c.seq) for c in current] == [
                (f"cam-{d}", "SUCCEEDED", 5) for d in range(DEVICES)
            ]
            for d in range(DEVICES):
                assert [h.seq for h in store.history(f"job-{j}", f"cam-{d}")] == [1, 2, 3, 4, 5]
    finally:
        store.close()


def test_threads_share_one_store(store: FleetStore) -> None:
    updates = _updates()[:400]

    def write(part: list[JobUpdate]) -> None:
        for update in part:
            store.record_execution(update)

    threads = [threading.Thread(target=write, args=(updates[i::2] + updates,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (
        sum(len(store.history(f"job-{j}", f"cam-{d}")) for j in range(20) for d in range(4)) == 400
    )


def test_postgres_reconnects_after_the_link_broke(postgres_dsn: str) -> None:
    import psycopg

    url = fresh_database(postgres_dsn, f"fleet_{os.getpid()}_reconnect")
    store = open_store(url)
    try:
        store.record_job(job("deploy-1"))
        with psycopg.connect(url, autocommit=True) as admin:  # as a server restart would
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        assert store.record_job(job("deploy-2"))
        assert {j.job_id for j in store.jobs()} == {"deploy-1", "deploy-2"}
    finally:
        store.close()


def test_a_real_deadlock_is_rolled_back_and_run_again_once(postgres_dsn: str) -> None:
    """Two batches take the same two rows in opposite orders and meet in the middle: PostgreSQL
    detects the deadlock and aborts one; the store runs that batch again whole, and between
    them each job is recorded (counted new) exactly once."""
    url = fresh_database(postgres_dsn, f"fleet_{os.getpid()}_deadlock")
    stores = [open_store(url), open_store(url)]
    middle = threading.Barrier(2, timeout=30)
    results: list[list[bool]] = [[], []]

    def work(index: int, order: tuple[str, str]) -> None:
        store, attempts = stores[index], []

        def body() -> list[bool]:
            attempts.append(1)
            first = store.record_job(job(order[0]))
            if len(attempts) == 1:
                middle.wait()  # both hold their first row: the second inserts now deadlock
            return [first, store.record_job(job(order[1]))]

        results[index] = store.batch(body)

    threads = [
        threading.Thread(target=work, args=(0, ("job-a", "job-b"))),
        threading.Thread(target=work, args=(1, ("job-b", "job-a"))),
    ]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert sum(s.transactions_retried for s in stores) == 1
        assert sorted(results) == [[False, False], [True, True]]  # the rerun found both there
        assert {j.job_id for j in stores[0].jobs()} == {"job-a", "job-b"}
    finally:
        for store in stores:
            store.close()


def test_alert_state_is_kept_in_the_store(store: FleetStore) -> None:
    """The collector's alert state is a table of the fleet store, on either backend: a firing
    alert is remembered across Alerters (de-duplicated), and its resolution is sent once."""
    from edgepack.fleet._alerts import Alerter

    report = {"model": "churn", "version": 2, "status": "drift", "seq": 1}
    first = Alerter(store, clock=lambda: at(0))
    assert [a.status for a in first.observe("drift", "dev-a", report)] == ["firing"]
    second = Alerter(store, clock=lambda: at(1))  # a restarted collector
    assert second.observe("drift", "dev-a", report | {"seq": 2}) == []
    ok = report | {"status": "ok", "seq": 3}
    assert [a.status for a in second.observe("drift", "dev-a", ok)] == ["resolved"]
    assert second.observe("drift", "dev-a", ok | {"seq": 4}) == []
    (alert,) = second.alerts()
    assert (alert.status, alert.starts_at, alert.ends_at) == ("resolved", at(0), at(1))
