"""Jobs an operator can drive: cancel, in-progress timeouts, jobs list/show, --json, store paths.

End to end through a real mosquitto with real agents (the wiring of tests/test_fleet_e2e.py):
a cancel reaches a device that was offline during the deploy, which never runs the job and
reports CANCELED, while a device that finished it keeps SUCCEEDED; a forged cancel is refused.
A bundle server of our own stalls a download until told to go on, while the test moves the
device's injected clock past the job's timeout: the job ends TIMED_OUT and the installed version
keeps serving. The collector's side (a silent device marked TIMED_OUT) and the CLI's errors,
exit codes and JSON keys run on a real SQLite store fed through the collector's own parser.
"""

# The fixtures of test_fleet_e2e are imported by name; tests take them as parameters.
# ruff: noqa: F811

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import KeyPair, write_agent_config
from test_fleet_e2e import (  # noqa: F401 - fixtures used by name
    Fleet,
    active,
    broker,
    bundle_server,
    fleet,
    ops,
    serving,
)

from edgepack.agent._config import DownloadConfig, load_config
from edgepack.agent._daemon import Agent
from edgepack.agent._download import HttpFetcher
from edgepack.agent._jobs import JobRunner
from edgepack.fleet._broker import BrokerOptions, connect
from edgepack.fleet._cli import cli
from edgepack.fleet._collector import Collector
from edgepack.fleet._commands import find_bundles, publish_command
from edgepack.fleet._database import open_store
from edgepack.formats.commands import (
    COMMAND_PAYLOAD_TYPE,
    make_command,
    peek_command,
    read_command,
)
from edgepack.formats.dsse import dsse_sign
from edgepack.formats.exceptions import CommandError
from edgepack.formats.keys import generate_private_key
from edgepack.formats.messages import (
    JobStatus,
    JobStep,
    ReportKind,
    build_job_status,
    build_report,
)
from edgepack.formats.topics import Topics

WAIT = 30.0
T0 = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.timezone.utc)


def _until(check: Any, what: str) -> Any:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"not within {WAIT} s: {what}")


def _cli(fleet: Fleet, *args: str) -> Any:
    common = [
        "--broker",
        fleet.broker.address,
        "--prefix",
        fleet.prefix,
        "--store",
        str(fleet.root / "fleet.db"),
    ]
    return CliRunner().invoke(cli, [*common, *args])


def _retained(options: BrokerOptions, topic: str, wait: float = 1.0) -> list[bytes]:
    seen: list[bytes] = []
    got = threading.Event()
    client = connect(options)
    try:
        client.on_message = lambda _c, _u, m: (seen.append(bytes(m.payload)), got.set())
        client.subscribe(topic, qos=1)
        got.wait(wait)
    finally:
        client.disconnect()
        client.loop_stop()
    return seen


# --- cancel -------------------------------------------------------------------------------------


def test_a_canceled_job_never_runs_on_a_device_that_was_away(fleet: Fleet) -> None:
    online = fleet.device("cam-on", groups=("g1",))
    fleet.device("cam-away", groups=("g1",))  # subscribes once: its session queues what follows
    fleet.stop_device("cam-away")
    for name in ("cam-on", "cam-away"):
        fleet.store.assign(name, ["g1"], T0)
    job = fleet.send("deploy", {"group": "g1"}, version=1)
    fleet.wait_for(job, ["cam-on"])

    result = _cli(fleet, "jobs", "cancel", job, "--key", str(fleet.ops.private), "--json")
    assert result.exit_code == 0, result.output
    done = json.loads(result.output)
    assert done["job_id"] == job
    assert done["retained"] is True
    assert done["unstarted"] == ["cam-away"]
    assert done["started"] == ["cam-on"]
    rows = {e.device: e for e in fleet.store.executions(job)}
    assert rows["cam-away"].status == JobStatus.CANCELED  # marked by the store at once
    assert rows["cam-on"].status == JobStatus.SUCCEEDED
    retained = _retained(fleet.options, Topics(fleet.prefix).group_jobs("g1", "iris"))
    assert [peek_command(r).kind for r in retained] == ["cancel"]  # the deploy is withdrawn

    # Back: its session holds the deploy and the cancel, the retained copy is the cancel, and
    # the collector's pending answer leaves the canceled job out. It runs nothing.
    away = fleet.device("cam-away", groups=("g1",))
    history = _until(
        lambda: [h for h in fleet.store.history(job, "cam-away") if h.seq >= 1],
        "cam-away reports on the canceled job",
    )
    assert [(h.status, h.seq) for h in history] == [(JobStatus.CANCELED, 1)]
    assert "canceled by cancel-" in (history[0].reason or "")
    assert active(away) is None
    assert serving(online) == 1  # SUCCEEDED stays SUCCEEDED
    rows = {e.device: e for e in fleet.store.executions(job)}
    assert rows["cam-on"].status == JobStatus.SUCCEEDED
    assert fleet.store.pending_for("cam-away", dt.datetime.now(dt.timezone.utc)) == []

    again = _cli(fleet, "jobs", "cancel", job, "--key", str(fleet.ops.private))
    assert again.exit_code == 1
    assert "already canceled" in again.output
    unknown = _cli(fleet, "jobs", "cancel", "deploy-nope", "--key", str(fleet.ops.private))
    assert unknown.exit_code == 1
    assert "no job deploy-nope in store" in unknown.output

    listed = json.loads(_cli(fleet, "jobs", "list", "--state", "canceled", "--json").output)
    assert [j["job_id"] for j in listed] == [job]
    assert listed[0]["counts"] == {"CANCELED": 1, "SUCCEEDED": 1}


