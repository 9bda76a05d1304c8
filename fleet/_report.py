"""What the fleet's telemetry and drift reports say: tables for the CLI, and one HTML report.

The collector stores every device's telemetry and drift reports as events
(edgepack.fleet._database). This module reads them back per device and shapes them:

* :func:`telemetry_rows`: one row per (device, model, version) from the latest telemetry report
  that carries it, with the p95 latency of the last reports as a trend;
* :func:`drift_rows`: one row per (device, model) from its latest drift window, with the statuses
  of the windows before it;
* :func:`build_report` / :func:`write_report`: one self-contained HTML page for a model (inline
  CSS, plots as base64 PNG, no external resource at all): fleet summary, versions, reference vs
  live histograms of the drifting features, drift statistic and latency over time.

Reports come from devices, so every field is read defensively: a malformed payload loses a cell,
never the table. matplotlib is imported only when a report is built, so the rest of
``edgepack-fleet`` starts fast and runs without it.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from edgepack.fleet._database import FleetStore

__all__ = [
    "STATUS_GLYPHS",
    "DriftRow",
    "TelemetryRow",
    "build_report",
    "drift_rows",
    "sparkline",
    "telemetry_rows",
    "write_report",
]

SPARKS = "▁▂▃▄▅▆▇█"
STATUS_GLYPHS = {"ok": "·", "warning": "!", "drift": "✗"}
MAX_FEATURE_PLOTS = 12  # beyond this the page lists the remaining features by name
MAX_OVERLAYS = 4  # live histograms drawn over one reference
_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
_STATUS_COLORS = {"ok": "#2e7d32", "warning": "#b26a00", "drift": "#c62828"}
_UTC = timezone.utc


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
        return _ratio(self.worst_ks, self.worst_threshold)


# -- reading reports ---------------------------------------------------------------------------


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _moment(unix: Any) -> datetime | None:
    seconds = _num(unix)
    try:
        return None if seconds is None else datetime.fromtimestamp(seconds, _UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _ratio(ks: float | None, threshold: float | None) -> float | None:
    if ks is None or threshold is None or threshold <= 0:
        return None
    return ks / threshold


def feature_ratio(feature: Mapping[str, Any]) -> float | None:
    """A drift report feature's KS statistic over its threshold (above 1.0: an alarm)."""
    return _ratio(_num(feature.get("ks")), _num(feature.get("threshold")))


