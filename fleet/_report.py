"""The fleet report: one self-contained HTML page on one model, from the collector's store.

``edgepack-fleet report`` (edgepack.fleet._cli) calls :func:`write_report`. The page is built in
three steps, each in its own module:

1. the rows: edgepack.fleet._views reads the devices' state, drift windows and telemetry from the
   store, the same rows the CLI tables show;
2. the figures: edgepack.fleet._plots draws the versions, the reference vs live histograms of the
   drifting features, the drift statistic and latency over time, each a PNG data URI;
   edgepack.fleet._experiments sums the experiments' reports per variant (active vs candidate);
3. the page: this module ranks the devices (drifting first), picks what to plot, and fills the
   Jinja2 template ``templates/report.html.j2`` (autoescaped: device and feature names are text,
   never markup). CSS is inline and images are data URIs, so the file needs nothing else at all.

The file is written atomically (edgepack._files.write_bytes_atomic): a reader, or a web server
publishing it, sees the old report or the new one, never half a page.
"""

from __future__ import annotations

import errno
import functools
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2

from edgepack._clock import utc_now
from edgepack._files import write_bytes_atomic
from edgepack.errors import StorageError
from edgepack.fleet._plots import COLORS, Image, Series, histogram, time_lines, versions_chart
from edgepack.fleet._views import (
    STATUS_GLYPHS,
    DriftRow,
    Reports,
    as_dict,
    dicts,
    drift_row,
    drift_series,
    feature_ratio,
    latest_quality,
    latest_reports,
    multivariate_text,
    number,
    quality_text,
    unix_moment,
)

if TYPE_CHECKING:
    from edgepack.fleet._database import FleetStore

__all__ = ["build_report", "default_path", "write_report"]

MAX_FEATURE_PLOTS = 12  # beyond this the page lists the remaining features by name
MAX_OVERLAYS = 4  # live histograms drawn over one reference
MAX_NAMES = 20  # device names listed per version
TREND = 12  # drift windows in a device's status trend
_STATUSES = ("ok", "warning", "drift")
_UTC = timezone.utc


@dataclass(frozen=True)
class DeviceLine:
    """One device in the summary table, as text."""

    device: str
    version: str
    status: str | None  # None: no drift report
    tone: str  # the badge's CSS class: the status when known, else "other"
    trend: str  # STATUS_GLYPHS of the last windows
    rows: str
    window_end: str
    drifting: str
    worst: str
    joint: str  # the multivariate statistic, when the drift report has one
    quality: str  # the latest quality report, in a few words
    p95: str


@dataclass(frozen=True)
class VersionLine:
    """One active version and the devices running it."""

    label: str  # "v2", or "none" (installed but not active)
    count: int
    names: str


@dataclass(frozen=True)
class FeaturePlot:
    """One feature's histogram and the devices drawn on it."""

    name: str
    version: str
    devices: str
    image: Image


@dataclass(frozen=True)
class Features:
    """The feature section: why these features, their plots, and the ones left out."""

    note: str
    plots: list[FeaturePlot]
    not_plotted: list[str]


@functools.cache
def _template() -> jinja2.Template:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("edgepack.fleet", "templates"),
        autoescape=True,  # every value is text: a device named "<b>" shows as "<b>"
        undefined=jinja2.StrictUndefined,  # a misspelt name fails the build, not the page
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return environment.get_template("report.html.j2")


def _when(moment: datetime | None) -> str:
    return moment.astimezone(_UTC).strftime("%Y-%m-%d %H:%M UTC") if moment else "-"


