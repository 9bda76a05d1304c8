"""The audit trail: one hash chain whoever writes, idempotent facts, and tampering named.

The tamper tests edit, delete and reorder entries directly in the SQLite file (as an operator
with write access to it could) and check that ``edgepack-fleet audit verify`` exits 1 naming the
entry and what was done to it; a command envelope whose signature was forged fails too.
PostgreSQL runs the concurrent appends once (tests/postgres.py).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import KeyPair
from postgres import fresh_database, postgres_server

from edgepack.fleet import _audit as audit
from edgepack.fleet import _audit_facts as facts
from edgepack.fleet._cli import cli
from edgepack.fleet._database import FleetStore, open_store
from edgepack.formats.commands import CommandKind, make_command, read_command
from edgepack.formats.keys import load_private_key, load_public_key
from edgepack.formats.messages import JobStatus, JobUpdate

T0 = dt.datetime(2026, 12, 1, 9, 0, tzinfo=dt.timezone.utc)


def at(minutes: float) -> dt.datetime:
    return T0 + dt.timedelta(minutes=minutes)


def invoke(store: Path, *args: str) -> Any:
    return CliRunner().invoke(cli, ["--store", str(store), *args], obj={"clock": lambda: at(60)})


def signed_command(keys: KeyPair, version: int = 2) -> Any:
    key = load_private_key(keys.private.read_bytes())
    bundles = {"x86_64-cpu": {"url": "http://127.0.0.1:1/b", "sha256": "a" * 64, "size": 10}}
    _job, raw = make_command(CommandKind.DEPLOY, "iris", {"group": "eu"}, key, version=version,
                             bundles=bundles, issued_at=at(1))  # fmt: skip
    return read_command(raw, None)


def fill(store: FleetStore, keys: KeyPair) -> list[audit.AuditEntry]:
    """Six entries: a build, a command, two outcomes, and two of another part's kind."""
    made = [
        facts.record_build(store, "iris", 2, {"x86_64-cpu": {"sha256": "b" * 64, "size": 10}},
                           at(0)),
        facts.record_command(store, signed_command(keys), by="cli"),
    ]  # fmt: skip
    for n, device in enumerate(("cam-1", "cam-2")):
        update = JobUpdate(job_id=made[1].payload["job_id"], device=device, model="iris",
                           status=JobStatus.SUCCEEDED, seq=3, step=None, reason=None,
                           version_before=1, version_after=2, ts=at(2 + n))  # fmt: skip
        entry = facts.record_outcome(store, update, at(2 + n))
        assert entry is not None
        made.append(entry)
    for n in range(2):
        made.append(audit.append(store, "policy", {"n": n}, at=at(5 + n), model="iris"))
    return made


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[tuple[Path, FleetStore]]:
    path = tmp_path / "fleet.db"
    store = open_store(path)
    yield path, store
    store.close()


def test_entries_chain_and_a_known_fact_is_not_appended_twice(
    sqlite_store: tuple[Path, FleetStore], keys: KeyPair
) -> None:
    _path, store = sqlite_store
    made = fill(store, keys)
    assert [e.seq for e in made] == [1, 2, 3, 4, 5, 6]
    assert made[0].prev_hash == audit.GENESIS
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(made))
    again = facts.record_command(store, signed_command(keys), by="collector")
    assert again.seq != made[1].seq  # a new command (another job id) is a new fact...
    same = facts.record_command(store, read_command(made[1].payload["envelope"].encode(), None),
                                by="collector")  # fmt: skip
    assert same == made[1]  # ...the same job id is not appended again
    assert audit.entries(store, kind="outcome", device="cam-2")[0].seq == 4
    assert [e.seq for e in audit.entries(store, model="iris", since=at(3), until=at(5))] == [4, 5]
    assert [e.seq for e in audit.entries(store, limit=2)] == [6, 7]
    verdict = audit.verify(store, [load_public_key(keys.public.read_bytes())])
    assert verdict.ok
    assert verdict.checked == 7
    assert verdict.signatures == 2
    assert (verdict.head_seq, verdict.head_hash) == (7, again.hash)


def test_bad_entries_are_refused_with_the_reason(sqlite_store: tuple[Path, FleetStore]) -> None:
    _path, store = sqlite_store
    with pytest.raises(ValueError, match="kind 'Bad Kind'"):
        audit.append(store, "Bad Kind", {}, at=at(0))
    with pytest.raises(ValueError, match="not plain JSON"):
        audit.append(store, "policy", {"x": float("nan")}, at=at(0))
    with pytest.raises(ValueError, match="aware datetime"):
        audit.append(store, "policy", {}, at=dt.datetime(2026, 1, 1))
    assert audit.entries(store) == []  # nothing half-written


def _sql(path: Path, *statements: str) -> None:
    with sqlite3.connect(path) as conn:
        for statement in statements:
            conn.execute(statement)


