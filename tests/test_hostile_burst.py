"""A burst of hostile messages on every topic, through a real mosquitto, and then business as usual.

The payloads that once silenced a device for good (JSON nested tens of thousands deep, integers
longer than Python's int-to-string limit on the collector-presence topic, a pending answer whose
``commands`` is not a list, a command with a newer schema) and many more go to every topic the
device and the collector subscribe to. Afterwards a valid signed deploy must SUCCEED on the
device, the collector must have recorded it, and the model must answer.
"""

from __future__ import annotations

import json
import random

import numpy as np
from test_fleet_e2e import Fleet, broker, bundle_server, fleet, ops  # noqa: F401 - fixtures

from edgepack.fleet._broker import connect
from edgepack.formats.messages import JobStatus
from edgepack.formats.topics import Topics

DEEP = b"[" * 50_000 + b"]" * 50_000
HUGE_INT = b'{"schema": 1, "online": ' + b"9" * 5000 + b"}"


def hostile_payloads(seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    payloads = [
        DEEP,
        HUGE_INT,
        b"9" * 5000,
        b'{"schema": 1, "commands": 7}',
        b'{"schema": 1, "commands": {"a": 1}}',
        b'{"schema": 99, "kind": "deploy", "job_id": "from-the-future"}',
        json.dumps({"payload": "!!", "payloadType": "x", "signatures": []}).encode(),
        b"",
        b"\xff\xfe\x00",
        b"null",
        b"[]",
        b'{"schema": 1}',
        b'{"schema": "1"}',
        b"{" * 10 + b"}" * 10,
        b" " * (300 * 1024),  # past the payload cap
    ]
    payloads += [rng.randbytes(rng.randint(1, 512)) for _ in range(40)]
    return payloads


def topics_of_everyone(topics: Topics, device: str) -> list[str]:
    return [
        topics.device_jobs(device, "iris"),
        topics.group_jobs("store-42", "iris"),
        topics.pending(device),
        topics.collector("evil"),
        topics.trust(),
        topics.state(device),
        topics.job_status(device, "job-1"),
        topics.pending_get(device),
        topics.telemetry(device),
        topics.drift(device),
        topics.presence_ping(),
        f"{topics.prefix}/devices/{device}/unknown/leaf",
    ]


def test_after_a_hostile_burst_a_valid_deploy_succeeds_and_the_model_answers(
    fleet: Fleet,  # noqa: F811 - the fixture imported above
) -> None:
    agent = fleet.device("cam-0")
    topics = Topics(fleet.prefix)
    client = connect(fleet.options)
    sent = 0
    try:
        for topic in topics_of_everyone(topics, "cam-0"):
            for payload in hostile_payloads():
                for retain in (False, True):
                    client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)
                    sent += 1
        for topic in topics_of_everyone(topics, "cam-0"):  # clear what was retained
            client.publish(topic, b"", qos=1, retain=True).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()
    assert sent > 1000
    job = fleet.send("deploy", {"group": "store-42"}, version=1)
    rows = fleet.wait_for(job, ["cam-0"])
    assert rows["cam-0"].status == JobStatus.SUCCEEDED, rows["cam-0"]
    rows_in = np.asarray([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)
    answer = agent.infer("iris", {"input": rows_in})
    assert answer["label"].shape == (1,)
    _, link = fleet.devices["cam-0"]
    assert link.connected.is_set()  # paho's network thread is alive
    assert fleet.collector.stats.rejected > 0  # the collector saw them, counted, and carried on
