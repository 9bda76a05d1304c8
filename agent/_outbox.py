"""Store-and-forward for everything the device reports: a bounded, durable, ordered outbox.

paho only queues in memory and loses its queue when the agent exits, so job updates, drift
reports and telemetry go through here: a SQLite file in the state directory (WAL, synchronous
writes), drained strictly in order by the MQTT link once the broker acknowledged each message.
It survives agent restarts and broker outages.

Bounded: beyond ``max_messages`` the oldest *telemetry* is dropped first, then the oldest drift
report, then the oldest quality report, and the drop is counted (reported with the next
telemetry). Job updates are never dropped; an outbox full of job updates alone keeps growing,
since losing one would leave the operator blind to what the device did.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from edgepack.agent.exceptions import StorageError

__all__ = ["KINDS", "Message", "Outbox"]

KINDS = ("job", "quality", "drift", "telemetry")  # never dropped … dropped first
_DROP_ORDER = ("telemetry", "drift", "quality")


@dataclass(frozen=True)
class Message:
    id: int
    kind: str
    topic: str
    payload: bytes


class Outbox:
    """A durable FIFO of MQTT messages.

    Args:
        path: the SQLite file (created 0600).
        max_messages: the bound; see the module docstring for what is dropped.
    """

    def __init__(self, path: Path, max_messages: int = 10_000) -> None:
        self.path = path
        self.max_messages = max_messages
        self._lock = threading.Lock()
        self.added = threading.Event()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(mode=0o600, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                "kind TEXT NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL)"
            )
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER)"
            )
        except sqlite3.Error as e:
            raise StorageError(f"cannot open the outbox {path}: {e}") from e

    def put(self, kind: str, topic: str, payload: bytes) -> None:
        """Append a message (durably), dropping the oldest droppable ones past the bound."""
        if kind not in KINDS:
            raise ValueError(f"unknown outbox kind {kind!r}")
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute(
                    "INSERT INTO outbox (kind, topic, payload) VALUES (?, ?, ?)",
                    (kind, topic, payload),
                )
                excess = self._count() - self.max_messages
                for droppable in _DROP_ORDER:
                    if excess <= 0:
                        break
                    dropped = self._db.execute(
                        "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE kind = ? "
                        "ORDER BY id LIMIT ?)",
                        (droppable, excess),
                    ).rowcount
                    if dropped:
                        self._bump(f"dropped_{droppable}", dropped)
                        excess -= dropped
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                self._db.execute("ROLLBACK")
                raise StorageError(f"cannot write to the outbox {self.path}: {e}") from e
        self.added.set()

    def _count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def _bump(self, name: str, by: int) -> None:
        self._db.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            (name, by),
        )

    def peek(self) -> Message | None:
        """The oldest message, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT id, kind, topic, payload FROM outbox ORDER BY id LIMIT 1"
            ).fetchone()
        return Message(int(row[0]), row[1], row[2], bytes(row[3])) if row else None

    def remove(self, message_id: int) -> None:
        """Forget a message the broker acknowledged."""
        with self._lock:
            self._db.execute("DELETE FROM outbox WHERE id = ?", (message_id,))

    def __len__(self) -> int:
        with self._lock:
            return self._count()

    def counters(self) -> dict[str, int]:
        with self._lock:
            return {
                name: int(value)
                for name, value in self._db.execute("SELECT name, value FROM counters")
            }

    def next_seq(self, name: str) -> int:
        """A durable counter (report sequence numbers that survive restarts)."""
        with self._lock:
            self._bump(f"seq_{name}", 1)
            return int(
                self._db.execute(
                    "SELECT value FROM counters WHERE name = ?", (f"seq_{name}",)
                ).fetchone()[0]
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()
