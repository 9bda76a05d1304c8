"""Time, in one place: the current UTC moment, its text form, and an injectable clock.

Everything that stamps a record (journal entries, job updates, manifests, store rows) takes its
time from here, so the text form is the same everywhere (ISO 8601, UTC, whole seconds unless
asked otherwise), and tests that need a moment pass a :data:`Clock` instead of reading the wall.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

__all__ = ["Clock", "utc_now", "utc_text"]

Clock = Callable[[], dt.datetime]
"""A function returning the current moment as an aware UTC datetime (:func:`utc_now`)."""


def utc_now() -> dt.datetime:
    """The current moment, timezone-aware, in UTC."""
    return dt.datetime.now(dt.timezone.utc)


def utc_text(moment: dt.datetime | None = None, timespec: str = "seconds") -> str:
    """``moment`` (default: now) as ISO 8601 text in UTC, e.g. ``2026-12-02T03:42:32+00:00``."""
    moment = utc_now() if moment is None else moment
    if moment.tzinfo is None:
        raise ValueError("utc_text needs an aware datetime; got a naive one")
    return moment.astimezone(dt.timezone.utc).isoformat(timespec=timespec)
