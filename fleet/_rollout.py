"""Staged rollouts, the judging half: stages, abort conditions, the plan and the figures.

A staged rollout (``edgepack-fleet rollout start``) deploys a model version to a group in
stages (``1%,10%,50%,100%``, or explicit device lists) and, after each stage, compares the new
version on the devices already upgraded with the old version on the rest, from what the
collector stored (:mod:`edgepack.fleet._collector`): job outcomes, telemetry, drift and quality
reports. This module holds everything that decides *what* happens, as pure functions:

* :func:`parse_stages`, :func:`parse_duration`, :func:`parse_condition`: the operator's words
  (``10%``, ``cam-1+cam-7``, ``10m``, ``p95_latency>1.2x``), each refused with a clear error;
* :func:`plan`: which stage each device is in: per device profile, the stage's share of that
  profile's devices (at least one), picked in the order of ``sha256(rollout id : device)``, so
  the same rollout always picks the same devices and every profile is in the first stage;
* :func:`measure`: the figures of a rollout now (jobs, and the new vs the old version over a
  window), read from the store;
* :func:`evaluate`: which abort conditions those figures trigger.

:mod:`edgepack.fleet._rollout_controller` is the other half: the state machine that acts on
these decisions (sends the commands, records every decision, holds the lease). Figures are
plain JSON-ready dicts, recorded with each decision as they were.
"""

from __future__ import annotations

import hashlib
import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from edgepack.fleet._views import as_dict, dicts, number
from edgepack.fleet.exceptions import RolloutError
from edgepack.formats.messages import TERMINAL, JobStatus
from edgepack.formats.topics import NAME

if TYPE_CHECKING:
    from edgepack.fleet._database import FleetStore, RolloutDeviceRow, RolloutRow

__all__ = [
    "METRICS",
    "Condition",
    "Stage",
    "evaluate",
    "measure",
    "parse_condition",
    "parse_duration",
    "parse_stages",
    "plan",
]

METRICS = {
    "failed": "share of the devices staged so far whose deploy did not succeed (failed, "
    "rejected, timed out, canceled, or no answer within the job timeout)",
    "error_rate": "failed requests / requests of the new version on the upgraded devices",
    "p95_latency": "p95 latency (ms) of the new version, request-weighted over the reports",
    "drift_share": "share of the upgraded devices with a drift window of the new version whose "
    "latest window says drift",
    "accuracy": "accuracy of the new version (labeled windows, else the estimate)",
    "f1": "macro F1 of the new version (labeled windows)",
    "mae": "mean absolute error of the new version (labeled windows, regression)",
}
_SHARES = {"failed", "error_rate", "drift_share", "accuracy", "f1"}  # a % makes sense
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt,
}  # fmt: skip
_CONDITION = re.compile(r"^\s*([a-z_0-9]+)\s*(>=|<=|>|<)\s*([0-9]*\.?[0-9]+)\s*([x%]?)\s*$")
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_FAILED = "failed"


@dataclass(frozen=True)
class Stage:
    """One stage: a cumulative share of each profile's devices, or explicit devices."""

    percent: float | None = None
    devices: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"percent": self.percent} if self.percent is not None else {"devices": self.devices}

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Stage:
        if value.get("percent") is not None:
            return cls(percent=float(value["percent"]))
        return cls(devices=tuple(value.get("devices") or ()))

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else "+".join(self.devices)


@dataclass(frozen=True)
class Condition:
    """``metric op value[x|%]``: an abort condition. ``x``: a ratio of the new version's figure
    to the old one's; ``%``: a share (divided by 100); no suffix: the figure itself."""

    metric: str
    op: str
    value: float
    unit: str  # "", "%" or "x"

    def __str__(self) -> str:
        shown = self.value * 100 if self.unit == "%" else self.value
        return f"{self.metric}{self.op}{shown:g}{self.unit}"


