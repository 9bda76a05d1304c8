"""Property-based fuzzing of everything a device takes from the outside: each MQTT topic it
subscribes to (device and group jobs, pending answers, collector presence, the trust topic) and
the HTTP inference request decoder.

The properties: no handler raises, whatever arrives (random bytes, JSON of any shape, nesting
tens of thousands deep, integers longer than Python's int-to-string limit, valid messages with
one field changed); a command whose job id is readable gets a REJECTED status with a reason; the
request decoder ends in a request or a RequestError (a 400), never another exception; and after
the whole run the device still takes a valid command and its trust is unchanged.
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from conftest import KeyPair, write_agent_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgepack.agent._config import load_config
from edgepack.agent._daemon import Agent
from edgepack.agent._fleet_link import DeviceLink
from edgepack.agent._inference_protocol import decode_infer_request
from edgepack.agent._jobs import StatusUpdate
from edgepack.agent.exceptions import RequestError
from edgepack.formats.commands import make_command, peek_command
from edgepack.formats.keys import generate_private_key, public_key_pem
from edgepack.formats.messages import JobStatus
from edgepack.formats.topics import Topics

CASES = 1200  # per topic; the closing note reports these
FUZZ = settings(
    max_examples=CASES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,  # the same cases on every run: a failure reproduces
)
TOPICS = Topics()
DEVICE = "test-device"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)
hostile_bytes = st.one_of(
    st.binary(max_size=2000),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.integers(1, 60_000).map(lambda n: b"[" * n + b"]" * n),  # nesting
    st.integers(1, 60_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.integers(4_301, 20_000).map(lambda n: b'{"schema": ' + b"9" * n + b"}"),  # huge int
    st.integers(4_301, 20_000).map(lambda n: b"9" * n),
)


class Link:
    """A device's MQTT link, never connected: messages are handed to it as paho would."""

    def __init__(self, agent: Agent, ops_key: Any) -> None:
        assert agent.config.mqtt is not None
        self.link = DeviceLink(agent, agent.config.mqtt)
        self.updates: list[StatusUpdate] = []
        self.link.runner.report = self.updates.append
        self.ops_key = ops_key

    def deliver(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """paho's callback, then the worker's handling of what it queued, as in the agent."""
        message = mqtt.MQTTMessage(topic=topic.encode())
        message.payload = payload
        message.retain = retain
        self.link._on_message(self.link._client, None, message)  # must not raise
        while not self.link._inbox.empty():
            item = self.link._inbox.get_nowait()
            assert item is not None
            for raw in self.link._messages_in(*item):  # raises nothing either
                self.link.runner.handle(raw)  # documented: never raises


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory, keys: KeyPair) -> Iterator[Link]:
    directory = tmp_path_factory.mktemp("fuzzed-device")
    ops = generate_private_key()
    (directory / "ops.pub").write_bytes(public_key_pem(ops))
    root = generate_private_key()
    (directory / "root.pub").write_bytes(public_key_pem(root))
    config = write_agent_config(
        directory, keys,
        extra=f'[mqtt]\nhost = "127.0.0.1"\nport = 1\ncommand_keys = ["{directory / "ops.pub"}"]\n',
    )  # fmt: skip
    text = config.read_text().replace(  # a top-level key: before the first table
        "[server]", f'root_keys = ["{directory / "root.pub"}"]\n[server]', 1
    )
    config.write_text(text)
    agent = Agent(load_config(config))
    agent.lifecycle.store.ensure()
    link = Link(agent, ops)
    yield link
    link.link.outbox.close()


def signed_command(link: Link, **changes: Any) -> bytes:
    """A valid deploy for this device, then (optionally) one field of its payload changed."""
    _, raw = make_command(
        "deploy", "iris", {"device": DEVICE}, link.ops_key, version=2,
        bundles={"x86_64-cpu": {"url": "http://127.0.0.1:1/iris.edgepack",
                                "sha256": "0" * 64, "size": 10}},
    )  # fmt: skip
    if not changes:
        return raw
    envelope = json.loads(raw)
    payload = json.loads(base64.b64decode(envelope["payload"]))
    payload.update(changes)
    envelope["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    return json.dumps(envelope).encode()


JOB_TOPICS = [
    TOPICS.device_jobs(DEVICE, "iris"),
    TOPICS.group_jobs("store-42", "iris"),
    TOPICS.pending(DEVICE),
    TOPICS.collector("main"),
    TOPICS.trust(),
]


@pytest.mark.parametrize("topic", JOB_TOPICS, ids=lambda t: t.split("/", 2)[2])
@FUZZ
@given(payload=hostile_bytes, retain=st.booleans())
def test_no_payload_on_a_subscribed_topic_escapes_its_handler(
    device: Link, topic: str, payload: bytes, retain: bool
) -> None:
    device.deliver(topic, payload, retain)


@FUZZ
@given(
    field=st.sampled_from(["kind", "job_id", "model", "target", "issued_at", "expires_at",
                           "version", "bundles", "schema"]),
    value=json_values,
)  # fmt: skip
def test_a_signed_command_with_one_field_changed_is_rejected_with_a_reason(
    device: Link, field: str, value: Any
) -> None:
    device.updates.clear()
    raw = signed_command(device, **{field: value})
    device.deliver(TOPICS.device_jobs(DEVICE, "iris"), raw)
    for update in device.updates:
        assert update.status is JobStatus.REJECTED
        assert update.reason
    if peek_command(raw).job_id is not None:
        assert device.updates, "a tampered command with a readable job id must be REJECTED"


@FUZZ
@given(topic=st.text(max_size=80), payload=st.binary(max_size=200))
def test_any_topic_at_all_is_survived(device: Link, topic: str, payload: bytes) -> None:
    message = mqtt.MQTTMessage(topic=topic.encode("utf-8", "surrogatepass"))
    message.payload = payload
    device.link._on_message(device.link._client, None, message)


def test_after_the_fuzzing_the_device_still_takes_a_valid_command(device: Link) -> None:
    device.updates.clear()
    trust_before = device.link.agent.trust.current.version
    device.deliver(TOPICS.device_jobs(DEVICE, "iris"), signed_command(device))
    statuses = [u.status for u in device.updates]
    # this agent has no HTTP fetcher and the URL points nowhere, so the job ends at the
    # fetch: but it was verified, queued and run to an end
    assert statuses[0] is JobStatus.QUEUED, device.updates
    assert JobStatus.IN_PROGRESS in statuses
    assert statuses[-1] in (JobStatus.FAILED, JobStatus.REJECTED)
    assert "iris.edgepack" in (device.updates[-1].reason or "")
    assert device.link.agent.trust.current.version == trust_before


@FUZZ
@given(body=hostile_bytes, header_length=st.none() | st.integers(-5, 3000))
def test_the_inference_request_decoder_is_total(body: bytes, header_length: int | None) -> None:
    with contextlib.suppress(RequestError):
        decode_infer_request(body, header_length)


@FUZZ
@given(
    entry=st.dictionaries(
        st.sampled_from(["name", "shape", "datatype", "data", "parameters"]),
        json_values,
    ),
    outputs=json_values,
    parameters=json_values,
)
def test_the_decoder_is_total_on_request_shaped_json(
    entry: dict[str, Any], outputs: Any, parameters: Any
) -> None:
    body = json.dumps({"inputs": [entry], "outputs": outputs, "parameters": parameters}).encode()
    with contextlib.suppress(RequestError):
        decode_infer_request(body, None)

