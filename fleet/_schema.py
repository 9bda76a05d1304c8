"""The fleet store's tables and SQL text, shared by its SQLite and PostgreSQL backends.

:mod:`edgepack.fleet._database` runs these statements; this module only holds them, the rows
they read back into (:class:`DeviceRow`, :class:`JobRow`, :class:`ExecutionRow`,
:class:`TrustRow`) and the conversions between Python values and the columns. Every write is
idempotent by construction, so a QoS 1 copy, a second collector or a retried transaction changes
nothing twice:

=====================  ============================  =========================================
table                  unique key                    a write of an existing key
=====================  ============================  =========================================
``devices``            ``device``                    applied only if its ``ts`` is not older
``device_groups``      ``(device, grp)``             the groups a device *declares* (shown)
``memberships``        ``(device, grp)``             the groups the *operator* assigned: the
                                                     only ones pending answers and ACLs use
``jobs``               ``job_id``                    ignored (``ON CONFLICT DO NOTHING``)
``execution_history``  ``(job_id, device, seq)``     ignored
``executions``         ``(job_id, device)``          applied only with a higher ``seq``
``events``             ``(kind, device, seq)``       ignored
``trust_documents``    ``version``                   ignored
``alerts``             ``fingerprint``               the collector's alert state
                                                     (edgepack.fleet._alerts): replaced
``job_controls``       ``job_id``                    a job's timeout and cancellation: each
                                                     set once, never moved
``rollouts``           ``rollout_id``                a staged rollout (edgepack.fleet._rollout):
                                                     moved on only by the controller whose
                                                     ``revision`` it read
``rollout_devices``    ``(rollout_id, device)``      its plan: each device's stage and job ids
``rollout_decisions``  ``(rollout_id, seq)``         every decision, with its figures
``rollout_leases``     ``rollout_id``                who drives it, until when (taken only when
                                                     free, expired or already ours)
``audit_log``          ``seq``; ``fact`` (unique)    the hash-chained audit trail
                                                     (edgepack.fleet._audit): appended under a
                                                     lock, a known ``fact`` is not appended again
``policy_actions``     ``action_id``, and one per    what a policy rule did or asks approval for
                       ``(rule, model, version)``    (edgepack.fleet._policies): inserted once;
                                                     its state moves only from the one read
=====================  ============================  =========================================

One DDL serves both backends: SQLite gives these PostgreSQL type names NUMERIC affinity, which
keeps our ISO times and JSON as text and bytes as blobs. ``?`` is the placeholder (the
PostgreSQL backend rewrites it to ``%s``).
"""

# SQL text is assembled only from this module's constants; values always travel as parameters.
# ruff: noqa: S608

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from edgepack.formats.messages import JobStatus

__all__ = [
    "AuditEntry",
    "DecisionRow",
    "DeviceRow",
    "ExecutionRow",
    "JobControlRow",
    "JobRow",
    "LeaseRow",
    "PolicyActionRow",
    "RolloutDeviceRow",
    "RolloutRow",
    "TrustRow",
]

SCHEMA_VERSION = 4  # 4 added alerts, policy_actions, audit_log (tables are only ever added)
_UTC = timezone.utc


@dataclass(frozen=True)
class DeviceRow:
    device: str
    online: bool
    profile: str | None
    agent_version: str | None
    groups: list[str]  # what the device declares in its own state: shown, never trusted
    models: dict[str, Any]  # name -> {"active": ..., "previous": ..., ...}
    health: str | None
    last_seen: datetime  # when the state now stored was received
    assigned: list[str] = field(default_factory=list)  # the operator's records (memberships)


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


@dataclass(frozen=True)
class JobControlRow:
    """What bounds a job besides its command: its in-progress timeout and its cancellation."""

    job_id: str
    in_progress_timeout: int | None  # seconds (from the signed command)
    canceled_at: datetime | None
    canceled_by: str | None  # the key id that signed the cancel ("" when not known)
    cancel_job_id: str | None  # the cancel command's own job id


