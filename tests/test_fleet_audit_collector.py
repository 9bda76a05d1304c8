"""What the collector appends to the audit trail, fed the messages it would hear.

The collector's own parser and writer (``Collector.process``) on a real SQLite store, without a
broker: a command (twice, as QoS 1 may deliver it), job statuses, a key rotation and a silent
device's time-out each leave the entries docs/governance.md promises, once; ``audit verify``
with the trust document's keys then checks the command's signature.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from edgepack.fleet import _audit as audit
from edgepack.fleet._broker import BrokerOptions
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
    verdict = audit.verify(store)  # the keys the recorded trust document names
    assert verdict.ok
    assert verdict.signatures == 2
    assert verdict.keys == [key_id(ops.public_key())]
    store.close()
