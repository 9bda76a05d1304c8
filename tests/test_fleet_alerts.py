"""Alerts: decisions, de-duplication persisted across restarts, webhook retries that never block,
the Alertmanager webhook JSON, and the whole path through a real mosquitto and a real collector
to a real HTTP receiver on 127.0.0.1.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from brokers import Broker, mosquitto
from click.testing import CliRunner

from edgepack.fleet._alerts import Alerter, WebhookSender, alertmanager_payload, decide
from edgepack.fleet._broker import BrokerOptions, connect, publish_and_wait
from edgepack.fleet._cli import cli
from edgepack.fleet._collector import Collector
from edgepack.fleet._database import open_store
from edgepack.fleet._metrics import MetricsServer, render
from edgepack.formats.messages import JobStatus, JobStep, build_job_status
from edgepack.formats.topics import Topics

WAIT = 20.0
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


class Receiver:
    """A webhook receiver on 127.0.0.1 that records what is posted; it can fail the first
    ``fail`` posts (HTTP 500) or hang each post until ``release`` is set."""

    def __init__(self, fail: int = 0, hang: bool = False) -> None:
        self.posts: list[dict[str, Any]] = []
        self.attempts = 0
        self.fail, self.hang = fail, hang
        self.release = threading.Event()
        self.changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.changed:
                    receiver.attempts += 1
                    failing = receiver.attempts <= receiver.fail
                if receiver.hang:
                    receiver.release.wait(WAIT)
                if failing:
                    self.send_response(500)
                    self.end_headers()
                    return
                with receiver.changed:
                    receiver.posts.append(json.loads(body))
                    receiver.changed.notify_all()
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"

    def wait_for(self, count: int, timeout: float = WAIT) -> list[dict[str, Any]]:
        with self.changed:
            self.changed.wait_for(lambda: len(self.posts) >= count, timeout)
            assert len(self.posts) >= count, f"{len(self.posts)} posts, expected {count}"
            return list(self.posts)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def _no_wait(_seconds: float) -> bool:
    return False


def _drift(status: str, seq: int, device: str = "dev-a", version: int = 2) -> dict[str, Any]:
    return {
        "schema": 1,
        "device": device,
        "seq": seq,
        "model": "churn",
        "version": version,
        "status": status,
    }


def _settle(hook: WebhookSender, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not hook.idle():
        assert time.monotonic() < deadline, "webhook queue did not drain"
        time.sleep(0.01)


# -- decisions ----------------------------------------------------------------------------------


def test_decisions_for_each_kind() -> None:
    (d,) = decide("drift", "dev-a", _drift("drift", 1))
    assert d.firing
    assert d.labels == {
        "alertname": "EdgepackDriftDetected",
        "device": "dev-a",
        "model": "churn",
        "version": "2",
        "severity": "warning",
    }
    assert not decide("drift", "dev-a", _drift("ok", 2))[0].firing
    assert not decide("drift", "dev-a", _drift("warning", 2))[0].firing
    assert decide("drift", "dev-a", _drift("insufficient", 2)) == []
    (q,) = decide("quality", "dev-a", {"model": "churn", "version": 2, "status": "degraded"})
    assert q.firing
    assert q.labels["alertname"] == "EdgepackQualityDegraded"
    failed = {"job_id": "j1", "status": "FAILED", "model": "churn", "step": "health-check"}
    (h,) = decide("job", "dev-a", failed)
    assert h.firing
    assert h.labels["alertname"] == "EdgepackHealthCheckFailed"
    (j,) = decide("job", "dev-a", failed | {"status": "REJECTED", "step": None})
    assert j.firing
    assert j.labels["alertname"] == "EdgepackJobFailed"
    ok = decide("job", "dev-a", failed | {"status": "SUCCEEDED"})
    assert {x.labels["alertname"] for x in ok} == {"EdgepackHealthCheckFailed", "EdgepackJobFailed"}
    assert not any(x.firing for x in ok)
    assert decide("job", "dev-a", failed | {"status": "IN_PROGRESS"}) == []
    assert decide("telemetry", "dev-a", {}) == []


def test_payload_is_alertmanager_webhook_json(tmp_path: Path) -> None:
    alerter = Alerter(tmp_path / "a.db", clock=Clock())
    (alert,) = alerter.observe("drift", "dev-a", _drift("drift", 1))
    body = alertmanager_payload([alert], receiver="ops", external_url="http://fleet:9000")
    assert set(body) >= {
        "version",
        "groupKey",
        "status",
        "receiver",
        "groupLabels",
        "commonLabels",
        "commonAnnotations",
        "externalURL",
        "alerts",
    }
    assert body["version"] == "4"
    assert body["status"] == "firing"
    assert body["receiver"] == "ops"
    assert body["groupLabels"] == {"alertname": "EdgepackDriftDetected"}
    assert body["groupKey"] == '{}:{alertname="EdgepackDriftDetected"}'
    assert body["commonLabels"] == alert.labels
    (a,) = body["alerts"]
    assert set(a) == {
        "status",
        "labels",
        "annotations",
        "startsAt",
        "endsAt",
        "generatorURL",
        "fingerprint",
    }
    assert a["startsAt"] == "2026-12-01T12:00:00Z"
    assert a["endsAt"] == "0001-01-01T00:00:00Z"
    assert set(a["annotations"]) == {"summary", "description"}
    assert len(a["fingerprint"]) == 16
    alerter.close()


# -- de-duplication, persisted ------------------------------------------------------------------


def test_dedup_resolve_once_and_restart(tmp_path: Path, receiver: Receiver) -> None:
    clock, path = Clock(), tmp_path / "alerts.db"

    def make() -> tuple[Alerter, WebhookSender]:
        hook = WebhookSender(receiver.url, wait=_no_wait)
        return Alerter(path, [hook], repeat_interval=timedelta(hours=1), clock=clock), hook

    alerter, hook = make()
    assert len(alerter.observe("drift", "dev-a", _drift("drift", 1))) == 1
    clock.now += timedelta(minutes=5)
    assert alerter.observe("drift", "dev-a", _drift("drift", 2)) == []  # de-duplicated
    _settle(hook)
    assert len(receiver.wait_for(1)) == 1
    alerter.close()

    alerter, hook = make()  # a restarted collector: neither forgets nor re-fires
    assert [a.status for a in alerter.alerts()] == ["firing"]
    assert alerter.observe("drift", "dev-a", _drift("drift", 3)) == []
    assert alerter.repeat_due() == []
    clock.now += timedelta(hours=1)
    assert len(alerter.repeat_due()) == 1  # the repeat interval has passed
    (resolved,) = alerter.observe("drift", "dev-a", _drift("ok", 4))
    assert resolved.status == "resolved"
    assert resolved.ends_at == clock.now
    assert alerter.observe("drift", "dev-a", _drift("ok", 5)) == []  # resolved is sent once
    posts = receiver.wait_for(3)
    _settle(hook)
    assert [p["status"] for p in receiver.posts] == ["firing", "firing", "resolved"]
    assert posts[2]["alerts"][0]["endsAt"] == "2026-12-01T13:05:00Z"
    # firing again after the resolution is a new alert
    assert len(alerter.observe("drift", "dev-a", _drift("drift", 6))) == 1
    alerter.close()


# -- delivery -----------------------------------------------------------------------------------


def test_retries_with_bounded_backoff() -> None:
    failing = Receiver(fail=3)
    waits: list[float] = []

    def wait(seconds: float) -> bool:
        waits.append(seconds)
        return False

    try:
        hook = WebhookSender(failing.url, backoff=0.5, max_backoff=1.5, attempts=5, wait=wait)
        hook.submit({"n": 1})
        assert failing.wait_for(1) == [{"n": 1}]
        _settle(hook)
        assert failing.attempts == 4
        assert hook.stats.retries == 3
        assert hook.stats.sent == 1
        assert waits == [0.5, 1.0, 1.5]  # doubled, capped
        hook.close()

        give_up = WebhookSender("http://127.0.0.1:9/none", attempts=3, timeout=1, wait=wait)
        give_up.submit({"n": 2})
        _settle(give_up)
        assert give_up.stats.failed == 1
        assert give_up.stats.sent == 0
        give_up.close()
    finally:
        failing.close()


def test_hanging_receiver_never_blocks(tmp_path: Path) -> None:
    hanging = Receiver(hang=True)
    try:
        hook = WebhookSender(hanging.url, queue_size=2, timeout=WAIT, wait=_no_wait)
        alerter = Alerter(tmp_path / "a.db", [hook], clock=Clock())
        started = time.monotonic()
        for device in range(10):
            assert len(alerter.observe("drift", f"dev-{device}", _drift("drift", 1))) == 1
        assert time.monotonic() - started < 2.0  # observe returned at once every time
        assert alerter.stats.fired == 10
        assert hook.stats.dropped >= 7  # one in flight, two queued, the rest dropped
        hanging.release.set()
        _settle(hook)
        hook.close()
    finally:
        hanging.close()


def test_rejects_non_http_urls() -> None:
    with pytest.raises(ValueError, match="http"):
        WebhookSender("file:///etc/passwd")


# -- the whole path: mosquitto -> collector -> webhook -------------------------------------------


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with mosquitto(tmp_path_factory.mktemp("broker")) as running:
        yield running


def _publisher(options: BrokerOptions) -> Callable[[str, dict[str, Any] | bytes], None]:
    def publish(topic: str, payload: dict[str, Any] | bytes) -> None:
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        client = connect(options)
        try:
            publish_and_wait(client, topic, raw, retain=False)
        finally:
            client.loop_stop()
            client.disconnect()

    return publish


def test_collector_fires_through_broker(tmp_path: Path, broker: Broker, receiver: Receiver) -> None:
    prefix = f"t{time.monotonic_ns()}/v1"
    options = BrokerOptions(host=broker.host, port=broker.port, prefix=prefix)
    topics, publish, clock = Topics(prefix), _publisher(options), Clock()
    store = open_store(tmp_path / "fleet.db")
    state = tmp_path / "alerts.db"

    def start() -> tuple[Collector, Alerter]:
        alerter = Alerter(state, [WebhookSender(receiver.url, wait=_no_wait)], clock=clock)
        return Collector(options, store, alerter=alerter, clock=clock).start(), alerter

    collector, alerter = start()
    try:
        publish(topics.drift("dev-a"), _drift("drift", 1))
        publish(
            topics.quality("dev-a"),
            {
                "schema": 1,
                "device": "dev-a",
                "seq": 1,
                "model": "churn",
                "version": 2,
                "status": "degraded",
                "metrics": {"accuracy": 0.7},
            },
        )
        failed = build_job_status(
            "job-1",
            "dev-a",
            JobStatus.FAILED,
            model="churn",
            step=JobStep.HEALTH_CHECK,
            reason="probe failed",
            seq=3,
        )
        publish(topics.job_status("dev-a", "job-1"), failed)
        posts = receiver.wait_for(3)
        names = sorted(p["alerts"][0]["labels"]["alertname"] for p in posts)
        assert names == [
            "EdgepackDriftDetected",
            "EdgepackHealthCheckFailed",
            "EdgepackQualityDegraded",
        ]
        assert store.events("quality", "dev-a")  # quality reports are stored like drift
    finally:
        collector.stop()
        alerter.close()

    collector, alerter = start()  # restarted: the same drift again is not re-sent
    try:
        publish(topics.drift("dev-a"), _drift("drift", 2))
        publish(topics.drift("dev-a"), _drift("ok", 3))
        posts = receiver.wait_for(4)
        assert posts[3]["status"] == "resolved"
        assert posts[3]["alerts"][0]["labels"]["alertname"] == "EdgepackDriftDetected"
        assert len(receiver.posts) == 4

        result = CliRunner().invoke(cli, ["alerts", "--alert-state", str(state), "--json"])
        assert result.exit_code == 0, result.output
        listed = {a["labels"]["alertname"]: a["status"] for a in json.loads(result.output)}
        assert listed == {
            "EdgepackDriftDetected": "resolved",
            "EdgepackQualityDegraded": "firing",
            "EdgepackHealthCheckFailed": "firing",
        }
        store.record_state(
            "dev-a",
            {
                "ts": T0.isoformat(),
                "groups": [],
                "online": True,
                "models": {"churn": {"active": 2, "previous": 1}},
            },
            T0,
        )
        server = MetricsServer(lambda: render(store, collector.stats, alerter)).start()
        try:
            with urllib.request.urlopen(server.url, timeout=WAIT) as response:
                assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                text = response.read().decode()
        finally:
            server.stop()
        lines = text.splitlines()
        for family in (
            "devices",
            "drift_status",
            "quality_metric",
            "job_outcomes_total",
            "alerts_firing",
            "reports_received_total",
            "model_installed_devices",
        ):
            assert (
                f"# TYPE edgepack_fleet_{family} "
                + ("counter" if family.endswith("_total") else "gauge")
                in lines
            )
            assert any(line.startswith(f"# HELP edgepack_fleet_{family} ") for line in lines)
        assert 'edgepack_fleet_devices{state="online"} 1' in lines
        assert 'edgepack_fleet_model_installed_devices{model="churn",version="2"} 1' in lines
        assert 'edgepack_fleet_drift_status{device="dev-a",model="churn",version="2"} 0' in lines
        assert (
            'edgepack_fleet_quality_metric{device="dev-a",model="churn",version="2",'
            'metric="accuracy"} 0.7'
        ) in lines
        assert 'edgepack_fleet_quality_status{device="dev-a",model="churn",version="2"} 2' in lines
        # counters count since this collector started (Prometheus handles the reset): the job
        # failed before the restart, the two drift reports came after it
        assert not any(line.startswith("edgepack_fleet_job_outcomes_total{") for line in lines)
        assert 'edgepack_fleet_alerts_firing{alertname="EdgepackQualityDegraded"} 1' in lines
        assert 'edgepack_fleet_reports_received_total{kind="drift"} 2' in lines

        table = CliRunner().invoke(cli, ["alerts", "--alert-state", str(state), "--firing"])
        assert table.exit_code == 0
        assert "EdgepackQualityDegraded" in table.output
    finally:
        collector.stop()
        alerter.close()
        store.close()


# -- quality and multivariate drift in the drift table ------------------------------------------


def test_drift_table_shows_quality_and_multivariate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgepack.fleet import _cli as fleet_cli

    store = open_store(tmp_path / "fleet.db")
    joint = {"statistics": [{"name": "pca_error", "value": 0.31, "threshold": 0.12,
                             "alarm": True}], "alarm": True, "drifting": True}  # fmt: skip
    for device, extra in (("dev-a", {"multivariate": joint}), ("dev-b", {})):
        store.record_event("drift", device, _drift("drift", 1, device) | extra, 1, T0)
    quality = {"schema": 1, "device": "dev-a", "seq": 1, "model": "churn", "version": 2,
               "status": "degraded", "metrics": {"accuracy": 0.71},
               "reference": {"accuracy": 0.9}, "estimated": False, "labeled": 400}  # fmt: skip
    store.record_event("quality", "dev-a", quality, 1, T0)
    store.close()
    monkeypatch.setattr(fleet_cli.console, "width", 250)
    result = CliRunner().invoke(
        cli, ["--store", str(tmp_path / "fleet.db"), "drift"], obj={"clock": lambda: T0}
    )
    assert result.exit_code == 0, result.output
    rows = {
        cells[0]: cells
        for line in result.output.splitlines()
        if len(cells := [c.strip() for c in line.split("│")[1:-1]]) == 10
    }
    assert rows["dev-a"][7] == "drifting pca_error 0.31/0.12"
    assert rows["dev-a"][8] == "degraded accuracy 0.71 (ref 0.9)"
    assert rows["dev-b"][7:9] == ["-", "-"]  # an older agent's report: no multivariate part


def test_html_report_shows_quality_and_multivariate(tmp_path: Path) -> None:
    from edgepack.fleet._report import build_report

    store = open_store(tmp_path / "fleet.db")
    joint = {"statistics": [{"name": "pca_error", "value": 0.05, "threshold": 0.12,
                             "alarm": False}], "alarm": False, "drifting": False}  # fmt: skip
    store.record_event("drift", "dev-a", _drift("ok", 1) | {"multivariate": joint}, 1, T0)
    store.record_event("drift", "dev-b", _drift("ok", 1, "dev-b"), 1, T0)  # no multivariate
    quality = {"schema": 1, "device": "dev-a", "seq": 1, "model": "churn", "version": 2,
               "status": "ok", "metrics": {"accuracy": 0.88}, "estimated": True,
               "labeled": 0}  # fmt: skip
    store.record_event("quality", "dev-a", quality, 1, T0)
    page = build_report(store, "churn", now=T0)
    store.close()
    assert "<th>multivariate</th><th>quality</th>" in page
    assert "<td>ok pca_error 0.05/0.12</td><td>ok accuracy ~0.88</td>" in page
    assert "<td>-</td><td>-</td>" in page  # dev-b: an older agent's report, no quality report


def test_alert_state_lives_in_the_fleet_store(tmp_path: Path) -> None:
    """Without --alert-state the alerts are rows of the fleet store (so on PostgreSQL too):
    state survives a new Alerter on the same store, and `alerts` reads it from --store."""
    store_path = tmp_path / "fleet.sqlite3"
    store = open_store(store_path)
    now = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
    first = Alerter(store, clock=lambda: now)
    (fired,) = first.observe("drift", "dev-a", _drift("drift", 1))
    assert fired.status == "firing"
    first.close()
    again = Alerter(store, clock=lambda: now + timedelta(minutes=1))
    assert again.observe("drift", "dev-a", _drift("drift", 2)) == []  # de-duplicated
    store.close()
    runner = CliRunner()
    listed = runner.invoke(cli, ["--store", str(store_path), "alerts", "--json"])
    assert listed.exit_code == 0, listed.output
    (alert,) = json.loads(listed.output)
    assert alert["labels"]["alertname"] == "EdgepackDriftDetected"
    assert alert["status"] == "firing"
    assert not list(tmp_path.glob("*alerts*"))  # no file of its own
    missing = runner.invoke(cli, ["--store", str(tmp_path / "typo.sqlite3"), "alerts"])
    assert missing.exit_code == 1
    assert "no fleet store" in missing.output
