"""Fleet messages over MQTT: topics, payloads, and signed commands. No I/O.

Every side (the agent, ``edgepack-fleet``, the collector) builds and reads MQTT messages only
through this module, so the protocol lives in one place; ``docs/protocol.md`` describes it for
people driving a device with ``mosquitto_pub``/``mosquitto_sub``. Topics, under a configurable
prefix (default ``edgepack/v1``)::

    {prefix}/devices/{device}/jobs/{model}     retained  latest signed command for one device
    {prefix}/groups/{group}/jobs/{model}       retained  latest signed command for a group
    {prefix}/devices/{device}/pending/get      device asks for pending work (on every connect)
    {prefix}/devices/{device}/pending          the collector answers with pending commands
    {prefix}/devices/{device}/state            retained  online, profile, models, health (LWT)
    {prefix}/devices/{device}/jobs/{job}/status          job execution updates (QoS 1)
    {prefix}/devices/{device}/telemetry | /drift          (telemetry and drift reports)
    {prefix}/collectors/{collector}            retained  a collector is online and subscribed
    {prefix}/presence/ping                     a device asks connected collectors to answer

Commands are DSSE envelopes (``edgepack.formats.modelsig.dsse_sign``; payload type
``application/vnd.edgepack.command+json``) signed by an operator key the device trusts. Their
payload names the kind (deploy, rollback, retire), the job id, the target (one device or one
group), the model, and the issue and expiry times. :func:`open_command` verifies and validates
one for a given device and raises :class:`~edgepack.agent.exceptions.CommandError` with the reason a
device reports as ``REJECTED``. Every payload carries ``"schema": 1``.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from edgepack.formats.dsse import dsse_sign, dsse_verify
from edgepack.formats.exceptions import CommandError, ManifestError, SignatureError
from edgepack.formats.keys import key_id
from edgepack.formats.manifest import check_model_name

__all__ = [
    "COMMAND_PAYLOAD_TYPE",
    "DEFAULT_PREFIX",
    "JOB_ID",
    "JOB_STATUSES",
    "SCHEMA",
    "TERMINAL",
    "Command",
    "Topics",
    "decode_json",
    "encode",
    "job_status",
    "make_command",
    "new_job_id",
    "open_command",
    "read_command",
    "utcnow",
]

SCHEMA = 1
DEFAULT_PREFIX = "edgepack/v1"
COMMAND_PAYLOAD_TYPE = "application/vnd.edgepack.command+json"
KINDS = ("deploy", "rollback", "retire")
JOB_STATUSES = ("QUEUED", "IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED")
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "REJECTED"})
MAX_MESSAGE_BYTES = 256 * 1024
JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")  # also device/group names
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.timezone.utc).isoformat(timespec="seconds")


def new_job_id(kind: str) -> str:
    """A fresh, sortable job id such as ``deploy-20261126T164500-3f9a1c``."""
    return f"{kind}-{utcnow().strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"


def encode(payload: Mapping[str, Any]) -> bytes:
    """Compact JSON with the schema version."""
    return json.dumps({"schema": SCHEMA, **payload}, separators=(",", ":"), sort_keys=True).encode()


def decode_json(raw: bytes, what: str, *, schema: bool = True) -> dict[str, Any]:
    """Parse a JSON object payload, bounded in size (``schema``: require our schema field).

    Raises:
        CommandError: too large, not JSON, not an object, or a newer schema.
    """
    if len(raw) > MAX_MESSAGE_BYTES:
        raise CommandError(f"{what} is {len(raw)} bytes, above {MAX_MESSAGE_BYTES}")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CommandError(f"{what} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CommandError(f"{what} must be a JSON object")
    if not schema:
        return data
    version = data.get("schema")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CommandError(f"{what} has no valid 'schema' version")
    if version > SCHEMA:
        raise CommandError(
            f"{what} uses schema {version}; this agent understands {SCHEMA}: upgrade"
        )
    return data


@dataclass(frozen=True)
class Topics:
    """Topic names under one prefix."""

    prefix: str = DEFAULT_PREFIX

    def device_jobs(self, device: str, model: str = "+") -> str:
        return f"{self.prefix}/devices/{device}/jobs/{model}"

    def group_jobs(self, group: str, model: str = "+") -> str:
        return f"{self.prefix}/groups/{group}/jobs/{model}"

    def pending_get(self, device: str) -> str:
        return f"{self.prefix}/devices/{device}/pending/get"

    def pending(self, device: str) -> str:
        return f"{self.prefix}/devices/{device}/pending"

    def state(self, device: str) -> str:
        return f"{self.prefix}/devices/{device}/state"

    def job_status(self, device: str, job_id: str) -> str:
        return f"{self.prefix}/devices/{device}/jobs/{job_id}/status"

    def telemetry(self, device: str) -> str:
        return f"{self.prefix}/devices/{device}/telemetry"

    def drift(self, device: str) -> str:
        return f"{self.prefix}/devices/{device}/drift"

    def collector(self, collector: str = "+") -> str:
        """Retained presence of a collector (online while it is subscribed; LWT offline)."""
        return f"{self.prefix}/collectors/{collector}"

    def presence_ping(self) -> str:
        """Devices ask here; every connected collector answers with a live presence message."""
        return f"{self.prefix}/presence/ping"

    def parse(self, topic: str) -> tuple[str, ...]:
        """The parts after the prefix (``("devices", "cam-17", "state")``), or ``()``."""
        if not topic.startswith(self.prefix + "/"):
            return ()
        return tuple(topic[len(self.prefix) + 1 :].split("/"))


@dataclass(frozen=True)
class Command:
    """A verified, validated fleet command."""

    kind: str
    job_id: str
    model: str
    target: Mapping[str, str]  # {"device": id} or {"group": name}
    issued_at: dt.datetime
    expires_at: dt.datetime
    version: int | None = None  # deploy: the version to install
    bundles: Mapping[str, Mapping[str, Any]] = field(
        default_factory=dict
    )  # profile -> url/sha/size
    key_id: str = ""
    raw: bytes = b""  # the envelope as received (the collector re-serves it)

    def bundle_for(self, profile: str) -> Mapping[str, Any]:
        """The bundle entry for ``profile``; CommandError if the deploy has none."""
        entry = self.bundles.get(profile)
        if entry is None:
            raise CommandError(
                f"deploy {self.job_id} has no bundle for profile {profile!r} "
                f"(it has {', '.join(sorted(self.bundles)) or 'none'})"
            )
        return entry


def make_command(
    kind: str,
    model: str,
    target: Mapping[str, str],
    key: ec.EllipticCurvePrivateKey,
    *,
    job_id: str | None = None,
    version: int | None = None,
    bundles: Mapping[str, Mapping[str, Any]] | None = None,
    ttl: dt.timedelta = dt.timedelta(days=7),
    issued_at: dt.datetime | None = None,
) -> tuple[str, bytes]:
    """Build and sign a command. Returns ``(job_id, envelope bytes)``.

    Raises:
        ValueError: an unknown kind, a bad target, or a deploy without version/bundles.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown command kind {kind!r}")
    if set(target) not in ({"device"}, {"group"}) or not JOB_ID.match(next(iter(target.values()))):
        raise ValueError("target must be {'device': id} or {'group': name}")
    check_model_name(model)
    if kind == "deploy" and (version is None or not bundles):
        raise ValueError("a deploy needs a version and at least one bundle")
    issued = issued_at or utcnow()
    job = job_id or new_job_id(kind)
    payload: dict[str, Any] = {
        "schema": SCHEMA,
        "kind": kind,
        "job_id": job,
        "model": model,
        "target": dict(target),
        "issued_at": _iso(issued),
        "expires_at": _iso(issued + ttl),
    }
    if kind == "deploy":
        payload["version"] = version
        payload["bundles"] = {p: dict(b) for p, b in (bundles or {}).items()}
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    envelope = dsse_sign(COMMAND_PAYLOAD_TYPE, body, key)
    return job, json.dumps(envelope, separators=(",", ":")).encode()


