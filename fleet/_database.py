"""The fleet store: where the collector keeps device state, jobs, executions and reports.

The collector (``edgepack-fleet collector``) writes what it hears over MQTT here; the CLI reads
it back. One small interface, :class:`FleetStore`, has two backends sharing their SQL: SQLite
(the default: a file, no server; WAL and a busy timeout let the collector and the CLI share it)
and PostgreSQL (psycopg 3) for large fleets, where several collectors split the load through
MQTT shared subscriptions and all write into one database.

MQTT delivers at least once, and two collectors can each see a copy, so every write is
idempotent by unique constraints in the database, which hold across processes:

* a job is inserted if absent (by ``job_id``);
* each job status update goes into an append-only history, unique on ``(job_id, device, seq)``;
  the current row per ``(job_id, device)`` keeps the highest ``seq``, so late updates never
  move a job backwards;
* telemetry and drift reports are events, unique on ``(kind, device, seq)``;
* a device's state is ordered by its ``ts``: an older one is ignored and a copy of the current
  one changes nothing. The last will (``{"online": false}``) only flips ``online``; when both
  it and the stored state carry a ``session`` id it applies only to its own session, so a late
  or redelivered will from an old connection cannot mark a reconnected device offline.

The store writes messages already parsed by :mod:`edgepack.formats.messages` (a
:class:`~edgepack.formats.messages.DeviceState` or its Last Will, a
:class:`~edgepack.formats.messages.JobUpdate`); it parses nothing itself. Database failures raise
:class:`StoreError`; a state handed in as a plain mapping is validated by
:func:`~edgepack.formats.messages.read_device_state`, which raises
:class:`~edgepack.formats.exceptions.MessageError`.
"""

# SQL text is assembled only from this module's constants; values always travel as parameters.
# ruff: noqa: S608

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

from edgepack.fleet.exceptions import StoreError
from edgepack.formats.messages import (
    TERMINAL,
    DeviceOffline,
    DeviceState,
    JobStatus,
    JobUpdate,
    ReportKind,
    read_device_state,
)

__all__ = ["DeviceRow", "ExecutionRow", "FleetStore", "JobRow", "StoreError", "open_store"]

SCHEMA_VERSION = 1
_UTC = timezone.utc
_HINT = "check that the database is reachable and not full"
T = TypeVar("T")
Payload = Mapping[str, Any]  # a decoded JSON object
State = DeviceState | DeviceOffline | Payload  # a mapping is validated by read_device_state


@dataclass(frozen=True)
class DeviceRow:
    device: str
    online: bool
    profile: str | None
    agent_version: str | None
    groups: list[str]
    models: dict[str, Any]  # name -> {"active": ..., "previous": ..., ...}
    health: str | None
    last_seen: datetime  # when the state now stored was received


@dataclass(frozen=True)
class JobRow:
    job_id: str
    kind: str
    model: str
    version: int | None
    target_type: str  # "device" or "group"
    target: str
    issued_at: datetime
    expires_at: datetime
    envelope: bytes  # the signed command, re-served to devices that ask for pending work


@dataclass(frozen=True)
class ExecutionRow:
    job_id: str
    device: str
    status: JobStatus  # a str enum: compares equal to "SUCCEEDED" and the like
    step: str | None
    reason: str | None
    version_before: int | None
    version_after: int | None
    seq: int
    updated_at: datetime


