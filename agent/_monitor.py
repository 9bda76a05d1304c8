"""Watching the models in the field: telemetry and drift, off the request path.

:meth:`Monitor.observe` is what the runtime calls after every inference: it records the request
(edgepack.agent._telemetry) and appends the batch to a bounded queue; nothing else happens on the
request path. A background thread every half second folds telemetry, counts queued batches into each
model version's :class:`~edgepack.agent._drift.DriftDetector` (built from the installed bundle's
``reference.json``), closes windows that are due, and hands drift reports and, every
``interval`` seconds, telemetry reports to a sink given to the constructor. The agent gives it a
:class:`ReportRelay`, which the MQTT link, built later, connects to its outbox
(edgepack.agent._outbox); with no broker the reports go nowhere (``/metrics`` and ``status``
still show them). The latest drift report per model is kept for ``status``.

Configuration: :class:`~edgepack.agent._config.MonitorConfig`, from ``[telemetry] interval`` and
``[drift] enabled, window, min_rows, max_age, max_queued_rows`` in ``agent.toml``. With
``[capture] enabled = true`` the same thread also offers each batch to the sample store
(edgepack.agent._capture).
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from edgepack.agent._capture import SampleStore
from edgepack.agent._config import MonitorConfig, QualityConfig
from edgepack.agent._drift import DriftDetector
from edgepack.agent._experiment import Experiments
from edgepack.agent._prometheus import Family, gauge
from edgepack.agent._quality import (
    FeedbackError,
    PredictionLog,
    QualityTracker,
    UnknownRequestError,
    probabilities_of,
)
from edgepack.agent._state import Store
from edgepack.agent._telemetry import Telemetry
from edgepack.agent.exceptions import EdgepackError
from edgepack.formats.bundle import MANIFEST_FILE, QUALITY_FILE, REFERENCE_FILE
from edgepack.formats.quality import parse_quality
from edgepack.formats.reference import parse_reference

__all__ = ["Monitor", "ReportRelay", "Sink"]

log = logging.getLogger("edgepack.agent.monitor")

_SEVERITY = ("ok", "warning", "degraded")
VERDICTS_FILE = "drift.json"  # in the state directory: the latest verdict per model
QUALITY_STATUS_FILE = "quality-status.json"  # in the state directory: quality verdicts

Sink = Callable[[str, dict[str, Any]], None]
"""Takes a report: its kind (``"telemetry"`` or ``"drift"``) and its JSON-ready body."""


class ReportRelay:
    """A sink for a monitor whose real destination is built after it (the MQTT link).

    The agent creates the relay and passes it to :class:`Monitor`; the link calls
    :meth:`connect` with its outbox writer once it exists. Until then, and after
    ``connect(None)``, reports are dropped (telemetry is still served at ``/metrics``).
    """

    def __init__(self) -> None:
        self._target: Sink | None = None

    def connect(self, target: Sink | None) -> None:
        """Send reports to ``target`` from now on (``None``: drop them)."""
        self._target = target

    def __call__(self, kind: str, report: dict[str, Any]) -> None:
        target = self._target  # one read: a concurrent connect() never splits a report
        if target is not None:
            target(kind, report)


class Monitor:
    """Telemetry and drift detection for every model an agent serves.

    Args:
        store: the state directory (installed manifests and ``reference.json``).
        config: report interval and drift windows.
        sink: where telemetry and drift reports go (none: nowhere).
        capture: the sample store, when ``[capture]`` is enabled.
    """

    def __init__(
        self,
        store: Store,
        config: MonitorConfig | None = None,
        sink: Sink | None = None,
        capture: SampleStore | None = None,
        quality: QualityConfig | None = None,
        clock: Callable[[], float] = time.time,
        experiments: Experiments | None = None,
    ) -> None:
        self.store = store
        # which variant of an experiment a version is: reports say it (docs/protocol.md §16.3)
        self.experiments = experiments or Experiments()
        self.config = config or MonitorConfig()
        self.quality_config = quality or QualityConfig()
        self.clock = clock
        self.predictions = PredictionLog(self.quality_config.max_predictions)
        # per model version: late feedback for the version before an upgrade still counts there
        self._trackers: dict[tuple[str, int], QualityTracker] = {}
        self._tracker_lock = threading.Lock()
        self.latest_quality: dict[str, dict[str, Any]] = {}
        self.feedback_counts: collections.Counter[str] = collections.Counter()
        self._sink = sink
        self.capture = capture
        self.telemetry = Telemetry()
        self.latest: dict[str, dict[str, Any]] = {}
        self.skipped_batches = 0
        self._queue: collections.deque[tuple[str, int, Mapping[str, Any], Mapping[str, Any]]] = (
            collections.deque()
        )
        # per model version, the latest two of a model (a split serves two at once)
        self._monitors: dict[tuple[str, int], DriftDetector | None] = {}
        self._bundles: dict[tuple[str, int], str | None] = {}  # a version's bundle never changes
        self._saved_verdicts: dict[str, tuple[Any, Any]] = {}
        self._saved_quality: dict[str, Any] = {}
        self._remembered: collections.deque[tuple[str, int, str, dict[str, np.ndarray]]] = (
            collections.deque()
        )
        self._remember_lock = threading.Lock()
        self._remembered_rows = 0
        self._columns: dict[tuple[str, int], dict[str, list[str]]] = {}
        self._status: dict[str, str] = {}
        self._queued_rows = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="edgepack-monitor", daemon=True)
        self._last_report = time.monotonic()

    # -- the request path --------------------------------------------------------------------

    def observe(
        self,
        model: str,
        version: int,
        inputs: Mapping[str, Any],
        outputs: Mapping[str, Any],
        seconds: float,
        rows: int,
    ) -> None:
        """Record one served request (cheap: two appends and a copy of the inputs)."""
        self.telemetry.record(model, version, seconds, rows)
        if self.config.drift or self.capture is not None:
            if self._queued_rows + rows > self.config.max_queued_rows:
                self.skipped_batches += 1  # bounded memory: monitoring falls behind, not the device
                return
            self._queued_rows += rows
            # copies: an in-process caller may refill the same array for its next request
            # before this batch is counted (a copy of one row costs less than a microsecond)
            kept = {name: value.copy() for name, value in inputs.items()}
            self._queue.append((model, version, kept, outputs))

    def remember(
        self, model: str, version: int, request_id: str, outputs: Mapping[str, Any]
    ) -> None:
        """Keep a served request's predictions for feedback, and count its confidences for
        the estimated accuracy. The request path only queues copies of the outputs (an append);
        the monitor's thread files them (:meth:`_file_remembered`), and so does
        :meth:`feedback` before it looks an id up, so feedback sent right after the answer
        finds its request. When ``max_predictions`` rows wait, this request files them."""
        if not self.quality_config.enabled or not outputs:
            return
        if self._remembered_rows >= self.quality_config.max_predictions:
            self._file_remembered()  # the monitor fell behind: file them here (bounded memory)
        # copies: an in-process caller may reuse the arrays it got before they are filed
        kept = {name: np.array(value) for name, value in outputs.items()}
        self._remembered_rows += len(next(iter(kept.values())))  # a bound, not an exact count
        self._remembered.append((model, version, request_id, kept))

    def _file_remembered(self) -> None:
        """Move queued predictions into the log and their confidences into the CBPE window."""
        with self._remember_lock:
            queue = self._remembered
            self._remembered_rows = 0  # (what is appended while this drains is filed too)
            while queue:
                model, version, request_id, outputs = queue.popleft()
                first = next(iter(outputs))
                predicted = outputs[first]
                if predicted.ndim == 2 and predicted.shape[1] == 1:
                    predicted = predicted.reshape(-1)
                if predicted.ndim != 1:
                    continue  # not a label or a value per row: nothing feedback could join
                self.predictions.add(model, version, request_id, predicted)
                tracker = self.tracker(model, version)
                if tracker is not None and tracker.task == "classification":
                    probabilities = probabilities_of(outputs, first)
                    if probabilities is not None:
                        tracker.predicted(probabilities)

    def feedback(
        self,
        model: str,
        request_id: str,
        labels: Any = None,
        targets: Any = None,
    ) -> dict[str, Any]:
        """Join the ground truth of an earlier request with its predictions.

        Returns ``{"id", "rows", "accepted"}``; ``accepted`` is false for a second feedback on
        the same id (ignored, counted as ``duplicate``).

        Raises:
            UnknownRequestError: no predictions kept for that id (never served, or expired).
            FeedbackError: neither or both of labels and targets, or a row count that differs.
        """
        if (labels is None) == (targets is None):
            self.feedback_counts["bad"] += 1
            raise FeedbackError("feedback needs exactly one of 'labels' or 'targets'")
        truth = labels if labels is not None else targets
        if not isinstance(truth, (list, tuple)):
            truth = [truth]
        if targets is not None and not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in truth
        ):
            self.feedback_counts["bad"] += 1
            raise FeedbackError("'targets' must be numbers")
        self._file_remembered()
        entry = self.predictions.claim(model, request_id, len(truth))
        if entry is None:
            self.feedback_counts["unknown"] += 1
            raise UnknownRequestError(
                f"{model}: no predictions kept for request id {request_id!r} (never served with "
                f"that id, or older than the last {self.predictions.max_rows} rows)"
            )
        if entry.answered:
            self.feedback_counts["duplicate"] += 1
            return {"id": request_id, "rows": len(entry.predicted), "accepted": False}
        if len(truth) != len(entry.predicted):
            self.feedback_counts["bad"] += 1
            raise FeedbackError(
                f"request {request_id!r} had {len(entry.predicted)} rows, the feedback gives "
                f"{len(truth)}"
            )
        task = "classification" if labels is not None else "regression"
        tracker = self.tracker(model, entry.version, task)
        if tracker is not None:
            tracker.labeled(list(truth), entry.predicted.tolist())
        self.feedback_counts["joined"] += 1
        return {"id": request_id, "rows": len(truth), "accepted": True}

    def tracker(self, model: str, version: int, task: str | None = None) -> QualityTracker | None:
        """The quality tracker of ``model`` at ``version`` (built from ``quality.json`` when the
        bundle has one, else from the manifest's task)."""
        current = self._trackers.get((model, version))
        if current is not None:
            return current
        with self._tracker_lock:
            current = self._trackers.get((model, version))
            if current is not None:
                return current
            reference = None
            directory = self.store.version_dir(model, version)
            try:
                reference = parse_quality((directory / QUALITY_FILE).read_bytes())
            except FileNotFoundError:
                pass
            except (OSError, EdgepackError) as e:
                log.warning("quality of %s v%d not judged: %s", model, version, e)
            if reference is None and task is None:
                try:
                    manifest = json.loads((directory / MANIFEST_FILE).read_bytes())
                    task = str(manifest.get("task", ""))
                except (OSError, ValueError):
                    task = ""
            config = self.quality_config
            tracker = QualityTracker(
                task or "classification",
                reference,
                window=config.window,
                estimate_window=config.estimate_window,
                clock=self.clock,
            )
            # keep this version and the newest other one of the model (bounded memory)
            others = sorted(v for m, v in self._trackers if m == model)
            trackers = {k: t for k, t in self._trackers.items() if k[0] != model}
            trackers.update({(model, v): self._trackers[(model, v)] for v in others[-1:]})
            trackers[(model, version)] = tracker
            self._trackers = trackers  # one assignment: readers never see a half-built dict
            return tracker

    def failed(self, model: str, version: int, kind: str) -> None:
        """Record a failed request (bad input, unknown model...)."""
        self.telemetry.record(model, version, 0.0, 0, kind)

    # -- the background work -----------------------------------------------------------------

    def start(self) -> Monitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self.tick()
            except Exception:  # monitoring must never take the agent down
                log.exception("monitoring failed; continuing")

    def tick(self, *, force_report: bool = False) -> None:
        """Fold telemetry, count queued batches, close due windows, report if it is time."""
        self.telemetry.fold()
        # Group what queued up per model version and count it in a few vectorized calls:
        # thousands of single-row requests cost a handful of numpy operations, not thousands.
        groups: dict[tuple[str, int], list[tuple[Mapping[str, Any], Mapping[str, Any]]]] = {}
        while self._queue:
            model, version, inputs, outputs = self._queue.popleft()
            self._queued_rows -= len(next(iter(inputs.values()), ()))
            if self.capture is not None:
                self._capture(model, version, inputs, outputs)
            groups.setdefault((model, version), []).append((inputs, outputs))
        for (model, version), batches in groups.items():
            monitor = self._monitor(model, version) if self.config.drift else None
            if monitor is not None:
                self._count(model, version, monitor, batches)
        for (model, version), monitor in list(self._monitors.items()):
            if monitor is not None and monitor.due():
                self._report_drift(model, version, monitor)
        self._file_remembered()
        for (model, version), tracker in list(self._trackers.items()):
            for report in tracker.close_due():
                self._report_quality(model, version, report)
        if force_report or time.monotonic() - self._last_report >= self.config.interval:
            self._last_report = time.monotonic()
            report = self.telemetry.report()
            report["skipped_drift_batches"] = self.skipped_batches
            if self.experiments.running:
                for entry in report["models"]:
                    variant = self.experiments.variant(entry["model"], entry["version"])
                    if variant is not None:
                        entry["variant"] = variant
                report["experiments"] = self.experiments.report()
            self._emit("telemetry", report)

    def _count(
        self,
        model: str,
        version: int,
        monitor: DriftDetector,
        batches: list[tuple[Mapping[str, Any], Mapping[str, Any]]],
    ) -> None:
        """Count ``batches`` into ``monitor``, closing windows exactly every ``window`` rows."""
        inputs = {
            name: np.concatenate([np.asarray(b[0][name]) for b in batches])
            for name in batches[0][0]
        }
        outputs = {
            name: np.concatenate([np.asarray(b[1][name]).reshape(-1) for b in batches])
            for name in batches[0][1]
        }
        total = len(next(iter(inputs.values()))) if inputs else 0
        start = 0
        while start < total:
            take = min(total - start, max(1, monitor.window - monitor.rows))
            monitor.observe(
                {k: v[start : start + take] for k, v in inputs.items()},
                {k: v[start : start + take] for k, v in outputs.items()},
            )
            start += take
            if monitor.due():
                self._report_drift(model, version, monitor)

    def _capture(
        self, model: str, version: int, inputs: Mapping[str, Any], outputs: Mapping[str, Any]
    ) -> None:
        if self.capture is None:
            return
        columns = self._columns.get((model, version))
        if columns is None:
            columns = {}
            try:
                manifest = json.loads(
                    (self.store.version_dir(model, version) / MANIFEST_FILE).read_bytes()
                )
                columns = {
                    spec["name"]: list(spec.get("columns", []))
                    for spec in manifest.get("inputs", [])
                }
            except (OSError, ValueError) as e:
                log.warning("capturing %s v%d without column names: %s", model, version, e)
            self._columns[(model, version)] = columns
        try:
            self.capture.offer(model, version, inputs, outputs, columns)
        except EdgepackError as e:
            log.error("sample capture failed: %s", e)

    def _monitor(self, model: str, version: int) -> DriftDetector | None:
        if (model, version) in self._monitors:
            return self._monitors[(model, version)]
        monitor = None
        try:
            raw = self.store.version_dir(model, version) / REFERENCE_FILE
            monitor = DriftDetector(
                parse_reference(raw.read_bytes()),
                window=self.config.window,
                min_rows=self.config.min_rows,
                max_age=self.config.max_age,
            )
        except (OSError, EdgepackError) as e:  # unreadable, or a ReferenceFormatError
            log.warning("no drift detection for %s v%d: %s", model, version, e)
        # this version and the newest other one of the model (bounded memory)
        for older in sorted(v for m, v in self._monitors if m == model)[:-1]:
            del self._monitors[(model, older)]
        self._monitors[(model, version)] = monitor
        return monitor

    def _report_drift(self, model: str, version: int, monitor: DriftDetector) -> None:
        report = monitor.close()
        report.update(model=model, version=version, bundle_sha256=self._bundle(model, version))
        variant = self.experiments.variant(model, version)
        if variant is not None:
            report["variant"] = variant
        if variant == "candidate":  # reported; the model's verdict stays the active version's
            self._emit("drift", report)
            return
        self.latest[model] = report
        if self._saved_verdicts.get(model) != (version, report["status"]):
            self._save_verdicts()  # on a change only: steady traffic closes many windows a second
        drifting = [f["name"] for f in report["features"] if f["drifting"]]
        joint = report.get("multivariate")
        if joint and joint["drifting"]:  # every numeric feature together
            drifting.append(
                "all features together ("
                + ", ".join(s["name"] for s in joint["statistics"] if s["alarm"])
                + ")"
            )
        previous = self._status.get(model)
        self._status[model] = report["status"]
        # log changes, not every window: steady traffic closes a window every few seconds
        level = logging.WARNING if report["status"] != previous and drifting else logging.INFO
        if report["status"] == previous:
            level = logging.DEBUG
        log.log(
            level,
            "drift window %s v%d: %s over %d rows%s",
            model,
            version,
            report["status"],
            report["n"],
            f" (drifting: {', '.join(drifting)})" if drifting else "",
        )
        self._emit("drift", report)

    def _bundle(self, model: str, version: int) -> str | None:
        """The sha256 of the bundle ``model`` v``version`` came in (read once per version)."""
        key = (model, version)
        if key not in self._bundles:
            state = self.store.load().models.get(model)
            if state is not None and state.active == version:
                sha = state.bundle_sha256
            elif state is not None and state.candidate and state.candidate["version"] == version:
                sha = state.candidate.get("bundle_sha256")  # an experiment's candidate
            else:
                return None  # neither (a late window of an older version): not cached
            self._bundles = {**self._bundles, key: sha}
        return self._bundles[key]

    def _report_quality(self, model: str, version: int, report: dict[str, Any]) -> None:
        body = {
            "model": model,
            "version": version,
            "bundle_sha256": self._bundle(model, version),
            **report,
        }
        variant = self.experiments.variant(model, version)
        if variant is not None:
            body["variant"] = variant
        if variant == "candidate":  # reported; the model's verdict stays the active version's
            self._emit("quality", body)
            return
        previous = self.quality_verdict(model, version)
        kind = "labeled" if body["metrics"] is not None else "estimated"
        latest = self.latest_quality.get(model)
        if latest is None or latest["version"] < version:
            latest = self.latest_quality[model] = {"version": version}
        if latest["version"] == version:  # a late window of an older version is only sent
            latest[kind] = body
            self._save_quality()
        level = (
            logging.WARNING
            if body["status"] != "ok" and body["status"] != previous
            else (logging.DEBUG)
        )
        log.log(level, "quality window %s v%d: %s", model, version, body["status"])
        self._emit("quality", body)

    def quality_verdict(self, model: str, version: int | None) -> str | None:
        """The worse of the latest labeled and estimated windows' status (``None``: none yet):
        this process's own, else the one the serving daemon wrote to ``quality-status.json``."""
        latest = self.latest_quality.get(model)
        if latest is None:
            try:
                saved = json.loads((self.store.root / QUALITY_STATUS_FILE).read_text()).get(model)
            except (OSError, ValueError, AttributeError):
                return None
            if not isinstance(saved, dict) or saved.get("version") != version:
                return None
            status = saved.get("status")
            return status if status in _SEVERITY else None
        if latest.get("version") != version:
            return None
        statuses = [latest[k]["status"] for k in ("labeled", "estimated") if k in latest]
        return max(statuses, key=_SEVERITY.index) if statuses else None

    def _save_quality(self) -> None:
        """The latest quality verdict per model, for ``edgepack-agent status`` in another
        process (not durable, like ``drift.json``)."""
        verdicts = {
            name: {"version": latest["version"], "status": self.quality_verdict(name, v)}
            for name, latest in self.latest_quality.items()
            for v in (latest["version"],)
        }
        if verdicts == self._saved_quality:
            return  # unchanged: steady traffic closes windows many times a minute
        path = self.store.root / QUALITY_STATUS_FILE
        try:
            path.with_suffix(".tmp").write_text(json.dumps(verdicts))
            path.with_suffix(".tmp").replace(path)
        except OSError as e:
            log.warning("cannot write %s: %s", path, e)
            return
        self._saved_quality = verdicts

    def quality_families(self) -> list[Family]:
        """``/metrics`` gauges: verdict, latest labeled metrics, estimated accuracy, feedback."""
        status, measured, estimated = [], [], []
        for name, latest in sorted(self.latest_quality.items()):
            key = {"model": name, "version": str(latest["version"])}
            verdict = self.quality_verdict(name, latest["version"])
            if verdict is not None:
                status.append((key, float(_SEVERITY.index(verdict))))
            for metric, value in sorted((latest.get("labeled", {}).get("metrics") or {}).items()):
                measured.append(({**key, "metric": metric}, value))
            guess = latest.get("estimated", {}).get("estimated")
            if guess:
                estimated.append((key, guess["accuracy"]))
        return [
            gauge(
                "edgepack_quality_status",
                "Verdict of the latest quality windows: 0 ok, 1 warning, 2 degraded.",
                status,
            ),
            gauge(
                "edgepack_quality_metric",
                "Metric of the latest window of labeled rows (accuracy, f1 or mae).",
                measured,
            ),
            gauge(
                "edgepack_quality_estimated_accuracy",
                "Accuracy estimated without labels (CBPE) over the latest window of predictions.",
                estimated,
            ),
            gauge(
                "edgepack_quality_feedback",
                "Feedback items received, by result (joined, duplicate, unknown, bad).",
                (({"result": r}, float(n)) for r, n in sorted(self.feedback_counts.items())),
            ),
        ]

    def verdict(self, model: str, version: int | None) -> str | None:
        """The latest drift verdict of ``model`` at ``version``: this process's own, else the
        one the serving daemon wrote to ``drift.json`` (``edgepack-agent status`` runs in a
        process of its own, which counts no windows)."""
        report = self.latest.get(model)
        if report is None:
            try:
                report = json.loads((self.store.root / VERDICTS_FILE).read_text()).get(model)
            except (OSError, ValueError, AttributeError):
                return None
        if not isinstance(report, dict) or report.get("version") != version:
            return None  # a verdict about another version says nothing about this one
        status = report.get("status")
        return status if isinstance(status, str) else None

    def _save_verdicts(self) -> None:
        """The latest verdict per model, for other processes (not durable: after a power cut
        the next window writes it again)."""
        verdicts = {
            name: {"version": r.get("version"), "status": r.get("status"), "n": r.get("n")}
            for name, r in self.latest.items()
        }
        path = self.store.root / VERDICTS_FILE
        try:
            path.with_suffix(".tmp").write_text(json.dumps(verdicts))
            path.with_suffix(".tmp").replace(path)
        except OSError as e:
            log.warning("cannot write %s: %s", path, e)
            return
        self._saved_verdicts = {m: (v["version"], v["status"]) for m, v in verdicts.items()}

    def _emit(self, kind: str, payload: dict[str, Any]) -> None:
        if self._sink is None:
            return
        try:
            self._sink(kind, payload)
        except EdgepackError as e:
            log.error("cannot queue the %s report: %s", kind, e)