def test_a_finished_job_cannot_be_canceled_and_a_forged_cancel_is_refused(fleet: Fleet) -> None:
    fleet.device("cam-f", groups=())
    forger = generate_private_key()
    job_id = "deploy-20261202T120000-abcdef"
    forged_id, forged = make_command("cancel", "iris", {"device": "cam-f"}, forger, cancels=job_id)
    fleet.publish_raw(Topics(fleet.prefix).device_jobs("cam-f", "iris"), forged)
    refused = fleet.wait_for(forged_id, ["cam-f"])["cam-f"]
    assert refused.status == JobStatus.REJECTED
    assert "signature" in (refused.reason or "")
    bundles = find_bundles("iris", 1, fleet.server.url, fleet.dist)
    _, deploy = make_command(
        "deploy",
        "iris",
        {"device": "cam-f"},
        fleet.ops_key,
        job_id=job_id,
        version=1,
        bundles=bundles,
    )
    fleet.publish_raw(Topics(fleet.prefix).device_jobs("cam-f", "iris"), deploy)
    assert fleet.wait_for(job_id, ["cam-f"])["cam-f"].status == JobStatus.SUCCEEDED

    result = _cli(fleet, "jobs", "cancel", job_id, "--key", str(fleet.ops.private))
    assert result.exit_code == 1
    assert "finished on every device" in result.output


# --- in-progress timeout ------------------------------------------------------------------------


class ManualClock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class StallingServer(ThreadingHTTPServer):
    """Serves one bundle: half of it, then nothing until ``go`` is set (bounded), then the rest."""

    def __init__(self, data: bytes) -> None:
        super().__init__(("127.0.0.1", 0), _StallingHandler)
        self.data, self.stalled, self.go = data, threading.Event(), threading.Event()
        self.url = f"http://127.0.0.1:{self.server_address[1]}/"
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _StallingHandler(BaseHTTPRequestHandler):
    server: StallingServer

    def do_GET(self) -> None:
        data, half = self.server.data, len(self.server.data) // 2
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[:half])
        self.wfile.flush()
        self.server.stalled.set()
        self.server.go.wait(WAIT)
        self.wfile.write(data[half:])

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def stalling(iris_bundles: dict[str, Path]) -> Iterator[StallingServer]:
    server = StallingServer(iris_bundles["v2"].read_bytes())
    yield server
    server.go.set()
    server.shutdown()
    server.server_close()


