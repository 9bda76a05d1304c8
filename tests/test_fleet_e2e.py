"""The whole fleet through a real mosquitto: deploy, converge, roll back, retire, refuse.

Real parts only: a mosquitto broker on a free loopback port, the bundle server over HTTP, agents
with their own state directories (in this process, each with its own MQTT connection), the
collector writing to SQLite, packager-built bundles, and signed commands.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from brokers import Broker, mosquitto
from conftest import KeyPair, _write_pair, write_agent_config

from edgepack.agent._config import DownloadConfig, load_config
from edgepack.agent._daemon import Agent
from edgepack.agent._download import HttpFetcher
from edgepack.agent._fleet_link import DeviceLink
from edgepack.fleet._broker import BrokerOptions, connect, publish_and_wait
from edgepack.fleet._bundle_server import BundleServer
from edgepack.fleet._collector import Collector
from edgepack.fleet._commands import BundleFetchLimits, find_bundles, publish_command
from edgepack.fleet._database import open_store
from edgepack.fleet.exceptions import BundleLookupError
from edgepack.formats.commands import make_command
from edgepack.formats.keys import generate_private_key, load_private_key
from edgepack.formats.messages import TERMINAL
from edgepack.formats.topics import Topics

WAIT = 30.0


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with mosquitto(tmp_path_factory.mktemp("broker")) as running:
        yield running


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    """The operator's command-signing key (not the build server's bundle key)."""
    return _write_pair(tmp_path_factory.mktemp("ops"), "ops")


@pytest.fixture(scope="module")
def bundle_server(iris_bundles: dict[str, Path]) -> Iterator[BundleServer]:
    server = BundleServer(iris_bundles["v1"].parent, port=0).start()
    yield server
    server.stop()


class Fleet:
    """One test's fleet: its own prefix on the shared broker, devices, a collector."""

    def __init__(
        self,
        root: Path,
        broker: Broker,
        keys: KeyPair,
        ops: KeyPair,
        server: BundleServer,
        dist: Path,
    ) -> None:
        self.root, self.broker, self.keys, self.ops = root, broker, keys, ops
        self.server, self.dist = server, dist
        self.prefix = f"t{time.monotonic_ns()}/v1"  # isolates retained messages between tests
        self.options = BrokerOptions(host=broker.host, port=broker.port, prefix=self.prefix)
        self.store = open_store(root / "fleet.db")
        self.collector = Collector(self.options, self.store).start()
        self.devices: dict[str, tuple[Agent, DeviceLink]] = {}
        self.ops_key = load_private_key(ops.private.read_bytes())

    def device(
        self,
        name: str,
        groups: tuple[str, ...] = ("store-42",),
        clock: Callable[[], float] = time.monotonic,
    ) -> Agent:
        """Start (or restart) a device with its own state directory and MQTT session (``clock``:
        the monotonic clock its jobs' in-progress timeouts run on)."""
        groups_toml = json.dumps(list(groups))
        extra = (
            f'[mqtt]\nhost = "{self.broker.host}"\nport = {self.broker.port}\n'
            f'prefix = "{self.prefix}"\ncommand_keys = ["{self.ops.public}"]\n'
            "reconnect_max = 2\n"
        )
        path = write_agent_config(self.root / name, self.keys, extra=extra)
        text = path.read_text().replace(
            'device_id = "test-device"', f'device_id = "{name}"\ngroups = {groups_toml}'
        )
        path.write_text(text.replace("[server]\n", "[server]\nenabled = false\n"))
        config = load_config(path)
        agent = Agent(config, fetcher=HttpFetcher(DownloadConfig(retries=2, backoff_initial=0.05)))
        agent.start(serve_http=False)
        assert config.mqtt is not None
        link = DeviceLink(agent, config.mqtt, clock=clock).start()
        assert link.connected.wait(10), f"{name} did not connect"
        self.devices[name] = (agent, link)
        return agent

    def stop_device(self, name: str) -> None:
        agent, link = self.devices.pop(name)
        link.stop()
        agent.stop()

    def send(
        self, kind: str, target: dict[str, str], version: int | None = None, key: Any = None
    ) -> str:
        bundles = find_bundles("iris", version, self.server.url, self.dist) if version else None
        return publish_command(
            self.options,
            kind,
            "iris",
            target,
            key or self.ops_key,
            version=version,
            bundles=bundles,
        ).job_id

    def publish_raw(self, topic: str, payload: bytes) -> None:
        client = connect(self.options)
        try:
            publish_and_wait(client, topic, payload, retain=False)
        finally:
            client.disconnect()
            client.loop_stop()

    def wait_for(
        self, job_id: str, devices: list[str], until: Callable[[Any], bool] | None = None
    ) -> dict[str, Any]:
        """Wait until each device's execution of ``job_id`` is terminal; {device: row}."""
        deadline = time.monotonic() + WAIT
        rows: dict[str, Any] = {}
        while time.monotonic() < deadline:
            rows = {e.device: e for e in self.store.executions(job_id)}
            if all(d in rows and rows[d].status in TERMINAL for d in devices):
                return rows
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} not terminal on {devices} after {WAIT}s: {rows}")

    def close(self) -> None:
        for name in list(self.devices):
            self.stop_device(name)
        self.collector.stop()
        self.store.close()


