"""Request telemetry: counts, errors, latency and batch sizes per model version; process stats.

The hot path is :meth:`Telemetry.record`: one ``deque.append`` of a small tuple (well under a
microsecond, no lock held by the caller). :meth:`Telemetry.fold`, called from a background thread
(edgepack.agent._monitor) and before every read, moves those tuples into per-(model, version)
aggregates:

* cumulative counters and a fixed-bucket latency histogram, exposed as Prometheus text
  (:meth:`prometheus`, served at ``/metrics``);
* the current reporting interval's exact latencies (a bounded reservoir), from which
  :meth:`report` computes p50/p95/p99 for the telemetry published over MQTT.
"""

from __future__ import annotations

import collections
import os
import random
import resource
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["LATENCY_BUCKETS", "Telemetry"]

# Seconds: 50 µs … 10 s, roughly ×2 apart (Prometheus histogram upper bounds).
LATENCY_BUCKETS = (
    5e-5,
    1e-4,
    2.5e-4,
    5e-4,
    1e-3,
    2.5e-3,
    5e-3,
    1e-2,
    2.5e-2,
    5e-2,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096)
RESERVOIR = 10_000


@dataclass
class _Series:
    """One model version's numbers."""

    requests: int = 0
    rows: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    latency_sum: float = 0.0
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    batch_buckets: list[int] = field(default_factory=lambda: [0] * (len(BATCH_BUCKETS) + 1))
    # the current reporting interval
    interval_requests: int = 0
    interval_rows: int = 0
    interval_errors: collections.Counter[str] = field(default_factory=collections.Counter)
    interval_latencies: list[float] = field(default_factory=list)
    interval_batches: list[int] = field(default_factory=list)
    seen: int = 0  # for reservoir sampling


