"""The fleet store: where the collector keeps device state, jobs, executions and reports.

The collector (``edgepack-fleet collector``) writes what it hears over MQTT here; the CLI reads
it back, and keeps here what only the operator decides: which groups each device belongs to
(``edgepack-fleet devices assign``) and the trust documents it published. One small interface,
:class:`FleetStore`, has two backends sharing their SQL (:mod:`edgepack.fleet._schema`): SQLite
(the default: a file, no server; WAL and a busy timeout let the collector and the CLI share it)
and PostgreSQL (psycopg 3) for large fleets, where several collectors split the load through
MQTT shared subscriptions and all write into one database.

**Exactly once.** MQTT delivers at least once, two collectors can each see a copy, and a
transaction may be retried; every write is therefore idempotent by a unique key in the database
(the table in :mod:`~edgepack.fleet._schema`), which holds across processes:

* a job is inserted if absent (by ``job_id``);
* each job status update goes into an append-only history, unique on ``(job_id, device, seq)``;
  the current row per ``(job_id, device)`` keeps the highest ``seq``, so late updates never
  move a job backwards;
* telemetry and drift reports are events, unique on ``(kind, device, seq)``;
* a device's state is ordered by its ``ts``: an older one is ignored and a copy of the current
  one changes nothing. The last will (``{"online": false}``) only flips ``online``; when both
  it and the stored state carry a ``session`` id it applies only to its own session, so a late
  or redelivered will from an old connection cannot mark a reconnected device offline.

:meth:`FleetStore.batch` runs many writes in one transaction. Writers that batch take their row
locks in one order (the collector sorts each batch by key), and on PostgreSQL a transaction that
still ends in ``deadlock detected`` or a serialization failure is rolled back and run again as a
whole, a bounded number of times with jittered backoff; being idempotent, a rerun changes nothing
that the first attempt already did.

**Who is in which group** is the operator's record (``memberships``), never what a device says
about itself: :meth:`FleetStore.pending_for` serves group commands only by it, and
``edgepack-fleet acl`` writes the broker's ACL from it. The groups a device declares in its own
state are kept too (``DeviceRow.groups``), to show a mismatch, and are trusted for nothing.

The store writes messages already parsed by :mod:`edgepack.formats.messages`; it parses nothing
itself. Database failures raise :class:`StoreError`; a state handed in as a plain mapping is
validated by :func:`~edgepack.formats.messages.read_device_state`, which raises
:class:`~edgepack.formats.exceptions.MessageError`.
"""

# SQL text is assembled only from edgepack.fleet._schema's constants; values are parameters.
# ruff: noqa: S608

from __future__ import annotations

import os
import random
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from edgepack.fleet import _schema as sql
from edgepack.fleet._schema import (
    AuditEntry,
    DecisionRow,
    DeviceRow,
    ExecutionRow,
    JobControlRow,
    JobRow,
    LeaseRow,
    PolicyActionRow,
    RolloutDeviceRow,
    RolloutRow,
    TrustRow,
)
from edgepack.fleet.exceptions import StoreError
from edgepack.formats.messages import (
    TERMINAL,
    DeviceOffline,
    DeviceState,
    JobUpdate,
    ReportKind,
    read_device_state,
)

if TYPE_CHECKING:
    from edgepack.fleet._audit import AuditDraft

__all__ = [
    "AuditEntry",
    "DecisionRow",
    "DeviceRow",
    "ExecutionRow",
    "FleetStore",
    "JobControlRow",
    "JobRow",
    "LeaseRow",
    "PolicyActionRow",
    "RolloutDeviceRow",
    "RolloutRow",
    "StoreError",
    "TrustRow",
    "open_store",
]

_HINT = "check that the database is reachable and not full"
T = TypeVar("T")
Payload = Mapping[str, Any]  # a decoded JSON object
State = DeviceState | DeviceOffline | Payload  # a mapping is validated by read_device_state