@pytest.fixture
def fleet(
    tmp_path: Path,
    broker: Broker,
    keys: KeyPair,
    ops: KeyPair,
    bundle_server: BundleServer,
    iris_bundles: dict[str, Path],
) -> Iterator[Fleet]:
    running = Fleet(tmp_path, broker, keys, ops, bundle_server, iris_bundles["v1"].parent)
    yield running
    running.close()


def active(agent: Agent) -> int | None:
    model = agent.lifecycle.store.load().models.get("iris")
    return model.active if model else None


def serving(agent: Agent) -> int | None:
    return next((m.version for m in agent.runtime.models() if m.name == "iris"), None)


def test_group_deploy_reaches_every_device(fleet: Fleet) -> None:
    agents = [fleet.device(f"cam-{i}") for i in range(3)]
    job = fleet.send("deploy", {"group": "store-42"}, version=1)
    rows = fleet.wait_for(job, ["cam-0", "cam-1", "cam-2"])
    for agent in agents:
        assert rows[agent.config.device_id].status == "SUCCEEDED"
        assert rows[agent.config.device_id].version_after == 1
        assert serving(agent) == 1
    history = fleet.store.history(job, "cam-0")
    assert history[0].status == "QUEUED"
    assert "downloading" in [h.step for h in history]
    assert "health-check" in [h.step for h in history]
    time.sleep(0.5)  # the devices' retained state after the job
    devices = {d.device: d for d in fleet.store.devices("store-42")}
    assert set(devices) == {"cam-0", "cam-1", "cam-2"}
    assert all(d.online and d.models["iris"]["active"] == 1 for d in devices.values())


def test_offline_device_converges_when_it_connects(fleet: Fleet) -> None:
    online = fleet.device("cam-a")
    job = fleet.send("deploy", {"group": "store-42"}, version=1)
    fleet.wait_for(job, ["cam-a"])
    assert serving(online) == 1
    late = fleet.device("cam-b")  # new device: gets the retained group command on subscribe
    rows = fleet.wait_for(job, ["cam-b"])
    assert rows["cam-b"].status == "SUCCEEDED"
    assert serving(late) == 1


def test_restarted_agent_keeps_its_pending_job(fleet: Fleet) -> None:
    fleet.device("cam-r")
    fleet.stop_device("cam-r")  # its persistent session stays on the broker
    job = fleet.send("deploy", {"device": "cam-r"}, version=1)
    time.sleep(0.3)
    assert fleet.store.executions(job) == []
    agent = fleet.device("cam-r")
    assert fleet.wait_for(job, ["cam-r"])["cam-r"].status == "SUCCEEDED"
    assert serving(agent) == 1


