"""Model quality on the device (#12 items 4 and 5): feedback, windows, alarms and CBPE.

One logistic regression on a synthetic two-class problem (4 features, label from a noisy linear
rule, about 85% accuracy) is built with ``--target y`` on 4,000 held-out rows, so its bundle
carries ``quality.json``; one agent serves it over real HTTP with a fake clock. Streams are drawn
from the same rule: a clean one (no alarm expected), one whose labels are corrupted (concept
drift: the alarm and a ``degraded`` verdict expected), and a covariate-shifted one (rows near the
decision boundary: lower true accuracy) on which CBPE's estimate must follow the true accuracy.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
from build_helpers import build_file
from conftest import KeyPair, write_agent_config

from edgepack.agent._config import load_config
from edgepack.agent._daemon import Agent
from edgepack.agent._monitor import Monitor
from edgepack.agent._quality import PredictionLog, QualityTracker, metrics
from edgepack.agent.exceptions import RequestError
from edgepack.formats.bundle import QUALITY_FILE, read_archive
from edgepack.formats.quality import QualityFormatError, QualityReference, parse_quality
from edgepack.formats.quality import quality_json as write_quality

WINDOW = 200  # labeled rows per window
ESTIMATE_WINDOW = 500
BATCH = 20  # rows per request
CBPE_TOLERANCE = 0.04  # |estimated - true accuracy| over 2,000 rows


def draw(rng: np.random.Generator, n: int, shift: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Rows and true labels; ``shift`` < 1 squeezes the first two features toward the boundary
    (a covariate shift: P(y | x) is unchanged, the model is right less often)."""
    x = rng.normal(size=(n, 4)).astype(np.float32)
    x[:, :2] *= shift
    score = x[:, 0] + 0.5 * x[:, 1] + rng.normal(scale=0.6, size=n)
    return x, (score > 0).astype(np.int64)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, keys: KeyPair) -> Path:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    x, y = draw(rng, 4000)
    columns = [f"f{i}" for i in range(4)]
    model = LogisticRegression().fit(pd.DataFrame(x, columns=columns), y)
    held_x, held_y = draw(rng, 4000)
    reference = pd.DataFrame(held_x, columns=columns).assign(y=held_y)
    (result,) = build_file(
        model,
        reference,
        tmp_path_factory.mktemp("quality-build"),
        keys.private,
        name="q",
        target="y",
    )
    assert result.ok, result.error
    assert result.bundle is not None
    return result.bundle


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def agent(tmp_path: Path, keys: KeyPair, bundle: Path) -> Iterator[Agent]:
    extra = (
        f"[drift]\nenabled = false\n[quality]\nwindow = {WINDOW}\n"
        f"estimate_window = {ESTIMATE_WINDOW}\nmax_predictions = 3000\n"
    )
    agent = Agent(load_config(write_agent_config(tmp_path, keys, extra=extra)))
    agent.monitor.clock = Clock()
    agent.start(serve_http=True)
    outcome = agent.install(str(bundle))
    assert outcome.ok, outcome.reason
    yield agent
    agent.stop()


def reports_of(agent: Agent) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    agent.reports.connect(lambda kind, report: got.append(report) if kind == "quality" else None)
    return got


def stream(
    agent: Agent, rows: np.ndarray, labels: np.ndarray, ids: Iterator[int], feedback: bool = True
) -> None:
    """Serve ``rows`` in-process in batches of BATCH, each with an id, and send the labels."""
    name = agent.runtime.get("q").manifest.inputs[0].name
    for start in range(0, len(rows), BATCH):
        request_id = f"r{next(ids)}"
        agent.infer("q", {name: rows[start : start + BATCH]}, request_id=request_id)
        if feedback:
            result = agent.feedback("q", request_id, labels=labels[start : start + BATCH].tolist())
            assert result["accepted"]
    agent.monitor.tick()


# --- the packager ---------------------------------------------------------------------------------


def test_packager_writes_quality_json_with_a_target_column(bundle: Path) -> None:
    _, files = read_archive(bundle.read_bytes())
    quality = parse_quality(files[QUALITY_FILE])
    assert quality.task == "classification"
    assert len(quality.truth) == 4000
    assert len(quality.confidence) == 4000
    accuracy = float(np.mean(np.asarray(quality.truth) == np.asarray(quality.predicted)))
    assert quality.metrics["accuracy"] == pytest.approx(accuracy)
    assert 0.8 < accuracy < 0.92
    assert 0.8 < quality.metrics["f1"] < 0.92
    assert quality.calibration is not None
    xs, ys = quality.calibration
    assert list(xs) == sorted(xs)
    assert list(ys) == sorted(ys)
    # isotonic calibration keeps the mean: calibrated confidences average to the accuracy
    calibrated = np.interp(np.asarray(quality.confidence), xs, ys)
    assert calibrated.mean() == pytest.approx(accuracy, abs=1e-6)
    assert json.loads(files["manifest.json"])["name"] == "q"