def test_a_job_past_its_timeout_is_aborted_and_the_installed_version_serves(
    fleet: Fleet, stalling: StallingServer, iris_bundles: dict[str, Path]
) -> None:
    clock = ManualClock()
    agent = fleet.device("cam-slow", groups=(), clock=clock)
    first = fleet.send("deploy", {"device": "cam-slow"}, version=1)
    fleet.wait_for(first, ["cam-slow"])
    bundles = find_bundles("iris", 2, stalling.url, iris_bundles["v2"].parent)
    bundles = {p: {**b, "url": stalling.url + Path(b["url"]).name} for p, b in bundles.items()}
    job = publish_command(
        fleet.options,
        "deploy",
        "iris",
        {"device": "cam-slow"},
        fleet.ops_key,
        version=2,
        bundles=bundles,
        in_progress_timeout=60,
    ).job_id
    assert stalling.stalled.wait(WAIT), "the device never started the download"
    clock.now += 61  # the download hangs past the job's timeout
    stalling.go.set()
    row = fleet.wait_for(job, ["cam-slow"])["cam-slow"]
    assert row.status == JobStatus.TIMED_OUT
    assert "in-progress timeout of 60 s" in (row.reason or "")
    assert (row.version_before, row.version_after) == (1, 1)
    assert serving(agent) == 1
    steps = [h.step for h in fleet.store.history(job, "cam-slow")]
    assert JobStep.DOWNLOADING in steps
    assert JobStep.HEALTH_CHECK not in steps  # stopped before anything was staged
    shown = json.loads(_cli(fleet, "status", job, "--json").output)
    assert shown["in_progress_timeout_s"] == 60
    assert shown["devices"][0]["status"] == "TIMED_OUT"


# --- the collector's side, on a store fed through its parser --------------------------------------


