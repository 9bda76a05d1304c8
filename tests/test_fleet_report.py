"""``edgepack-fleet telemetry``, ``drift`` and ``report`` on a real store of real-format reports.

Three devices run ``churn``: dev-a (group eu, v2) sees the reference distribution, dev-b (eu, v2)
sees ``monthly_charges`` shift for its last three windows (drift), dev-c (us, v1) sees ``tenure``
shift in its last window only (warning). Their drift reports come from
edgepack.agent._drift.DriftDetector over a reference built by edgepack.packager._statistics, their
telemetry from edgepack.agent._telemetry.Telemetry after recording known latencies, so the payloads
are exactly what devices send.

No test reads the wall clock: the reports are stamped relative to a fixed NOW, and the CLI is
given a clock that says NOW (click's context object), so every age it prints is exact.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

import edgepack.fleet._cli as fleet_cli
from edgepack.agent._drift import DriftDetector
from edgepack.agent._telemetry import Telemetry
from edgepack.fleet._database import open_store
from edgepack.fleet._report import build_report
from edgepack.fleet._views import ago, drift_rows, sparkline, telemetry_rows
from edgepack.packager._converters import Prediction
from edgepack.packager._reference import columns_layout
from edgepack.packager._statistics import reference_statistics

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=timezone.utc)  # "now" for the reports and the CLI
DEVICES = {"dev-a": ("eu", 2), "dev-b": ("eu", 2), "dev-c": ("us", 1)}
WINDOWS, INTERVALS, ROWS = 6, 8, 250
IMG = re.compile(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _rows(
    rng: np.random.Generator, n: int, shift: str | None = None, size: float = 1.0
) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "tenure": rng.gamma(2.0, 12.0, n),
            "monthly_charges": rng.normal(70.0, 20.0, n),
            "plan": rng.choice(["basic", "plus", "pro"], n, p=[0.5, 0.3, 0.2]),
        }
    )
    if shift is not None:
        frame[shift] += frame[shift].std() * size
    return frame


@dataclass
class Fleet:
    store_url: str
    latencies: dict[str, np.ndarray]  # device -> churn latencies (ms) of its last interval


@pytest.fixture(scope="module")
def fleet_store(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    rng = np.random.default_rng(7)
    frame = _rows(rng, 2000)
    labels = rng.choice(["no", "yes"], len(frame), p=[0.8, 0.2])
    layout = columns_layout(frame, list(frame.columns))
    reference = reference_statistics(
        frame, layout, "classification", Prediction(labels=labels), windows=(100, 250)
    )
    url = str(tmp_path_factory.mktemp("fleet") / "fleet.db")
    store = open_store(url)
    last: dict[str, np.ndarray] = {}
    for index, (device, (group, version)) in enumerate(DEVICES.items()):
        models = {"churn": {"active": version, "previous": None}}
        if device == "dev-a":
            models["fraud"] = {"active": 1, "previous": None}
        state = {"ts": NOW.isoformat(), "groups": [group], "models": models, "online": True}
        store.record_state(device, state, NOW)

        monitor = DriftDetector(reference, window=ROWS, min_rows=100)
        for w in range(WINDOWS):
            shift = {"dev-b": "monthly_charges" if w >= 3 else None, "dev-c": "tenure"}.get(device)
            if device == "dev-c" and w < WINDOWS - 1:
                shift = None
            # dev-c: a moderate shift, over its threshold but not its strong one
            window = _rows(rng, ROWS, shift, 0.22 if device == "dev-c" else 1.0)
            inputs = {c: window[c].to_numpy().reshape(-1, 1) for c in window.columns}
            monitor.observe(inputs, {"label": rng.choice(["no", "yes"], ROWS, p=[0.8, 0.2])})
            end = NOW - timedelta(minutes=10 * (WINDOWS - w))
            report = monitor.close() | {
                "window_start": (end - timedelta(minutes=10)).timestamp(),
                "window_end": end.timestamp(),
            }
            payload = {
                "schema": 1, "device": device, "seq": w, "ts": end.isoformat(), **report,
                "model": "churn", "version": version, "bundle_sha256": "ab" * 32,
            }  # fmt: skip
            store.record_event("drift", device, payload, w, end + timedelta(seconds=2))

        telemetry = Telemetry()
        for i in range(INTERVALS):
            median = (2.0 + index) * (1 + 0.2 * i if device == "dev-b" else 1)
            seconds = rng.lognormal(np.log(median / 1000), 0.4, 200)
            for s in seconds:
                telemetry.record("churn", version, float(s), 4)
            if device == "dev-a":
                for s in rng.lognormal(np.log(0.010), 0.2, 50):
                    telemetry.record("fraud", 1, float(s), 1)
            if device == "dev-c" and i == INTERVALS - 1:
                for _ in range(3):
                    telemetry.record("churn", version, 0.0, 0, "bad_input")
            last[device] = seconds * 1000
            end = NOW - timedelta(minutes=5 * (INTERVALS - i))
            payload = {
                "schema": 1, "device": device, "seq": i, "ts": end.isoformat(),
                **telemetry.report(),
                "interval_start": (end - timedelta(minutes=5)).timestamp(),
                "interval_end": end.timestamp(),
                "skipped_drift_batches": 0, "outbox": {"queued": 0},
            }  # fmt: skip
            store.record_event("telemetry", device, payload, i, end + timedelta(seconds=1))
    store.close()
    return Fleet(url, last)


def run(
    fleet_state: Fleet, *args: str, monkeypatch: pytest.MonkeyPatch, now: datetime = NOW
) -> str:
    """The output of ``edgepack-fleet --store STORE ARGS...`` with a clock that says ``now``."""
    monkeypatch.setattr(fleet_cli.console, "width", 200)  # no wrapping, whatever the terminal
    args = ("--store", fleet_state.store_url, *args)
    result = CliRunner().invoke(fleet_cli.cli, args, obj={"clock": lambda: now})
    assert result.exit_code == 0, result.output
    return result.output


def cells(output: str, *words: str) -> list[str]:
    """The cells of the one table line that holds every word."""
    lines = [line for line in output.splitlines() if all(w in line for w in words)]
    assert len(lines) == 1, f"{words} in:\n{output}"
    return [cell.strip() for cell in lines[0].split("│")[1:-1]]


def devices_in(output: str) -> set[str]:
    return set(re.findall(r"\bdev-[abc]\b", output))


TELEMETRY = ["device", "model", "version", "requests", "errors", "p50", "p95", "p99", "rss"]
TELEMETRY += ["trend", "seen"]
DRIFT = ["device", "model", "version", "status", "window", "drifting", "worst", "joint", "quality",
         "trend"]  # fmt: skip


def test_telemetry_table_shows_the_latest_interval(
    fleet_store: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = run(fleet_store, "telemetry", monkeypatch=monkeypatch)
    assert devices_in(output) == set(DEVICES)
    for device, latencies in fleet_store.latencies.items():
        row = dict(zip(TELEMETRY, cells(output, device, "churn"), strict=False))
        expected = [f"{v:.2f}" for v in np.percentile(latencies, [50, 95, 99])]
        assert [row["p50"], row["p95"], row["p99"]] == expected, device
        assert row["version"] == str(DEVICES[device][1])
        bad = 3 if device == "dev-c" else 0  # dev-c had three bad inputs in its last interval
        assert (row["requests"], row["errors"]) == (str(200 + bad), str(bad))
        assert float(row["rss"]) > 1
        assert row["seen"] == "4m ago"  # the last interval ended 5 minutes ago, received 1 s later
    trend = cells(output, "dev-b", "churn")[9]  # its latency grew every interval
    assert len(trend) == INTERVALS
    assert trend[0] == "▁"
    assert trend[-1] == "█"
    assert cells(output, "dev-a", "fraud")[3] == "50"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--group", "eu"], {"dev-a", "dev-b"}),
        (["--group", "us"], {"dev-c"}),
        (["--model", "fraud"], {"dev-a"}),
        (["--model", "churn", "--version", "1"], {"dev-c"}),
        (["--group", "nowhere"], set()),
    ],
)
def test_telemetry_filters(
    fleet_store: Fleet, monkeypatch: pytest.MonkeyPatch, args: list[str], expected: set[str]
) -> None:
    output = run(fleet_store, "telemetry", *args, monkeypatch=monkeypatch)
    assert devices_in(output) == expected
    if "--model" in args:
        other = "churn" if args[1] == "fraud" else "fraud"
        assert other not in output
    if not expected:
        assert "no telemetry reports yet" in output


def test_drift_table_shows_status_and_features(
    fleet_store: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = run(fleet_store, "drift", monkeypatch=monkeypatch)
    assert devices_in(output) == set(DEVICES)
    a, b, c = (dict(zip(DRIFT, cells(output, d), strict=True)) for d in DEVICES)
    assert (a["status"], a["drifting"]) == ("ok", "-")
    assert len(a["trend"]) == WINDOWS  # a false alarm can happen, drift (2 of 3) should not
    assert "✗" not in a["trend"]
    # a clear shift: beyond its strong threshold, drift from its first window
    assert (b["status"], b["drifting"], b["trend"]) == ("drift", "monthly_charges", "···✗✗✗")
    # dev-c: one window over its threshold is a warning, not (yet) drift
    assert (c["status"], c["drifting"], c["trend"]) == ("warning", "-", "·····!")
    assert c["worst"].startswith("tenure ")
    assert b["window"] == f"{ROWS} rows, 10m ago"  # the last window ended 10 minutes ago
    rows = {r.device: r for r in drift_rows(open_store(fleet_store.store_url), model="churn")}
    assert rows["dev-b"].drifting == ["monthly_charges"]
    assert rows["dev-b"].worst == "monthly_charges"
    assert rows["dev-b"].worst_ratio is not None
    assert rows["dev-b"].worst_ratio > 1
    assert rows["dev-c"].alarms == ["tenure"]


def test_ages_come_from_the_clock(fleet_store: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    later = NOW + timedelta(days=2, hours=3)
    drift = run(fleet_store, "drift", "--group", "us", monkeypatch=monkeypatch, now=later)
    assert cells(drift, "dev-c")[4] == f"{ROWS} rows, 2d ago"
    devices = run(fleet_store, "devices", monkeypatch=monkeypatch, now=NOW + timedelta(hours=1))
    row = cells(devices, "dev-a")
    assert row[3] == "churn@2, fraud@1"
    assert row[-1] == "1h ago"  # its state was received at NOW
    assert [ago(NOW - timedelta(seconds=s), NOW) for s in (-5, 59, 60, 3599, 3600, 86400)] == [
        "0s ago", "59s ago", "1m ago", "59m ago", "1h ago", "1d ago",
    ]  # fmt: skip
    assert ago(None, NOW) == "-"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--group", "us"], {"dev-c"}),
        (["--version", "2"], {"dev-a", "dev-b"}),
        (["--model", "fraud"], set()),
    ],
)
def test_drift_filters(
    fleet_store: Fleet, monkeypatch: pytest.MonkeyPatch, args: list[str], expected: set[str]
) -> None:
    output = run(fleet_store, "drift", *args, monkeypatch=monkeypatch)
    assert devices_in(output) == expected
    if not expected:
        assert "no drift reports yet" in output


def test_malformed_reports_lose_cells_not_tables(tmp_path: Path) -> None:
    store = open_store(tmp_path / "fleet.db")
    store.record_event(
        "telemetry", "odd", {"models": [{"model": "churn", "latency_ms": 5}]}, 1, NOW
    )
    store.record_event("telemetry", "odd", {"models": "nope", "rss_bytes": "x"}, 2, NOW)
    store.record_event("drift", "odd", {"model": "churn", "features": [{"name": 3}, 4]}, 1, NOW)
    (row,) = telemetry_rows(store)
    assert (row.device, row.model, row.p95, row.trend) == ("odd", "churn", None, [])
    (drift,) = drift_rows(store)
    assert (drift.status, drift.worst, drift.n) == ("?", None, 0)
    assert "No drift reports yet" not in build_report(store, "churn", now=NOW)


def test_odd_names_are_plotted_as_text(tmp_path: Path) -> None:
    store = open_store(tmp_path / "fleet.db")
    feature = {
        "name": "price $", "kind": "categorical", "ks": 0.5, "threshold": 0.1, "alarm": True,
        "drifting": True, "live": [0.1, 0.9, 0.0], "reference": [0.5, 0.3, 0.2],
        "edges": None, "categories": ["$5", "<b>$10</b>", "other"],
    }  # fmt: skip
    payload = {"model": "churn", "version": 1, "status": "drift", "n": 100, "features": [feature]}
    store.record_event("drift", "_edge$<i>1", payload | {"window_end": NOW.timestamp()}, 1, NOW)
    text = build_report(store, "churn", now=NOW)
    assert len(IMG.findall(text)) == 2  # the histogram and the drift statistic over time
    assert "<b>$10</b>" not in text
    assert "&lt;b&gt;" not in text  # category names are only in the plot
    assert "price $" in text
    assert "_edge$&lt;i&gt;1" in text  # names are text in the page, never markup
    assert "<i>" not in text


def test_sparkline() -> None:
    assert sparkline([]) == ""
    assert sparkline([5, 5, 5]) == "▄▄▄"
    assert sparkline([1, 2, 3]) == "▁▅█"


def test_cli_import_stays_free_of_matplotlib() -> None:
    code = (
        "import sys, edgepack.fleet._cli, edgepack.fleet._report, edgepack.fleet._plots; "
        "print('matplotlib' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "False"


@pytest.fixture(scope="module")
def report(fleet_store: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The report of churn over the whole fleet, written by the console script."""
    out = tmp_path_factory.mktemp("report")
    script = Path(sys.executable).parent / "edgepack-fleet"
    command = [str(script), "--store", fleet_store.store_url, "report", "--model", "churn"]
    result = subprocess.run(
        command, cwd=out, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "report-churn.html"
    return out / "report-churn.html"


def test_report_is_one_self_contained_file(report: Path) -> None:
    assert [p.name for p in report.parent.iterdir()] == [report.name]
    text = report.read_text()
    for external in ("http://", "https://", "<script", "<link", "@import", "url("):
        assert external not in text
    images = IMG.findall(text)
    # versions, one drifting feature (monthly_charges), drift over time, latency over time
    assert len(images) == text.count("<img") == 4
    for data in images:
        assert base64.b64decode(data).startswith(b"\x89PNG\r\n\x1a\n")
    features = text[text.index('id="features"') : text.index('id="drift-over-time"')]
    assert "monthly_charges" in features
    assert "dev-b" in features
    assert "tenure" not in features  # only alarming on dev-c: drifting features take precedence
    for device in DEVICES:
        assert device in text
    assert text.count(">drift</span>") == 1
    assert text.count(">warning</span>") == 1
    assert report.stat().st_mode & 0o777 == 0o644  # a report is for sharing


def test_report_takes_its_times_from_the_clock(
    fleet_store: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "churn.html"
    args = ["report", "--model", "churn", "--hours", "1", "--out", str(out)]
    run(fleet_store, *args, monkeypatch=monkeypatch, now=NOW + timedelta(minutes=1))
    recent = out.read_text()
    assert "Generated 2026-03-02 12:01 UTC" in recent
    assert "No drift reports yet" not in recent  # windows received in the last hour
    run(fleet_store, *args, monkeypatch=monkeypatch, now=NOW + timedelta(hours=2))
    later = out.read_text()
    assert "Generated 2026-03-02 14:00 UTC" in later
    assert "No drift reports yet for churn" in later
    assert "No telemetry yet for churn" in later
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left


def test_report_of_a_group_and_of_nothing(fleet_store: Fleet, tmp_path: Path) -> None:
    store = open_store(fleet_store.store_url)
    us = build_report(store, "churn", group="us")
    assert devices_in(us) == {"dev-c"}
    features = us[us.index('id="features"') : us.index('id="drift-over-time"')]
    assert "tenure" in features
    assert "over their threshold" in features
    assert len(IMG.findall(us)) == 4
    empty = build_report(open_store(tmp_path / "empty.db"), "churn")
    assert "No drift reports yet for churn" in empty
    assert "No telemetry yet" in empty
    assert "<img" not in empty
    later = build_report(store, "churn", since=NOW + timedelta(hours=1))
    assert "No drift reports yet for churn" in later
    assert len(IMG.findall(later)) == 1  # the versions come from the devices' state
    unknown = build_report(store, "nosuchmodel")
    assert "No drift reports yet for nosuchmodel" in unknown
    assert "<img" not in unknown


# -- rendering in a real browser ---------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium() -> str:
    """Chromium's path; installed with apt-get once when missing and we are root."""
    for candidate in (shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        pytest.skip("chromium is not installed (and cannot install it: not root with apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [apt, "install", "-y", "-qq", "chromium"]
    if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run([apt, "update", "-qq"], env=env, capture_output=True, check=False)
        done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot install chromium: {done.stderr.strip()[-300:]}")
    found = shutil.which("chromium")
    if found is None:
        pytest.skip("apt-get installed chromium, but it is not on PATH")
    return found


def test_report_renders_in_headless_chromium(report: Path, chromium: str, tmp_path: Path) -> None:
    from PIL import Image, ImageStat

    shot = tmp_path / "report.png"
    command = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
        "--window-size=1200,2400", report.resolve().as_uri(),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert shot.is_file(), result.stderr[-2000:]
    assert shot.stat().st_size > 20_000
    with Image.open(shot) as image:
        assert image.size == (1200, 2400)
        stddev = ImageStat.Stat(image.convert("RGB")).stddev
    assert max(stddev) > 10, "the screenshot is (nearly) one color"


def test_report_that_cannot_be_written_is_one_error_line(
    fleet_store: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fleet_cli.err, "width", 200)
    out = tmp_path / "missing" / "report.html"
    args = ["--store", fleet_store.store_url, "report", "--model", "churn", "--out", str(out)]
    result = CliRunner().invoke(fleet_cli.cli, args)
    assert result.exit_code == 1
    assert result.output.startswith("error: cannot write the report:"), result.output
    assert f"the folder {out.parent} does not exist: create it" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert list(tmp_path.iterdir()) == []


def test_report_plots_quality_over_time(tmp_path: Path) -> None:
    """Quality reports (labeled windows and CBPE estimates) get their own plot; a candidate's
    and another model's reports are not in it."""
    store = open_store(tmp_path / "fleet.db")
    empty = build_report(store, "churn", now=NOW)
    assert "No quality reports yet for churn" in empty
    for i in range(6):
        end = (NOW + timedelta(minutes=i)).timestamp()
        labeled = {
            "model": "churn",
            "version": 1,
            "status": "ok",
            "window_end": end,
            "metrics": {"accuracy": 0.9 - 0.05 * i, "f1": 0.8},
            "estimated": None,
        }
        estimate = {"model": "churn", "version": 1, "status": "ok", "window_end": end,
                    "metrics": None, "estimated": {"accuracy": 0.88}}  # fmt: skip
        store.record_event("quality", "dev-a", labeled, 2 * i, NOW + timedelta(minutes=i))
        store.record_event("quality", "dev-b", estimate, 2 * i + 1, NOW + timedelta(minutes=i))
    store.record_event(
        "quality", "dev-c", {"model": "churn", "variant": "candidate", "metrics": {"accuracy": 1}},
        99, NOW,
    )  # fmt: skip
    text = build_report(store, "churn", now=NOW)
    section = text[text.index('<section id="quality">') :]
    assert "No quality reports yet" not in section
    assert len(IMG.findall(section)) == 1
    assert "CBPE" in section
    other = build_report(store, "pricing", now=NOW)
    assert "No quality reports yet for pricing" in other
