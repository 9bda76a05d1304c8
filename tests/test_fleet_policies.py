"""Retirement and remediation policies: the file, the evaluation, the actions and approvals.

The evaluation is a pure function of (store, rules, now): reports go into a real SQLite store
with the times a test picks, and the clock is injected. Rollbacks go through a recording sender
here; tests/test_fleet_policies_e2e.py sends them through a real mosquitto to a real agent.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from postgres import fresh_database, postgres_server

from edgepack.fleet import _cli as fleet_cli
from edgepack.fleet._audit import entries
from edgepack.fleet._cli import cli
from edgepack.fleet._database import FleetStore, PolicyActionRow, open_store
from edgepack.fleet._policies import PolicyEngine, Rule, approve, evaluate, parse_policies, reject
from edgepack.fleet.exceptions import PolicyError

NOW = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.timezone.utc)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> dt.datetime:
        return self.now


class Sender:
    """Records what it would sign and send."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, list[tuple[str, str]]]] = []

    def send(
        self,
        kind: str,
        model: str,
        jobs: Sequence[tuple[str, str]],
        *,
        version: int | None = None,
        bundles: Mapping[str, Any] | None = None,
    ) -> None:
        self.sent.append((kind, model, list(jobs)))


_ticks = iter(range(1, 10_000))


def _state(store: FleetStore, device: str, active: int, previous: int | None = 1) -> None:
    ts = (NOW + dt.timedelta(seconds=next(_ticks))).isoformat()
    store.record_state(
        device,
        {
            "schema": 1,
            "device": device,
            "ts": ts,
            "online": True,
            "profile": "x86_64-cpu",
            "groups": [],
            "models": {"churn": {"active": active, "previous": previous}},
        },
        NOW,
    )


_seq = iter(range(1, 10_000))


def _quality(
    store: FleetStore,
    device: str,
    version: int,
    accuracy: float | None,
    *,
    estimate: float | None = None,
    at: dt.datetime = NOW,
    variant: str | None = None,
) -> None:
    payload: dict[str, Any] = {
        "model": "churn",
        "version": version,
        "status": "ok",
        "labeled": 0 if accuracy is None else 200,
        "metrics": None if accuracy is None else {"accuracy": accuracy},
        "estimated": None if estimate is None else {"accuracy": estimate},
    }
    if variant:
        payload["variant"] = variant
    store.record_event("quality", device, payload, next(_seq), at)


def _drift(
    store: FleetStore, device: str, version: int, status: str, at: dt.datetime = NOW
) -> None:
    payload = {"model": "churn", "version": version, "status": status, "features": []}
    store.record_event("drift", device, payload, next(_seq), at)


@pytest.fixture
def store(tmp_path: Path) -> FleetStore:
    opened = open_store(tmp_path / "fleet.db")
    for name in ("cam-1", "cam-2", "cam-3"):
        _state(opened, name, 2)
    return opened


FLAG = """
[[rule]]
name = "accuracy-floor"
model = "churn"
quality_below = 0.85
"""


