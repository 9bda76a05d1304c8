"""Every MQTT payload but commands: built and parsed here, and nowhere else. No I/O.

The device's link (``edgepack.agent._fleet_link``), the collector (``edgepack.fleet._collector``)
and the fleet store build these payloads with the ``build_*`` functions and read them with the
``parse_*`` ones, which validate every field's type and return frozen dataclasses or raise
:class:`~edgepack.formats.exceptions.MessageError` naming the field. ``docs/protocol.md`` describes
the same payloads for people using ``mosquitto_pub``/``mosquitto_sub``; topics are in
:mod:`edgepack.formats.topics`, signed commands in :mod:`edgepack.formats.commands`.

=====================  =================================  =====================================
payload                build                              parse
=====================  =================================  =====================================
job status (§8)        :func:`build_job_status`           :func:`parse_job_status`
device state (§4)      :func:`build_device_state`         :func:`parse_device_state`
Last Will (§4.1)       :func:`build_device_offline`       :func:`parse_device_state`
pending get (§9)       :func:`build_pending_get`          :func:`parse_pending_get`
pending answer (§9)    :func:`build_pending_answer`       :func:`parse_pending_answer`
telemetry, drift (§10) :func:`build_report`               :func:`parse_report`
collector presence     :func:`build_collector_presence`   :func:`parse_collector_presence`
presence ping          :func:`build_presence_ping`        :func:`parse_presence_ping`
=====================  =================================  =====================================

Every payload is a compact JSON object with sorted keys and ``"schema": 1``. :func:`decode_json`
(from the private ``_payload`` module, shared with the commands) reads one bounded: at most
:data:`MAX_MESSAGE_BYTES`, nested at most :data:`MAX_DEPTH` deep, no integer longer than
:data:`MAX_INT_DIGITS` digits, and a ``schema`` no newer than ours, so a hostile payload costs a
bounded parse and ends in a :class:`MessageError`, never a ``RecursionError`` or ``ValueError``.
Readers ignore fields they do not know. The statuses, steps and report kinds are ``str`` enums,
so they compare equal to, and are written as, their text.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgepack._clock import utc_now
from edgepack.formats._payload import (
    MAX_DEPTH,
    MAX_INT_DIGITS,
    MAX_MESSAGE_BYTES,
    NAME,
    SCHEMA,
    Fields,
    TextEnum,
    check_schema,
    decode_json,
    encode,
    stamp,
)
from edgepack.formats.exceptions import ManifestError, MessageError
from edgepack.formats.manifest import check_model_name

__all__ = [
    "MAX_DEPTH",
    "MAX_INT_DIGITS",
    "MAX_MESSAGE_BYTES",
    "SCHEMA",
    "TERMINAL",
    "CollectorPresence",
    "DeviceOffline",
    "DeviceState",
    "JobStatus",
    "JobStep",
    "JobUpdate",
    "ModelState",
    "PendingAnswer",
    "PendingGet",
    "PresencePing",
    "Report",
    "ReportKind",
    "build_collector_presence",
    "build_device_offline",
    "build_device_state",
    "build_job_status",
    "build_pending_answer",
    "build_pending_get",
    "build_presence_ping",
    "build_report",
    "decode_json",
    "parse_collector_presence",
    "parse_device_state",
    "parse_job_status",
    "parse_pending_answer",
    "parse_pending_get",
    "parse_presence_ping",
    "parse_report",
    "read_device_state",
    "utcnow",
]

utcnow = utc_now  # the moment every payload is stamped with, unless the caller passes one


class JobStatus(TextEnum):
    """The status of one job on one device (AWS IoT Jobs-like)."""

    QUEUED = "QUEUED"
    IN_PROGRESS = "IN_PROGRESS"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    REJECTED = "REJECTED"
    CANCELED = "CANCELED"  # the operator canceled the job before this device started it
    TIMED_OUT = "TIMED_OUT"  # ran past the job's in-progress timeout: aborted, or went silent


TERMINAL = frozenset(
    {
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.REJECTED,
        JobStatus.CANCELED,
        JobStatus.TIMED_OUT,
    }
)


class JobStep(TextEnum):
    """The step an ``IN_PROGRESS`` update names (docs/protocol.md §8)."""

    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    HEALTH_CHECK = "health-check"
    COMMITTING = "committing"
    ROLLING_BACK = "rolling-back"


class ReportKind(TextEnum):
    """The reports a device sends through its outbox; the value is the topic's last level."""

    TELEMETRY = "telemetry"
    DRIFT = "drift"
    QUALITY = "quality"


