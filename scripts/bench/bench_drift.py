"""Drift benchmark: edgepack's on-device detector against Evidently's and NannyML's defaults.

All detectors judge the very same windows of synthetic rows:

* **reference**: 20,000 seeded rows of eight features: ``x0``–``x3`` correlated normals
  (N(0, 1), pairwise ρ = 0.7), ``x4`` an independent N(0, 1), ``x5`` a lognormal, ``code`` an
  integer-coded categorical 0–4 and ``cat`` a string categorical with five unequal categories;
  and the model's output ``label`` (``x0 + 0.5·x1 > 0``);
* **stationary stream**: fresh rows from the same distribution, cut into windows of 100 and of
  500 rows, for false alarms per 10,000 rows;
* **shift streams**, per shift kind and window size, several seeded replicates: stationary
  windows, then from a known window on: ``x3`` moves by +0.25σ; ``x3``'s variance grows ×1.5;
  ``cat``'s proportions move; a **subpopulation** (25% of rows) moves by +0.8σ on ``x0``–``x3``
  together (a joint shift, 0.2σ in each marginal); a **correlation break**: in 30% of rows ``x1``
  is mirrored (``x1 → −x1``), so ``x0``–``x1`` are anti-correlated there while every marginal
  (and the label's share) stays exactly the same: per-feature tests cannot see it; the
  **integer-coded category** ``code`` moves 0.07 of its share from level 3 to level 4. Measured
  are the share of shifted windows alarmed (power) and the delay (windows from the shift to the
  first alarm; 0 = the first shifted window).

edgepack builds ``reference.json`` with :func:`edgepack.packager._statistics.reference_statistics`
(as the packager does) and runs one :class:`edgepack.agent._drift.DriftDetector` per stream (a fresh
device), one batch per window; it reports the single-window alarm (status ``warning`` or worse),
the persistent ``drift`` status, and, where the detector's report carries a ``multivariate``
entry, that entry's alarm on its own (the status already counts it).

Evidently runs ``Report([DataDriftPreset()])`` with every default, as its docs show. That costs
about half a second a window (mostly drawing the report's plots), so the preset runs on a few
windows of each stream only, and the rates come from calling the same per-column tests the preset
picks (``get_stattest`` with no method, no threshold); the script checks that both paths agree on
every window the preset ran. An Evidently alarm is either "dataset drift" (the preset's verdict:
at least half of the columns drifted) or any column drifted.

NannyML runs its ``UnivariateDriftCalculator`` (default methods and thresholds, every column the
others see) and its ``DataReconstructionDriftCalculator`` (PCA reconstruction error over the
features, default thresholds from the reference's chunks), fitted on the same reference, chunked
with ``chunk_size`` = the window, so every chunk is one window. A NannyML alarm is any column
alerted, the reconstruction error alerted, or either. A last section compares NannyML's CBPE
(estimated accuracy without labels) with the true accuracy on streams with known labels (a
covariate shift toward the decision boundary, and a concept drift CBPE cannot see); edgepack's
own estimate joins it when ``edgepack.agent._quality`` provides one (see ``edgepack_quality``).

Neither comparator is a dependency of edgepack: without one the script says so and skips its
rows. Evidently 0.7 does not import with pandas 3, so they need their own environment, e.g.
``python3 -m venv /tmp/nml && /tmp/nml/bin/pip install nannyml evidently 'pandas<3' onnx
cryptography packaging scipy`` and then ``/tmp/nml/bin/python scripts/bench/bench_drift.py``.
It writes the tables into BENCHMARKS.md between the ``<!-- drift -->`` markers unless
``--print-only``; ``--quick`` (windows of 500, 3 replicates, fewer stationary rows), ``--windows``,
``--kinds``, ``--replicates``, ``--no-evidently``, ``--no-nannyml``, ``--no-quality`` run a
subset. Run: ``.venv/bin/python scripts/bench/bench_drift.py``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
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
STATIONARY_ROWS = 500_000  # per window size: 5,000 windows of 100, 1,000 of 500
REPLICATES = 10  # shift streams per shift kind and window size
PRE, POST = 5, 15  # stationary windows, then shifted windows, in each shift stream
PRESET_WINDOWS = 5  # windows per stream kind and window size that run the full preset
CORRELATED = ("x0", "x1", "x2", "x3")
RHO = 0.7  # pairwise correlation of x0–x3
NUMERIC = (*CORRELATED, "x4", "x5")  # x4: independent N(0, 1); x5: lognormal(0, 0.5)
FEATURES = (*NUMERIC, "code", "cat")
COLUMNS = (*FEATURES, "label")
CATEGORIES = ("a", "b", "c", "d", "e")
CAT_P = (0.40, 0.25, 0.15, 0.12, 0.08)
CAT_SHIFTED = (0.30, 0.25, 0.15, 0.17, 0.13)  # 0.10 moved from the largest to the two smallest
CODE_P = (0.30, 0.25, 0.20, 0.15, 0.10)  # integer codes 0–4
CODE_SHIFTED = (0.30, 0.25, 0.20, 0.08, 0.17)  # 0.07 moved from level 3 to level 4
SHIFTED = "x3"
SUBGROUP, SUBGROUP_SHIFT = 0.25, 0.8  # share of rows, and their move on x0–x3 (in σ)
BROKEN = 0.30  # share of rows whose x1 is mirrored
SHIFTS = {
    "mean": "mean +0.25σ (x3)",
    "variance": "variance ×1.5 (x3)",
    "categorical": "categories a −0.10, d/e +0.05 (cat)",
    "subpopulation": f"subpopulation {SUBGROUP:.0%} +{SUBGROUP_SHIFT}σ on x0–x3",
    "correlation": f"correlation break (x1 → −x1 in {BROKEN:.0%})",
    "code": "code level 3 → 4 (0.07)",
}

Windows = list[pd.DataFrame]
Detector = Callable[[Windows, range], dict[str, np.ndarray]]  # windows, which to cross-check


def score(data: dict[str, Any]) -> np.ndarray:
    """The model's margin: its probability of class 1 is sigmoid(2·score)."""
    return np.asarray(data["x0"]) + 0.5 * np.asarray(data["x1"])


