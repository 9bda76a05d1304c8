"""The agent's state directory: which versions are installed, and their files.

Layout (``state_dir``, e.g. ``/var/lib/edgepack``)::

    state.json                 committed state: per model the active and previous version, the
                               highest version ever committed, and a bounded event history
    journal.json               the operation in flight, if any (edgepack.agent._journal)
    lock                       flock()ed by whoever changes anything (daemon or CLI)
    incoming/                  bundles being fetched (copied or downloaded)
    staging/op-ID/             the bundle of operation ID, streamed out and verified
                               (edgepack.agent._unpack), before it is renamed into models/
    models/NAME/VERSION/       the extracted, verified files of each retained version

``state.json`` is the single source of truth and only ever replaced atomically (edgepack._files),
so "which version is active" switches in one rename; :class:`DeviceState` holds the three commits
the lifecycle makes to it (install, rollback, retire) and the record of a rollback. Model
directories are created by renaming a fully written, fsynced and verified staging directory
into place (:meth:`Store.promote`), so a version directory is complete or absent. At most the
active and the previous version of a model are kept.

A model may also have a *candidate* (``candidate``): a version installed beside the active one
for an experiment (edgepack.agent._experiment), with its plan (mode, share, sample). It is
committed in the same one rename, kept in ``models/`` like the retained versions, and either
promoted (:meth:`DeviceState.commit_promote`: it becomes active, the active one previous) or
stopped (:meth:`DeviceState.commit_stop`). A deploy of a version at or above it ends it.

A newly installed version is *on probation* (``probation``) until the daemon has served it for
``[limits] probation_period`` seconds; ``probation_starts`` durably counts the daemon's starts
meanwhile (edgepack.agent._probation), and too many of them roll it back.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgepack._clock import utc_text
from edgepack._files import fsync_dir, read_json, storage_error, write_json_atomic
from edgepack.agent.exceptions import InstallError, NotInstalledError, StorageError

__all__ = ["DeviceState", "ModelState", "Store"]

HISTORY_LIMIT = 100
_STATE_VERSION = 1


@dataclass
class ModelState:
    """One model on this device. ``highest`` never decreases: it is the downgrade guard."""

    active: int | None = None
    previous: int | None = None
    highest: int = -1
    bundle_sha256: str | None = None
    installed_at: str | None = None
    probation: bool = False  # the active version has not yet served its probation period
    probation_starts: int = 0  # daemon starts since it was committed, while on probation
    # an experiment's candidate: {"version", "plan": {mode, share, sample}, "bundle_sha256",
    # "job", "since"}; None when no experiment runs
    candidate: dict[str, Any] | None = None

    @property
    def candidate_version(self) -> int | None:
        return None if self.candidate is None else int(self.candidate["version"])

    def retained(self) -> set[int]:
        return {v for v in (self.active, self.previous, self.candidate_version) if v is not None}


@dataclass
class DeviceState:
    """Everything committed on this device."""

    generation: int = 0
    models: dict[str, ModelState] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    def record(self, **event: Any) -> None:
        """Append an event (install, rollback, retire, recovery) to the bounded history."""
        self.history.append({"time": utc_text(), **event})
        del self.history[:-HISTORY_LIMIT]

    # The three commits of the lifecycle (edgepack.agent._lifecycle, COMMITTING). Each returns
    # False when it had already been made (the state was resumed after a crash): nothing to save.

    def commit_install(
        self,
        model: str,
        version: int,
        *,
        op: str,
        job: str | None,
        bundle_sha256: str | None,
        probation: bool = False,
    ) -> bool:
        """``version`` becomes active (on ``probation`` if asked), the active one previous;
        ``highest`` follows."""
        current = self.models.setdefault(model, ModelState())
        if current.active == version:
            return False
        current.previous, current.active = current.active, version
        current.highest = max(current.highest, version)
        if current.candidate_version is not None and current.candidate_version <= version:
            current.candidate = None  # the deploy supersedes the experiment
        current.bundle_sha256 = bundle_sha256
        current.installed_at = utc_text()
        current.probation, current.probation_starts = probation, 0
        self.record(
            op=op,
            model=model,
            action="install",
            version=version,
            previous=current.previous,
            result="installed",
            job=job,
        )
        return True

    def commit_rollback(
        self,
        model: str,
        version: int,
        *,
        op: str,
        job: str | None,
        replacing: int | None,
        reason: str | None = None,
    ) -> bool:
        """The retained previous ``version`` becomes active again; nothing is retained after it.

        Raises:
            NotInstalledError: ``version`` is no longer the retained previous version.
        """
        current = self.models.setdefault(model, ModelState())
        if current.active == version:
            return False
        if current.previous != version:
            raise NotInstalledError(f"{model} v{version} is no longer retained")
        current.active, current.previous = version, None
        current.installed_at = utc_text()
        current.probation, current.probation_starts = False, 0  # it had served before
        self.record(
            op=op,
            model=model,
            action="rollback",
            version=version,
            previous=replacing,
            result="rolled-back-to",
            job=job,
            **({"reason": reason} if reason else {}),
        )
        return True

    def count_start(self, model: str) -> int:
        """One more daemon start while ``model``'s active version is on probation; the count."""
        current = self.models[model]
        current.probation_starts += 1
        return current.probation_starts

    def end_probation(self, model: str, *, result: str, reason: str) -> None:
        """``model``'s active version is off probation: ``"good"``, or given up on."""
        current = self.models[model]
        current.probation, current.probation_starts = False, 0
        self.record(
            model=model, action="probation", version=current.active, result=result, reason=reason
        )

    def record_rolled_back(
        self,
        op: str,
        action: str,
        model: str | None,
        version: int | None,
        previous: int | None,
        reason: str | None,
        job: str | None,
    ) -> bool:
        """Record that operation ``op`` was rolled back; False if it already was."""
        if any(event.get("op") == op for event in self.history):
            return False  # recorded before a crash
        self.record(
            op=op,
            model=model,
            action=action,
            version=version,
            previous=previous,
            result="rolled-back",
            reason=reason,
            job=job,
        )
        return True

    def commit_retire(self, model: str, *, op: str, job: str | None, version: int | None) -> bool:
        """``model`` is no longer installed; its ``highest`` stays (no later downgrade)."""
        current = self.models.setdefault(model, ModelState())
        if current.active is None:
            return False
        current.active = current.previous = None
        current.candidate = None
        current.installed_at = None
        current.probation, current.probation_starts = False, 0
        self.record(op=op, model=model, action="retire", version=version, result="retired", job=job)
        return True

    def commit_candidate(
        self,
        model: str,
        version: int,
        *,
        op: str,
        job: str | None,
        plan: dict[str, Any],
        bundle_sha256: str | None,
    ) -> bool:
        """``version`` becomes ``model``'s candidate with ``plan`` (replacing any other one);
        False when exactly that is committed already."""
        current = self.models.setdefault(model, ModelState())
        if current.candidate_version == version and (current.candidate or {}).get("plan") == plan:
            return False
        current.candidate = {
            "version": version,
            "plan": dict(plan),
            "bundle_sha256": bundle_sha256,
            "job": job,
            "since": utc_text(),
        }
        self.record(
            op=op, model=model, action="candidate", version=version, previous=current.active,
            result="candidate", job=job, plan=dict(plan),
        )  # fmt: skip
        return True

    def commit_promote(
        self, model: str, version: int, *, op: str, job: str | None, probation: bool = False
    ) -> bool:
        """The candidate ``version`` becomes active, the active one previous (a rollback goes
        back to it); False when it was promoted already.

        Raises:
            NotInstalledError: ``version`` is not ``model``'s candidate.
        """
        current = self.models.setdefault(model, ModelState())
        if current.active == version and current.candidate is None:
            return False
        if current.candidate_version != version:
            raise NotInstalledError(f"{model} v{version} is not the candidate here")
        sha = (current.candidate or {}).get("bundle_sha256")
        current.candidate = None
        return self.commit_install(
            model, version, op=op, job=job, bundle_sha256=sha, probation=probation
        )

    def commit_stop(self, model: str, *, op: str, job: str | None) -> bool:
        """``model`` has no candidate any more; False when it had none."""
        current = self.models.get(model)
        if current is None or current.candidate is None:
            return False
        version, current.candidate = current.candidate_version, None
        self.record(op=op, model=model, action="stop", version=version, result="stopped", job=job)
        return True

    def to_json(self) -> dict[str, Any]:
        return {
            "state_version": _STATE_VERSION,
            "generation": self.generation,
            "models": {name: asdict(m) for name, m in sorted(self.models.items())},
            "history": self.history,
        }

    @classmethod
    def from_json(cls, data: Any, source: Path) -> DeviceState:
        try:
            return cls(
                generation=int(data["generation"]),
                models={name: ModelState(**m) for name, m in data["models"].items()},
                history=list(data.get("history", [])),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise StorageError(f"{source} is not a valid edgepack state file: {e}") from e


class Store:
    """Paths and durable operations on one state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir
        self.state_file = state_dir / "state.json"
        self.journal_file = state_dir / "journal.json"
        self.incoming = state_dir / "incoming"
        self.staging = state_dir / "staging"
        self.models = state_dir / "models"

    def ensure(self) -> None:
        """Create the directory tree (mode 0700: bundles may hold proprietary models)."""
        try:
            for path in (self.root, self.incoming, self.staging, self.models):
                path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise storage_error("create", self.root, e) from e

    @contextlib.contextmanager
    def lock(self, timeout: float = 30.0) -> Iterator[None]:
        """Hold the state directory's exclusive lock (one changer at a time, across processes).

        Raises:
            InstallError: another process held it for longer than ``timeout`` seconds.
            StorageError: the lock file cannot be created or locked (permissions, no locks).
        """
        self.ensure()
        try:
            fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise storage_error("open the lock file", self.root / "lock", e) from e
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES):
                        raise storage_error("lock", self.root / "lock", e) from e
                    if time.monotonic() > deadline:
                        raise InstallError(
                            f"another edgepack-agent operation holds {self.root / 'lock'}; "
                            "wait for it to finish and retry"
                        ) from e
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def load(self) -> DeviceState:
        """The committed state (empty on a new device)."""
        data = read_json(self.state_file)
        return DeviceState() if data is None else DeviceState.from_json(data, self.state_file)

    def save(self, state: DeviceState) -> None:
        """Commit ``state`` atomically; bumps its generation so readers notice."""
        state.generation += 1
        write_json_atomic(self.state_file, state.to_json())

    def version_dir(self, name: str, version: int) -> Path:
        return self.models / name / str(version)

    def unpacking(self, op: str) -> Path:
        """The private directory under ``staging/`` where operation ``op`` unpacks its bundle."""
        return self.staging / f"op-{op}"

    def discard_unpacked(self, op: str) -> None:
        """Remove what operation ``op`` unpacked and did not promote (missing is fine)."""
        shutil.rmtree(self.unpacking(op), ignore_errors=True)

    def promote(self, unpacked: Path, name: str, version: int) -> Path:
        """Rename the fully written, fsynced and verified ``unpacked`` directory into place.

        A leftover directory for the same version (from an interrupted earlier attempt, never
        committed) is replaced.

        Raises:
            StorageError: the rename failed; ``unpacked`` stays where it was.
        """
        target = self.version_dir(name, version)
        try:
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if target.exists():
                shutil.rmtree(target)
            os.rename(unpacked, target)
            fsync_dir(target.parent)
            fsync_dir(unpacked.parent)
        except OSError as e:
            raise storage_error("move model files to", target, e) from e
        return target

    def remove_version(self, name: str, version: int) -> None:
        """Delete one version's files (missing is fine)."""
        shutil.rmtree(self.version_dir(name, version), ignore_errors=True)

    def prune(self, name: str, keep: set[int]) -> None:
        """Delete every version directory of ``name`` not in ``keep``, and everything in
        ``staging/`` (called as an operation ends: nothing there belongs to another one)."""
        directory = self.models / name
        if directory.is_dir():
            for child in directory.iterdir():
                if not (child.name.isdigit() and int(child.name) in keep):
                    shutil.rmtree(child, ignore_errors=True)
            if not keep:
                shutil.rmtree(directory, ignore_errors=True)
        for child in self.staging.iterdir() if self.staging.is_dir() else ():
            shutil.rmtree(child, ignore_errors=True)