def _reports(
    store: FleetStore,
    kind: str,
    group: str | None,
    per_device: int,
    since: datetime | None = None,
) -> dict[str, list[tuple[datetime, dict[str, Any]]]]:
    """The latest reports of each device in scope (received from ``since`` on), oldest first.

    Devices are those the store knows (in ``group``), plus, without a group, any that sent a
    recent report without a state. ``per_device`` is multiplied by the number of models a device
    runs, since reports of all its models interleave.
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
    """One row per (device, model, version) seen in the last ``history`` telemetry reports."""
    rows = []
    for device, reports in _reports(store, "telemetry", group, history).items():
        series: dict[tuple[str, Any], list[tuple[datetime, dict[str, Any], dict[str, Any]]]] = {}
        for at, payload in reports[-history:]:  # one report covers all of a device's models
            for entry in _dicts(payload.get("models")):
                name = entry.get("model")
                if not isinstance(name, str) or (model is not None and name != model):
                    continue
                if version is not None and entry.get("version") != version:
                    continue
                series.setdefault((name, entry.get("version")), []).append((at, payload, entry))
        order = sorted(
            series.items(), key=lambda kv: (kv[0][0], _num(kv[0][1]) or 0, str(kv[0][1]))
        )
        for (name, ver), points in order:
            at, payload, entry = points[-1]
            latency, errors = _dict(entry.get("latency_ms")), _dict(entry.get("errors"))
            rss = _num(payload.get("rss_bytes"))
            trend = [_num(_dict(e.get("latency_ms")).get("p95")) for _a, _p, e in points]
            rows.append(
                TelemetryRow(
                    device=device,
                    model=name,
                    version=ver,
                    requests=int(_num(entry.get("requests")) or 0),
                    errors={str(k): int(v) for k, v in errors.items() if _num(v)},
                    p50=_num(latency.get("p50")),
                    p95=_num(latency.get("p95")),
                    p99=_num(latency.get("p99")),
                    rss_mib=None if rss is None else rss / 2**20,
                    seen=at,
                    trend=[v for v in trend if v is not None],
                )
            )
    return rows


def _drift_row(device: str, at: datetime, payload: dict[str, Any], history: list[str]) -> DriftRow:
    features = [f for f in _dicts(payload.get("features")) if isinstance(f.get("name"), str)]
    scored = [(r, f) for f in features if (r := feature_ratio(f)) is not None]
    worst = max(scored, key=lambda rf: rf[0])[1] if scored else None
    status = payload.get("status")
    return DriftRow(
        device=device,
        model=str(payload.get("model")),
        version=payload.get("version"),
        status=status if isinstance(status, str) else "?",
        n=int(_num(payload.get("n")) or 0),
        window_end=_moment(payload.get("window_end")),
        drifting=[f["name"] for f in features if f.get("drifting") is True],
        alarms=[f["name"] for f in features if f.get("alarm") is True],
        worst=worst["name"] if worst else None,
        worst_ks=_num(worst.get("ks")) if worst else None,
        worst_threshold=_num(worst.get("threshold")) if worst else None,
        seen=at,
        history=history,
        payload=payload,
    )


def _drift_series(
    store: FleetStore,
    group: str | None,
    model: str | None,
    version: Any,
    history: int,
    since: datetime | None = None,
) -> dict[tuple[str, str], list[tuple[datetime, dict[str, Any]]]]:
    series: dict[tuple[str, str], list[tuple[datetime, dict[str, Any]]]] = {}
    for device, reports in _reports(store, "drift", group, history, since).items():
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
    """One row per (device, model) from its latest drift window; ``history`` windows of trend."""
    rows = []
    for (device, _name), reports in _drift_series(store, group, model, version, history).items():
        statuses = [str(p.get("status", "?")) for _at, p in reports]
        rows.append(_drift_row(device, *reports[-1], statuses))
    return rows


def sparkline(values: Iterable[float]) -> str:
    """``▁▂▃▄▅▆▇█`` for a series, scaled between its own minimum and maximum."""
    points = list(values)
    if not points:
        return ""
    low, high = min(points), max(points)
    if high - low <= 1e-12 * max(1.0, abs(high)):
        return SPARKS[3] * len(points)
    return "".join(SPARKS[round((v - low) / (high - low) * (len(SPARKS) - 1))] for v in points)


# -- plots -------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _img(figure: Figure, alt: str) -> str:
    buffer = io.BytesIO()
    # no "Software" text chunk: it would carry matplotlib's URL into the file
    figure.savefig(buffer, format="png", metadata={"Software": None})
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _plain(text: Any) -> str:
    """Text for matplotlib as it is: no mathtext between "$", no legend entry hidden by "_"."""
    text = str(text).replace("$", r"\$")
    return f" {text}" if text.startswith("_") else text


def _bin_labels(feature: Mapping[str, Any], bins: int) -> list[str]:
    categories, edges = feature.get("categories"), feature.get("edges")
    if isinstance(categories, list) and len(categories) == bins:
        return [str(c) for c in categories]
    numbers = [_num(x) for x in edges] if isinstance(edges, list) else []
    if numbers and len(numbers) == bins - 1 and None not in numbers:
        e = [f"{x:.3g}" for x in numbers]
        return [f"< {e[0]}", *(f"{a} – {b}" for a, b in itertools.pairwise(e)), f"≥ {e[-1]}"]
    return [f"bin {i}" for i in range(bins)]


def _histogram(
    name: str, version: Any, shown: list[tuple[str, dict[str, Any]]], colors: dict[str, str]
) -> str:
    reference = [_num(x) or 0.0 for x in shown[0][1].get("reference") or []]
    labels = _bin_labels(shown[0][1], len(reference))
    figure = _figure(max(6.0, 0.9 * len(labels) + 2), 3.4)
    ax = figure.add_subplot()
    width = 0.8 / (1 + len(shown))
    x = range(len(reference))
    ax.bar([i - 0.4 + width / 2 for i in x], reference, width, color="#9e9e9e", label="reference")
    for k, (device, feature) in enumerate(shown, start=1):
        live = [_num(v) or 0.0 for v in feature.get("live") or []][: len(reference)]
        ratio, ks = feature_ratio(feature), _num(feature.get("ks"))
        label = _plain(device) + (f" (KS {ks:.3g}" if ks is not None else " (")
        label += f", {ratio:.1f}× threshold)" if ratio is not None else ")"
        left = [i - 0.4 + width * (k + 0.5) for i in range(len(live))]
        ax.bar(left, live, width, color=colors.get(device, "#555"), label=label)
    rotation = 30 if len(labels) > 5 else 0
    ha = "right" if rotation else "center"
    ax.set_xticks(list(x), [_plain(b) for b in labels], rotation=rotation, ha=ha)
    ax.set_ylabel("share of rows")
    ax.set_title(_plain(f"{name} (v{version}): reference vs latest window"))
    ax.legend(fontsize="small", frameon=False)
    return _img(figure, f"{name}: reference vs live histogram")


Series = dict[str, list[tuple[datetime, float]]]  # device -> (time, value), oldest first


def _lines(
    panels: list[tuple[str, Series]],
    colors: dict[str, str],
    title: str,
    alt: str,
    *,
    threshold: bool = False,
) -> str:
    """Stacked time plots sharing the x axis, one line per device (and a line at 1.0)."""
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter

    if not any(points for _label, series in panels for points in series.values()):
        return _empty("The reports carry no values to plot.")
    figure = _figure(10, 0.6 + 2.6 * len(panels))
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (ylabel, series) in zip(axes, panels, strict=True):
        for device, points in series.items():
            if points:
                xs, ys = zip(*points, strict=True)
                color, label = colors.get(device), _plain(device)
                ax.plot(xs, ys, marker="o", markersize=3, color=color, label=label)
        if threshold:
            ax.axhline(1.0, color="#c62828", linestyle="--", linewidth=1, label="threshold")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    locator = AutoDateLocator()
    axes[-1].xaxis.set_major_locator(locator)
    axes[-1].xaxis.set_major_formatter(ConciseDateFormatter(locator))
    axes[0].set_title(title)
    if len(panels[0][1]) <= len(_COLORS):
        axes[0].legend(fontsize="small", frameon=False, loc="upper left", bbox_to_anchor=(1, 1))
    return _img(figure, alt)


def _versions_chart(counts: dict[str, int]) -> str:
    figure = _figure(max(4.0, 1.2 * len(counts) + 2), 2.8)
    ax = figure.add_subplot()
    bars = ax.bar(list(counts), list(counts.values()), color=_COLORS[0])
    ax.bar_label(bars)
    ax.set_ylabel("devices")
    ax.set_title("active version")
    ax.set_ylim(0, max(counts.values()) * 1.2)
    ax.yaxis.get_major_locator().set_params(integer=True)  # type: ignore[call-arg]
    return _img(figure, "devices per active version")


# -- the HTML page -----------------------------------------------------------------------------

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#212121;
margin:0;background:#f5f5f5}
header{background:#263238;color:#fff;padding:20px 32px}
header h1{margin:0 0 4px;font-size:22px}
header p{margin:0;color:#cfd8dc}
main{padding:8px 32px 32px;max-width:1180px}
section{background:#fff;border-radius:6px;padding:12px 20px 16px;margin:16px 0;
box-shadow:0 1px 2px rgba(0,0,0,.08)}
h2{font-size:17px;margin:4px 0 10px}
h3{font-size:14px;margin:14px 0 4px}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #e0e0e0;vertical-align:top}
th{background:#fafafa;font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;height:auto;display:block;margin:6px 0}
.cards{display:flex;gap:12px;margin-top:12px}
.card{background:#37474f;border-radius:6px;padding:6px 14px;min-width:90px}
.card b{display:block;font-size:20px}
.badge{display:inline-block;border-radius:10px;padding:0 8px;color:#fff;font-size:12px}
.trend{font-family:ui-monospace,monospace;letter-spacing:1px}
.empty{color:#757575;font-style:italic}
.note{color:#616161;font-size:12px}
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(head: list[str], rows: list[list[str]], numeric: Iterable[int] = ()) -> str:
    right = set(numeric)
    cells = "".join(
        "<tr>"
        + "".join(f"<td{' class=num' if i in right else ''}>{c}</td>" for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    heads = "".join(
        f"<th{' class=num' if i in right else ''}>{_e(h)}</th>" for i, h in enumerate(head)
    )
    return f"<table><tr>{heads}</tr>{cells}</table>"


def _badge(status: str) -> str:
    color = _STATUS_COLORS.get(status, "#757575")
    return f'<span class="badge" style="background:{color}">{_e(status)}</span>'


def _when(moment: datetime | None) -> str:
    return moment.astimezone(_UTC).strftime("%Y-%m-%d %H:%M UTC") if moment else "-"


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{_e(title)}</h2>{body}</section>'


def _empty(text: str) -> str:
    return f'<p class="empty">{_e(text)}</p>'


def _feature_plots(rows: list[DriftRow], colors: dict[str, str]) -> str:
    """Reference vs live histograms of the drifting (else alarming, else closest) features."""
    found: dict[tuple[str, str], list[tuple[float, str, dict[str, Any]]]] = {}
    for row in rows:
        for f in _dicts(row.payload.get("features")):
            if (
                isinstance(f.get("name"), str)
                and isinstance(f.get("reference"), list)
                and f["reference"]
            ):
                key = (str(row.version), f["name"])
                found.setdefault(key, []).append((feature_ratio(f) or 0.0, row.device, f))
    if not found:
        return _empty("The drift reports carry no feature statistics.")
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
    parts = [f'<p class="note">{_e(note)}</p>']
    for (version, name), entries in ordered[:MAX_FEATURE_PLOTS]:
        entries.sort(key=lambda v: -v[0])
        shown = [(device, f) for _r, device, f in entries[:MAX_OVERLAYS]]
        more = len(entries) - len(shown)
        devices = ", ".join(_e(d) for d, _f in shown) + (f" and {more} more" if more > 0 else "")
        parts.append(f"<h3>{_e(name)} <span class=note>v{_e(version)} · {devices}</span></h3>")
        parts.append(_histogram(name, version, shown, colors))
    if len(ordered) > MAX_FEATURE_PLOTS:
        rest = ", ".join(_e(k[1]) for k, _v in ordered[MAX_FEATURE_PLOTS:])
        parts.append(f'<p class="note">Not plotted: {rest}.</p>')
    return "".join(parts)


def _summary(
    names: list[str], installed: dict[str, Any], statuses: dict[str, DriftRow], p95: Series
) -> str:
    rows = []
    for name in names:
        r = statuses.get(name)
        latest = p95.get(name)
        rows.append(
            [
                _e(name),
                _e(installed.get(name, r.version if r else "-")),
                _badge(r.status) if r else '<span class="empty">no drift report</span>',
                f"<span class=trend>{_e(''.join(STATUS_GLYPHS.get(s, '?') for s in r.history))}"
                "</span>"
                if r
                else "",
                _e(r.n) if r else "-",
                _when(r.window_end if r else None),
                _e(", ".join(r.drifting) or "-") if r else "-",
                _e(f"{r.worst} ({r.worst_ratio:.2f}×)") if r and r.worst_ratio else "-",
                f"{latest[-1][1]:.2f}" if latest else "-",
            ]
        )
    head = ["device", "version", "status", "trend", "rows", "window end", "drifting"]
    return _table([*head, "worst KS/threshold", "p95 ms"], rows, numeric=(4, 8))


def _versions(installed: dict[str, Any], in_scope: int, model: str) -> str:
    by_version: dict[str, list[str]] = {}
    for name, version in sorted(installed.items()):
        by_version.setdefault("none" if version is None else f"v{version}", []).append(name)
    if not by_version:
        return _empty(f"No device in scope has {model} installed.")
    ordered = dict(sorted(by_version.items(), key=lambda kv: (kv[0] == "none", kv[0])))
    listed = [
        [_e(v), str(len(ds)), _e(", ".join(ds[:20]) + (f" … {len(ds) - 20} more" * (len(ds) > 20)))]
        for v, ds in ordered.items()
    ]
    text = _versions_chart({v: len(ds) for v, ds in ordered.items()})
    text += _table(["version", "devices", "names"], listed, numeric=(1,))
    if in_scope > len(installed):
        text += f'<p class="note">{in_scope - len(installed)} device(s) in scope have no '
        text += f"{_e(model)}.</p>"
    return text


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
        now: the generation time to print (default: now).
    """
    devices = store.devices(group)
    installed = {
        d.device: d.models[model].get("active")
        for d in devices
        if isinstance(d.models.get(model), dict)
    }
    series = _drift_series(store, group, model, None, history, since)
    drift = [
        _drift_row(device, *reports[-1], [str(p.get("status")) for _at, p in reports[-12:]])
        for (device, _m), reports in series.items()
    ]
    latency: dict[str, Series] = {"p50": {}, "p95": {}, "p99": {}}
    for device, reports in _reports(store, "telemetry", group, history, since).items():
        for at, payload in reports:
            entries = [e for e in _dicts(payload.get("models")) if e.get("model") == model]
            if not entries:
                continue
            # during a deploy two versions can share an interval: plot the busier one
            entry = max(entries, key=lambda e: _num(e.get("requests")) or 0)
            lat = _dict(entry.get("latency_ms"))
            when = _moment(payload.get("interval_end")) or at
            for key, points in latency.items():
                if (value := _num(lat.get(key))) is not None:
                    points.setdefault(device, []).append((when, value))
    statuses = {r.device: r for r in drift}

    def severity(name: str) -> tuple[float, ...]:  # the devices to look at first
        row, p95 = statuses.get(name), latency["p95"].get(name)
        rank = {"drift": 3, "warning": 2, "ok": 1}.get(row.status if row else "", 0)
        return (-rank, -((row.worst_ratio or 0) if row else 0), -(p95[-1][1] if p95 else 0))

    names = sorted(set(installed) | set(statuses) | set(latency["p50"]))
    names.sort(key=severity)  # stable: by name within a rank
    colors = {name: _COLORS[i % len(_COLORS)] for i, name in enumerate(names)}
    plotted, note = set(names[: len(_COLORS)]), ""
    if len(names) > len(plotted):
        note = f'<p class="note">Plotted: the {len(plotted)} devices listed first above.</p>'

    counts = {s: sum(r.status == s for r in drift) for s in ("ok", "warning", "drift")}
    cards = "".join(
        f"<div class=card><b>{v}</b>{_e(k)}</div>"
        for k, v in [("devices", len(names)), *counts.items()]
    )
    scope = f"group {group}" if group else "all devices"
    head = (
        f"<header><h1>Model {_e(model)}</h1><p>Generated {_when(now or datetime.now(_UTC))} · "
        f"scope: {_e(scope)}</p><div class=cards>{cards}</div></header>"
    )
    if drift:
        features = _feature_plots(drift, colors)
        ratios = {
            device: [
                (_moment(p.get("window_end")) or at, max(rs))
                for at, p in reports
                if (rs := [r for f in _dicts(p.get("features")) if (r := feature_ratio(f))])
            ]
            for (device, _m), reports in series.items()
            if device in plotted
        }
        title = "drift statistic of the worst feature per window"
        alt = f"{title}, per device"
        over_time = _lines([("KS / threshold", ratios)], colors, title, alt, threshold=True)
        over_time += note
    else:
        features = over_time = _empty(f"No drift reports yet for {model}.")
    if latency["p50"] or latency["p95"]:
        panels = [
            (f"{key} ms", {d: v for d, v in points.items() if d in plotted})
            for key, points in latency.items()
        ]
        title = "request latency per reporting interval"
        alt = "latency p50/p95/p99 over time per device"
        latency_html = _lines(panels, colors, title, alt) + note
    else:
        latency_html = _empty(f"No telemetry yet for {model}.")
    summary = (
        _summary(names, installed, statuses, latency["p95"])
        if names
        else _empty(f"No device runs {model} or reports on it yet.")
    )
    body = "".join(
        [
            _section("summary", "Devices", summary),
            _section(
                "versions", "Versions across the fleet", _versions(installed, len(devices), model)
            ),
            _section("features", "Drifting features", features),
            _section("drift-over-time", "Drift statistic over time", over_time),
            _section("latency", "Latency over time", latency_html),
        ]
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>edgepack fleet report: {_e(model)}</title><style>{_CSS}</style></head>"
        f"<body>{head}<main>{body}</main></body></html>\n"
    )


def default_path(model: str) -> Path:
    """``report-MODEL.html`` in the working directory (odd characters become ``_``)."""
    return Path(f"report-{re.sub(r'[^A-Za-z0-9._-]', '_', model)}.html")


def write_report(
    store: FleetStore,
    model: str,
    path: Path,
    *,
    group: str | None = None,
    since: datetime | None = None,
) -> Path:
    """Build the report (see :func:`build_report`) and write it atomically (temp file, rename).

    Raises:
        OSError: the file cannot be written.
    """
    text = build_report(store, model, group=group, since=since)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent if path.parent else None)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path
