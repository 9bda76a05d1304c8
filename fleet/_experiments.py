"""Experiments across the fleet: send their commands, compare their variants from the store.

An experiment is a signed command of kind ``experiment`` (edgepack.formats.commands: ``start``
with the candidate's version and bundles and the plan, ``promote``, ``stop``), published retained
on the model's job topic like a deploy (:func:`publish_experiment`). Devices then report it in
their telemetry (docs/protocol.md §16.3): each report's ``experiments`` list (the plan and, for a
shadow, the interval's agreement and the candidate's latency) and a ``variant`` on the per-version
figures, drift and quality reports.

:func:`experiment_rows` reads those reports from the collector's store, from the latest
experiment start of each model on, and sums them per device and fleet-wide into
:class:`ExperimentRow`: requests, errors and latency per variant, shadow agreement and output
error, the latest drift and quality status per variant. ``edgepack-fleet experiment status``
(edgepack.fleet._cli_experiment) prints them and the HTML report (edgepack.fleet._report) shows
them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from edgepack.fleet._broker import BrokerOptions
from edgepack.fleet._commands import Published, publish_retained
from edgepack.fleet._views import as_dict, dicts, number
from edgepack.formats.commands import (
    CommandKind,
    ExperimentAction,
    ExperimentSpec,
    make_command,
    read_command,
)
from edgepack.formats.exceptions import CommandError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

    from edgepack.fleet._database import FleetStore

__all__ = [
    "ExperimentRow",
    "VariantFigures",
    "experiment_rows",
    "latest_start",
    "publish_experiment",
    "rows_json",
]

FLEET = "(fleet)"  # the device column of the fleet-wide row
MAX_REPORTS = 20_000  # telemetry reports read per model


def publish_experiment(
    options: BrokerOptions,
    model: str,
    target: dict[str, str],
    key: ec.EllipticCurvePrivateKey,
    spec: ExperimentSpec,
    *,
    version: int | None = None,
    bundles: dict[str, dict[str, Any]] | None = None,
    ttl: dt.timedelta = dt.timedelta(days=7),
) -> Published:
    """Sign an experiment command and publish it retained on the target's job topic.

    Raises:
        BrokerError: the broker is unreachable or did not acknowledge.
        ValueError: a bad target, or a start/promote without what it needs.
    """
    job_id, envelope = make_command(
        CommandKind.EXPERIMENT, model, target, key, version=version, bundles=bundles, ttl=ttl,
        experiment=spec,
    )  # fmt: skip
    topic = publish_retained(options, model, target, envelope)
    return Published(job_id, topic, CommandKind.EXPERIMENT, model, dict(target), bundles or {})


@dataclass
class VariantFigures:
    """One variant's numbers over the experiment (summed over reports, and devices)."""

    version: int | None = None
    requests: int = 0
    errors: int = 0
    p50_ms: float | None = None  # request-weighted mean of the reports' p50 (an estimate)
    p95_ms: float | None = None
    drift: str | None = None  # the latest drift window's status
    quality: str | None = None  # the latest quality window's status
    _weighted: list[tuple[float, float, float]] = field(default_factory=list, repr=False)

    def add(self, entry: Mapping[str, Any]) -> None:
        requests = int(number(entry.get("requests")) or 0)
        self.requests += requests
        self.errors += int(sum(number(v) or 0 for v in as_dict(entry.get("errors")).values()))
        latency = as_dict(entry.get("latency_ms"))
        p50, p95 = number(latency.get("p50")), number(latency.get("p95"))
        if p50 is not None and p95 is not None and requests:
            self._weighted.append((requests, p50, p95))
        self._settle()

    def merge(self, other: VariantFigures) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self._weighted += other._weighted
        self._settle()
        self.drift = _worse(self.drift, other.drift)
        self.quality = _worse(self.quality, other.quality)

    def _settle(self) -> None:
        total = sum(w for w, _, _ in self._weighted)
        if total:
            self.p50_ms = round(sum(w * p for w, p, _ in self._weighted) / total, 4)
            self.p95_ms = round(sum(w * p for w, _, p in self._weighted) / total, 4)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


