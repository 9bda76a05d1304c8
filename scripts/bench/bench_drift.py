"""Drift benchmark: edgepack's on-device detector against Evidently's default drift preset.

Both detectors judge the very same windows of synthetic rows:

* **reference**: 20,000 seeded rows of six N(0, 1) features ``x0``–``x5``, one categorical
  feature ``cat`` with five unequal categories, and the model's output ``label``
  (``x0 + 0.5·x1 > 0``, so no shift below touches it);
* **stationary stream**: fresh rows from the same distribution, cut into windows of 100 and of
  500 rows, for false alarms per 10,000 rows;
* **shift streams**, per shift type and window size, several seeded replicates: stationary
  windows, then from a known window on ``x3`` moves by +0.25σ, or ``x3``'s variance grows ×1.5,
  or ``cat``'s proportions move; measured are the share of shifted windows alarmed and the delay
  (windows from the shift to the first alarm; 0 = the first shifted window).

edgepack builds ``reference.json`` with :func:`edgepack.packager._statistics.reference_statistics`
(as the packager does) and runs one :class:`edgepack.agent._drift.DriftDetector` per stream (a fresh
device), one batch per window; it reports both a single-window alarm (status ``warning`` or worse)
and the persistent ``drift`` status (the same column alarmed in 2 of the last 3 windows).

Evidently runs ``Report([DataDriftPreset()])`` with every default, as its docs show. That costs
about two seconds a window (mostly drawing the report's plots), so the preset runs on a few
windows of each stream only, and the rates come from calling the same per-column tests the preset
picks (``get_stattest`` with no method, no threshold: with over 1,000 reference rows, normed
Wasserstein ≥ 0.1 for numbers and Jensen–Shannon distance ≥ 0.1 for categories); the script
checks that both paths agree on every window the preset ran. An Evidently alarm is either
"dataset drift" (the preset's verdict: at least half of the columns drifted) or any column drifted.

Evidently is not a dependency of edgepack: without it the script says so and skips its rows.
Evidently 0.7 does not import with pandas 3, so it may need a separate environment, e.g.
``python -m venv /tmp/ev && /tmp/ev/bin/pip install evidently 'pandas<3' onnx`` and then
``/tmp/ev/bin/python scripts/bench/bench_drift.py``. It writes the table into BENCHMARKS.md
between the ``<!-- drift -->`` markers. Run: ``.venv/bin/python scripts/bench/bench_drift.py``.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version as package_version
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import write_section  # noqa: E402

from edgepack.agent._drift import DriftDetector  # noqa: E402
from edgepack.formats.reference import Reference  # noqa: E402
from edgepack.packager._converters import Prediction  # noqa: E402
from edgepack.packager._reference import columns_layout  # noqa: E402
from edgepack.packager._statistics import reference_statistics  # noqa: E402

MARK = "drift"
SEED = 2024
REFERENCE_ROWS = 20_000
WINDOWS = (100, 500)
STATIONARY_ROWS = 100_000  # per window size: 1,000 windows of 100, 200 of 500
REPLICATES = 10  # shift streams per shift type and window size
PRE, POST = 5, 15  # stationary windows, then shifted windows, in each shift stream
PRESET_WINDOWS = 5  # windows per stream kind and window size that run the full preset
FEATURES = ("x0", "x1", "x2", "x3", "x4", "x5", "cat")
COLUMNS = (*FEATURES, "label")
CATEGORIES = ("a", "b", "c", "d", "e")
CAT_P = (0.40, 0.25, 0.15, 0.12, 0.08)
CAT_SHIFTED = (0.30, 0.25, 0.15, 0.17, 0.13)  # 0.10 moved from the largest to the two smallest
SHIFTED = "x3"
SHIFTS = {
    "mean": "mean +0.25σ (x3)",
    "variance": "variance ×1.5 (x3)",
    "categorical": "categories a −0.10, d/e +0.05 each",
}

Windows = list[pd.DataFrame]
Detector = Callable[[Windows, range], dict[str, np.ndarray]]  # windows, which to cross-check


def draw(rng: np.random.Generator, rows: int, shift: str | None = None) -> pd.DataFrame:
    """Rows of the synthetic data, optionally shifted."""
    data: dict[str, Any] = {f"x{i}": rng.standard_normal(rows) for i in range(6)}
    data["cat"] = rng.choice(
        CATEGORIES, size=rows, p=CAT_SHIFTED if shift == "categorical" else CAT_P
    )
    if shift == "mean":
        data[SHIFTED] = data[SHIFTED] + 0.25
    elif shift == "variance":
        data[SHIFTED] = data[SHIFTED] * np.sqrt(1.5)
    data["label"] = (data["x0"] + 0.5 * data["x1"] > 0).astype(np.int64)
    return pd.DataFrame(data)


def cut(frame: pd.DataFrame, window: int) -> Windows:
    return [frame.iloc[i : i + window].reset_index(drop=True) for i in range(0, len(frame), window)]


@dataclass
class Streams:
    """Every window both detectors judge, for one window size."""

    window: int
    stationary: Windows
    shifted: dict[str, list[Windows]] = field(default_factory=dict)  # kind → replicate streams


def make_streams(window: int) -> Streams:
    rng = np.random.default_rng([SEED, window, 0])
    streams = Streams(window, cut(draw(rng, STATIONARY_ROWS), window))
    for k, kind in enumerate(SHIFTS, start=1):
        replicates = []
        for r in range(REPLICATES):
            rng = np.random.default_rng([SEED, window, k, r])
            frame = pd.concat([draw(rng, PRE * window), draw(rng, POST * window, kind)])
            replicates.append(cut(frame.reset_index(drop=True), window))
        streams.shifted[kind] = replicates
    return streams


# -- edgepack ---------------------------------------------------------------------------------


def edgepack_reference(reference: pd.DataFrame) -> Reference:
    frame = reference.loc[:, list(FEATURES)]
    return reference_statistics(
        frame,
        columns_layout(frame, FEATURES),
        "classification",
        Prediction(labels=reference["label"].to_numpy()),
    )


def edgepack_detector(reference: Reference, window: int, seconds: list[float]) -> Detector:
    def run(windows: Windows, _check: range) -> dict[str, np.ndarray]:
        monitor = DriftDetector(reference, window=window, min_rows=window)
        statuses = []
        for rows in windows:
            inputs = {c: rows[c].to_numpy().reshape(-1, 1) for c in FEATURES}
            outputs = {"label": rows["label"].to_numpy()}
            start = time.perf_counter()
            monitor.observe(inputs, outputs)
            if not monitor.due():
                raise RuntimeError("a full window did not close")
            statuses.append(monitor.close()["status"])
            seconds.append(time.perf_counter() - start)
        status = np.asarray(statuses)
        return {"alarm (warning)": status != "ok", "drift (2 of 3)": status == "drift"}

    return run


# -- Evidently --------------------------------------------------------------------------------


def load_evidently() -> SimpleNamespace | None:
    """Evidently's ≥ 0.7 API, or None (with a message) where it does not import."""
    os.environ.setdefault("DO_NOT_TRACK", "1")  # no usage telemetry from the benchmark
    try:
        from evidently import DataDefinition, Dataset, Report
        from evidently.legacy.calculations.stattests.registry import get_stattest
        from evidently.presets import DataDriftPreset
    except ImportError as e:
        print(
            f"Evidently is not importable here ({type(e).__name__}: {e}); its rows are skipped. "
            "Install it (and pandas<3, which Evidently 0.7 needs) into a separate environment "
            "and run this script from there to compare.",
            file=sys.stderr,
        )
        return None
    return SimpleNamespace(
        version=package_version("evidently"),
        Report=Report,
        DataDriftPreset=DataDriftPreset,
        Dataset=Dataset,
        DataDefinition=DataDefinition,
        get_stattest=get_stattest,
    )


