"""The journal: a durable record of the one lifecycle operation in flight.

Before each state of an install, rollback or retire does anything, the state machine writes the
state it is entering here (edgepack._files: temp file, fsync, rename). After a crash or power cut
the agent reads the journal on start and resumes from the recorded state
(edgepack.agent._lifecycle's recovery table). ``attempts`` counts restarts of the same operation, so
a state that crashes the process every time ends in a rollback instead of a crash loop.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from edgepack._clock import utc_text
from edgepack._files import read_json, write_json_atomic
from edgepack.agent.exceptions import StorageError

__all__ = ["Journal", "JournalEntry"]


@dataclass(frozen=True)
class JournalEntry:
    """One operation in flight."""

    op: str  # "install" | "rollback" | "retire" | "candidate" | "promote" | "stop"
    state: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])  # ties history events to it
    source: str | None = None  # where the bundle comes from (path or URL)
    incoming: str | None = None  # the local copy being installed
    expected_sha256: str | None = None
    expected_size: int | None = None
    expected_model: str | None = None  # what the deploy says the bundle is (checked once parsed)
    expected_version: int | None = None
    bundle_sha256: str | None = None  # of the archive as verified (what is installed)
    model: str | None = None  # known once verified (install) or from the start
    version: int | None = None
    from_version: int | None = None  # the version active when the operation started
    job_id: str | None = None
    attempts: int = 1
    reason: str | None = None
    plan: dict[str, Any] | None = None  # a candidate's experiment plan (mode, share, sample)
    started: str = field(default_factory=utc_text)

    def moved(self, state: str, **changes: Any) -> JournalEntry:
        return replace(self, state=state, **changes)


class Journal:
    """Read, write and clear ``journal.json``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> JournalEntry | None:
        data = read_json(self.path)
        if data is None:
            return None
        try:
            return JournalEntry(**data)
        except TypeError as e:
            raise StorageError(f"{self.path} is not a valid journal: {e}") from e

    def write(self, entry: JournalEntry) -> None:
        write_json_atomic(self.path, asdict(entry))

    def clear(self) -> None:
        try:
            self.path.unlink(missing_ok=True)
        except OSError as e:
            raise StorageError(f"cannot remove {self.path}: {e.strerror or e}") from e
