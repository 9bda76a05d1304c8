"""The update lifecycle on the device: an explicit, journaled state machine.

An install walks ``fetching → verifying → staging → health_check → committing → cleanup → done``.
Any failure before anything is staged ends in ``failed`` with nothing changed (the bundle is
*rejected*); a failure after staging goes through ``rolling_back``, which removes what was staged
and leaves the previously active version serving. An explicit rollback re-checks the retained
previous version and commits it; a retire commits the model's removal. The whole graph is the
``TRANSITIONS`` table below; each state is one small handler.

Save before acting: entering a state first writes it to the journal (edgepack.agent._journal), then
acts. On start, :meth:`Lifecycle.recover` maps the journaled state through ``RESUME`` and carries
on, so a SIGKILL or power cut at any instant ends with the same outcome as an uninterrupted run, or
with a clean rollback once the same operation has been interrupted ``max_install_attempts`` times.
The one atomic switch is ``state.json`` (edgepack.agent._state): committed, or not.

For tests, ``EDGEPACK_FAULT_KILL_AT=<state>`` (or ``EDGEPACK_FAULT_KILL_AFTER=<state>``) makes the
process SIGKILL itself right after journaling that state (or right after acting in it), on an
operation's first attempt only: the faults a real power cut produces, on demand.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime as ort

from edgepack._files import sha256_file, storage_error
from edgepack.agent._compatibility import DeviceFacts, check_compatible, device_facts
from edgepack.agent._config import AgentConfig
from edgepack.agent._fetch import Fetcher, LocalFetcher, discard_fetched
from edgepack.agent._health import check_golden
from edgepack.agent._journal import Journal, JournalEntry
from edgepack.agent._session import open_installed
from edgepack.agent._state import ModelState, Store
from edgepack.agent.exceptions import (
    BundleError,
    EdgepackError,
    InstallError,
    NotInstalledError,
    StorageError,
    VersionError,
)
from edgepack.formats.bundle import GOLDEN_FILE, open_bundle
from edgepack.formats.manifest import Manifest, check_model_name

__all__ = ["RESUME", "TRANSITIONS", "Fetcher", "Lifecycle", "LocalFetcher", "Outcome", "State"]
# Fetcher and LocalFetcher live in edgepack.agent._fetch; re-exported here for callers of the
# lifecycle.

log = logging.getLogger("edgepack.agent")

OnState = Callable[[JournalEntry], None]
"""Called with the journal entry each time an operation enters a state (job progress)."""


class State(str, enum.Enum):
    FETCHING = "fetching"
    VERIFYING = "verifying"
    STAGING = "staging"
    HEALTH_CHECK = "health_check"
    COMMITTING = "committing"
    CLEANUP = "cleanup"
    ROLLING_BACK = "rolling_back"
    DONE = "done"
    FAILED = "failed"


OK, FAIL, SKIP = "ok", "fail", "skip"
S = State

# (operation, state, event) -> next state. An event with no entry is a bug and raises.
# fmt: off
TRANSITIONS: dict[tuple[str, State, str], State] = {
    ("install",  S.FETCHING,      OK):   S.VERIFYING,
    ("install",  S.FETCHING,      FAIL): S.FAILED,
    ("install",  S.VERIFYING,     OK):   S.STAGING,
    ("install",  S.VERIFYING,     SKIP): S.CLEANUP,        # that version is already active
    ("install",  S.VERIFYING,     FAIL): S.FAILED,         # rejected: nothing was touched
    ("install",  S.STAGING,       OK):   S.HEALTH_CHECK,
    ("install",  S.STAGING,       FAIL): S.ROLLING_BACK,
    ("install",  S.HEALTH_CHECK,  OK):   S.COMMITTING,
    ("install",  S.HEALTH_CHECK,  FAIL): S.ROLLING_BACK,
    ("install",  S.COMMITTING,    OK):   S.CLEANUP,
    ("install",  S.COMMITTING,    FAIL): S.ROLLING_BACK,
    ("install",  S.CLEANUP,       OK):   S.DONE,
    ("install",  S.CLEANUP,       FAIL): S.DONE,           # leftovers do not undo a commit
    ("install",  S.ROLLING_BACK,  OK):   S.FAILED,
    ("install",  S.ROLLING_BACK,  FAIL): S.FAILED,
    ("rollback", S.HEALTH_CHECK,  OK):   S.COMMITTING,
    ("rollback", S.HEALTH_CHECK,  FAIL): S.FAILED,         # the active version stays
    ("rollback", S.COMMITTING,    OK):   S.CLEANUP,
    ("rollback", S.COMMITTING,    FAIL): S.FAILED,
    ("rollback", S.CLEANUP,       OK):   S.DONE,
    ("rollback", S.CLEANUP,       FAIL): S.DONE,
    ("retire",   S.COMMITTING,    OK):   S.CLEANUP,
    ("retire",   S.COMMITTING,    FAIL): S.FAILED,
    ("retire",   S.CLEANUP,       OK):   S.DONE,
    ("retire",   S.CLEANUP,       FAIL): S.DONE,
}
# fmt: on

# Where to resume after a crash in a state. Every handler is idempotent, so resuming means
# running the interrupted state again; ROLLING_BACK takes over once attempts run out.
RESUME: dict[State, State] = {
    S.FETCHING: S.FETCHING,
    S.VERIFYING: S.VERIFYING,
    S.STAGING: S.STAGING,
    S.HEALTH_CHECK: S.HEALTH_CHECK,
    S.COMMITTING: S.COMMITTING,
    S.CLEANUP: S.CLEANUP,
    S.ROLLING_BACK: S.ROLLING_BACK,
}


@dataclass
class Outcome:
    """How a lifecycle operation ended."""

    op: str
    result: str  # installed | already-active | rejected | rolled-back | rolled-back-to | retired
    model: str | None = None
    version: int | None = None
    from_version: int | None = None
    reason: str | None = None
    error: EdgepackError | None = None
    trace: list[str] = field(default_factory=list)
    session: ort.InferenceSession | None = None
    manifest: Manifest | None = None
    job_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class _Run:
    """What one operation carries between its states (rebuilt from the journal after a crash)."""

    entry: JournalEntry
    on_state: OnState | None = None
    files: dict[str, bytes] | None = None
    manifest: Manifest | None = None
    session: ort.InferenceSession | None = None
    error: EdgepackError | None = None
    skipped: bool = False
    trace: list[str] = field(default_factory=list)


class Lifecycle:
    """Install, roll back and retire models in one state directory, crash-safely.

    Each operation takes an ``on_state`` observer, called with the journal entry each time the
    operation enters a state (a fleet job reports its progress with it).

    Args:
        config: the agent's configuration (state directory, trusted keys, limits, profile).
        fetcher: how to bring bundles here; local paths by default (the MQTT side adds HTTP).
        facts: this device's architecture/runtime facts (detected when not given).
    """

    def __init__(
        self,
        config: AgentConfig,
        fetcher: Fetcher | None = None,
        facts: DeviceFacts | None = None,
    ) -> None:
        self.config = config
        self.store = Store(config.state_dir)
        self.journal = Journal(self.store.journal_file)
        self.fetcher = fetcher or LocalFetcher()
        self.facts = facts or device_facts(config.profile)
        self._keys = config.public_keys()
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
        job_id: str | None = None,
        on_state: OnState | None = None,
    ) -> Outcome:
        """Install the bundle at ``source`` (a path, or what the fetcher understands), refusing
        it unless it has ``expected_sha256``/``expected_size`` when given. A rejected or
        rolled-back bundle is an :class:`Outcome`, not an exception.

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
        self, name: str, *, job_id: str | None = None, on_state: OnState | None = None
    ) -> Outcome:
        """Switch ``name`` back to its retained previous version (health-checked first).

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
            resume = RESUME.get(state, S.ROLLING_BACK)
            reason = None
            pre_commit = state not in (S.COMMITTING, S.CLEANUP, S.ROLLING_BACK)
            if (
                attempts > self.config.limits.max_install_attempts
                and entry.op == "install"
                and pre_commit
            ):
                resume = S.ROLLING_BACK
                reason = f"interrupted {entry.attempts} times in state {state.value}"
            elif attempts > self.config.limits.max_install_attempts and state is S.HEALTH_CHECK:
                # A rollback that keeps crashing before its commit changes nothing: give up.
                self.journal.clear()
                return Outcome(
                    entry.op,
                    "rejected",
                    entry.model,
                    entry.version,
                    error=InstallError(
                        f"{entry.op} of {entry.model} abandoned after "
                        f"{entry.attempts} interrupted attempts"
                    ),
                )
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
        if state is S.FAILED and run.entry.incoming:
            discard_fetched(run.entry.incoming)  # a rejected bundle is not kept
        self.journal.clear()
        return self._outcome(run, state)

    def _outcome(self, run: _Run, final: State) -> Outcome:
        e = run.entry
        if final is S.DONE:
            result = {
                "install": "already-active" if run.skipped else "installed",
                "rollback": "rolled-back-to",
                "retire": "retired",
            }[e.op]
        elif S.ROLLING_BACK.value in run.trace:
            result = "rolled-back"
        else:
            result = "rejected"
        return Outcome(
            op=e.op,
            result=result,
            model=e.model,
            version=e.version,
            from_version=e.from_version,
            reason=str(run.error) if run.error else e.reason,
            error=run.error,
            trace=run.trace,
            session=run.session if final is S.DONE else None,
            manifest=run.manifest,
            job_id=e.job_id,
        )

    # -- states ------------------------------------------------------------------------------

    def _fetching(self, run: _Run) -> None:
        e = run.entry
        assert e.source is not None
        self.store.ensure()
        digest = hashlib.sha256(e.source.encode()).hexdigest()[:16]
        dest = self.store.incoming / f"{digest}.edgepack"
        run.entry = e.moved(e.state, incoming=str(dest))
        self.journal.write(run.entry)
        if e.expected_sha256 and _sha256(str(dest)) == e.expected_sha256.lower():
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
        try:
            data = Path(e.incoming).read_bytes()
        except OSError as err:
            raise storage_error("read the fetched bundle", Path(e.incoming), err) from err
        digest = hashlib.sha256(data).hexdigest()
        if e.expected_sha256 and digest != e.expected_sha256.lower():
            raise BundleError(
                f"bundle sha256 {digest} does not match the expected {e.expected_sha256}; it was "
                "corrupted or replaced in transit"
            )
        bundle = open_bundle(data, self._keys, self.config.limits.archive_limits())
        manifest = bundle.manifest
        check_compatible(manifest, self.facts)
        current = self.store.load().models.get(manifest.name, ModelState())
        run.entry = e.moved(
            e.state, model=manifest.name, version=manifest.version, from_version=current.active
        )
        run.files, run.manifest = dict(bundle.files), manifest
        if current.active == manifest.version:
            run.skipped = True
            return SKIP
        if manifest.version <= current.highest:
            raise VersionError(
                f"{manifest.name} v{manifest.version} is not newer than v{current.highest}, the "
                f"highest version installed here; downgrades are refused (build a new version, "
                "or roll back to the retained previous one)"
            )
        return None

    def _staging(self, run: _Run) -> None:
        e = run.entry
        if run.files is None:  # resumed after a crash: verify the fetched bundle again
            self._verifying(run)
        if run.files is None or e.model is None or e.version is None:
            raise InstallError("nothing verified to stage")
        self.store.stage(e.model, e.version, run.files)

    def _health_check(self, run: _Run) -> None:
        e = run.entry
        if e.model is None or e.version is None:
            raise InstallError("no model to check")
        # Opened exactly as the runtime will serve it: verified again, from the installed files.
        installed = open_installed(self.store, e.model, e.version, self._keys, self.config.runtime)
        golden = installed.files.get(GOLDEN_FILE, b"")  # missing: "unreadable", a failed check
        rows = check_golden(installed.session, installed.manifest, golden)
        log.info("%s v%d healthy: %d golden rows match", e.model, e.version, rows)
        run.session, run.manifest = installed.session, installed.manifest

    def _committing(self, run: _Run) -> None:
        e = run.entry
        assert e.model is not None
        state = self.store.load()
        if e.op == "install":
            assert e.version is not None
            sha256 = _sha256(e.incoming)  # None once cleaned up (a resumed commit)
            changed = state.commit_install(
                e.model, e.version, op=e.id, job=e.job_id, bundle_sha256=sha256
            )
        elif e.op == "rollback":
            assert e.version is not None
            changed = state.commit_rollback(
                e.model, e.version, op=e.id, job=e.job_id, replacing=e.from_version
            )
        else:
            changed = state.commit_retire(e.model, op=e.id, job=e.job_id, version=e.from_version)
        if changed:  # unchanged: committed before a crash
            self.store.save(state)

    def _cleanup(self, run: _Run) -> None:
        e = run.entry
        assert e.model is not None
        current = self.store.load().models.get(e.model, ModelState())
        self.store.prune(e.model, current.retained())
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
        if e.incoming:
            discard_fetched(e.incoming)
        reason = str(run.error) if run.error else e.reason
        if state.record_rolled_back(
            e.id, e.op, e.model, e.version, e.from_version, reason, e.job_id
        ):
            self.store.save(state)


def _sha256(path: str | None) -> str | None:
    """The fetched bundle's sha256, or None if there is none (not fetched, or cleaned up)."""
    if not path or not os.path.isfile(path):
        return None
    try:
        return sha256_file(path)
    except OSError as e:
        raise storage_error("read the fetched bundle", Path(path), e) from e


def _fault(variable: str, state: State, entry: JournalEntry) -> None:
    """Test hook: SIGKILL this process at a chosen state, on the first attempt only."""
    if os.environ.get(variable) == state.value and entry.attempts == 1:
        os.kill(os.getpid(), signal.SIGKILL)
