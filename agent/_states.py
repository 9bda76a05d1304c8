"""The install lifecycle's graph, as data: its states, the transition table and the resume table.

edgepack.agent._lifecycle drives operations through :data:`TRANSITIONS` (one entry per
(operation, state, event)) and, after a crash, restarts them where :data:`RESUME` says; every
state is one small handler there. :class:`Outcome` is how an operation ended. Keeping the graph
here, apart from the handlers, lets a reader see every path an install can take in one block.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from edgepack.agent._journal import JournalEntry
from edgepack.agent.exceptions import EdgepackError
from edgepack.formats.manifest import Manifest

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = [
    "FAIL",
    "OK",
    "RESUME",
    "SKIP",
    "TRANSITIONS",
    "OnState",
    "Outcome",
    "State",
    "resume_point",
]

OnState = Callable[[JournalEntry], None]
"""Called with the journal entry each time an operation enters a state (job progress)."""


class State(str, enum.Enum):
    """Where an operation is; the value is what the journal records."""

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
    ("install",  S.VERIFYING,     OK):   S.STAGING,        # verified, in staging/op-ID/
    ("install",  S.VERIFYING,     SKIP): S.CLEANUP,        # that version is already active
    ("install",  S.VERIFYING,     FAIL): S.FAILED,         # rejected: models/ was not touched
    ("install",  S.STAGING,       OK):   S.HEALTH_CHECK,   # renamed into models/NAME/VERSION
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
    # an experiment's candidate, installed beside the active version (which never changes)
    ("candidate", S.FETCHING,     OK):   S.VERIFYING,
    ("candidate", S.FETCHING,     FAIL): S.FAILED,
    ("candidate", S.VERIFYING,    OK):   S.STAGING,
    ("candidate", S.VERIFYING,    SKIP): S.COMMITTING,     # that candidate is there: new plan
    ("candidate", S.VERIFYING,    FAIL): S.FAILED,         # rejected: models/ was not touched
    ("candidate", S.STAGING,      OK):   S.HEALTH_CHECK,
    ("candidate", S.STAGING,      FAIL): S.ROLLING_BACK,
    ("candidate", S.HEALTH_CHECK, OK):   S.COMMITTING,
    ("candidate", S.HEALTH_CHECK, FAIL): S.ROLLING_BACK,   # refused: the active one serves on
    ("candidate", S.COMMITTING,   OK):   S.CLEANUP,
    ("candidate", S.COMMITTING,   FAIL): S.ROLLING_BACK,
    ("candidate", S.CLEANUP,      OK):   S.DONE,
    ("candidate", S.CLEANUP,      FAIL): S.DONE,
    ("candidate", S.ROLLING_BACK, OK):   S.FAILED,
    ("candidate", S.ROLLING_BACK, FAIL): S.FAILED,
    ("promote",  S.HEALTH_CHECK,  OK):   S.COMMITTING,     # the candidate's files re-checked
    ("promote",  S.HEALTH_CHECK,  FAIL): S.FAILED,         # active and candidate stay
    ("promote",  S.COMMITTING,    OK):   S.CLEANUP,
    ("promote",  S.COMMITTING,    FAIL): S.FAILED,
    ("promote",  S.CLEANUP,       OK):   S.DONE,
    ("promote",  S.CLEANUP,       FAIL): S.DONE,
    ("stop",     S.COMMITTING,    OK):   S.CLEANUP,
    ("stop",     S.COMMITTING,    FAIL): S.FAILED,
    ("stop",     S.CLEANUP,       OK):   S.DONE,
    ("stop",     S.CLEANUP,       FAIL): S.DONE,
}
# fmt: on

# Where to resume after a crash in a state. Every handler is idempotent, so resuming means
# running the interrupted state again (VERIFYING unpacks afresh; STAGING renames what VERIFYING
# left, or finds it renamed); ROLLING_BACK takes over once attempts run out.
RESUME: dict[State, State] = {
    S.FETCHING: S.FETCHING,
    S.VERIFYING: S.VERIFYING,
    S.STAGING: S.STAGING,
    S.HEALTH_CHECK: S.HEALTH_CHECK,
    S.COMMITTING: S.COMMITTING,
    S.CLEANUP: S.CLEANUP,
    S.ROLLING_BACK: S.ROLLING_BACK,
}


_COMMITTED = (S.COMMITTING, S.CLEANUP, S.ROLLING_BACK)  # past (or undoing) the commit


def resume_point(entry: JournalEntry, max_attempts: int) -> tuple[State | None, str | None]:
    """Where an operation interrupted in ``entry.state`` carries on, and why when that is a
    rollback it did not plan; ``(None, why)``: give it up (it had changed nothing).

    The attempt cap breaks crash loops: an install that keeps dying before its commit is rolled
    back, a rollback that keeps dying in its health check is abandoned.
    """
    state = State(entry.state)
    resume = RESUME.get(state, S.ROLLING_BACK)
    if entry.attempts + 1 <= max_attempts:
        return resume, None
    if entry.op in ("install", "candidate") and state not in _COMMITTED:
        return S.ROLLING_BACK, f"interrupted {entry.attempts} times in state {state.value}"
    if state is S.HEALTH_CHECK:
        return (
            None,
            f"{entry.op} of {entry.model} abandoned after {entry.attempts} interrupted attempts",
        )
    return resume, None


class Result(str, enum.Enum):
    """How a lifecycle operation ended; the value is what history and reports say."""

    INSTALLED = "installed"
    ALREADY_ACTIVE = "already-active"  # an install of the version that is active already
    ROLLED_BACK_TO = "rolled-back-to"  # an explicit rollback that switched versions
    RETIRED = "retired"
    CANDIDATE = "candidate"  # an experiment's candidate installed (or its plan changed)
    PROMOTED = "promoted"  # the candidate became the active version
    STOPPED = "stopped"  # the experiment ended, its candidate removed
    ROLLED_BACK = "rolled-back"  # an install that failed after staging: the old version serves
    REJECTED = "rejected"  # refused before anything changed
    FAILED = "failed"  # could not run at all (an agent fault)

    def __str__(self) -> str:
        return self.value


@dataclass
class Outcome:
    """How a lifecycle operation ended."""

    op: str
    result: Result
    model: str | None = None
    version: int | None = None
    from_version: int | None = None
    reason: str | None = None
    error: EdgepackError | None = None
    trace: list[str] = field(default_factory=list)
    manifest: Manifest | None = None
    job_id: str | None = None
    # the session the health check ran on, loaded once: an install or rollback that committed
    # hands it to the runtime to serve (edgepack.agent._health_check); None otherwise, or once
    # handed over
    session: ort.InferenceSession | None = None

    @property
    def ok(self) -> bool:
        return self.error is None