class Moment:
    """The collector's (and the CLI's) wall clock, moved by the test."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> dt.datetime:
        return self.now


def _collector(tmp_path: Path, clock: Moment) -> Collector:
    options = BrokerOptions(host="127.0.0.1", port=1, prefix="edgepack/v1")
    return Collector(options, open_store(tmp_path / "fleet.db"), clock=clock, job_grace=30)


def _command(collector: Collector, device: str, timeout: int | None = None, **kw: Any) -> str:
    job_id, envelope = make_command(
        "rollback",
        "iris",
        {"device": device},
        generate_private_key(),
        issued_at=T0,
        in_progress_timeout=timeout,
        **kw,
    )
    collector.process([(collector.topics.device_jobs(device, "iris"), envelope)])
    return job_id


def _update(
    collector: Collector, job: str, device: str, status: JobStatus, seq: int, at: dt.datetime
) -> None:
    step = JobStep.HEALTH_CHECK if status is JobStatus.IN_PROGRESS else None
    payload = build_job_status(job, device, status, model="iris", step=step, seq=seq, ts=at)
    collector.process([(collector.topics.job_status(device, job), payload)])


def test_the_collector_times_out_a_silent_device_and_the_device_still_has_the_last_word(
    tmp_path: Path,
) -> None:
    clock = Moment()
    collector = _collector(tmp_path, clock)
    job = _command(collector, "cam-1", timeout=60)
    untimed = _command(collector, "cam-2")
    for name in (job, untimed):
        device = "cam-1" if name == job else "cam-2"
        _update(collector, name, device, JobStatus.QUEUED, 1, T0)
        _update(collector, name, device, JobStatus.IN_PROGRESS, 2, T0)
    assert collector.time_out_silent(T0 + dt.timedelta(seconds=90)) == []  # within 60 + 30
    assert collector.time_out_silent(T0 + dt.timedelta(seconds=91)) == [(job, "cam-1")]
    row = collector.store.executions(job)[0]
    assert row.status == JobStatus.TIMED_OUT
    assert "marked by the collector" in (row.reason or "")
    assert collector.store.executions(untimed)[0].status == JobStatus.IN_PROGRESS
    _update(collector, job, "cam-1", JobStatus.SUCCEEDED, 3, T0 + dt.timedelta(seconds=95))
    assert collector.store.executions(job)[0].status == JobStatus.SUCCEEDED
    collector.store.close()


# --- the CLI: unknown jobs, store paths, --json, legends ------------------------------------------


def _invoke(store: Path, clock: Moment, *args: str) -> Any:
    return CliRunner().invoke(cli, ["--store", str(store), *args], obj={"clock": clock})


@pytest.mark.parametrize(
    "args",
    [
        ["status", "deploy-x"],
        ["jobs", "list"],
        ["jobs", "show", "deploy-x"],
        ["telemetry"],
        ["drift"],
        ["devices"],
        ["report", "--model", "iris"],
        ["acl", "--out", "acl.txt"],
        ["trust", "show"],
    ],
)
def test_a_store_path_that_does_not_exist_is_an_error(tmp_path: Path, args: list[str]) -> None:
    missing = tmp_path / "flet.db"
    result = _invoke(missing, Moment(), *args)
    assert result.exit_code == 1, result.output
    assert f"no fleet store at {missing}" in result.output
    assert "the collector creates the store" in result.output
    assert not missing.exists()


def test_commands_that_keep_the_operators_records_create_the_store(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    assert _invoke(path, Moment(), "devices", "assign", "cam-1", "--group", "g").exit_code == 0
    assert path.exists()


def test_an_unknown_job_is_an_error_even_with_wait(tmp_path: Path) -> None:
    clock = Moment()
    _collector(tmp_path, clock).store.close()
    store = tmp_path / "fleet.db"
    for args in (["status", "deploy-x"], ["jobs", "show", "deploy-x", "--json"]):
        result = _invoke(store, clock, *args)
        assert result.exit_code == 1
        assert f"no job deploy-x in store {store}" in result.output
        assert "edgepack-fleet jobs list" in result.output


def test_jobs_list_filters_and_json_keys(tmp_path: Path) -> None:
    clock = Moment()
    collector = _collector(tmp_path, clock)
    done = _command(collector, "cam-1")
    _update(collector, done, "cam-1", JobStatus.SUCCEEDED, 2, T0)
    failed = _command(collector, "cam-2", timeout=600)
    _update(collector, failed, "cam-2", JobStatus.FAILED, 2, T0)
    running = _command(collector, "cam-3")
    _update(collector, running, "cam-3", JobStatus.IN_PROGRESS, 2, T0)
    collector.store.close()
    store, clock.now = tmp_path / "fleet.db", T0 + dt.timedelta(hours=1)

    listed = json.loads(_invoke(store, clock, "jobs", "list", "--json").output)
    assert {j["job_id"] for j in listed} == {done, failed, running}
    assert set(listed[0]) == {
        "job_id",
        "kind",
        "model",
        "version",
        "target",
        "state",
        "counts",
        "issued_at",
        "expires_at",
        "in_progress_timeout_s",
        "canceled_at",
    }
    by_id = {j["job_id"]: j for j in listed}
    assert by_id[failed]["in_progress_timeout_s"] == 600
    assert by_id[done]["issued_at"] == "2026-12-02T12:00:00+00:00"
    assert by_id[done]["target"] == {"type": "device", "name": "cam-1"}

    def ids(*args: str) -> set[str]:
        result = _invoke(store, clock, "jobs", "list", "--json", *args)
        assert result.exit_code == 0, result.output
        return {j["job_id"] for j in json.loads(result.output)}

    assert ids("--state", "done") == {done, failed}
    assert ids("--state", "active") == {running}
    assert ids("--state", "FAILED") == {failed}
    assert ids("--since", "30m") == set()
    assert ids("--since", "2h", "--model", "iris") == {done, failed, running}
    bad = _invoke(store, clock, "jobs", "list", "--state", "sideways")
    assert bad.exit_code == 2
    assert "neither a job state" in bad.output

    table = _invoke(store, clock, "jobs", "list")
    assert "1 FAILED" in table.output
    assert "state: active, done" in table.output  # the legend
    shown = json.loads(_invoke(store, clock, "status", failed, "--json").output)
    assert set(shown) == {
        "job_id",
        "kind",
        "model",
        "version",
        "target",
        "state",
        "done",
        "issued_at",
        "expires_at",
        "in_progress_timeout_s",
        "canceled_at",
        "devices",
    }
    assert set(shown["devices"][0]) == {
        "device",
        "status",
        "step",
        "version_before",
        "version_after",
        "reason",
        "seq",
        "updated_at",
    }
    status = _invoke(store, clock, "status", failed)
    assert status.exit_code == 0
    assert "waiting: addressed" in status.output


def test_telemetry_and_drift_json_and_legends(tmp_path: Path) -> None:
    clock = Moment()
    collector = _collector(tmp_path, clock)
    model = {
        "model": "iris",
        "version": 1,
        "requests": 7,
        "errors": {"timeout": 1},
        "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0},
    }
    for seq in (1, 2):
        report = build_report(ReportKind.TELEMETRY, "cam-1", seq, {"models": [model]}, ts=T0)
        collector.process([(collector.topics.telemetry("cam-1"), report)])
    drift = {
        "model": "iris",
        "version": 1,
        "status": "warning",
        "n": 500,
        "window_end": T0.timestamp(),
        "features": [{"name": "x0", "ks": 0.2, "threshold": 0.1, "alarm": True, "drifting": False}],
    }
    collector.process(
        [(collector.topics.drift("cam-1"), build_report(ReportKind.DRIFT, "cam-1", 1, drift))]
    )
    collector.store.close()
    store = tmp_path / "fleet.db"

    rows = json.loads(_invoke(store, clock, "telemetry", "--json").output)
    assert set(rows[0]) == {
        "device",
        "model",
        "version",
        "requests",
        "errors",
        "p50_ms",
        "p95_ms",
        "p99_ms",
        "rss_mib",
        "p95_trend_ms",
        "last_seen",
    }
    assert rows[0]["last_seen"] == "2026-12-02T12:00:00+00:00"
    assert "p95 trend:" in _invoke(store, clock, "telemetry").output
    rows = json.loads(_invoke(store, clock, "drift", "--json").output)
    assert rows[0]["status"] == "warning"
    assert rows[0]["worst"] == {"feature": "x0", "ks": 0.2, "threshold": 0.1}
    assert rows[0]["window_end"] == "2026-12-02T12:00:00+00:00"
    assert "· ok, ! warning, ✗ drift" in _invoke(store, clock, "drift").output


def test_a_bad_timeout_is_a_usage_error(tmp_path: Path) -> None:
    result = _invoke(
        tmp_path / "fleet.db",
        Moment(),
        "deploy",
        "iris",
        "--version",
        "1",
        "--device",
        "d",
        "--bundles",
        "http://127.0.0.1:1/",
        "--key",
        "k",
        "--in-progress-timeout",
        "soon",
    )
    assert result.exit_code == 2
    assert "not a duration" in result.output


def test_the_collector_records_only_cancels_it_can_verify(tmp_path: Path) -> None:
    ops_key, forger = generate_private_key(), generate_private_key()
    options = BrokerOptions(host="127.0.0.1", port=1, prefix="edgepack/v1")
    collector = Collector(
        options, open_store(tmp_path / "fleet.db"), command_keys=[ops_key.public_key()]
    )
    topic = collector.topics.device_jobs("cam-1", "iris")
    job, envelope = make_command("rollback", "iris", {"device": "cam-1"}, ops_key)
    collector.process([(topic, envelope)])
    now = dt.datetime.now(dt.timezone.utc)
    assert [j.job_id for j in collector.store.pending_for("cam-1", now)] == [job]
    _, forged = make_command("cancel", "iris", {"device": "cam-1"}, forger, cancels=job)
    collector.process([(topic, forged)])
    assert collector.stats.rejected == 1
    assert collector.store.job_controls([job]) == {}
    _, other = make_command("cancel", "pricing", {"device": "cam-1"}, ops_key, cancels=job)
    collector.process([(collector.topics.device_jobs("cam-1", "pricing"), other)])
    assert collector.store.job_controls([job]) == {}  # names an iris job as a pricing one
    cancel_id, genuine = make_command("cancel", "iris", {"device": "cam-1"}, ops_key, cancels=job)
    collector.process([(topic, genuine)])
    control = collector.store.job_controls([job])[job]
    assert control.cancel_job_id == cancel_id
    assert control.canceled_by
    (row,) = collector.store.executions(job)
    assert (row.device, row.status, row.seq) == ("cam-1", JobStatus.CANCELED, 0)
    assert collector.store.pending_for("cam-1", now) == []
    assert collector.store.job(cancel_id) is None  # a cancel is not a job
    collector.store.close()


def test_cancel_and_timeout_fields_are_checked() -> None:
    key = generate_private_key()
    with pytest.raises(ValueError, match="names the job it cancels"):
        make_command("cancel", "iris", {"device": "d"}, key)
    with pytest.raises(ValueError, match="names the job it cancels"):
        make_command("retire", "iris", {"device": "d"}, key, cancels="deploy-1")
    with pytest.raises(ValueError, match="whole number of seconds"):
        make_command("retire", "iris", {"device": "d"}, key, in_progress_timeout=0)
    _, raw = make_command("retire", "iris", {"device": "d"}, key, in_progress_timeout=90)
    assert read_command(raw, [key.public_key()]).in_progress_timeout == 90
    _, raw = make_command("cancel", "iris", {"device": "d"}, key, cancels="deploy-1")
    command = read_command(raw, [key.public_key()])
    assert (command.kind, command.cancels) == ("cancel", "deploy-1")
    for bad in (
        {"kind": "cancel"},
        {"kind": "cancel", "cancels": "x/y"},
        {"kind": "cancel", "cancels": "a", "in_progress_timeout": 5},
        {"kind": "retire", "in_progress_timeout": 0},
        {"kind": "retire", "in_progress_timeout": True},
    ):
        body = {
            "schema": 1,
            "job_id": "j-1",
            "model": "iris",
            "target": {"device": "d"},
            "issued_at": "2026-12-02T12:00:00+00:00",
            "expires_at": "2036-12-02T12:00:00+00:00",
            **bad,
        }
        envelope = dsse_sign(COMMAND_PAYLOAD_TYPE, json.dumps(body).encode(), key)
        with pytest.raises(CommandError):
            read_command(json.dumps(envelope).encode(), [key.public_key()])


class SteppingClock:
    """A monotonic clock that moves ``step`` seconds each time it is read."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_a_job_timed_out_after_staging_is_rolled_back(
    tmp_path: Path, keys: KeyPair, bundle_server: Any, iris_bundles: dict[str, Path]
) -> None:
    """The timeout strikes when the job enters its health check: what was staged is undone."""
    config = load_config(write_agent_config(tmp_path / "dev", keys))
    agent = Agent(config, fetcher=HttpFetcher(DownloadConfig(retries=0)))
    agent.start(serve_http=False)
    ops_key, reports = generate_private_key(), []
    try:
        clock = SteppingClock(10.0)  # read at the start, then on entering each step
        runner = JobRunner(agent, lambda: [ops_key.public_key()], reports.append, clock=clock)
        dist = iris_bundles["v1"].parent
        for version, timeout in ((1, None), (2, 35)):  # 2: start 10, deadline 45: health check 50
            _, raw = make_command(
                "deploy",
                "iris",
                {"device": "test-device"},
                ops_key,
                version=version,
                bundles=find_bundles("iris", version, bundle_server.url, dist),
                in_progress_timeout=timeout,
            )
            clock.now = 0.0
            runner.handle(raw)
        last = reports[-1]
        assert last.status is JobStatus.TIMED_OUT
        assert "before health-check" in (last.reason or "")
        assert (last.version_before, last.version_after) == (1, 1)
        assert JobStep.ROLLING_BACK in [r.step for r in reports if r.job_id == last.job_id]
        assert next(m.version for m in agent.runtime.models() if m.name == "iris") == 1
        assert agent.lifecycle.store.load().models["iris"].active == 1
    finally:
        agent.stop()