def _features(rows: list[DriftRow], colors: dict[str, str]) -> Features | None:
    """Reference vs live histograms of the drifting (else alarming, else closest) features."""
    found: dict[tuple[str, str], list[tuple[float, str, dict[str, Any]]]] = {}
    for row in rows:
        for f in dicts(row.payload.get("features")):
            if (
                isinstance(f.get("name"), str)
                and isinstance(f.get("reference"), list)
                and f["reference"]
            ):
                key = (str(row.version), f["name"])
                found.setdefault(key, []).append((feature_ratio(f) or 0.0, row.device, f))
    if not found:
        return None
    for flag, why in (("drifting", "drifting"), ("alarm", "over their threshold")):
        chosen = {k: [v for v in vs if v[2].get(flag) is True] for k, vs in found.items()}
        chosen = {k: vs for k, vs in chosen.items() if vs}
        if chosen:
            note = f"Features {why} in the latest window of at least one device."
            break
    else:
        top = sorted(found, key=lambda k: -max(v[0] for v in found[k]))[:3]
        chosen = {k: found[k] for k in top}
        note = "No feature is drifting or over its threshold: the three closest to it."
    ordered = sorted(chosen.items(), key=lambda kv: -max(v[0] for v in kv[1]))
    plots = []
    for (version, name), entries in ordered[:MAX_FEATURE_PLOTS]:
        entries.sort(key=lambda v: -v[0])
        shown = [(device, f) for _r, device, f in entries[:MAX_OVERLAYS]]
        more = len(entries) - len(shown)
        devices = ", ".join(d for d, _f in shown) + (f" and {more} more" if more > 0 else "")
        plots.append(FeaturePlot(name, version, devices, histogram(name, version, shown, colors)))
    return Features(note, plots, [name for (_v, name), _e in ordered[MAX_FEATURE_PLOTS:]])


def _device_lines(
    names: list[str],
    installed: dict[str, Any],
    statuses: dict[str, DriftRow],
    p95: Series,
    quality: dict[str, Any] | None = None,
) -> list[DeviceLine]:
    quality = quality or {}
    lines = []
    for name in names:
        r, latest = statuses.get(name), p95.get(name)
        status = r.status if r else None
        ratio = r.worst_ratio if r else None
        lines.append(
            DeviceLine(
                device=name,
                version=str(installed.get(name, r.version if r else "-")),
                status=status,
                tone=status if status in _STATUSES else "other",
                trend="".join(STATUS_GLYPHS.get(s, "?") for s in r.history) if r else "",
                rows=str(r.n) if r else "-",
                window_end=_when(r.window_end if r else None),
                drifting=(", ".join(r.drifting) or "-") if r else "-",
                worst=f"{r.worst} ({ratio:.2f}×)" if r and ratio else "-",
                joint=(multivariate_text(r.payload) if r else None) or "-",
                quality=quality_text(quality.get(name)) or "-",
                p95=f"{latest[-1][1]:.2f}" if latest else "-",
            )
        )
    return lines


def _version_lines(installed: dict[str, Any]) -> list[VersionLine]:
    by_version: dict[str, list[str]] = {}
    for name, version in sorted(installed.items()):
        by_version.setdefault("none" if version is None else f"v{version}", []).append(name)
    ordered = sorted(by_version.items(), key=lambda kv: (kv[0] == "none", kv[0]))
    lines = []
    for label, names in ordered:
        listed = ", ".join(names[:MAX_NAMES])
        if len(names) > MAX_NAMES:
            listed += f" … {len(names) - MAX_NAMES} more"
        lines.append(VersionLine(label, len(names), listed))
    return lines


def _latency(
    store: FleetStore, model: str, group: str | None, history: int, since: datetime | None
) -> dict[str, Series]:
    """p50/p95/p99 of ``model`` per device over time (at each interval's end)."""
    latency: dict[str, Series] = {"p50": {}, "p95": {}, "p99": {}}
    for device, reports in latest_reports(store, "telemetry", group, history, since).items():
        for at, payload in reports:
            entries = [e for e in dicts(payload.get("models")) if e.get("model") == model]
            if not entries:
                continue
            # during a deploy two versions can share an interval: plot the busier one
            entry = max(entries, key=lambda e: number(e.get("requests")) or 0)
            lat = as_dict(entry.get("latency_ms"))
            when = unix_moment(payload.get("interval_end")) or at
            for key, points in latency.items():
                if (value := number(lat.get(key))) is not None:
                    points.setdefault(device, []).append((when, value))
    return latency


