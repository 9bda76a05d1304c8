"""Signed fleet commands: made by the operator, read by the collector, verified by devices. No I/O.

A command is a DSSE envelope (:func:`edgepack.formats.dsse.dsse_sign`, payload type
:data:`COMMAND_PAYLOAD_TYPE`) signed by an operator key the device trusts. Its payload names the
:class:`CommandKind` (deploy, rollback, retire), the job id, the target (one device or one
group), the model, the issue and expiry times, and for a deploy the version and one bundle per
device profile. A job may carry an ``in_progress_timeout`` (seconds: the device aborts it past
that, ``TIMED_OUT``); a ``cancel`` names the job it withdraws in ``cancels``. Both came after the
first agents: an older agent ignores the timeout (readers ignore fields they do not know) and
refuses a cancel cleanly, as a command of an unknown kind (``REJECTED``), so neither raises the
schema. ``edgepack-fleet`` makes one with :func:`make_command`; the collector records it
with :func:`read_command`; a device runs it only after :func:`open_command`, which also checks
the target and the validity period and raises
:class:`~edgepack.formats.exceptions.CommandError` with the reason the device reports as
``REJECTED``. :func:`peek_command` reads, unverified, the little a device needs before that: the
order of a batch and the job id to report a refusal against. ``docs/protocol.md`` §5-§7 is the
same format for people signing commands by hand.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from edgepack._clock import utc_now, utc_text
from edgepack.formats._payload import NAME, SCHEMA, Fields, TextEnum, decode_json
from edgepack.formats.dsse import dsse_sign, dsse_verify
from edgepack.formats.exceptions import CommandError, ManifestError, SignatureError
from edgepack.formats.keys import key_id
from edgepack.formats.manifest import check_model_name

__all__ = [
    "COMMAND_PAYLOAD_TYPE",
    "BundleRef",
    "Command",
    "CommandKind",
    "CommandPeek",
    "ExperimentAction",
    "ExperimentMode",
    "ExperimentSpec",
    "make_command",
    "new_job_id",
    "open_command",
    "peek_command",
    "read_command",
    "read_experiment",
]

COMMAND_PAYLOAD_TYPE = "application/vnd.edgepack.command+json"
CLOCK_SKEW = dt.timedelta(minutes=5)  # how far in the device's future a command may be issued
_HEX = frozenset("0123456789abcdef")


class CommandKind(TextEnum):
    """What a command asks of a model on its target."""

    DEPLOY = "deploy"
    ROLLBACK = "rollback"
    RETIRE = "retire"
    CANCEL = "cancel"  # withdraw job ``cancels`` where it has not started; older agents refuse it
    EXPERIMENT = "experiment"  # older agents refuse it: its kind is unknown to them


class ExperimentAction(TextEnum):
    """What an experiment command does to a model's candidate (docs/protocol.md §16.1)."""

    START = "start"  # install the candidate beside the active version and run the experiment
    PROMOTE = "promote"  # the candidate becomes the active version (the previous one retained)
    STOP = "stop"  # remove the candidate; the active version serves alone


class ExperimentMode(TextEnum):
    """How a candidate takes part: in the shadow of the active version, or answering a share."""

    SHADOW = "shadow"
    SPLIT = "split"


@dataclass(frozen=True)
class ExperimentSpec:
    """An experiment command's ``experiment`` field.

    ``share`` (split) is the share of requests the candidate answers; ``sample`` (shadow) the
    share of requests it also runs on, off the request path. Both are in (0, 1].
    """

    action: ExperimentAction
    mode: ExperimentMode | None = None  # start only
    share: float | None = None  # split
    sample: float | None = None  # shadow

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"action": self.action.value}
        if self.mode is not None:
            body["mode"] = self.mode.value
        if self.share is not None:
            body["share"] = self.share
        if self.sample is not None:
            body["sample"] = self.sample
        return body