def parse_stages(text: str) -> list[Stage]:
    """``"1%,10%,50%,100%"`` or ``"cam-1+cam-7,50%,100%"`` as stages.

    Raises:
        RolloutError: an empty stage, a share outside (0, 100], shares that do not grow, or a
            device name that is not one (the message names the stage).
    """
    stages, last = [], 0.0
    for part in (p.strip() for p in text.split(",")):
        if not part:
            raise RolloutError(f"--stages {text!r} has an empty stage; e.g. 1%,10%,50%,100%")
        if part.endswith("%"):
            try:
                share = float(part[:-1])
            except ValueError:
                raise RolloutError(f"stage {part!r} is not a percentage such as 10%") from None
            if not 0 < share <= 100:
                raise RolloutError(f"stage {part!r}: a share must be above 0% and at most 100%")
            if share <= last:
                raise RolloutError(
                    f"stage {part!r}: shares are cumulative and must grow ({last:g}% before it)"
                )
            stages.append(Stage(percent=share))
            last = share
            continue
        names = tuple(n.strip() for n in part.split("+"))
        bad = [n for n in names if not NAME.match(n)]
        if bad:
            raise RolloutError(
                f"stage {part!r}: {bad[0]!r} is neither a share (10%) nor a device name; "
                "list devices as cam-1+cam-7"
            )
        stages.append(Stage(devices=names))
    return stages


def parse_duration(text: str) -> float:
    """``"10m"``, ``"30s"``, ``"1h"``, ``"0"`` as seconds.

    Raises:
        RolloutError: not a number with an optional unit (ms, s, m, h, d).
    """
    match = _DURATION.match(text)
    if match is None:
        raise RolloutError(f"{text!r} is not a duration; use e.g. 30s, 10m, 1h")
    return float(match[1]) * _UNITS[match[2]]


def parse_condition(text: str) -> Condition:
    """``"failed>2%"``, ``"p95_latency>1.2x"``, ``"drift_share>0.3"`` as a :class:`Condition`.

    Raises:
        RolloutError: not ``metric op value[x|%]``, an unknown metric (the known ones are
            listed), a ratio of job failures (which have no old-version figure), or a share of a
            figure that is not one.
    """
    match = _CONDITION.match(text)
    if match is None:
        raise RolloutError(
            f"abort condition {text!r} is not METRIC OP VALUE[x|%], e.g. 'failed>2%', "
            "'p95_latency>1.2x', 'drift_share>0.3' (OP: > >= < <=)"
        )
    metric, op, value, unit = match.groups()
    if metric not in METRICS:
        raise RolloutError(
            f"abort condition {text!r}: unknown metric {metric!r}; known: {', '.join(METRICS)}"
        )
    if unit == "x" and metric == _FAILED:
        raise RolloutError(
            f"abort condition {text!r}: job failures have no old-version figure to compare "
            "with; give a share such as failed>2%"
        )
    if unit == "%" and metric not in _SHARES:
        raise RolloutError(
            f"abort condition {text!r}: {metric} is not a share; give a value or a ratio (1.2x)"
        )
    amount = float(value) / 100 if unit == "%" else float(value)
    return Condition(metric, op, amount, unit)


def _order(rollout_id: str, device: str) -> str:
    return hashlib.sha256(f"{rollout_id}:{device}".encode()).hexdigest()


def plan(
    rollout_id: str, profiles: Mapping[str, str], stages: Sequence[Stage]
) -> dict[str, int | None]:
    """The stage (index) of each device; None for a device that no stage reaches.

    Args:
        rollout_id: seeds the order (``sha256(rollout id : device)``).
        profiles: device -> its profile, for every device in the rollout's scope.
        stages: cumulative; a share stage takes ``ceil(share x n)`` (at least one) of each
            profile's ``n`` devices, counting those earlier stages took.

    Raises:
        RolloutError: an explicit stage names a device outside the scope.
    """
    chosen: dict[str, int | None] = dict.fromkeys(profiles)
    by_profile: dict[str, list[str]] = {}
    for device in sorted(profiles, key=lambda d: _order(rollout_id, d)):
        by_profile.setdefault(profiles[device], []).append(device)
    for index, stage in enumerate(stages):
        if stage.percent is None:
            unknown = [d for d in stage.devices if d not in profiles]
            if unknown:
                raise RolloutError(
                    f"stage {index + 1} names {unknown[0]!r}, which is not in the rollout's "
                    "group (or has never reported a state)"
                )
            for device in stage.devices:
                chosen[device] = index if chosen[device] is None else chosen[device]
            continue
        for members in by_profile.values():
            want = max(1, math.ceil(len(members) * stage.percent / 100 - 1e-9))
            have = sum(1 for d in members if chosen[d] is not None)
            for device in (d for d in members if chosen[d] is None):
                if have >= want:
                    break
                chosen[device], have = index, have + 1
    return chosen


