"""Fleet commands: find a release's bundles, sign a deploy/rollback/retire, publish it retained.

A deploy names one bundle per device profile (URL, sha256, size); each device picks its own. The
bundles are found either in a local ``dist/`` directory (``--dist``: hashed here) or through the
index that ``edgepack-fleet serve`` publishes at its root. The server is not trusted with what the
operator signs: each bundle the index names is downloaded (streamed to a temporary file, capped
in size and time), hashed here, and its manifest read through the archive allow-list
(:func:`edgepack.formats.bundle.iter_members`); the command carries our hash and size, and an
index that disagrees with the bytes, or a manifest that is not the model, version and profile
the command names, is refused before anything is signed. The signed command
(:func:`edgepack.formats.commands.make_command`) is published retained at QoS 1 on the target's
job topic for that model (:class:`edgepack.formats.topics.Topics`), so devices that are offline
or join the group later still converge; a newer command for the same model and target replaces
it. No collector needs to run for this.

:func:`cancel_job` withdraws a job: it signs a ``cancel`` naming it (devices verify it like any
command, so a cancel cannot be forged), publishes it on the job's topic (retained, replacing the
job's retained command, unless a newer command already replaced it there), and records the
cancellation in the store, marking ``CANCELED`` the devices that never started the job. It is
the one way to cancel, for the CLI (``edgepack-fleet jobs cancel``) and for staged rollouts.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
from cryptography.hazmat.primitives.asymmetric import ec

from edgepack._clock import Clock, utc_now, utc_text
from edgepack.fleet._broker import BrokerOptions, connect, publish_and_wait
from edgepack.fleet._database import FleetStore
from edgepack.fleet.exceptions import BundleLookupError, JobError
from edgepack.formats.bundle import (
    BUNDLE_SUFFIX,
    MANIFEST_FILE,
    SIGNATURE_FILE,
    ArchiveLimits,
    iter_members,
)
from edgepack.formats.commands import CommandKind, make_command, read_command
from edgepack.formats.exceptions import ArchiveError, ManifestError
from edgepack.formats.keys import key_id
from edgepack.formats.manifest import Manifest, parse_manifest
from edgepack.formats.topics import Topics

__all__ = [
    "BundleFetchLimits",
    "Canceled",
    "Published",
    "cancel_job",
    "describe_bundles",
    "find_bundles",
    "publish_command",
    "publish_device_commands",
]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class BundleFetchLimits:
    """Bounds on what the fleet downloads from a bundle server before it signs a deploy."""

    max_index_bytes: int = 1024**2
    max_bundle_bytes: int = ArchiveLimits().max_archive_bytes
    max_manifest_bytes: int = 1024**2  # the agent's cap too
    read_timeout: float = 10.0  # seconds per connect/read
    deadline: float = 600.0  # seconds for one bundle's whole download


@dataclass(frozen=True)
class Published:
    """What was sent."""

    job_id: str
    topic: str
    kind: CommandKind
    model: str
    target: dict[str, str]
    bundles: dict[str, dict[str, Any]]
    envelope: bytes = b""  # the signed command as published (for the audit trail)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def find_bundles(
    model: str,
    version: int,
    base_url: str,
    dist: Path | None = None,
    fetch: BundleFetchLimits | None = None,
    *,
    described: dict[str, dict[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """``{profile: {url, sha256, size}}`` for every bundle of ``model`` ``version``.

    Args:
        model, version: the release.
        base_url: where devices download the bundles (the URLs in the command start with it).
        dist: a local copy of the bundles, hashed here; without it the server's index is read
            and every bundle it names for the release is downloaded and checked.
        fetch: size and time bounds on those downloads.
        described: when given, filled with each profile's build facts for the audit trail
            (:func:`edgepack.fleet._audit_facts.bundle_facts`: precision, parity, signer, source).

    Raises:
        BundleLookupError: no bundle for that version, the index is unreachable or malformed, a
            bundle cannot be downloaded, is not a bundle, or its bytes or manifest disagree
            with the index or with the release (the message names the bundle).
    """
    fetch = fetch or BundleFetchLimits()
    pattern = re.compile(
        rf"^{re.escape(model)}-{version}-(?P<profile>[A-Za-z0-9_.-]+)"
        rf"{re.escape(BUNDLE_SUFFIX)}$"
    )
    base = base_url.rstrip("/") + "/"
    found: dict[str, dict[str, Any]] = {}
    if dist is not None:
        if not dist.is_dir():
            raise BundleLookupError(f"--dist {dist} is not a directory")
        for path in sorted(dist.iterdir()):
            match = pattern.match(path.name)
            if match and path.is_file():
                found[match["profile"]] = {
                    "url": base + path.name,
                    "sha256": _sha256(path),
                    "size": path.stat().st_size,
                }
                if described is not None:
                    with path.open("rb") as handle:
                        described[match["profile"]] = _facts(
                            handle, path.name, found[match["profile"]], fetch
                        )
    else:
        index = _read_index(base, fetch)
        entries = index.get("bundles", index) if isinstance(index, dict) else index
        for entry in entries if isinstance(entries, list) else []:
            name = entry.get("name") if isinstance(entry, dict) else None
            match = pattern.match(name) if isinstance(name, str) else None
            if match and isinstance(name, str):
                found[match["profile"]] = _checked_bundle(
                    base + name, entry, model, version, match["profile"], fetch, described
                )
    if not found:
        raise BundleLookupError(
            f"no bundles named {model}-{version}-PROFILE{BUNDLE_SUFFIX} at "
            f"{dist if dist is not None else base}; build them with `edgepack build`"
        )
    return found


def _read_index(base: str, fetch: BundleFetchLimits) -> Any:
    """The server's JSON index, read under ``max_index_bytes``."""
    advice = (
        "serve the bundles with `edgepack-fleet serve DIR`, or pass --dist DIR to hash them "
        "locally"
    )
    try:
        with httpx.stream("GET", base, timeout=fetch.read_timeout) as response:
            response.raise_for_status()
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > fetch.max_index_bytes:
                    raise BundleLookupError(
                        f"the bundle index at {base} is above {fetch.max_index_bytes} bytes"
                    )
        return json.loads(body)
    except (httpx.HTTPError, ValueError) as e:
        raise BundleLookupError(f"cannot read the bundle index at {base}: {e} ({advice})") from e


