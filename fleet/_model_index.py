"""The model index: each model version, what it was built as, where it runs, and its state.

``edgepack-fleet models`` reads two records of the fleet store and joins them here:

* the audit trail (:mod:`edgepack.fleet._audit`): each version's ``build`` entry (per profile:
  bundle sha256, size, precision, parity, signer key id, source file hash or MLflow run) and the
  ``command`` entries that deployed, rolled back or retired the model;
* the devices' states (what the collector last heard): which version each device runs
  (``active``) and keeps for a rollback (``previous``), and the groups the operator assigned it.

A version's state follows from both:

============  ===========================================================================
state         when
============  ===========================================================================
active        at least one device runs it
superseded    no device runs it, and a newer version of the model runs or was deployed
retired       no device runs it, and nothing newer replaced it: it was rolled back from or
              the model was retired
built         built (or deployed) but never ran on a device the collector heard from
============  ===========================================================================

``models show NAME`` is :func:`model_history`: the model's audit entries, build to retirement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from edgepack.fleet import _audit as audit
from edgepack.fleet._schema import AuditEntry, ts

if TYPE_CHECKING:
    from edgepack.fleet._database import FleetStore

__all__ = ["STATES", "ModelVersionRow", "model_history", "model_index"]

STATES = ("active", "superseded", "retired", "built")


@dataclass(frozen=True)
class ModelVersionRow:
    """One model version in the index."""

    model: str
    version: int
    state: str  # one of STATES
    profiles: dict[str, dict[str, Any]]  # profile -> build facts (empty: no build recorded)
    devices: list[str]  # devices running it
    groups: dict[str, int]  # group -> devices of it running this version ("" : unassigned)
    previous_on: list[str]  # devices keeping it for a rollback
    built_at: datetime | None
    last_command: dict[str, Any] | None = None  # the latest command naming this version
    signers: list[str] = field(default_factory=list)  # key ids that signed its bundles

    def to_json(self) -> dict[str, Any]:
        """JSON-ready, with ISO 8601 UTC times (``models --json``)."""
        return {
            "model": self.model, "version": self.version, "state": self.state,
            "profiles": self.profiles, "devices": self.devices, "groups": self.groups,
            "previous_on": self.previous_on, "signers": self.signers,
            "built_at": None if self.built_at is None else ts(self.built_at),
            "last_command": self.last_command,
        }  # fmt: skip


def model_history(store: FleetStore, name: str) -> list[AuditEntry]:
    """Every audit entry about model ``name``, oldest first: its builds, the commands issued for
    it, the devices' outcomes, rollout decisions and policy actions. Raises StoreError."""
    return audit.entries(store, model=name)


def _command_summary(e: AuditEntry) -> dict[str, Any]:
    p = e.payload
    return {"seq": e.seq, "at": ts(e.at), "kind": p.get("kind"), "job_id": p.get("job_id"),
            "target": p.get("target"), "key_id": e.key_id}  # fmt: skip


def model_index(store: FleetStore) -> list[ModelVersionRow]:
    """Every model version the audit trail or a device knows of, by model then version.

    Raises:
        StoreError: the store cannot be read.
    """
    builds: dict[tuple[str, int], AuditEntry] = {}
    commands: dict[str, list[AuditEntry]] = {}
    for kind in ("build", "command"):
        for e in audit.entries(store, kind=kind):
            if e.model is None:
                continue
            if kind == "build" and e.version is not None:
                builds[(e.model, e.version)] = e  # the latest build of a version wins
            elif kind == "command":
                commands.setdefault(e.model, []).append(e)
    running: dict[tuple[str, int], list[tuple[str, list[str]]]] = {}
    kept: dict[tuple[str, int], list[str]] = {}
    for device in store.devices():
        assigned = device.assigned or [""]
        for name, m in device.models.items():
            if isinstance(m.get("active"), int):
                running.setdefault((name, m["active"]), []).append((device.device, assigned))
            if isinstance(m.get("previous"), int):
                kept.setdefault((name, m["previous"]), []).append(device.device)
    deployed = {
        (e.model, e.version)
        for es in commands.values()
        for e in es
        if e.payload.get("kind") == "deploy" and e.model is not None and e.version is not None
    }
    keys = set(builds) | set(running) | set(kept) | deployed
    rows = []
    for model, version in sorted(keys, key=lambda k: (k[0], k[1])):
        on = running.get((model, version), [])
        groups: dict[str, int] = {}
        for _device, names in on:
            for g in names:
                groups[g] = groups.get(g, 0) + 1
        newer = any(m == model and v > version for (m, v) in set(running) | deployed)
        build = builds.get((model, version))
        profiles = dict(build.payload.get("profiles", {})) if build else {}
        mine = [e for e in commands.get(model, []) if e.version in (None, version)]
        if on:
            state = "active"
        elif newer:
            state = "superseded"
        elif _ran(model, version, kept, commands):
            state = "retired"
        else:
            state = "built"
        signers = sorted({str(p["signer"]) for p in profiles.values() if p.get("signer")})
        rows.append(ModelVersionRow(
            model, version, state, profiles, sorted(d for d, _ in on), dict(sorted(groups.items())),
            sorted(kept.get((model, version), [])), build.at if build else None,
            _command_summary(mine[-1]) if mine else None, signers,
        ))  # fmt: skip
    return rows


def _ran(
    model: str, version: int, kept: dict[tuple[str, int], list[str]],
    commands: dict[str, list[AuditEntry]],
) -> bool:  # fmt: skip
    """Whether the version ran somewhere: a device keeps it as its previous version, or it was
    deployed and a rollback or retire of the model came after."""
    if kept.get((model, version)):
        return True
    seen_deploy = False
    for e in commands.get(model, []):
        kind = e.payload.get("kind")
        if kind == "deploy" and e.version == version:
            seen_deploy = True
        elif kind in ("rollback", "retire") and seen_deploy:
            return True
    return False