class FleetStore(Protocol):
    """What the collector and the CLI need from a store; see the module docstring."""

    def record_state(self, device: str, state: State, received_at: datetime) -> None: ...
    def record_job(self, job: JobRow) -> bool: ...
    def batch(self, work: Callable[[], T]) -> T: ...
    def record_execution(self, update: JobUpdate, received_at: datetime | None = None) -> bool: ...
    def record_event(
        self, kind: ReportKind | str, device: str, payload: Payload, seq: int | str, at: datetime
    ) -> bool: ...
    def devices(self, group: str | None = None) -> list[DeviceRow]: ...
    def groups_of(self, device: str) -> list[str]: ...
    def job(self, job_id: str) -> JobRow | None: ...
    def jobs(self, model: str | None = None, limit: int = 50) -> list[JobRow]: ...
    def executions(self, job_id: str) -> list[ExecutionRow]: ...
    def history(self, job_id: str, device: str) -> list[ExecutionRow]: ...
    def pending_for(self, device: str, groups: Sequence[str], now: datetime) -> list[JobRow]: ...
    def events(
        self, kind: str, device: str | None = None, since: datetime | None = None, limit: int = 1000
    ) -> list[tuple[str, datetime, dict[str, Any]]]: ...
    def close(self) -> None: ...


# One DDL for both backends: SQLite gives these PostgreSQL type names NUMERIC affinity, which
# keeps our ISO times and JSON as text and bytes as blobs. "?" is the placeholder.
_EXEC_TABLE = """job_id TEXT NOT NULL, device TEXT NOT NULL, status TEXT NOT NULL, step TEXT,
    reason TEXT, version_before BIGINT, version_after BIGINT, seq BIGINT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL"""
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS schema_version (
    id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    device TEXT PRIMARY KEY, online BOOLEAN NOT NULL, profile TEXT, agent_version TEXT,
    models JSONB NOT NULL, health TEXT, session_id TEXT, state_ts TIMESTAMPTZ,
    last_seen TIMESTAMPTZ NOT NULL);
CREATE TABLE IF NOT EXISTS device_groups (
    device TEXT NOT NULL, grp TEXT NOT NULL, PRIMARY KEY (device, grp));
CREATE INDEX IF NOT EXISTS device_groups_by_group ON device_groups (grp);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, kind TEXT NOT NULL, model TEXT NOT NULL, version BIGINT,
    target_type TEXT NOT NULL, target TEXT NOT NULL, issued_at TIMESTAMPTZ NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL, envelope BYTEA NOT NULL);
CREATE INDEX IF NOT EXISTS jobs_by_target ON jobs (target_type, target);
CREATE INDEX IF NOT EXISTS jobs_by_model ON jobs (model, issued_at);
CREATE TABLE IF NOT EXISTS execution_history ({_EXEC_TABLE}, PRIMARY KEY (job_id, device, seq));
CREATE TABLE IF NOT EXISTS executions ({_EXEC_TABLE}, PRIMARY KEY (job_id, device));
CREATE TABLE IF NOT EXISTS events (
    kind TEXT NOT NULL, device TEXT NOT NULL, seq TEXT NOT NULL, received_at TIMESTAMPTZ NOT NULL,
    payload JSONB NOT NULL, PRIMARY KEY (kind, device, seq));
CREATE INDEX IF NOT EXISTS events_by_device ON events (kind, device, received_at);
CREATE INDEX IF NOT EXISTS events_by_time ON events (kind, received_at)
"""
# A full state replaces the row unless it is older than the stored one; an equal ts (a copy,
# or a second state within the same second) updates the fields but not online/last_seen.
_UPSERT_STATE = """
INSERT INTO devices (device, online, profile, agent_version, models, health, session_id,
                     state_ts, last_seen) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (device) DO UPDATE SET
    online = CASE WHEN devices.state_ts IS NULL OR excluded.state_ts > devices.state_ts
                  THEN excluded.online ELSE devices.online END,
    last_seen = CASE WHEN devices.state_ts IS NULL OR excluded.state_ts > devices.state_ts
                     THEN excluded.last_seen ELSE devices.last_seen END,
    profile = excluded.profile, agent_version = excluded.agent_version,
    models = excluded.models, health = excluded.health, session_id = excluded.session_id,
    state_ts = excluded.state_ts
WHERE devices.state_ts IS NULL OR excluded.state_ts >= devices.state_ts
"""
_UPSERT_LWT = """
INSERT INTO devices (device, online, models, session_id, last_seen) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (device) DO UPDATE SET online = excluded.online
WHERE devices.session_id IS NULL OR excluded.session_id IS NULL
   OR devices.session_id = excluded.session_id
