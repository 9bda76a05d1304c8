"""Alerts the collector fires, and their delivery to Alertmanager-compatible webhooks.

The collector hands every report and job update it has committed to :meth:`Alerter.observe`,
which decides from it whether an alert starts firing or is resolved:

=============================  ===============================================  =============
alertname                      fires on                                         resolved by
=============================  ===============================================  =============
``EdgepackDriftDetected``      a drift report with status ``drift``             a later
                                                                                ``ok``/``warning``
``EdgepackQualityDegraded``    a quality report with status ``degraded``        a later
                                                                                ``ok``/``warning``
``EdgepackHealthCheckFailed``  a job update FAILED at the health-check step     a later success
``EdgepackJobFailed``          a job update FAILED or REJECTED (other steps)    a later success
=============================  ===============================================  =============

Each alert has a fingerprint (a hash of its labels). Its state is kept in a small SQLite file so
a restarted collector neither forgets an alert nor sends it again: a firing alert is re-sent only
after ``repeat_interval``, and its resolution is sent once.

Delivery runs on its own thread with a bounded queue: :meth:`Alerter.observe` never blocks (a
notification that does not fit is dropped and counted), and each POST is retried with bounded
exponential backoff. The body is the JSON Alertmanager posts to its webhook receivers (version
``"4"``), so any receiver written for Alertmanager accepts it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import queue
import sqlite3
import threading
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from edgepack._clock import Clock, utc_now

__all__ = ["Alert", "AlertStats", "Alerter", "WebhookSender", "alertmanager_payload"]

log = logging.getLogger("edgepack.fleet.alerts")

_ZERO = "0001-01-01T00:00:00Z"  # Alertmanager's endsAt for an alert still firing

_SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    fingerprint TEXT PRIMARY KEY, labels TEXT NOT NULL, annotations TEXT NOT NULL,
    status TEXT NOT NULL, starts_at TEXT NOT NULL, ends_at TEXT, last_sent_at TEXT,
    resolved_sent INTEGER NOT NULL DEFAULT 0);
"""


def _ts(at: datetime) -> str:
    return at.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _parse_ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def fingerprint(labels: Mapping[str, str]) -> str:
    """A stable 16-hex-digit hash of an alert's labels (Alertmanager's are 16 hex digits too)."""
    text = json.dumps(dict(sorted(labels.items())), separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Alert:
    """One alert, as the store keeps it and the webhook sends it."""

    labels: dict[str, str]
    annotations: dict[str, str]
    status: str  # "firing" or "resolved"
    starts_at: datetime
    ends_at: datetime | None = None
    last_sent_at: datetime | None = None
    resolved_sent: bool = False

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.labels)

    def to_json(self, generator_url: str = "") -> dict[str, Any]:
        return {
            "status": self.status,
            "labels": dict(self.labels),
            "annotations": dict(self.annotations),
            "startsAt": _ts(self.starts_at),
            "endsAt": _ts(self.ends_at) if self.ends_at is not None else _ZERO,
            "generatorURL": generator_url,
            "fingerprint": self.fingerprint,
        }


def alertmanager_payload(
    alerts: Sequence[Alert], *, receiver: str = "edgepack", external_url: str = ""
) -> dict[str, Any]:
    """The JSON body Alertmanager posts to a webhook receiver, for ``alerts`` in one group."""
    group = {"alertname": alerts[0].labels["alertname"]} if alerts else {}
    common_labels = _common([a.labels for a in alerts])
    return {
        "version": "4",
        # Alertmanager's form: the route's matchers, then the group labels as matchers
        "groupKey": "{}:{" + ", ".join(f'{k}="{v}"' for k, v in sorted(group.items())) + "}",
        "truncatedAlerts": 0,
        "status": "firing" if any(a.status == "firing" for a in alerts) else "resolved",
        "receiver": receiver,
        "groupLabels": group,
        "commonLabels": common_labels,
        "commonAnnotations": _common([a.annotations for a in alerts]),
        "externalURL": external_url,
        "alerts": [a.to_json(external_url) for a in alerts],
    }


