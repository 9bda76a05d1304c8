"""The update lifecycle on the device: an explicit, journaled state machine.

An install walks ``fetching → verifying → staging → health_check → committing → cleanup → done``.
VERIFYING streams the archive once into ``staging/op-ID/``, hashing as it writes, then checks the
signature against those digests, the deploy's model/version, the device and the version
(edgepack.agent._unpack): bounded memory, and only verified bytes can be installed. STAGING
renames that directory into ``models/``. HEALTH_CHECK loads the installed files once, verified,
and runs the golden rows on that session under a deadline (edgepack.agent._health_check): a model
that loops fails its check, and the checked session is what the runtime then serves. A failure
before staging ends in ``failed`` with nothing changed (*rejected*); after it, ``rolling_back``
removes what was staged and the previous version keeps serving. A rollback re-checks the retained
previous version and commits it; a retire commits the removal. The graph is the ``TRANSITIONS``
table (edgepack.agent._states); each state is one small handler here.

Experiments (edgepack.agent._experiment) go through the same machine. A *candidate* install walks
the install's states with the candidate's own checks in VERIFYING (a model already active here, a
version above anything installed) and commits the candidate and its plan beside the active
version, which it never touches; a candidate that fails to verify, load or pass its health check
is refused and removed like a failed install. *Promote* re-checks the candidate's files and
commits it as the active version (the old one retained: a rollback returns to it); *stop*
commits the candidate's removal.

Save before acting: entering a state first writes it to the journal (edgepack.agent._journal), then
acts. On start, :meth:`Lifecycle.recover` resumes where ``RESUME`` says, so a SIGKILL at any
instant ends as an uninterrupted run would, or with a clean rollback once the same operation has
been interrupted ``max_install_attempts`` times. The one atomic switch is ``state.json``
(edgepack.agent._state). A committed version then serves on probation (edgepack.agent._probation)
through two daemon hooks, :meth:`Lifecycle.start_probation_check` and :meth:`Lifecycle.settle`.

For tests, ``EDGEPACK_FAULT_KILL_AT=<state>`` (or ``_AFTER``) makes the process SIGKILL itself
right after journaling that state (or after acting in it), on an operation's first attempt only.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from edgepack._digest import sha256
from edgepack.agent._compatibility import (
    DeviceFacts,
    check_compatible,
    check_deploy,
    device_facts,
)
from edgepack.agent._config import AgentConfig
from edgepack.agent._fetch import Fetcher, LocalFetcher, discard_fetched, fetched_already
from edgepack.agent._health_check import check_installed
from edgepack.agent._journal import Journal, JournalEntry
from edgepack.agent._probation import Probation
from edgepack.agent._state import ModelState, Store
from edgepack.agent._states import (
    FAIL,
    OK,
    RESUME,
    SKIP,
    TRANSITIONS,
    OnState,
    Outcome,
    Result,
    State,
    resume_point,
)
from edgepack.agent._unpack import unpack_verified
from edgepack.agent.exceptions import (
    EdgepackError,
    InstallError,
    NotInstalledError,
    StorageError,
    VersionError,
)
from edgepack.formats.manifest import Manifest, check_model_name

__all__ = [
    "RESUME",
    "TRANSITIONS",
    "Fetcher",
    "Lifecycle",
    "LocalFetcher",
    "OnState",
    "Outcome",
    "Result",
    "State",
]
# Fetcher and LocalFetcher (edgepack.agent._fetch) and the graph (edgepack.agent._states) are
# re-exported here for callers of the lifecycle.
S = State

log = logging.getLogger("edgepack.agent")


@dataclass
class _Run:
    """What one operation carries between its states (rebuilt from the journal after a crash)."""

    entry: JournalEntry
    on_state: OnState | None = None
    manifest: Manifest | None = None
    error: EdgepackError | None = None
    skipped: bool = False
    trace: list[str] = field(default_factory=list)
    session: Any = None  # the health-checked onnxruntime session, for the runtime to serve


class Lifecycle:
    """Install, roll back and retire models in one state directory, crash-safely.

    Each operation takes an ``on_state`` observer, called with the journal entry each time the
    operation enters a state (a fleet job reports its progress with it).

    Args:
        config: the agent's configuration (state directory, trusted keys, limits, profile).
        fetcher: how to bring bundles here; local paths by default (the MQTT side adds HTTP).
        facts: this device's architecture/runtime facts (detected when not given).
        clock: monotonic seconds, for probation (tests inject one).
        bundle_keys: returns the keys trusted to sign bundles now (the agent's trust store, so
            a key rotation applies to the next verification); default: ``trusted_keys``.
    """

    def __init__(
        self,
        config: AgentConfig,
        fetcher: Fetcher | None = None,
        facts: DeviceFacts | None = None,
        clock: Callable[[], float] = time.monotonic,
        bundle_keys: Callable[[], list[ec.EllipticCurvePublicKey]] | None = None,
    ) -> None:
        self.config = config
        self.store = Store(config.state_dir)
        self.journal = Journal(self.store.journal_file)
        self.fetcher = fetcher or LocalFetcher()
        self.facts = facts or device_facts(config.profile)
        initial = config.public_keys()
        self._bundle_keys = bundle_keys or (lambda: initial)
        self._clock = clock
        self.probation = Probation(self.store, config.limits, clock)
        self._handlers: dict[State, Callable[[_Run], Any]] = {
            S.FETCHING: self._fetching,
            S.VERIFYING: self._verifying,
            S.STAGING: self._staging,
            S.HEALTH_CHECK: self._health_check,
            S.COMMITTING: self._committing,
            S.CLEANUP: self._cleanup,
            S.ROLLING_BACK: self._rolling_back,
        }

    # -- public operations -------------------------------------------------------------------

    def install(
        self,
        source: str,
        *,
        expected_sha256: str | None = None,
        expected_size: int | None = None,
        model: str | None = None,
        version: int | None = None,
        job_id: str | None = None,
        on_state: OnState | None = None,
    ) -> Outcome:
        """Install the bundle at ``source`` (a path, or what the fetcher understands), refusing
        it unless it has ``expected_sha256``/``expected_size`` and its signed manifest names
        ``model``/``version``, when given (a deploy's). A rejected or rolled-back bundle is an
        :class:`Outcome`, not an exception.

        Raises:
            InstallError: another operation is pending, or another process holds the lock.
            StorageError: the state directory cannot be read or locked.
        """
        entry = JournalEntry(
            op="install",
            state=S.FETCHING.value,
            source=source,
            expected_sha256=expected_sha256,
            expected_size=expected_size,
            expected_model=model,
            expected_version=version,
            job_id=job_id,
        )
        return self._start(entry, on_state)

    def install_candidate(
        self,
        source: str,
        *,
        plan: dict[str, Any],
        expected_sha256: str | None = None,
        expected_size: int | None = None,
        model: str | None = None,
        version: int | None = None,
        job_id: str | None = None,
        on_state: OnState | None = None,
    ) -> Outcome:
        """Install the bundle at ``source`` as ``model``'s experiment candidate with ``plan``
        (``{"mode", "share", "sample"}``), beside the active version; checked like an install.

        Raises:
            InstallError: another operation is pending, or another process holds the lock.
            StorageError: the state directory cannot be read or locked.
        """
        entry = JournalEntry(
            op="candidate",
            state=S.FETCHING.value,
            source=source,
            expected_sha256=expected_sha256,
            expected_size=expected_size,
            expected_model=model,
            expected_version=version,
            job_id=job_id,
            plan=dict(plan),
        )
        return self._start(entry, on_state)

    def promote(
        self,
        name: str,
        version: int | None = None,
        *,
        job_id: str | None = None,
        on_state: OnState | None = None,
    ) -> Outcome:
        """Make ``name``'s candidate (``version``, when given, must be it) the active version,
        health-checked first; the active version becomes the retained previous one.

        Raises:
            NotInstalledError: ``name`` has no candidate, or another version is the candidate.
            InstallError: another operation is pending, or another process holds the lock.
        """
        current = self._installed(name)
        candidate = current.candidate_version
        if candidate is None or (version is not None and version != candidate):
            has = "no candidate" if candidate is None else f"candidate v{candidate}"
            wanted = "" if version is None else f" v{version}"
            raise NotInstalledError(
                f"cannot promote {name}{wanted}: it has {has} here (start an experiment first)"
            )
        entry = JournalEntry(
            op="promote",
            state=S.HEALTH_CHECK.value,
            model=name,
            version=candidate,
            from_version=current.active,
            job_id=job_id,
        )
        return self._start(entry, on_state)

    def stop_experiment(
        self, name: str, *, job_id: str | None = None, on_state: OnState | None = None
    ) -> Outcome:
        """Remove ``name``'s candidate; the active version serves alone.

        Raises:
            NotInstalledError: ``name`` is not installed or has no candidate.
            InstallError: another operation is pending, or another process holds the lock.
        """
        current = self._installed(name)
        if current.candidate is None:
            raise NotInstalledError(f"{name} has no experiment running here; nothing to stop")
        entry = JournalEntry(
            op="stop",
            state=S.COMMITTING.value,
            model=name,
            version=current.candidate_version,
            from_version=current.active,
            job_id=job_id,
        )
        return self._start(entry, on_state)

    def _installed(self, name: str) -> ModelState:
        check_model_name(name)
        current = self.store.load().models.get(name)
        if current is None or current.active is None:
            raise NotInstalledError(f"{name} is not installed on this device")
        return current

    def rollback(
        self,
        name: str,
        *,
        job_id: str | None = None,
        on_state: OnState | None = None,
        reason: str | None = None,
    ) -> Outcome:
        """Switch ``name`` back to its retained previous version (health-checked first);
        ``reason`` (an automatic rollback's) goes into the history.

        Raises:
            NotInstalledError: ``name`` is not installed or has no retained previous version.
            InstallError: another operation is pending, or another process holds the lock.
        """
        current = self._installed(name)
        if current.previous is None:
            raise NotInstalledError(
                f"{name} v{current.active} has no retained previous version to roll back to"
            )
        entry = JournalEntry(
            op="rollback",
            state=S.HEALTH_CHECK.value,
            model=name,
            version=current.previous,
            from_version=current.active,
            job_id=job_id,
            reason=reason,
        )
        return self._start(entry, on_state)

    def retire(
        self, name: str, *, job_id: str | None = None, on_state: OnState | None = None
    ) -> Outcome:
        """Uninstall ``name`` (its highest version is remembered: no later downgrade).

        Raises:
            NotInstalledError: ``name`` is not installed.
            InstallError: another operation is pending, or another process holds the lock.
        """
        current = self._installed(name)
        entry = JournalEntry(
            op="retire",
            state=S.COMMITTING.value,
            model=name,
            version=current.active,
            from_version=current.active,
            job_id=job_id,
        )
        return self._start(entry, on_state)

    def recover(self, *, on_state: OnState | None = None) -> Outcome | None:
        """Finish or undo an operation a crash interrupted; ``None`` if there was none.

        Raises:
            StorageError: the journal cannot be read (corrupt: the message says what to do).
        """
        with self.store.lock():
            entry = self.journal.read()
            if entry is None:
                return None
            state = State(entry.state)
            attempts = entry.attempts + 1
            resume, reason = resume_point(entry, self.config.limits.max_install_attempts)
            if resume is None:  # given up: nothing had been changed
                self.journal.clear()
                return Outcome(
                    entry.op, Result.REJECTED, entry.model, entry.version,
                    error=InstallError(reason),
                )  # fmt: skip
            log.warning(
                "recovering %s of %s: interrupted in %s, resuming at %s (attempt %d)",
                entry.op,
                entry.model or entry.source,
                state.value,
                resume.value,
                attempts,
            )
            run = _Run(
                entry.moved(resume.value, attempts=attempts, reason=reason or entry.reason),
                on_state,
            )
            if run.entry.reason and resume is S.ROLLING_BACK:
                run.error = InstallError(run.entry.reason)  # why it is being rolled back
            return self._drive(run)

    def start_probation_check(self, now: float | None = None) -> list[Outcome]:
        """The daemon's hook as it starts (after :meth:`recover`): count this start for every
        version on probation, and roll back those the daemon kept dying with.

        Returns:
            The outcome of each automatic rollback (reported like any rollback).
        """
        with self.store.lock():
            failures = self.probation.on_start(self._clock() if now is None else now)
        outcomes = []
        for failure in failures:
            log.error("probation failed, rolling back: %s", failure.reason)
            outcomes.append(self.rollback(failure.model, reason=failure.reason))
        return outcomes

    def settle(self, now: float | None = None) -> list[str]:
        """The daemon's periodic hook: mark good the versions that served out their probation."""
        return self.probation.settle(self._clock() if now is None else now)

    # -- the machine -------------------------------------------------------------------------

    def _start(self, entry: JournalEntry, on_state: OnState | None) -> Outcome:
        with self.store.lock():
            if self.journal.read() is not None:
                raise InstallError(
                    "an interrupted operation is pending; run `edgepack-agent recover` (the "
                    "daemon does this on start) before starting another"
                )
            return self._drive(_Run(entry, on_state))

    def _enter(self, run: _Run, state: State) -> None:
        run.entry = run.entry.moved(state.value)
        if state not in (S.DONE, S.FAILED):
            try:
                self.journal.write(run.entry)  # save before acting
            except StorageError:
                if state is not S.ROLLING_BACK:
                    raise  # this state fails before it acts
                # Undoing must not wait for a full disk: roll back unjournaled; a crash now
                # leaves the previous state's journal, whose recovery also ends here.
                log.error("cannot journal the rollback (disk full?); rolling back anyway")
        run.trace.append(state.value)
        log.info("%s %s: %s", run.entry.op, run.entry.model or run.entry.source, state.value)
        if run.on_state is not None:
            run.on_state(run.entry)
        _fault("EDGEPACK_FAULT_KILL_AT", state, run.entry)

    def _drive(self, run: _Run) -> Outcome:
        state = State(run.entry.state)
        while state not in (S.DONE, S.FAILED):
            try:
                self._enter(run, state)
                event = SKIP if self._handlers[state](run) is SKIP else OK
            except EdgepackError as e:
                log.warning(
                    "%s of %s failed in %s: %s",
                    run.entry.op,
                    run.entry.model or run.entry.source,
                    state.value,
                    e,
                )
                run.error = run.error or e
                run.entry = run.entry.moved(state.value, reason=str(run.error))
                event = FAIL
            _fault("EDGEPACK_FAULT_KILL_AFTER", state, run.entry)
            following = TRANSITIONS.get((run.entry.op, state, event))
            if following is None:
                raise RuntimeError(
                    f"lifecycle bug: no transition for {run.entry.op} in {state.value} on {event!r}"
                )
            state = following
        self._enter(run, state)
        if state is S.FAILED:
            self.store.discard_unpacked(run.entry.id)  # a rejected bundle is not kept
            if run.entry.incoming:
                discard_fetched(run.entry.incoming)
        self.journal.clear()
        return self._outcome(run, state)

    def _outcome(self, run: _Run, final: State) -> Outcome:
        e = run.entry
        if final is S.DONE:
            result = {
                "install": Result.ALREADY_ACTIVE if run.skipped else Result.INSTALLED,
                "rollback": Result.ROLLED_BACK_TO,
                "retire": Result.RETIRED,
                "candidate": Result.CANDIDATE,
                "promote": Result.PROMOTED,
                "stop": Result.STOPPED,
            }[e.op]
        elif S.ROLLING_BACK.value in run.trace:
            result = Result.ROLLED_BACK
        else:
            result = Result.REJECTED
        return Outcome(
            op=e.op,
            result=result,
            model=e.model,
            version=e.version,
            from_version=e.from_version,
            reason=str(run.error) if run.error else e.reason,
            error=run.error,
            trace=run.trace,
            manifest=run.manifest,
            job_id=e.job_id,
            session=run.session if final is S.DONE else None,
        )

    # -- states ------------------------------------------------------------------------------

    def _fetching(self, run: _Run) -> None:
        e = run.entry
        assert e.source is not None
        self.store.ensure()
        digest = sha256(e.source.encode()).hexdigest()[:16]
        dest = self.store.incoming / f"{digest}.edgepack"
        run.entry = e.moved(e.state, incoming=str(dest))
        self.journal.write(run.entry)
        if fetched_already(dest, e.expected_sha256):
            return  # fetched completely before a crash
        self.fetcher.fetch(
            e.source,
            dest,
            self.config.limits.max_bundle_bytes,
            expected_size=e.expected_size,
            expected_sha256=e.expected_sha256,
        )

    def _verifying(self, run: _Run) -> object:
        e = run.entry
        if e.incoming is None:
            raise InstallError("nothing was fetched")
        self.store.ensure()
        self.store.discard_unpacked(e.id)  # a leftover of an interrupted attempt
        unpacked = unpack_verified(
            Path(e.incoming),
            self.store.unpacking(e.id),
            self._bundle_keys(),
            self.config.limits.archive_limits(),
            expected_sha256=e.expected_sha256,
        )
        manifest = unpacked.manifest
        check_deploy(manifest, e.expected_model, e.expected_version)
        check_compatible(manifest, self.facts)
        current = self.store.load().models.get(manifest.name, ModelState())
        if e.op == "candidate":
            return self._candidate_checks(run, manifest, current, unpacked.bundle_sha256)
        run.entry = e.moved(
            e.state,
            model=manifest.name,
            version=manifest.version,
            from_version=current.active,
            bundle_sha256=unpacked.bundle_sha256,
        )
        run.manifest = manifest
        if current.active == manifest.version:
            run.skipped = True
            return SKIP
        if manifest.version <= current.highest:
            raise VersionError(
                f"{manifest.name} v{manifest.version} is not newer than v{current.highest}, the "
                f"highest version installed here; downgrades are refused (build a new version, "
                "or roll back to the retained previous one)"
            )
        if manifest.version not in current.retained():  # never committed: a leftover
            self.store.remove_version(manifest.name, manifest.version)
        return None

    def _candidate_checks(
        self, run: _Run, manifest: Manifest, current: ModelState, bundle_sha256: str
    ) -> object:
        """VERIFYING for a candidate: beside an active version, above anything installed."""
        e = run.entry
        run.entry = e.moved(
            e.state,
            model=manifest.name,
            version=manifest.version,
            from_version=current.active,
            bundle_sha256=bundle_sha256,
        )
        run.manifest = manifest
        if current.active is None:
            raise InstallError(
                f"{manifest.name} is not installed here: an experiment's candidate runs beside "
                "an active version (deploy one first)"
            )
        if current.candidate_version == manifest.version:
            run.skipped = True  # there already: only the plan may change
            return SKIP
        if manifest.version <= current.highest:
            raise VersionError(
                f"candidate {manifest.name} v{manifest.version} is not newer than "
                f"v{current.highest}, the highest version installed here; build a new version"
            )
        if manifest.version not in current.retained():
            self.store.remove_version(manifest.name, manifest.version)
        return None

    def _staging(self, run: _Run) -> None:
        unpacked = self.store.unpacking(run.entry.id)
        if not unpacked.is_dir():
            e = run.entry
            if (
                e.model
                and e.version is not None
                and self.store.version_dir(e.model, e.version).is_dir()
            ):
                return  # renamed before a crash (VERIFYING removed any older leftover)
            self._verifying(run)  # resumed with nothing unpacked: stream the bundle again
        e = run.entry
        if e.model is None or e.version is None:
            raise InstallError("nothing verified to stage")
        self.store.promote(unpacked, e.model, e.version)

    def _health_check(self, run: _Run) -> None:
        e = run.entry
        if e.model is None or e.version is None:
            raise InstallError("no model to check")
        # Checked as the runtime will serve it: the installed files verified again and loaded,
        # the golden rows run on that session, all within the deadline; the session is kept.
        limits = self.config.limits
        checked = check_installed(
            self.store, e.model, e.version, self._bundle_keys(), self.config.runtime,
            deadline=limits.health_check_timeout, in_child=limits.health_check_in_child,
        )  # fmt: skip
        run.manifest, run.session = checked.manifest, checked.session

    def _committing(self, run: _Run) -> None:
        e = run.entry
        assert e.model is not None
        state = self.store.load()
        if e.op == "install":
            assert e.version is not None
            changed = state.commit_install(
                e.model,
                e.version,
                op=e.id,
                job=e.job_id,
                bundle_sha256=e.bundle_sha256,  # what was verified, not what is there now
                probation=self.config.limits.probation_period > 0,
            )
        elif e.op == "rollback":
            assert e.version is not None
            changed = state.commit_rollback(
                e.model, e.version, op=e.id, job=e.job_id, replacing=e.from_version, reason=e.reason
            )
        elif e.op == "candidate":
            assert e.version is not None
            changed = state.commit_candidate(
                e.model, e.version, op=e.id, job=e.job_id, plan=e.plan or {},
                bundle_sha256=e.bundle_sha256,
            )  # fmt: skip
        elif e.op == "promote":
            assert e.version is not None
            changed = state.commit_promote(
                e.model, e.version, op=e.id, job=e.job_id,
                probation=self.config.limits.probation_period > 0,
            )  # fmt: skip
        elif e.op == "stop":
            changed = state.commit_stop(e.model, op=e.id, job=e.job_id)
        else:
            changed = state.commit_retire(e.model, op=e.id, job=e.job_id, version=e.from_version)
        if changed:  # unchanged: committed before a crash
            self.store.save(state)

    def _cleanup(self, run: _Run) -> None:
        e = run.entry
        assert e.model is not None
        current = self.store.load().models.get(e.model, ModelState())
        self.store.prune(e.model, current.retained())  # staging/ too
        if e.incoming:
            discard_fetched(e.incoming)

    def _rolling_back(self, run: _Run) -> None:
        e = run.entry
        state = self.store.load()
        if e.model is not None and e.version is not None:
            current = state.models.get(e.model, ModelState())
            if e.version not in current.retained():
                self.store.remove_version(e.model, e.version)
            self.store.prune(e.model, current.retained())
        self.store.discard_unpacked(e.id)
        if e.incoming:
            discard_fetched(e.incoming)
        reason = str(run.error) if run.error else e.reason
        if state.record_rolled_back(
            e.id, e.op, e.model, e.version, e.from_version, reason, e.job_id
        ):
            self.store.save(state)


def _fault(variable: str, state: State, entry: JournalEntry) -> None:
    """Test hook: SIGKILL this process at a chosen state, on the first attempt only."""
    if os.environ.get(variable) == state.value and entry.attempts == 1:
        os.kill(os.getpid(), signal.SIGKILL)