def _download(url: str, name: str, out: IO[bytes], fetch: BundleFetchLimits) -> tuple[str, int]:
    """Stream ``url`` into ``out`` under the size cap and deadline; (sha256, size)."""
    digest, size = hashlib.sha256(), 0
    deadline = time.monotonic() + fetch.deadline
    try:
        # as a device downloads it (edgepack.agent._download): identity, redirects followed
        with httpx.stream(
            "GET",
            url,
            headers={"Accept-Encoding": "identity"},
            timeout=fetch.read_timeout,
            follow_redirects=True,
        ) as response:
            response.raise_for_status()
            for chunk in response.iter_raw(_CHUNK):
                size += len(chunk)
                if size > fetch.max_bundle_bytes:
                    raise BundleLookupError(
                        f"bundle {name} at {url} is above {fetch.max_bundle_bytes} bytes; refusing"
                    )
                if time.monotonic() > deadline:
                    raise BundleLookupError(
                        f"bundle {name} at {url} took more than {fetch.deadline:.0f} s to download"
                    )
                digest.update(chunk)
                out.write(chunk)
    except httpx.HTTPError as e:
        raise BundleLookupError(f"cannot download bundle {name} from {url}: {e}") from e
    return digest.hexdigest(), size


def _checked_bundle(
    url: str, entry: dict[str, Any], model: str, version: int, profile: str,
    fetch: BundleFetchLimits, described: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Download the bundle an index entry names and check it is what the command will say.

    The hash and size are ours; the index's must agree with them, and the manifest (read
    through the archive allow-list, not verified: devices check the signature) must be
    ``model`` ``version`` for ``profile``.
    """
    name = entry["name"]
    claimed_sha, claimed_size = entry.get("sha256"), entry.get("size")
    if not (isinstance(claimed_sha, str) and _SHA256.match(claimed_sha)) or not (
        type(claimed_size) is int and claimed_size >= 0
    ):
        raise BundleLookupError(
            f"the bundle index entry for {name} has no valid sha256 and size; refusing"
        )
    with tempfile.TemporaryFile(prefix="edgepack-fleet-") as handle:
        sha256, size = _download(url, name, handle, fetch)
        if (sha256, size) != (claimed_sha, claimed_size):
            raise BundleLookupError(
                f"bundle {name}: the index says sha256 {claimed_sha}, {claimed_size} bytes, but "
                f"{url} sent sha256 {sha256}, {size} bytes; refusing to sign a deploy for it"
            )
        handle.seek(0)
        manifest, sig = _read_manifest(handle, name, fetch)
    said = (model, version, profile)
    got = (manifest.name, manifest.version, manifest.profile)
    if got != said:
        raise BundleLookupError(
            f"bundle {name} holds {got[0]} version {got[1]} for {got[2]}, not {model} version "
            f"{version} for {profile}; refusing to sign a deploy for it"
        )
    if described is not None:
        described[profile] = _facts_of(name, manifest, sig, sha256, size)
    return {"url": url, "sha256": sha256, "size": size}


def _read_manifest(
    handle: IO[bytes], name: str, fetch: BundleFetchLimits
) -> tuple[Manifest, bytes | None]:
    """The bundle's manifest, and its ``model.sig`` when the archive has one."""
    limits = ArchiveLimits(max_archive_bytes=fetch.max_bundle_bytes)
    manifest, sig = None, None
    try:
        for member in iter_members(handle, limits):  # type: ignore[arg-type]
            if member.name in (MANIFEST_FILE, SIGNATURE_FILE):
                if member.size > fetch.max_manifest_bytes:
                    raise ArchiveError(
                        f"{member.name} is {member.size} bytes, above its limit of "
                        f"{fetch.max_manifest_bytes}"
                    )
                if member.name == MANIFEST_FILE:
                    manifest = parse_manifest(member.read())
                else:
                    sig = member.read()
            if manifest is not None and sig is not None:
                break
    except (ArchiveError, ManifestError) as e:
        raise BundleLookupError(f"bundle {name} is not a readable bundle: {e}") from e
    if manifest is None:
        raise BundleLookupError(f"bundle {name} has no {MANIFEST_FILE}; refusing")
    return manifest, sig


