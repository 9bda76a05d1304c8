"""What the fleet's tables show: the collector's store, read back as rows for people to read.

The collector keeps device state, job progress, and every telemetry and drift report as events
(edgepack.fleet._database). This module reads them back and shapes them into the rows that both
the CLI tables (edgepack.fleet._cli) and the HTML report (edgepack.fleet._report) show:

* :func:`telemetry_rows`: one row per (device, model, version) from the latest telemetry report
  that carries it, with the p95 latency of the last reports as a trend (:func:`sparkline`);
* :func:`drift_rows`: one row per (device, model) from its latest drift window, with the statuses
  of the windows before it (:data:`STATUS_GLYPHS`);
* :func:`job_progress`: every device a job should reach, with its execution if it reported one;
  :func:`job_summaries`: one line per job for ``jobs list`` (its state, devices per status);
* :func:`ago`, :func:`installed_models`, :func:`milliseconds`: the text of single cells.

Everything here is a pure function of what the store returns: no rendering (rich markup and HTML
belong to the callers), and no wall-clock read, so a relative age takes ``now`` from the caller,
which gets it from its clock. Reports come from devices, so every field is read defensively
(:func:`number`, :func:`as_dict`, :func:`dicts`): a malformed payload loses a cell, never the
table.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from edgepack.formats.messages import TERMINAL

if TYPE_CHECKING:
    from edgepack.fleet._database import ExecutionRow, FleetStore, JobControlRow, JobRow

__all__ = [
    "SPARKS",
    "STATUS_GLYPHS",
    "DriftRow",
    "JobProgress",
    "Reports",
    "TelemetryRow",
    "ago",
    "as_dict",
    "dicts",
    "drift_row",
    "drift_rows",
    "drift_series",
    "feature_ratio",
    "installed_models",
    "JobSummary",
    "job_devices",
    "job_progress",
    "job_state",
    "job_summaries",
    "latest_reports",
    "milliseconds",
    "number",
    "sparkline",
    "telemetry_rows",
    "unix_moment",
]

SPARKS = "▁▂▃▄▅▆▇█"
STATUS_GLYPHS = {"ok": "·", "warning": "!", "drift": "✗"}
_UTC = timezone.utc

Reports = list[tuple[datetime, dict[str, Any]]]
"""(received at, payload) of one device's (or one device and model's) reports, oldest first."""


@dataclass(frozen=True)
class TelemetryRow:
    """One model version on one device, from the latest telemetry report that carries it."""

    device: str
    model: str
    version: Any
    requests: int
    errors: dict[str, int]
    p50: float | None  # milliseconds
    p95: float | None
    p99: float | None
    rss_mib: float | None
    seen: datetime  # when the collector received that report
    trend: list[float] = field(default_factory=list)  # p95 of the last reports, oldest first


@dataclass(frozen=True)
class DriftRow:
    """One model on one device, from its latest drift window."""

    device: str
    model: str
    version: Any
    status: str
    n: int
    window_end: datetime | None
    drifting: list[str]
    alarms: list[str]  # features over their threshold in this window (drifting or not)
    worst: str | None  # the feature with the highest KS / threshold
    worst_ks: float | None
    worst_threshold: float | None
    seen: datetime
    history: list[str] = field(default_factory=list)  # statuses of the last windows, oldest first
    payload: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def worst_ratio(self) -> float | None:
        """The worst feature's KS statistic over its threshold (above 1.0: an alarm)."""
        return _ratio(self.worst_ks, self.worst_threshold)

    @property
    def worst_text(self) -> str | None:
        """``"NAME KS/THRESHOLD"`` of the worst feature (three decimals); None without one."""
        ks, threshold = self.worst_ks, self.worst_threshold
        if self.worst is None or ks is None or threshold is None or self.worst_ratio is None:
            return None
        return f"{self.worst} {ks:.3f}/{threshold:.3f}"