def test_a_quality_rule_flags_a_version_once_with_its_numbers_in_the_audit_trail(
    store: FleetStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    _quality(store, "cam-1", 2, 0.70)
    _quality(store, "cam-2", 2, 0.95)
    _quality(store, "cam-3", 2, None, estimate=0.60)  # no labels: the CBPE estimate counts
    _quality(store, "cam-3", 3, 0.10, variant="candidate")  # an experiment's: not v3's verdict
    rules = parse_policies(FLAG)
    (finding,) = evaluate(store, rules, NOW)
    assert (finding.model, finding.version, finding.devices) == ("churn", 2, ("cam-1", "cam-3"))
    assert finding.figures["values"]["cam-3"] == {"value": 0.6, "estimated": True, "status": "ok"}
    clock = Clock()
    engine = PolicyEngine(store, rules, clock=clock)
    (action,) = engine.run()
    assert (action.rule, action.state, action.version) == ("accuracy-floor", "flagged", 2)
    clock.now += dt.timedelta(minutes=1)
    assert engine.run() == []  # once per (rule, model, version)
    (entry,) = entries(store, kind="policy.flag")
    assert (entry.model, entry.version) == ("churn", 2)
    assert entry.payload["devices"] == ["cam-1", "cam-3"]
    assert entry.payload["figures"]["values"]["cam-1"]["value"] == 0.7
    assert entry.payload["figures"]["threshold"] == 0.85
    # reports older than the lookback (1 h by default) are not read
    assert evaluate(store, rules, NOW + dt.timedelta(hours=2)) == []
    listed = CliRunner().invoke(cli, ["--store", store.name, "policy", "list", "--json"])  # type: ignore[attr-defined]
    assert listed.exit_code == 0, listed.output
    assert [r["state"] for r in json.loads(listed.output)] == ["flagged"]
    monkeypatch.setattr(fleet_cli.console, "width", 400)  # one line per entry
    trail = CliRunner().invoke(cli, ["--store", store.name, "audit"], obj={"clock": Clock()})  # type: ignore[attr-defined]
    assert trail.exit_code == 0, trail.output
    assert "flagged: rule accuracy-floor: churn v2 accuracy < 0.85" in trail.output


def test_a_drift_rule_counts_devices_drifting_for_their_last_windows(store: FleetStore) -> None:
    for minute in range(3):
        at = NOW - dt.timedelta(minutes=3 - minute)
        _drift(store, "cam-1", 2, "drift", at)
        _drift(store, "cam-2", 2, "drift" if minute else "ok", at)  # the last 2 of 3 drifted
        _drift(store, "cam-3", 2, "ok", at)
    two = parse_policies('[[rule]]\nname = "d"\ndrift_share = 0.5\ndrift_windows = 2\n')
    (finding,) = evaluate(store, two, NOW)
    assert finding.devices == ("cam-1", "cam-2")
    assert finding.figures["drift_share"] == pytest.approx(2 / 3)
    three = parse_policies('[[rule]]\nname = "d"\ndrift_share = 0.5\ndrift_windows = 3\n')
    assert evaluate(store, three, NOW) == []  # only cam-1 drifted three times: 1/3
    _state(store, "cam-4", 2)  # on v2 without a report yet: one of its devices all the same
    _state(store, "cam-5", 2)
    assert evaluate(store, two, NOW) == []  # 2 of 5


def test_a_rollback_rule_with_approval_waits_for_an_operator(store: FleetStore, keys: Any) -> None:
    _quality(store, "cam-1", 2, 0.5)
    _quality(store, "cam-2", 2, 0.6)
    _state(store, "cam-2", 3)  # moved on since: nothing to roll back there
    rules = parse_policies(FLAG + 'action = "rollback"\napproval = true\n')
    clock = Clock()
    (pending,) = PolicyEngine(store, rules, clock=clock).run()  # no key needed to ask
    assert pending.state == "pending"
    runner = CliRunner()
    shown = runner.invoke(cli, ["--store", store.name, "policy", "pending"])  # type: ignore[attr-defined]
    assert shown.exit_code == 0, shown.output
    assert pending.action_id in shown.output
    sender = Sender()
    clock.now += dt.timedelta(minutes=5)
    done = approve(store, pending.action_id, sender, "ops-key-id", clock=clock)
    assert done.state == "rolled_back"
    assert done.decided_by == "ops-key-id"
    ((kind, model, jobs),) = sender.sent
    assert (kind, model, [d for d, _j in jobs]) == ("rollback", "churn", ["cam-1"])
    assert done.data["skipped"] == ["cam-2"]
    assert [e.kind for e in entries(store, model="churn")] == [
        "policy.pending",
        "policy.approve",
        "policy.rollback",
    ]
    approval = entries(store, kind="policy.approve")[0]
    assert (approval.key_id, approval.at) == ("ops-key-id", clock.now)
    with pytest.raises(PolicyError, match="is rolled_back, not pending"):
        approve(store, pending.action_id, sender, "ops-key-id", clock=clock)
    with pytest.raises(PolicyError, match="no policy action 'policy-nope'"):
        reject(store, "policy-nope", clock=clock)
    assert len(sender.sent) == 1


def test_a_rejected_action_sends_nothing_and_is_recorded(store: FleetStore) -> None:
    _quality(store, "cam-1", 2, 0.5)
    rules = parse_policies(FLAG + 'action = "rollback"\napproval = true\n')
    (pending,) = PolicyEngine(store, rules, clock=Clock()).run()
    result = CliRunner().invoke(
        cli,
        ["--store", store.name, "policy", "reject", pending.action_id],  # type: ignore[attr-defined]
        obj={"clock": Clock()},
    )
    assert result.exit_code == 0, result.output
    row = store.policy_action(pending.action_id)
    assert row is not None
    assert row.state == "rejected"
    assert [e.kind for e in entries(store)][-1] == "policy.reject"
    assert PolicyEngine(store, rules, clock=Clock()).run() == []  # not asked again
    again = CliRunner().invoke(cli, ["--store", store.name, "policy", "reject", pending.action_id])  # type: ignore[attr-defined]
    assert again.exit_code == 1
    assert "is rejected, not pending" in again.output


def test_a_rule_that_rolls_back_without_approval_needs_a_key(store: FleetStore) -> None:
    rules = parse_policies(FLAG + 'action = "rollback"\n')
    with pytest.raises(PolicyError, match="--policy-key"):
        PolicyEngine(store, rules)
    _quality(store, "cam-1", 2, 0.5)
    sender = Sender()
    (done,) = PolicyEngine(store, rules, sender=sender, clock=Clock(), key_id="k1").run()
    assert done.state == "rolled_back"
    assert [d for d, _j in sender.sent[0][2]] == ["cam-1"]
    assert [e.kind for e in entries(store)] == ["policy.act", "policy.rollback"]


def test_an_interrupted_rollback_is_sent_again_with_the_same_job_ids(store: FleetStore) -> None:
    class Failing(Sender):
        def send(self, *args: Any, **kwargs: Any) -> None:
            raise ConnectionError("broker down")

    _quality(store, "cam-1", 2, 0.5)
    rules = parse_policies(FLAG + 'action = "rollback"\n')
    with pytest.raises(ConnectionError):
        PolicyEngine(store, rules, sender=Failing(), clock=Clock()).run()
    (row,) = store.policy_actions()
    assert row.state == "rolling_back"  # recorded before it was sent
    with pytest.raises(PolicyError, match="is rolling_back, not pending"):
        reject(store, row.action_id, clock=Clock())  # sent, perhaps: too late to say no
    sender = Sender()
    (done,) = PolicyEngine(store, rules, sender=sender, clock=Clock()).run()
    assert done.state == "rolled_back"
    assert sender.sent[0][2] == sorted(row.data["jobs"].items())


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (
            '[[rule]]\nname = "a"\nquality_belwo = 0.8\n',
            3,
            "unknown key 'quality_belwo' (did you mean 'quality_below'?)",
        ),
        (
            '[[rule]]\nname = "a"\n\nquality_below = "high"\n',
            4,
            "quality_below must be a number in [0, 1], got 'high'; write e.g. quality_below = 0.85",
        ),
        ('[[rule]]\nname = "a"\n', 1, "has no condition; a rule has exactly one of"),
        (
            '[[rule]]\nname = "a"\nquality_below = 0.8\ndrift_share = 0.2\n',
            4,
            "has quality_below and drift_share",
        ),
        ("[[rule]]\nquality_below = 0.8\n", 1, 'has no name; write e.g. name = "accuracy-floor"'),
        (
            '[[rule]]\nname = "a"\nquality_below = 0.8\napproval = true\n',
            4,
            'approval applies to action = "rollback"',
        ),
        (
            '[[rule]]\nname = "a"\ndrift_share = 0.3\naction = "retire"\n',
            4,
            "action must be one of flag, rollback, got 'retire'; write e.g. action = \"flag\"",
        ),
        (
            '[[rule]]\nname = "a"\ndrift_share = 0.3\nlookback = "soon"\n',
            4,
            'lookback must be a duration such as "1h"',
        ),
        (
            '[[rule]]\nname = "a"\ndrift_share = 0.3\n[[rule]]\nname = "a"\nmae_above = 1\n',
            5,
            "a second rule named 'a'",
        ),
        (
            '[[rule]]\nname = "a"\ndrift_share = 0.3\nmetric = "f1"\n',
            4,
            "metric goes with quality_below",
        ),
        ('[[rule]]\nname = "a"\ndrift_share = 0.3\n[alerts]\nx = 1\n', 4, "unknown 'alerts'"),
    ],
    ids=[
        "typo",
        "type",
        "no-condition",
        "two-conditions",
        "no-name",
        "approval-on-flag",
        "bad-action",
        "bad-duration",
        "duplicate",
        "metric-on-drift",
        "other-table",
    ],
)
def test_a_malformed_policy_file_names_the_line_and_what_to_write(
    text: str, line: int, message: str
) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policies(text, "fleet.toml")
    assert f"fleet.toml line {line}" in str(caught.value)
    assert message in str(caught.value)