@dataclass
class ShadowFigures:
    """A shadow's comparison summed over reports: agreement, output error, candidate latency."""

    offered: int = 0
    dropped: int = 0
    compared: int = 0
    rows: int = 0
    agreed_rows: int | None = None
    errors: int = 0
    abs_error: float = 0.0
    max_abs_error: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    _weighted: list[tuple[float, float, float]] = field(default_factory=list, repr=False)

    def add(self, shadow: Mapping[str, Any]) -> None:
        rows = int(number(shadow.get("rows")) or 0)
        for name in ("offered", "dropped", "compared", "errors"):
            setattr(self, name, getattr(self, name) + int(number(shadow.get(name)) or 0))
        self.rows += rows
        agreed = number(shadow.get("agreed_rows"))
        if agreed is not None:
            self.agreed_rows = (self.agreed_rows or 0) + int(agreed)
        mean = number(shadow.get("mean_abs_error"))
        if mean is not None:
            self.abs_error += mean * rows
        worst = number(shadow.get("max_abs_error"))
        if worst is not None:
            self.max_abs_error = max(self.max_abs_error or 0.0, worst)
        latency = as_dict(shadow.get("latency_ms"))
        p50, p95 = number(latency.get("p50")), number(latency.get("p95"))
        compared = int(number(shadow.get("compared")) or 0)
        if p50 is not None and p95 is not None and compared:
            self._weighted.append((compared, p50, p95))
        self._settle()

    def merge(self, other: ShadowFigures) -> None:
        for name in ("offered", "dropped", "compared", "rows", "errors"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        if other.agreed_rows is not None:
            self.agreed_rows = (self.agreed_rows or 0) + other.agreed_rows
        self.abs_error += other.abs_error
        if other.max_abs_error is not None:
            self.max_abs_error = max(self.max_abs_error or 0.0, other.max_abs_error)
        self._weighted += other._weighted
        self._settle()

    def _settle(self) -> None:
        total = sum(w for w, _, _ in self._weighted)
        if total:
            self.p50_ms = round(sum(w * p for w, p, _ in self._weighted) / total, 4)
            self.p95_ms = round(sum(w * p for w, _, p in self._weighted) / total, 4)

    @property
    def agreement(self) -> float | None:
        if self.agreed_rows is None or not self.rows:
            return None
        return self.agreed_rows / self.rows

    @property
    def mean_abs_error(self) -> float | None:
        return self.abs_error / self.rows if self.rows else None

    def to_json(self) -> dict[str, Any]:
        body = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        del body["abs_error"]
        return {**body, "agreement": self.agreement, "mean_abs_error": self.mean_abs_error}


@dataclass
class ExperimentRow:
    """One device's experiment on one model (``device`` :data:`FLEET`: all devices summed)."""

    device: str
    model: str
    mode: str
    share: float | None
    sample: float | None
    active_version: int | None
    candidate_version: int | None
    running: bool  # named in the device's latest telemetry report
    last_report: dt.datetime | None
    active: VariantFigures = field(default_factory=VariantFigures)
    candidate: VariantFigures = field(default_factory=VariantFigures)
    shadow: ShadowFigures | None = None
    devices: int = 1

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "model": self.model,
            "mode": self.mode,
            "share": self.share,
            "sample": self.sample,
            "active_version": self.active_version,
            "candidate_version": self.candidate_version,
            "running": self.running,
            "last_report": None if self.last_report is None else self.last_report.isoformat(),
            "devices": self.devices,
            "active": self.active.to_json(),
            "candidate": self.candidate.to_json(),
            "shadow": None if self.shadow is None else self.shadow.to_json(),
        }


_SEVERITY = {"ok": 0, "warning": 1, "drift": 2, "degraded": 2}


def _worse(a: str | None, b: str | None) -> str | None:
    if a is None or b is None:
        return a or b
    return a if _SEVERITY.get(a, 3) >= _SEVERITY.get(b, 3) else b


def latest_start(
    store: FleetStore, model: str, target: Mapping[str, str] | None = None
) -> tuple[dt.datetime, int | None] | None:
    """When the latest experiment on ``model`` (started on ``target``, when given: a device or
    a group) was started, and its candidate; None if never."""
    for job in store.jobs(model, limit=200):
        if job.kind != CommandKind.EXPERIMENT.value:
            continue
        if target is not None and {job.target_type: job.target} != dict(target):
            continue
        try:
            spec = read_command(job.envelope, None).experiment
        except CommandError:
            continue
        if spec is not None and spec.action is ExperimentAction.START:
            return job.issued_at, job.version
    return None


def _models(store: FleetStore, model: str | None) -> list[str]:
    if model is not None:
        return [model]
    names = {j.model for j in store.jobs(None, limit=500) if j.kind == CommandKind.EXPERIMENT.value}
    return sorted(names)


