"""Drift detection on synthetic data: no alarm when nothing changes, an alarm when something does.

The reference is what ``edgepack build`` would put in a bundle: :func:`reference_statistics` on a
seeded 20,000-row frame (six standard-normal features ``x0``…``x5``, one categorical ``cat`` with
five unequal categories, and a classifier-like label that depends on ``x0`` and ``x1``), read back
from JSON the way the device reads ``reference.json``. Live windows are fresh seeded draws from the
same generator, counted by :class:`DriftDetector` exactly as the agent's monitor thread does.

What is promised (and asserted here):

* **Stationary data**: with the calibrated thresholds (alpha 0.01 over all columns and the
  multivariate test, Bonferroni), at most 2 % of windows alarm, for windows of 500 and of 100
  rows, and the verdict turns at most one of those stray alarms into a ``"drift"`` status.
* **Detection**, windows of 500 rows, the change starting at a window boundary: a 0.25σ mean
  shift, a ×1.5 standard deviation, a categorical shift that moves 0.1 of probability from the
  most to the least frequent category, and a label shift (the output distribution) each reach
  status ``"drift"`` by the **3rd window after the change** in at least 90 % of 20 seeded
  episodes, and within 6 windows in every episode; the drifting column is the changed one and no
  other, or the multivariate test saw it first (and names the shifted feature as the one that
  moved most). A clear shift is "drift" in its first window (test_drift_calibration.py).

Product gaps found here are strict xfails: windows smaller than the smallest calibrated size are
judged by a threshold that is too low, and a ×1.5 *variance* change is nearly invisible to the
binned KS statistic at 500 rows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import KeyPair, write_agent_config

from edgepack.agent._config import load_config
from edgepack.agent._drift import DriftDetector
from edgepack.agent.exceptions import ConfigError
from edgepack.formats.drift import (
    FeatureBins,
    binned_ks,
    calibrate_windows,
    count_categorical,
    count_numeric,
    psi,
    union_thresholds,
)
from edgepack.formats.exceptions import ReferenceFormatError
from edgepack.formats.reference import (
    ColumnKind,
    ColumnReference,
    Reference,
    parse_reference,
    reference_json,
)
from edgepack.packager._converters import Prediction
from edgepack.packager._reference import columns_layout
from edgepack.packager._statistics import WINDOW_SIZES, reference_statistics

NUMERIC = tuple(f"x{i}" for i in range(6))
CATEGORIES = np.array(["a", "b", "c", "d", "e"])
PROBABILITIES = np.array([0.40, 0.25, 0.15, 0.12, 0.08])
REFERENCE_ROWS = 20_000
ALARM_RATE = 0.02  # the promised bound on stationary windows that alarm
EPISODES = 20  # seeded detection episodes per kind of change
WARMUP = 4  # stationary windows before the change
DETECT_BY = 3  # windows after the change by which "drift" must be reported
DETECT_SHARE = 0.9  # of episodes
GIVE_UP = 6  # windows after the change by which every episode must have reported "drift"

Feeds = dict[str, np.ndarray]


def draw(
    rng: np.random.Generator,
    n: int,
    *,
    shift: dict[str, float] | None = None,
    scale: dict[str, float] | None = None,
    probabilities: np.ndarray = PROBABILITIES,
    flip: float = 0.0,
) -> tuple[Feeds, np.ndarray]:
    """``n`` rows as the model's inputs (one ``[n, 1]`` tensor per column) and their labels.

    ``shift`` adds to a feature, ``scale`` multiplies it, ``probabilities`` are the categories',
    and ``flip`` turns that share of ``"neg"`` labels into ``"pos"`` (the output drifts alone).
    """
    columns: dict[str, np.ndarray] = {}
    for name in NUMERIC:
        values = rng.normal(0.0, 1.0, n)
        values = values * (scale or {}).get(name, 1.0) + (shift or {}).get(name, 0.0)
        columns[name] = values
    columns["cat"] = rng.choice(CATEGORIES, n, p=probabilities)
    labels = np.where(columns["x0"] + 0.5 * columns["x1"] > 0, "pos", "neg")
    if flip:
        labels[(labels == "neg") & (rng.random(n) < flip)] = "pos"
    feeds = {
        name: (values.astype(np.float32) if name != "cat" else values).reshape(-1, 1)
        for name, values in columns.items()
    }
    return feeds, labels


@pytest.fixture(scope="module")
def reference() -> Reference:
    """``reference.json`` for the synthetic data, parsed back from its bytes as the device does."""
    feeds, labels = draw(np.random.default_rng(20_000), REFERENCE_ROWS)
    frame = pd.DataFrame({name: values.ravel() for name, values in feeds.items()})
    frame[list(NUMERIC)] = frame[list(NUMERIC)].astype(np.float64)
    layout = columns_layout(frame, [*NUMERIC, "cat"])
    stats = reference_statistics(frame, layout, "classification", Prediction(labels=labels))
    parsed = parse_reference(reference_json(stats))
    assert parsed == stats  # nothing lost on the way through the file
    return parsed


def judge(monitor: DriftDetector, feeds: Feeds, labels: np.ndarray) -> dict[str, Any]:
    """Count one full window and close it, as the agent's monitor does."""
    monitor.observe(feeds, {"label": labels})
    assert monitor.due()
    return monitor.close()


