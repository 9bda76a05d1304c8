"""Fleet jobs on the device: verify a command, run it through the lifecycle, report each step.

:class:`JobRunner` knows nothing of MQTT: it gets raw command bytes (from the broker, or from the
collector's answer to ``pending/get``) and reports job execution updates through a callback,
AWS IoT Jobs style: ``QUEUED → IN_PROGRESS (step) → SUCCEEDED | FAILED | REJECTED``.

Every command is checked by :func:`edgepack.formats.messages.open_command` (signature by a trusted
operator key, target, expiry). The :class:`JobLedger` (``jobs.json`` in the state directory, written
atomically) remembers finished jobs, so a retained command delivered again after a reconnect is
not run twice (its final status is re-sent instead, which the collector ignores as a duplicate),
and remembers the newest command applied per model: an older command for the same model, even
validly signed, is a replay and is rejected.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from edgepack._files import read_json, write_json_atomic
from edgepack.agent._daemon import Agent
from edgepack.agent._journal import JournalEntry
from edgepack.agent._lifecycle import Outcome
from edgepack.agent.exceptions import CommandError, EdgepackError
from edgepack.formats.messages import JOB_ID, Command, decode_json, open_command

__all__ = ["JobLedger", "JobRunner", "StatusUpdate"]

log = logging.getLogger("edgepack.agent.jobs")

LEDGER_LIMIT = 500
# lifecycle state -> the step a job execution reports
_STEPS = {
    "fetching": "downloading",
    "verifying": "verifying",
    "staging": "installing",
    "health_check": "health-check",
    "committing": "committing",
    "cleanup": "committing",
    "rolling_back": "rolling-back",
}
# lifecycle outcome -> job execution status
_STATUS = {
    "installed": "SUCCEEDED",
    "already-active": "SUCCEEDED",
    "rolled-back-to": "SUCCEEDED",
    "retired": "SUCCEEDED",
    "rolled-back": "FAILED",
    "rejected": "REJECTED",
}


@dataclass(frozen=True)
class StatusUpdate:
    """One job execution update, ready for :func:`edgepack.formats.messages.job_status`."""

    job_id: str
    status: str
    seq: int
    model: str | None = None
    step: str | None = None
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
            "status": update.status,
            "seq": update.seq,
            "reason": update.reason,
            "model": update.model,
            "version_before": update.version_before,
            "version_after": update.version_after,
            "issued_at": command.issued_at.isoformat() if command else "",
        }
        if command is not None and update.status != "REJECTED":
            self.newest[command.model] = {
                "job_id": job_id,
                "issued_at": command.issued_at.isoformat(),
            }
        self.save()

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
        keys: operator public keys trusted to sign commands.
        report: called with each :class:`StatusUpdate` (the MQTT link publishes it).
        groups: the device's groups (commands may target them).
    """

    def __init__(
        self,
        agent: Agent,
        keys: Sequence[ec.EllipticCurvePublicKey],
        report: Callable[[StatusUpdate], None],
        groups: Sequence[str] = (),
    ) -> None:
        self.agent = agent
        self.keys = list(keys)
        self.report = report
        self.groups = tuple(groups)
        self.device = agent.config.device_id
        self.profile = agent.config.profile
        self.ledger = JobLedger(agent.config.state_dir / "jobs.json")

    @staticmethod
    def issued_at(raw: bytes) -> str:
        """Sort key for a batch of raw commands (unverified; only orders them)."""
        try:
            payload = json.loads(base64.b64decode(json.loads(raw)["payload"]))
            return str(payload.get("issued_at", ""))
        except (ValueError, TypeError, KeyError, AttributeError):
            return ""  # a malformed command sorts first and is rejected

    def handle(self, raw: bytes) -> None:
        """Verify and run one command (or re-report a finished one). Never raises."""
        try:
            command = open_command(raw, self.keys, device=self.device, groups=self.groups)
        except CommandError as e:
            job_id = _job_id_of(raw)
            if job_id is None or job_id in self.ledger.finished:
                log.warning("ignoring an unusable command: %s", e)
                return
            # Reported, not recorded: an unverified job id must not block the real job later.
            log.warning("rejecting command %s: %s", job_id, e)
            self.report(StatusUpdate(job_id, "REJECTED", 1, reason=str(e)))
            return
        done = self.ledger.finished.get(command.job_id)
        if done is not None:  # delivered again (retained message, reconnect, pending answer)
            self.report(
                StatusUpdate(
                    command.job_id,
                    done["status"],
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
                StatusUpdate(command.job_id, "REJECTED", 1, model=command.model, reason=stale),
            )
            return
        self._run(command)

    def _run(self, command: Command) -> None:
        seq = 1
        active = self._active(command.model)
        self.report(
            StatusUpdate(command.job_id, "QUEUED", seq, model=command.model, version_before=active)
        )

        def on_state(entry: JournalEntry) -> None:
            nonlocal seq
            step = _STEPS.get(entry.state)
            if step:
                seq += 1
                self.report(
                    StatusUpdate(
                        command.job_id,
                        "IN_PROGRESS",
                        seq,
                        model=command.model,
                        step=step,
                        version_before=active,
                    )
                )

        self.agent.lifecycle.on_state = on_state
        try:
            outcome = self._execute(command)
        except EdgepackError as e:  # refused before the lifecycle started (e.g. no such model)
            outcome = Outcome(command.kind, "rejected", command.model, error=e, reason=str(e))
        finally:
            self.agent.lifecycle.on_state = None
        seq += 1
        self._finish(
            command,
            command.job_id,
            StatusUpdate(
                command.job_id,
                _STATUS.get(outcome.result, "FAILED"),
                seq,
                model=command.model,
                reason=outcome.reason if not outcome.ok else None,
                version_before=active,
                version_after=self._active(command.model),
            ),
        )

    def _execute(self, command: Command) -> Outcome:
        if command.kind == "deploy":
            bundle = command.bundle_for(self.profile)
            return self.agent.install(
                bundle["url"],
                expected_sha256=bundle["sha256"],
                expected_size=bundle["size"],
                job_id=command.job_id,
            )
        if command.kind == "rollback":
            return self.agent.rollback(command.model, job_id=command.job_id)
        return self.agent.retire(command.model, job_id=command.job_id)

    def finish_recovered(self, outcome: Outcome) -> None:
        """Report the end of a job whose install a crash interrupted (recovered on start)."""
        if outcome.job_id and outcome.job_id not in self.ledger.finished:
            self._finish(
                None,
                outcome.job_id,
                StatusUpdate(
                    outcome.job_id,
                    _STATUS.get(outcome.result, "FAILED"),
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


def _job_id_of(raw: bytes) -> str | None:
    """The job id inside an envelope that failed verification, to report REJECTED against."""
    try:
        envelope = decode_json(raw, "command", schema=False)
        payload = decode_json(base64.b64decode(envelope.get("payload", "")), "payload")
        job_id = payload.get("job_id")
        # only ids that are safe in a topic (no '+', '#', '/') can be reported against
        return job_id if isinstance(job_id, str) and JOB_ID.match(job_id) else None
    except (CommandError, ValueError, TypeError):
        return None
