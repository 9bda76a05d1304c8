"""Fleet commands: find a release's bundles, sign a deploy/rollback/retire, publish it retained.

A deploy names one bundle per device profile (URL, sha256, size); each device picks its own. The
bundles are found either in a local ``dist/`` directory (``--dist``: hashed here) or through the
index that ``edgepack-fleet serve`` publishes at its root. The signed command
(:func:`edgepack.formats.commands.make_command`) is published retained at QoS 1 on the target's
job topic for that model (:class:`edgepack.formats.topics.Topics`), so devices that are offline
or join the group later still converge; a newer command for the same model and target replaces
it. No collector needs to run for this.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric import ec

from edgepack.fleet._broker import BrokerOptions, connect, publish_and_wait
from edgepack.fleet.exceptions import BundleLookupError
from edgepack.formats.bundle import BUNDLE_SUFFIX
from edgepack.formats.commands import CommandKind, make_command
from edgepack.formats.topics import Topics

__all__ = ["Published", "find_bundles", "publish_command"]


@dataclass(frozen=True)
class Published:
    """What was sent."""

    job_id: str
    topic: str
    kind: CommandKind
    model: str
    target: dict[str, str]
    bundles: dict[str, dict[str, Any]]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def find_bundles(
    model: str, version: int, base_url: str, dist: Path | None = None
) -> dict[str, dict[str, Any]]:
    """``{profile: {url, sha256, size}}`` for every bundle of ``model`` ``version``.

    Raises:
        BundleLookupError: no bundle for that version, the index is unreachable or malformed.
    """
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
    else:
        try:
            response = httpx.get(base, timeout=10)
            response.raise_for_status()
            index = response.json()
        except (httpx.HTTPError, ValueError) as e:
            raise BundleLookupError(
                f"cannot read the bundle index at {base}: {e} (serve the bundles with "
                "`edgepack-fleet serve DIR`, or pass --dist DIR to hash them locally)"
            ) from e
        entries = index.get("bundles", index) if isinstance(index, dict) else index
        for entry in entries if isinstance(entries, list) else []:
            match = pattern.match(str(entry.get("name", "")))
            if match:
                found[match["profile"]] = {
                    "url": base + entry["name"],
                    "sha256": entry["sha256"],
                    "size": entry["size"],
                }
    if not found:
        raise BundleLookupError(
            f"no bundles named {model}-{version}-PROFILE{BUNDLE_SUFFIX} at "
            f"{dist if dist is not None else base}; build them with `edgepack build`"
        )
    return found


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

    Returns:
        What was sent.

    Raises:
        BrokerError: the broker is unreachable or did not acknowledge.
        ValueError: an unknown kind, a bad target or a deploy without bundles.
    """
    kind = CommandKind(kind)
    job_id, envelope = make_command(
        kind, model, target, key, version=version, bundles=bundles, ttl=ttl
    )
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
    return Published(job_id, topic, kind, model, dict(target), dict(bundles or {}))