def test_a_policy_file_that_is_not_toml_is_refused_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "policies.toml"
    path.write_text('[[rule]]\nname = "a"\nquality_below = \n')
    result = CliRunner().invoke(cli, ["policy", "check", str(path)])
    assert result.exit_code == 1
    assert "not valid TOML" in result.output
    assert "line 3" in result.output
    path.write_text(
        FLAG + '\n[[rule]]\nname = "drifting"\ndrift_share = 0.3\ndrift_windows = 3\n'
        'action = "rollback"\napproval = true\n'
    )
    shown = CliRunner().invoke(cli, ["policy", "check", str(path)])
    assert shown.exit_code == 0, shown.output
    assert "accuracy < 0.85" in shown.output
    assert "rollback (after approval)" in shown.output
    rule = parse_policies(path.read_text())[1]
    assert rule == Rule(
        "drifting", "drift_share", 0.3, drift_windows=3, action="rollback", approval=True
    )


def test_the_collector_refuses_a_bad_policy_file_before_it_connects(tmp_path: Path) -> None:
    bad = tmp_path / "policies.toml"
    bad.write_text('[[rule]]\nname = "a"\ndrift_share = 0.3\naction = "rollback"\n')
    db = str(tmp_path / "fleet.db")
    args = ["--broker", "127.0.0.1:9", "--store", db, "collector", "--policies", str(bad)]
    unsigned = CliRunner().invoke(cli, args)
    assert unsigned.exit_code == 1
    assert "rule a rolls back without approval" in unsigned.output
    assert "--policy-key" in unsigned.output
    bad.write_text('[[rule]]\nname = "a"\ndrift_shar = 0.3\n')
    typo = CliRunner().invoke(cli, args)
    assert typo.exit_code == 1
    assert "line 3" in typo.output
    alone = CliRunner().invoke(cli, [*args[:5], "--policy-key", str(bad)])
    assert alone.exit_code == 2
    assert "give the policy file too" in alone.output