def _quality(
    store: FleetStore, model: str, group: str | None, history: int, since: datetime | None
) -> tuple[Series, Series, str]:
    """Per device over time: the labeled windows' metric (accuracy, or MAE for a regressor)
    and the estimated accuracy (CBPE) of ``model``'s active version (not an experiment's
    candidate), and the labeled metric's name."""
    found: dict[str, Series] = {"labeled": {}, "estimated": {}}
    names: set[str] = set()
    for device, reports in latest_reports(store, "quality", group, history, since).items():
        for at, payload in reports:
            if payload.get("model") != model or payload.get("variant") == "candidate":
                continue
            when = unix_moment(payload.get("window_end")) or at
            metrics = as_dict(payload.get("metrics"))
            for name in ("accuracy", "mae"):
                if (value := number(metrics.get(name))) is not None:
                    found["labeled"].setdefault(device, []).append((when, value))
                    names.add(name)
                    break
            estimated = number(as_dict(payload.get("estimated")).get("accuracy"))
            if estimated is not None:
                found["estimated"].setdefault(device, []).append((when, estimated))
    return found["labeled"], found["estimated"], "/".join(sorted(names)) or "accuracy"


def _worst_ratios(series: dict[tuple[str, str], Reports], plotted: set[str]) -> Series:
    """The highest KS / threshold of each drift window, per plotted device."""
    return {
        device: [
            (unix_moment(p.get("window_end")) or at, max(rs))
            for at, p in reports
            if (rs := [r for f in dicts(p.get("features")) if (r := feature_ratio(f))])
        ]
        for (device, _m), reports in series.items()
        if device in plotted
    }


@dataclass(frozen=True)
class ExperimentLine:
    """One variant of one device's (or the fleet's) experiment, as the page shows it."""

    device: str
    plan: str
    variant: str
    version: str
    requests: str
    errors: str
    p50: str
    p95: str
    agreement: str
    error: str
    drift: str
    quality: str


def _experiment_lines(store: FleetStore, model: str, group: str | None) -> list[ExperimentLine]:
    from edgepack.fleet._experiments import experiment_rows

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines = []
    for row in experiment_rows(store, model, group):
        share = row.share if row.mode == "split" else row.sample
        plan = f"{row.mode} {100 * (share or 0):g}%" + ("" if row.running else " (ended)")
        device = row.device if row.devices == 1 else f"{row.device} ({row.devices} devices)"
        for variant, figures in (("active", row.active), ("candidate", row.candidate)):
            shadow = row.shadow if variant == "candidate" else None
            requests = f"{shadow.compared:,} shadowed" if shadow else f"{figures.requests:,}"
            lines.append(
                ExperimentLine(
                    device if variant == "active" else "",
                    plan if variant == "active" else "",
                    variant,
                    str(figures.version),
                    requests,
                    str(shadow.errors if shadow else figures.errors),
                    ms(shadow.p50_ms if shadow else figures.p50_ms),
                    ms(shadow.p95_ms if shadow else figures.p95_ms),
                    "-" if not shadow or shadow.agreement is None else f"{shadow.agreement:.1%}",
                    "-"
                    if not shadow or shadow.mean_abs_error is None
                    else f"{shadow.mean_abs_error:.4g}",
                    figures.drift or "-",
                    figures.quality or "-",
                )
            )
    return lines