def _verify(path: Path, keys: KeyPair, *extra: str) -> tuple[int, dict[str, Any]]:
    result = invoke(path, "audit", "verify", "--json", "--key-file", str(keys.public), *extra)
    return result.exit_code, json.loads(result.output)


@pytest.mark.parametrize(
    ("tamper", "seq", "what"),
    [
        # an edited payload, its hash left alone
        (["UPDATE audit_log SET payload = replace(payload, 'SUCCEEDED', 'FAILED') WHERE seq = 3"],
         3, "altered"),
        # an edited entry with a hash made up to look right
        (["UPDATE audit_log SET device = 'cam-9', hash = 'f' || substr(hash, 2) WHERE seq = 4"],
         4, "altered"),
        (["DELETE FROM audit_log WHERE seq = 4"], 4, "removed"),
        # two entries swapped
        (["UPDATE audit_log SET seq = 100 WHERE seq = 3",
          "UPDATE audit_log SET seq = 3 WHERE seq = 4",
          "UPDATE audit_log SET seq = 4 WHERE seq = 100"], 3, "reordered"),
        # an entry deleted and the rest renumbered to close the gap
        (["DELETE FROM audit_log WHERE seq = 5", "UPDATE audit_log SET seq = 5 WHERE seq = 6"],
         5, "removed"),
        # the whole chain moved up by two
        (["UPDATE audit_log SET seq = seq + 1000", "UPDATE audit_log SET seq = seq - 998"],
         1, "removed"),
    ],
)  # fmt: skip
def test_verify_names_the_entry_altered_removed_or_reordered(
    sqlite_store: tuple[Path, FleetStore], keys: KeyPair, tamper: list[str], seq: int, what: str
) -> None:
    path, store = sqlite_store
    fill(store, keys)
    code, before = _verify(path, keys)
    assert code == 0
    assert before["ok"]
    assert before["head"]["seq"] == 6
    _sql(path, *tamper)
    code, after = _verify(path, keys)
    assert code == 1
    assert not after["ok"]
    assert (after["problem"]["seq"], after["problem"]["what"]) == (seq, what), after["problems"]
    human = invoke(path, "audit", "verify", "--key-file", str(keys.public))
    assert human.exit_code == 1
    assert f"broken at entry {seq}: {what}" in human.output


def test_an_entry_rewritten_with_its_hash_recomputed_is_named(
    sqlite_store: tuple[Path, FleetStore], keys: KeyPair
) -> None:
    path, store = sqlite_store
    fill(store, keys)
    e = audit.entries(store)[3]  # seq 4: rewrite it whole, as someone who knows the format would
    rewritten = audit.entry_hash(e.seq, e.at, e.kind, e.model, e.version, "cam-9", e.key_id,
                                 e.fact, e.payload_text, e.prev_hash)  # fmt: skip
    _sql(path, f"UPDATE audit_log SET device = 'cam-9', hash = '{rewritten}' WHERE seq = 4")
    code, out = _verify(path, keys)
    assert code == 1
    assert (out["problem"]["seq"], out["problem"]["what"]) == (4, "altered")
    assert "entry 5 chains to its original" in out["problem"]["detail"]


def test_a_cut_end_or_a_rewritten_chain_shows_against_a_kept_head(
    sqlite_store: tuple[Path, FleetStore], keys: KeyPair
) -> None:
    path, store = sqlite_store
    fill(store, keys)
    _code, kept = _verify(path, keys)
    head = f"{kept['head']['seq']}:{kept['head']['hash']}"
    _sql(path, "DELETE FROM audit_log WHERE seq = 6")  # the last entry: the chain alone holds
    assert _verify(path, keys)[0] == 0
    code, out = _verify(path, keys, "--head", head)
    assert code == 1
    assert (out["problem"]["seq"], out["problem"]["what"]) == (6, "removed")


def test_a_forged_command_signature_fails(
    sqlite_store: tuple[Path, FleetStore], keys: KeyPair, other_keys: KeyPair
) -> None:
    path, store = sqlite_store
    genuine = facts.record_command(store, signed_command(keys), by="cli")
    forged = signed_command(other_keys)  # an attacker's key, claiming to be an operator
    facts.record_command(store, forged, by="collector")
    code, out = _verify(path, keys)
    assert code == 1
    assert out["problem"]["what"] == "signature"
    assert out["problem"]["seq"] == genuine.seq + 1
    assert out["signatures_checked"] == 2
    assert len(out["problems"]) == 1  # the genuine one verifies


def test_appends_from_two_threads_and_two_connections_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    open_store(path).close()
    _race(str(path))


