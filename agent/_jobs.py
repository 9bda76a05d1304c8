"""Fleet jobs on the device: verify a command, run it through the lifecycle, report each step.

:class:`JobRunner` knows nothing of MQTT: it gets raw command bytes (from the broker, or from the
collector's answer to ``pending/get``) and reports job execution updates through a callback,
AWS IoT Jobs style: ``QUEUED → IN_PROGRESS (step) → SUCCEEDED | FAILED | REJECTED``.

Every command is checked by :func:`edgepack.formats.commands.open_command` (signature by a trusted
operator key, target, expiry). Statuses and steps are :class:`~edgepack.formats.messages.JobStatus`
and :class:`~edgepack.formats.messages.JobStep`; two tables below map the lifecycle's states and
outcomes to them. The :class:`JobLedger` (``jobs.json`` in the state directory, written
atomically) remembers finished jobs, so a retained command delivered again after a reconnect is
not run twice (its final status is re-sent instead, which the collector ignores as a duplicate),
and remembers the newest command applied per model: an older command for the same model, even
validly signed, is a replay and is rejected.

Two controls bound a job. A signed **cancel** (``kind: cancel``, ``cancels: JOB``) marks that job
``CANCELED`` in the ledger unless this device already finished it (a job that ``SUCCEEDED``
stays so); the job is then never run, whenever and however it arrives (retained, queued in the
session, in a pending answer), and a copy re-reports ``CANCELED``. A cancel runs nothing and
reports nothing under its own job id, and it does not count as the newest command applied to
the model. A job's **in-progress timeout** (``in_progress_timeout`` seconds, on the runner's
monotonic clock from the moment the job starts) is checked each time the lifecycle enters a
step before the commit: past it, the step raises, the lifecycle undoes what was staged (the
installed version keeps serving), and the job ends ``TIMED_OUT``. A step under way is bounded by
its own limits (the download's deadline and minimum rate, the health check's deadline), so a job
ends at most that much after its timeout; once committed, a job is never aborted.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from edgepack._files import read_json, write_json_atomic
from edgepack.agent._daemon import Agent
from edgepack.agent._journal import JournalEntry
from edgepack.agent._lifecycle import OnState, Outcome, Result, State
from edgepack.agent.exceptions import CommandError, EdgepackError
from edgepack.formats.commands import (
    Command,
    CommandKind,
    ExperimentAction,
    open_command,
    peek_command,
)
from edgepack.formats.messages import JobStatus, JobStep

__all__ = ["JobLedger", "JobRunner", "StatusUpdate"]

log = logging.getLogger("edgepack.agent.jobs")

LEDGER_LIMIT = 500
# lifecycle state -> the step a job execution reports (states not listed report nothing)
_STEPS: dict[State, JobStep] = {
    State.FETCHING: JobStep.DOWNLOADING,
    State.VERIFYING: JobStep.VERIFYING,
    State.STAGING: JobStep.INSTALLING,
    State.HEALTH_CHECK: JobStep.HEALTH_CHECK,
    State.COMMITTING: JobStep.COMMITTING,
    State.CLEANUP: JobStep.COMMITTING,
    State.ROLLING_BACK: JobStep.ROLLING_BACK,
}
# steps a timed-out job may still be stopped in (entering them): everything before the commit
_ABORTABLE = frozenset(
    {State.FETCHING, State.VERIFYING, State.STAGING, State.HEALTH_CHECK, State.COMMITTING}
)
# lifecycle outcome -> job execution status
_STATUS: dict[Result, JobStatus] = {
    Result.INSTALLED: JobStatus.SUCCEEDED,
    Result.ALREADY_ACTIVE: JobStatus.SUCCEEDED,
    Result.ROLLED_BACK_TO: JobStatus.SUCCEEDED,
    Result.RETIRED: JobStatus.SUCCEEDED,
    Result.CANDIDATE: JobStatus.SUCCEEDED,
    Result.PROMOTED: JobStatus.SUCCEEDED,
    Result.STOPPED: JobStatus.SUCCEEDED,
    Result.ROLLED_BACK: JobStatus.FAILED,
    Result.REJECTED: JobStatus.REJECTED,
    Result.FAILED: JobStatus.FAILED,
}


def _step(state: str) -> JobStep | None:
    try:
        return _STEPS.get(State(state))
    except ValueError:  # not a lifecycle state this table knows
        return None


def _abortable(state: str) -> bool:
    try:
        return State(state) in _ABORTABLE
    except ValueError:
        return False


def _status(result: Result) -> JobStatus:
    return _STATUS[result]


class _TimedOutError(EdgepackError):
    """A job ran past its in-progress timeout; raised into the lifecycle, which undoes it."""


@dataclass(frozen=True)
class StatusUpdate:
    """One job execution update, ready for :func:`edgepack.formats.messages.build_job_status`."""

    job_id: str
    status: JobStatus
    seq: int
    model: str | None = None
    step: JobStep | None = None
    reason: str | None = None
    version_before: int | None = None
    version_after: int | None = None


class JobLedger:
    """Finished jobs and the newest command applied per model, persisted in ``jobs.json``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        data = read_json(path) or {}
        self.finished: dict[str, dict[str, Any]] = dict(data.get("finished", {}))
        self.newest: dict[str, dict[str, str]] = dict(data.get("newest", {}))

    def save(self) -> None:
        if len(self.finished) > LEDGER_LIMIT:  # keep the most recent ones
            ordered = sorted(self.finished.items(), key=lambda kv: kv[1].get("issued_at", ""))
            self.finished = dict(ordered[-LEDGER_LIMIT:])
        write_json_atomic(self.path, {"finished": self.finished, "newest": self.newest})

    def finish(self, command: Command | None, job_id: str, update: StatusUpdate) -> None:
        self.finished[job_id] = {
            "status": update.status.value,
            "seq": update.seq,
            "reason": update.reason,
            "model": update.model,
            "version_before": update.version_before,
            "version_after": update.version_after,
            "issued_at": command.issued_at.isoformat() if command else "",
        }
        if command is not None and update.status is not JobStatus.REJECTED:
            self.newest[command.model] = {
                "job_id": job_id,
                "issued_at": command.issued_at.isoformat(),
            }
        self.save()

    def cancel(self, job_id: str, cancel: Command) -> StatusUpdate | None:
        """Record ``job_id`` as canceled by ``cancel`` unless it finished before.

        Returns:
            The ``CANCELED`` update to report (again, for a job canceled before), or None when
            the job had already ended otherwise (it keeps its own status).
        """
        done = self.finished.get(job_id)
        if done is not None:
            if done.get("status") != JobStatus.CANCELED.value:
                return None
            return StatusUpdate(job_id, JobStatus.CANCELED, done["seq"], model=done.get("model"),
                                reason=done.get("reason"))  # fmt: skip
        update = StatusUpdate(
            job_id,
            JobStatus.CANCELED,
            1,
            model=cancel.model,
            reason=f"canceled by {cancel.job_id} before this device started it",
        )
        self.finished[job_id] = {
            "status": update.status.value,
            "seq": update.seq,
            "reason": update.reason,
            "model": update.model,
            "version_before": None,
            "version_after": None,
            "issued_at": cancel.issued_at.isoformat(),
        }
        self.save()
        return update

    def stale(self, command: Command) -> str | None:
        """Why ``command`` is a replay (older than what was applied for its model), or None."""
        newest = self.newest.get(command.model)
        if newest and dt.datetime.fromisoformat(newest["issued_at"]) > command.issued_at:
            return (
                f"replayed or stale: {command.job_id} was issued before {newest['job_id']}, "
                f"which this device already applied to {command.model}"
            )
        return None