def test_rollback_and_retire(fleet: Fleet) -> None:
    agent = fleet.device("cam-x")
    for version in (1, 2):
        fleet.wait_for(fleet.send("deploy", {"device": "cam-x"}, version=version), ["cam-x"])
    assert (active(agent), serving(agent)) == (2, 2)
    rows = fleet.wait_for(fleet.send("rollback", {"device": "cam-x"}), ["cam-x"])
    assert rows["cam-x"].status == "SUCCEEDED"
    assert (rows["cam-x"].version_before, rows["cam-x"].version_after) == (2, 1)
    assert serving(agent) == 1
    rows = fleet.wait_for(fleet.send("retire", {"device": "cam-x"}), ["cam-x"])
    assert rows["cam-x"].status == "SUCCEEDED"
    assert active(agent) is None
    assert serving(agent) is None


def _expired(key: Any) -> bytes:
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=2)
    return make_command(
        "rollback", "iris", {"device": "cam-z"}, key, issued_at=past, ttl=dt.timedelta(days=1)
    )[1]


def _unsigned(key: Any) -> bytes:
    return json.dumps(
        {
            "schema": 1,
            "kind": "retire",
            "job_id": "unsigned-1",
            "model": "iris",
            "target": {"device": "cam-z"},
        }
    ).encode()


def _wrong_key(key: Any) -> bytes:
    return make_command("retire", "iris", {"device": "cam-z"}, generate_private_key())[1]


def _other_device(key: Any) -> bytes:
    return make_command("retire", "iris", {"device": "cam-other"}, key)[1]


def _bad_bundle_deploy(key: Any) -> bytes:
    bundle = {
        "url": "http://127.0.0.1:9/iris-9-x86_64-cpu.edgepack",
        "sha256": "0" * 64,
        "size": 100,
    }
    return make_command(
        "deploy", "iris", {"device": "cam-z"}, key, version=9, bundles={"x86_64-cpu": bundle}
    )[1]


def _malformed(key: Any) -> bytes:
    envelope = json.loads(make_command("retire", "iris", {"device": "cam-z"}, key)[1])
    envelope["signatures"][0]["sig"] = "AAAA" + envelope["signatures"][0]["sig"][4:]
    return json.dumps(envelope).encode()


@pytest.mark.parametrize(
    ("forge", "says"),
    [
        (_unsigned, None),  # no verifiable job id: ignored, and nothing changes
        (_wrong_key, "signature rejected"),
        (_expired, "expired"),
        (_other_device, "for device 'cam-other'"),
        (_malformed, "signature rejected"),
        (_bad_bundle_deploy, "could not download"),
    ],
)
def test_refused_commands_change_nothing(
    fleet: Fleet, forge: Callable[[Any], bytes], says: str | None
) -> None:
    agent = fleet.device("cam-z")
    fleet.wait_for(fleet.send("deploy", {"device": "cam-z"}, version=1), ["cam-z"])
    before = agent.lifecycle.store.state_file.read_bytes()
    raw = forge(fleet.ops_key)
    topic = Topics(fleet.prefix).device_jobs("cam-z", "iris")
    fleet.publish_raw(topic, raw)
    time.sleep(1.0)
    if says is not None:
        payload = json.loads(base64.b64decode(json.loads(raw)["payload"]))
        rows = fleet.wait_for(payload["job_id"], ["cam-z"])
        assert rows["cam-z"].status in ("REJECTED", "FAILED")
        assert says in (rows["cam-z"].reason or ""), rows["cam-z"].reason
    after = json.loads(agent.lifecycle.store.state_file.read_bytes())
    assert after["models"] == json.loads(before)["models"]
    assert serving(agent) == 1


