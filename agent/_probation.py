"""Probation after an upgrade: a new version is marked good only once it has served a while.

Mender and RAUC commit an update only after the device has booted into it and run; edgepack does
the same for models. A version the lifecycle commits (edgepack.agent._lifecycle, COMMITTING) is on
probation (``ModelState.probation`` in ``state.json``) until one daemon run has served it for
``[limits] probation_period`` seconds. Each daemon start meanwhile is counted durably
(``probation_starts``); the start that would be number ``probation_max_starts + 1`` instead
rolls the model back to its retained previous version (a model that crashes onnxruntime on live
inputs keeps killing the daemon: the device must get out of that loop by itself). The daemon
calls :meth:`Lifecycle.start_probation_check` once as it starts (after recovery) and
:meth:`Lifecycle.settle` periodically; both land here.

Time comes from an injected monotonic clock, so tests never sleep.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from edgepack.agent._config import LimitsConfig
from edgepack.agent._state import Store
from edgepack.agent.exceptions import InstallError

__all__ = ["Probation", "ProbationFailure"]

log = logging.getLogger("edgepack.agent")


@dataclass(frozen=True)
class ProbationFailure:
    """A model whose active version kept the daemon dying within its probation."""

    model: str
    version: int
    previous: int | None
    reason: str


class Probation:
    """Counts daemon starts of versions on probation and marks survivors good.

    Args:
        store: the state directory.
        limits: ``probation_period`` and ``probation_max_starts``.
        clock: monotonic seconds (injected by tests).
    """

    def __init__(self, store: Store, limits: LimitsConfig, clock: Callable[[], float]) -> None:
        self.store = store
        self.limits = limits
        self.clock = clock
        self._since: dict[tuple[str, int], float] = {}  # first seen serving, in this process

    def on_start(self, now: float) -> list[ProbationFailure]:
        """Count this daemon start for every version on probation; those over the limit.

        The caller holds the state directory's lock and rolls the failures back.
        """
        state = self.store.load()
        failures, counted = [], False
        for name, model in sorted(state.models.items()):
            if not model.probation or model.active is None:
                continue
            if model.probation_starts >= self.limits.probation_max_starts:
                failures.append(
                    ProbationFailure(
                        name,
                        model.active,
                        model.previous,
                        f"{name} v{model.active} was started {model.probation_starts + 1} times "
                        f"within its probation of {self.limits.probation_period:g} s (the daemon "
                        f"kept dying; the limit is {self.limits.probation_max_starts} starts)",
                    )
                )
                continue
            starts = state.count_start(name)
            counted = True
            self._since[(name, model.active)] = now
            log.info("%s v%d on probation: daemon start %d", name, model.active, starts)
        for failure in failures:
            if failure.previous is None:  # nothing to go back to: keep serving, say so
                state.end_probation(
                    failure.model,
                    result="probation-failed",
                    reason=failure.reason + "; no retained previous version to roll back to",
                )
                counted = True
        if counted:
            self.store.save(state)
        return [f for f in failures if f.previous is not None]

    def settle(self, now: float) -> list[str]:
        """Mark good every version that has served ``probation_period`` seconds in this run.

        Returns a line per version marked good. Never waits for the lock: when another
        operation holds it, the versions are settled on a later call.
        """
        state = self.store.load()
        due = []
        for name, model in state.models.items():
            if model.probation and model.active is not None:
                since = self._since.setdefault((name, model.active), now)
                if now - since >= self.limits.probation_period:
                    due.append((name, model.active))
        if not due:
            return []
        try:
            with self.store.lock(timeout=0):
                state = self.store.load()
                done = []
                for name, version in due:
                    current = state.models.get(name)
                    if current is not None and current.probation and current.active == version:
                        reason = f"served {self.limits.probation_period:g} s without a failure"
                        state.end_probation(name, result="good", reason=reason)
                        done.append(f"{name} v{version}: good ({reason})")
                if done:
                    self.store.save(state)
        except InstallError:
            return []  # an install or rollback is running: settle later
        for line in done:
            log.info("probation: %s", line)
        return done
