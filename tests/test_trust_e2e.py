"""Key rotation through a real mosquitto: a root-signed trust document, retained on the trust
topic, retires an operator key on devices that are online and on one that was offline during the
rotation; a document signed by a (compromised) command key changes nothing."""

from __future__ import annotations

import json
import time
from pathlib import Path

from conftest import KeyPair, _write_pair, write_agent_config
from test_fleet_e2e import Fleet, broker, bundle_server, fleet, ops  # noqa: F401 - fixtures

from edgepack.agent._config import DownloadConfig, load_config
from edgepack.agent._daemon import Agent
from edgepack.agent._download import HttpFetcher
from edgepack.agent._fleet_link import DeviceLink
from edgepack.fleet._broker import connect
from edgepack.formats.keys import key_id, load_private_key, load_public_key
from edgepack.formats.messages import JobStatus
from edgepack.formats.topics import Topics
from edgepack.formats.trust import make_trust


def start_device(world: Fleet, name: str, root: KeyPair) -> Agent:
    """A device like Fleet.device's, which also trusts the fleet's offline root key."""
    extra = (
        f'[mqtt]\nhost = "{world.broker.host}"\nport = {world.broker.port}\n'
        f'prefix = "{world.prefix}"\ncommand_keys = ["{world.ops.public}"]\nreconnect_max = 2\n'
    )
    path = write_agent_config(world.root / name, world.keys, extra=extra)
    text = path.read_text().replace(
        'device_id = "test-device"',
        f'device_id = "{name}"\ngroups = {json.dumps(["store-42"])}\n'
        f'root_keys = ["{root.public}"]',
    )
    path.write_text(text.replace("[server]\n", "[server]\nenabled = false\n"))
    config = load_config(path)
    agent = Agent(config, fetcher=HttpFetcher(DownloadConfig(retries=2, backoff_initial=0.05)))
    agent.start(serve_http=False)
    assert config.mqtt is not None
    link = DeviceLink(agent, config.mqtt).start()
    assert link.connected.wait(10)
    world.devices[name] = (agent, link)
    return agent


def publish_trust(world: Fleet, document: bytes) -> None:
    client = connect(world.options)
    try:
        info = client.publish(Topics(world.prefix).trust(), document, qos=1, retain=True)
        info.wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def wait_trust(agent: Agent, version: int) -> bool:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if agent.trust.current.version == version:
            return True
        time.sleep(0.05)
    return False


def test_a_root_signed_rotation_retires_a_command_key_everywhere(
    fleet: Fleet,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    root = _write_pair(tmp_path / "root", "root")
    new_ops = _write_pair(tmp_path / "ops2", "ops2")
    old_key = fleet.ops_key
    new_key = load_private_key(new_ops.private.read_bytes())
    online = start_device(fleet, "cam-1", root)

    first = fleet.send("deploy", {"device": "cam-1"}, version=1)
    assert fleet.wait_for(first, ["cam-1"])["cam-1"].status == JobStatus.SUCCEEDED

    # a stolen command key cannot rotate: a document it signs changes nothing
    forged = make_trust(
        version=1,
        root_keys=[load_public_key(root.public.read_bytes())],
        bundle_keys=[load_public_key(fleet.keys.public.read_bytes())],
        command_keys=[old_key.public_key()],
        signers=[old_key],
    )
    publish_trust(fleet, forged)
    rotation = make_trust(
        version=1,
        root_keys=[load_public_key(root.public.read_bytes())],
        bundle_keys=[load_public_key(fleet.keys.public.read_bytes())],
        command_keys=[new_key.public_key()],  # the old operator key is retired
        signers=[load_private_key(root.private.read_bytes())],
    )
    publish_trust(fleet, rotation)
    assert wait_trust(online, 1), "the online device did not apply the rotation"
    # had the forged document (also version 1, sent first) been taken, this one would have been
    # refused as not newer, and the old key would still be in force
    assert [key_id(k) for k in online.trust.command_keys()] == [key_id(new_key)]

    refused = fleet.send("deploy", {"device": "cam-1"}, version=2, key=old_key)
    row = fleet.wait_for(refused, ["cam-1"])["cam-1"]
    assert row.status == JobStatus.REJECTED
    assert "not among" in (row.reason or "")
    accepted = fleet.send("deploy", {"device": "cam-1"}, version=2, key=new_key)
    assert fleet.wait_for(accepted, ["cam-1"])["cam-1"].status == JobStatus.SUCCEEDED

    # a device that was offline during the rotation catches up from the retained document
    late = start_device(fleet, "cam-2", root)
    assert wait_trust(late, 1), "the late device did not catch up"
    stale = fleet.send("deploy", {"device": "cam-2"}, version=1, key=old_key)
    assert fleet.wait_for(stale, ["cam-2"])["cam-2"].status == JobStatus.REJECTED

    # and the rotation survives a restart
    fleet.stop_device("cam-1")
    again = start_device(fleet, "cam-1", root)
    assert again.trust.current.version == 1

    # retiring the build key: bundles it signed are refused from then on
    new_build = _write_pair(tmp_path / "build2", "build2")
    publish_trust(fleet, make_trust(
        version=2,
        root_keys=[load_public_key(root.public.read_bytes())],
        bundle_keys=[load_public_key(new_build.public.read_bytes())],
        command_keys=[new_key.public_key()],
        signers=[load_private_key(root.private.read_bytes())],
    ))  # fmt: skip
    assert wait_trust(again, 2)
    old_signed = fleet.send("deploy", {"device": "cam-1"}, version=3, key=new_key)
    row = fleet.wait_for(old_signed, ["cam-1"])["cam-1"]
    assert row.status in (JobStatus.REJECTED, JobStatus.FAILED)
    assert "not among the 1 trusted keys" in (row.reason or ""), row.reason
    assert again.lifecycle.store.load().models["iris"].active == 2