@dataclass(frozen=True)
class JobProgress:
    """Where a job stands: every device it should reach, with its execution if it reported."""

    job_id: str
    title: str  # e.g. "deploy churn v2 → group eu" (the job id when the job is unknown)
    devices: list[tuple[str, ExecutionRow | None]]  # by device name
    done: bool  # every device reached has a terminal status (and there is at least one)
    job: JobRow | None = None  # None: the store has no such job
    control: JobControlRow | None = None  # its timeout and cancellation, if it has any


JOB_STATES = ("active", "done", "canceled", "expired")
"""A job's state as a whole (``jobs list --state``): ``canceled`` by the operator; ``done`` when
every device it reaches has a terminal status; ``expired`` when its command expired first;
``active`` otherwise."""


@dataclass(frozen=True)
class JobSummary:
    """One job for ``jobs list``: what it asks, its state and how many devices are where."""

    job: JobRow
    state: str  # one of JOB_STATES
    counts: dict[str, int]  # status (or "waiting": no update yet) -> devices
    control: JobControlRow | None


# -- reading reports defensively ---------------------------------------------------------------


def number(value: Any) -> float | None:
    """``value`` as a finite float, or None when it is not a (finite) number (or is a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def as_dict(value: Any) -> dict[str, Any]:
    """``value`` when it is a dict, else an empty one."""
    return value if isinstance(value, dict) else {}


def dicts(value: Any) -> list[dict[str, Any]]:
    """The dicts in ``value`` when it is a list (other items dropped), else an empty list."""
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def unix_moment(unix: Any) -> datetime | None:
    """A Unix time (seconds) as an aware UTC datetime; None when it is not a usable number."""
    seconds = number(unix)
    try:
        return None if seconds is None else datetime.fromtimestamp(seconds, _UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _ratio(ks: float | None, threshold: float | None) -> float | None:
    if ks is None or threshold is None or threshold <= 0:
        return None
    return ks / threshold


def feature_ratio(feature: Mapping[str, Any]) -> float | None:
    """A drift report feature's KS statistic over its threshold (above 1.0: an alarm).

    Args:
        feature: one entry of a drift report's ``features``.

    Returns:
        The ratio, or None when the feature lacks a usable statistic or threshold.
    """
    return _ratio(number(feature.get("ks")), number(feature.get("threshold")))


# -- rows --------------------------------------------------------------------------------------


def latest_reports(
    store: FleetStore,
    kind: str,
    group: str | None,
    per_device: int,
    since: datetime | None = None,
) -> dict[str, Reports]:
    """The latest reports of each device in scope (received from ``since`` on), oldest first.

    Args:
        store: the collector's store.
        kind: ``"telemetry"`` or ``"drift"``.
        group: only this group's devices; without one, the devices the store knows plus any that
            sent a recent report without a state.
        per_device: reports per model a device runs (reports of all its models interleave).
        since: only reports received from then on.

    Returns:
        Device name -> its reports, by device name; payloads that are not objects are dropped.
    """
    known = {d.device: max(1, len(d.models)) for d in store.devices(group)}
    if group is None:
        for name, _at, _payload in store.events(kind, since=since, limit=1000):
            known.setdefault(name, 1)
    found = {}
    for name, count in sorted(known.items()):
        events = store.events(kind, device=name, since=since, limit=per_device * count)
        found[name] = [(at, payload) for _name, at, payload in events if isinstance(payload, dict)]
    return found


def telemetry_rows(
    store: FleetStore,
    *,
    group: str | None = None,
    model: str | None = None,
    version: Any = None,
    history: int = 20,
) -> list[TelemetryRow]:
    """One row per (device, model, version) seen in the last ``history`` telemetry reports.

    Args:
        store: the collector's store.
        group: only this group's devices.
        model: only this model.
        version: only this model version.
        history: telemetry reports read per device (and model); their p95 is the trend.

    Returns:
        The rows, by device, then model, then version.
    """
    rows = []
    for device, reports in latest_reports(store, "telemetry", group, history).items():
        series: dict[tuple[str, Any], list[tuple[datetime, dict[str, Any], dict[str, Any]]]] = {}
        for at, payload in reports[-history:]:  # one report covers all of a device's models
            for entry in dicts(payload.get("models")):
                name = entry.get("model")
                if not isinstance(name, str) or (model is not None and name != model):
                    continue
                if version is not None and entry.get("version") != version:
                    continue
                series.setdefault((name, entry.get("version")), []).append((at, payload, entry))
        order = sorted(
            series.items(), key=lambda kv: (kv[0][0], number(kv[0][1]) or 0, str(kv[0][1]))
        )
        for (name, ver), points in order:
            at, payload, entry = points[-1]
            latency, errors = as_dict(entry.get("latency_ms")), as_dict(entry.get("errors"))
            rss = number(payload.get("rss_bytes"))
            trend = [number(as_dict(e.get("latency_ms")).get("p95")) for _a, _p, e in points]
            rows.append(
                TelemetryRow(
                    device=device,
                    model=name,
                    version=ver,
                    requests=int(number(entry.get("requests")) or 0),
                    errors={str(k): int(v) for k, v in errors.items() if number(v)},
                    p50=number(latency.get("p50")),
                    p95=number(latency.get("p95")),
                    p99=number(latency.get("p99")),
                    rss_mib=None if rss is None else rss / 2**20,
                    seen=at,
                    trend=[v for v in trend if v is not None],
                )
            )
    return rows


def drift_row(device: str, at: datetime, payload: dict[str, Any], history: list[str]) -> DriftRow:
    """The row of one drift report.

    Args:
        device: the device that sent it.
        at: when the collector received it.
        payload: the report.
        history: statuses of the windows up to this one, oldest first.

    Returns:
        The row; fields the payload lacks or garbles are ``"?"``, 0, None or empty.
    """
    features = [f for f in dicts(payload.get("features")) if isinstance(f.get("name"), str)]
    scored = [(r, f) for f in features if (r := feature_ratio(f)) is not None]
    worst = max(scored, key=lambda rf: rf[0])[1] if scored else None
    status = payload.get("status")
    return DriftRow(
        device=device,
        model=str(payload.get("model")),
        version=payload.get("version"),
        status=status if isinstance(status, str) else "?",
        n=int(number(payload.get("n")) or 0),
        window_end=unix_moment(payload.get("window_end")),
        drifting=[f["name"] for f in features if f.get("drifting") is True],
        alarms=[f["name"] for f in features if f.get("alarm") is True],
        worst=worst["name"] if worst else None,
        worst_ks=number(worst.get("ks")) if worst else None,
        worst_threshold=number(worst.get("threshold")) if worst else None,
        seen=at,
        history=history,
        payload=payload,
    )


def multivariate_text(payload: Mapping[str, Any]) -> str | None:
    """The multivariate (all features together) part of a drift report, in a few words:
    ``"alarm NAME V/THR"`` (the statistic furthest over its threshold), ``"drifting ..."`` or
    ``"ok NAME V/THR"``; None when the report has none (older agents)."""
    mv = payload.get("multivariate")
    if not isinstance(mv, dict):
        return None
    stats = [x for x in dicts(mv.get("statistics")) if isinstance(x.get("name"), str)]
    scored = [
        (v / t if t else 0.0, x)
        for x in stats
        if (v := number(x.get("value"))) is not None and (t := number(x.get("threshold")))
    ]
    top = max(scored, key=lambda rx: rx[0])[1] if scored else (stats[0] if stats else None)
    word = "drifting" if mv.get("drifting") is True else "alarm" if mv.get("alarm") else "ok"
    if top is None:
        return word
    value, threshold = number(top.get("value")), number(top.get("threshold"))
    figure = "" if value is None else f" {value:.3g}"
    if value is not None and threshold is not None:
        figure += f"/{threshold:.3g}"
    return f"{word} {top['name']}{figure}"


def quality_text(payload: Mapping[str, Any] | None) -> str | None:
    """A quality report in a few words: its status and metrics (``"degraded accuracy 0.71
    (ref 0.90)"``, estimates marked ``~``); None without a report."""
    if not payload:
        return None
    status = payload.get("status")
    metrics = as_dict(payload.get("metrics"))
    reference = as_dict(payload.get("reference"))
    parts = [status if isinstance(status, str) else "?"]
    for name, value in sorted(metrics.items()):
        v = number(value)
        if v is None:
            continue
        mark = "~" if payload.get("estimated") is True and not payload.get("labeled") else ""
        ref = number(reference.get(name))
        parts.append(f"{name} {mark}{v:.3g}" + ("" if ref is None else f" (ref {ref:.3g})"))
    return " ".join(parts)


def latest_quality(store: FleetStore, group: str | None = None) -> dict[tuple[str, str], Any]:
    """The latest quality report of each ``(device, model)`` in scope."""
    found: dict[tuple[str, str], Any] = {}
    for device, reports in latest_reports(store, "quality", group, per_device=2).items():
        for _at, payload in reports:  # oldest first: the latest wins
            if isinstance(payload.get("model"), str):
                found[(device, payload["model"])] = payload
    return found


def drift_series(
    store: FleetStore,
    group: str | None,
    model: str | None,
    version: Any,
    history: int,
    since: datetime | None = None,
) -> dict[tuple[str, str], Reports]:
    """The last ``history`` drift reports of each (device, model) in scope, oldest first.

    Args:
        store: the collector's store.
        group: only this group's devices.
        model: only this model.
        version: only the (device, model) pairs whose latest window is of this version.
        history: reports kept per (device, model).
        since: only reports received from then on.

    Returns:
        (device, model) -> its reports, by device and model.
    """
    series: dict[tuple[str, str], Reports] = {}
    for device, reports in latest_reports(store, "drift", group, history, since).items():
        for at, payload in reports:
            name = payload.get("model")
            if isinstance(name, str) and (model is None or name == model):
                series.setdefault((device, name), []).append((at, payload))
    if version is not None:  # a (device, model) shows when its latest window is of that version
        series = {k: v for k, v in series.items() if v[-1][1].get("version") == version}
    return {k: v[-history:] for k, v in sorted(series.items())}


def drift_rows(
    store: FleetStore,
    *,
    group: str | None = None,
    model: str | None = None,
    version: Any = None,
    history: int = 12,
) -> list[DriftRow]:
    """One row per (device, model) from its latest drift window; ``history`` windows of trend.

    Args:
        store: the collector's store.
        group: only this group's devices.
        model: only this model.
        version: only (device, model) pairs whose latest window is of this version.
        history: windows whose statuses make the trend.

    Returns:
        The rows, by device and model.
    """
    rows = []
    for (device, _name), reports in drift_series(store, group, model, version, history).items():
        statuses = [str(p.get("status", "?")) for _at, p in reports]
        rows.append(drift_row(device, *reports[-1], statuses))
    return rows


def job_progress(store: FleetStore, job_id: str) -> JobProgress:
    """Every device a job should reach (its target, and any that reported), with its execution.

    Args:
        store: the collector's store.
        job_id: the job.

    Returns:
        The progress; an unknown job lists the devices that reported on it (if any).
    """
    job = store.job(job_id)
    executions = {e.device: e for e in store.executions(job_id)}
    expected: set[str] = set(executions)
    if job is not None:
        expected |= set(job_devices(store, job))
    title = job_id
    control = store.job_controls([job_id]).get(job_id)
    if job is not None:
        version = f" v{job.version}" if job.version is not None else ""
        title = f"{job.kind} {job.model}{version} → {job.target_type} {job.target}"
        if control is not None and control.canceled_at is not None:
            title += " (canceled)"
    devices = [(device, executions.get(device)) for device in sorted(expected)]
    done = bool(devices) and all(e is not None and e.status in TERMINAL for _d, e in devices)
    return JobProgress(job_id, title, devices, done, job, control)


def job_devices(store: FleetStore, job: JobRow) -> list[str]:
    """The devices a job addresses now: its device, or its group's (assigned or declared)."""
    if job.target_type == "device":
        return [job.target]
    return [d.device for d in store.devices(job.target)]


def job_state(job: JobRow, control: JobControlRow | None, done: bool, now: datetime) -> str:
    """The job's state as a whole, one of :data:`JOB_STATES`."""
    if control is not None and control.canceled_at is not None:
        return "canceled"
    if done:
        return "done"
    return "expired" if job.expires_at <= now else "active"


def job_summaries(
    store: FleetStore,
    now: datetime,
    *,
    model: str | None = None,
    since: datetime | None = None,
    limit: int = 50,
) -> list[JobSummary]:
    """The newest jobs (of ``model``, issued from ``since`` on), each with its state and the
    number of devices per status (``waiting``: addressed, no update yet)."""
    jobs = store.jobs(model, limit, since)
    controls = store.job_controls([j.job_id for j in jobs])
    found = []
    for job in jobs:
        progress = job_progress(store, job.job_id)
        counts: dict[str, int] = {}
        for _device, e in progress.devices:
            status = "waiting" if e is None else str(e.status)
            counts[status] = counts.get(status, 0) + 1
        control = controls.get(job.job_id)
        state = job_state(job, control, progress.done, now)
        found.append(JobSummary(job, state, counts, control))
    return found


# -- cells -------------------------------------------------------------------------------------


def sparkline(values: Iterable[float]) -> str:
    """``▁▂▃▄▅▆▇█`` for a series, scaled between its own minimum and maximum.

    Args:
        values: the series, oldest first.

    Returns:
        One character per value (all ``▄`` for a flat series); empty for no values.
    """
    points = list(values)
    if not points:
        return ""
    low, high = min(points), max(points)
    if high - low <= 1e-12 * max(1.0, abs(high)):
        return SPARKS[3] * len(points)
    return "".join(SPARKS[round((v - low) / (high - low) * (len(SPARKS) - 1))] for v in points)


def ago(moment: datetime | None, now: datetime) -> str:
    """How long before ``now`` ``moment`` was, in its largest whole unit: ``"12m ago"``.

    Args:
        moment: the past moment (aware); None gives ``"-"``.
        now: the current moment, from the caller's clock.

    Returns:
        ``"Ns ago"`` under a minute (``"0s ago"`` for a moment after ``now``), else whole minutes,
        hours or days.
    """
    if moment is None:
        return "-"
    seconds = int((now - moment).total_seconds())
    if seconds < 60:
        return f"{max(seconds, 0)}s ago"
    if seconds < 3600:
        return f"{seconds // 60}m ago"
    return f"{seconds // 3600}h ago" if seconds < 86400 else f"{seconds // 86400}d ago"


def installed_models(models: Mapping[str, Any]) -> str:
    """A device's installed models as ``"churn@2 (prev 1), fraud@1"``; ``"-"`` for none.

    Args:
        models: the device state's models (name -> ``{"active": ..., "previous": ...}``).

    Returns:
        The installed (active) models by name, each with its retained previous version.
    """
    shown = []
    for name, entry in sorted(models.items()):
        state = as_dict(entry)
        if state.get("active") is None:
            continue
        previous = f" (prev {state['previous']})" if state.get("previous") else ""
        shown.append(f"{name}@{state.get('active')}{previous}")
    return ", ".join(shown) or "-"


def milliseconds(value: float | None) -> str:
    """A latency in milliseconds with two decimals; ``"-"`` for None."""
    return "-" if value is None else f"{value:.2f}"