# -- job status -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobUpdate:
    """One job execution update (docs/protocol.md §8)."""

    job_id: str
    device: str
    status: JobStatus
    seq: int
    model: str | None = None
    step: JobStep | None = None
    reason: str | None = None
    version_before: int | None = None
    version_after: int | None = None
    ts: dt.datetime | None = None


def build_job_status(
    job_id: str,
    device: str,
    status: JobStatus,
    *,
    model: str | None = None,
    step: JobStep | None = None,
    reason: str | None = None,
    version_before: int | None = None,
    version_after: int | None = None,
    seq: int = 0,
    ts: dt.datetime | None = None,
) -> bytes:
    """A job execution update; ``ts`` defaults to now.

    Raises:
        ValueError: ``status`` or ``step`` is not one of the enum's values.
    """
    body = {
        "job_id": job_id,
        "device": device,
        "status": JobStatus(status).value,
        "model": model,
        "step": None if step is None else JobStep(step).value,
        "reason": reason,
        "version_before": version_before,
        "version_after": version_after,
        "seq": seq,
        "ts": stamp(ts),
    }
    return encode(body)


def parse_job_status(raw: bytes, *, device: str | None = None) -> JobUpdate:
    """Read a job execution update (``device``: the topic's, which the payload must name).

    Raises:
        MessageError: malformed, a field of the wrong type, or another device's update.
    """
    data = decode_json(raw, "job status")
    f = Fields(data, "job status")
    sender = f.text("device", NAME)
    if device is not None and sender != device:
        raise MessageError(f"job status from {sender!r} on the topic of {device!r}")
    return JobUpdate(
        job_id=f.text("job_id", NAME),
        device=sender,
        status=f.choice("status", JobStatus),
        seq=f.integer("seq"),
        model=f.maybe_text("model"),
        step=f.maybe_choice("step", JobStep),
        reason=f.maybe_text("reason"),
        version_before=f.maybe_integer("version_before"),
        version_after=f.maybe_integer("version_after"),
        ts=f.maybe_time("ts"),
    )


# -- device state and Last Will -------------------------------------------------------------------


@dataclass(frozen=True)
class ModelState:
    """One model on a device: committed versions, and the one serving (``None``: none)."""

    active: int | None = None
    previous: int | None = None
    serving: int | None = None


@dataclass(frozen=True)
class DeviceState:
    """A device's retained state (docs/protocol.md §4)."""

    device: str
    profile: str | None = None
    agent_version: str | None = None
    groups: tuple[str, ...] = ()
    models: Mapping[str, ModelState] = field(default_factory=dict)
    health: str | None = None
    session: str | None = None
    ts: dt.datetime | None = None
    online: bool = True


@dataclass(frozen=True)
class DeviceOffline:
    """The Last Will on the state topic (or the same message on a clean stop), §4.1."""

    device: str
    session: str | None = None
    ts: dt.datetime | None = None


_STATE_FIELDS = ("profile", "agent_version", "groups", "models", "health")


def build_device_state(
    device: str,
    *,
    profile: str,
    agent_version: str,
    groups: Sequence[str],
    models: Mapping[str, ModelState],
    health: str,
    session: str,
    ts: dt.datetime | None = None,
) -> bytes:
    """The retained ``online`` state of a device; ``ts`` defaults to now."""
    return encode(
        {
            "device": device,
            "online": True,
            "profile": profile,
            "agent_version": agent_version,
            "groups": list(groups),
            "models": {
                name: {"active": m.active, "previous": m.previous, "serving": m.serving}
                for name, m in models.items()
            },
            "health": health,
            "session": session,
            "ts": stamp(ts),
        }
    )