class EvidentlyDefaults:
    """Evidently's default drift preset, as the full report and as its per-column tests."""

    def __init__(self, ev: SimpleNamespace, reference: pd.DataFrame) -> None:
        self.ev = ev
        self.reference = reference
        definition = ev.Dataset.from_pandas(
            reference, data_definition=ev.DataDefinition()
        ).data_definition
        self.types = {c: definition.get_column_type(c) for c in COLUMNS}
        self.methods: dict[str, str] = {}  # column → the test the preset picks
        self.tests_seconds: list[float] = []
        self.preset_seconds: list[float] = []
        self.checked = 0
        self.disagreed = 0
        self.largest_gap = 0.0

    def tests(self, rows: pd.DataFrame) -> dict[str, float]:
        """Each column's drift score by the test the preset would pick, and the drifted count."""
        scores: dict[str, float] = {}
        drifted = 0
        for column in COLUMNS:
            ref, cur, kind = self.reference[column], rows[column], self.types[column]
            test = self.ev.get_stattest(ref, cur, kind, None)
            result = test(ref, cur, kind, None)
            self.methods[column] = f"{test.display_name} ≥ {result.actual_threshold:g}"
            scores[column] = float(result.drift_score)
            drifted += bool(result.drifted)
        scores["__drifted__"] = drifted
        return scores

    def preset(self, rows: pd.DataFrame) -> dict[str, float]:
        """The full ``Report([DataDriftPreset()])`` on one window, timed."""
        start = time.perf_counter()
        snapshot = self.ev.Report([self.ev.DataDriftPreset()]).run(rows, self.reference)
        self.preset_seconds.append(time.perf_counter() - start)
        scores: dict[str, float] = {}
        for metric in snapshot.dict()["metrics"]:
            if metric["metric_name"].startswith("DriftedColumnsCount"):
                scores["__drifted__"] = metric["value"]["count"]
            elif metric["metric_name"].startswith("ValueDrift"):
                scores[metric["config"]["column"]] = float(metric["value"])
        return scores

    def detector(self) -> Detector:
        def run(windows: Windows, check: range) -> dict[str, np.ndarray]:
            drifted = []
            for i, rows in enumerate(windows):
                start = time.perf_counter()
                scores = self.tests(rows)
                self.tests_seconds.append(time.perf_counter() - start)
                drifted.append(scores["__drifted__"])
                if i in check:
                    self._check(scores, self.preset(rows))
            count = np.asarray(drifted)
            return {
                "dataset drift (preset)": count / len(COLUMNS) >= 0.5,
                "any column drifted": count > 0,
            }

        return run

    def _check(self, tests: dict[str, float], preset: dict[str, float]) -> None:
        self.checked += 1
        if tests["__drifted__"] != preset["__drifted__"]:
            self.disagreed += 1
        gaps = [abs(tests[c] - preset[c]) for c in COLUMNS]
        self.largest_gap = max(self.largest_gap, *gaps)