def draw(rng: np.random.Generator, rows: int, shift: str | None = None) -> pd.DataFrame:
    """Rows of the synthetic data, optionally shifted."""
    common = rng.standard_normal(rows)
    data: dict[str, Any] = {
        c: np.sqrt(RHO) * common + np.sqrt(1 - RHO) * rng.standard_normal(rows) for c in CORRELATED
    }
    data["x4"] = rng.standard_normal(rows)
    data["x5"] = rng.lognormal(0.0, 0.5, rows)
    data["code"] = rng.choice(
        len(CODE_P), size=rows, p=CODE_SHIFTED if shift == "code" else CODE_P
    ).astype(np.int64)
    data["cat"] = rng.choice(
        CATEGORIES, size=rows, p=CAT_SHIFTED if shift == "categorical" else CAT_P
    )
    if shift == "mean":
        data[SHIFTED] = data[SHIFTED] + 0.25
    elif shift == "variance":
        data[SHIFTED] = data[SHIFTED] * np.sqrt(1.5)
    elif shift == "subpopulation":
        moved = rng.random(rows) < SUBGROUP
        for c in CORRELATED:
            data[c] = data[c] + SUBGROUP_SHIFT * moved
    elif shift == "correlation":
        mirrored = rng.random(rows) < BROKEN
        data["x1"] = np.where(mirrored, -data["x1"], data["x1"])
    data["label"] = (score(data) > 0).astype(np.int64)
    return pd.DataFrame(data)


def cut(frame: pd.DataFrame, window: int) -> Windows:
    return [frame.iloc[i : i + window].reset_index(drop=True) for i in range(0, len(frame), window)]


@dataclass
class Streams:
    """Every window the detectors judge, for one window size."""

    window: int
    stationary: Windows
    shifted: dict[str, list[Windows]] = field(default_factory=dict)  # kind → replicate streams


def make_streams(window: int, kinds: list[str], replicates: int, stationary: int) -> Streams:
    rng = np.random.default_rng([SEED, window, 0])
    streams = Streams(window, cut(draw(rng, stationary), window))
    for kind in kinds:
        k = list(SHIFTS).index(kind) + 1  # a kind's streams do not depend on which others run
        runs = []
        for r in range(replicates):
            rng = np.random.default_rng([SEED, window, k, r])
            frame = pd.concat([draw(rng, PRE * window), draw(rng, POST * window, kind)])
            runs.append(cut(frame.reset_index(drop=True), window))
        streams.shifted[kind] = runs
    return streams