def drifting(report: dict[str, Any]) -> set[str]:
    return {f["name"] for f in report["features"] if f["drifting"]}


# --- the reference document -----------------------------------------------------------------------


def test_reference_document_describes_the_data(reference: Reference) -> None:
    assert reference.format_version == 2
    assert (reference.rows, reference.holdout_rows) == (10_000, 10_000)
    calibration = reference.calibration
    assert calibration is not None
    assert calibration.windows == WINDOW_SIZES == (100, 250, 500, 1000)
    assert (calibration.alpha, calibration.correction) == (0.01, "bonferroni")
    # the tests: six numbers, the category, the label, and the multivariate one
    assert calibration.columns == len(NUMERIC) + 3
    features = {f.name: f for f in reference.features}
    assert list(features) == [*NUMERIC, "cat"]
    for name in NUMERIC:
        assert features[name].kind is ColumnKind.NUMERIC
        assert len(features[name].edges) == 9  # 10 quantile bins of ~1,000 rows each
        assert sum(features[name].counts) == 10_000
        assert max(features[name].counts) - min(features[name].counts) <= 2
    cat = features["cat"]
    assert cat.kind is ColumnKind.CATEGORICAL
    assert cat.categories == ("a", "b", "c", "d", "e")  # most frequent first
    assert cat.other == 0
    assert sum(cat.counts) == 10_000
    assert reference.output is not None
    assert (reference.output.name, reference.output.input) == ("label", None)
    assert sorted(reference.output.categories) == ["neg", "pos"]


def test_thresholds_decrease_with_window_size(reference: Reference) -> None:
    for entry in reference.columns:
        thresholds = [entry.thresholds[w] for w in WINDOW_SIZES]
        for statistic in ("ks", "psi"):
            values = [getattr(t, statistic) for t in thresholds]
            assert values == sorted(values, reverse=True), (entry.name, statistic, values)
            assert len(set(values)) == len(values), (entry.name, statistic, values)
        # binned KS noise shrinks like 1/sqrt(n): 10x the rows, about a third of the threshold
        ratio = thresholds[0].ks / thresholds[-1].ks
        assert math.sqrt(10) * 0.75 < ratio < math.sqrt(10) * 1.25, (entry.name, ratio)


# --- reference.json: one owner, a format version --------------------------------------------------


def test_reference_json_is_canonical_and_round_trips(reference: Reference) -> None:
    raw = reference_json(reference)
    assert raw.endswith(b"}\n")
    assert raw.startswith(b'{\n  "calibration"')
    assert json.loads(raw)["format_version"] == 2
    assert reference_json(parse_reference(raw)) == raw