class FleetStore(Protocol):
    """What the collector and the CLI need from a store; see the module docstring."""

    transactions_retried: int

    def record_state(self, device: str, state: State, received_at: datetime) -> None: ...
    def record_job(self, job: JobRow) -> bool: ...
    def batch(self, work: Callable[[], T]) -> T: ...
    def record_execution(self, update: JobUpdate, received_at: datetime | None = None) -> bool: ...
    def record_event(
        self, kind: ReportKind | str, device: str, payload: Payload, seq: int | str, at: datetime
    ) -> bool: ...
    def assign(self, device: str, groups: Sequence[str], at: datetime) -> list[str]: ...
    def unassign(self, device: str, groups: Sequence[str]) -> list[str]: ...
    def memberships(self) -> dict[str, list[str]]: ...
    def record_trust(self, version: int, document: bytes, at: datetime) -> bool: ...
    def latest_trust(self) -> TrustRow | None: ...
    def devices(self, group: str | None = None) -> list[DeviceRow]: ...
    def job(self, job_id: str) -> JobRow | None: ...
    def jobs(
        self, model: str | None = None, limit: int = 50, since: datetime | None = None
    ) -> list[JobRow]: ...
    def record_timeout(self, job_id: str, seconds: int) -> bool: ...
    def record_cancel(
        self, job_id: str, at: datetime, by: str, cancel_job_id: str, unstarted: Sequence[str]
    ) -> bool: ...
    def job_controls(self, job_ids: Sequence[str]) -> dict[str, JobControlRow]: ...
    def time_out_silent(self, now: datetime, grace: float) -> list[tuple[str, str]]: ...
    def executions(self, job_id: str) -> list[ExecutionRow]: ...
    def history(self, job_id: str, device: str) -> list[ExecutionRow]: ...
    def pending_for(self, device: str, now: datetime) -> list[JobRow]: ...
    def events(
        self, kind: str, device: str | None = None, since: datetime | None = None, limit: int = 1000
    ) -> list[tuple[str, datetime, dict[str, Any]]]: ...
    def create_rollout(
        self, rollout: RolloutRow, devices: Sequence[RolloutDeviceRow], decision: DecisionRow
    ) -> None: ...
    def rollout(self, rollout_id: str) -> RolloutRow | None: ...
    def rollouts(self, limit: int = 50) -> list[RolloutRow]: ...
    def rollout_devices(self, rollout_id: str) -> list[RolloutDeviceRow]: ...
    def update_rollout(
        self, old: RolloutRow, state: str, stage: int, data: Payload,
        decisions: Sequence[DecisionRow], at: datetime,
    ) -> bool: ...  # fmt: skip
    def request_rollout(self, rollout_id: str, request: str) -> bool: ...
    def decisions(self, rollout_id: str) -> list[DecisionRow]: ...
    def acquire_lease(
        self, rollout_id: str, holder: str, until: datetime, now: datetime
    ) -> LeaseRow: ...
    def release_lease(self, rollout_id: str, holder: str) -> bool: ...
    def append_audit(self, draft: AuditDraft) -> tuple[AuditEntry, bool]: ...
    def audit_rows(
        self, where: Sequence[tuple[str, Any]] = (), after: int = 0, limit: int | None = None,
        newest: bool = False,
    ) -> list[AuditEntry]: ...  # fmt: skip
    def record_policy_action(self, action: PolicyActionRow) -> bool: ...
    def policy_action(self, action_id: str) -> PolicyActionRow | None: ...
    def policy_actions(
        self, state: str | None = None, limit: int = 100
    ) -> list[PolicyActionRow]: ...
    def update_policy_action(
        self, old: PolicyActionRow, state: str, data: Payload, at: datetime,
        decided_by: str | None = None,
    ) -> bool: ...  # fmt: skip
    def close(self) -> None: ...