def test_packager_without_a_target_writes_no_quality_json(tmp_path: Path, keys: KeyPair) -> None:
    from sklearn.linear_model import LogisticRegression

    x, y = draw(np.random.default_rng(2), 600)
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(4)])
    (result,) = build_file(LogisticRegression().fit(frame, y), frame, tmp_path, keys.private)
    assert result.ok
    assert result.bundle is not None
    _, files = read_archive(result.bundle.read_bytes())
    assert QUALITY_FILE not in files


def test_packager_refuses_an_unknown_target_column(tmp_path: Path, keys: KeyPair) -> None:
    from sklearn.linear_model import LogisticRegression

    from edgepack.packager.exceptions import ReferenceDataError

    x, y = draw(np.random.default_rng(3), 600)
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(4)])
    with pytest.raises(ReferenceDataError, match="--target 'label' is not a column"):
        build_file(
            LogisticRegression().fit(frame, y), frame, tmp_path, keys.private, target="label"
        )


# --- quality.json parse errors -----------------------------------------------------------------


def _doc() -> dict[str, Any]:
    good = QualityReference(
        "classification",
        {"accuracy": 0.5, "f1": 0.5},
        (0.0, 1.0),
        (0.0, 0.0),
        labels=(0, 1),
        confidence=(0.6, 0.7),
        calibration=((0.5, 1.0), (0.4, 0.9)),
    )
    doc: dict[str, Any] = json.loads(write_quality(good))
    return doc


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(format_version=9), "format_version 9 is not one this agent reads"),
        (lambda d: d.update(task="ranking"), "task must be one of"),
        (lambda d: d["metrics"].pop("f1"), "metrics must be an object with exactly accuracy, f1"),
        (lambda d: d["rows"]["truth"].append(1), r"rows.truth \(3\) and rows.predicted \(2\)"),
        (lambda d: d["rows"]["truth"].__setitem__(0, 7), "not an index into the 2 labels"),
        (lambda d: d["rows"]["confidence"].__setitem__(0, 1.5), r"outside \[0.0, 1.0\]"),
        (lambda d: d["calibration"]["accuracy"].reverse(), "increasing order"),
        (lambda d: d["rows"].__setitem__("predicted", "x"), "rows.predicted must be a list"),
    ],
)
def test_parse_errors_say_what_is_wrong(change: Any, message: str) -> None:
    doc = _doc()
    parse_quality(json.dumps(doc).encode())  # the unchanged document is good
    change(doc)
    with pytest.raises(QualityFormatError, match=message) as caught:
        parse_quality(json.dumps(doc).encode())
    assert "edgepack build --target" in str(caught.value)


def test_parse_refuses_what_is_not_json() -> None:
    with pytest.raises(QualityFormatError, match="not valid JSON"):
        parse_quality(b"{nope")


# --- the prediction log ----------------------------------------------------------------------


def test_prediction_log_is_bounded_by_rows_and_drops_the_oldest() -> None:
    log = PredictionLog(max_rows=100)
    for i in range(30):
        log.add("m", 1, f"r{i}", np.arange(5))
    assert log.rows == 100
    assert len(log) == 20
    assert log.evicted == 10
    assert log.claim("m", "r9") is None  # expired
    entry = log.claim("m", "r10")
    assert entry is not None
    assert not entry.answered
    again = log.claim("m", "r10")
    assert again is not None
    assert again.answered
    assert log.claim("other", "r20") is None  # ids are per model


# --- feedback over HTTP --------------------------------------------------------------------------