def _race(url: str, writers: int = 2, each: int = 40) -> None:
    stores = [open_store(url) for _ in range(writers)]
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            for i in range(each):
                audit.append(stores[n], "policy", {"writer": n, "i": i}, at=at(i),
                             fact=f"w{n}:{i}" if i % 2 else None)  # fmt: skip
                if i % 10 == 0:  # a duplicate fact from the other writer changes nothing
                    audit.append(stores[n], "policy", {"dup": i}, at=at(i), fact=f"dup:{i}")
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert not any(t.is_alive() for t in threads)
    found = audit.entries(stores[0])
    assert [e.seq for e in found] == list(range(1, writers * each + 4 + 1))
    verdict = audit.verify(stores[0])
    assert verdict.ok, verdict.problems
    for store in stores:
        store.close()


@pytest.fixture(scope="session")
def postgres_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("psycopg", reason="PostgreSQL tests need psycopg (edgepack[postgres])")
    with postgres_server(tmp_path_factory) as dsn:
        yield dsn


def test_postgres_appends_from_two_stores_keep_one_chain(postgres_dsn: str) -> None:
    url = fresh_database(postgres_dsn, f"audit_{os.getpid()}")
    open_store(url).close()
    _race(url)
    store = open_store(url)
    entry = audit.append(store, "policy", {"text": "\u00e9\u0000"}, at=at(0))  # JSONB would refuse
    assert audit.entries(store, limit=1) == [entry]
    assert audit.verify(store).ok
    store.close()


def test_audit_cli_filters_and_exports(
    sqlite_store: tuple[Path, FleetStore], keys: KeyPair, tmp_path: Path
) -> None:
    path, store = sqlite_store
    fill(store, keys)
    signer = json.loads(invoke(path, "audit", "--kind", "command", "--json").output)
    made_key = signer[0]["key_id"]
    by_key = invoke(path, "audit", "--key", made_key[:16], "--json")  # as the table shows it
    assert [e["seq"] for e in json.loads(by_key.output)] == [2]
    assert json.loads(invoke(path, "audit", "--key", made_key, "--json").output)[0]["seq"] == 2
    listed = invoke(path, "audit", "--device", "cam-1", "--json")
    assert listed.exit_code == 0, listed.output
    assert [e["seq"] for e in json.loads(listed.output)] == [3]
    table = invoke(path, "audit", "--model", "iris", "--kind", "command")
    assert table.exit_code == 0
    assert "deploy → group eu" in table.output
    out = tmp_path / "trail.jsonl"
    exported = invoke(path, "audit", "--export", str(out))
    assert exported.exit_code == 0
    assert "wrote 6 audit entries" in exported.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [e["seq"] for e in lines] == [1, 2, 3, 4, 5, 6]
    assert lines[1]["payload"]["envelope"]
    prev = "0" * 64  # anyone with the export checks it as docs/protocol.md §17 says
    for e in lines:
        payload = json.dumps(e["payload"], sort_keys=True, separators=(",", ":"))
        content = ["edgepack-audit/1", e["seq"], e["at"], e["kind"], e["model"], e["version"],
                   e["device"], e["key_id"], e["fact"], payload, prev]  # fmt: skip
        digest = hashlib.sha256(json.dumps(content, separators=(",", ":")).encode()).hexdigest()
        assert (e["prev_hash"], e["hash"]) == (prev, digest)
        prev = e["hash"]
    bad = invoke(path, "audit", "--since", "yesterday")
    assert bad.exit_code == 2
    assert "neither an ISO 8601 time nor an age" in bad.output
    missing = invoke(tmp_path / "nope.db", "audit")
    assert missing.exit_code == 1
    assert "no fleet store" in missing.output


def test_record_build_reads_the_bundles_of_a_directory(
    tmp_path: Path, iris_bundles: dict[str, Path], keys: KeyPair
) -> None:
    dist = tmp_path / "dist"
    dist.mkdir()
    for name in ("v1", "v2", "arm64-v2"):
        os.symlink(iris_bundles[name], dist / iris_bundles[name].name)
    path = tmp_path / "fleet.db"
    result = invoke(path, "audit", "record-build", str(dist), "--json")
    assert result.exit_code == 0, result.output
    builds = json.loads(result.output)
    assert [(b["model"], b["version"]) for b in builds] == [("iris", 1), ("iris", 2)]
    v2 = builds[1]["payload"]["profiles"]
    assert set(v2) == {"x86_64-cpu", "arm64-cpu"}
    signer = load_public_key(keys.public.read_bytes())
    from edgepack.formats.keys import key_id

    for profile in v2.values():
        assert profile["signer"] == key_id(signer)
        assert profile["parity"]["passed"] is True
        assert profile["precision"]
        assert len(profile["sha256"]) == 64
        assert profile["size"] > 0
        assert len(profile["source"]["sha256"]) == 64
    assert builds[1]["key_id"] == key_id(signer)
    again = invoke(path, "audit", "record-build", str(dist), "--json")
    assert [b["seq"] for b in json.loads(again.output)] == [1, 2]  # the same build, once
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = invoke(path, "audit", "record-build", str(empty))
    assert refused.exit_code == 1
    assert "no bundles" in refused.output