def test_a_cancel_for_another_model_does_not_withdraw_a_job(
    tmp_path: Path, keys: KeyPair, bundle_server: Any, iris_bundles: dict[str, Path]
) -> None:
    """A signed cancel naming a job id but another model (hand-made, or a mistake) does not
    stop that job when it arrives; a cancel of its own model does."""
    config = load_config(write_agent_config(tmp_path / "dev", keys))
    agent = Agent(config, fetcher=HttpFetcher(DownloadConfig(retries=0)))
    agent.start(serve_http=False)
    ops_key, reports = generate_private_key(), []
    try:
        runner = JobRunner(agent, lambda: [ops_key.public_key()], reports.append)
        dist = iris_bundles["v1"].parent
        target = {"device": "test-device"}
        bundles = {v: find_bundles("iris", v, bundle_server.url, dist) for v in (1, 2)}
        job, deploy = make_command("deploy", "iris", target, ops_key, version=1, bundles=bundles[1])
        _, wrong = make_command("cancel", "pricing", target, ops_key, cancels=job)
        runner.handle(wrong)
        runner.handle(deploy)
        assert reports[-1].job_id == job
        assert reports[-1].status is JobStatus.SUCCEEDED
        assert agent.lifecycle.store.load().models["iris"].active == 1
        later, second = make_command(
            "deploy", "iris", target, ops_key, version=2, bundles=bundles[2]
        )
        _, right = make_command("cancel", "iris", target, ops_key, cancels=later)
        runner.handle(right)
        runner.handle(second)
        assert {r.status for r in reports if r.job_id == later} == {JobStatus.CANCELED}
        assert agent.lifecycle.store.load().models["iris"].active == 1
    finally:
        agent.stop()