def test_replayed_older_command_is_rejected(fleet: Fleet) -> None:
    agent = fleet.device("cam-p")
    first_job, first = make_command(
        "deploy",
        "iris",
        {"device": "cam-p"},
        fleet.ops_key,
        version=1,
        bundles=find_bundles("iris", 1, fleet.server.url, fleet.dist),
    )
    topic = Topics(fleet.prefix).device_jobs("cam-p", "iris")
    fleet.publish_raw(topic, first)
    fleet.wait_for(first_job, ["cam-p"])
    fleet.wait_for(fleet.send("deploy", {"device": "cam-p"}, version=2), ["cam-p"])
    old_job, old = make_command(
        "rollback",
        "iris",
        {"device": "cam-p"},
        fleet.ops_key,
        issued_at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1),
    )
    fleet.publish_raw(topic, old)
    rows = fleet.wait_for(old_job, ["cam-p"])
    assert rows["cam-p"].status == "REJECTED"
    assert "replayed or stale" in (rows["cam-p"].reason or "")
    assert serving(agent) == 2
    # the first command delivered again is not run again: its final status is re-sent
    fleet.publish_raw(topic, first)
    time.sleep(0.5)
    assert serving(agent) == 2
    assert fleet.store.executions(first_job)[0].status == "SUCCEEDED"


def test_the_cli_deploys_and_rolls_back(fleet: Fleet) -> None:
    from click.testing import CliRunner

    from edgepack.fleet._cli import cli

    agent = fleet.device("cam-cli")
    common = [
        "--broker",
        fleet.broker.address,
        "--prefix",
        fleet.prefix,
        "--store",
        str(fleet.root / "fleet.db"),
    ]

    def run(*args: str) -> str:
        result = CliRunner().invoke(cli, [*common, *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        job = next(
            w
            for line in result.output.splitlines()
            if ": job " in line
            for w in [line.rsplit("job ", 1)[1].strip()]
        )
        fleet.wait_for(job, ["cam-cli"])
        return job

    for version in ("1", "2"):
        run(
            "deploy",
            "iris",
            "--version",
            version,
            "--device",
            "cam-cli",
            "--bundles",
            fleet.server.url,
            "--dist",
            str(fleet.dist),
            "--key",
            str(fleet.ops.private),
        )
    assert serving(agent) == 2
    job = run("rollback", "iris", "--device", "cam-cli", "--key", str(fleet.ops.private))
    assert fleet.store.executions(job)[0].status == "SUCCEEDED"
    assert serving(agent) == 1
    status = CliRunner().invoke(cli, [*common, "status", job])
    assert status.exit_code == 0
    assert "SUCCEEDED" in status.output


# --- a lying bundle index: the operator signs only hashes it computed itself ------------------


class LyingIndex(ThreadingHTTPServer):
    """Serves ``index`` (JSON) at ``/`` and ``files`` by name; each test sets up one lie."""

    def __init__(self, index: list[dict[str, Any]], files: dict[str, bytes]) -> None:
        super().__init__(("127.0.0.1", 0), _LyingHandler)
        self.index, self.files = index, files
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()  # fmt: skip


class _LyingHandler(BaseHTTPRequestHandler):
    server: LyingIndex

    def do_GET(self) -> None:
        if self.path == "/":
            body: bytes | None = json.dumps({"bundles": self.server.index}).encode()
        else:
            body = self.server.files.get(self.path.lstrip("/"))
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *_args: object) -> None:
        pass


def index_entry(name: str, data: bytes, **lie: Any) -> dict[str, Any]:
    return {"name": name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data), **lie}