def test_a_format_1_reference_is_read_and_never_judged(reference: Reference) -> None:
    document = json.loads(reference_json(reference))
    document["format_version"] = 1
    for key in ("calibration", "holdout_rows"):
        del document[key]
    for entry in [*document["features"], document["output"]]:
        del entry["thresholds"]
    old = parse_reference(json.dumps(document).encode())
    assert old.calibration is None
    assert (old.persistence.alarms, old.persistence.of_windows) == (
        2,
        3,
    )
    assert all(not c.thresholds for c in old.columns)
    monitor = DriftDetector(old, window=500, min_rows=500)
    report = judge(monitor, *draw(np.random.default_rng(1), 500, shift={"x2": 3.0}))
    assert report["status"] == "ok"
    assert all(f["threshold"] is None for f in report["features"])


def _edit(reference: Reference, change: Callable[[dict[str, Any]], None]) -> bytes:
    document = json.loads(reference_json(reference))
    change(document)
    return json.dumps(document).encode()


BAD_REFERENCES: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "no version": (lambda d: d.pop("format_version"), "no format_version; rebuild the bundle"),
    "newer version": (
        lambda d: d.update(format_version=3),
        "format_version 3, newer than this edgepack understands .2.: upgrade edgepack",
    ),
    "unknown version": (lambda d: d.update(format_version=0), "format_version 0, which this"),
    "version as text": (lambda d: d.update(format_version="2"), "format_version '2', which"),
    "no features": (lambda d: d.pop("features"), "missing field 'features'"),
    "counts as text": (
        lambda d: d["features"][0].update(counts="many"),
        r"'features\[0\].counts' must be a list",
    ),
    "negative count": (
        lambda d: d["features"][1]["counts"].__setitem__(0, -1),
        r"'features\[1\].counts\[0\]' must be an integer >= 0",
    ),
    "edges unsorted": (
        lambda d: d["features"][0]["edges"].reverse(),
        r"'features\[0\].edges' must be sorted",
    ),
    "unknown kind": (
        lambda d: d["features"][0].update(kind="ordinal"),
        r"'features\[0\].kind' must be 'numeric' or 'categorical'",
    ),
    "categories miscounted": (
        lambda d: d["features"][6]["categories"].pop(),
        r"'features\[6\].categories' must be 5 strings",
    ),
    "no thresholds": (
        lambda d: d["output"].pop("thresholds"),
        "missing field 'output.thresholds'",
    ),
    "threshold as text": (
        lambda d: d["output"]["thresholds"]["100"].update(ks="low"),
        r"'output.thresholds.100.ks' must be a number",
    ),
    "persistence impossible": (
        lambda d: d["calibration"]["persistence"].update(alarms=4),
        r"'calibration.persistence.of_windows' must be an integer >= 4",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REFERENCES))
def test_a_malformed_reference_is_refused_with_what_to_do(reference: Reference, case: str) -> None:
    change, says = BAD_REFERENCES[case]
    with pytest.raises(ReferenceFormatError, match=says):
        parse_reference(_edit(reference, change))


@pytest.mark.parametrize("raw", [b"", b"[1, 2]", b"\xff\xfe", b"[" * 5000])
def test_a_reference_that_is_not_a_json_object_is_refused(raw: bytes) -> None:
    with pytest.raises(ReferenceFormatError, match=r"reference\.json"):
        parse_reference(raw)


def test_calibrate_decreases_with_window_size() -> None:
    reference = np.array([0.1, 0.2, 0.3, 0.4])
    holdout = np.array([1_000, 2_000, 3_000, 4_000])

    def found() -> np.ndarray:
        return calibrate_windows(
            reference, holdout, WINDOW_SIZES, 0.01, 4_000, rng=np.random.default_rng(1)
        )

    for statistic in range(4):  # KS, PSI and their strong thresholds
        values = list(found()[:, statistic])
        assert values == sorted(values, reverse=True), (statistic, values)
    assert np.array_equal(found(), found())  # seeded
    assert np.all(found()[:, 2:] > found()[:, :2])  # strong is beyond


