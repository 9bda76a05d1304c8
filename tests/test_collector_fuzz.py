"""Every input is hostile: property-based fuzzing of the collector's handlers (hypothesis).

For every topic kind the collector handles, thousands of generated payloads go through the
collector's real path: paho's ``on_message`` callback as the collector registers it (with
paho's own :class:`~paho.mqtt.client.MQTTMessage`), the queue, and :meth:`Collector.process`,
the writer thread's batch handler, into a real SQLite store. Payloads are random bytes, JSON of
random shape, a valid message with one field replaced or removed (at any level of a signed
envelope, too), huge integers, deep nesting, and oversized ones. Each case asserts that nothing
raised, that no *unexpected* exception was caught (``stats.errors`` stays 0: every refusal is a
``MessageError``, logged and counted as ``rejected``), and that a valid telemetry report queued
right behind the hostile message, in the same batch, is still recorded. ``CASES`` records how
many cases ran per topic (printed with ``-s``).
"""

from __future__ import annotations

import base64
import datetime as dt
import itertools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgepack.fleet._broker import BrokerOptions
from edgepack.fleet._collector import Collector
from edgepack.fleet._database import FleetStore, open_store
from edgepack.formats.commands import make_command
from edgepack.formats.keys import generate_private_key
from edgepack.formats.messages import (
    JobStatus,
    ModelState,
    ReportKind,
    build_device_state,
    build_job_status,
    build_pending_get,
    build_presence_ping,
    build_report,
)
from edgepack.formats.topics import Topics
from edgepack.formats.trust import make_trust

T0 = dt.datetime(2026, 11, 26, 16, 0, tzinfo=dt.timezone.utc)
TOPICS = Topics()
KEY = generate_private_key()
EXAMPLES = int(os.environ.get("EDGEPACK_FUZZ_EXAMPLES", "1000"))
CASES: dict[str, int] = {}
_seq = itertools.count(1)


def _command() -> bytes:
    bundles = {"x86_64-cpu": {"url": "http://127.0.0.1:1/iris-2.edgepack", "sha256": "a" * 64,
                              "size": 10}}  # fmt: skip
    return make_command("deploy", "iris", {"group": "canary"}, KEY, version=2, bundles=bundles,
                        issued_at=T0)[1]  # fmt: skip


def _trust() -> bytes:
    pub = KEY.public_key()
    return make_trust(version=3, root_keys=[pub], bundle_keys=[pub], command_keys=[pub],
                      signers=[KEY], issued_at=T0)  # fmt: skip


# topic kind -> (topic, a valid payload, whether the interesting fields are inside an envelope)
VALID: dict[str, tuple[str, bytes, bool]] = {
    "state": (TOPICS.state("cam-1"), build_device_state(
        "cam-1", profile="x86_64-cpu", agent_version="0.1.0", groups=["eu"],
        models={"iris": ModelState(2, 1, 2)}, health="ok", session="s1", ts=T0), False),
    "job_status": (TOPICS.job_status("cam-1", "deploy-1"), build_job_status(
        "deploy-1", "cam-1", JobStatus.QUEUED, model="iris", seq=1, ts=T0), False),
    "pending_get": (TOPICS.pending_get("cam-1"), build_pending_get("cam-1", ["eu"], T0), False),
    "telemetry": (TOPICS.telemetry("cam-1"), build_report(
        ReportKind.TELEMETRY, "cam-1", 1, {"requests": 3}, ts=T0), False),
    "drift": (TOPICS.drift("cam-1"), build_report(
        ReportKind.DRIFT, "cam-1", 1, {"model": "iris", "status": "ok"}, ts=T0), False),
    "device_jobs": (TOPICS.device_jobs("cam-1", "iris"), _command(), True),
    "group_jobs": (TOPICS.group_jobs("canary", "iris"), _command(), True),
    "trust": (TOPICS.trust(), _trust(), True),
    "presence_ping": (TOPICS.presence_ping(), build_presence_ping("cam-1", T0), False),
}  # fmt: skip

# -- payload strategies ------------------------------------------------------------------------

scalars = (
    st.none() | st.booleans() | st.text(max_size=20)
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=True, allow_infinity=True)
)  # fmt: skip
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _nested(depth: int, leaf: Any = 0) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


hostile_values = (
    json_values | st.integers(min_value=18, max_value=200).map(_nested) | st.just(10**400)
)  # more digits than the bounded reader allows (and than int-to-str's limit, if asked)