# -- the table --------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One detector variant at one window size: verdicts per window, per stream."""

    stationary: np.ndarray
    shifted: dict[str, list[np.ndarray]] = field(default_factory=dict)


def judge(detector: Detector, streams: Streams) -> dict[str, Outcome]:
    """Every stream through ``detector``; the preset cross-check runs on the first
    ``PRESET_WINDOWS`` stationary windows and on the first shifted ones of each shift's first
    replicate."""
    stationary = detector(streams.stationary, range(PRESET_WINDOWS))
    outcomes = {name: Outcome(v) for name, v in stationary.items()}
    for kind, replicates in streams.shifted.items():
        for r, windows in enumerate(replicates):
            check = range(PRE, PRE + PRESET_WINDOWS) if r == 0 else range(0)
            for name, verdicts in detector(windows, check).items():
                outcomes[name].shifted.setdefault(kind, []).append(verdicts)
    return outcomes


def false_alarms(verdicts: np.ndarray, window: int) -> str:
    per_10k = verdicts.sum() / (len(verdicts) * window) * 10_000
    return f"{per_10k:.2f} ({verdicts.mean():.1%})"


def detection(replicates: list[np.ndarray]) -> str:
    after = [v[PRE:] for v in replicates]
    rate = float(np.concatenate(after).mean())
    delays = [int(np.argmax(v)) for v in after if v.any()]
    missed = len(after) - len(delays)
    delay = f"{np.mean(delays):.1f}" if delays else "—"
    return f"{rate:.0%} / {delay}" + (f" ({missed} missed)" if missed else "")


def rows_for(label: str, window: int, outcomes: dict[str, Outcome], ms: str) -> list[str]:
    return [
        f"| {label} | {name} | {window} | {false_alarms(o.stationary, window)} | "
        + " | ".join(detection(o.shifted[kind]) for kind in SHIFTS)
        + f" | {ms} |"
        for name, o in outcomes.items()
    ]