@pytest.mark.parametrize(("bins", "ordered"), [(3, True), (10, True), (21, False)])
def test_calibrate_windows_bounds_the_union_of_both_statistics_on_its_draws(
    bins: int, ordered: bool
) -> None:
    # formats/drift.py: all window sizes in one (draws, windows, bins) draw; PSI by table lookup;
    # both statistics calibrated together: at most level * draws windows exceed either one, and
    # the thresholds are the tightest that keep it so.
    rng = np.random.default_rng(bins)
    reference = rng.dirichlet(np.ones(bins))
    holdout = rng.multinomial(800, rng.dirichlet(np.ones(bins)))
    holdout[0] = 0  # an empty held-out bin: PSI's floor
    level, n = 0.01, 3_000
    found = calibrate_windows(
        reference, holdout, WINDOW_SIZES, level, n, ordered=ordered, rng=np.random.default_rng(3)
    )
    draws = np.random.default_rng(3).multinomial(
        np.array(WINDOW_SIZES), holdout / holdout.sum(), size=(n, len(WINDOW_SIZES))
    )
    for i in range(len(WINDOW_SIZES)):
        ks, value_psi = binned_ks(reference, draws[:, i], ordered), psi(reference, draws[:, i])
        both = np.stack([ks, value_psi], axis=1)
        assert np.allclose(found[i, :2], union_thresholds(both, level))
        exceed = (ks > found[i, 0]) | (value_psi > found[i, 1])
        assert exceed.sum() <= level * n
        # and they are the tightest pair of order statistics that keeps it so
        ranked = -np.sort(-both, axis=0)
        unions = [int(np.any(both > ranked[j], axis=1).sum()) for j in range(int(level * n) + 1)]
        tightest = max(j for j, u in enumerate(unions) if u <= level * n)
        assert np.array_equal(found[i, :2], ranked[tightest])


def test_union_thresholds_count_ties_so_a_lattice_statistic_keeps_its_level() -> None:
    # a statistic with few values (a small window): interpolating a quantile between two atoms
    # would let the whole upper atom alarm; counting keeps the rate at or below the level
    values = np.repeat([0.1, 0.2, 0.3], [9_900, 70, 30])[:, None]
    threshold = union_thresholds(values, 0.005)[0]
    assert threshold == 0.2
    assert (values > threshold).mean() <= 0.005
    assert union_thresholds(values, 0.01)[0] == 0.1  # 1 % allows the 0.2 and 0.3 atoms


def test_a_30_column_calibration_is_reproducible_and_independent_per_column() -> None:
    rng = np.random.default_rng(30)
    names = [f"f{i}" for i in range(30)]
    frame = pd.DataFrame(rng.normal(size=(2_000, 30)) * np.arange(1, 31), columns=names)
    frame["f0"] = rng.choice(CATEGORIES, size=2_000, p=PROBABILITIES)
    frame["f1"] = rng.exponential(size=2_000)
    labels = rng.integers(0, 3, size=2_000)
    layout = columns_layout(frame, names)
    stats = reference_statistics(frame, layout, "classification", Prediction(labels=labels))
    again = reference_statistics(frame, layout, "classification", Prediction(labels=labels))
    assert reference_json(stats) == reference_json(again)  # reproducible: seeded per column
    assert stats.multivariate is not None
    assert len(stats.multivariate.features) == 29
    # columns draw independently: two columns with the same data get different thresholds
    twin = frame.assign(f29=frame["f28"] / 29 * 30)
    stats = reference_statistics(twin, layout, "classification", Prediction(labels=labels))
    assert stats.features[28].edges != stats.features[29].edges  # scaled copy: same bins by rank
    assert stats.features[28].counts == stats.features[29].counts
    assert stats.features[28].thresholds != stats.features[29].thresholds


