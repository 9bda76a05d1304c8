"""What the fleet records in the audit trail: one function per fact, each appended once.

:mod:`edgepack.fleet._audit` keeps the chain (append, entries, verify); this module turns what
the fleet handles into entries (the table of kinds is in that module's docstring): a command as
published, a device's final job status, a trust document, a build's bundles (from their
manifests and ``model.sig``: :func:`bundle_facts`) and a rollout decision. The collector, the
CLI, the store (rollout decisions, in their transaction) and ``trust publish`` call them.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from edgepack.fleet import _schema as sql
from edgepack.fleet._audit import AuditDraft, AuditEntry, append, draft
from edgepack.fleet._schema import DecisionRow, RolloutRow
from edgepack.formats.commands import Command
from edgepack.formats.manifest import Manifest
from edgepack.formats.messages import TERMINAL, JobUpdate

if TYPE_CHECKING:
    from edgepack.fleet._database import FleetStore

__all__ = [
    "bundle_facts",
    "decision_draft",
    "record_build",
    "record_command",
    "record_outcome",
    "record_trust",
]


def _claimed_key(raw: bytes) -> str | None:
    """The key id an envelope names (unverified; verify() checks it)."""
    try:
        signatures = json.loads(raw)["signatures"]
        claimed = signatures[0].get("keyid")
        return claimed if isinstance(claimed, str) else None
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None


def record_command(store: FleetStore, command: Command, *, by: str) -> AuditEntry:
    """Append a command (the signed envelope itself) once per job id. ``by``: who saw it
    (``collector`` or ``cli``), kept in the payload of the first record only."""
    ((target_type, target),) = command.target.items()
    payload = {
        "job_id": command.job_id, "kind": command.kind.value, "target": {target_type: target},
        "issued_at": sql.ts(command.issued_at), "expires_at": sql.ts(command.expires_at),
        "bundles": {p: b.sha256 for p, b in sorted(command.bundles.items())},
        "cancels": command.cancels, "recorded_by": by,
        "envelope": command.raw.decode("utf-8", "replace"),
    }  # fmt: skip
    device = target if target_type == "device" else None
    return append(store, "command", payload, at=command.issued_at, model=command.model,
                  version=command.version, device=device,
                  key_id=command.key_id or _claimed_key(command.raw),
                  fact=f"command:{command.job_id}")  # fmt: skip


def record_outcome(store: FleetStore, update: JobUpdate, at: datetime) -> AuditEntry | None:
    """Append a device's terminal job status (once per job, device and seq); None otherwise.

    Its version is the one the job deploys (a rollback's or retire's: the version after)."""
    if update.status not in TERMINAL:
        return None
    payload = {
        "job_id": update.job_id, "status": update.status.value, "seq": update.seq,
        "step": None if update.step is None else update.step.value, "reason": update.reason,
        "version_before": update.version_before, "version_after": update.version_after,
    }  # fmt: skip
    job = store.job(update.job_id)  # a deploy's outcome concerns the version it deploys
    version = job.version if job is not None and job.version is not None else update.version_after
    model = update.model or (job.model if job is not None else None)
    return append(store, "outcome", payload, at=update.ts or at, model=model,
                  version=version, device=update.device,
                  fact=f"outcome:{update.job_id}:{update.device}:{update.seq}")  # fmt: skip


def record_trust(store: FleetStore, document: bytes, at: datetime) -> AuditEntry:
    """Append a key rotation: the trust document, its version and key ids per role."""
    from edgepack.fleet._trust import peek_trust  # it imports the store, which imports us

    summary = peek_trust(document)
    payload = {**summary.as_json(), "document": document.decode("utf-8", "replace")}
    signer = _claimed_key(document)
    return append(store, "trust", payload, at=at, key_id=signer,
                  fact=f"trust:{summary.version}")  # fmt: skip


def _signer(sig: bytes | None) -> str | None:
    """The key id a bundle's ``model.sig`` names (the device verifies it; so does ``edgepack
    verify``)."""
    try:
        hint = json.loads(sig or b"")["verificationMaterial"]["publicKey"]["hint"]
        return hint if isinstance(hint, str) else None
    except (ValueError, KeyError, TypeError):
        return None


def bundle_facts(
    name: str, manifest: Manifest, sig: bytes | None, sha256: str, size: int
) -> dict[str, Any]:
    """What a build entry keeps of one bundle: its hash and size, precision, parity (passed,
    rows, metrics, verified on target), signer key id and source (file hash or MLflow run)."""
    parity = manifest.parity
    return {
        "bundle": name, "sha256": sha256, "size": size, "precision": manifest.precision,
        "task": manifest.task, "family": manifest.family, "created": manifest.created,
        "packager_version": manifest.packager_version, "signer": _signer(sig),
        "parity": {k: _plain(parity[k]) for k in ("passed", "rows", "metrics", "target_verified")
                   if k in parity},
        "source": _plain(dict(manifest.source)),
    }  # fmt: skip


def record_build(
    store: FleetStore, model: str, version: int, bundles: Mapping[str, Mapping[str, Any]],
    at: datetime,
) -> AuditEntry:  # fmt: skip
    """Append a build: per profile the bundle's sha256, size, precision, parity, signer and
    source (:func:`edgepack.fleet._commands.describe_bundle`), once per set of bundles."""
    digest = hashlib.sha256(
        "".join(f"{p}:{b.get('sha256')};" for p, b in sorted(bundles.items())).encode()
    ).hexdigest()[:16]
    signers = sorted({str(b.get("signer")) for b in bundles.values() if b.get("signer")})
    payload = {"profiles": {p: dict(b) for p, b in sorted(bundles.items())}}
    return append(store, "build", payload, at=at, model=model, version=version,
                  key_id=signers[0] if len(signers) == 1 else None,
                  fact=f"build:{model}:{version}:{digest}")  # fmt: skip


def _plain(value: Any) -> Any:
    """``value`` as plain JSON: a NaN or infinite figure becomes null, anything else text (a
    decision must never fail to be recorded for its figures)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def decision_draft(d: DecisionRow, rollout: RolloutRow) -> AuditDraft:
    """A rollout decision as an audit entry (the store appends it with the decision)."""
    payload = {"rollout_id": d.rollout_id, "decision": d.seq, "stage": d.stage,
               "action": d.action, "reason": d.reason, "figures": _plain(d.figures),
               "group": rollout.group}  # fmt: skip
    return draft("rollout", payload, at=d.at, model=rollout.model, version=rollout.version,
                 fact=f"rollout:{d.rollout_id}:{d.seq}")  # fmt: skip