def test_feedback_over_http_joins_by_the_id_the_agent_generated(agent: Agent) -> None:
    assert agent.server is not None
    name = agent.runtime.get("q").manifest.inputs[0].name
    rows = [[0.5, 0.1, 0.0, 0.0], [-2.0, -1.0, 0.0, 0.0]]
    request = {"inputs": [{"name": name, "shape": [2, 4], "datatype": "FP32", "data": rows}]}
    with httpx.Client(base_url=agent.server.url, timeout=10) as http:
        answer = http.post("/v2/models/q/infer", json=request).json()
        generated = answer["id"]  # the client sent none: the agent made one up and returned it
        assert isinstance(generated, str)
        assert len(generated) == 32
        own = http.post("/v2/models/q/infer", json={**request, "id": "req-1"}).json()
        assert own["id"] == "req-1"

        ok = http.post("/v2/models/q/feedback", json={"id": generated, "labels": [1, 0]})
        assert ok.status_code == 200, ok.text
        assert ok.json() == {
            "accepted": 1,
            "results": [{"id": generated, "rows": 2, "accepted": True}],
        }
        repeat = http.post("/v2/models/q/feedback", json={"id": generated, "labels": [1, 0]})
        assert repeat.json()["accepted"] == 0  # a second feedback for an id is ignored

        unknown = http.post("/v2/models/q/feedback", json={"id": "nope", "labels": [1]})
        assert unknown.status_code == 404
        assert "no predictions kept for request id 'nope'" in unknown.json()["error"]
        short = http.post("/v2/models/q/feedback", json={"id": "req-1", "labels": [1]})
        assert short.status_code == 400
        assert "had 2 rows, the feedback gives 1" in short.json()["error"]
        both = http.post("/v2/models/q/feedback", json={"id": "req-1"})
        assert both.status_code == 400
        assert "exactly one of 'labels' or 'targets'" in both.text

        batch = {"feedback": [{"id": "req-1", "labels": [1, 0]}, {"id": "gone", "targets": [1.0]}]}
        mixed = http.post("/v2/models/q/feedback", json=batch).json()
        assert mixed["accepted"] == 1
        assert len(mixed["errors"]) == 1
    counts = agent.monitor.feedback_counts
    assert (counts["joined"], counts["duplicate"], counts["unknown"]) == (2, 1, 2)


def test_feedback_for_an_expired_id_is_refused(agent: Agent) -> None:
    ids = itertools.count()
    x, y = draw(np.random.default_rng(5), 3200)
    stream(agent, x, y, ids, feedback=False)  # 3,200 rows through a log of 3,000
    assert agent.monitor.predictions.rows <= 3000
    with pytest.raises(RequestError, match="older than the last 3000 rows") as caught:
        agent.feedback("q", "r0", labels=[0] * BATCH)
    assert caught.value.status == 404
    assert agent.feedback("q", "r159", labels=y[-BATCH:].tolist())["accepted"]


# --- windows, alarms and the estimate ----------------------------------------------------------


def test_clean_stream_raises_no_alarm_and_corrupted_labels_degrade(agent: Agent) -> None:
    got = reports_of(agent)
    ids = itertools.count()
    rng = np.random.default_rng(11)
    x, y = draw(rng, 5 * WINDOW)
    stream(agent, x, y, ids)
    clean = [r for r in got if r["metrics"] is not None]
    assert len(clean) == 5
    for report in clean:
        assert (report["alarm"], report["status"], report["labeled"]) == (False, "ok", WINDOW)
        assert report["metrics"]["accuracy"] > report["thresholds"]["accuracy"]
        assert report["model"] == "q"
        assert report["version"] == 1
        assert report["task"]
        assert report["bundle_sha256"]
        assert report["window_end"] > report["window_start"]
        assert set(report["reference"]) == {"accuracy", "f1"}
    got.clear()
    x, y = draw(rng, 3 * WINDOW)
    flipped = rng.random(len(y)) < 0.3  # 30% of the ground truth flips: concept drift
    stream(agent, x, np.where(flipped, 1 - y, y), ids)
    corrupted = [r for r in got if r["metrics"] is not None]
    assert [r["alarm"] for r in corrupted] == [True, True, True]
    assert [r["status"] for r in corrupted] == ["warning", "degraded", "degraded"]
    assert agent.status()["models"]["q"]["quality"] == "degraded"
    # `edgepack-agent status` runs in a process of its own: it reads the daemon's verdicts
    other = Monitor(agent.lifecycle.store)
    assert other.quality_verdict("q", 1) == "degraded"
    assert other.quality_verdict("q", 2) is None  # a verdict of another version says nothing
    text = agent.metrics()
    assert 'edgepack_quality_status{model="q",version="1"} 2' in text
    assert 'edgepack_quality_metric{model="q",version="1",metric="accuracy"}' in text
    assert 'edgepack_quality_feedback{result="joined"}' in text