def test_binned_ks_equals_hand_computation() -> None:
    reference = np.array([0.25, 0.25, 0.25, 0.25])
    counts = np.array([7, 7, 3, 3])  # live 0.35 0.35 0.15 0.15: gaps +.1 +.1 -.1 -.1
    assert binned_ks(reference, counts) == pytest.approx(0.2)  # cumulative gap .1 .2 .1 0
    assert binned_ks(reference, counts, ordered=False) == pytest.approx(0.1)  # largest bin gap
    many = binned_ks(reference, np.array([[7, 7, 3, 3], [5, 5, 5, 5], [0, 0, 0, 4]]))
    np.testing.assert_allclose(many, [0.2, 0.0, 0.75])


def test_psi_equals_hand_computation() -> None:
    reference = np.array([0.5, 0.5])
    assert psi(reference, np.array([3, 1])) == pytest.approx(0.25 * math.log(3))
    assert psi(reference, np.array([5, 5])) == pytest.approx(0.0)
    floor = 1e-4  # an empty live bin counts as this proportion, not as zero
    want = 0.5 * math.log(1 / 0.5) + (floor - 0.5) * math.log(floor / 0.5)
    assert psi(reference, np.array([4, 0])) == pytest.approx(want)


def test_count_numeric_puts_a_value_on_an_edge_in_the_bin_to_its_right() -> None:
    edges = np.array([0.0, 1.0, 2.0])  # bins: (-inf,0) [0,1) [1,2) [2,inf)
    values = np.array([-5.0, 0.0, 0.5, 1.0, 1.999, 2.0, 7.0, np.nan])
    np.testing.assert_array_equal(count_numeric(values, edges), [1, 2, 2, 2])
    bins = FeatureBins("x", "numeric", np.full(4, 0.25), edges=edges)
    np.testing.assert_array_equal(bins.count(np.array([[1.0], [1.0]])), [0, 0, 2, 0])


def test_count_categorical_maps_unseen_values_to_other() -> None:
    values = np.array(["a", "z", "b", "a", "", "A"], dtype=object)
    np.testing.assert_array_equal(count_categorical(values, ("a", "b")), [2, 1, 3])
    np.testing.assert_array_equal(count_categorical(np.array([1, 2, 9]), ("1", "2")), [1, 1, 1])
    entry = ColumnReference(
        "c", ColumnKind.CATEGORICAL, counts=(3, 1), n=8, categories=("a", "b"), other=4
    )
    bins = FeatureBins.from_reference(entry)
    np.testing.assert_allclose(bins.reference, [3 / 8, 1 / 8, 4 / 8])  # "other" is the last bin


# --- windows: size, time, threshold choice --------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_time_based_flush_needs_max_age_and_min_rows(reference: Reference) -> None:
    clock = FakeClock()
    monitor = DriftDetector(reference, window=500, min_rows=100, max_age=60.0, clock=clock)
    rng = np.random.default_rng(3)

    monitor.observe(*_one_batch(rng, 99))
    clock.now += 61  # old enough, but too few rows
    assert not monitor.due()
    monitor.observe(*_one_batch(rng, 1))  # now min_rows
    assert monitor.due()
    report = monitor.close()
    assert report["n"] == 100
    assert {f["threshold_window"] for f in report["features"]} == {100}
    assert monitor.rows == 0

    monitor.observe(*_one_batch(rng, 260))
    clock.now += 30  # enough rows, not old enough
    assert not monitor.due()
    clock.now += 31
    assert monitor.due()
    report = monitor.close()
    assert report["n"] == 260
    # judged by the nearest calibrated size that is not larger than the window
    assert {f["threshold_window"] for f in report["features"]} == {250}

    monitor.observe(*_one_batch(rng, 500))  # full: due at once, whatever the clock says
    assert monitor.due()
    assert {f["threshold_window"] for f in monitor.close()["features"]} == {500}