def _mutate(payload: bytes, enveloped: bool, key: str | None, value: Any, delete: bool) -> bytes:
    """Replace (or remove) one field of the message, inside the envelope when there is one."""
    outer = json.loads(payload)
    body = json.loads(base64.b64decode(outer["payload"])) if enveloped else outer
    target = body if key is None or key in body or not enveloped else outer
    name = key if key is not None else "extra"
    if delete:
        target.pop(name, None)
    else:
        target[name] = value
    if enveloped:
        outer["payload"] = base64.b64encode(json.dumps(body).encode()).decode()
    return json.dumps(outer).encode()


def payloads(kind: str) -> st.SearchStrategy[bytes]:
    _topic, valid, enveloped = VALID[kind]
    outer = json.loads(valid)
    fields = sorted(json.loads(base64.b64decode(outer["payload"])) if enveloped else outer)
    fields += sorted(outer) if enveloped else []
    mutated = st.builds(
        lambda k, v, d: _mutate(valid, enveloped, k, v, d),
        st.sampled_from([*fields, None]), hostile_values, st.booleans(),
    )  # fmt: skip
    deep = st.integers(min_value=17, max_value=20_000).map(lambda n: b"[" * n + b"]" * n)
    long_number = st.integers(min_value=33, max_value=50_000).map(
        lambda n: b'{"schema":1,"seq":' + b"9" * n + b"}"
    )
    return st.one_of(
        st.binary(max_size=300),
        json_values.map(lambda v: json.dumps(v).encode()),
        mutated, mutated, mutated,  # the most interesting ones get the most cases
        deep,
        long_number,
        st.just(valid + b" " * (256 * 1024)),  # oversized
        st.just(valid),
    )  # fmt: skip


# -- the collector under test -----------------------------------------------------------------


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Collector, FleetStore]]:
    # On tmpfs where there is one: a commit per case, and the fsyncs would be most of the time.
    shm = Path("/dev/shm")
    where = Path(tempfile.mkdtemp(dir=shm)) if shm.is_dir() else tmp_path_factory.mktemp("fuzz")
    store = open_store(where / "fleet.db")
    collector = Collector(BrokerOptions(), store, client_id="fuzz", clock=lambda: T0)
    # A real paho client that never connects: the ping answer is published into its queue.
    collector._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fuzz")
    logging.getLogger("edgepack.fleet.collector").setLevel(logging.CRITICAL)
    yield collector, store
    store.close()
    shutil.rmtree(where, ignore_errors=True)


def deliver(collector: Collector, topic: bytes, payload: bytes) -> None:
    """What paho does with a PUBLISH: an MQTTMessage handed to the registered on_message."""
    message = mqtt.MQTTMessage(topic=topic)
    message.payload = payload
    collector._guarded(collector._on_message)(collector._client, None, message)


def run_case(
    collector: Collector, store: FleetStore, kind: str, topic: bytes, payload: bytes
) -> None:
    seq = next(_seq)
    valid = build_report(ReportKind.TELEMETRY, "fuzz-dev", seq, {"ok": True}, ts=T0)
    deliver(collector, topic, payload)
    deliver(collector, TOPICS.telemetry("fuzz-dev").encode(), valid)
    batch = []
    while not collector._queue.empty():
        item = collector._queue.get_nowait()
        assert item is not None
        batch.append(item)
    collector.process(batch)  # never raises
    assert collector.stats.errors == 0, f"an unexpected exception on {kind}"
    assert [e[2]["seq"] for e in store.events("telemetry", device="fuzz-dev", limit=1)] == [seq]
    CASES[kind] = CASES.get(kind, 0) + 1


def fuzz(kind: str) -> Callable[..., None]:
    topic = VALID[kind][0].encode()

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture])  # fmt: skip
    @given(payload=payloads(kind))
    def test(rig: tuple[Collector, FleetStore], payload: bytes) -> None:
        run_case(*rig, kind, topic, payload)

    test.__name__ = f"test_fuzz_{kind}"
    return test