def _facts(
    handle: IO[bytes], name: str, found: dict[str, Any], fetch: BundleFetchLimits
) -> dict[str, Any]:
    manifest, sig = _read_manifest(handle, name, fetch)
    return _facts_of(name, manifest, sig, found["sha256"], found["size"])


def describe_bundles(
    dist: Path, fetch: BundleFetchLimits | None = None
) -> dict[tuple[str, int], dict[str, dict[str, Any]]]:
    """Every bundle in a build directory: ``{(model, version): {profile: build facts}}``.

    Raises:
        BundleLookupError: ``dist`` is not a directory, holds no bundle, or a bundle there is
            not readable (the message names it).
    """
    fetch = fetch or BundleFetchLimits()
    if not dist.is_dir():
        raise BundleLookupError(f"{dist} is not a directory")
    found: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for path in sorted(dist.iterdir()):
        if not (path.is_file() and path.name.endswith(BUNDLE_SUFFIX)):
            continue
        size = path.stat().st_size
        with path.open("rb") as handle:
            manifest, sig = _read_manifest(handle, path.name, fetch)
        facts = _facts_of(path.name, manifest, sig, _sha256(path), size)
        found.setdefault((manifest.name, manifest.version), {})[manifest.profile] = facts
    if not found:
        raise BundleLookupError(
            f"no bundles (*{BUNDLE_SUFFIX}) in {dist}; build them with `edgepack build`"
        )
    return found