def _one_batch(rng: np.random.Generator, n: int) -> tuple[Feeds, dict[str, np.ndarray]]:
    feeds, labels = draw(rng, n)
    return feeds, {"label": labels}


# --- stationary data: a bounded false-alarm rate --------------------------------------------------


@pytest.mark.parametrize(("window", "windows"), [(500, 1000), (100, 1000)])
def test_stationary_stream_raises_no_drift(reference: Reference, window: int, windows: int) -> None:
    monitor = DriftDetector(reference, window=window, min_rows=window)
    rng = np.random.default_rng(window)
    statuses = [judge(monitor, *draw(rng, window))["status"] for _ in range(windows)]
    alarmed = sum(s != "ok" for s in statuses)
    assert alarmed / windows <= ALARM_RATE, f"{alarmed} of {windows} windows alarmed"
    # the verdict: a stray alarm becomes "drift" only beside another within three windows, or
    # beyond a strong threshold: a few in 10,000 windows (test_drift_calibration.py measures it)
    assert statuses.count("drift") <= 1


def test_windows_smaller_than_calibrated_sizes_are_reported_not_judged(
    reference: Reference, tmp_path: Path, keys: KeyPair
) -> None:
    # no threshold is calibrated below 100 rows: a guessed one alarmed on ~25% of such windows
    monitor = DriftDetector(reference, window=50, min_rows=50)
    rng = np.random.default_rng(50)
    reports = [judge(monitor, *draw(rng, 50, shift={"x2": 3.0})) for _ in range(20)]
    assert all(r["status"] == "ok" for r in reports)  # even a huge shift: not judged
    assert all(f["threshold"] is None for r in reports for f in r["features"])
    assert all(r["n"] == 50 for r in reports)
    with pytest.raises(ConfigError, match=r"\[drift\]\.window must be at least 100"):
        load_config(write_agent_config(tmp_path, keys, extra="[drift]\nwindow = 50\n"))


# --- detection ------------------------------------------------------------------------------------

Change = Callable[[np.random.Generator, int], tuple[Feeds, np.ndarray]]

CHANGES: dict[str, tuple[str, Change]] = {
    "mean-shift-0.25sd": ("x2", lambda rng, n: draw(rng, n, shift={"x2": 0.25})),
    "sd-x1.5": ("x3", lambda rng, n: draw(rng, n, scale={"x3": 1.5})),
    "category-shift-0.1": (
        "cat",
        lambda rng, n: draw(rng, n, probabilities=np.array([0.30, 0.25, 0.15, 0.12, 0.18])),
    ),
    "label-shift": ("label", lambda rng, n: draw(rng, n, flip=0.2)),
}


def windows_to_drift(
    reference: Reference, change: Change, column: str, seed: int, window: int = 500
) -> int | None:
    """Windows after the change until status "drift" (None: not within GIVE_UP windows).

    Asserts along the way that nothing drifts before the change, and that what drifts when the
    status turns is exactly the changed column.
    """
    monitor = DriftDetector(reference, window=window, min_rows=window)
    rng = np.random.default_rng(seed)
    for _ in range(WARMUP):
        assert judge(monitor, *draw(rng, window))["status"] != "drift"
    for after in range(1, GIVE_UP + 1):
        report = judge(monitor, *change(rng, window))
        if report["status"] == "drift":
            joint = report["multivariate"]
            if drifting(report) == set() and joint["drifting"]:
                # all numeric features together saw it first; a shift in location names the
                # feature that moved most
                if column == "x2":
                    assert max(joint["shift_z"], key=lambda n: abs(joint["shift_z"][n])) == column
                return after
            assert drifting(report) == {column}, report
            changed = next(f for f in report["features"] if f["name"] == column)
            assert changed["output"] is (column == "label")
            assert changed["alarm"]
            return after
    return None


