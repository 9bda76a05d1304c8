"""Request telemetry: counts, errors, latency and batch sizes per model version; process stats.

The hot path is :meth:`Telemetry.record`: one ``deque.append`` of a small tuple (well under a
microsecond, no lock held by the caller). :meth:`Telemetry.fold`, called from a background thread
(edgepack.agent._monitor) and before every read, moves those tuples into per-(model, version)
aggregates:

* cumulative counters and a fixed-bucket latency histogram, exposed as Prometheus text
  (:meth:`prometheus`, served at ``/metrics``, written by edgepack.agent._prometheus);
* the current reporting interval's exact latencies (a bounded reservoir), from which
  :meth:`report` computes p50/p95/p99 for the telemetry published over MQTT.

What ``/metrics`` shows, and the one counting rule it follows. Every series about requests is
labelled ``model`` and ``version``. Every request, failed or not, is counted exactly once in
``edgepack_requests_total`` and once in the histogram ``edgepack_request_seconds``, both labelled
``outcome="ok"`` or ``outcome="error"``; so for every (model, version, outcome) the histogram's
``_count`` equals the counter, and ``sum without (outcome)`` of either is all requests. Both
outcomes are always written for a version that has seen a request (zero when none), so the two
families have the same series. ``edgepack_request_errors_total{kind}`` breaks the errors down
(``bad_request``, ``runtime_error``): its sum over ``kind`` equals ``outcome="error"``. A failed
request's latency is the time given to :meth:`Telemetry.record`; today's callers do not time a
failure and give 0, so the error series' observations sit in the lowest bucket.
``edgepack_rows_total`` counts the rows of answered requests (a failure has none).

Families: ``edgepack_requests_total``, ``edgepack_rows_total``, ``edgepack_request_errors_total``
(counters), ``edgepack_request_seconds`` (histogram), ``edgepack_events_total{kind}`` (lifecycle
events), ``process_start_time_seconds`` (gauge, Unix seconds), ``process_resident_memory_bytes``
(gauge), ``process_cpu_seconds_total`` (counter), then the families the caller adds (the agent:
``edgepack_drift_status{model,version}``). A family with no sample yet is not declared.
"""

from __future__ import annotations

import collections
import functools
import os
import random
import resource
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgepack.agent._prometheus import Family, Sample, histogram, render

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
_IMPORTED = time.time()  # the process start time where /proc cannot tell it


@dataclass
class _Series:
    """One model version's numbers."""

    requests: int = 0
    rows: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    latency_sum: float = 0.0  # answered requests
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    failed_latency_sum: float = 0.0  # failed requests
    failed_latency_buckets: list[int] = field(
        default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1)
    )
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

    def __init__(self, max_pending: int = 100_000) -> None:
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
                    s.failed_latency_sum += seconds
                    s.failed_latency_buckets[_bucket(LATENCY_BUCKETS, seconds)] += 1
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
        return {
            "uptime_s": round(time.time() - self._started, 3),
            "rss_bytes": _rss_bytes(),
            "cpu_s": round(_cpu_seconds(), 3),
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

    def prometheus(self, extra: Sequence[Family] = ()) -> str:
        """Prometheus text exposition (format 0.0.4) of the cumulative numbers.

        Args:
            extra: more families to append (the agent's drift gauges); their names must differ
                from the ones written here.

        Raises:
            ValueError: an ``extra`` family is malformed or reuses a name.
        """
        self.fold()
        requests: list[Sample] = []
        rows: list[Sample] = []
        errors: list[Sample] = []
        latency: list[Sample] = []
        with self._lock:
            for (model, version), s in sorted(self._series.items()):
                key = (("model", model), ("version", str(version)))
                failed = sum(s.errors.values())
                for outcome, count, total, buckets in (
                    ("ok", s.requests - failed, s.latency_sum, s.latency_buckets),
                    ("error", failed, s.failed_latency_sum, s.failed_latency_buckets),
                ):
                    labels = (*key, ("outcome", outcome))
                    requests.append(("", labels, count))
                    latency += histogram(labels, LATENCY_BUCKETS, buckets, total)
                rows.append(("", key, s.rows))
                errors += [("", (*key, ("kind", k)), n) for k, n in sorted(s.errors.items())]
            events: list[Sample] = [
                ("", (("kind", k),), n) for k, n in sorted(self._events.items())
            ]
        families = [
            Family(
                "edgepack_requests_total",
                "counter",
                "Inference requests, by outcome (ok or error).",
                requests,
            ),
            Family("edgepack_rows_total", "counter", "Rows in answered requests.", rows),
            Family(
                "edgepack_request_errors_total",
                "counter",
                "Failed requests by kind; the sum over kind is requests with outcome error.",
                errors,
            ),
            Family(
                "edgepack_request_seconds",
                "histogram",
                "Request latency in seconds, by outcome; _count equals edgepack_requests_total.",
                latency,
            ),
            Family("edgepack_events_total", "counter", "Lifecycle events by kind.", events),
            Family(
                "process_start_time_seconds",
                "gauge",
                "Start time of the process since unix epoch in seconds.",
                [("", (), _process_start_time())],
            ),
            Family(
                "process_resident_memory_bytes",
                "gauge",
                "Resident memory size in bytes.",
                [("", (), _rss_bytes())],
            ),
            Family(
                "process_cpu_seconds_total",
                "counter",
                "Total user and system CPU time spent in seconds.",
                [("", (), _cpu_seconds())],
            ),
        ]
        return render([*families, *extra])


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


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


@functools.cache
def _process_start_time() -> float:
    """When this process started, in Unix seconds (as Prometheus's own client computes it)."""
    try:
        with open("/proc/self/stat", "rb") as stat:
            # field 22, starttime, in clock ticks after boot; the name (field 2) may hold spaces
            ticks = int(stat.read().rsplit(b")", 1)[1].split()[19])
        with open("/proc/stat", "rb") as system:
            boot = next(float(line.split()[1]) for line in system if line.startswith(b"btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED  # not Linux: the closest moment known