def build_device_offline(device: str, session: str, ts: dt.datetime | None = None) -> bytes:
    """The Last Will (and clean-stop message): ``online: false`` and nothing of the state."""
    return encode({"device": device, "online": False, "session": session, "ts": stamp(ts)})


def read_device_state(
    data: Mapping[str, Any], *, device: str | None = None
) -> DeviceState | DeviceOffline:
    """Validate an already decoded state (the store accepts these from tools and tests).

    Args:
        data: the JSON object; ``schema`` is checked when present.
        device: the topic's device; stands in for a missing ``device`` field.

    Returns:
        A :class:`DeviceOffline` for ``online: false`` with none of the state's fields (a will),
        else a :class:`DeviceState`.

    Raises:
        MessageError: a field of the wrong type, or another device's state.
    """
    if "schema" in data:
        check_schema(data, "device state", MessageError)
    f = Fields(data, "device state")
    sender = f.device(device)
    online = f.flag("online", default=True)
    if not online and not any(key in data for key in _STATE_FIELDS):
        return DeviceOffline(sender, f.maybe_text("session"), f.maybe_time("ts"))
    models = {} if data.get("models") is None else data["models"]
    if not isinstance(models, dict):
        raise f.fail("models", "an object of model name -> versions")
    parsed = {}
    for name, entry in models.items():
        if not isinstance(entry, dict):
            raise f.fail("models", "an object of model name -> {active, previous, serving}")
        try:
            check_model_name(name)
        except ManifestError as e:
            raise MessageError(f"device state: field 'models': {e}") from e
        m = Fields(entry, f"device state, model {name!r}")
        active, previous = m.maybe_integer("active"), m.maybe_integer("previous")
        parsed[name] = ModelState(active, previous, m.maybe_integer("serving"))
    return DeviceState(
        device=sender,
        profile=f.maybe_text("profile"),
        agent_version=f.maybe_text("agent_version"),
        groups=f.names("groups"),
        models=parsed,
        health=f.maybe_text("health"),
        session=f.maybe_text("session"),
        ts=f.maybe_time("ts"),
        online=online,
    )


def parse_device_state(raw: bytes, *, device: str | None = None) -> DeviceState | DeviceOffline:
    """Read a device's state or its Last Will (``device``: the topic's).

    Raises:
        MessageError: malformed, a field of the wrong type, or another device's state.
    """
    return read_device_state(decode_json(raw, "device state"), device=device)


# -- pending work ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PendingGet:
    """A device asking the collector for pending commands (its ``groups`` are not trusted)."""

    device: str
    groups: tuple[str, ...] = ()
    ts: dt.datetime | None = None


@dataclass(frozen=True)
class PendingAnswer:
    """The collector's answer: the signed envelopes as they were published, and optionally the
    latest trust document (``formats.trust``; unverified here, the device runs ``open_trust``)."""

    device: str
    commands: tuple[bytes, ...] = ()
    trust: bytes | None = None


def build_pending_get(device: str, groups: Sequence[str], ts: dt.datetime | None = None) -> bytes:
    """A request for pending work; ``ts`` defaults to now."""
    return encode({"device": device, "groups": list(groups), "ts": stamp(ts)})


def parse_pending_get(raw: bytes, *, device: str | None = None) -> PendingGet:
    """Read a request for pending work (``device``: the topic's).

    Raises:
        MessageError: malformed, a field of the wrong type, or another device's request.
    """
    f = Fields(decode_json(raw, "pending request"), "pending request")
    return PendingGet(f.device(device), f.names("groups"), f.maybe_time("ts"))


def build_pending_answer(
    device: str, commands: Sequence[bytes], trust: bytes | None = None
) -> bytes:
    """The answer to a pending request: each command envelope as a JSON string, and the latest
    trust document (its envelope as a JSON string) when ``trust`` is given; absent otherwise,
    so an older reader sees the answer it always saw."""
    body: dict[str, Any] = {"device": device, "commands": [c.decode() for c in commands]}
    if trust is not None:
        body["trust"] = trust.decode()
    return encode(body)