class JobRunner:
    """Runs fleet commands on one device, one at a time.

    Args:
        agent: the device's agent (installs through its lifecycle; serves the result).
        keys: returns the operator public keys trusted to sign commands now (the device's
            trust store: key rotation takes effect at the next command).
        report: called with each :class:`StatusUpdate` (the MQTT link publishes it).
        groups: the device's groups (commands may target them).
        clock: monotonic seconds, for jobs' in-progress timeouts (tests inject one).
    """

    def __init__(
        self,
        agent: Agent,
        keys: Callable[[], Sequence[ec.EllipticCurvePublicKey]],
        report: Callable[[StatusUpdate], None],
        groups: Sequence[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.agent = agent
        self.keys = keys
        self.report = report
        self.groups = tuple(groups)
        self.device = agent.config.device_id
        self.profile = agent.config.profile
        self.ledger = JobLedger(agent.config.state_dir / "jobs.json")
        self.clock = clock

    @staticmethod
    def issued_at(raw: bytes) -> str:
        """Sort key for a batch of raw commands (unverified; only orders them). A malformed
        command sorts first and is rejected."""
        return peek_command(raw).issued_at

    @staticmethod
    def order(raw: bytes) -> tuple[int, str]:
        """Sort key for a batch of raw commands (unverified): cancels first, so a job and its
        cancel arriving together (a session's queue after a time away) never run the job; then
        oldest ``issued_at`` first. A malformed command sorts early and is rejected."""
        peek = peek_command(raw)
        return (0 if peek.kind == CommandKind.CANCEL.value else 1, peek.issued_at)

    def handle(self, raw: bytes) -> None:
        """Verify and run one command (or re-report a finished one). Never raises."""
        try:
            command = open_command(raw, self.keys(), device=self.device, groups=self.groups)
        except CommandError as e:
            job_id = peek_command(raw).job_id
            if job_id is None or job_id in self.ledger.finished:
                log.warning("ignoring an unusable command: %s", e)
                return
            # Reported, not recorded: an unverified job id must not block the real job later.
            log.warning("rejecting command %s: %s", job_id, e)
            self.report(StatusUpdate(job_id, JobStatus.REJECTED, 1, reason=str(e)))
            return
        if command.kind is CommandKind.CANCEL:
            assert command.cancels is not None  # read_command requires it
            update = self.ledger.cancel(command.cancels, command)
            if update is not None:
                log.info("job %s canceled by %s", command.cancels, command.job_id)
                self.report(update)
            return
        done = self.ledger.finished.get(command.job_id)
        if (
            done is not None
            and done.get("status") == JobStatus.CANCELED.value
            and done.get("model") not in (None, command.model)
        ):
            # a cancel applies to a job of its own model: one naming this job id for another
            # model (hand-made, or a mistake) does not withdraw it
            log.warning(
                "job %s is for %s, but the cancel that named it was for %s: running it",
                command.job_id,
                command.model,
                done.get("model"),
            )
            del self.ledger.finished[command.job_id]
            done = None
        if done is not None:  # delivered again (retained message, reconnect, pending answer)
            self.report(
                StatusUpdate(
                    command.job_id,
                    JobStatus(done["status"]),
                    done["seq"],
                    model=done.get("model"),
                    reason=done.get("reason"),
                    version_before=done.get("version_before"),
                    version_after=done.get("version_after"),
                )
            )
            return
        newest = self.ledger.newest.get(command.model, {})
        if newest.get("job_id") == command.job_id:  # finished long ago; its record was pruned
            log.info("job %s was already applied; ignoring it", command.job_id)
            return
        stale = self.ledger.stale(command)
        if stale:
            self._finish(
                command,
                command.job_id,
                StatusUpdate(
                    command.job_id, JobStatus.REJECTED, 1, model=command.model, reason=stale
                ),
            )
            return
        self._run(command)

    def _run(self, command: Command) -> None:
        seq = 1
        active = self._active(command.model)
        limit = command.in_progress_timeout
        deadline = None if limit is None else self.clock() + limit
        self.report(
            StatusUpdate(
                command.job_id, JobStatus.QUEUED, seq, model=command.model, version_before=active
            )
        )

        def on_state(entry: JournalEntry) -> None:
            nonlocal seq
            step = _step(entry.state)
            if deadline is not None and self.clock() >= deadline and _abortable(entry.state):
                raise _TimedOutError(
                    f"job {command.job_id} ran past its in-progress timeout of {limit} s "
                    f"(before {step.value if step else entry.state}); aborted and undone"
                )
            if step is not None:
                seq += 1
                self.report(
                    StatusUpdate(
                        command.job_id,
                        JobStatus.IN_PROGRESS,
                        seq,
                        model=command.model,
                        step=step,
                        version_before=active,
                    )
                )

        try:
            outcome = self._execute(command, on_state)
        except EdgepackError as e:  # refused before the lifecycle started (e.g. no such model)
            outcome = Outcome(
                command.kind.value, Result.REJECTED, command.model, error=e, reason=str(e)
            )
        except Exception as e:  # a bug: the job still ends, visibly, instead of hanging QUEUED
            log.exception("job %s failed unexpectedly", command.job_id)
            reason = f"internal error in the agent: {type(e).__name__}: {str(e)[:200]}"
            outcome = Outcome(
                command.kind.value, Result.FAILED, command.model, reason=reason,
                error=EdgepackError(reason),
            )  # fmt: skip
        seq += 1
        timed_out = isinstance(outcome.error, _TimedOutError)
        self._finish(
            command,
            command.job_id,
            StatusUpdate(
                command.job_id,
                JobStatus.TIMED_OUT if timed_out else _status(outcome.result),
                seq,
                model=command.model,
                reason=outcome.reason if not outcome.ok else None,
                version_before=active,
                version_after=self._active(command.model),
            ),
        )

    def _execute(self, command: Command, on_state: OnState) -> Outcome:
        """Run ``command`` through the lifecycle, reporting each state it enters to ``on_state``."""
        if command.kind is CommandKind.DEPLOY:
            bundle = command.bundle_for(self.profile)
            return self.agent.install(
                bundle.url,
                expected_sha256=bundle.sha256,
                expected_size=bundle.size,
                model=command.model,  # the bundle's signed manifest must say the same
                version=command.version,
                job_id=command.job_id,
                on_state=on_state,
            )
        if command.kind is CommandKind.EXPERIMENT:
            return self._experiment(command, on_state)
        if command.kind is CommandKind.ROLLBACK:
            return self.agent.rollback(command.model, job_id=command.job_id, on_state=on_state)
        return self.agent.retire(command.model, job_id=command.job_id, on_state=on_state)

    def _experiment(self, command: Command, on_state: OnState) -> Outcome:
        """Start, promote or stop an experiment (edgepack.agent._experiment)."""
        spec = command.experiment
        assert spec is not None  # read_command makes one for every experiment command
        if spec.action is ExperimentAction.START:
            bundle = command.bundle_for(self.profile)
            plan = spec.to_json()
            del plan["action"]
            return self.agent.start_experiment(
                bundle.url,
                plan=plan,
                expected_sha256=bundle.sha256,
                expected_size=bundle.size,
                model=command.model,
                version=command.version,
                job_id=command.job_id,
                on_state=on_state,
            )
        if spec.action is ExperimentAction.PROMOTE:
            return self.agent.promote(
                command.model, command.version, job_id=command.job_id, on_state=on_state
            )
        return self.agent.stop_experiment(command.model, job_id=command.job_id, on_state=on_state)

    def finish_recovered(self, outcome: Outcome) -> None:
        """Report the end of a job whose install a crash interrupted (recovered on start)."""
        if outcome.job_id and outcome.job_id not in self.ledger.finished:
            self._finish(
                None,
                outcome.job_id,
                StatusUpdate(
                    outcome.job_id,
                    _status(outcome.result),
                    1000,
                    model=outcome.model,
                    reason=outcome.reason if not outcome.ok else None,
                    version_before=outcome.from_version,
                    version_after=self._active(outcome.model),
                ),
            )

    def _finish(self, command: Command | None, job_id: str, update: StatusUpdate) -> None:
        try:
            self.ledger.finish(command, job_id, update)
        except EdgepackError as e:
            log.error("cannot record job %s: %s", job_id, e)
        self.report(update)

    def _active(self, model: str | None) -> int | None:
        if model is None:
            return None
        state = self.agent.lifecycle.store.load().models.get(model)
        return state.active if state else None