def build_report(
    store: FleetStore,
    model: str,
    *,
    group: str | None = None,
    history: int = 200,
    since: datetime | None = None,
    now: datetime | None = None,
) -> str:
    """The HTML report of ``model`` across the fleet (or ``group``), as one string.

    Args:
        store: the collector's store.
        model: the model to report on.
        group: only this group's devices.
        history: the most drift windows and telemetry reports read per device.
        since: only reports received from then on.
        now: the generation time to print (default: the current time).

    Returns:
        The page: a complete HTML document with inline CSS and PNG data URIs.
    """
    devices = store.devices(group)
    installed = {
        d.device: d.models[model].get("active")
        for d in devices
        if isinstance(d.models.get(model), dict)
    }
    series = drift_series(store, group, model, None, history, since)
    drift = [
        drift_row(device, *reports[-1], [str(p.get("status")) for _at, p in reports[-TREND:]])
        for (device, _m), reports in series.items()
    ]
    latency = _latency(store, model, group, history, since)
    statuses = {r.device: r for r in drift}

    def severity(name: str) -> tuple[float, ...]:  # the devices to look at first
        row, p95 = statuses.get(name), latency["p95"].get(name)
        rank = {"drift": 3, "warning": 2, "ok": 1}.get(row.status if row else "", 0)
        return (-rank, -((row.worst_ratio or 0) if row else 0), -(p95[-1][1] if p95 else 0))

    labeled, estimated, metric = _quality(store, model, group, history, since)
    names = sorted(
        set(installed) | set(statuses) | set(latency["p50"]) | set(labeled) | set(estimated)
    )
    names.sort(key=severity)  # stable: by name within a rank
    colors = {name: COLORS[i % len(COLORS)] for i, name in enumerate(names)}
    plotted = set(names[: len(COLORS)])

    versions = _version_lines(installed)
    over_time = None
    if drift:
        title = "drift statistic of the worst feature per window"
        panel = [("KS / threshold", _worst_ratios(series, plotted))]
        over_time = time_lines(panel, colors, title, f"{title}, per device", threshold=True)
    latency_plot = None
    if latency["p50"] or latency["p95"]:
        panels = [
            (f"{key} ms", {d: v for d, v in points.items() if d in plotted})
            for key, points in latency.items()
        ]
        title = "request latency per reporting interval"
        alt = "latency p50/p95/p99 over time per device"
        latency_plot = time_lines(panels, colors, title, alt)
    quality_panels = [
        (f"{metric} (labels)", {d: v for d, v in labeled.items() if d in plotted}),
        ("accuracy (estimated)", {d: v for d, v in estimated.items() if d in plotted}),
    ]
    quality_panels = [(label, points) for label, points in quality_panels if points]
    quality_plot = (
        time_lines(
            quality_panels,
            colors,
            "model quality per window",
            "labeled metric and estimated accuracy over time per device",
        )
        if quality_panels
        else None
    )
    counts = {s: sum(r.status == s for r in drift) for s in _STATUSES}
    text = _template().render(
        model=model,
        scope=f"group {group}" if group else "all devices",
        generated=_when(now or utc_now()),
        cards=[("devices", len(names)), *counts.items()],
        devices=_device_lines(
            names,
            installed,
            statuses,
            latency["p95"],
            {d: q for (d, m), q in latest_quality(store, group).items() if m == model},
        ),
        versions=versions,
        versions_chart=versions_chart({v.label: v.count for v in versions}) if versions else None,
        experiments=_experiment_lines(store, model, group),
        without_model=len(devices) - len(installed),
        has_drift=bool(drift),
        features=_features(drift, colors) if drift else None,
        drift_over_time=over_time,
        has_telemetry=bool(latency["p50"] or latency["p95"]),
        latency=latency_plot,
        has_quality=bool(quality_panels),
        quality_over_time=quality_plot,
        plotted=len(plotted) if len(names) > len(plotted) else None,
    )
    return text.rstrip("\n") + "\n"


def default_path(model: str) -> Path:
    """``report-MODEL.html`` in the working directory (odd characters become ``_``).

    Args:
        model: the model reported on.

    Returns:
        The relative path.
    """
    return Path(f"report-{re.sub(r'[^A-Za-z0-9._-]', '_', model)}.html")


def write_report(
    store: FleetStore,
    model: str,
    path: Path,
    *,
    group: str | None = None,
    since: datetime | None = None,
    now: datetime | None = None,
) -> Path:
    """Build the report (see :func:`build_report`) and write it atomically (temp file, rename).

    Args:
        store: the collector's store.
        model: the model to report on.
        path: the HTML file to write (replaced whole; mode 0644).
        group: only this group's devices.
        since: only reports received from then on.
        now: the generation time to print (default: the current time).

    Returns:
        ``path``.

    Raises:
        StorageError: the file cannot be written (any old file at ``path`` is untouched).
    """
    text = build_report(store, model, group=group, since=since, now=now)
    try:
        write_bytes_atomic(path, text.encode("utf-8"), mode=0o644)
    except StorageError as e:
        cause = e.__cause__ if isinstance(e.__cause__, OSError) else None
        reason = (cause.strerror if cause else None) or str(e)
        raise StorageError(
            f"cannot write the report: {path}: {reason}; {_write_hint(cause, path.parent)}"
        ) from e
    return path


def _write_hint(error: OSError | None, folder: Path) -> str:
    """What to do when the report cannot be written into ``folder``."""
    code = error.errno if error else None
    if code == errno.ENOSPC:
        return "the disk is full: free space there, or write the report elsewhere"
    if code in (errno.ENOENT, errno.ENOTDIR):
        return f"the folder {folder} does not exist: create it, or write the report elsewhere"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"you may not write to {folder}: write the report elsewhere"
    return f"check that the folder {folder} exists and that you may write to it"