@dataclass(frozen=True)
class TrustRow:
    """A published trust document (``edgepack.formats.trust``), as recorded."""

    version: int
    document: bytes  # the signed envelope, as published on the retained trust topic
    recorded_at: datetime


EXEC_TABLE = """job_id TEXT NOT NULL, device TEXT NOT NULL, status TEXT NOT NULL, step TEXT,
    reason TEXT, version_before BIGINT, version_after BIGINT, seq BIGINT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL"""
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS schema_version (
    id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    device TEXT PRIMARY KEY, online BOOLEAN NOT NULL, profile TEXT, agent_version TEXT,
    models JSONB NOT NULL, health TEXT, session_id TEXT, state_ts TIMESTAMPTZ,
    last_seen TIMESTAMPTZ NOT NULL);
CREATE TABLE IF NOT EXISTS device_groups (
    device TEXT NOT NULL, grp TEXT NOT NULL, PRIMARY KEY (device, grp));
CREATE INDEX IF NOT EXISTS device_groups_by_group ON device_groups (grp);
CREATE TABLE IF NOT EXISTS memberships (
    device TEXT NOT NULL, grp TEXT NOT NULL, assigned_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (device, grp));
CREATE INDEX IF NOT EXISTS memberships_by_group ON memberships (grp);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, kind TEXT NOT NULL, model TEXT NOT NULL, version BIGINT,
    target_type TEXT NOT NULL, target TEXT NOT NULL, issued_at TIMESTAMPTZ NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL, envelope BYTEA NOT NULL);
CREATE INDEX IF NOT EXISTS jobs_by_target ON jobs (target_type, target);
CREATE INDEX IF NOT EXISTS jobs_by_model ON jobs (model, issued_at);
CREATE TABLE IF NOT EXISTS execution_history ({EXEC_TABLE}, PRIMARY KEY (job_id, device, seq));
CREATE TABLE IF NOT EXISTS executions ({EXEC_TABLE}, PRIMARY KEY (job_id, device));
CREATE TABLE IF NOT EXISTS events (
    kind TEXT NOT NULL, device TEXT NOT NULL, seq TEXT NOT NULL, received_at TIMESTAMPTZ NOT NULL,
    payload JSONB NOT NULL, PRIMARY KEY (kind, device, seq));
CREATE INDEX IF NOT EXISTS events_by_device ON events (kind, device, received_at);
CREATE INDEX IF NOT EXISTS events_by_time ON events (kind, received_at);
CREATE TABLE IF NOT EXISTS trust_documents (
    version BIGINT PRIMARY KEY, document BYTEA NOT NULL, recorded_at TIMESTAMPTZ NOT NULL);