def parse_pending_answer(raw: bytes, *, device: str | None = None) -> PendingAnswer:
    """Read the collector's answer (the commands in it are verified later, one by one).

    Raises:
        MessageError: malformed, ``commands`` not a list of strings, ``trust`` not a string, or
            for another device.
    """
    f = Fields(decode_json(raw, "pending answer"), "pending answer")
    commands = f.data.get("commands", [])
    if not isinstance(commands, list) or not all(isinstance(c, str) for c in commands):
        raise f.fail("commands", "a list of command envelopes as strings")
    trust = f.data.get("trust")
    if trust is not None and not isinstance(trust, str):
        raise f.fail("trust", "a trust document envelope as a string")
    return PendingAnswer(
        f.device(device),
        tuple(c.encode() for c in commands),
        None if trust is None else trust.encode(),
    )


# -- telemetry and drift reports ------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    """A telemetry or drift report: its envelope, and the whole payload as the store keeps it."""

    kind: ReportKind
    device: str
    seq: int
    ts: dt.datetime | None
    payload: Mapping[str, Any]


def build_report(
    kind: ReportKind,
    device: str,
    seq: int,
    report: Mapping[str, Any],
    ts: dt.datetime | None = None,
) -> bytes:
    """A report's payload: the envelope (``device``, ``seq``, ``ts``) around the report's fields.

    The report's fields belong to their producers (``edgepack.agent._telemetry`` and
    ``edgepack.agent._drift``); the envelope's keys win over fields of the same name.

    Raises:
        MessageError: the payload would exceed :data:`MAX_MESSAGE_BYTES`.
    """
    payload = encode({**report, "device": device, "seq": seq, "ts": stamp(ts)})
    if len(payload) > MAX_MESSAGE_BYTES:
        raise MessageError(
            f"{ReportKind(kind).value} report is {len(payload)} bytes, above the limit of "
            f"{MAX_MESSAGE_BYTES}; not sent (fewer features or bins make it smaller)"
        )
    return payload


def parse_report(raw: bytes, kind: ReportKind, *, device: str | None = None) -> Report:
    """Read a telemetry or drift report's envelope (``device``: the topic's).

    Raises:
        MessageError: malformed, no non-negative ``seq``, or another device's report.
    """
    what = f"{ReportKind(kind).value} report"
    data = decode_json(raw, what)
    f = Fields(data, what)
    return Report(
        ReportKind(kind),
        f.device(device),
        f.integer("seq"),
        f.maybe_time("ts"),
        data,
    )


# -- collector presence ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CollectorPresence:
    """A collector saying (retained) that it is subscribed, or (its will) that it is gone."""

    collector: str
    online: bool
    ts: dt.datetime | None = None


@dataclass(frozen=True)
class PresencePing:
    """A device asking every connected collector to announce itself live."""

    device: str
    ts: dt.datetime | None = None


def build_collector_presence(collector: str, online: bool, ts: dt.datetime | None = None) -> bytes:
    """A collector's presence (``online`` true on subscribe, false in its will and on stop)."""
    return encode({"collector": collector, "online": online, "ts": stamp(ts)})


def parse_collector_presence(raw: bytes) -> CollectorPresence:
    """Read a collector's presence; an empty payload (a cleared retained one) is offline.

    Raises:
        MessageError: malformed or a field of the wrong type.
    """
    if not raw:
        return CollectorPresence("", False)
    f = Fields(decode_json(raw, "collector presence"), "collector presence")
    return CollectorPresence(f.text("collector"), f.flag("online"), f.maybe_time("ts"))


def build_presence_ping(device: str, ts: dt.datetime | None = None) -> bytes:
    """A device's ``presence/ping``; ``ts`` defaults to now."""
    return encode({"device": device, "ts": stamp(ts)})


def parse_presence_ping(raw: bytes) -> PresencePing:
    """Read a presence ping.

    Raises:
        MessageError: malformed or a field of the wrong type.
    """
    f = Fields(decode_json(raw, "presence ping"), "presence ping")
    return PresencePing(f.text("device", NAME), f.maybe_time("ts"))