def test_estimated_accuracy_follows_the_true_accuracy_without_labels(agent: Agent) -> None:
    got = reports_of(agent)
    ids = itertools.count()
    rng = np.random.default_rng(21)
    name = agent.runtime.get("q").manifest.inputs[0].name
    errors = {}
    for shift in (1.0, 0.3):  # the reference distribution, then rows near the boundary
        got.clear()
        x, y = draw(rng, 4 * ESTIMATE_WINDOW, shift)
        right = 0
        for start in range(0, len(x), BATCH):
            out = agent.infer("q", {name: x[start : start + BATCH]}, request_id=f"e{next(ids)}")
            right += int(np.sum(out["label"].reshape(-1) == y[start : start + BATCH]))
        agent.monitor.tick()
        estimates = [r["estimated"] for r in got if r["estimated"] is not None]
        assert len(estimates) == 4
        assert all(e["rows"] == ESTIMATE_WINDOW for e in estimates)
        assert all(e["reference"] is not None and e["threshold"] is not None for e in estimates)
        estimated = float(np.mean([e["accuracy"] for e in estimates]))
        true = right / len(x)
        errors[shift] = (estimated, true)
        assert abs(estimated - true) < CBPE_TOLERANCE, (shift, estimated, true)
        alarms = [e["alarm"] for e in estimates]
        assert not any(alarms) if shift == 1.0 else all(alarms)
    print("CBPE (estimated, true) per shift:", errors)  # shown with pytest -s
    # the shifted stream is clearly worse, and the estimate saw it without a single label
    assert errors[0.3][1] < errors[1.0][1] - 0.1


def test_windows_without_quality_json_are_reported_but_not_judged() -> None:
    tracker = QualityTracker("regression", None, window=4, estimate_window=10, clock=lambda: 5.0)
    tracker.labeled([1.0, 2.0, 3.0, 4.0], [1.5, 2.0, 2.0, 4.0])
    (report,) = tracker.close_due()
    assert report["metrics"] == {"mae": pytest.approx(0.375)}
    assert (report["reference"], report["thresholds"], report["alarm"]) == (None, None, False)
    assert report["status"] == "ok"
    uncalibrated = QualityTracker("classification", None, window=4, estimate_window=3)
    uncalibrated.predicted(np.array([0.9, 0.8, 0.7]))
    (estimate,) = uncalibrated.close_due()
    assert estimate["estimated"]["accuracy"] == pytest.approx(0.8)
    assert estimate["estimated"]["calibrated"] is False
    assert estimate["estimated"]["threshold"] is None


def test_metrics_treat_equal_labels_alike() -> None:
    assert metrics("classification", [1, "0", 2.0], [1.0, 0, "2"]) == {"accuracy": 1.0, "f1": 1.0}
    assert metrics("classification", ["a", "a", "b", "b"], ["a", "b", "b", "b"])["f1"] == (
        pytest.approx((2 / 3 + 0.8) / 2)
    )


def test_regression_quality_json_and_an_mae_alarm(tmp_path: Path, keys: KeyPair) -> None:
    from sklearn.linear_model import LinearRegression

    rng = np.random.default_rng(7)
    x = rng.normal(size=(1500, 3))
    y = x @ np.array([2.0, -1.0, 0.5]) + rng.normal(scale=0.5, size=1500)
    columns = ["a", "b", "c"]
    model = LinearRegression().fit(pd.DataFrame(x[:500], columns=columns), y[:500])
    reference = pd.DataFrame(x[500:], columns=columns).assign(price=y[500:])
    (result,) = build_file(model, reference, tmp_path, keys.private, target="price")
    assert result.ok, result.error
    assert result.bundle is not None
    _, files = read_archive(result.bundle.read_bytes())
    quality = parse_quality(files[QUALITY_FILE])
    assert quality.task == "regression"
    assert quality.metrics["mae"] == pytest.approx(0.5 * np.sqrt(2 / np.pi), rel=0.15)
    tracker = QualityTracker("regression", quality, window=50, clock=lambda: 0.0)
    assert tracker.thresholds is not None
    assert tracker.thresholds["mae"] > quality.metrics["mae"]
    new = rng.normal(size=(100, 3))
    predicted = model.predict(pd.DataFrame(new, columns=columns))
    truth = new @ np.array([2.0, -1.0, 0.5]) + rng.normal(scale=0.5, size=100)
    tracker.labeled(truth[:50].tolist(), predicted[:50].tolist())
    tracker.labeled((truth[50:] + 1.5).tolist(), predicted[50:].tolist())  # the world moved
    clean, moved = tracker.close_due()
    assert (clean["alarm"], clean["status"]) == (False, "ok")
    assert (moved["alarm"], moved["status"]) == (True, "warning")
    assert moved["metrics"]["mae"] > tracker.thresholds["mae"]