CREATE TABLE IF NOT EXISTS alerts (
    fingerprint TEXT PRIMARY KEY, labels TEXT NOT NULL, annotations TEXT NOT NULL,
    status TEXT NOT NULL, starts_at TEXT NOT NULL, ends_at TEXT, last_sent_at TEXT,
    resolved_sent INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS job_controls (
    job_id TEXT PRIMARY KEY, in_progress_timeout BIGINT, canceled_at TIMESTAMPTZ,
    canceled_by TEXT, cancel_job_id TEXT);
CREATE TABLE IF NOT EXISTS policy_actions (
    action_id TEXT PRIMARY KEY, rule TEXT NOT NULL, model TEXT NOT NULL, version BIGINT NOT NULL,
    action TEXT NOT NULL, state TEXT NOT NULL, created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL, decided_by TEXT, data JSONB NOT NULL,
    UNIQUE (rule, model, version));
CREATE TABLE IF NOT EXISTS rollouts (
    rollout_id TEXT PRIMARY KEY, model TEXT NOT NULL, version BIGINT NOT NULL, grp TEXT NOT NULL,
    state TEXT NOT NULL, stage INTEGER NOT NULL, spec JSONB NOT NULL, data JSONB NOT NULL,
    request TEXT, revision BIGINT NOT NULL, created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL);
CREATE TABLE IF NOT EXISTS rollout_devices (
    rollout_id TEXT NOT NULL, device TEXT NOT NULL, profile TEXT NOT NULL, stage INTEGER,
    old_version BIGINT, deploy_job TEXT NOT NULL, rollback_job TEXT NOT NULL,
    PRIMARY KEY (rollout_id, device));
CREATE TABLE IF NOT EXISTS rollout_decisions (
    rollout_id TEXT NOT NULL, seq BIGINT NOT NULL, at TIMESTAMPTZ NOT NULL, stage INTEGER NOT NULL,
    action TEXT NOT NULL, reason TEXT NOT NULL, figures JSONB NOT NULL,
    PRIMARY KEY (rollout_id, seq));
CREATE TABLE IF NOT EXISTS rollout_leases (
    rollout_id TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at TIMESTAMPTZ NOT NULL);
CREATE TABLE IF NOT EXISTS audit_log (
    seq BIGINT PRIMARY KEY, at TIMESTAMPTZ NOT NULL, kind TEXT NOT NULL, model TEXT,
    version BIGINT, device TEXT, key_id TEXT, fact TEXT, payload TEXT NOT NULL,
    prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS audit_by_fact ON audit_log (fact);
CREATE INDEX IF NOT EXISTS audit_by_model ON audit_log (model, seq);
CREATE INDEX IF NOT EXISTS audit_by_device ON audit_log (device, seq)
"""
INSERT_SCHEMA_VERSION = (
    "INSERT INTO schema_version (id, version) VALUES (1, ?) ON CONFLICT DO NOTHING"
)
# Tables are only ever added, so an older store is upgraded by creating them (above).
UPGRADE_SCHEMA_VERSION = "UPDATE schema_version SET version = ? WHERE id = 1 AND version < ?"

# A full state replaces the row unless it is older than the stored one; an equal ts (a copy,
# or a second state within the same second) updates the fields but not online/last_seen.
UPSERT_STATE = """
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
UPSERT_LWT = """
INSERT INTO devices (device, online, models, session_id, last_seen) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (device) DO UPDATE SET online = excluded.online
WHERE devices.session_id IS NULL OR excluded.session_id IS NULL
   OR devices.session_id = excluded.session_id
"""
DELETE_DECLARED = "DELETE FROM device_groups WHERE device = ?"
INSERT_DECLARED = "INSERT INTO device_groups (device, grp) VALUES (?, ?) ON CONFLICT DO NOTHING"
INSERT_MEMBERSHIP = (
    "INSERT INTO memberships (device, grp, assigned_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING"
)
DELETE_MEMBERSHIP = "DELETE FROM memberships WHERE device = ? AND grp = ?"
DEVICE_COLUMNS = "device, online, profile, agent_version, models, health, last_seen"
JOB_COLUMNS = "job_id, kind, model, version, target_type, target, issued_at, expires_at, envelope"
EXEC_COLUMNS = (
    "job_id, device, status, step, reason, version_before, version_after, seq, updated_at"
)
_NINE = "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
INSERT_JOB = f"INSERT INTO jobs ({JOB_COLUMNS}) {_NINE} ON CONFLICT DO NOTHING"
INSERT_HISTORY = f"INSERT INTO execution_history ({EXEC_COLUMNS}) {_NINE} ON CONFLICT DO NOTHING"
UPSERT_EXECUTION = f"""
INSERT INTO executions ({EXEC_COLUMNS}) {_NINE}
ON CONFLICT (job_id, device) DO UPDATE SET
    status = excluded.status, step = excluded.step, reason = excluded.reason,
    version_before = excluded.version_before, version_after = excluded.version_after,
    seq = excluded.seq, updated_at = excluded.updated_at
WHERE excluded.seq > executions.seq
"""
INSERT_EVENT = (
    "INSERT INTO events (kind, device, seq, received_at, payload) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT DO NOTHING"
)
INSERT_TRUST = (
    "INSERT INTO trust_documents (version, document, recorded_at) VALUES (?, ?, ?)"
    " ON CONFLICT DO NOTHING"
)
JOB_CONTROL_COLUMNS = "job_id, in_progress_timeout, canceled_at, canceled_by, cancel_job_id"
UPSERT_TIMEOUT = """
INSERT INTO job_controls (job_id, in_progress_timeout) VALUES (?, ?)
ON CONFLICT (job_id) DO UPDATE SET in_progress_timeout = excluded.in_progress_timeout
WHERE job_controls.in_progress_timeout IS NULL
"""
UPSERT_CANCEL = """
INSERT INTO job_controls (job_id, canceled_at, canceled_by, cancel_job_id) VALUES (?, ?, ?, ?)
ON CONFLICT (job_id) DO UPDATE SET canceled_at = excluded.canceled_at,
    canceled_by = excluded.canceled_by, cancel_job_id = excluded.cancel_job_id
WHERE job_controls.canceled_at IS NULL
"""
# The collector's verdicts (CANCELED before a device started, TIMED_OUT after it went silent)
# change only the current row, keeping its seq: the device's own next update (a higher seq)
# still wins, and the history stays what devices said.
CANCEL_UNSTARTED = (
    f"INSERT INTO executions ({EXEC_COLUMNS}) VALUES (?, ?, 'CANCELED', NULL, ?, NULL, NULL, 0, ?)"
    " ON CONFLICT DO NOTHING"
)
CANCEL_QUEUED = (
    "UPDATE executions SET status = 'CANCELED', reason = ?, updated_at = ?"
    " WHERE job_id = ? AND status = 'QUEUED'"
)
RUNNING_WITH_TIMEOUT = (
    "SELECT e.job_id, e.device, e.seq, e.updated_at, c.in_progress_timeout FROM executions e"
    " JOIN job_controls c ON c.job_id = e.job_id"
    " WHERE e.status = 'IN_PROGRESS' AND c.in_progress_timeout IS NOT NULL"
)
MARK_TIMED_OUT = (
    "UPDATE executions SET status = 'TIMED_OUT', step = NULL, reason = ?"
    " WHERE job_id = ? AND device = ? AND seq = ? AND status = 'IN_PROGRESS'"
)
LATEST_TRUST = (
    "SELECT version, document, recorded_at FROM trust_documents ORDER BY version DESC LIMIT 1"
)


ROLLOUT_COLUMNS = (
    "rollout_id, model, version, grp, state, stage, spec, data, request, revision, created_at,"
    " updated_at"
)
INSERT_ROLLOUT = (
    f"INSERT INTO rollouts ({ROLLOUT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
ROLLOUT_DEVICE_COLUMNS = "rollout_id, device, profile, stage, old_version, deploy_job, rollback_job"
INSERT_ROLLOUT_DEVICE = (
    f"INSERT INTO rollout_devices ({ROLLOUT_DEVICE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
)
# Only the controller that read ``revision`` moves a rollout on; an operator's request (pause,
# resume, abort) it consumed is cleared unless a newer one replaced it meanwhile.
UPDATE_ROLLOUT = """
UPDATE rollouts SET state = ?, stage = ?, data = ?, revision = revision + 1, updated_at = ?,
    request = CASE WHEN request = ? THEN NULL ELSE request END
WHERE rollout_id = ? AND revision = ?
"""
REQUEST_ROLLOUT = "UPDATE rollouts SET request = ? WHERE rollout_id = ?"
DECISION_COLUMNS = "rollout_id, seq, at, stage, action, reason, figures"
INSERT_DECISION = (
    f"INSERT INTO rollout_decisions ({DECISION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT DO NOTHING"
)
# Taken when free, expired, or already ours (a renewal); otherwise the row is left alone.
ACQUIRE_LEASE = """
INSERT INTO rollout_leases (rollout_id, holder, expires_at) VALUES (?, ?, ?)
ON CONFLICT (rollout_id) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
WHERE rollout_leases.holder = excluded.holder OR rollout_leases.expires_at <= ?
"""
RELEASE_LEASE = "DELETE FROM rollout_leases WHERE rollout_id = ? AND holder = ?"
POLICY_ACTION_COLUMNS = (
    "action_id, rule, model, version, action, state, created_at, updated_at, decided_by, data"
)
# One action per (rule, model, version): a second collector's evaluation inserts nothing.
INSERT_POLICY_ACTION = (
    f"INSERT INTO policy_actions ({POLICY_ACTION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT DO NOTHING"
)
# Moved on only from the state the caller read: two operators approving at once act once.
UPDATE_POLICY_ACTION = (
    "UPDATE policy_actions SET state = ?, updated_at = ?, decided_by = COALESCE(?, decided_by),"
    " data = ? WHERE action_id = ? AND state = ?"
)


@dataclass(frozen=True)
class PolicyActionRow:
    """What a policy rule did (``flagged``, ``rolled_back``) or waits for (``pending``), with
    the figures behind it in ``data`` (edgepack.fleet._policies)."""

    action_id: str
    rule: str
    model: str
    version: int
    action: str  # what the rule does: "flag" or "rollback"
    state: str  # flagged, pending, rolling_back, rolled_back, rejected
    created_at: datetime
    updated_at: datetime
    decided_by: str | None  # the operator key id that approved or rejected it
    data: dict[str, Any] = field(default_factory=dict)


def policy_action_row(row: Sequence[Any]) -> PolicyActionRow:
    aid, rule, model, version, action, state, created, updated, by, data = row
    return PolicyActionRow(aid, rule, model, int(version), action, state, from_ts(created),
                           from_ts(updated), by, from_json(data))  # fmt: skip


# The audit trail's payload is TEXT, not JSONB: the hash covers these exact bytes (JSONB would
# reorder keys and refuse \u0000), and SQLite and PostgreSQL then hold the same text.
AUDIT_COLUMNS = "seq, at, kind, model, version, device, key_id, fact, payload, prev_hash, hash"
INSERT_AUDIT = f"INSERT INTO audit_log ({AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
AUDIT_TAIL = "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1"
AUDIT_BY_FACT = f"SELECT {AUDIT_COLUMNS} FROM audit_log WHERE fact = ?"


@dataclass(frozen=True)
class AuditEntry:
    """One entry of the audit trail (edgepack.fleet._audit), as stored.

    ``payload_text`` is the canonical JSON the hash covers; ``payload`` is it decoded.
    """

    seq: int
    at: datetime
    kind: str
    model: str | None
    version: int | None
    device: str | None
    key_id: str | None
    fact: str | None  # what makes it unique (a job id, an outcome's seq), or None
    payload: dict[str, Any]
    prev_hash: str
    hash: str
    payload_text: str = field(default="", repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready, with ISO 8601 UTC time (``audit --json`` and the JSON Lines export)."""
        return {
            "seq": self.seq, "at": ts(self.at), "kind": self.kind, "model": self.model,
            "version": self.version, "device": self.device, "key_id": self.key_id,
            "fact": self.fact, "payload": self.payload, "prev_hash": self.prev_hash,
            "hash": self.hash,
        }  # fmt: skip


def audit_entry(row: Sequence[Any]) -> AuditEntry:
    seq, at, kind, model, version, device, key, fact, payload, prev, digest = row
    return AuditEntry(
        int(seq), from_ts(at), kind, model, None if version is None else int(version), device,
        key, fact, json.loads(payload), prev, digest, payload,
    )  # fmt: skip


@dataclass(frozen=True)
class RolloutRow:
    """A staged rollout as stored; ``spec`` is what the operator asked for, ``data`` where the
    controller is (both JSON objects owned by edgepack.fleet._rollout)."""

    rollout_id: str
    model: str
    version: int
    group: str
    state: str
    stage: int  # the stage index being deployed or soaked (-1 before the first)
    spec: dict[str, Any]
    data: dict[str, Any]
    request: str | None  # pause, resume or abort, asked by an operator, not yet applied
    revision: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class RolloutDeviceRow:
    """One device of a rollout's plan: its stage (None: in no stage) and its two job ids."""

    rollout_id: str
    device: str
    profile: str
    stage: int | None
    old_version: int | None
    deploy_job: str
    rollback_job: str


@dataclass(frozen=True)
class DecisionRow:
    """One recorded decision of a rollout's controller, with the figures behind it."""

    rollout_id: str
    seq: int
    at: datetime
    stage: int
    action: str
    reason: str
    figures: dict[str, Any]


@dataclass(frozen=True)
class LeaseRow:
    """Who drives a rollout, and until when (renewed at every step)."""

    rollout_id: str
    holder: str
    expires_at: datetime


def rollout_row(row: Sequence[Any]) -> RolloutRow:
    rid, model, version, grp, state, stage, spec, data, request, revision, made, upd = row
    return RolloutRow(
        rid, model, int(version), grp, state, int(stage), from_json(spec), from_json(data),
        request, int(revision), from_ts(made), from_ts(upd),
    )  # fmt: skip


def rollout_device_row(row: Sequence[Any]) -> RolloutDeviceRow:
    rid, device, profile, stage, old, deploy, rollback = row
    return RolloutDeviceRow(
        rid, device, profile, None if stage is None else int(stage),
        None if old is None else int(old), deploy, rollback,
    )  # fmt: skip


def decision_row(row: Sequence[Any]) -> DecisionRow:
    rid, seq, at, stage, action, reason, figures = row
    return DecisionRow(rid, int(seq), from_ts(at), int(stage), action, reason, from_json(figures))


def pending_sql(terminal: Sequence[str]) -> str:
    """The jobs addressed to a device or to a group the operator assigned it to, newest first
    per model, each with whether the device already finished it. Parameters: the device, the
    terminal statuses, now, the device, the device."""
    done = (
        "EXISTS (SELECT 1 FROM execution_history h WHERE h.job_id = jobs.job_id AND"
        f" h.device = ? AND h.status IN ({', '.join('?' * len(terminal))}))"
    )
    targets = (
        "(target_type = 'device' AND target = ?) OR (target_type = 'group' AND target IN"
        " (SELECT grp FROM memberships WHERE device = ?))"
    )
    return (
        f"SELECT {JOB_COLUMNS}, {done} FROM jobs WHERE expires_at > ? AND ({targets})"
        " ORDER BY model, issued_at DESC, job_id DESC"
    )


def utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=_UTC) if moment.tzinfo is None else moment.astimezone(_UTC)


def ts(moment: datetime) -> str:
    """A fixed-width UTC ISO time: SQLite compares these as text, PostgreSQL casts them."""
    return utc(moment).isoformat(timespec="microseconds")


def from_ts(value: Any) -> datetime:
    return utc(value if isinstance(value, datetime) else datetime.fromisoformat(value))


def to_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def from_json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value  # PostgreSQL decodes JSONB


def redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")))


def device_row(row: Sequence[Any], declared: list[str], assigned: list[str]) -> DeviceRow:
    name, on, profile, agent, models, health, seen = row
    models, seen = from_json(models), from_ts(seen)
    return DeviceRow(name, bool(on), profile, agent, declared, models, health, seen, assigned)


def job_row(row: Sequence[Any]) -> JobRow:
    return JobRow(*(*row[:6], from_ts(row[6]), from_ts(row[7]), bytes(row[8])))


def execution_row(row: Sequence[Any]) -> ExecutionRow:
    job_id, device, status, step, reason, before, after, seq, updated = row
    return ExecutionRow(
        job_id, device, JobStatus(status), step, reason, before, after, seq, from_ts(updated)
    )


def job_control_row(row: Sequence[Any]) -> JobControlRow:
    job_id, timeout, canceled, by, cancel = row
    at = None if canceled is None else from_ts(canceled)
    return JobControlRow(job_id, None if timeout is None else int(timeout), at, by, cancel)


def trust_row(row: Sequence[Any]) -> TrustRow:
    version, document, recorded = row
    return TrustRow(int(version), bytes(document), from_ts(recorded))