# -- figures -----------------------------------------------------------------------------------


@dataclass
class _Side:
    """Sums for one side of the comparison (the new version or the old one)."""

    requests: int = 0
    errors: int = 0
    latency_weighted: float = 0.0
    latency_requests: int = 0
    devices: set[str] | None = None
    drift: dict[str, bool] | None = None  # device -> its latest window says drift
    quality: dict[str, dict[str, float]] | None = None  # device -> metric -> value

    def figures(self) -> dict[str, Any]:
        devices, drift, quality = self.devices or set(), self.drift or {}, self.quality or {}
        out: dict[str, Any] = {"devices": len(devices), "requests": self.requests}
        out["errors"] = self.errors
        out["error_rate"] = self.errors / self.requests if self.requests else None
        out["p95_latency"] = (
            self.latency_weighted / self.latency_requests if self.latency_requests else None
        )
        out["drift_devices"] = len(drift)
        out["drift_share"] = sum(drift.values()) / len(drift) if drift else None
        for metric in ("accuracy", "f1", "mae"):
            values = [q[metric] for q in quality.values() if metric in q]
            out[metric] = sum(values) / len(values) if values else None
        return out


def _quality(payload: Mapping[str, Any]) -> dict[str, float]:
    metrics = {k: v for k, v in as_dict(payload.get("metrics")).items() if number(v) is not None}
    estimated = number(as_dict(payload.get("estimated")).get("accuracy"))
    if "accuracy" not in metrics and estimated is not None:
        metrics["accuracy"] = estimated
    return {k: float(v) for k, v in metrics.items() if k in ("accuracy", "f1", "mae")}


def measure(
    store: FleetStore,
    rollout: RolloutRow,
    devices: Sequence[RolloutDeviceRow],
    now: datetime,
    since: datetime | None,
    job_timeout: timedelta,
    stage_started: datetime | None,
) -> dict[str, Any]:
    """The rollout's figures now: jobs of every stage so far, and new vs old over a window.

    Args:
        store: the collector's store.
        rollout: the rollout (its ``stage`` is the last stage sent).
        devices: its plan.
        now: the controller's clock.
        since: the window's start for telemetry, drift and quality (the soak's start); None:
            jobs only.
        job_timeout: a deploy not terminal this long after its stage started counts as failed.
        stage_started: when the current stage's commands went out.

    Returns:
        ``{"devices", "staged", "jobs": {succeeded, failed, timed_out, pending}, "failed",
        "upgraded": [...], "new": {...}, "old": {...}}`` (see :data:`METRICS`).
    """
    staged = [d for d in devices if d.stage is not None and d.stage <= rollout.stage]
    jobs = {"succeeded": 0, "failed": 0, "timed_out": 0, "pending": 0}
    upgraded, failures = set(), []
    late = stage_started is not None and now >= stage_started + job_timeout
    for d in staged:
        runs = store.executions(d.deploy_job)
        e = runs[0] if runs else None
        if e is not None and e.status is JobStatus.SUCCEEDED:
            jobs["succeeded"] += 1
            if e.version_after == rollout.version:
                upgraded.add(d.device)
        elif e is not None and e.status in TERMINAL:
            jobs["failed"] += 1
            failures.append(f"{d.device}: {e.status.value} {e.reason or ''}".strip())
        elif late or (d.stage is not None and d.stage < rollout.stage):
            jobs["timed_out"] += 1
            failures.append(f"{d.device}: no final status within the job timeout")
        else:
            jobs["pending"] += 1
    bad = jobs["failed"] + jobs["timed_out"]
    figures: dict[str, Any] = {
        "devices": len(devices),
        "staged": len(staged),
        "jobs": jobs,
        "failed": bad / len(staged) if staged else None,
        "failures": failures[:20],
        "upgraded": sorted(upgraded),
    }
    if since is None:
        return figures
    rest = {d.device for d in devices if d.stage is None or d.stage > rollout.stage}
    new, old = (
        _Side(devices=set(), drift={}, quality={}),
        _Side(devices=set(), drift={}, quality={}),
    )

    def side(device: str, version: Any) -> _Side | None:
        if device in upgraded and version == rollout.version:
            return new
        if device in rest and version != rollout.version:
            return old
        return None

    for device, _at, payload in _reports(store, "telemetry", since):
        for entry in dicts(payload.get("models")):
            chosen = side(device, entry.get("version"))
            if entry.get("model") != rollout.model or chosen is None:
                continue
            requests = int(number(entry.get("requests")) or 0)
            errors = sum(int(number(v) or 0) for v in as_dict(entry.get("errors")).values())
            p95 = number(as_dict(entry.get("latency_ms")).get("p95"))
            chosen.requests += requests
            chosen.errors += errors
            if p95 is not None and requests:
                chosen.latency_weighted += p95 * requests
                chosen.latency_requests += requests
            assert chosen.devices is not None
            chosen.devices.add(device)
    for kind in ("drift", "quality"):
        for device, _at, payload in _reports(store, kind, since):  # oldest first: latest wins
            chosen = side(device, payload.get("version"))
            if payload.get("model") != rollout.model or chosen is None:
                continue
            assert chosen.drift is not None
            assert chosen.quality is not None
            if kind == "drift":
                chosen.drift[device] = payload.get("status") == "drift"
            elif found := _quality(payload):
                chosen.quality[device] = found
    figures["new"], figures["old"] = new.figures(), old.figures()
    return figures