def _facts_of(
    name: str, manifest: Manifest, sig: bytes | None, sha256: str, size: int
) -> dict[str, Any]:
    from edgepack.fleet._audit_facts import bundle_facts  # it imports the store

    return bundle_facts(name, manifest, sig, sha256, size)


@dataclass(frozen=True)
class Canceled:
    """What :func:`cancel_job` did."""

    job_id: str  # the canceled job
    cancel_job_id: str  # the signed cancel's own id
    topic: str  # where the cancel went
    retained: bool  # True: it replaced the job's retained command; False: a newer one is there
    unstarted: list[str]  # devices that had not started the job (now CANCELED in the store)
    started: list[str]  # devices already running or done: they keep their status


def _topic(topics: Topics, target: dict[str, str], model: str) -> str:
    if "device" in target:
        return topics.device_jobs(target["device"], model)
    return topics.group_jobs(target["group"], model)


def cancel_job(
    options: BrokerOptions,
    store: FleetStore,
    key: ec.EllipticCurvePrivateKey,
    job_id: str,
    *,
    clock: Clock = utc_now,
) -> Canceled:
    """Cancel ``job_id`` on every device that has not started it.

    Args:
        options: the broker.
        store: the fleet store that recorded the job (the collector's).
        key: the operator's signing key (devices must trust it, as for any command).
        job_id: the job to cancel.
        clock: the time the cancel is issued at.

    Returns:
        What was sent and recorded.

    Raises:
        JobError: the store has no such job, or it was canceled already, expired, or is
            finished on every device it addresses.
        BrokerError: the broker is unreachable or did not acknowledge (nothing is recorded).
        StoreError: the store failed.
    """
    # imported here: _views reads the store, and the store's module imports nothing of ours
    from edgepack.fleet._views import job_devices, job_progress

    job = store.job(job_id)
    where = getattr(store, "name", "")
    if job is None:
        raise JobError(
            f"no job {job_id} in store {where}; `edgepack-fleet jobs list` shows the jobs"
        )
    control = store.job_controls([job_id]).get(job_id)
    if control is not None and control.canceled_at is not None:
        raise JobError(f"job {job_id} was already canceled at {utc_text(control.canceled_at)}")
    now = clock()
    if job.expires_at <= now:
        raise JobError(
            f"job {job_id} expired at {utc_text(job.expires_at)}: no device starts it any more, "
            "so there is nothing to cancel"
        )
    progress = job_progress(store, job_id)
    if progress.done:
        counts: dict[str, int] = {}
        for _device, e in progress.devices:
            counts[str(e.status) if e else "?"] = counts.get(str(e.status) if e else "?", 0) + 1
        shown = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        raise JobError(
            f"job {job_id} is finished on every device it addresses ({shown}); nothing to "
            "cancel (roll back or deploy to change what they run)"
        )
    unstarted = [d for d, e in progress.devices if e is None or e.status == "QUEUED"]
    started = [d for d, e in progress.devices if d not in unstarted]
    target = {job.target_type: job.target}
    newer = [
        j for j in store.jobs(job.model, limit=1000)
        if (j.target_type, j.target) == (job.target_type, job.target)
        and (j.issued_at, j.job_id) > (job.issued_at, job.job_id)
    ]  # fmt: skip
    cancel_id, envelope = make_command(
        CommandKind.CANCEL, job.model, target, key, cancels=job_id, issued_at=now,
        ttl=max(job.expires_at - now, dt.timedelta(seconds=1)),
    )  # fmt: skip
    topic = _topic(Topics(options.prefix), target, job.model)
    client = connect(options)
    try:
        publish_and_wait(client, topic, envelope, retain=not newer)
    finally:
        client.disconnect()
        client.loop_stop()
    signer = key_id(key.public_key())
    store.record_cancel(job_id, now, signer, cancel_id, job_devices(store, job))
    from edgepack.fleet._audit_facts import record_command  # it imports the store

    record_command(store, read_command(envelope, [key.public_key()]), by="cli")
    return Canceled(job_id, cancel_id, topic, not newer, unstarted, started)