def _fraction(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise CommandError(f"experiment field {key!r} must be a number in (0, 1], not {value!r}")
    return float(value)


def read_experiment(raw: Any) -> ExperimentSpec:
    """Validate an ``experiment`` field (also what :func:`make_command` signs).

    Raises:
        CommandError: not an object, an unknown action or mode, a start without its mode, a
            split without ``share`` or a shadow without ``sample`` in (0, 1].
    """
    if not isinstance(raw, Mapping):
        raise CommandError("experiment command has no 'experiment' object (action, mode, ...)")
    f = Fields(raw, "experiment", CommandError)
    action = f.choice("action", ExperimentAction)
    if action is not ExperimentAction.START:
        return ExperimentSpec(action)
    mode = f.choice("mode", ExperimentMode)
    if mode is ExperimentMode.SPLIT:
        return ExperimentSpec(action, mode, share=_fraction(raw.get("share"), "share"))
    return ExperimentSpec(action, mode, sample=_fraction(raw.get("sample"), "sample"))


@dataclass(frozen=True)
class BundleRef:
    """Where a deploy's bundle for one device profile is, and what it must hash to."""

    url: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Command:
    """A validated fleet command (verified too, when it came through :func:`open_command`)."""

    kind: CommandKind
    job_id: str
    model: str
    target: Mapping[str, str]  # {"device": id} or {"group": name}
    issued_at: dt.datetime
    expires_at: dt.datetime
    version: int | None = None  # deploy: the version to install
    bundles: Mapping[str, BundleRef] = field(default_factory=dict)  # profile -> bundle
    experiment: ExperimentSpec | None = None  # an experiment command's action and plan
    in_progress_timeout: int | None = None  # seconds a device may run it (None: unbounded)
    cancels: str | None = None  # a cancel: the job id it withdraws
    key_id: str = ""  # the key that signed it ("" when read without verifying)
    raw: bytes = b""  # the envelope as received (the collector re-serves it)

    def bundle_for(self, profile: str) -> BundleRef:
        """The bundle for ``profile``.

        Raises:
            CommandError: the deploy has no bundle for that profile.
        """
        entry = self.bundles.get(profile)
        if entry is None:
            raise CommandError(
                f"deploy {self.job_id} has no bundle for profile {profile!r} "
                f"(it has {', '.join(sorted(self.bundles)) or 'none'})"
            )
        return entry


@dataclass(frozen=True)
class CommandPeek:
    """What an unverified envelope claims: only for ordering and for naming a refusal."""

    job_id: str | None  # None unless it is a name safe in a topic
    issued_at: str  # "" when unreadable: sorts first
    kind: str = ""  # what it claims to be ("" when unreadable): cancels run first in a batch


def new_job_id(kind: CommandKind | str, now: dt.datetime | None = None) -> str:
    """A fresh, sortable job id such as ``deploy-20261126T164500-3f9a1c``."""
    moment = (now or utc_now()).astimezone(dt.timezone.utc)
    return f"{CommandKind(kind).value}-{moment:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


def make_command(
    kind: CommandKind | str,
    model: str,
    target: Mapping[str, str],
    key: ec.EllipticCurvePrivateKey,
    *,
    job_id: str | None = None,
    version: int | None = None,
    bundles: Mapping[str, Mapping[str, Any]] | None = None,
    ttl: dt.timedelta = dt.timedelta(days=7),
    issued_at: dt.datetime | None = None,
    in_progress_timeout: int | None = None,
    cancels: str | None = None,
    experiment: ExperimentSpec | None = None,
) -> tuple[str, bytes]:
    """Build and sign a command.

    Args:
        kind: deploy, rollback or retire.
        model: the model's name.
        target: ``{"device": id}`` or ``{"group": name}``.
        key: the operator's private key.
        job_id: default: :func:`new_job_id`.
        version, bundles: a deploy's version and ``{profile: {url, sha256, size}}``.
        ttl: how long the command stays valid.
        issued_at: default: now.
        in_progress_timeout: seconds a device may spend running the job before it aborts it
            (``TIMED_OUT``); not on a cancel.
        cancels: a cancel's job id to withdraw (required for a cancel, refused otherwise).
        experiment: an experiment command's action and plan (a start also needs the
            candidate's version and bundles, a promote its version).

    Returns:
        ``(job_id, envelope bytes)``.

    Raises:
        ValueError: a timeout that is not a whole number of seconds >= 1, a cancel without the
            job it cancels (or another kind with one), an unknown kind, a bad target, a deploy
            without version/bundles, or an
            experiment without a valid ``experiment`` (or without what its action needs).
    """
    kind = CommandKind(kind)
    if set(target) not in ({"device"}, {"group"}) or not NAME.match(next(iter(target.values()))):
        raise ValueError("target must be {'device': id} or {'group': name}")
    check_model_name(model)
    if kind is CommandKind.DEPLOY and (version is None or not bundles):
        raise ValueError("a deploy needs a version and at least one bundle")
    if (kind is CommandKind.CANCEL) != (cancels is not None):
        raise ValueError("a cancel (and only a cancel) names the job it cancels")
    if cancels is not None and not NAME.match(cancels):
        raise ValueError(f"cannot cancel {cancels!r}: not a job id")
    if in_progress_timeout is not None and (
        kind is CommandKind.CANCEL or isinstance(in_progress_timeout, bool)
        or not isinstance(in_progress_timeout, int) or in_progress_timeout < 1
    ):  # fmt: skip
        raise ValueError("in_progress_timeout is a whole number of seconds >= 1, not on a cancel")
    if kind is CommandKind.EXPERIMENT:
        if experiment is None:
            raise ValueError("an experiment command needs its experiment (action, mode, ...)")
        try:
            experiment = read_experiment(experiment.to_json())
        except CommandError as e:
            raise ValueError(str(e)) from e
        starting = experiment.action is ExperimentAction.START
        if (starting or experiment.action is ExperimentAction.PROMOTE) and version is None:
            raise ValueError(f"an experiment {experiment.action} needs the candidate's version")
        if starting and not bundles:
            raise ValueError("an experiment start needs the candidate's bundles")
    issued = issued_at or utc_now()
    job = job_id or new_job_id(kind, issued)
    payload: dict[str, Any] = {
        "schema": SCHEMA,
        "kind": kind.value,
        "job_id": job,
        "model": model,
        "target": dict(target),
        "issued_at": utc_text(issued),
        "expires_at": utc_text(issued + ttl),
    }
    if kind is CommandKind.DEPLOY:
        payload["version"] = version
        payload["bundles"] = {p: dict(b) for p, b in (bundles or {}).items()}
    if in_progress_timeout is not None:
        payload["in_progress_timeout"] = in_progress_timeout
    if cancels is not None:
        payload["cancels"] = cancels
    if kind is CommandKind.EXPERIMENT and experiment is not None:
        payload["experiment"] = experiment.to_json()
        if version is not None:
            payload["version"] = version
        if experiment.action is ExperimentAction.START:
            payload["bundles"] = {p: dict(b) for p, b in (bundles or {}).items()}
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    envelope = dsse_sign(COMMAND_PAYLOAD_TYPE, body, key)
    return job, json.dumps(envelope, separators=(",", ":")).encode()


def _time(f: Fields, key: str) -> dt.datetime:
    value = f.data.get(key)
    if not isinstance(value, str):
        raise f.fail(key, "an ISO 8601 time with a UTC offset")
    try:
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as e:
        raise CommandError(f"command field {key!r} is not an ISO time: {value!r}") from e
    if moment.tzinfo is None:
        raise CommandError(f"command field {key!r} has no time zone: {value!r}")
    return moment


def _bundles(raw: Any) -> dict[str, BundleRef]:
    if not isinstance(raw, dict) or not raw:
        raise CommandError("deploy command has no 'bundles' (an object of profile -> bundle)")
    out = {}
    for profile, entry in raw.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
            raise CommandError(f"bundle entry for {profile!r} needs a 'url'")
        if not entry["url"].startswith(("http://", "https://")):
            raise CommandError(f"bundle url for {profile!r} must be http(s)")
        sha = entry.get("sha256")
        if not isinstance(sha, str) or len(sha) != 64 or not set(sha) <= _HEX:
            raise CommandError(f"bundle entry for {profile!r} needs a sha256 (64 hex digits)")
        size = entry.get("size")
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise CommandError(f"bundle entry for {profile!r} needs a positive 'size'")
        out[str(profile)] = BundleRef(entry["url"], sha, size)
    return out


def _envelope(raw: bytes) -> dict[str, Any]:
    envelope = decode_json(raw, "command", schema=False, error=CommandError)
    if "payloadType" not in envelope or "signatures" not in envelope:
        raise CommandError("command is not a signed DSSE envelope; unsigned commands are refused")
    return envelope


def read_command(raw: bytes, trusted_keys: Sequence[ec.EllipticCurvePublicKey] | None) -> Command:
    """Parse a command envelope, verifying its signature when ``trusted_keys`` is given.

    The collector uses this to record jobs; devices use :func:`open_command`, which also checks
    the target and the validity period.

    Args:
        raw: the envelope's bytes, as published.
        trusted_keys: the operator keys to verify against; ``None`` reads without verifying.

    Returns:
        The :class:`Command`.

    Raises:
        CommandError: not a DSSE envelope, a bad signature, a newer schema, or a malformed field
            (the message names it).
    """
    if raw[:1] != b"{":
        raise CommandError("command is not a signed DSSE envelope; unsigned commands are refused")
    envelope = _envelope(raw)
    signer = ""
    if trusted_keys is None:
        if envelope.get("payloadType") != COMMAND_PAYLOAD_TYPE:
            raise CommandError("envelope does not hold an edgepack command")
        try:
            payload = base64.b64decode(str(envelope.get("payload", "")), validate=True)
        except (ValueError, binascii.Error) as e:
            raise CommandError(f"command payload is not base64: {e}") from e
    else:
        try:
            payload, key = dsse_verify(envelope, trusted_keys, payload_type=COMMAND_PAYLOAD_TYPE)
        except SignatureError as e:
            raise CommandError(f"command signature rejected: {e}") from e
        signer = key_id(key)
    f = Fields(decode_json(payload, "command payload", error=CommandError), "command", CommandError)
    kind = f.choice("kind", CommandKind)
    job_id = f.text("job_id", NAME)
    model = f.text("model")
    try:
        check_model_name(model)
    except ManifestError as e:
        raise CommandError(f"command field 'model': {e}") from e
    target = f.data.get("target")
    if (
        not isinstance(target, dict)
        or len(target) != 1
        or not ({"device", "group"} & set(target))
        or not isinstance(next(iter(target.values())), str)
        or not NAME.match(next(iter(target.values())))
    ):
        raise CommandError("command target must name one device or one group")
    version, bundles = None, {}
    if kind is CommandKind.DEPLOY:
        version = f.maybe_integer("version")
        if version is None:
            raise f.fail("version", "an integer >= 0 (a deploy names the version to install)")
        bundles = _bundles(f.data.get("bundles"))
    experiment = None
    if kind is CommandKind.EXPERIMENT:
        experiment = read_experiment(f.data.get("experiment"))
        if experiment.action is not ExperimentAction.STOP:
            version = f.maybe_integer("version")
            if version is None:
                raise f.fail("version", f"an integer >= 0 (the candidate to {experiment.action})")
        if experiment.action is ExperimentAction.START:
            bundles = _bundles(f.data.get("bundles"))
    cancels = f.text("cancels", NAME) if kind is CommandKind.CANCEL else None
    timeout = f.maybe_integer("in_progress_timeout", 1)
    if timeout is not None and kind is CommandKind.CANCEL:
        raise f.fail("in_progress_timeout", "absent (a cancel has no timeout)")
    issued_at, expires_at = _time(f, "issued_at"), _time(f, "expires_at")
    if expires_at <= issued_at:
        raise CommandError(f"command {job_id} expires before it is issued")
    return Command(
        kind=kind,
        job_id=job_id,
        model=model,
        target=dict(target),
        issued_at=issued_at,
        expires_at=expires_at,
        version=version,
        bundles=bundles,
        experiment=experiment,
        in_progress_timeout=timeout,
        cancels=cancels,
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
    clock_skew: dt.timedelta = CLOCK_SKEW,
) -> Command:
    """Verify a command's signature and check it is for this device and still valid.

    Args:
        raw: the envelope's bytes.
        trusted_keys: the operator keys the device trusts (``[mqtt] command_keys``).
        device: this device's id.
        groups: this device's groups.
        now: the device's clock (default: now).
        clock_skew: how far in the future a command may be issued.

    Returns:
        The verified :class:`Command`.

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
    moment = now or utc_now()
    if command.expires_at <= moment:
        raise CommandError(f"command {command.job_id} expired at {utc_text(command.expires_at)}")
    if command.issued_at > moment + clock_skew:
        raise CommandError(
            f"command {command.job_id} is issued in the future ({utc_text(command.issued_at)})"
        )
    return command


def peek_command(raw: bytes) -> CommandPeek:
    """What an envelope claims, without verifying anything. Never raises.

    Args:
        raw: the envelope's bytes.

    Returns:
        Its job id (``None`` unless a base64 ``payload`` holds a JSON object with a ``schema``
        and a ``job_id`` that is safe in a topic) and its ``issued_at`` text (``""`` if none).
    """
    try:
        envelope = decode_json(raw, "command", schema=False, error=CommandError)
        body = base64.b64decode(str(envelope.get("payload", "")), validate=True)
        payload = decode_json(body, "command payload", schema=False, error=CommandError)
    except (CommandError, ValueError, binascii.Error):
        return CommandPeek(None, "")
    kind = payload.get("kind")
    job_id, issued = payload.get("job_id"), payload.get("issued_at")
    schema = payload.get("schema")
    readable = isinstance(schema, int) and not isinstance(schema, bool) and schema >= 1
    safe = readable and isinstance(job_id, str) and NAME.match(job_id) is not None
    return CommandPeek(
        job_id if safe else None,
        issued if isinstance(issued, str) else "",
        kind if isinstance(kind, str) else "",
    )
