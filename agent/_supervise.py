"""Supervision: worker threads that restart when they die, and a watchdog that proves liveness.

A device must never need a person to walk up to it, so no single fault may leave the agent
running but deaf. Two mechanisms, used by the daemon and the fleet link:

- :class:`SupervisedThread` runs a worker loop; if the loop raises anything (a bug, a hostile
  message that got past validation, a library error), the exception is logged with its
  traceback, reported through ``on_crash`` (the daemon records it and sends it to the fleet), and
  the loop is started again after a backoff that grows with repeated crashes (capped). Only
  :meth:`SupervisedThread.stop` ends it.
- :class:`Heartbeats` collects proof of life from each component that must stay responsive (the
  command worker, the HTTP server's probe). A component is healthy while it has beaten within its
  ``stale_after`` seconds, or while it is inside a bounded piece of work it announced with
  :meth:`Heartbeats.busy` (an install has its own deadlines, so a long download is not a wedge).
  :class:`Watchdog` asks every ``interval`` whether all are healthy and only then sends systemd
  ``WATCHDOG=1`` (:mod:`edgepack.agent._systemd`); when one is not, it stops the heartbeats and
  systemd restarts the unit after ``WatchdogSec``.

Time comes from an injectable monotonic clock, so tests decide what "stale" means exactly.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from edgepack.agent._systemd import Notifier

__all__ = ["Heartbeats", "SupervisedThread", "Watchdog"]

log = logging.getLogger("edgepack.agent")

Clock = Callable[[], float]


@dataclass
class _Beat:
    stale_after: float
    last: float
    busy_until: float | None = None


class Heartbeats:
    """Proof of life per component, judged against a monotonic clock.

    Args:
        clock: monotonic seconds (default ``time.monotonic``).
    """

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._beats: dict[str, _Beat] = {}

    def register(self, name: str, stale_after: float) -> None:
        """Start watching ``name``: it must beat at least every ``stale_after`` seconds."""
        if stale_after <= 0:
            raise ValueError("stale_after must be positive")
        with self._lock:
            self._beats[name] = _Beat(stale_after, self._clock())

    def unregister(self, name: str) -> None:
        """Stop watching ``name`` (a component shut down on purpose)."""
        with self._lock:
            self._beats.pop(name, None)

    def beat(self, name: str) -> None:
        """``name`` is alive now."""
        with self._lock:
            beat = self._beats.get(name)
            if beat is not None:
                beat.last = self._clock()

    @contextlib.contextmanager
    def busy(self, name: str, seconds: float) -> Iterator[None]:
        """``name`` does bounded work for at most ``seconds``: healthy until then, beating after."""
        with self._lock:
            beat = self._beats.get(name)
            if beat is not None:
                beat.busy_until = self._clock() + seconds
        try:
            yield
        finally:
            with self._lock:
                beat = self._beats.get(name)
                if beat is not None:
                    beat.busy_until = None
                    beat.last = self._clock()

    def stale(self) -> list[str]:
        """Components that are neither beating nor inside announced work, with how long."""
        now = self._clock()
        out = []
        with self._lock:
            for name, beat in sorted(self._beats.items()):
                if beat.busy_until is not None:
                    if now <= beat.busy_until:
                        continue
                    out.append(f"{name} (busy past its deadline by {now - beat.busy_until:.0f} s)")
                elif now - beat.last > beat.stale_after:
                    out.append(f"{name} (silent for {now - beat.last:.0f} s)")
        return out


class Watchdog:
    """Sends systemd a heartbeat only while every watched component is healthy.

    Args:
        notifier: where ``WATCHDOG=1`` goes.
        heartbeats: the components' proof of life.
        interval: seconds between checks (half of systemd's ``WatchdogSec``).
        probes: extra checks run on each tick (e.g. a request to our own HTTP server); each
            returns None when healthy or a short reason.
    """

    def __init__(
        self,
        notifier: Notifier,
        heartbeats: Heartbeats,
        interval: float,
        probes: tuple[Callable[[], str | None], ...] = (),
    ) -> None:
        self.notifier = notifier
        self.heartbeats = heartbeats
        self.interval = interval
        self.probes = probes
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unhealthy: tuple[str, ...] = ()

    def check(self) -> tuple[str, ...]:
        """One tick: the reasons the agent is unhealthy (empty: heartbeat sent)."""
        reasons = list(self.heartbeats.stale())
        for probe in self.probes:
            try:
                reason = probe()
            except Exception as e:  # noqa: BLE001 - a probe that crashes is an unhealthy probe
                reason = f"probe failed: {e}"
            if reason:
                reasons.append(reason)
        if tuple(reasons) != self._unhealthy:
            if reasons:
                log.error("agent unhealthy, withholding the watchdog: %s", "; ".join(reasons))
                self.notifier.status("unhealthy: " + "; ".join(reasons))
            elif self._unhealthy:
                log.warning("agent healthy again")
                self.notifier.status("serving")
            self._unhealthy = tuple(reasons)
        if not reasons:
            self.notifier.watchdog()
        return tuple(reasons)

    def start(self) -> Watchdog:
        self._thread = threading.Thread(target=self._run, name="edgepack-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:
                log.exception("watchdog check failed")


class SupervisedThread:
    """Runs ``loop`` in a daemon thread and restarts it whenever it raises.

    ``loop(stop)`` should run until ``stop`` is set and return then; returning earlier (or
    raising) while not stopped counts as a crash. Restarts wait ``backoff`` seconds, doubled
    after each crash up to ``max_backoff``, and reset once the loop ran ``max_backoff`` seconds
    without crashing.

    Args:
        name: the thread's name, also in log lines and crash reports.
        loop: the worker's body.
        on_crash: called with (name, one-line error, traceback text) after each crash; its own
            failures are logged and ignored.
        backoff, max_backoff: restart delays in seconds.
        clock: monotonic seconds, for the backoff reset.
    """

    def __init__(
        self,
        name: str,
        loop: Callable[[threading.Event], None],
        *,
        on_crash: Callable[[str, str, str], None] | None = None,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self.name = name
        self._loop = loop
        self._on_crash = on_crash
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._clock = clock
        self.stop_event = threading.Event()
        self.crashes = 0
        self._thread: threading.Thread | None = None

    def start(self) -> SupervisedThread:
        self._thread = threading.Thread(target=self._supervise, name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=timeout)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _supervise(self) -> None:
        delay = self._backoff
        while not self.stop_event.is_set():
            started = self._clock()
            try:
                self._loop(self.stop_event)
                if self.stop_event.is_set():
                    return
                error, trace = "the worker loop returned without being stopped", ""
            except BaseException as e:  # noqa: BLE001 - supervision: nothing may end the thread
                if isinstance(e, (KeyboardInterrupt, SystemExit)) and self.stop_event.is_set():
                    return
                error = f"{type(e).__name__}: {str(e)[:300]}"
                trace = traceback.format_exc()
            self.crashes += 1
            if self._clock() - started >= self._max_backoff:
                delay = self._backoff  # it ran a good while: start the backoff over
            log.error("%s crashed (%s); restarting in %.1f s\n%s", self.name, error, delay, trace)
            if self._on_crash is not None:
                try:
                    self._on_crash(self.name, error, trace)
                except Exception:
                    log.exception("could not report the crash of %s", self.name)
            if self.stop_event.wait(delay):
                return
            delay = min(delay * 2, self._max_backoff)