def _time(data: Mapping[str, Any], key: str) -> dt.datetime:
    value = data.get(key)
    try:
        moment = dt.datetime.fromisoformat(str(value))
    except ValueError as e:
        raise CommandError(f"command field {key!r} is not an ISO time: {value!r}") from e
    if moment.tzinfo is None:
        raise CommandError(f"command field {key!r} has no time zone")
    return moment


def _bundles(raw: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(raw, dict) or not raw:
        raise CommandError("deploy command has no 'bundles'")
    out = {}
    for profile, entry in raw.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
            raise CommandError(f"bundle entry for {profile!r} needs a 'url'")
        if not str(entry["url"]).startswith(("http://", "https://")):
            raise CommandError(f"bundle url for {profile!r} must be http(s)")
        sha = entry.get("sha256")
        if not isinstance(sha, str) or not _SHA256.match(sha):
            raise CommandError(f"bundle entry for {profile!r} needs a sha256 (64 hex digits)")
        size = entry.get("size")
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise CommandError(f"bundle entry for {profile!r} needs a positive 'size'")
        out[str(profile)] = {"url": entry["url"], "sha256": sha, "size": size}
    return out


def read_command(raw: bytes, trusted_keys: Sequence[ec.EllipticCurvePublicKey] | None) -> Command:
    """Parse a command envelope, verifying its signature when ``trusted_keys`` is given.

    The collector uses this to record jobs; devices use :func:`open_command`, which also checks
    the target and the validity period.

    Raises:
        CommandError: not a DSSE envelope, a bad signature, or malformed fields.
    """
    envelope = decode_json(raw, "command", schema=False) if raw[:1] == b"{" else None
    if envelope is None or "payloadType" not in envelope or "signatures" not in envelope:
        raise CommandError("command is not a signed DSSE envelope; unsigned commands are refused")
    signer = ""
    if trusted_keys is None:
        if envelope.get("payloadType") != COMMAND_PAYLOAD_TYPE:
            raise CommandError("envelope does not hold an edgepack command")
        try:
            payload = base64.b64decode(str(envelope.get("payload", "")), validate=True)
        except ValueError as e:
            raise CommandError(f"command payload is not base64: {e}") from e
    else:
        try:
            payload, key = dsse_verify(envelope, trusted_keys, payload_type=COMMAND_PAYLOAD_TYPE)
        except SignatureError as e:
            raise CommandError(f"command signature rejected: {e}") from e
        signer = key_id(key)
    data = decode_json(payload, "command payload")
    kind, job_id, model = data.get("kind"), data.get("job_id"), data.get("model")
    if kind not in KINDS:
        raise CommandError(f"unknown command kind {kind!r}")
    if not isinstance(job_id, str) or not JOB_ID.match(job_id):
        raise CommandError(f"command has a bad job_id {job_id!r}")
    if not isinstance(model, str):
        raise CommandError("command names no model")
    try:
        check_model_name(model)
    except ManifestError as e:
        raise CommandError(str(e)) from e
    target = data.get("target")
    if (
        not isinstance(target, dict)
        or len(target) != 1
        or not ({"device", "group"} & set(target))
        or not isinstance(next(iter(target.values())), str)
    ):
        raise CommandError("command target must name one device or one group")
    version = data.get("version")
    bundles: dict[str, dict[str, Any]] = {}
    if kind == "deploy":
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise CommandError("deploy command needs a non-negative integer 'version'")
        bundles = _bundles(data.get("bundles"))
    return Command(
        kind=kind,
        job_id=job_id,
        model=model,
        target=dict(target),
        issued_at=_time(data, "issued_at"),
        expires_at=_time(data, "expires_at"),
        version=version if kind == "deploy" else None,
        bundles=bundles,
        key_id=signer,
        raw=raw,
    )


def open_command(
    raw: bytes,
    trusted_keys: Sequence[ec.EllipticCurvePublicKey],
    *,
    device: str,
    groups: Sequence[str] = (),
    now: dt.datetime | None = None,
    clock_skew: dt.timedelta = dt.timedelta(minutes=5),
) -> Command:
    """Verify a command's signature and check it is for this device and still valid.

    Raises:
        CommandError: unsigned, signed by an untrusted key, malformed, expired, issued in the
            future, or addressed to another device or group. The message is the reason the
            device reports with ``REJECTED``.
    """
    command = read_command(raw, trusted_keys)
    target = command.target
    if target.get("device") not in (None, device):
        raise CommandError(f"command is for device {target['device']!r}, not {device!r}")
    if "group" in target and target["group"] not in groups:
        raise CommandError(f"command is for group {target['group']!r}, which {device} is not in")
    moment = now or utcnow()
    if command.expires_at <= moment:
        raise CommandError(f"command {command.job_id} expired at {_iso(command.expires_at)}")
    if command.issued_at > moment + clock_skew:
        raise CommandError(
            f"command {command.job_id} is issued in the future ({_iso(command.issued_at)})"
        )
    return command


def job_status(
    job_id: str,
    device: str,
    status: str,
    *,
    model: str | None = None,
    step: str | None = None,
    reason: str | None = None,
    version_before: int | None = None,
    version_after: int | None = None,
    seq: int = 0,
) -> bytes:
    """A job execution update (AWS IoT Jobs-like)."""
    if status not in JOB_STATUSES:
        raise ValueError(f"unknown job status {status!r}")
    return encode(
        {
            "job_id": job_id,
            "device": device,
            "status": status,
            "model": model,
            "step": step,
            "reason": reason,
            "version_before": version_before,
            "version_after": version_after,
            "seq": seq,
            "ts": _iso(utcnow()),
        }
    )