@pytest.mark.parametrize("kind", list(CHANGES))
def test_change_is_detected_within_three_windows(reference: Reference, kind: str) -> None:
    column, change = CHANGES[kind]
    found = [windows_to_drift(reference, change, column, seed) for seed in range(EPISODES)]
    assert None not in found, found
    quick = sum(after is not None and after <= DETECT_BY for after in found)
    assert quick >= DETECT_SHARE * EPISODES, found


@pytest.mark.xfail(
    strict=True,
    reason="a known limit: a variance x1.5 change (sd x1.22) is caught within 3 windows of 500 "
    "rows in about half the episodes (binned KS or PSI), not 90%; sd x1.5 is caught at once",
)
def test_variance_x1_5_is_detected_within_three_windows(reference: Reference) -> None:
    def change(rng: np.random.Generator, n: int) -> tuple[Feeds, np.ndarray]:
        return draw(rng, n, scale={"x3": math.sqrt(1.5)})

    found = [windows_to_drift(reference, change, "x3", seed) for seed in range(EPISODES)]
    quick = sum(after is not None and after <= DETECT_BY for after in found)
    assert quick >= DETECT_SHARE * EPISODES, found


def test_columns_of_one_input_counted_together_match_one_by_one(reference: Reference) -> None:
    """The detector counts and judges the numeric columns of one 2-D input together (one
    comparison, one bincount, one KS and PSI for all): the same counts and statistics as the
    per-column functions, for values on edges, beyond them, infinite and missing."""
    import dataclasses

    numeric = [c for c in reference.features if c.kind == "numeric"]
    packed = [dataclasses.replace(c, input="input", index=i) for i, c in enumerate(numeric)]
    together = dataclasses.replace(
        reference, features=tuple(packed), output=None, multivariate=None
    )
    monitor = DriftDetector(together, window=1_000, min_rows=1)
    assert len(monitor.blocks) == 1
    assert len(monitor.blocks[0].columns) == len(numeric)
    rng = np.random.default_rng(3)
    values = rng.normal(0.0, 1.3, (997, len(numeric)))
    for j, column in enumerate(numeric):  # exact edges, infinities and NaN in every column
        values[:5, j] = column.edges[: min(5, len(column.edges))][0]
        values[5:9, j] = [np.inf, -np.inf, np.nan, column.edges[-1]]
    monitor.observe({"input": values.astype(np.float32)}, {})
    report = monitor.close()
    for j, column in enumerate(numeric):
        bins = FeatureBins.from_reference(column)
        assert bins.edges is not None
        counts = count_numeric(values[:, j].astype(np.float32), bins.edges)
        feature = report["features"][j]
        assert feature["name"] == column.name
        assert sum(counts) == len(values) - 1  # NaN is not counted
        live = counts / counts.sum()
        assert feature["live"] == pytest.approx(live.tolist(), abs=1e-6)
        assert feature["ks"] == pytest.approx(float(binned_ks(bins.reference, counts)), abs=1e-6)
        assert feature["psi"] == pytest.approx(float(psi(bins.reference, counts)), abs=1e-6)
    assert all(not c.counts.any() for c in monitor.columns)  # the next window starts empty


def test_weighted_union_thresholds_give_each_statistic_its_share() -> None:
    """With weights 1 : 4 the second statistic alone exceeds in about four times as many draws
    as the first, and the union stays within the level."""
    rng = np.random.default_rng(8)
    draws = rng.normal(size=(200_000, 2))
    thresholds = union_thresholds(draws, 0.01, (1.0, 4.0))
    over = draws > thresholds
    assert over.any(axis=1).mean() <= 0.01
    assert over.any(axis=1).mean() > 0.0095  # the level is spent, not wasted
    ratio = over[:, 1].mean() / over[:, 0].mean()
    assert 3.5 < ratio < 4.5
    equal = union_thresholds(draws, 0.01)
    assert equal[0] == pytest.approx(equal[1], abs=0.02)  # no weights: equal shares