def publish_command(
    options: BrokerOptions,
    kind: CommandKind | str,
    model: str,
    target: dict[str, str],
    key: ec.EllipticCurvePrivateKey,
    *,
    version: int | None = None,
    bundles: dict[str, dict[str, Any]] | None = None,
    ttl: dt.timedelta = dt.timedelta(days=7),
    in_progress_timeout: int | None = None,
) -> Published:
    """Sign a command and publish it retained on the target's job topic for ``model``.

    Args:
        options: the broker.
        kind: deploy, rollback or retire.
        model: the model's name.
        target: ``{"device": id}`` or ``{"group": name}``.
        key: the operator's signing key.
        version, bundles: a deploy's version and bundles (:func:`find_bundles`).
        ttl: how long the command stays valid.
        in_progress_timeout: seconds a device may run the job before it aborts it.

    Returns:
        What was sent.

    Raises:
        BrokerError: the broker is unreachable or did not acknowledge.
        ValueError: an unknown kind, a bad target or a deploy without bundles.
    """
    kind = CommandKind(kind)
    job_id, envelope = make_command(
        kind, model, target, key, version=version, bundles=bundles, ttl=ttl,
        in_progress_timeout=in_progress_timeout,
    )  # fmt: skip
    topic = publish_retained(options, model, target, envelope)
    return Published(job_id, topic, kind, model, dict(target), dict(bundles or {}), envelope)


def publish_retained(
    options: BrokerOptions, model: str, target: Mapping[str, str], envelope: bytes
) -> str:
    """Publish a signed command retained on ``target``'s job topic for ``model`` (a device's
    or a group's) and wait for the broker's acknowledgement; returns the topic.

    Raises:
        BrokerError: the broker is unreachable or did not acknowledge.
    """
    topics = Topics(options.prefix)
    topic = (
        topics.device_jobs(target["device"], model)
        if "device" in target
        else topics.group_jobs(target["group"], model)
    )
    client = connect(options)
    try:
        publish_and_wait(client, topic, envelope, retain=True)
    finally:
        client.disconnect()
        client.loop_stop()
    return topic


def publish_device_commands(
    options: BrokerOptions,
    kind: CommandKind | str,
    model: str,
    jobs: Sequence[tuple[str, str]],
    key: ec.EllipticCurvePrivateKey,
    *,
    version: int | None = None,
    bundles: dict[str, dict[str, Any]] | None = None,
    ttl: dt.timedelta = dt.timedelta(days=7),
) -> list[Published]:
    """Sign one command per device, each with the job id given, and publish them retained on
    the devices' own job topics over one connection (a staged rollout's stage).

    Args:
        options: the broker.
        kind: deploy, rollback or retire.
        model: the model's name.
        jobs: ``(device, job_id)`` pairs; a job id chosen beforehand lets the caller record it
            before anything is sent (publishing the same job id again is harmless: a device
            runs a job id once).
        key: the operator's signing key.
        version, bundles: a deploy's version and bundles (:func:`find_bundles`).
        ttl: how long the commands stay valid.

    Returns:
        What was sent, in the order of ``jobs``.

    Raises:
        BrokerError: the broker is unreachable or did not acknowledge one; the commands before
            it were sent.
        ValueError: an unknown kind, a bad device name or job id, or a deploy without bundles.
    """
    kind = CommandKind(kind)
    topics, sent = Topics(options.prefix), []
    envelopes = [
        (device, *make_command(kind, model, {"device": device}, key, job_id=job_id,
                               version=version, bundles=bundles, ttl=ttl))
        for device, job_id in jobs
    ]  # fmt: skip
    if not envelopes:
        return []
    client = connect(options)
    try:
        for device, job_id, envelope in envelopes:
            topic = topics.device_jobs(device, model)
            publish_and_wait(client, topic, envelope, retain=True)
            target = {"device": device}
            sent.append(
                Published(job_id, topic, kind, model, target, dict(bundles or {}), envelope)
            )
    finally:
        client.disconnect()
        client.loop_stop()
    return sent