class Telemetry:
    """Aggregates request records and process statistics for one agent."""

    def __init__(self, max_pending: int = 1_000_000) -> None:
        self._pending: collections.deque[tuple[str, int, float, int, str | None]] = (
            collections.deque(maxlen=max_pending)
        )
        self._series: dict[tuple[str, int], _Series] = {}
        self._events: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._started = time.time()
        self._interval_started = time.time()
        self._random = random.Random(0)

    # -- the hot path ------------------------------------------------------------------------

    def record(
        self, model: str, version: int, seconds: float, rows: int, error: str | None = None
    ) -> None:
        """Note one request (called on every inference; must stay trivial)."""
        self._pending.append((model, version, seconds, rows, error))

    def event(self, kind: str) -> None:
        """Count a lifecycle event (install, rollback, retire, health-check failure, ...)."""
        with self._lock:
            self._events[kind] += 1

    # -- folding and reading -----------------------------------------------------------------

    def fold(self) -> None:
        """Move pending records into the aggregates."""
        with self._lock:
            pending = self._pending
            while pending:
                model, version, seconds, rows, error = pending.popleft()
                s = self._series.get((model, version))
                if s is None:
                    s = self._series[(model, version)] = _Series()
                s.requests += 1
                s.interval_requests += 1
                if error:
                    s.errors[error] += 1
                    s.interval_errors[error] += 1
                    continue
                s.rows += rows
                s.interval_rows += rows
                s.latency_sum += seconds
                s.latency_buckets[_bucket(LATENCY_BUCKETS, seconds)] += 1
                s.batch_buckets[_bucket(BATCH_BUCKETS, rows)] += 1
                s.seen += 1
                if len(s.interval_latencies) < RESERVOIR:
                    s.interval_latencies.append(seconds)
                    s.interval_batches.append(rows)
                else:  # reservoir sampling keeps the percentiles unbiased
                    slot = self._random.randrange(s.seen)
                    if slot < RESERVOIR:
                        s.interval_latencies[slot] = seconds
                        s.interval_batches[slot] = rows

    def process(self) -> dict[str, Any]:
        """Uptime, resident memory and CPU seconds of this process."""
        times = os.times()
        return {
            "uptime_s": round(time.time() - self._started, 3),
            "rss_bytes": _rss_bytes(),
            "cpu_s": round(times.user + times.system, 3),
        }

    def report(self) -> dict[str, Any]:
        """The interval's telemetry (then a new interval starts): what goes over MQTT."""
        self.fold()
        now = time.time()
        with self._lock:
            models = []
            for (model, version), s in sorted(self._series.items()):
                if not s.interval_requests:
                    continue
                lat = np.asarray(s.interval_latencies) * 1000
                p50, p95, p99 = (
                    np.percentile(lat, [50, 95, 99]).round(4).tolist()
                    if lat.size
                    else (None, None, None)
                )
                models.append(
                    {
                        "model": model,
                        "version": version,
                        "requests": s.interval_requests,
                        "rows": s.interval_rows,
                        "errors": dict(s.interval_errors),
                        "latency_ms": {
                            "p50": p50,
                            "p95": p95,
                            "p99": p99,
                            "mean": round(float(lat.mean()), 4) if lat.size else None,
                        },
                        "batch": {
                            "mean": round(float(np.mean(s.interval_batches)), 3)
                            if s.interval_batches
                            else None,
                            "max": max(s.interval_batches, default=None),
                        },
                    }
                )
                s.interval_requests = s.interval_rows = s.seen = 0
                s.interval_errors = collections.Counter()
                s.interval_latencies, s.interval_batches = [], []
            report = {
                "interval_start": self._interval_started,
                "interval_end": now,
                "models": models,
                "events": dict(self._events),
                **self.process(),
            }
            self._interval_started = now
        return report

    def prometheus(self, extra: Sequence[tuple[str, Mapping[str, str], float]] = ()) -> str:
        """Prometheus text exposition (format 0.0.4) of the cumulative numbers."""
        self.fold()
        lines = [
            "# HELP edgepack_requests_total Inference requests.",
            "# TYPE edgepack_requests_total counter",
        ]
        with self._lock:
            series = sorted(self._series.items())
            for (model, version), s in series:
                lines.append(
                    f'edgepack_requests_total{{model="{model}",version="{version}"}} {s.requests}'
                )
            lines += [
                "# HELP edgepack_rows_total Rows inferred.",
                "# TYPE edgepack_rows_total counter",
            ]
            lines += [
                f'edgepack_rows_total{{model="{m}",version="{v}"}} {s.rows}' for (m, v), s in series
            ]
            lines += [
                "# HELP edgepack_request_errors_total Failed requests by kind.",
                "# TYPE edgepack_request_errors_total counter",
            ]
            for (m, v), s in series:
                lines += [
                    f'edgepack_request_errors_total{{model="{m}",version="{v}",kind="{kind}"}} {n}'
                    for kind, n in sorted(s.errors.items())
                ]
            lines += [
                "# HELP edgepack_request_seconds Inference latency.",
                "# TYPE edgepack_request_seconds histogram",
            ]
            for (m, v), s in series:
                labels = f'model="{m}",version="{v}"'
                running = 0
                for bound, count in zip(
                    (*LATENCY_BUCKETS, float("inf")), s.latency_buckets, strict=True
                ):
                    running += count
                    le = "+Inf" if bound == float("inf") else repr(bound)
                    lines.append(f'edgepack_request_seconds_bucket{{{labels},le="{le}"}} {running}')
                lines.append(f"edgepack_request_seconds_sum{{{labels}}} {s.latency_sum:.9f}")
                lines.append(f"edgepack_request_seconds_count{{{labels}}} {running}")
            lines += [
                "# HELP edgepack_events_total Lifecycle events.",
                "# TYPE edgepack_events_total counter",
            ]
            lines += [
                f'edgepack_events_total{{kind="{k}"}} {n}' for k, n in sorted(self._events.items())
            ]
        process = self.process()
        lines += [
            "# TYPE edgepack_uptime_seconds gauge",
            f"edgepack_uptime_seconds {process['uptime_s']}",
            "# TYPE process_resident_memory_bytes gauge",
            f"process_resident_memory_bytes {process['rss_bytes']}",
            "# TYPE process_cpu_seconds_total counter",
            f"process_cpu_seconds_total {process['cpu_s']}",
        ]
        typed: set[str] = set()
        for gauge, gauge_labels, value in extra:  # extra gauges: one TYPE line per metric name
            if gauge not in typed:
                lines.append(f"# TYPE {gauge} gauge")
                typed.add(gauge)
            text = ",".join(f'{k}="{v}"' for k, v in sorted(gauge_labels.items()))
            lines.append(f"{gauge}{{{text}}} {value}" if text else f"{gauge} {value}")
        return "\n".join(lines) + "\n"


def _bucket(bounds: tuple[float, ...], value: float) -> int:
    for index, bound in enumerate(bounds):
        if value <= bound:
            return index
    return len(bounds)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
