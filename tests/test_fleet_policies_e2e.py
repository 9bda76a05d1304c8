"""A policy rolls a drifting version back through a real mosquitto, on real agents.

Two agents (their own state directories, real bundles, real onnxruntime) run iris v2 with v1
retained, linked to the broker; the collector writes to SQLite and evaluates a rule with the
operator key (``--policy-key``) on a short interval. The drift windows are put in the store as
the collector would have (the agents' own drift detection is tested elsewhere); the rollback is
the real thing: signed, published, verified and run by each agent, its progress recorded by the
collector. Every wait is a bounded poll.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from brokers import Broker, mosquitto
from click.testing import CliRunner
from conftest import KeyPair, _write_pair, write_agent_config

from edgepack.agent._config import load_config
from edgepack.agent._daemon import Agent
from edgepack.agent._fleet_link import DeviceLink
from edgepack.fleet._audit import entries
from edgepack.fleet._broker import BrokerOptions
from edgepack.fleet._cli import cli
from edgepack.fleet._collector import Collector
from edgepack.fleet._database import open_store
from edgepack.fleet._policies import PolicyEngine, parse_policies
from edgepack.fleet._rollout_controller import BrokerSender
from edgepack.formats.keys import key_id, load_private_key

WAIT = 30.0
NAMES = ("cam-a", "cam-b")


def poll(done: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + WAIT
    while not (found := done()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {WAIT:.0f} s")
        time.sleep(0.05)
    return found


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    with mosquitto(tmp_path / "broker") as running:
        yield running


def _agent(
    root: Path, name: str, broker: Broker, keys: KeyPair, ops: KeyPair, bundles: dict[str, Path]
) -> tuple[Agent, DeviceLink]:
    extra = (
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nprefix = "p/v1"\n'
        f'command_keys = ["{ops.public}"]\nreconnect_max = 2\n'
    )
    path = write_agent_config(root / name, keys, extra=extra)
    text = path.read_text().replace('device_id = "test-device"', f'device_id = "{name}"')
    path.write_text(text.replace("[server]\n", "[server]\nenabled = false\n"))
    config = load_config(path)
    agent = Agent(config)
    agent.start(serve_http=False)
    assert agent.install(str(bundles["v1"])).ok
    assert agent.install(str(bundles["v2"])).ok
    assert config.mqtt is not None
    link = DeviceLink(agent, config.mqtt).start()
    assert link.connected.wait(10), f"{name} did not connect"
    return agent, link


def test_a_drifting_version_is_rolled_back_on_the_devices_affected(
    tmp_path: Path, broker: Broker, keys: KeyPair, iris_bundles: dict[str, Path]
) -> None:
    ops = _write_pair(tmp_path / "ops", "ops")
    options = BrokerOptions(host=broker.host, port=broker.port, prefix="p/v1")
    store = open_store(tmp_path / "fleet.db")
    signing = load_private_key(ops.private.read_bytes())
    rules = parse_policies(
        '[[rule]]\nname = "drifting"\nmodel = "iris"\ndrift_share = 0.4\n'
        'drift_windows = 2\naction = "rollback"\n'
    )
    now = dt.datetime.now(dt.timezone.utc)
    engine = PolicyEngine(
        store,
        rules,
        sender=BrokerSender(options, signing),
        clock=lambda: now,
        key_id=key_id(signing.public_key()),
    )
    collector = Collector(
        options, store, clock=lambda: now, policies=engine, policy_interval=0.1
    ).start()
    agents = {name: _agent(tmp_path, name, broker, keys, ops, iris_bundles) for name in NAMES}
    try:

        def on(version: int) -> set[str]:
            return {
                d.device
                for d in store.devices()
                if (d.models.get("iris") or {}).get("active") == version
            }

        poll(lambda: on(2) == set(NAMES), "both agents on v2 in the store")
        for seq in (1, 2):  # cam-a drifts twice in a row, cam-b stays well
            for name, status in (("cam-a", "drift"), ("cam-b", "ok")):
                payload = {"model": "iris", "version": 2, "status": status, "features": []}
                store.record_event("drift", name, payload, seq, now)

        poll(lambda: store.policy_actions("rolled_back") != [], "the policy rolled back")
        (action,) = store.policy_actions()
        job = action.data["jobs"]["cam-a"]
        assert list(action.data["jobs"]) == ["cam-a"]
        assert action.data["figures"]["drift_share"] == 0.5
        poll(
            lambda: any(e.status == "SUCCEEDED" for e in store.executions(job)),
            "cam-a's rollback succeeded",
        )
        served = {
            n: next(m.version for m in a.runtime.models() if m.name == "iris")
            for n, (a, _link) in agents.items()
        }
        assert served == {"cam-a": 1, "cam-b": 2}
        poll(lambda: on(1) == {"cam-a"}, "cam-a on v1 in the store")
        kinds = [e.kind for e in entries(store, model="iris") if e.kind.startswith("policy.")]
        assert kinds == ["policy.act", "policy.rollback"]
        rolled = entries(store, kind="policy.rollback")[0]
        assert rolled.payload["devices"] == ["cam-a"]
        assert rolled.key_id == key_id(signing.public_key())
        shown = CliRunner().invoke(cli, ["--store", str(tmp_path / "fleet.db"), "policy", "list"])
        assert shown.exit_code == 0, shown.output
        assert "rolled_back" in shown.output
    finally:
        for agent, link in agents.values():
            link.stop()
            agent.stop()
        collector.stop()
        store.close()


def test_a_rollback_waiting_for_approval_is_sent_by_policy_approve(
    tmp_path: Path, broker: Broker, keys: KeyPair, iris_bundles: dict[str, Path]
) -> None:
    """Without --policy-key the collector only asks; `policy approve ID --key` signs and sends."""
    ops = _write_pair(tmp_path / "ops", "ops")
    options = BrokerOptions(host=broker.host, port=broker.port, prefix="p/v1")
    db = tmp_path / "fleet.db"
    store = open_store(db)
    rules = parse_policies(
        '[[rule]]\nname = "floor"\nmodel = "iris"\nquality_below = 0.9\naction = "rollback"\n'
        "approval = true\n"
    )
    now = dt.datetime.now(dt.timezone.utc)
    engine = PolicyEngine(store, rules, clock=lambda: now)  # no key: it can only ask
    collector = Collector(
        options, store, clock=lambda: now, policies=engine, policy_interval=0.1
    ).start()
    name = "cam-q"
    agent, link = _agent(tmp_path, name, broker, keys, ops, iris_bundles)
    try:
        poll(lambda: any(d.device == name for d in store.devices()), "the agent's state")
        report = {
            "model": "iris",
            "version": 2,
            "status": "degraded",
            "labeled": 100,
            "metrics": {"accuracy": 0.55},
        }
        store.record_event("quality", name, report, 1, now)
        (pending,) = poll(lambda: store.policy_actions("pending"), "a pending action")
        assert agent.runtime.models()[0].version == 2  # nothing sent yet
        common = ["--broker", broker.address, "--prefix", "p/v1", "--store", str(db)]
        listed = CliRunner().invoke(cli, [*common, "policy", "pending", "--json"])
        assert [a["action_id"] for a in json.loads(listed.output)] == [pending.action_id]
        approved = CliRunner().invoke(
            cli, [*common, "policy", "approve", pending.action_id, "--key", str(ops.private)]
        )
        assert approved.exit_code == 0, approved.output
        assert f"{name}: job rollback-" in approved.output
        poll(lambda: agent.runtime.models()[0].version == 1, "the agent back on v1")
        kinds = [e.kind for e in entries(store) if e.kind.startswith("policy.")]
        assert kinds == ["policy.pending", "policy.approve", "policy.rollback"]
        signer = load_private_key(ops.private.read_bytes()).public_key()
        assert entries(store, kind="policy.approve")[0].key_id == key_id(signer)
    finally:
        link.stop()
        agent.stop()
        collector.stop()
        store.close()