"""
_DEVICE_COLUMNS = "device, online, profile, agent_version, models, health, last_seen"
_JOB_COLUMNS = "job_id, kind, model, version, target_type, target, issued_at, expires_at, envelope"
_EXEC_COLUMNS = (
    "job_id, device, status, step, reason, version_before, version_after, seq, updated_at"
)
_NINE = "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
_INSERT_HISTORY = f"INSERT INTO execution_history ({_EXEC_COLUMNS}) {_NINE} ON CONFLICT DO NOTHING"
_UPSERT_EXECUTION = f"""
INSERT INTO executions ({_EXEC_COLUMNS}) {_NINE}
ON CONFLICT (job_id, device) DO UPDATE SET
    status = excluded.status, step = excluded.step, reason = excluded.reason,
    version_before = excluded.version_before, version_after = excluded.version_after,
    seq = excluded.seq, updated_at = excluded.updated_at
WHERE excluded.seq > executions.seq
"""


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=_UTC) if moment.tzinfo is None else moment.astimezone(_UTC)


def _ts(moment: datetime) -> str:
    """A fixed-width UTC ISO time: SQLite compares these as text, PostgreSQL casts them."""
    return _utc(moment).isoformat(timespec="microseconds")


def _from_ts(value: Any) -> datetime:
    return _utc(value if isinstance(value, datetime) else datetime.fromisoformat(value))


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _from_json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value  # PostgreSQL decodes JSONB


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")))


def _device(row: Sequence[Any], groups: list[str]) -> DeviceRow:
    name, on, profile, agent, models, health, seen = row
    models, seen = _from_json(models), _from_ts(seen)
    return DeviceRow(name, bool(on), profile, agent, groups, models, health, seen)


def _job(row: Sequence[Any]) -> JobRow:
    return JobRow(*(*row[:6], _from_ts(row[6]), _from_ts(row[7]), bytes(row[8])))


def _execution(row: Sequence[Any]) -> ExecutionRow:
    job_id, device, status, step, reason, before, after, seq, updated = row
    return ExecutionRow(
        job_id, device, JobStatus(status), step, reason, before, after, seq, _from_ts(updated)
    )


class _Store:
    """The shared SQL, on SQLite: one connection for the caller's threads, one at a time."""

    _errors: tuple[type[Exception], ...] = (sqlite3.Error,)

    def __init__(self, name: str, conn: Any) -> None:
        self.name, self._conn, self._lock = name, conn, threading.RLock()
        self._cursor: Any = None  # set while a batch() transaction is open
        self._run("creating the schema", self._create_schema, write=True)

    @classmethod
    def sqlite(cls, path: Path, busy_timeout: float = 30.0) -> _Store:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))  # SQLite's -wal/-shm copy its mode
        conn = sqlite3.connect(path, busy_timeout, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")  # readers and the writer never block each other
        return cls(str(path), conn)

    def _q(self, sql: str) -> str:
        return sql

    def _transact(self, body: Callable[[Any], T], write: bool) -> T:
        # IMMEDIATE takes the write lock up front (waiting up to busy_timeout), so a
        # transaction never fails half-way because another process writes too.
        self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        with self._conn:  # COMMIT, or ROLLBACK if body raises
            return body(self._conn.cursor())

    def batch(self, work: Callable[[], T]) -> T:
        """Run ``work`` (which calls this store's methods) in one transaction: one commit (one
        fsync) for many writes. Any database error rolls back the whole batch."""

        def body(cur: Any) -> T:
            self._cursor = cur
            try:
                return work()
            finally:
                self._cursor = None

        return self._run("a batch of writes", body, write=True)

    def _run(self, what: str, body: Callable[[Any], T], *, write: bool = False) -> T:
        with self._lock:
            if self._cursor is not None:  # inside batch(), on this thread (the lock is ours)
                return body(self._cursor)
            try:
                return self._transact(body, write)
            except self._errors as e:
                raise StoreError(f"fleet store {self.name}: {what} failed: {e}; {_HINT}") from e

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        def body(cur: Any) -> list[tuple[Any, ...]]:
            cur.execute(self._q(sql), tuple(params))
            return [tuple(row) for row in cur.fetchall()]

        return self._run("a query", body)

    def _write(self, what: str, sql: str, params: Sequence[Any]) -> bool:
        """Run one writing statement; True if it changed a row."""

        def body(cur: Any) -> bool:
            cur.execute(self._q(sql), tuple(params))
            return bool(cur.rowcount == 1)

        return self._run(what, body, write=True)

    def _create_schema(self, cur: Any) -> None:
        for statement in _SCHEMA.split(";"):
            cur.execute(statement)
        insert = "INSERT INTO schema_version (id, version) VALUES (1, ?) ON CONFLICT DO NOTHING"
        cur.execute(self._q(insert), (SCHEMA_VERSION,))
        cur.execute("SELECT version FROM schema_version WHERE id = 1")
        (version,) = cur.fetchone()
        if version > SCHEMA_VERSION:
            raise StoreError(f"its schema {version} is newer than ours: upgrade edgepack")

    def record_state(self, device: str, state: State, received_at: datetime) -> None:
        """Upsert a device's state or apply its Last Will (ordering: see the module docstring).

        Args:
            device: the device (from the topic).
            state: the parsed state or will; a mapping is validated first.
            received_at: when it arrived (its ``ts``, when it has none).

        Raises:
            MessageError: ``state`` is a mapping that is not a valid state.
            StoreError: the database failed.
        """
        if not isinstance(state, (DeviceState, DeviceOffline)):
            state = read_device_state(state, device=device)
        seen = _ts(received_at)
        if isinstance(state, DeviceOffline):
            lwt = (device, False, "{}", state.session, seen)
            self._write("recording a last will", _UPSERT_LWT, lwt)
            return
        groups = state.groups
        models = {
            name: {"active": m.active, "previous": m.previous, "serving": m.serving}
            for name, m in state.models.items()
        }
        ts = _ts(state.ts if state.ts is not None else received_at)
        described = (state.profile, state.agent_version, _json(models), state.health)
        params = (device, state.online, *described, state.session, ts, seen)

        def body(cur: Any) -> None:
            cur.execute(self._q(_UPSERT_STATE), params)
            if cur.rowcount == 1:  # applied: its groups replace the stored ones
                cur.execute(self._q("DELETE FROM device_groups WHERE device = ?"), (device,))
                for group in sorted(set(groups)):
                    cur.execute(self._q("INSERT INTO device_groups VALUES (?, ?)"), (device, group))

        self._run("recording device state", body, write=True)

    def record_job(self, job: JobRow) -> bool:
        """Insert a job unless one with its ``job_id`` exists. Returns True if it was new."""
        fields = (job.job_id, job.kind, job.model, job.version, job.target_type, job.target)
        params = (*fields, _ts(job.issued_at), _ts(job.expires_at), job.envelope)
        sql = f"INSERT INTO jobs ({_JOB_COLUMNS}) {_NINE} ON CONFLICT DO NOTHING"
        return self._write("recording a job", sql, params)

    def record_execution(self, update: JobUpdate, received_at: datetime | None = None) -> bool:
        """Record a job status update (parsed by ``edgepack.formats.messages.parse_job_status``).

        Args:
            update: the update.
            received_at: when it arrived; its time when the update carries no ``ts``.

        Returns:
            True if it was new; False for a copy of one already recorded (same ``job_id``,
            ``device`` and ``seq``), which changes nothing.

        Raises:
            StoreError: the database failed.
        """
        moment = update.ts or received_at or datetime.now(_UTC)
        step = None if update.step is None else update.step.value
        versions = (update.version_before, update.version_after)
        head = (update.job_id, update.device, update.status.value, step, update.reason)
        params = (*head, *versions, update.seq, _ts(moment))

        def body(cur: Any) -> bool:
            cur.execute(self._q(_INSERT_HISTORY), params)
            if cur.rowcount != 1:
                return False
            cur.execute(self._q(_UPSERT_EXECUTION), params)
            return True

        return self._run("recording a job status", body, write=True)

    def record_event(
        self, kind: ReportKind | str, device: str, payload: Payload, seq: int | str, at: datetime
    ) -> bool:
        """Append a telemetry or drift report unless ``(kind, device, seq)`` is recorded."""
        kind = str(kind)  # a ReportKind prints as its value
        params = (kind, device, str(seq), _ts(at), _json(dict(payload)))
        sql = "INSERT INTO events (kind, device, seq, received_at, payload) VALUES (?, ?, ?, ?, ?)"
        return self._write(f"recording a {kind} event", sql + " ON CONFLICT DO NOTHING", params)

    def groups_of(self, device: str) -> list[str]:
        """The groups ``device`` declared in its latest state (empty if unknown)."""
        rows = self._rows("SELECT grp FROM device_groups WHERE device = ? ORDER BY grp", (device,))
        return [str(row[0]) for row in rows]

    def devices(self, group: str | None = None) -> list[DeviceRow]:
        """All devices, or those in ``group``, by name."""
        in_group = "SELECT device FROM device_groups WHERE grp = ?"
        where, params = ("", ()) if group is None else (f" WHERE device IN ({in_group})", (group,))
        chosen = f"SELECT device FROM devices{where}"

        def body(cur: Any) -> list[DeviceRow]:
            cur.execute(self._q(f"SELECT {_DEVICE_COLUMNS} FROM devices{where} ORDER BY 1"), params)
            rows = cur.fetchall()
            sql = f"SELECT device, grp FROM device_groups WHERE device IN ({chosen}) ORDER BY grp"
            cur.execute(self._q(sql), params)
            groups: dict[str, list[str]] = {}
            for name, grp in cur.fetchall():
                groups.setdefault(name, []).append(grp)
            return [_device(row, groups.get(row[0], [])) for row in rows]

        return self._run("listing devices", body)

    def job(self, job_id: str) -> JobRow | None:
        rows = self._rows(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def jobs(self, model: str | None = None, limit: int = 50) -> list[JobRow]:
        """The newest jobs first, optionally for one model."""
        where, params = ("", ()) if model is None else (" WHERE model = ?", (model,))
        sql = f"SELECT {_JOB_COLUMNS} FROM jobs{where} ORDER BY issued_at DESC, job_id DESC LIMIT ?"
        return [_job(row) for row in self._rows(sql, (*params, limit))]

    def executions(self, job_id: str) -> list[ExecutionRow]:
        """The current execution of a job on each device, by device."""
        sql = f"SELECT {_EXEC_COLUMNS} FROM executions WHERE job_id = ? ORDER BY device"
        return [_execution(row) for row in self._rows(sql, (job_id,))]

    def history(self, job_id: str, device: str) -> list[ExecutionRow]:
        """Every update of a job on one device, by ``seq``."""
        sql = f"SELECT {_EXEC_COLUMNS} FROM execution_history WHERE job_id = ? AND device = ?"
        return [_execution(row) for row in self._rows(sql + " ORDER BY seq", (job_id, device))]

    def pending_for(self, device: str, groups: Sequence[str], now: datetime) -> list[JobRow]:
        """The jobs a device still has to run, by model name.

        Per model only the newest unexpired job addressed to the device or one of its groups
        counts; once the device has finished it (a terminal status) nothing is pending for that
        model: an older job is superseded, never re-served.
        """
        targets = "(target_type = 'device' AND target = ?)"
        if groups:
            targets += f" OR (target_type = 'group' AND target IN ({', '.join('?' * len(groups))}))"
        terminal = sorted(status.value for status in TERMINAL)
        done = (
            "EXISTS (SELECT 1 FROM execution_history h WHERE h.job_id = jobs.job_id AND"
            f" h.device = ? AND h.status IN ({', '.join('?' * len(terminal))}))"
        )
        sql = (
            f"SELECT {_JOB_COLUMNS}, {done} FROM jobs WHERE expires_at > ? AND ({targets})"
            " ORDER BY model, issued_at DESC, job_id DESC"
        )
        newest: dict[str, tuple[Any, ...]] = {}
        for row in self._rows(sql, [device, *terminal, _ts(now), device, *groups]):
            newest.setdefault(row[2], row)
        return [_job(row) for row in newest.values() if not row[-1]]

    def events(
        self, kind: str, device: str | None = None, since: datetime | None = None, limit: int = 1000
    ) -> list[tuple[str, datetime, dict[str, Any]]]:
        """The latest ``limit`` events of a kind (from ``since`` on), oldest first."""
        where, params = "kind = ?", [kind]
        if device is not None:
            where, params = where + " AND device = ?", [*params, device]
        if since is not None:
            where, params = where + " AND received_at >= ?", [*params, _ts(since)]
        sql = f"SELECT device, received_at, payload FROM events WHERE {where}"
        rows = self._rows(
            sql + " ORDER BY received_at DESC, LENGTH(seq) DESC, seq DESC LIMIT ?",  # "10" > "9"
            [*params, limit],
        )
        return [(name, _from_ts(at), _from_json(data)) for name, at, data in reversed(rows)]

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()


class _PostgresStore(_Store):
    """The same SQL on PostgreSQL (psycopg 3), which casts the text times and JSON it is sent."""

    def __init__(self, url: str, connect_timeout: int = 10) -> None:
        import psycopg

        self._psycopg, self._url, self._errors = psycopg, url, (psycopg.Error,)
        self._options: dict[str, Any] = {"autocommit": True, "connect_timeout": connect_timeout}
        super().__init__(_redact(url), None)

    def _q(self, sql: str) -> str:
        return sql.replace("?", "%s")

    def _create_schema(self, cur: Any) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(7405150001)")  # collectors starting at once
        super()._create_schema(cur)

    def _transact(self, body: Callable[[Any], T], write: bool) -> T:
        for attempt in (1, 2):
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = self._psycopg.connect(self._url, **self._options)
                with self._conn.transaction(), self._conn.cursor() as cur:
                    return body(cur)
            except self._psycopg.OperationalError:
                # Every write is idempotent, so one retry on a fresh connection is safe.
                if attempt == 2 or self._conn is None or not self._conn.broken:
                    raise
                self._conn.close()
        raise AssertionError("unreachable")


def open_store(url: str | Path) -> FleetStore:
    """Open a fleet store, creating its tables if absent.

    Args:
        url: ``postgresql://user@host/db``; or ``sqlite:///abs/path.db`` or a plain path for
            SQLite (the file is created with mode 0600).

    Raises:
        StoreError: it cannot be opened, its schema is newer than ours, or psycopg is missing.
    """
    text, shown, hint = str(url), _redact(str(url)), "check the path and its permissions"
    scheme = re.match(r"^([a-z][a-z0-9+.-]*)://", text)
    try:
        if scheme is None or scheme.group(1) == "sqlite":
            return _Store.sqlite(Path(text.removeprefix("sqlite://")).expanduser())
        if scheme.group(1) in ("postgresql", "postgres"):
            hint = "check that the server runs and the URL's user, host and database are right"
            return _PostgresStore(text)
    except ImportError as e:
        raise StoreError(f"cannot open store {shown}: install edgepack[postgres] (psycopg)") from e
    except StoreError as e:
        reason = f"{e.__cause__}; {hint}" if e.__cause__ else str(e)
        raise StoreError(f"cannot open store {shown}: {reason}") from e
    except (OSError, sqlite3.Error) as e:
        raise StoreError(f"cannot open store {shown}: {e}; {hint}") from e
    problem = f"unknown scheme {scheme.group(1)!r}; use a path, sqlite:///path or postgresql://…"
    raise StoreError(f"cannot open store {shown}: {problem}")