def main() -> None:
    began = time.perf_counter()
    load = os.getloadavg()[0]
    reference = draw(np.random.default_rng([SEED, 1]), REFERENCE_ROWS)
    start = time.perf_counter()
    document = edgepack_reference(reference)
    build_s = time.perf_counter() - start
    ev = load_evidently()
    evidently = EvidentlyDefaults(ev, reference) if ev is not None else None
    table: list[str] = []
    for window in WINDOWS:
        streams = make_streams(window)
        seconds: list[float] = []
        outcomes = judge(edgepack_detector(document, window, seconds), streams)
        table += rows_for("edgepack", window, outcomes, f"{1000 * np.median(seconds):.2f}")
        print(f"edgepack, windows of {window}: done", file=sys.stderr)
        if evidently is not None:
            evidently.tests_seconds.clear()
            evidently.preset_seconds.clear()
            outcomes = judge(evidently.detector(), streams)
            ms = (
                f"{1000 * np.median(evidently.tests_seconds):.1f} "
                f"(preset {1000 * np.median(evidently.preset_seconds):,.0f})"
            )
            table += rows_for(f"Evidently {ev.version}", window, outcomes, ms)
            print(f"Evidently, windows of {window}: done", file=sys.stderr)
    total_s = time.perf_counter() - began

    calibration = document["calibration"]
    thresholds = {
        w: [f["thresholds"][str(w)]["ks"] for f in [*document["features"], document["output"]]]
        for w in WINDOWS
    }
    versions = (
        f"Python {platform.python_version()}, numpy {np.__version__}, pandas {pd.__version__}"
        + (f", scipy {package_version('scipy')}, Evidently {ev.version}" if ev else "")
    )
    notes = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores (load average {load:.2f} at "
        f"start, {os.getloadavg()[0]:.2f} at the end); {versions}. "
        f"Numbers from `scripts/bench/bench_drift.py` ({total_s:.0f} s in all).",
        "",
        f"Data (seed {SEED}): {REFERENCE_ROWS:,} reference rows of six N(0, 1) features, one "
        f"categorical feature (5 categories, p = {', '.join(map(str, CAT_P))}) and the model's "
        "output (a 0/1 label from x0 and x1 only), 8 monitored columns. Stationary: "
        f"{STATIONARY_ROWS:,} fresh rows per window size. Shifts: {REPLICATES} seeded streams per "
        f"shift and window size, each {PRE} stationary windows then {POST} shifted ones; shifted "
        f"categories p = {', '.join(map(str, CAT_SHIFTED))}. The same windows go to both "
        "detectors.",
        "",
        "*edgepack*: `reference.json` from `edgepack.packager._statistics.reference_statistics` "
        f"({document['rows']:,} rows define the bins, {document['holdout_rows']:,} calibrate; "
        f"built in {build_s:.1f} s), judged by `edgepack.agent._drift.DriftDetector`, one fresh "
        "monitor per stream. Binned KS and PSI per column (KS: the largest bin gap for `cat` and "
        "the label), each against a bootstrap threshold at "
        f"1 − {calibration['alpha']}/(2·{calibration['columns']}) (KS thresholds for windows of "
        + "; ".join(f"{w}: {min(t):.3f}–{max(t):.3f}" for w, t in thresholds.items())
        + "). *alarm (warning)*: any column over a threshold in this window; *drift (2 of 3)*: "
        "a column over its threshold in 2 of its last 3 windows.",
    ]
    if evidently is not None:
        by_method: dict[str, list[str]] = {}
        for column, method in evidently.methods.items():
            by_method.setdefault(method, []).append(column)
        methods = "; ".join(f"{m} for {', '.join(c)}" for m, c in by_method.items())
        notes += [
            "",
            f"*Evidently {ev.version}*: `Report([DataDriftPreset()]).run(window, reference)` with "
            f"every default, reference = all {REFERENCE_ROWS:,} rows. With over 1,000 reference "
            f"rows its defaults are fixed distances, not tests: {methods}. *dataset drift "
            f"(preset)*: at least half of the {len(COLUMNS)} columns drifted (the preset's "
            "verdict, `drift_share=0.5`); *any column drifted*: one or more. The full preset ran "
            f"on {evidently.checked} windows (at each window size the first {PRESET_WINDOWS} "
            f"stationary windows and the first {PRESET_WINDOWS} shifted windows of one stream per "
            "shift), since much of its time goes into building the report's plots; the rates "
            "below call the same per-column tests the preset picks on every window (they agreed "
            f"on the drifted count in {evidently.checked - evidently.disagreed} of "
            f"{evidently.checked} windows, largest score difference "
            f"{evidently.largest_gap:.1e}). Its ms column gives the tests' time and, in brackets, "
            "the full preset's.",
        ]
    else:
        notes += ["", "*Evidently*: not importable where this ran; its rows are skipped."]
    notes += [
        "",
        "False alarms: alarmed stationary windows per 10,000 stationary rows (share of windows in "
        "brackets). Shift columns: share of shifted windows alarmed / mean delay in windows from "
        "the shift to the first alarm (0 = the first shifted window; rows to alarm = (delay + 1) "
        "× window), over the streams that alarmed at all. ms: median time to judge one window "
        "(edgepack: `observe` + `close` of one full window).",
        "",
        "| detector | alarm | window | false alarms per 10k rows | "
        + " | ".join(SHIFTS.values())
        + " | ms per window |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *table,
    ]
    body = "\n".join(notes)
    write_section(MARK, "## Drift: edgepack vs Evidently", body)
    print(body)


if __name__ == "__main__":
    main()
