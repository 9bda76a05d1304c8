"""What the collector appends to the audit trail, fed the messages it would hear.

The collector's own parser and writer (``Collector.process``) on a real SQLite store, without a
broker: a command (twice, as QoS 1 may deliver it), job statuses, a key rotation and a silent
device's time-out each leave the entries docs/governance.md promises, once; ``audit verify``
with the trust document's keys then checks the command's signature. Then two collectors sharing
the load through a real mosquitto write one PostgreSQL: every final status is one entry of one
chain, whichever collector heard it (and its QoS 1 copy).
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from brokers import Broker, mosquitto
from postgres import fresh_database, postgres_server

from edgepack.fleet import _audit as audit
from edgepack.fleet._broker import BrokerOptions, connect, publish_and_wait
from edgepack.fleet._collector import Collector
from edgepack.fleet._database import open_store
from edgepack.formats.commands import make_command
from edgepack.formats.keys import generate_private_key, key_id
from edgepack.formats.messages import JobStatus, build_job_status
from edgepack.formats.trust import make_trust

T0 = dt.datetime(2026, 12, 1, 9, 0, tzinfo=dt.timezone.utc)


def test_commands_outcomes_trust_and_time_outs_are_appended_once(tmp_path: Path) -> None:
    options = BrokerOptions(host="127.0.0.1", port=1, prefix="edgepack/v1")
    collector = Collector(options, open_store(tmp_path / "fleet.db"), clock=lambda: T0,
                          job_grace=30)  # fmt: skip
    store, topics = collector.store, collector.topics
    ops, root = generate_private_key(), generate_private_key()
    trust = make_trust(version=1, root_keys=[root.public_key()], bundle_keys=[ops.public_key()],
                       command_keys=[ops.public_key()], signers=[root], issued_at=T0)  # fmt: skip
    collector.process([(topics.trust(), trust)])
    job, envelope = make_command("rollback", "iris", {"device": "cam-1"}, ops, issued_at=T0)
    slow, slow_envelope = make_command("rollback", "iris", {"device": "cam-2"}, ops,
                                       issued_at=T0, in_progress_timeout=60)  # fmt: skip
    copies = [(topics.device_jobs("cam-1", "iris"), envelope)] * 2  # a QoS 1 duplicate
    collector.process(copies)
    collector.process([(topics.device_jobs("cam-2", "iris"), slow_envelope)])
    for seq, status in enumerate((JobStatus.QUEUED, JobStatus.IN_PROGRESS, JobStatus.FAILED), 1):
        update = build_job_status(job, "cam-1", status, model="iris", seq=seq, ts=T0,
                                  reason="health check failed" if seq == 3 else None)  # fmt: skip
        collector.process([(topics.job_status("cam-1", job), update)] * 2)
    running = build_job_status(slow, "cam-2", JobStatus.IN_PROGRESS, model="iris", seq=1, ts=T0)
    collector.process([(topics.job_status("cam-2", slow), running)])
    assert collector.time_out_silent(T0 + dt.timedelta(seconds=91)) == [(slow, "cam-2")]
    assert collector.time_out_silent(T0 + dt.timedelta(seconds=200)) == []

    trail = audit.entries(store)
    assert [(e.kind, e.payload.get("job_id")) for e in trail] == [
        ("trust", None), ("command", job), ("command", slow), ("outcome", job),
        ("outcome", slow),
    ]  # fmt: skip
    rotation, command, _slow, failed, timed_out = trail
    assert rotation.payload["command_keys"] == [key_id(ops.public_key())]
    assert rotation.key_id == key_id(root.public_key())
    assert command.key_id == key_id(ops.public_key())
    assert command.payload["envelope"].encode() == envelope
    assert (failed.device, failed.payload["status"]) == ("cam-1", "FAILED")
    assert failed.payload["reason"] == "health check failed"
    assert (timed_out.device, timed_out.payload["status"]) == ("cam-2", "TIMED_OUT")
    assert timed_out.payload["marked_by"] == "collector"
    verdict = audit.verify(store, roots=[root.public_key()])  # the root-signed document's keys
    assert verdict.ok
    assert verdict.signatures == 2
    assert verdict.keys == [key_id(ops.public_key())]
    # a trust document the root did not sign, appended by anyone who can write to the store,
    # names no key: a command signed by the forger's key is a signature problem
    forger = generate_private_key()
    forged_trust = make_trust(version=2, root_keys=[forger.public_key()],
                              bundle_keys=[forger.public_key()],
                              command_keys=[forger.public_key()], signers=[forger],
                              issued_at=T0)  # fmt: skip
    audit.append(store, "trust", {"version": 2, "document": forged_trust.decode()}, at=T0)
    _, forged = make_command("rollback", "iris", {"device": "cam-1"}, forger, issued_at=T0)
    audit.append(store, "command", {"job_id": "forged", "envelope": forged.decode()}, at=T0)
    caught = audit.verify(store, roots=[root.public_key()])
    assert not caught.ok
    assert caught.problem is not None
    assert caught.problem.what == "signature"
    unchecked = audit.verify(store)  # no roots, no keys: the store's own keys prove nothing
    assert unchecked.keys == []
    assert unchecked.signatures == 0
    store.close()


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with mosquitto(tmp_path_factory.mktemp("broker")) as running:
        yield running


@pytest.fixture(scope="module")
def postgres_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("psycopg", reason="PostgreSQL tests need psycopg (edgepack[postgres])")
    with postgres_server(tmp_path_factory) as dsn:
        yield dsn


def test_two_collectors_on_one_postgres_append_one_chain(broker: Broker, postgres_dsn: str) -> None:
    dsn = fresh_database(postgres_dsn, f"audit_share_{uuid.uuid4().hex[:8]}")
    options = BrokerOptions(port=broker.port, prefix=f"edgepack/t{uuid.uuid4().hex[:8]}")
    stores = [open_store(dsn) for _ in range(2)]
    collectors = [Collector(options, store, share="collectors", client_id=f"audit-{n}").start()
                  for n, store in enumerate(stores)]  # fmt: skip
    try:
        topics = collectors[0].topics
        finals = []
        for device in (f"dev-{n}" for n in range(8)):
            for job in (f"deploy-20261201T0900{j:02d}-00000{j}" for j in range(5)):
                payload = build_job_status(job, device, JobStatus.SUCCEEDED, model="iris",
                                           version_after=2, seq=2, ts=T0)  # fmt: skip
                finals.append((topics.job_status(device, job), payload))
        client = connect(options)
        try:
            for topic, payload in finals + finals[::3]:  # every third one twice, as QoS 1 may
                publish_and_wait(client, topic, payload, retain=False)
        finally:
            client.disconnect()
            client.loop_stop()
        expected = len(finals) + len(finals[::3])
        deadline = time.monotonic() + 30
        while sum(c.stats.written + c.stats.duplicates for c in collectors) < expected:
            assert time.monotonic() < deadline, [c.stats for c in collectors]
            time.sleep(0.05)
        assert all(c.stats.written > 0 for c in collectors)  # both wrote entries
        trail = audit.entries(stores[0], kind="outcome")
        assert len(trail) == len(finals)
        assert [e.seq for e in audit.entries(stores[0])] == list(range(1, len(finals) + 1))
        assert audit.verify(stores[1]).ok
    finally:
        for collector in collectors:
            collector.stop(drain_timeout=5)
        for store in stores:
            store.close()