V2 = "iris-2-x86_64-cpu.edgepack"
# Each: (index, files) given the real v1 and v2 bundle bytes, and what the error must say.
INDEX_LIES = [
    pytest.param(lambda v1, v2: ([index_entry(V2, v2, sha256="ab" * 32)], {V2: v2}),
                 f"bundle {V2}: the index says sha256 {'ab' * 32}", id="wrong_sha256"),
    pytest.param(lambda v1, v2: ([index_entry(V2, v2, size=len(v2) + 1)], {V2: v2}),
                 "the index says sha256 .*, {n} bytes, but .* sent", id="wrong_size"),
    pytest.param(lambda v1, v2: ([index_entry(V2, v1)], {V2: v1}),  # honest hash, wrong bundle
                 f"bundle {V2} holds iris version 1 for x86_64-cpu, not iris version 2",
                 id="other_version"),
    pytest.param(lambda v1, v2: ([index_entry(V2, b"junk" * 100)], {V2: b"junk" * 100}),
                 f"bundle {V2} is not a readable bundle", id="not_a_bundle"),
    pytest.param(lambda v1, v2: ([index_entry(V2, v2)], {}),
                 f"cannot download bundle {V2}", id="missing"),
    pytest.param(lambda v1, v2: ([{"name": V2, "sha256": None, "size": "12"}], {V2: v2}),
                 f"index entry for {V2} has no valid sha256 and size", id="malformed_entry"),
]  # fmt: skip


def retained_jobs(options: BrokerOptions, wait: float = 1.0) -> list[str]:
    """Job topics under ``options.prefix`` holding a retained command."""
    seen: list[str] = []
    client = connect(options)
    try:
        client.on_message = lambda _c, _u, message: seen.append(message.topic)
        client.subscribe(f"{options.prefix}/+/+/jobs/#", qos=1)
        time.sleep(wait)
    finally:
        client.disconnect()
        client.loop_stop()
    return seen


@pytest.mark.parametrize(("lie", "message"), INDEX_LIES)
def test_a_deploy_from_a_lying_index_is_refused_and_nothing_is_published(
    lie: Callable[[bytes, bytes], tuple[list[dict[str, Any]], dict[str, bytes]]],
    message: str,
    fleet: Fleet,
    iris_bundles: dict[str, Path],
) -> None:
    v1, v2 = iris_bundles["v1"].read_bytes(), iris_bundles["v2"].read_bytes()
    server = LyingIndex(*lie(v1, v2))
    try:
        done = subprocess.run(
            [str(Path(sys.executable).parent / "edgepack-fleet"), "--broker",
             fleet.broker.address, "--prefix", fleet.prefix, "deploy", "iris", "--version", "2",
             "--device", "cam-lie", "--bundles", server.url, "--key", str(fleet.ops.private)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 1, done.stdout + done.stderr
    error = " ".join(done.stderr.split())
    assert error.startswith("error: "), done.stderr
    assert re.search(message.replace("{n}", str(len(v2) + 1)), error), error
    assert "Traceback" not in done.stderr
    assert retained_jobs(fleet.options) == []


def test_a_deploy_from_an_honest_index_signs_the_hash_it_computed(
    fleet: Fleet, iris_bundles: dict[str, Path]
) -> None:
    """No --dist: the fleet downloads each bundle the server's index names and hashes it."""
    agent = fleet.device("cam-url")
    bundles = find_bundles("iris", 2, fleet.server.url)
    assert set(bundles) == {"x86_64-cpu", "arm64-cpu"}
    v2 = iris_bundles["v2"].read_bytes()
    assert bundles["x86_64-cpu"] == {
        "url": f"{fleet.server.url}/{V2}",
        "sha256": hashlib.sha256(v2).hexdigest(),
        "size": len(v2),
    }
    assert bundles == find_bundles("iris", 2, fleet.server.url, fleet.dist)
    job = publish_command(fleet.options, "deploy", "iris", {"device": "cam-url"}, fleet.ops_key,
                          version=2, bundles=bundles).job_id  # fmt: skip
    assert fleet.wait_for(job, ["cam-url"])["cam-url"].status == "SUCCEEDED"
    assert serving(agent) == 2
    assert retained_jobs(fleet.options) == [f"{fleet.prefix}/devices/cam-url/jobs/iris"]


def test_a_bundle_above_the_download_cap_is_refused(fleet: Fleet) -> None:
    with pytest.raises(BundleLookupError, match=r"bundle iris-2-\S+ at .* is above 1000 bytes"):
        find_bundles("iris", 2, fleet.server.url, fetch=BundleFetchLimits(max_bundle_bytes=1000))