@pytest.fixture(scope="session")
def postgres_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("psycopg", reason="PostgreSQL tests need psycopg (edgepack[postgres])")
    with postgres_server(tmp_path_factory) as dsn:
        yield dsn


_databases = itertools.count()


@pytest.fixture(params=["sqlite", "postgres"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FleetStore]:
    url = f"sqlite://{tmp_path / 'fleet.db'}"
    if request.param == "postgres":
        dsn = request.getfixturevalue("postgres_dsn")
        url = fresh_database(dsn, f"policies_{os.getpid()}_{next(_databases)}")
    opened = open_store(url)
    yield opened
    opened.close()


def test_policy_actions_act_once_per_rule_and_version_on_both_backends(
    any_store: FleetStore,
) -> None:
    row = PolicyActionRow(
        "policy-1",
        "floor",
        "churn",
        2,
        "rollback",
        "pending",
        NOW,
        NOW,
        None,
        {"devices": ["cam-1"], "figures": {"threshold": 0.85}},
    )
    assert any_store.record_policy_action(row)
    again = PolicyActionRow(
        "policy-2", "floor", "churn", 2, "rollback", "pending", NOW, NOW, None, {}
    )
    assert not any_store.record_policy_action(again)  # the same rule on the same version
    later = NOW + dt.timedelta(minutes=1)
    moved = {**row.data, "jobs": {"cam-1": "rollback-1"}}
    assert any_store.update_policy_action(row, "rolling_back", moved, later, "key-1")
    assert not any_store.update_policy_action(row, "rejected", row.data, later, "key-2")  # stale
    (found,) = any_store.policy_actions("rolling_back")
    assert (found.action_id, found.decided_by, found.updated_at) == ("policy-1", "key-1", later)
    assert found.data == moved
    assert any_store.policy_actions("pending") == []
    assert any_store.policy_action("policy-2") is None


def test_an_approval_whose_send_failed_is_sent_again_by_approving_it_again(
    store: FleetStore,
) -> None:
    class Failing(Sender):
        def send(self, *args: Any, **kwargs: Any) -> None:
            raise ConnectionError("broker down")

    _quality(store, "cam-1", 2, 0.5)
    rules = parse_policies(FLAG + 'action = "rollback"\napproval = true\n')
    (pending,) = PolicyEngine(store, rules, clock=Clock()).run()
    with pytest.raises(ConnectionError):
        approve(store, pending.action_id, Failing(), "k1", clock=Clock())
    interrupted = store.policy_action(pending.action_id)
    assert interrupted is not None
    assert interrupted.state == "rolling_back"
    sender = Sender()
    done = approve(store, pending.action_id, sender, "k1", clock=Clock())
    assert done.state == "rolled_back"
    assert sender.sent[0][2] == sorted(interrupted.data["jobs"].items())  # the same job ids
    assert [e.kind for e in entries(store)].count("policy.approve") == 1


def test_a_drift_share_of_zero_is_refused() -> None:
    """drift_share = 0 would fire (and, as a rollback, act) as soon as one device drifts."""
    with pytest.raises(PolicyError, match="above 0"):
        parse_policies('[[rule]]\nname = "a"\ndrift_share = 0\naction = "rollback"\n')
