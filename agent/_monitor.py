"""Watching the models in the field: telemetry and drift, off the request path.

:meth:`Monitor.observe` is what the runtime calls after every inference: it records the request
(edgepack.agent._telemetry) and appends the batch to a bounded queue; nothing else happens on the
request path. A background thread every half second folds telemetry, counts queued batches into each
model version's :class:`~edgepack.agent._drift.DriftDetector` (built from the installed bundle's
``reference.json``), closes windows that are due, and hands drift reports and, every
``interval`` seconds, telemetry reports to a sink: the MQTT link's outbox (edgepack.agent._outbox),
or just the log when the device has no broker. The latest drift report per model is kept for
``status``.

Configuration: ``[telemetry] interval`` and ``[drift] enabled, window, min_rows, max_age`` in
``agent.toml``. With ``[capture] enabled = true`` the same thread also offers each batch to the
sample store (edgepack.agent._capture).
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from edgepack.agent._capture import SampleStore
from edgepack.agent._drift import DriftDetector
from edgepack.agent._state import Store
from edgepack.agent._telemetry import Telemetry
from edgepack.agent.exceptions import ConfigError, EdgepackError
from edgepack.formats.bundle import MANIFEST_FILE, REFERENCE_FILE

__all__ = ["Monitor", "MonitorConfig"]

log = logging.getLogger("edgepack.agent.monitor")

Sink = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class MonitorConfig:
    """``[telemetry]`` and ``[drift]`` settings."""

    interval: float = 60.0  # seconds between telemetry reports
    drift: bool = True
    window: int = 500  # rows per drift window
    min_rows: int = 100  # the fewest rows a time-flushed window may have
    max_age: float = 3600.0  # seconds after which a window with min_rows closes
    max_queued_rows: int = 100_000  # drift work waiting; beyond it new batches are skipped

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any], source: str) -> MonitorConfig:
        values: dict[str, Any] = {}
        telemetry = extra.get("telemetry", {})
        drift = extra.get("drift", {})
        for section, table, allowed in (
            ("telemetry", telemetry, {"interval"}),
            ("drift", drift, {"enabled", "window", "min_rows", "max_age", "max_queued_rows"}),
        ):
            if not isinstance(table, dict):
                raise ConfigError(f"{source}: [{section}] must be a table")
            for key, value in table.items():
                if key not in allowed:
                    raise ConfigError(f"{source}: unknown key [{section}].{key}")
                name = "drift" if key == "enabled" else key
                default = getattr(cls, name)
                if key in ("window", "min_rows") and isinstance(value, int) and value < 100:
                    raise ConfigError(
                        f"{source}: [drift].{key} must be at least 100 rows: thresholds are "
                        "calibrated for windows of 100, 250, 500 and 1000 rows"
                    )
                if isinstance(default, bool) != isinstance(value, bool) or (
                    not isinstance(default, bool)
                    and (not isinstance(value, (int, float)) or value <= 0)
                ):
                    raise ConfigError(f"{source}: [{section}].{key} has a bad value {value!r}")
                values[name] = type(default)(value)
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


class Monitor:
    """Telemetry and drift detection for every model an agent serves."""

    def __init__(
        self,
        store: Store,
        config: MonitorConfig | None = None,
        sink: Sink | None = None,
        capture: SampleStore | None = None,
    ) -> None:
        self.store = store
        self.config = config or MonitorConfig()
        self.sink = sink
        self.capture = capture
        self.telemetry = Telemetry()
        self.latest: dict[str, dict[str, Any]] = {}
        self.skipped_batches = 0
        self._queue: collections.deque[tuple[str, int, Mapping[str, Any], Mapping[str, Any]]] = (
            collections.deque()
        )
        self._monitors: dict[str, tuple[int, DriftDetector | None]] = {}
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
        """Record one served request (cheap: two appends)."""
        self.telemetry.record(model, version, seconds, rows)
        if self.config.drift or self.capture is not None:
            if self._queued_rows + rows > self.config.max_queued_rows:
                self.skipped_batches += 1  # bounded memory: monitoring falls behind, not the device
                return
            self._queued_rows += rows
            self._queue.append((model, version, inputs, outputs))

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
        for model, (version, monitor) in list(self._monitors.items()):
            if monitor is not None and monitor.due():
                self._report_drift(model, version, monitor)
        if force_report or time.monotonic() - self._last_report >= self.config.interval:
            self._last_report = time.monotonic()
            report = self.telemetry.report()
            report["skipped_drift_batches"] = self.skipped_batches
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
        current = self._monitors.get(model)
        if current is not None and current[0] == version:
            return current[1]
        monitor = None
        try:
            raw = self.store.version_dir(model, version) / REFERENCE_FILE
            monitor = DriftDetector(
                json.loads(raw.read_bytes()),
                window=self.config.window,
                min_rows=self.config.min_rows,
                max_age=self.config.max_age,
            )
        except (OSError, ValueError, KeyError, EdgepackError) as e:
            log.warning("no drift detection for %s v%d: %s", model, version, e)
        self._monitors[model] = (version, monitor)
        return monitor

    def _report_drift(self, model: str, version: int, monitor: DriftDetector) -> None:
        report = monitor.close()
        state = self.store.load().models.get(model)
        report.update(
            model=model, version=version, bundle_sha256=state.bundle_sha256 if state else None
        )
        self.latest[model] = report
        drifting = [f["name"] for f in report["features"] if f["drifting"]]
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

    def _emit(self, kind: str, payload: dict[str, Any]) -> None:
        if self.sink is None:
            return
        try:
            self.sink(kind, payload)
        except EdgepackError as e:
            log.error("cannot queue the %s report: %s", kind, e)