for _kind in VALID:
    globals()[f"test_fuzz_{_kind}"] = fuzz(_kind)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    topic=st.binary(max_size=80)
    | st.lists(st.sampled_from(["edgepack", "v1", "devices", "groups", "jobs", "status", "+", "#",
                                "cam-1", "", "state", "pending", "get", "trust", "x" * 200,
                                "\x00", "é"]), max_size=7).map(lambda p: "/".join(p).encode()),
    payload=st.sampled_from([v[1] for v in VALID.values()]) | st.binary(max_size=50),
)  # fmt: skip
def test_fuzz_any_topic(rig: tuple[Collector, FleetStore], topic: bytes, payload: bytes) -> None:
    """Topics of any shape, including bytes that are not UTF-8 (paho fails decoding them)."""
    run_case(*rig, "any_topic", topic, payload)


def test_zz_report_the_cases(capsys: pytest.CaptureFixture[str]) -> None:
    with capsys.disabled():
        print("\nfuzz cases per topic:", json.dumps(CASES, sort_keys=True))
    assert all(n >= 100 for n in CASES.values()), CASES


def test_a_hostile_burst_through_a_real_broker_leaves_the_collector_working(
    tmp_path: Path,
) -> None:
    """Every hostile shape on every topic, through mosquitto to a running collector: its paho
    network thread and its writer survive, and a valid report afterwards is recorded."""
    import time

    from brokers import mosquitto

    from edgepack.fleet._broker import connect

    hostile = [
        b"[" * 50_000 + b"]" * 50_000,
        b'{"schema":1,"seq":' + b"9" * 5_000 + b"}",
        b"\xff\xfe not json",
        b'{"schema":99}',
        b'{"schema":1,"device":["x"],"commands":7,"seq":-1,"groups":"x","ts":{}}',
        b"x" * (300 * 1024),
        b"",
    ]
    with mosquitto(tmp_path / "broker") as broker:
        options = BrokerOptions(port=broker.port, prefix=f"edgepack/t{next(_seq)}")
        topics = Topics(options.prefix)
        store = open_store(tmp_path / "fleet.db")
        collector = Collector(options, store, client_id="burst").start()
        sender = connect(options)
        try:
            names = [
                topics.state("cam-1"), topics.job_status("cam-1", "deploy-1"),
                topics.pending_get("cam-1"), topics.telemetry("cam-1"), topics.drift("cam-1"),
                topics.device_jobs("cam-1", "iris"), topics.group_jobs("canary", "iris"),
                topics.trust(), topics.presence_ping(), f"{options.prefix}/devices/cam-1/nope",
            ]  # fmt: skip
            infos = [sender.publish(t, p, qos=1) for t in names for p in hostile]
            valid = build_report(ReportKind.TELEMETRY, "cam-1", 1, {"ok": True}, ts=T0)
            infos.append(sender.publish(topics.telemetry("cam-1"), valid, qos=1))
            for info in infos:
                info.wait_for_publish(10)
            deadline = time.monotonic() + 20
            while not store.events("telemetry", device="cam-1"):
                assert time.monotonic() < deadline, (
                    f"the valid report never landed: {collector.stats}"
                )
                time.sleep(0.02)
            assert collector.stats.errors == 0
            assert collector.stats.rejected >= len(names) * (len(hostile) - 2)
            assert collector._client is not None
            assert collector._client.is_connected()
        finally:
            sender.disconnect()
            sender.loop_stop()
            collector.stop(drain_timeout=5)
            store.close()


def test_a_record_that_fails_to_write_loses_only_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any exception while writing one record (not only a StoreError) rolls the batch back and
    the messages are written one by one: the others are kept, the failure is counted."""
    store = open_store(tmp_path / "fleet.db")
    collector = Collector(BrokerOptions(), store, client_id="t", clock=lambda: T0)
    logging.getLogger("edgepack.fleet.collector").setLevel(logging.CRITICAL)

    def broken(*args: Any, **kwargs: Any) -> bool:
        raise OverflowError("Python int too large to convert to SQLite INTEGER")

    monkeypatch.setattr(store, "record_execution", broken)
    status = build_job_status(
        "deploy-1", "dev-a", JobStatus.SUCCEEDED, seq=1, version_before=1, version_after=2
    )
    batch = [
        (TOPICS.telemetry("dev-a"), build_report(ReportKind.TELEMETRY, "dev-a", 1, {}, ts=T0)),
        (TOPICS.job_status("dev-a", "deploy-1"), status),
        (TOPICS.telemetry("dev-b"), build_report(ReportKind.TELEMETRY, "dev-b", 1, {}, ts=T0)),
    ]
    collector.process(batch)  # never raises
    assert collector.stats.errors == 1
    assert {e[0] for e in store.events("telemetry", limit=10)} == {"dev-a", "dev-b"}
    store.close()