def test_a_stationary_stream_alarms_at_about_alpha() -> None:
    """The bootstrap thresholds keep their promise: about 1% of windows alarm (accuracy or F1)
    on fresh rows from the build's distribution, and none is ``degraded``."""
    from sklearn.linear_model import LogisticRegression

    from edgepack.packager._converters import Prediction
    from edgepack.packager._quality import quality_reference

    rng = np.random.default_rng(1)
    columns = [f"f{i}" for i in range(4)]
    x, y = draw(rng, 4000)
    model = LogisticRegression().fit(pd.DataFrame(x, columns=columns), y)
    held_x, held_y = draw(rng, 4000)
    held = pd.DataFrame(held_x, columns=columns)
    prediction = Prediction(labels=model.predict(held), probabilities=model.predict_proba(held))
    reference = quality_reference("classification", pd.Series(held_y), prediction, [0, 1])
    windows, size = 400, WINDOW
    tracker = QualityTracker("classification", reference, size, size, clock=lambda: 0.0)
    sx, sy = draw(rng, windows * size)
    frame = pd.DataFrame(sx, columns=columns)
    predicted, confidence = model.predict(frame), model.predict_proba(frame).max(axis=1)
    for i in range(windows):
        part = slice(i * size, (i + 1) * size)
        tracker.labeled(sy[part].tolist(), predicted[part].tolist())
        tracker.predicted(confidence[part])
    reports = tracker.close_due()
    labeled = [r for r in reports if r["metrics"] is not None]
    estimated = [r["estimated"] for r in reports if r["estimated"] is not None]
    assert len(labeled) == len(estimated) == windows
    assert np.mean([r["alarm"] for r in labeled]) <= 0.03  # measured 0.010
    assert np.mean([e["alarm"] for e in estimated]) <= 0.03  # measured 0.005
    assert not any(r["status"] == "degraded" for r in labeled)


def test_grpc_requests_are_kept_for_feedback(tmp_path: Path, keys: KeyPair, bundle: Path) -> None:
    pytest.importorskip("grpc")
    import tritonclient.grpc as triton_grpc

    extra = "[grpc]\nenabled = true\nport = 0\n"
    agent = Agent(load_config(write_agent_config(tmp_path, keys, extra=extra)))
    agent.start(serve_http=True)
    try:
        assert agent.install(str(bundle)).ok
        assert agent.grpc_server is not None
        name = agent.runtime.get("q").manifest.inputs[0].name
        client = triton_grpc.InferenceServerClient(url=agent.grpc_server.address)
        try:
            tensor = triton_grpc.InferInput(name, [2, 4], "FP32")
            tensor.set_data_from_numpy(np.array([[1, 0, 0, 0], [-1, 0, 0, 0]], np.float32))
            named = client.infer("q", [tensor], request_id="g-1").get_response()
            anonymous = client.infer("q", [tensor]).get_response()
        finally:
            client.close()
        assert named.id == "g-1"
        assert len(anonymous.id) == 32  # generated, returned
        assert agent.feedback("q", "g-1", labels=[1, 0])["accepted"]
        assert agent.feedback("q", anonymous.id, labels=[1, 0])["accepted"]
    finally:
        agent.stop()


def test_late_feedback_for_the_previous_version_counts_there(tmp_path: Path) -> None:
    from edgepack.agent._config import QualityConfig
    from edgepack.agent._state import Store

    got: list[dict[str, Any]] = []
    monitor = Monitor(
        Store(tmp_path),
        sink=lambda kind, report: got.append(report),
        quality=QualityConfig(window=2),
        clock=Clock(),
    )
    monitor.remember("m", 1, "a", {"label": np.array([1, 0])})
    monitor.remember("m", 2, "b", {"label": np.array([1, 1])})  # upgraded meanwhile
    assert monitor.feedback("m", "b", labels=[1, 1])["accepted"]
    assert monitor.feedback("m", "a", labels=[1, 1])["accepted"]  # late, for v1
    monitor.tick()
    by_version = {r["version"]: r["metrics"]["accuracy"] for r in got}
    assert by_version == {1: 0.5, 2: 1.0}
    assert monitor.quality_verdict("m", 2) == "ok"  # the late v1 window does not hide v2's