# -- edgepack ---------------------------------------------------------------------------------


def edgepack_reference(reference: pd.DataFrame, windows: tuple[int, ...]) -> Reference:
    frame = reference.loc[:, list(FEATURES)]
    return reference_statistics(
        frame,
        columns_layout(frame, FEATURES),
        "classification",
        Prediction(labels=reference["label"].to_numpy()),
        windows,
    )


def edgepack_detector(reference: Reference, window: int, seconds: list[float]) -> Detector:
    def run(windows: Windows, _check: range) -> dict[str, np.ndarray]:
        monitor = DriftDetector(reference, window=window, min_rows=window)
        statuses, joint = [], []
        for rows in windows:
            inputs = {c: rows[c].to_numpy().reshape(-1, 1) for c in FEATURES}
            outputs = {"label": rows["label"].to_numpy()}
            start = time.perf_counter()
            monitor.observe(inputs, outputs)
            if not monitor.due():
                raise RuntimeError("a full window did not close")
            report = monitor.close()
            seconds.append(time.perf_counter() - start)
            statuses.append(report["status"])
            # the multivariate entry, where this detector has one (None: no numeric pair)
            multivariate = report.get("multivariate")
            joint.append(None if multivariate is None else bool(multivariate["alarm"]))
        status = np.asarray(statuses)
        out = {"alarm (warning)": status != "ok", "drift (verdict)": status == "drift"}
        if all(j is not None for j in joint):
            out["multivariate alone"] = np.asarray(joint, dtype=bool)
        return out

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
        self.reference = reference.loc[:, list(COLUMNS)]
        definition = ev.Dataset.from_pandas(
            self.reference, data_definition=ev.DataDefinition()
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
        snapshot = self.ev.Report([self.ev.DataDriftPreset()]).run(
            rows.loc[:, list(COLUMNS)], self.reference
        )
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


# -- NannyML ----------------------------------------------------------------------------------


def load_nannyml() -> Any | None:
    """The ``nannyml`` module, or None (with a message) where it does not import."""
    os.environ.setdefault("NML_DISABLE_USAGE_LOGGING", "1")  # no usage telemetry
    try:
        import nannyml
    except ImportError as e:
        print(
            f"NannyML is not importable here ({type(e).__name__}: {e}); its rows are skipped. "
            "Install it into a separate environment (`pip install nannyml`) and run this "
            "script from there to compare.",
            file=sys.stderr,
        )
        return None
    return nannyml


def _alerts(frame: pd.DataFrame) -> np.ndarray:
    """Per chunk: whether any ``alert`` column of a NannyML result frame is set."""
    alert = [c for c in frame.columns if c[-1] == "alert"]
    return frame.loc[:, alert].fillna(False).astype(bool).any(axis=1).to_numpy()


class NannyMLDefaults:
    """NannyML's univariate drift and its PCA data-reconstruction drift, every default but the
    chunking (one chunk per window)."""

    def __init__(self, nml: Any, reference: pd.DataFrame, window: int) -> None:
        self.window = window
        self.seconds: list[float] = []  # per window, both calculators
        self.univariate = nml.UnivariateDriftCalculator(
            column_names=list(COLUMNS), chunk_size=window
        )
        self.reconstruction = nml.DataReconstructionDriftCalculator(
            column_names=list(FEATURES), chunk_size=window
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.univariate.fit(reference.loc[:, list(COLUMNS)])
            self.reconstruction.fit(reference.loc[:, list(FEATURES)])

    def methods(self) -> str:
        calc = self.univariate
        parts = []
        for kind in ("continuous", "categorical"):
            names = getattr(calc, f"{kind}_column_names", None)
            methods = getattr(calc, f"{kind}_method_names", None) or getattr(
                calc, f"{kind}_methods", None
            )
            if names:
                methods = ", ".join(map(str, methods or ["?"]))
                parts.append(f"{kind} ({methods}): {', '.join(names)}")
        return "; ".join(parts)

    def detector(self) -> Detector:
        def run(windows: Windows, _check: range) -> dict[str, np.ndarray]:
            frame = pd.concat(windows, ignore_index=True)
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                univariate = self.univariate.calculate(frame.loc[:, list(COLUMNS)])
                reconstruction = self.reconstruction.calculate(frame.loc[:, list(FEATURES)])
            elapsed = time.perf_counter() - start
            self.seconds += [elapsed / len(windows)] * len(windows)
            u = _alerts(univariate.filter(period="analysis").to_df())
            r = _alerts(reconstruction.filter(period="analysis").to_df())
            if len(u) != len(windows) or len(r) != len(windows):
                raise RuntimeError(f"NannyML made {len(u)}/{len(r)} chunks of {len(windows)}")
            return {"any column alerted": u, "reconstruction error": r, "either": u | r}

        return run


# -- estimated quality (CBPE) -----------------------------------------------------------------

QUALITY_KINDS = {
    "stationary": "stationary",
    "covariate": "x0–x3 ×0.5 (rows nearer the boundary)",
    "concept": "concept drift (truth from x0 − 0.5·x1)",
}


def labelled(rng: np.random.Generator, rows: int, kind: str = "stationary") -> pd.DataFrame:
    """Rows with the model's probability, its prediction and a drawn true label: the model is
    calibrated on the reference, so its accuracy there is the mean top probability."""
    frame = draw(rng, rows)
    if kind == "covariate":
        for c in CORRELATED:
            frame[c] = frame[c] * 0.5
    margin = score(frame)
    frame["proba"] = 1 / (1 + np.exp(-2 * margin))
    frame["label"] = (margin > 0).astype(np.int64)
    truth_margin = margin if kind != "concept" else frame["x0"] - 0.5 * frame["x1"]
    frame["truth"] = (rng.random(rows) < 1 / (1 + np.exp(-2 * truth_margin))).astype(np.int64)
    return frame


def edgepack_quality(
    reference: pd.DataFrame, window: int
) -> Callable[[Windows], tuple[np.ndarray, np.ndarray]] | None:
    """edgepack's own estimated accuracy per window (CBPE-style: the top class probability,
    calibrated on held-out rows with known truth, no labels on the device), or None where this
    checkout has no ``edgepack.agent._quality`` yet (or its API differs; the message says).

    The quality reference is built from ``reference`` (``proba``, ``label``, ``truth``) by
    ``edgepack.packager._quality.quality_reference`` as the packager does, and each window's
    top probabilities go to a fresh ``QualityTracker`` whose estimate windows are ``window``
    rows."""
    try:
        from edgepack.agent._quality import QualityTracker
        from edgepack.packager._quality import quality_reference
    except ImportError as e:
        print(f"edgepack has no quality estimate here ({e}); NannyML's CBPE alone", file=sys.stderr)
        return None
    proba = reference["proba"].to_numpy()
    try:
        document = quality_reference(
            "classification",
            reference["truth"],
            Prediction(
                labels=reference["label"].to_numpy(),
                probabilities=np.column_stack([1 - proba, proba]),
            ),
            [0, 1],
        )
    except Exception as e:  # noqa: BLE001 - the quality code may be mid-change
        print(f"edgepack's quality reference failed ({type(e).__name__}: {e})", file=sys.stderr)
        return None

    def estimate(windows: Windows) -> tuple[np.ndarray, np.ndarray]:
        tracker = QualityTracker("classification", document, window=window, estimate_window=window)
        values: list[float] = []
        alarms: list[bool] = []
        for rows in windows:
            p = rows["proba"].to_numpy()
            tracker.predicted(np.maximum(p, 1 - p))
            for r in tracker.close_due():
                if r.get("estimated"):
                    values.append(r["estimated"]["accuracy"])
                    alarms.append(bool(r["estimated"]["alarm"]))
        if len(values) != len(windows):
            raise RuntimeError(f"{len(values)} estimates for {len(windows)} windows")
        return np.asarray(values), np.asarray(alarms, dtype=bool)

    return estimate


def quality_section(nml: Any | None, window: int, replicates: int) -> list[str]:
    reference = labelled(np.random.default_rng([SEED, 7]), REFERENCE_ROWS)
    streams: dict[str, list[pd.DataFrame]] = {}
    for k, kind in enumerate(QUALITY_KINDS):
        runs = []
        for r in range(replicates):
            rng = np.random.default_rng([SEED, 8, window, k, r])
            runs.append(
                pd.concat(
                    [labelled(rng, PRE * window), labelled(rng, POST * window, kind)],
                    ignore_index=True,
                )
            )
        streams[kind] = runs
    estimators: dict[str, Callable[[pd.DataFrame], tuple[np.ndarray, np.ndarray]]] = {}
    if nml is not None:
        cbpe = nml.CBPE(
            y_pred_proba="proba",
            y_pred="label",
            y_true="truth",
            problem_type="classification_binary",
            metrics=["accuracy"],
            chunk_size=window,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cbpe.fit(reference.loc[:, ["proba", "label", "truth", *FEATURES]])

        def nannyml_cbpe(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = cbpe.estimate(frame.loc[:, ["proba", "label", *FEATURES]])
            out = result.filter(period="analysis").to_df()
            return (
                out[("accuracy", "value")].to_numpy(dtype=float),
                out[("accuracy", "alert")].fillna(False).astype(bool).to_numpy(),
            )

        estimators[f"NannyML {package_version('nannyml')} CBPE"] = nannyml_cbpe
    ours = edgepack_quality(reference, window)
    if ours is not None:
        estimators["edgepack"] = lambda frame: ours(cut(frame, window))
    lines = [
        "",
        f"**Estimated accuracy without labels** (windows of {window}, {replicates} streams per "
        f"kind, each {PRE} stationary windows then {POST} of the kind; the model is calibrated on "
        "the reference, the true label is drawn from its probability, except under concept "
        "drift). Columns: mean true accuracy of the shifted windows, the mean estimate, the mean "
        "absolute error of the estimate per window (all windows, and shifted ones), and the "
        "share of shifted windows whose estimate alerted (default thresholds).",
        "",
    ]
    if not estimators:
        return [
            *lines,
            "NannyML is not importable where this ran, edgepack's estimate is not "
            "wired yet: nothing to compare.",
        ]
    if ours is None:
        lines += [
            "*edgepack*: no CBPE-style estimate (`edgepack.agent._quality`) where this ran "
            "(hook: `edgepack_quality` in the script); NannyML's alone against the truth.",
            "",
        ]
    else:
        lines += [
            "*edgepack*: `edgepack.agent._quality.QualityTracker` (estimate windows of the same "
            "size) on a `quality.json` built by `edgepack.packager._quality.quality_reference` "
            "from the reference rows' probabilities and truth (isotonic calibration of the top "
            "probability on up to 5,000 of the reference rows); alerted: its estimate alarm.",
            "",
        ]
    lines += [
        "| estimator | stream | true accuracy (shifted) | estimated (shifted) | "
        "mean abs error (all / shifted) | alerted (shifted) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, estimate in estimators.items():
        for kind, runs in streams.items():
            truth, guess, alerts = [], [], []
            for frame in runs:
                windows = cut(frame, window)
                truth.append([float((w["label"] == w["truth"]).mean()) for w in windows])
                value, alert = estimate(frame)
                guess.append(value)
                alerts.append(alert[PRE:] if len(alert) else np.zeros(0, bool))
            t, g = np.asarray(truth), np.asarray(guess)
            error = np.abs(g - t)
            alerted = np.concatenate(alerts)
            lines.append(
                f"| {name} | {QUALITY_KINDS[kind]} | {t[:, PRE:].mean():.3f} | "
                f"{g[:, PRE:].mean():.3f} | {error.mean():.3f} / {error[:, PRE:].mean():.3f} | "
                + (f"{alerted.mean():.0%}" if len(alerted) else "—")
                + " |"
            )
    return lines


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
                if name in outcomes:
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


def rows_for(
    label: str, window: int, outcomes: dict[str, Outcome], ms: str, kinds: list[str]
) -> list[str]:
    return [
        f"| {label} | {name} | {window} | {false_alarms(o.stationary, window)} | "
        + " | ".join(detection(o.shifted[kind]) if kind in o.shifted else "—" for kind in kinds)
        + f" | {ms} |"
        for name, o in outcomes.items()
    ]


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--print-only", action="store_true", help="do not write BENCHMARKS.md")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="windows of 500, 3 replicates, 20,000 stationary rows (implies --print-only)",
    )
    parser.add_argument("--windows", type=int, nargs="+", help=f"window sizes (default {WINDOWS})")
    parser.add_argument("--kinds", nargs="+", choices=list(SHIFTS), help="shift kinds (all)")
    parser.add_argument("--replicates", type=int, help=f"streams per kind (default {REPLICATES})")
    parser.add_argument("--stationary-rows", type=int, help=f"default {STATIONARY_ROWS:,}")
    parser.add_argument("--no-evidently", action="store_true")
    parser.add_argument("--no-nannyml", action="store_true")
    parser.add_argument("--no-quality", action="store_true", help="skip the CBPE section")
    args = parser.parse_args()
    if args.quick:
        args.print_only = True
        args.windows = args.windows or [500]
        args.replicates = args.replicates or 3
        args.stationary_rows = args.stationary_rows or 20_000
    args.windows = tuple(args.windows or WINDOWS)
    args.kinds = list(args.kinds or SHIFTS)
    args.replicates = args.replicates or REPLICATES
    args.stationary_rows = args.stationary_rows or STATIONARY_ROWS
    return args


def main() -> None:
    args = arguments()
    kinds, windows = args.kinds, args.windows
    began = time.perf_counter()
    load = os.getloadavg()[0]
    reference = draw(np.random.default_rng([SEED, 1]), REFERENCE_ROWS)
    start = time.perf_counter()
    document = edgepack_reference(reference, windows)
    build_s = time.perf_counter() - start
    ev = None if args.no_evidently else load_evidently()
    nml = None if args.no_nannyml else load_nannyml()
    evidently = EvidentlyDefaults(ev, reference) if ev is not None else None
    nannyml_methods = ""
    table: list[str] = []
    for window in windows:
        streams = make_streams(window, kinds, args.replicates, args.stationary_rows)
        seconds: list[float] = []
        outcomes = judge(edgepack_detector(document, window, seconds), streams)
        table += rows_for("edgepack", window, outcomes, f"{1000 * np.median(seconds):.2f}", kinds)
        print(
            f"edgepack, windows of {window}: done ({time.perf_counter() - began:.0f} s)",
            file=sys.stderr,
        )
        if evidently is not None:
            evidently.tests_seconds.clear()
            evidently.preset_seconds.clear()
            outcomes = judge(evidently.detector(), streams)
            ms = (
                f"{1000 * np.median(evidently.tests_seconds):.1f} "
                f"(preset {1000 * np.median(evidently.preset_seconds):,.0f})"
            )
            table += rows_for(f"Evidently {ev.version}", window, outcomes, ms, kinds)
            print(
                f"Evidently, windows of {window}: done ({time.perf_counter() - began:.0f} s)",
                file=sys.stderr,
            )
        if nml is not None:
            nanny = NannyMLDefaults(nml, reference, window)
            nannyml_methods = nanny.methods()
            outcomes = judge(nanny.detector(), streams)
            ms = f"{1000 * np.median(nanny.seconds):.1f}"
            table += rows_for(f"NannyML {package_version('nannyml')}", window, outcomes, ms, kinds)
            print(
                f"NannyML, windows of {window}: done ({time.perf_counter() - began:.0f} s)",
                file=sys.stderr,
            )
    quality: list[str] = []
    if not args.no_quality:
        quality = quality_section(nml, max(windows), args.replicates)
        print(f"quality: done ({time.perf_counter() - began:.0f} s)", file=sys.stderr)
    total_s = time.perf_counter() - began

    calibration = document.calibration
    thresholds = {
        w: [c.thresholds[w].ks for c in document.columns if w in c.thresholds] for w in windows
    }
    versions = (
        f"Python {platform.python_version()}, numpy {np.__version__}, pandas {pd.__version__}, "
        f"scipy {package_version('scipy')}"
        + (f", Evidently {ev.version}" if ev else "")
        + (f", NannyML {package_version('nannyml')}" if nml else "")
    )
    notes = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores (load average {load:.2f} at "
        f"start, {os.getloadavg()[0]:.2f} at the end); {versions}. "
        f"Numbers from `scripts/bench/bench_drift.py` ({total_s:.0f} s in all).",
        "",
        f"Data (seed {SEED}): {REFERENCE_ROWS:,} reference rows of four correlated N(0, 1) "
        f"features x0–x3 (pairwise ρ = {RHO}), an independent N(0, 1) x4, a lognormal x5, an "
        f"integer-coded categorical `code` 0–4 (p = {', '.join(map(str, CODE_P))}), a string "
        f"categorical `cat` (p = {', '.join(map(str, CAT_P))}) and the model's output (a 0/1 "
        f"label from x0 + 0.5·x1), {len(COLUMNS)} monitored columns. Stationary: "
        f"{args.stationary_rows:,} fresh rows per window size. Shifts: {args.replicates} seeded "
        f"streams per shift and window size, each {PRE} stationary windows then {POST} shifted "
        f"ones; shifted `cat` p = {', '.join(map(str, CAT_SHIFTED))}, shifted `code` p = "
        f"{', '.join(map(str, CODE_SHIFTED))}. The subpopulation shift moves {SUBGROUP:.0%} of "
        f"rows by +{SUBGROUP_SHIFT}σ on x0–x3 together; the correlation break mirrors x1 in "
        f"{BROKEN:.0%} of rows, which leaves every marginal (and the label's) unchanged. The same "
        "windows go to every detector.",
        "",
        "*edgepack*: `reference.json` from `edgepack.packager._statistics.reference_statistics` "
        f"({document.rows:,} rows define the bins, {document.holdout_rows:,} calibrate; built in "
        f"{build_s:.1f} s), judged by `edgepack.agent._drift.DriftDetector`, one fresh monitor "
        "per stream. Binned KS or PSI per column and, over the numeric features together, "
        "reconstruction error, T² or the shift along the leading principal axis (the "
        "multivariate test at two thirds of alpha, weighted 1 : 1 : 4; the columns share the "
        "third left), each test calibrated by bootstrap at its Bonferroni share of alpha "
        f"{calibration.alpha}"
        "(KS thresholds for windows of "
        + "; ".join(f"{w}: {min(t):.3f}–{max(t):.3f}" for w, t in thresholds.items() if t)
        + "). *alarm (warning)*: any column (or the multivariate statistic, where the detector "
        "has one) over a threshold in this window; *drift (verdict)*: the persistent status "
        "`drift`"
        + (
            f"; *multivariate alone*: the report's multivariate entry alone (over "
            f"{', '.join(document.multivariate.features)})."
            if getattr(document, "multivariate", None) is not None
            else " (this detector has no multivariate statistic)."
        ),
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
            "shift); the rates call the same per-column tests the preset picks on every window "
            f"(they agreed on the drifted count in {evidently.checked - evidently.disagreed} of "
            f"{evidently.checked} windows, largest score difference "
            f"{evidently.largest_gap:.1e}). Its ms column gives the tests' time and, in brackets, "
            "the full preset's.",
        ]
    else:
        notes += ["", "*Evidently*: not importable where this ran (or skipped); no rows."]
    if nml is not None:
        notes += [
            "",
            f"*NannyML {package_version('nannyml')}*: `UnivariateDriftCalculator(column_names, "
            "chunk_size=window)` with its default methods "
            f"({nannyml_methods}) and thresholds (alert when a chunk's distance exceeds the "
            "reference chunks' mean + 3 standard deviations), and "
            "`DataReconstructionDriftCalculator(features, chunk_size=window)` (PCA keeping 65% "
            "of the variance; alert when a chunk's mean reconstruction error leaves the "
            "reference chunks' mean ± 3 standard deviations), "
            f"both fitted on the {REFERENCE_ROWS:,} reference rows; each stream's windows go to "
            "`calculate` together, one chunk per window. *any column alerted*, *reconstruction "
            "error*, *either*. ms: a stream's `calculate` time (both calculators) per window.",
        ]
    else:
        notes += ["", "*NannyML*: not importable where this ran (or skipped); no rows."]
    notes += [
        "",
        "False alarms: alarmed stationary windows per 10,000 stationary rows (share of windows in "
        "brackets). Shift columns: share of shifted windows alarmed (power) / mean delay in "
        "windows from the shift to the first alarm (0 = the first shifted window; rows to alarm "
        "= (delay + 1) × window), over the streams that alarmed at all. ms: median time to judge "
        "one window (edgepack: `observe` + `close` of one full window).",
        "",
        "| detector | alarm | window | false alarms per 10k rows | "
        + " | ".join(SHIFTS[k] for k in kinds)
        + " | ms per window |",
        "| --- | --- | ---: | ---: | " + "---: | " * len(kinds) + "---: |",
        *table,
        *quality,
    ]
    body = "\n".join(notes)
    if not args.print_only:
        write_section(MARK, "## Drift: edgepack vs Evidently and NannyML", body)
    print(body)


if __name__ == "__main__":
    main()
