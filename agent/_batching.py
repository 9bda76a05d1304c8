"""Dynamic batching: concurrent requests for one model coalesced into one ``session.run``.

What Triton calls the dynamic batcher, for a device: with ``[runtime] batch_delay_ms`` above 0,
:class:`~edgepack.agent._runtime.Runtime` hands each validated request of a batching model to
that model version's :class:`Batcher` instead of running it. One thread per batcher takes the
oldest waiting request, waits at most ``batch_delay_ms`` for more to arrive (less once
``batch_rows`` rows are waiting), stacks every waiting request whose inputs have the same shape
past the batch dimension, runs them at once and hands each its own rows of the outputs. A small
model spends most of a single-row call on per-call overhead, so eight requests in one run cost
little more than one.

A batch that fails is run again one request at a time, so that only the request at fault gets
the error; an output without a batch dimension (a model-level scalar, say) cannot be split, and
such a model's requests run alone from then on. Waiting requests are bounded (``max_waiting``):
beyond it a request runs alone on its caller's thread, so a burst never queues without limit.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["Batcher", "Pending"]

log = logging.getLogger("edgepack.agent.batching")

Run = Callable[[dict[str, np.ndarray]], list[np.ndarray]]
"""Runs the model on feeds (the names of its outputs fixed), returns the outputs in order."""


class Pending:
    """One request waiting in a batcher: its feeds, and what it gets back."""

    __slots__ = ("_callback", "_done", "error", "feeds", "key", "result", "rows", "seconds")

    def __init__(
        self,
        feeds: dict[str, np.ndarray],
        rows: int,
        callback: Callable[[Pending], None] | None = None,
    ) -> None:
        self.feeds = feeds
        self.rows = rows
        self.key = tuple((name, a.dtype.str, a.shape[1:]) for name, a in feeds.items())
        self.result: list[np.ndarray] | None = None
        self.error: BaseException | None = None
        self.seconds = 0.0  # the run's time (of the whole batch)
        self._callback = callback
        self._done = threading.Event()

    def finish(self, result: list[np.ndarray] | None, error: BaseException | None) -> None:
        self.result, self.error = result, error
        self._done.set()
        if self._callback is not None:
            try:
                self._callback(self)
            except Exception:  # the caller's bug must not stop the batcher for everyone
                log.exception("batching: a request's callback failed")

    def wait(self, timeout: float) -> bool:
        return self._done.wait(timeout)


class Batcher:
    """Coalesces concurrent requests for one model version (see the module docstring).

    Args:
        run: runs the model on stacked feeds.
        what: the model, for logs (``"iris v2"``).
        max_delay: seconds the oldest request may wait for company.
        max_rows: rows at which a batch runs without waiting longer.
        max_waiting: requests that may wait at once; more run alone.
    """

    def __init__(
        self, run: Run, what: str, max_delay: float, max_rows: int, max_waiting: int = 1024
    ) -> None:
        self._run = run
        self._what = what
        self._max_delay = max_delay
        self._max_rows = max_rows
        self._max_waiting = max_waiting
        self._waiting: collections.deque[Pending] = collections.deque()
        self._rows = 0
        self._arrived: collections.deque[float] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self.splittable = True  # False once an output had no batch dimension
        self.batches = 0  # runs made
        self.requests = 0  # requests answered through them
        self._thread = threading.Thread(
            target=self._loop, name=f"edgepack-batch {what}", daemon=True
        )
        self._thread.start()

    def submit(self, pending: Pending) -> bool:
        """Queue ``pending``; False if it must run alone (the queue is full, or the model's
        outputs cannot be split), and then the caller runs it."""
        if not self.splittable:
            return False
        with self._cond:
            if self._stopping or len(self._waiting) >= self._max_waiting:
                return False
            self._waiting.append(pending)
            self._arrived.append(time.monotonic())
            self._rows += pending.rows
            if len(self._waiting) == 1 or self._rows >= self._max_rows:
                self._cond.notify()
        return True

    def stop(self) -> None:
        """Answer what waits, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=10)

    def _take(self) -> list[Pending] | None:
        """The next batch: the oldest request and every waiting one shaped like it."""
        with self._cond:
            while not self._waiting:
                if self._stopping:
                    return None
                self._cond.wait()
            deadline = self._arrived[0] + self._max_delay
            while self._rows < self._max_rows and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            key = self._waiting[0].key
            batch: list[Pending] = []
            rest: list[tuple[Pending, float]] = []
            rows = 0
            for item, arrived in zip(self._waiting, self._arrived, strict=True):
                if item.key == key and (not batch or rows + item.rows <= max(self._max_rows, rows)):
                    batch.append(item)
                    rows += item.rows
                else:
                    rest.append((item, arrived))
            self._waiting = collections.deque(item for item, _ in rest)
            self._arrived = collections.deque(arrived for _, arrived in rest)
            self._rows -= rows
            return batch

    def _loop(self) -> None:
        while True:
            try:
                batch = self._take()
            except Exception:  # never leave the waiting requests without an answer
                log.exception("batching %s: taking a batch failed", self._what)
                continue
            if batch is None:
                return
            self._answer(batch)

    def _answer(self, batch: Sequence[Pending]) -> None:
        if len(batch) == 1:
            self._alone(batch[0])
            return
        names = list(batch[0].feeds)
        feeds = {name: np.concatenate([p.feeds[name] for p in batch]) for name in names}
        total = sum(p.rows for p in batch)
        start = time.perf_counter()
        try:
            outputs = self._run(feeds)
        except Exception:  # noqa: BLE001 - someone's rows made the model fail: find whose
            for pending in batch:
                self._alone(pending)
            return
        seconds = time.perf_counter() - start
        if any(np.ndim(o) == 0 or len(o) != total for o in outputs):
            log.warning(
                "batching %s: an output has no batch dimension; its requests run alone now",
                self._what,
            )
            self.splittable = False
            for pending in batch:
                self._alone(pending)
            return
        self.batches += 1
        self.requests += len(batch)
        offset = 0
        for pending in batch:
            end = offset + pending.rows
            pending.seconds = seconds
            pending.finish([o[offset:end] for o in outputs], None)
            offset = end

    def _alone(self, pending: Pending) -> None:
        start = time.perf_counter()
        try:
            result = self._run(pending.feeds)
        except BaseException as e:  # noqa: BLE001 - handed to the request's own caller
            pending.seconds = time.perf_counter() - start
            pending.finish(None, e)
            return
        pending.seconds = time.perf_counter() - start
        self.batches += 1
        self.requests += 1
        pending.finish(result, None)


def stats(batchers: Sequence[Batcher]) -> dict[str, Any]:
    """Runs and requests over ``batchers`` (for status and benchmarks)."""
    return {
        "batches": sum(b.batches for b in batchers),
        "requests": sum(b.requests for b in batchers),
    }