class _Store:
    """The shared SQL, on SQLite: one connection for the caller's threads, one at a time."""

    _errors: tuple[type[Exception], ...] = (sqlite3.Error,)

    def __init__(self, name: str, conn: Any) -> None:
        self.name, self._conn, self._lock = name, conn, threading.RLock()
        self._cursor: Any = None  # set while a batch() transaction is open
        self.transactions_retried = 0  # deadlocks and serialization failures run again
        self._run("creating the schema", self._create_schema, write=True)

    @classmethod
    def sqlite(cls, path: Path, busy_timeout: float = 30.0) -> _Store:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))  # SQLite's -wal/-shm copy its mode
        conn = sqlite3.connect(path, busy_timeout, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")  # readers and the writer never block each other
        return cls(str(path), conn)

    def _q(self, text: str) -> str:
        return text

    def _transact(self, body: Callable[[Any], T], write: bool) -> T:
        # IMMEDIATE takes the write lock up front (waiting up to busy_timeout): one writer at a
        # time, so SQLite has no deadlocks and a transaction never fails half-way.
        self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        with self._conn:  # COMMIT, or ROLLBACK if body raises
            return body(self._conn.cursor())

    def batch(self, work: Callable[[], T]) -> T:
        """Run ``work`` (which calls this store's methods) in one transaction: one commit (one
        fsync) for many writes. Any database error rolls back the whole batch; on PostgreSQL a
        deadlock or serialization failure runs ``work`` again from the start (so ``work`` must
        change nothing outside the store: return what it found instead)."""

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

    def _rows(self, text: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        def body(cur: Any) -> list[tuple[Any, ...]]:
            cur.execute(self._q(text), tuple(params))
            return [tuple(row) for row in cur.fetchall()]

        return self._run("a query", body)

    def _write(self, what: str, text: str, params: Sequence[Any]) -> bool:
        """Run one writing statement; True if it changed a row."""

        def body(cur: Any) -> bool:
            cur.execute(self._q(text), tuple(params))
            return bool(cur.rowcount == 1)

        return self._run(what, body, write=True)

    def _create_schema(self, cur: Any) -> None:
        for statement in sql.SCHEMA.split(";"):
            cur.execute(statement)
        cur.execute(self._q(sql.INSERT_SCHEMA_VERSION), (sql.SCHEMA_VERSION,))
        cur.execute("SELECT version FROM schema_version WHERE id = 1")
        (version,) = cur.fetchone()
        if version > sql.SCHEMA_VERSION:
            raise StoreError(f"its schema {version} is newer than ours: upgrade edgepack")
        cur.execute(self._q(sql.UPGRADE_SCHEMA_VERSION), (sql.SCHEMA_VERSION,) * 2)

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
        seen = sql.ts(received_at)
        if isinstance(state, DeviceOffline):
            lwt = (device, False, "{}", state.session, seen)
            self._write("recording a last will", sql.UPSERT_LWT, lwt)
            return
        groups = state.groups
        models = {
            name: {"active": m.active, "previous": m.previous, "serving": m.serving}
            for name, m in state.models.items()
        }
        moment = sql.ts(state.ts if state.ts is not None else received_at)
        described = (state.profile, state.agent_version, sql.to_json(models), state.health)
        params = (device, state.online, *described, state.session, moment, seen)

        def body(cur: Any) -> None:
            cur.execute(self._q(sql.UPSERT_STATE), params)
            if cur.rowcount == 1:  # applied: the groups it declares replace the stored ones
                cur.execute(self._q(sql.DELETE_DECLARED), (device,))
                for group in sorted(set(groups)):
                    cur.execute(self._q(sql.INSERT_DECLARED), (device, group))

        self._run("recording device state", body, write=True)

    def record_job(self, job: JobRow) -> bool:
        """Insert a job unless one with its ``job_id`` exists. Returns True if it was new."""
        fields = (job.job_id, job.kind, job.model, job.version, job.target_type, job.target)
        params = (*fields, sql.ts(job.issued_at), sql.ts(job.expires_at), job.envelope)
        return self._write("recording a job", sql.INSERT_JOB, params)

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
        moment = update.ts or received_at or datetime.now(timezone.utc)
        step = None if update.step is None else update.step.value
        versions = (update.version_before, update.version_after)
        head = (update.job_id, update.device, update.status.value, step, update.reason)
        params = (*head, *versions, update.seq, sql.ts(moment))

        def body(cur: Any) -> bool:
            cur.execute(self._q(sql.INSERT_HISTORY), params)
            if cur.rowcount != 1:
                return False
            cur.execute(self._q(sql.UPSERT_EXECUTION), params)
            return True

        return self._run("recording a job status", body, write=True)

    def record_event(
        self, kind: ReportKind | str, device: str, payload: Payload, seq: int | str, at: datetime
    ) -> bool:
        """Append a telemetry or drift report unless ``(kind, device, seq)`` is recorded."""
        kind = str(kind)  # a ReportKind prints as its value
        params = (kind, device, str(seq), sql.ts(at), sql.to_json(dict(payload)))
        return self._write(f"recording a {kind} event", sql.INSERT_EVENT, params)

    # -- the operator's records -------------------------------------------------------------

    def assign(self, device: str, groups: Sequence[str], at: datetime) -> list[str]:
        """Record that ``device`` is in ``groups``; returns the groups that were new for it."""

        def body(cur: Any) -> list[str]:
            new = []
            for group in sorted(set(groups)):
                cur.execute(self._q(sql.INSERT_MEMBERSHIP), (device, group, sql.ts(at)))
                if cur.rowcount == 1:
                    new.append(group)
            return new

        return self._run("assigning a device to groups", body, write=True)

    def unassign(self, device: str, groups: Sequence[str]) -> list[str]:
        """Remove ``device`` from ``groups``; returns the groups it was actually in."""

        def body(cur: Any) -> list[str]:
            removed = []
            for group in sorted(set(groups)):
                cur.execute(self._q(sql.DELETE_MEMBERSHIP), (device, group))
                if cur.rowcount == 1:
                    removed.append(group)
            return removed

        return self._run("removing a device from groups", body, write=True)

    def memberships(self) -> dict[str, list[str]]:
        """Every device the operator assigned to a group -> its groups, both sorted."""
        found: dict[str, list[str]] = {}
        for device, group in self._rows("SELECT device, grp FROM memberships ORDER BY 1, 2"):
            found.setdefault(str(device), []).append(str(group))
        return found

    def record_trust(self, version: int, document: bytes, at: datetime) -> bool:
        """Keep a published trust document unless its version is recorded. True if new."""
        return self._write(
            "recording a trust document", sql.INSERT_TRUST, (version, document, sql.ts(at))
        )

    def latest_trust(self) -> TrustRow | None:
        """The recorded trust document with the highest version, if any."""
        rows = self._rows(sql.LATEST_TRUST)
        return sql.trust_row(rows[0]) if rows else None

    # -- staged rollouts (edgepack.fleet._rollout) ------------------------------------------

    def create_rollout(
        self, rollout: RolloutRow, devices: Sequence[RolloutDeviceRow], decision: DecisionRow
    ) -> None:
        """Record a new rollout, its plan and its first decision in one transaction.

        Raises:
            StoreError: the database failed, or a rollout with that id exists.
        """
        r = rollout
        head = (r.rollout_id, r.model, r.version, r.group, r.state, r.stage)
        params = (*head, sql.to_json(r.spec), sql.to_json(r.data), r.request, r.revision,
                  sql.ts(r.created_at), sql.ts(r.updated_at))  # fmt: skip

        def body(cur: Any) -> None:
            cur.execute(self._q(sql.INSERT_ROLLOUT), params)
            for d in devices:
                row = (d.rollout_id, d.device, d.profile, d.stage, d.old_version, d.deploy_job)
                cur.execute(self._q(sql.INSERT_ROLLOUT_DEVICE), (*row, d.rollback_job))
            self._decision(cur, decision, r)

        self._run(f"recording rollout {r.rollout_id}", body, write=True)

    def _decision(self, cur: Any, d: DecisionRow, rollout: RolloutRow) -> None:
        params = (d.rollout_id, d.seq, sql.ts(d.at), d.stage, d.action, d.reason)
        cur.execute(self._q(sql.INSERT_DECISION), (*params, sql.to_json(d.figures)))
        if cur.rowcount == 1:  # every rollout decision joins the audit trail, in its transaction
            from edgepack.fleet._audit_facts import decision_draft  # it imports this module

            self._append_audit(cur, decision_draft(d, rollout))

    # -- the audit trail (edgepack.fleet._audit) ---------------------------------------------

    def _lock_audit(self, cur: Any) -> None:
        """Serialize appends (SQLite: the IMMEDIATE transaction already holds the write lock)."""

    def _append_audit(self, cur: Any, draft: AuditDraft) -> tuple[AuditEntry, bool]:
        from edgepack.fleet._audit import GENESIS, seal  # it imports this module

        self._lock_audit(cur)
        if draft.fact is not None:
            cur.execute(self._q(sql.AUDIT_BY_FACT), (draft.fact,))
            found = cur.fetchone()
            if found is not None:
                return sql.audit_entry(tuple(found)), False
        cur.execute(self._q(sql.AUDIT_TAIL))
        tail = cur.fetchone()
        entry = seal(draft, 1 if tail is None else int(tail[0]) + 1, GENESIS if tail is None
                     else tail[1])  # fmt: skip
        e = entry
        row = (e.seq, sql.ts(e.at), e.kind, e.model, e.version, e.device, e.key_id, e.fact,
               e.payload_text, e.prev_hash, e.hash)  # fmt: skip
        cur.execute(self._q(sql.INSERT_AUDIT), row)
        return entry, True

    def append_audit(self, draft: AuditDraft) -> tuple[AuditEntry, bool]:
        """Append one entry to the audit trail, chained to the last one, in one transaction
        (inside :meth:`batch`, in the batch's). Appends are serialized: one chain, whoever
        writes. A ``fact`` already recorded is not appended again.

        Returns:
            The entry (the one recorded before, for a known fact) and whether it is new.
        """
        return self._run("appending to the audit trail", lambda cur: self._append_audit(cur, draft),
                         write=True)  # fmt: skip

    def audit_rows(
        self, where: Sequence[tuple[str, Any]] = (), after: int = 0, limit: int | None = None,
        newest: bool = False,
    ) -> list[AuditEntry]:  # fmt: skip
        """Audit entries with ``seq > after`` matching every ``(condition, value)`` in ``where``
        (conditions are edgepack.fleet._audit's constants), by ``seq`` (newest first with
        ``newest``), at most ``limit``."""
        text = f"SELECT {sql.AUDIT_COLUMNS} FROM audit_log WHERE seq > ?"
        params: list[Any] = [after]
        for condition, value in where:
            text, params = f"{text} AND {condition}", [*params, value]
        text += " ORDER BY seq DESC" if newest else " ORDER BY seq"
        if limit is not None:
            text, params = text + " LIMIT ?", [*params, limit]
        return [sql.audit_entry(row) for row in self._rows(text, params)]

    def rollout(self, rollout_id: str) -> RolloutRow | None:
        text = f"SELECT {sql.ROLLOUT_COLUMNS} FROM rollouts WHERE rollout_id = ?"
        rows = self._rows(text, (rollout_id,))
        return sql.rollout_row(rows[0]) if rows else None

    def rollouts(self, limit: int = 50) -> list[RolloutRow]:
        """The newest rollouts first."""
        text = f"SELECT {sql.ROLLOUT_COLUMNS} FROM rollouts ORDER BY created_at DESC, rollout_id"
        return [sql.rollout_row(row) for row in self._rows(text + " LIMIT ?", (limit,))]

    def rollout_devices(self, rollout_id: str) -> list[RolloutDeviceRow]:
        text = f"SELECT {sql.ROLLOUT_DEVICE_COLUMNS} FROM rollout_devices WHERE rollout_id = ?"
        rows = self._rows(text + " ORDER BY device", (rollout_id,))
        return [sql.rollout_device_row(row) for row in rows]

    def update_rollout(
        self, old: RolloutRow, state: str, stage: int, data: Payload,
        decisions: Sequence[DecisionRow], at: datetime,
    ) -> bool:  # fmt: skip
        """Move a rollout on from ``old`` and record ``decisions``, in one transaction.

        Returns:
            False (and nothing written) when the rollout's revision is no longer ``old``'s:
            another controller moved it meanwhile. The request ``old`` carried is cleared.
        """
        params = (state, stage, sql.to_json(dict(data)), sql.ts(at), old.request or "")

        def body(cur: Any) -> bool:
            cur.execute(self._q(sql.UPDATE_ROLLOUT), (*params, old.rollout_id, old.revision))
            if cur.rowcount != 1:
                return False
            for decision in decisions:
                self._decision(cur, decision, old)
            return True

        return self._run(f"updating rollout {old.rollout_id}", body, write=True)

    def request_rollout(self, rollout_id: str, request: str) -> bool:
        """Ask a rollout's controller to pause, resume or abort; False for an unknown id."""
        return self._write(
            "recording a rollout request", sql.REQUEST_ROLLOUT, (request, rollout_id)
        )

    def decisions(self, rollout_id: str) -> list[DecisionRow]:
        """Every decision recorded for a rollout, oldest first."""
        text = f"SELECT {sql.DECISION_COLUMNS} FROM rollout_decisions WHERE rollout_id = ?"
        return [sql.decision_row(row) for row in self._rows(text + " ORDER BY seq", (rollout_id,))]

    def acquire_lease(
        self, rollout_id: str, holder: str, until: datetime, now: datetime
    ) -> LeaseRow:
        """Take or renew the lease on a rollout (atomically: only when it is free, expired or
        already ``holder``'s). Returns the lease as it stands afterwards: ours, or the holder's
        who kept it."""

        def body(cur: Any) -> LeaseRow:
            cur.execute(
                self._q(sql.ACQUIRE_LEASE), (rollout_id, holder, sql.ts(until), sql.ts(now))
            )
            text = "SELECT holder, expires_at FROM rollout_leases WHERE rollout_id = ?"
            cur.execute(self._q(text), (rollout_id,))
            who, expires = cur.fetchone()
            return LeaseRow(rollout_id, who, sql.from_ts(expires))

        return self._run(f"taking the lease on rollout {rollout_id}", body, write=True)

    def release_lease(self, rollout_id: str, holder: str) -> bool:
        """Give the lease back if ``holder`` has it; True if it did."""
        return self._write("releasing a rollout lease", sql.RELEASE_LEASE, (rollout_id, holder))

    # -- policy actions (edgepack.fleet._policies) -----------------------------------------

    def record_policy_action(self, action: PolicyActionRow) -> bool:
        """Record what a policy rule did or asks approval for; False (nothing written) when
        that rule already acted on that model version."""
        a = action
        times = (sql.ts(a.created_at), sql.ts(a.updated_at))
        params = (a.action_id, a.rule, a.model, a.version, a.action, a.state, *times,
                  a.decided_by, sql.to_json(a.data))  # fmt: skip
        return self._write("recording a policy action", sql.INSERT_POLICY_ACTION, params)

    def policy_action(self, action_id: str) -> PolicyActionRow | None:
        text = f"SELECT {sql.POLICY_ACTION_COLUMNS} FROM policy_actions WHERE action_id = ?"
        rows = self._rows(text, (action_id,))
        return sql.policy_action_row(rows[0]) if rows else None

    def policy_actions(self, state: str | None = None, limit: int = 100) -> list[PolicyActionRow]:
        """Policy actions (in ``state``), newest first."""
        where, params = ("", []) if state is None else (" WHERE state = ?", [state])
        text = f"SELECT {sql.POLICY_ACTION_COLUMNS} FROM policy_actions{where}"
        rows = self._rows(text + " ORDER BY created_at DESC, action_id LIMIT ?", [*params, limit])
        return [sql.policy_action_row(row) for row in rows]

    def update_policy_action(
        self, old: PolicyActionRow, state: str, data: Payload, at: datetime,
        decided_by: str | None = None,
    ) -> bool:  # fmt: skip
        """Move a policy action on from ``old``'s state; False (nothing written) when its state
        is no longer ``old``'s (someone else moved it meanwhile)."""
        params = (state, sql.ts(at), decided_by, sql.to_json(dict(data)), old.action_id, old.state)
        return self._write("updating a policy action", sql.UPDATE_POLICY_ACTION, params)

    # -- reading ---------------------------------------------------------------------------

    def devices(self, group: str | None = None) -> list[DeviceRow]:
        """All devices that reported a state, or those that ``group`` holds by the operator's
        assignment or by their own declaration (both are in each row), by name."""
        where: str = ""
        params: tuple[str, ...] = ()
        if group is not None:
            where = (
                " WHERE device IN (SELECT device FROM memberships WHERE grp = ?"
                " UNION SELECT device FROM device_groups WHERE grp = ?)"
            )
            params = (group, group)
        chosen = f"SELECT device FROM devices{where}"

        def body(cur: Any) -> list[DeviceRow]:
            cur.execute(
                self._q(f"SELECT {sql.DEVICE_COLUMNS} FROM devices{where} ORDER BY 1"), params
            )
            rows = cur.fetchall()
            lists: dict[str, dict[str, list[str]]] = {"device_groups": {}, "memberships": {}}
            for table, found in lists.items():
                text = f"SELECT device, grp FROM {table} WHERE device IN ({chosen}) ORDER BY grp"
                cur.execute(self._q(text), params)
                for name, grp in cur.fetchall():
                    found.setdefault(name, []).append(grp)
            declared, assigned = lists["device_groups"], lists["memberships"]
            return [
                sql.device_row(row, declared.get(row[0], []), assigned.get(row[0], []))
                for row in rows
            ]

        return self._run("listing devices", body)

    def job(self, job_id: str) -> JobRow | None:
        rows = self._rows(f"SELECT {sql.JOB_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,))
        return sql.job_row(rows[0]) if rows else None

    def jobs(
        self, model: str | None = None, limit: int = 50, since: datetime | None = None
    ) -> list[JobRow]:
        """The newest jobs first, optionally for one model and issued from ``since`` on."""
        if since is not None:
            found = self.jobs(model, limit * 4 + 100)  # issued_at compares as text in SQLite
            return [j for j in found if j.issued_at >= sql.utc(since)][:limit]
        where, params = ("", ()) if model is None else (" WHERE model = ?", (model,))
        text = f"SELECT {sql.JOB_COLUMNS} FROM jobs{where} ORDER BY issued_at DESC, job_id DESC"
        return [sql.job_row(row) for row in self._rows(text + " LIMIT ?", (*params, limit))]

    def executions(self, job_id: str) -> list[ExecutionRow]:
        """The current execution of a job on each device, by device."""
        text = f"SELECT {sql.EXEC_COLUMNS} FROM executions WHERE job_id = ? ORDER BY device"
        return [sql.execution_row(row) for row in self._rows(text, (job_id,))]

    def history(self, job_id: str, device: str) -> list[ExecutionRow]:
        """Every update of a job on one device, by ``seq``."""
        text = f"SELECT {sql.EXEC_COLUMNS} FROM execution_history WHERE job_id = ? AND device = ?"
        rows = self._rows(text + " ORDER BY seq", (job_id, device))
        return [sql.execution_row(row) for row in rows]

    def record_timeout(self, job_id: str, seconds: int) -> bool:
        """Keep a job's in-progress timeout (seconds, from its signed command). Set once."""
        return self._write("recording a job timeout", sql.UPSERT_TIMEOUT, (job_id, seconds))

    def record_cancel(
        self, job_id: str, at: datetime, by: str, cancel_job_id: str, unstarted: Sequence[str]
    ) -> bool:
        """Record that ``job_id`` was canceled, and mark its executions that never started.

        Args:
            job_id: the canceled job.
            at: when (the cancel command's issue time).
            by: the key id that signed the cancel ("" when not verified here).
            cancel_job_id: the cancel command's own job id.
            unstarted: devices the job addresses; those without an execution get a
                ``CANCELED`` one (seq 0), and every execution still ``QUEUED`` becomes
                ``CANCELED``. A device's own later update (a higher seq) still wins.

        Returns:
            True if the job was not canceled before (a second cancel changes nothing).

        Raises:
            StoreError: the database failed.
        """
        reason = f"canceled by the operator ({cancel_job_id}) before this device started it"
        moment = sql.ts(at)

        def body(cur: Any) -> bool:
            cur.execute(self._q(sql.UPSERT_CANCEL), (job_id, moment, by, cancel_job_id))
            if cur.rowcount != 1:
                return False
            for device in sorted(set(unstarted)):
                cur.execute(self._q(sql.CANCEL_UNSTARTED), (job_id, device, reason, moment))
            cur.execute(self._q(sql.CANCEL_QUEUED), (reason, moment, job_id))
            return True

        return self._run("recording a cancellation", body, write=True)

    def job_controls(self, job_ids: Sequence[str]) -> dict[str, JobControlRow]:
        """Timeouts and cancellations of these jobs (those that have any), by job id."""
        found: dict[str, JobControlRow] = {}
        ids = sorted(set(job_ids))
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            text = (
                f"SELECT {sql.JOB_CONTROL_COLUMNS} FROM job_controls"
                f" WHERE job_id IN ({', '.join('?' * len(chunk))})"
            )
            for row in self._rows(text, chunk):
                control = sql.job_control_row(row)
                found[control.job_id] = control
        return found

    def time_out_silent(self, now: datetime, grace: float) -> list[tuple[str, str]]:
        """Mark ``TIMED_OUT`` the executions still ``IN_PROGRESS`` whose device has said
        nothing for longer than the job's in-progress timeout plus ``grace`` seconds.

        Returns:
            The ``(job_id, device)`` pairs marked now.
        """

        def body(cur: Any) -> list[tuple[str, str]]:
            cur.execute(self._q(sql.RUNNING_WITH_TIMEOUT))
            marked = []
            for job_id, device, seq, updated, timeout in cur.fetchall():
                silent = (sql.utc(now) - sql.from_ts(updated)).total_seconds()
                if silent <= float(timeout) + grace:
                    continue
                reason = (
                    f"no update for {silent:.0f} s while in progress, past the job's timeout of"
                    f" {int(timeout)} s and {grace:.0f} s of grace (marked by the collector)"
                )
                cur.execute(self._q(sql.MARK_TIMED_OUT), (reason, job_id, device, seq))
                if cur.rowcount == 1:
                    marked.append((job_id, device))
            return marked

        return self._run("timing out silent executions", body, write=True)

    def pending_for(self, device: str, now: datetime) -> list[JobRow]:
        """The jobs a device still has to run, by model name.

        Per model only the newest unexpired job addressed to the device, or to a group the
        operator assigned it to (never one it merely claims), counts; once the device has
        finished it (a terminal status), or the operator canceled it, nothing is pending for that
        model: an older job is superseded, never re-served.
        """
        terminal = sorted(status.value for status in TERMINAL)
        newest: dict[str, tuple[Any, ...]] = {}
        params = [device, *terminal, sql.ts(now), device, device]
        for row in self._rows(sql.pending_sql(terminal), params):
            newest.setdefault(row[2], row)
        controls = self.job_controls([row[0] for row in newest.values()])
        return [
            sql.job_row(row)
            for row in newest.values()
            if not row[-1] and (row[0] not in controls or controls[row[0]].canceled_at is None)
        ]

    def events(
        self, kind: str, device: str | None = None, since: datetime | None = None, limit: int = 1000
    ) -> list[tuple[str, datetime, dict[str, Any]]]:
        """The latest ``limit`` events of a kind (from ``since`` on), oldest first."""
        where, params = "kind = ?", [kind]
        if device is not None:
            where, params = where + " AND device = ?", [*params, device]
        if since is not None:
            where, params = where + " AND received_at >= ?", [*params, sql.ts(since)]
        text = f"SELECT device, received_at, payload FROM events WHERE {where}"
        rows = self._rows(
            text + " ORDER BY received_at DESC, LENGTH(seq) DESC, seq DESC LIMIT ?",  # "10" > "9"
            [*params, limit],
        )
        return [(name, sql.from_ts(at), sql.from_json(data)) for name, at, data in reversed(rows)]

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()


class _PostgresStore(_Store):
    """The same SQL on PostgreSQL (psycopg 3), which casts the text times and JSON it is sent.

    A transaction that fails with a deadlock or a serialization failure is run again whole, at
    most ``retries`` times, after a jittered, doubling pause from ``backoff`` seconds (``sleep``
    is injectable for tests); a broken connection is replaced once.
    """

    def __init__(
        self,
        url: str,
        connect_timeout: int = 10,
        *,
        retries: int = 8,
        backoff: float = 0.005,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        import psycopg

        self._psycopg, self._url, self._errors = psycopg, url, (psycopg.Error,)
        self._options: dict[str, Any] = {"autocommit": True, "connect_timeout": connect_timeout}
        self._retries, self._backoff, self._sleep = retries, backoff, sleep
        self._jitter = random.Random()  # spreads retries; not a secret
        self._rerun = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)
        super().__init__(sql.redact(url), None)

    def _q(self, text: str) -> str:
        return text.replace("?", "%s")

    def _create_schema(self, cur: Any) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(7405150001)")  # collectors starting at once
        super()._create_schema(cur)

    def _lock_audit(self, cur: Any) -> None:
        # Held to the end of the transaction: two collectors and a CLI append one chain.
        cur.execute("SELECT pg_advisory_xact_lock(7405150002)")

    def _transact(self, body: Callable[[Any], T], write: bool) -> T:
        reconnected, attempt = False, 0
        while True:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = self._psycopg.connect(self._url, **self._options)
                with self._conn.transaction(), self._conn.cursor() as cur:
                    return body(cur)
            except self._rerun:
                # Rolled back whole; every write is idempotent, so running it again is safe.
                attempt += 1
                if attempt > self._retries:
                    raise
                self.transactions_retried += 1
                pause = self._backoff * 2 ** min(attempt, 8) * (0.5 + self._jitter.random())
                self._sleep(pause)
            except self._psycopg.OperationalError:
                # A broken link: one retry on a fresh connection (idempotent, as above).
                if reconnected or self._conn is None or not self._conn.broken:
                    raise
                reconnected = True
                self._conn.close()


def open_store(url: str | Path) -> FleetStore:
    """Open a fleet store, creating its tables if absent (and adding those an older one lacks).

    Args:
        url: ``postgresql://user@host/db``; or ``sqlite:///abs/path.db`` or a plain path for
            SQLite (the file is created with mode 0600).

    Raises:
        StoreError: it cannot be opened, its schema is newer than ours, or psycopg is missing.
    """
    text, shown, hint = str(url), sql.redact(str(url)), "check the path and its permissions"
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