def _common(maps: Sequence[Mapping[str, str]]) -> dict[str, str]:
    if not maps:
        return {}
    first = dict(maps[0])
    return {k: v for k, v in first.items() if all(m.get(k) == v for m in maps[1:])}


@dataclass
class AlertStats:
    fired: int = 0
    resolved: int = 0
    sent: int = 0  # webhook POSTs that succeeded
    failed: int = 0  # POSTs given up after every retry
    retries: int = 0
    dropped: int = 0  # notifications that did not fit in the delivery queue


class WebhookSender:
    """POSTs payloads to one URL from its own thread, retrying with bounded exponential backoff.

    Args:
        url: the receiver.
        timeout: seconds one POST may take.
        attempts: tries per notification (the first included).
        backoff: seconds before the first retry; doubled each time, at most ``max_backoff``.
        queue_size: notifications waiting at most; :meth:`submit` drops beyond it.
        wait: how the thread waits between retries (tests pass a fake); returns True to stop.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 5.0,
        attempts: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        queue_size: int = 1000,
        stats: AlertStats | None = None,
        wait: Callable[[float], bool] | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"alert webhook {url!r} is not an http(s) URL")
        self.url = url
        self.timeout = timeout
        self.attempts = max(1, attempts)
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.stats = stats or AlertStats()
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._wait = wait or self._stop.wait
        self._thread = threading.Thread(target=self._supervise, name="edgepack-alerts", daemon=True)
        self._thread.start()

    def submit(self, payload: dict[str, Any]) -> bool:
        """Queue one notification; never blocks. False (and counted) when the queue is full."""
        try:
            self._queue.put_nowait(payload)
            return True
        except queue.Full:
            self.stats.dropped += 1
            log.error("alert queue for %s full: dropping a notification", self.url)
            return False

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        self._thread.join(timeout)

    def idle(self) -> bool:
        return self._queue.unfinished_tasks == 0

    def _supervise(self) -> None:
        while not self._stop.is_set():
            try:
                self._loop()
                return
            except Exception:  # a bug in delivery must not end delivery
                log.exception("alert delivery to %s failed; restarting", self.url)

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._deliver(item)
            finally:
                self._queue.task_done()

    def _deliver(self, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        delay = self.backoff
        for attempt in range(self.attempts):
            if attempt:
                self.stats.retries += 1
                if self._wait(delay):
                    return  # stopping
                delay = min(delay * 2, self.max_backoff)
            request = urllib.request.Request(  # noqa: S310 (http(s) only: checked above)
                self.url, body, {"Content-Type": "application/json"}, method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                    response.read()
                self.stats.sent += 1
                return
            except (urllib.error.URLError, OSError, ValueError) as e:
                log.warning("alert webhook %s: attempt %d failed: %s", self.url, attempt + 1, e)
        self.stats.failed += 1
        log.error("alert webhook %s: giving up after %d attempts", self.url, self.attempts)


@dataclass
class _Decision:
    labels: dict[str, str]
    annotations: dict[str, str] = field(default_factory=dict)
    firing: bool = True


_SEVERITY = {
    "EdgepackDriftDetected": "warning",
    "EdgepackQualityDegraded": "critical",
    "EdgepackHealthCheckFailed": "critical",
    "EdgepackJobFailed": "warning",
}


def decide(kind: str, device: str, payload: Mapping[str, Any]) -> list[_Decision]:
    """What one committed report or job update means for alerts (pure; unit-tested)."""
    if kind in ("drift", "quality"):
        model, version, status = payload.get("model"), payload.get("version"), payload.get("status")
        if not isinstance(model, str) or not isinstance(status, str):
            return []
        name = "EdgepackDriftDetected" if kind == "drift" else "EdgepackQualityDegraded"
        bad = "drift" if kind == "drift" else "degraded"
        if status != bad and status not in ("ok", "warning"):
            return []
        labels = {"alertname": name, "device": device, "model": model,
                  "version": str(version), "severity": _SEVERITY[name]}  # fmt: skip
        what = "drifting" if kind == "drift" else "degraded in quality"
        annotations = {
            "summary": f"{model} v{version} on {device} is {what}",
            "description": f"{kind} report status {status!r} for {model} v{version} on {device}",
        }
        return [_Decision(labels, annotations, status == bad)]
    if kind == "job":
        status, model = payload.get("status"), payload.get("model") or ""
        version = payload.get("version_after") or payload.get("version_before") or ""
        failed = status in ("FAILED", "REJECTED", "TIMED_OUT")  # CANCELED: the operator's
        if not failed and status != "SUCCEEDED":
            return []
        names = ["EdgepackHealthCheckFailed", "EdgepackJobFailed"]
        if failed:
            names = (
                ["EdgepackHealthCheckFailed"]
                if payload.get("step") == "health-check"
                else ["EdgepackJobFailed"]
            )
        out = []
        for name in names:
            labels = {"alertname": name, "device": device, "model": str(model),
                      "severity": _SEVERITY[name]}  # fmt: skip
            reason = payload.get("reason") or ""
            annotations = {
                "summary": f"job {payload.get('job_id')} {status} on {device}",
                "description": f"{status} at step {payload.get('step')}: {reason}".strip(),
            }
            if version:
                annotations["version"] = str(version)
            out.append(_Decision(labels, annotations, failed))
        return out
    return []


class _FileState:
    """Alert state in a SQLite file of its own (``--alert-state FILE``)."""

    def __init__(self, path: str | Path) -> None:
        self._conn = sqlite3.connect(str(path), check_same_thread=False)
        self._conn.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def rows(self, text: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        with self._lock:
            return list(self._conn.execute(text, tuple(params)).fetchall())

    def write(self, text: str, params: Sequence[Any]) -> None:
        with self._lock, self._conn:
            self._conn.execute(text, tuple(params))

    def close(self) -> None:
        self._conn.close()


class _StoreState:
    """Alert state in the fleet store's ``alerts`` table (SQLite or PostgreSQL: the same SQL,
    which the store adapts), so it lives wherever the fleet's state does."""

    def __init__(self, store: Any) -> None:
        self._store = store

    def rows(self, text: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        return list(self._store._rows(text, params))

    def write(self, text: str, params: Sequence[Any]) -> None:
        self._store._write("saving an alert", text, params)

    def close(self) -> None:
        pass  # the store is the caller's


class Alerter:
    """Alert state and delivery to ``webhooks``.

    Args:
        path: where the state is kept: the fleet store (an object from
            :func:`edgepack.fleet._database.open_store`: its ``alerts`` table), or a SQLite file
            of its own; ``":memory:"`` keeps it in memory (tests only).
        webhooks: receivers; each gets every notification.
        repeat_interval: a firing alert is sent again after this long.
        clock: now, for startsAt/endsAt and the repeat interval.
    """

    def __init__(
        self,
        path: str | Path | Any,
        webhooks: Sequence[WebhookSender] = (),
        *,
        repeat_interval: timedelta = timedelta(hours=4),
        receiver: str = "edgepack",
        external_url: str = "",
        clock: Clock = utc_now,
    ) -> None:
        self._state: _FileState | _StoreState = (
            _FileState(path) if isinstance(path, (str, Path)) else _StoreState(path)
        )
        self.webhooks = list(webhooks)
        self.repeat_interval = repeat_interval
        self.receiver = receiver
        self.external_url = external_url
        self._clock = clock
        self.stats = AlertStats()
        self.reports: Counter[str] = Counter()  # new reports seen, by kind (for /metrics)
        self.job_outcomes: Counter[str] = Counter()  # final job statuses seen

    @property
    def delivery(self) -> AlertStats:
        """Delivery counters summed over the webhooks."""
        total = AlertStats()
        for hook in self.webhooks:
            for name in ("sent", "failed", "retries", "dropped"):
                setattr(total, name, getattr(total, name) + getattr(hook.stats, name))
        return total

    def close(self) -> None:
        for hook in self.webhooks:
            hook.close()
        self._state.close()

    def alerts(self, status: str | None = None) -> list[Alert]:
        """Every alert known, firing first, newest first."""
        rows = self._state.rows(
            "SELECT labels, annotations, status, starts_at, ends_at, last_sent_at,"
            " resolved_sent FROM alerts ORDER BY status, starts_at DESC"
        )
        out = [_row(r) for r in rows]
        return [a for a in out if status is None or a.status == status]

    def observe(self, kind: str, device: str, payload: Mapping[str, Any]) -> list[Alert]:
        """Update the state for one committed message; returns the alerts it notified."""
        if kind == "job":
            if payload.get("status") in ("SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT"):
                self.job_outcomes[str(payload["status"])] += 1
        else:
            self.reports[kind] += 1
        sent = []
        for d in decide(kind, device, payload):
            alert = self._transition(d)
            if alert is not None:
                sent.append(alert)
        if sent:
            body = alertmanager_payload(
                sent, receiver=self.receiver, external_url=self.external_url
            )
            for hook in self.webhooks:
                hook.submit(body)
        return sent

    def repeat_due(self) -> list[Alert]:
        """Re-send firing alerts whose repeat interval has passed (the collector calls this now
        and then); returns them."""
        now = self._clock()
        due = [
            a
            for a in self.alerts("firing")
            if a.last_sent_at is None or now - a.last_sent_at >= self.repeat_interval
        ]
        for a in due:
            self._mark_sent(a, now)
        if due:
            body = alertmanager_payload(due, receiver=self.receiver, external_url=self.external_url)
            for hook in self.webhooks:
                hook.submit(body)
        return due

    def _transition(self, d: _Decision) -> Alert | None:
        now, fp = self._clock(), fingerprint(d.labels)
        found = self._state.rows(
            "SELECT labels, annotations, status, starts_at, ends_at, last_sent_at,"
            " resolved_sent FROM alerts WHERE fingerprint = ?",
            (fp,),
        )
        row = found[0] if found else None
        current = None if row is None else _row(row)
        if d.firing:
            if current is not None and current.status == "firing":
                if current.last_sent_at and now - current.last_sent_at < self.repeat_interval:
                    return None  # de-duplicated
                alert = current
            else:
                alert = Alert(d.labels, d.annotations, "firing", now)
                self.stats.fired += 1
            alert.last_sent_at = now
        else:
            if current is None or current.status != "firing":
                return None  # nothing to resolve, or resolved already (sent once)
            alert = current
            alert.status, alert.ends_at, alert.resolved_sent = "resolved", now, True
            self.stats.resolved += 1
        self._save(alert)
        return alert

    def _mark_sent(self, alert: Alert, now: datetime) -> None:
        alert.last_sent_at = now
        self._save(alert)

    def _save(self, a: Alert) -> None:
        self._state.write(
            "INSERT INTO alerts VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (fingerprint) DO"
            " UPDATE SET labels = excluded.labels, annotations = excluded.annotations,"
            " status = excluded.status, starts_at = excluded.starts_at,"
            " ends_at = excluded.ends_at, last_sent_at = excluded.last_sent_at,"
            " resolved_sent = excluded.resolved_sent",
            (
                a.fingerprint,
                json.dumps(a.labels),
                json.dumps(a.annotations),
                a.status,
                _ts(a.starts_at),
                None if a.ends_at is None else _ts(a.ends_at),
                None if a.last_sent_at is None else _ts(a.last_sent_at),
                int(a.resolved_sent),
            ),
        )


def _row(r: Sequence[Any]) -> Alert:
    return Alert(
        json.loads(r[0]),
        json.loads(r[1]),
        r[2],
        _parse_ts(r[3]),
        None if r[4] is None else _parse_ts(r[4]),
        None if r[5] is None else _parse_ts(r[5]),
        bool(r[6]),
    )
