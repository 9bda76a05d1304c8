"""A/B on the device: a candidate version beside the active one, in its shadow or on a split.

An experiment starts as a signed ``experiment`` command (edgepack.formats.commands) whose
candidate the lifecycle installs and commits beside the active version (edgepack.agent._lifecycle,
``candidate`` in ``state.json``); the runtime then holds one :class:`Experiment` per model in the
:class:`Experiments` registry, which the monitor also reads (reports say which variant).

* **Shadow** (``sample``): after the active version answered a request, :meth:`Experiment.offer`
  picks a deterministic share of requests and puts their inputs and the active version's outputs
  on a bounded queue (full: the request is dropped from the comparison, never delayed). One
  supervised thread drains it and runs the candidate within a CPU budget (``cpu_share`` seconds
  of compute per second), compares its outputs with the active version's (label agreement for a
  classifier, mean absolute difference of the probabilities or of a regressor's output) and times
  it. Its answers are never returned.
* **Split** (``share``): :meth:`Experiment.answers` says whether the candidate answers a request:
  by a hash of the caller key when one is given (``X-Edgepack-Caller``, or the OIP ``parameters``
  key ``caller``: sticky and deterministic), else by a low-discrepancy sequence that serves the
  share exactly over any run of requests. Telemetry, drift and quality are kept per version, so per
  variant; the response names the version that answered.

With no experiment the request path pays one check of an empty dict (``Experiments.running``).
:meth:`Experiments.report` is the ``experiments`` list of a telemetry report (docs/protocol.md
§16.3): per experiment its plan and, for a shadow, the interval's agreement and latency.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from edgepack.agent._quality import probabilities_of
from edgepack.agent._supervise import SupervisedThread
from edgepack.agent.exceptions import EdgepackError

if TYPE_CHECKING:
    from edgepack.agent._runtime import ServedModel

__all__ = ["CALLER_HEADER", "Experiment", "ExperimentConfig", "Experiments", "Plan"]

log = logging.getLogger("edgepack.agent.experiment")

CALLER_HEADER = "x-edgepack-caller"  # the HTTP header naming the caller (sticky split)
CALLER_PARAMETER = "caller"  # the same in an OIP request's "parameters"
_PHI = 0.6180339887498949  # golden ratio conjugate: the sequence n * phi mod 1 fills [0, 1) evenly
_LATENCIES = 10_000  # candidate latencies kept per report interval

RunCandidate = Callable[["ServedModel", dict[str, np.ndarray]], list[np.ndarray]]
"""Runs the candidate on feeds: all its outputs, in order (the runtime's session call)."""


@dataclass(frozen=True)
class ExperimentConfig:
    """Bounds of the shadow work (safe defaults; the agent passes them in).

    Args:
        queue: shadow requests waiting for the candidate; more are dropped (counted).
        queue_bytes: bytes those waiting requests may hold (their inputs and the active
            version's outputs); beyond, requests are dropped (counted): 256 requests near the
            server's 16 MiB body limit would otherwise hold 4 GiB.
        cpu_share: seconds of candidate compute allowed per second (0.25: a quarter of a core).
        join_timeout: how long stopping an experiment waits for its thread.
    """

    queue: int = 256
    queue_bytes: int = 32 * 1024**2
    cpu_share: float = 0.25
    join_timeout: float = 5.0


@dataclass(frozen=True)
class Plan:
    """How the candidate takes part: ``mode`` ``"shadow"`` (``sample``) or ``"split"``
    (``share``), fractions in (0, 1]; what ``state.json`` records of the command's field."""

    mode: str
    share: float = 0.0
    sample: float = 0.0

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Plan:
        mode = str(data.get("mode"))
        if mode not in ("shadow", "split"):
            raise EdgepackError(f"unknown experiment mode {mode!r} (shadow or split)")
        return cls(mode, float(data.get("share") or 0.0), float(data.get("sample") or 0.0))

    def to_json(self) -> dict[str, Any]:
        if self.mode == "split":
            return {"mode": self.mode, "share": self.share}
        return {"mode": self.mode, "sample": self.sample}


_MASK = (1 << 64) - 1


def caller_fraction(salt: str, caller: str) -> float:
    """Where ``caller`` falls in [0, 1) for the experiment ``salt``: the same every time.

    Two checksums of the salted key, mixed by splitmix64's finalizer (every input bit moves
    every output bit): uniform enough for shares, and no OpenSSL (``hashlib``) in the daemon.
    """
    key = f"{salt}\x00{caller}".encode()
    x = (zlib.crc32(key) << 32 | zlib.adler32(key)) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return (x ^ (x >> 31)) / 2.0**64


class _Shadow:
    """The interval's numbers of a shadow comparison (updated by the shadow thread only)."""

    def __init__(self) -> None:
        self.offered = self.dropped = self.compared = self.rows = self.agreed = self.errors = 0
        self.abs_error = 0.0
        self.max_error = 0.0
        self.latencies: list[float] = []

    def to_json(self, task: str) -> dict[str, Any]:
        lat = np.asarray(self.latencies) * 1000
        p50, p95 = np.percentile(lat, [50, 95]).round(4).tolist() if lat.size else (None, None)
        body: dict[str, Any] = {
            "offered": self.offered,
            "dropped": self.dropped,
            "compared": self.compared,
            "rows": self.rows,
            "errors": self.errors,
            "latency_ms": {"p50": p50, "p95": p95},
        }
        if task == "classification":
            body["agreed_rows"] = self.agreed
            body["agreement"] = round(self.agreed / self.rows, 6) if self.rows else None
        body["mean_abs_error"] = round(self.abs_error / self.rows, 8) if self.rows else None
        body["max_abs_error"] = round(self.max_error, 8) if self.rows else None
        return body


class Experiment:
    """One model's experiment: its candidate, its plan, and for a shadow its worker.

    Args:
        candidate: the candidate version, loaded and health-checked.
        active: the active version it is compared with.
        plan: mode and share or sample.
        run: how the candidate is run (the runtime's session call, with its timeout).
        config: the shadow's bounds.
        clock: monotonic seconds, for the CPU budget.
        on_crash: told when the shadow thread crashed (it is restarted).
    """

    def __init__(
        self,
        candidate: ServedModel,
        active: int,
        plan: Plan,
        run: RunCandidate,
        config: ExperimentConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_crash: Callable[[str, str, str], None] | None = None,
    ) -> None:
        self.candidate = candidate
        self.model = candidate.name
        self.active = active
        self.plan = plan
        self.config = config or ExperimentConfig()
        self.split = plan.mode == "split"
        self.shadow = plan.mode == "shadow"
        self._run = run
        self._clock = clock
        self._salt = f"{candidate.name}/{candidate.version}"
        self._count = 0  # requests seen (the low-discrepancy sequence's index)
        self._queue: queue.Queue[tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]] = (
            queue.Queue(maxsize=max(1, self.config.queue))
        )
        self._queued_bytes = 0  # what the queue holds (under _bytes_lock)
        self._bytes_lock = threading.Lock()
        self._lock = threading.Lock()
        self._stats = _Shadow()
        self._dropped = 0  # on the request path; folded into the stats when reported
        self._tokens = self.config.cpu_share
        self._refilled = clock()
        self._thread = (
            SupervisedThread(f"edgepack-shadow-{candidate.name}", self._loop, on_crash=on_crash)
            if self.shadow
            else None
        )

    def __repr__(self) -> str:
        return f"Experiment({self.candidate.label}, {self.plan})"

    # -- the request path --------------------------------------------------------------------

    def answers(self, caller: str | None) -> bool:
        """Whether the candidate answers this request (split): by the caller's hash when given,
        else the next step of a sequence that serves ``share`` of any run of requests."""
        if caller:
            return caller_fraction(self._salt, caller) < self.plan.share
        self._count += 1  # a lost increment under a race shifts the sequence, nothing more
        return (self._count * _PHI) % 1.0 < self.plan.share

    def offer(self, feeds: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        """Queue a served request for the shadow if it is in the sample; never blocks."""
        self._count += 1
        if (self._count * _PHI) % 1.0 >= self.plan.sample:
            return
        values = [*feeds.values(), *outputs.values()]
        size = sum(getattr(v, "nbytes", 0) for v in values)  # never fail the request here
        with self._bytes_lock:
            if self._queued_bytes + size > self.config.queue_bytes and self._queued_bytes:
                self._dropped += 1  # the queue holds its share of memory already
                return
            self._queued_bytes += size
        kept = {name: value.copy() for name, value in feeds.items()}  # the caller may reuse them
        try:
            self._queue.put_nowait((kept, dict(outputs), size))
        except queue.Full:
            self._release(size)
            self._dropped += 1

    def _release(self, size: int) -> None:
        with self._bytes_lock:
            self._queued_bytes -= size

    # -- the shadow thread -------------------------------------------------------------------

    def start(self) -> Experiment:
        if self._thread is not None:
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._thread.stop(timeout=self.config.join_timeout)

    def queued(self) -> int:
        return self._queue.qsize()

    def _loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                feeds, expected, size = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            self._release(size)
            self._wait_for_budget(stop)
            self.compare(feeds, expected)

    def _wait_for_budget(self, stop: threading.Event) -> None:
        """Hold the thread while the candidate has spent more than its share of the CPU."""
        share = self.config.cpu_share
        while not stop.is_set():
            now = self._clock()
            self._tokens = min(share, self._tokens + (now - self._refilled) * share)
            self._refilled = now
            if self._tokens > 0 or share <= 0:
                return
            stop.wait(min(1.0, -self._tokens / share))

    def compare(self, feeds: dict[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> None:
        """Run the candidate on one request and count how it compares (the shadow's work)."""
        start = time.perf_counter()
        try:
            results = self._run(self.candidate, feeds)
        except EdgepackError as e:
            self._tokens -= time.perf_counter() - start  # a failed run used the CPU all the same
            with self._lock:
                self._stats.offered += 1
                self._stats.errors += 1
            log.warning("shadow %s failed: %s", self.candidate.label, e)
            return
        elapsed = time.perf_counter() - start
        outputs = dict(zip(self.candidate.output_names, results, strict=False))
        rows, agreed, abs_error, max_error = _agreement(
            self.candidate.manifest.task, expected, outputs
        )
        self._tokens -= time.perf_counter() - start  # the budget pays for the comparison too
        with self._lock:
            s = self._stats
            s.offered += 1
            s.compared += 1
            s.rows += rows
            s.agreed += agreed
            s.abs_error += abs_error
            s.max_error = max(s.max_error, max_error)
            if len(s.latencies) < _LATENCIES:
                s.latencies.append(elapsed)

    # -- reports -----------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """This experiment in a telemetry report (the shadow's interval numbers, then reset)."""
        body: dict[str, Any] = {
            "model": self.model,
            "active": self.active,
            "candidate": self.candidate.version,
            **self.plan.to_json(),
        }
        if self.shadow:
            with self._lock:
                stats, self._stats = self._stats, _Shadow()
                dropped, self._dropped = self._dropped, 0
            stats.dropped += dropped
            stats.offered += dropped
            body["shadow"] = stats.to_json(self.candidate.manifest.task)
            body["shadow"]["queued"] = self.queued()
        return body


def _agreement(
    task: str, expected: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]
) -> tuple[int, int, float, float]:
    """Rows compared, rows whose label agrees, sum and max of the absolute output difference
    (a classifier's probabilities when both have them, else the first output)."""
    if not expected or not got:
        return 0, 0, 0.0, 0.0
    first = next(iter(expected))
    want = np.asarray(expected[first]).reshape(-1)
    have = np.asarray(got.get(first, next(iter(got.values())))).reshape(-1)
    rows = min(len(want), len(have))
    if rows == 0:
        return 0, 0, 0.0, 0.0
    agreed = 0
    if task == "classification":
        agreed = int(np.count_nonzero(want[:rows] == have[:rows]))
        p_want = probabilities_of(expected, first)
        p_have = probabilities_of(got, first)
        if p_want is None or p_have is None or p_want.shape != p_have.shape:
            return rows, agreed, 0.0, 0.0
        diff = np.abs(p_want.astype(np.float64) - p_have).max(axis=1)
    else:
        diff = np.abs(want[:rows].astype(np.float64) - have[:rows].astype(np.float64))
    return rows, agreed, float(diff.sum()), float(diff.max())


class Experiments:
    """The experiments running on this agent, by model; shared by the runtime and the monitor.

    ``running`` is replaced, never changed in place, so a request reads it once without a lock.
    """

    def __init__(self, config: ExperimentConfig | None = None) -> None:
        self.config = config or ExperimentConfig()
        self.running: dict[str, Experiment] = {}
        self._lock = threading.Lock()

    def get(self, model: str) -> Experiment | None:
        return self.running.get(model)

    def start(self, experiment: Experiment) -> None:
        """Run ``experiment`` (ending any other one of its model)."""
        with self._lock:
            old = self.running.get(experiment.model)
            self.running = {**self.running, experiment.model: experiment.start()}
        if old is not None:
            old.stop()
        log.info("experiment %s: %s", experiment.model, experiment)

    def end(self, model: str) -> None:
        with self._lock:
            old = self.running.get(model)
            self.running = {k: v for k, v in self.running.items() if k != model}
        if old is not None:
            old.stop()
            log.info("experiment %s ended", model)

    def stop_all(self) -> None:
        for model in list(self.running):
            self.end(model)

    def variant(self, model: str, version: int) -> str | None:
        """``"candidate"`` or ``"active"`` while ``model`` has an experiment, else None."""
        experiment = self.running.get(model)
        if experiment is None:
            return None
        return "candidate" if version == experiment.candidate.version else "active"

    def report(self) -> list[dict[str, Any]]:
        """Every running experiment, for the telemetry report's ``experiments``."""
        return [e.report() for _, e in sorted(self.running.items())]