def _reports(
    store: FleetStore, kind: str, since: datetime
) -> Iterable[tuple[str, datetime, dict[str, Any]]]:
    for device, at, payload in store.events(kind, since=since, limit=100_000):
        if isinstance(payload, dict):
            yield device, at, payload


@dataclass(frozen=True)
class Verdict:
    """One condition against the figures: the value it compared, and whether it triggered."""

    condition: str
    observed: float | None  # the figure, or the new/old ratio for an ``x`` condition
    triggered: bool
    note: str  # "no data", "no old-version figure", or the figures compared

    def to_json(self) -> dict[str, Any]:
        finite = self.observed is not None and math.isfinite(self.observed)
        return {"condition": self.condition, "observed": self.observed if finite else None,
                "triggered": self.triggered, "note": self.note}  # fmt: skip


def evaluate(
    conditions: Sequence[Condition],
    figures: Mapping[str, Any],
    baseline: Mapping[str, Any] | None = None,
    *,
    jobs_only: bool = False,
) -> list[Verdict]:
    """Judge each condition; a condition without data does not trigger (its note says so).

    Args:
        conditions: the rollout's abort conditions.
        figures: :func:`measure`'s result.
        baseline: the old version's figures from an earlier stage, for ratios once no device
            is left on the old version (the last stage).
        jobs_only: judge only ``failed`` (between a stage's jobs and its soak).
    """
    verdicts = []
    for c in conditions:
        if jobs_only and c.metric != _FAILED:
            continue
        if c.metric == _FAILED:
            new, old = figures.get("failed"), None
        else:
            new = as_dict(figures.get("new")).get(c.metric)
            old = as_dict(figures.get("old")).get(c.metric)
            if old is None and baseline:
                old = baseline.get(c.metric)
        if new is None:
            verdicts.append(Verdict(str(c), None, False, "no data for the new version yet"))
            continue
        observed = float(new)
        note = f"{observed * 100:.3g}%" if c.unit == "%" else f"{observed:.4g}"
        if c.metric == "drift_share":
            note += f" of {as_dict(figures.get('new')).get('drift_devices')} upgraded device(s)"
        elif c.metric == _FAILED:
            note += f" of {figures.get('staged')} device(s) staged"
        if c.unit == "x":
            if old is None:
                verdicts.append(Verdict(str(c), None, False, "no old-version figure to compare"))
                continue
            observed = float(new) / float(old) if old else (math.inf if new else 1.0)
            note = f"new {new:.4g} / old {old:.4g} = {observed:.3g}x"
        triggered = _OPS[c.op](observed, c.value)
        verdicts.append(Verdict(str(c), observed, triggered, note))
    return verdicts