def experiment_rows(
    store: FleetStore, model: str | None = None, group: str | None = None
) -> list[ExperimentRow]:
    """Each device's experiment per model (since that model's latest experiment start), then
    one fleet-wide row (device :data:`FLEET`) per model and plan (mode, share or sample,
    candidate) that more than one device reports.

    Args:
        store: the collector's store.
        model: one model (default: every model an experiment was started on).
        group: only devices in this group.
    """
    scope = None if group is None else {d.device for d in store.devices(group)}
    out: list[ExperimentRow] = []
    for name in _models(store, model):
        started = latest_start(store, name)
        if started is None:
            continue
        since, _candidate = started
        rows = _device_rows(store, name, since, scope)
        out += rows
        # devices running the same plan are summed; a split is never summed with a shadow (or
        # with another share or candidate), whose figures mean something else
        plans: dict[tuple[Any, ...], list[ExperimentRow]] = {}
        for row in rows:
            plan = (row.mode, row.share, row.sample, row.candidate_version)
            plans.setdefault(plan, []).append(row)
        out += [_fleet_row(name, same) for same in plans.values() if len(same) > 1]
    return out


def _device_rows(
    store: FleetStore, model: str, since: dt.datetime, scope: set[str] | None
) -> list[ExperimentRow]:
    rows: dict[str, ExperimentRow] = {}
    latest: dict[str, dt.datetime] = {}
    for device, at, payload in store.events("telemetry", since=since, limit=MAX_REPORTS):
        if scope is not None and device not in scope:
            continue
        mine = [e for e in dicts(payload.get("experiments")) if e.get("model") == model]
        latest[device] = at  # events come oldest first
        if not mine:
            if device in rows:
                rows[device].running = False
            continue
        entry = mine[0]
        row = rows.get(device)
        plan = (entry.get("candidate"), entry.get("mode"), entry.get("share"), entry.get("sample"))
        if row is None or plan != (row.candidate_version, row.mode, row.share, row.sample):
            # a new experiment (commands are stamped to the second: reports of the one before
            # may be received in the second the new one was issued)
            row = rows[device] = ExperimentRow(
                device, model, str(entry.get("mode")), number(entry.get("share")),
                number(entry.get("sample")), _int(entry.get("active")),
                _int(entry.get("candidate")), True, at,
                shadow=ShadowFigures() if entry.get("mode") == "shadow" else None,
            )  # fmt: skip
        row.running, row.last_report = True, at
        row.active_version = _int(entry.get("active"))
        if row.shadow is not None:
            row.shadow.add(as_dict(entry.get("shadow")))
        for figures in dicts(payload.get("models")):
            if figures.get("model") != model:
                continue
            version = _int(figures.get("version"))
            if version == row.candidate_version:
                row.candidate.add(figures)
            elif version == row.active_version:
                row.active.add(figures)
    for device, row in rows.items():
        row.last_report = latest.get(device, row.last_report)
        row.active.version, row.candidate.version = row.active_version, row.candidate_version
        for kind in ("drift", "quality"):
            for _d, _at, payload in store.events(kind, device=device, since=since, limit=200):
                if payload.get("model") != model:
                    continue
                version, status = _int(payload.get("version")), payload.get("status")
                status = status if isinstance(status, str) else None
                target = (
                    row.candidate
                    if version == row.candidate_version
                    else row.active
                    if version == row.active_version
                    else None
                )
                if target is not None:
                    setattr(target, kind, status)  # oldest first: the latest wins
    return [rows[d] for d in sorted(rows)]


def _fleet_row(model: str, rows: list[ExperimentRow]) -> ExperimentRow:
    first = rows[0]
    fleet = ExperimentRow(
        FLEET, model, first.mode, first.share, first.sample, first.active_version,
        first.candidate_version, any(r.running for r in rows),
        max((r.last_report for r in rows if r.last_report), default=None),
        shadow=ShadowFigures() if any(r.shadow for r in rows) else None, devices=len(rows),
    )  # fmt: skip
    for row in rows:
        fleet.active.merge(row.active)
        fleet.candidate.merge(row.candidate)
        if row.shadow is not None and fleet.shadow is not None:
            fleet.shadow.merge(row.shadow)
    fleet.active.version, fleet.candidate.version = first.active_version, first.candidate_version
    return fleet


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def rows_json(rows: list[ExperimentRow]) -> list[dict[str, Any]]:
    """The rows as JSON-ready objects (``experiment status --json``)."""
    return [row.to_json() for row in rows]
