"""Optional sample capture for retraining: a rate-limited, bounded store of live rows.

Off by default (``[capture] enabled = true`` turns it on). The monitor's background thread offers
each served batch; a token bucket admits at most ``per_minute`` rows, which go with the model's
outputs into a SQLite file in the state directory, keeping at most ``max_rows`` (oldest dropped).
``edgepack-agent export-samples`` writes them out as CSV, or Parquet where pyarrow is installed.
Inputs stay on the device unless an operator exports them. The settings are the ``[capture]``
table of ``agent.toml`` (:class:`~edgepack.agent._config.CaptureConfig`).
"""

from __future__ import annotations

import csv
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.agent._config import CaptureConfig
from edgepack.agent.exceptions import ConfigError, StorageError

__all__ = ["SampleStore"]


def _row(
    inputs: Mapping[str, np.ndarray],
    outputs: Mapping[str, np.ndarray],
    i: int,
    columns: Mapping[str, list[str]],
) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for name, array in inputs.items():
        values = np.asarray(array)[i]
        names = columns.get(name) or [f"{name}[{j}]" for j in range(np.size(values))]
        for column, value in zip(names, np.atleast_1d(values).tolist(), strict=False):
            row[column] = value
    for name, array in outputs.items():
        value = np.asarray(array)[i]
        row[f"output.{name}"] = value.tolist()
    return row


class SampleStore:
    """Captured rows of every model, bounded and rate limited.

    Args:
        path: the SQLite file (created, mode 0600).
        config: the ``[capture]`` table.
        clock: seconds from a monotonic clock, for the rate limit (tests pass their own).
    """

    def __init__(
        self, path: Path, config: CaptureConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = float(config.per_minute)
        self._refilled = clock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(mode=0o600, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False)
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS samples (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                "model TEXT, version INTEGER, ts REAL, row TEXT)"
            )
        except sqlite3.Error as e:
            raise StorageError(f"cannot open the sample store {path}: {e}") from e

    def _admit(self, wanted: int) -> int:
        now = self._clock()
        rate = self.config.per_minute / 60.0
        self._tokens = min(
            float(self.config.per_minute), self._tokens + (now - self._refilled) * rate
        )
        self._refilled = now
        admitted = min(wanted, int(self._tokens))
        self._tokens -= admitted
        return admitted

    def offer(
        self,
        model: str,
        version: int,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray],
        columns: Mapping[str, list[str]],
    ) -> int:
        """Keep up to the allowed number of this batch's rows; returns how many."""
        rows = len(next(iter(inputs.values()))) if inputs else 0
        with self._lock:
            admitted = self._admit(rows)
            if not admitted:
                return 0
            now = time.time()
            records = [
                (model, version, now, json.dumps(_row(inputs, outputs, i, columns)))
                for i in range(admitted)
            ]
            with self._db:
                self._db.executemany(
                    "INSERT INTO samples (model, version, ts, row) VALUES (?, ?, ?, ?)", records
                )
                self._db.execute(
                    "DELETE FROM samples WHERE id <= (SELECT MAX(id) FROM samples) - ?",
                    (self.config.max_rows,),
                )
        return admitted

    def count(self, model: str | None = None) -> int:
        with self._lock:
            if model is None:
                return int(self._db.execute("SELECT COUNT(*) FROM samples").fetchone()[0])
            return int(
                self._db.execute(
                    "SELECT COUNT(*) FROM samples WHERE model = ?", (model,)
                ).fetchone()[0]
            )

    def export(self, model: str, out: Path) -> int:
        """Write ``model``'s samples to ``out`` (.csv, or .parquet with pyarrow); rows written."""
        with self._lock:
            rows = [
                {"version": version, "captured_at": ts, **json.loads(raw)}
                for version, ts, raw in self._db.execute(
                    "SELECT version, ts, row FROM samples WHERE model = ? ORDER BY id", (model,)
                )
            ]
        columns = list(dict.fromkeys(key for row in rows for key in row))
        if out.suffix.lower() == ".parquet":
            try:
                import pyarrow as pa
                import pyarrow.parquet as pq
            except ImportError as e:
                raise ConfigError(
                    "Parquet export needs pyarrow (pip install pyarrow); or export to .csv"
                ) from e
            table = pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows])
            pq.write_table(table, out)
        else:
            with out.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns)
                writer.writeheader()
                for row in rows:
                    writer.writerow(
                        {k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()}
                    )
        return len(rows)

    def close(self) -> None:
        with self._lock:
            self._db.close()
