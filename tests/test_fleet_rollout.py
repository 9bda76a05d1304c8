"""Staged rollouts without a broker: the parsers, the plan, the verdicts, the lease, and the
controller's step against a real store (SQLite, and PostgreSQL where one can be had).

The controller sends through a recording sender, job updates are written to the store as the
collector writes them, and the clock is injected: every case is a few steps, no sleeps.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from postgres import fresh_database, postgres_server

from edgepack.fleet._database import FleetStore, open_store
from edgepack.fleet._rollout import evaluate, parse_condition, parse_duration, parse_stages, plan
from edgepack.fleet._rollout_controller import (
    TRANSITIONS,
    RolloutController,
    RolloutSpec,
    State,
    drive,
    request,
    start_rollout,
)
from edgepack.fleet.exceptions import BrokerError, LeaseHeldError, RolloutError
from edgepack.formats.messages import (
    JobStatus,
    ModelState,
    build_device_state,
    build_job_status,
    parse_job_status,
)

T0 = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.timezone.utc)
BUNDLES = {
    "x86_64-cpu": {"url": "http://127.0.0.1:9/m.edgepack", "sha256": "0" * 64, "size": 1},
    "arm64-cpu": {"url": "http://127.0.0.1:9/n.edgepack", "sha256": "1" * 64, "size": 1},
}


# -- the operator's words ----------------------------------------------------------------------


def test_stages_durations_and_conditions_parse() -> None:
    assert [str(s) for s in parse_stages("1%, 10%,50%,100%")] == ["1%", "10%", "50%", "100%"]
    assert parse_stages("cam-1+cam-7,100%")[0].devices == ("cam-1", "cam-7")
    assert [parse_duration(t) for t in ("10m", "30s", "1h", "0", "1.5d")] == [
        600, 30, 3600, 0, 129600]  # fmt: skip
    c = parse_condition("failed>2%")
    assert (c.metric, c.op, c.value, c.unit, str(c)) == ("failed", ">", 0.02, "%", "failed>2%")
    assert str(parse_condition(" p95_latency >= 1.2x ")) == "p95_latency>=1.2x"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("10%,,100%", "empty stage"),
        ("0%,100%", "above 0%"),
        ("10%,150%", "at most 100%"),
        ("50%,10%", "must grow"),
        ("ten%", "not a percentage"),
        ("cam 1,100%", "neither a share"),
    ],
)
def test_bad_stages_say_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(RolloutError, match=says):
        parse_stages(text)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("latency>2", "unknown metric 'latency'; known: failed, error_rate, p95_latency"),
        ("failed>1.2x", "job failures have no old-version figure"),
        ("p95_latency>5%", "p95_latency is not a share"),
        ("failed=2%", "is not METRIC OP VALUE"),
        ("drift_share>", "is not METRIC OP VALUE"),
    ],
)
def test_bad_conditions_say_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(RolloutError, match=says):
        parse_condition(text)
    with pytest.raises(RolloutError, match="not a duration"):
        parse_duration("ten minutes")


# -- the plan ----------------------------------------------------------------------------------


def test_the_plan_is_deterministic_cumulative_and_spread_across_profiles() -> None:
    profiles = {f"x-{i}": "x86" for i in range(30)} | {f"a-{i}": "arm" for i in range(3)}
    stages = parse_stages("1%,10%,50%,100%")
    first = plan("r1", profiles, stages)
    assert first == plan("r1", profiles, stages)  # the same rollout picks the same devices
    assert first != plan("r2", profiles, stages)  # another rollout another order
    per = {(p, k): 0 for p in ("x86", "arm") for k in range(4)}
    for device, stage in first.items():
        assert stage is not None
        per[(profiles[device], stage)] += 1
    assert [per[("x86", k)] for k in range(4)] == [1, 2, 12, 15]  # ceil of 1%, 10%, 50%, 100%
    assert [per[("arm", k)] for k in range(4)] == [1, 0, 1, 1]  # at least one in stage 1


def test_explicit_devices_come_first_and_shares_count_them() -> None:
    profiles = {f"d-{i}": "x86" for i in range(10)}
    chosen = plan("r", profiles, parse_stages("d-7+d-3,50%"))
    assert (chosen["d-7"], chosen["d-3"]) == (0, 0)
    assert sum(1 for s in chosen.values() if s == 1) == 3  # 50% of 10, two already taken
    assert sum(1 for s in chosen.values() if s is None) == 5  # beyond the last stage
    with pytest.raises(RolloutError, match="'nope', which is not in the rollout's group"):
        plan("r", profiles, parse_stages("nope,100%"))


def test_verdicts_compare_new_with_old_and_fall_back_to_the_baseline() -> None:
    conditions = [parse_condition(t) for t in ("p95_latency>1.2x", "error_rate>1%", "f1<0.8")]
    figures = {"new": {"p95_latency": 3.0, "error_rate": 0.005, "f1": None},
               "old": {"p95_latency": 2.0, "error_rate": 0.0}}  # fmt: skip
    ratio, errors, f1 = evaluate(conditions, figures)
    assert (ratio.observed, ratio.triggered, ratio.note) == (1.5, True, "new 3 / old 2 = 1.5x")
    assert (errors.triggered, errors.note) == (False, "0.5%")
    assert (f1.triggered, f1.note) == (False, "no data for the new version yet")
    last = {"new": {"p95_latency": 2.2}, "old": {"p95_latency": None}}
    (alone,) = evaluate(conditions[:1], last)
    assert (alone.triggered, alone.note) == (False, "no old-version figure to compare")
    (kept,) = evaluate(conditions[:1], last, {"p95_latency": 2.0})  # the last stage: no old left
    assert kept.observed == pytest.approx(1.1)
    (zero,) = evaluate([parse_condition("error_rate>2x")],
                       {"new": {"error_rate": 0.1}, "old": {"error_rate": 0.0}})  # fmt: skip
    assert zero.triggered
    assert zero.to_json()["observed"] is None  # infinity is not JSON


def test_every_state_but_the_final_ones_has_a_way_out() -> None:
    sources = {state for state, _event in TRANSITIONS}
    assert sources == set(State) - {State.COMPLETED, State.ABORTED}
    assert {TRANSITIONS[(s, "abort")] for s in (State.DEPLOYING, State.SOAKING, State.PAUSED)} == {
        State.ABORTING}  # fmt: skip


# -- the controller against a store ------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


class Recorder:
    """A sender that records what it would send; ``fail`` makes the next send a dead broker."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[tuple[str, str]]]] = []
        self.fail = 0

    def send(
        self, kind: str, model: str, jobs: Sequence[tuple[str, str]], *,
        version: int | None = None, bundles: Mapping[str, Any] | None = None,
    ) -> None:  # fmt: skip
        if self.fail:
            self.fail -= 1
            raise BrokerError("cannot connect to the MQTT broker at 127.0.0.1:9: refused")
        self.sent.append((kind, list(jobs)))


def fleet_of(store: FleetStore, count: int = 10) -> None:
    for i in range(count):
        name = f"d-{i:02d}"
        profile = "arm64-cpu" if i % 5 == 0 else "x86_64-cpu"
        state = build_device_state(name, profile=profile, agent_version="t", groups=["g"],
                                   models={"m": ModelState(1, None, 1)}, health="ok", ts=T0,
                                   session="s")  # fmt: skip
        store.record_state(name, json.loads(state), T0)
        store.assign(name, ["g"], T0)


def finish(store: FleetStore, jobs: Sequence[tuple[str, str]], status: JobStatus,
           before: int | None = 1, after: int = 2) -> None:  # fmt: skip
    for device, job in jobs:
        done = after if status is JobStatus.SUCCEEDED else before
        raw = build_job_status(job, device, status, model="m", seq=9, version_before=before,
                               version_after=done)  # fmt: skip
        store.record_execution(parse_job_status(raw))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FleetStore]:
    opened = open_store(tmp_path / "fleet.db")
    fleet_of(opened)
    yield opened
    opened.close()


def spec(stages: str = "50%,100%", *conditions: str, soak: float = 60) -> RolloutSpec:
    return RolloutSpec("m", 2, "g", tuple(parse_stages(stages)), BUNDLES, soak=soak,
                       conditions=conditions, job_timeout=300)  # fmt: skip


def test_a_dead_broker_records_nothing_and_the_next_step_sends_the_same_job_ids(
    store: FleetStore,
) -> None:
    clock, sender = Clock(), Recorder()
    rid = start_rollout(store, spec(), clock(), rollout_id="r-1").rollout_id
    controller = RolloutController(store, sender, clock=clock, holder="a")
    sender.fail = 1
    with pytest.raises(BrokerError):
        controller.step(rid)
    assert [d.action for d in store.decisions(rid)] == ["start"]  # nothing recorded for it
    waits: list[float] = []
    troubles: list[Exception] = []
    sender.fail = 1
    row = drive(controller, rid, wait=lambda s: waits.append(s) or len(waits) > 1, poll=0.5,
                trouble=troubles.append)  # fmt: skip
    assert "refused" in str(troubles[0])  # handed on, then tried again after the wait
    assert row.state == "deploying"
    kind, jobs = sender.sent[0]
    planned = {d.device: d.deploy_job for d in store.rollout_devices(rid) if d.stage == 0}
    assert kind == "deploy"
    assert dict(jobs) == planned
    assert store.acquire_lease(rid, "b", clock.now, clock.now).holder == "b"  # drive released it


def test_a_device_that_never_answers_times_out_and_aborts(store: FleetStore) -> None:
    clock, sender = Clock(), Recorder()
    rid = start_rollout(store, spec("50%,100%", "failed>0%"), clock()).rollout_id
    controller = RolloutController(store, sender, clock=clock)
    controller.step(rid)
    ((_kind, jobs),) = sender.sent
    finish(store, jobs[1:], JobStatus.SUCCEEDED)  # one device stays silent
    controller.step(rid)
    assert store.rollout(rid).state == "deploying"  # type: ignore[union-attr]
    clock.advance(301)  # past the job timeout
    made = controller.step(rid)
    assert [d.action for d in made] == ["abort", "rollback"]
    assert made[0].figures["jobs"]["timed_out"] == 1
    assert "no final status within the job timeout" in made[0].figures["failures"][0]
    rollback = sender.sent[1]
    assert rollback[0] == "rollback"
    assert len(rollback[1]) == len(jobs) - 1
    finish(store, rollback[1], JobStatus.SUCCEEDED, before=2, after=1)
    (done,) = controller.step(rid)
    assert (done.action, store.rollout(rid).state) == ("done", "aborted")  # type: ignore[union-attr]


def test_abort_requested_without_rollback_and_requests_on_an_ended_rollout(
    store: FleetStore,
) -> None:
    clock, sender = Clock(), Recorder()
    rid = start_rollout(store, spec(), clock()).rollout_id
    controller = RolloutController(store, sender, clock=clock)
    controller.step(rid)
    finish(store, sender.sent[0][1], JobStatus.SUCCEEDED)
    request(store, rid, "abort-no-rollback")
    made = controller.step(rid)
    assert [d.action for d in made] == ["abort", "done"]
    assert "without rollback" in made[0].reason
    assert "no rollback, as asked" in made[1].reason
    assert len(sender.sent) == 1  # no rollback went out
    with pytest.raises(RolloutError, match="already ended \\(aborted\\); nothing to resume"):
        request(store, rid, "resume")
    with pytest.raises(RolloutError, match="no rollout 'nope'"):
        request(store, "nope", "pause")


def test_lease_and_revision_keep_a_second_controller_out(store: FleetStore) -> None:
    clock = Clock()
    rid = start_rollout(store, spec(), clock()).rollout_id
    first = RolloutController(store, Recorder(), clock=clock, holder="ops-a")
    second = RolloutController(store, Recorder(), clock=clock, holder="ops-b")
    first.step(rid)
    with pytest.raises(LeaseHeldError, match=r"driven by ops-a until 2026-12-02 12:01:00 UTC"):
        second.step(rid)
    clock.advance(30)
    first.step(rid)  # a renewal moves the expiry on
    clock.advance(45)
    with pytest.raises(LeaseHeldError, match="until 2026-12-02 12:01:30 UTC"):
        second.acquire(rid)
    first.release(rid)
    second.acquire(rid)
    with pytest.raises(LeaseHeldError, match="driven by ops-b"):
        first.step(rid)
    stale = store.rollout(rid)
    assert stale is not None
    assert store.update_rollout(stale, "deploying", 0, stale.data, [], clock())
    assert not store.update_rollout(stale, "aborted", 0, stale.data, [], clock())  # moved on
    assert store.rollout(rid).state == "deploying"  # type: ignore[union-attr]


def test_start_refuses_an_empty_group_and_a_profile_without_a_bundle(store: FleetStore) -> None:
    with pytest.raises(RolloutError, match="group 'nobody' has no device that reported"):
        start_rollout(store, RolloutSpec("m", 2, "nobody", tuple(parse_stages("100%")), BUNDLES),
                      T0)  # fmt: skip
    only_x86 = {"x86_64-cpu": BUNDLES["x86_64-cpu"]}
    with pytest.raises(RolloutError, match="no bundle for profile\\(s\\) arm64-cpu"):
        start_rollout(store, RolloutSpec("m", 2, "g", tuple(parse_stages("100%")), only_x86), T0)
    assert store.rollouts() == []


@pytest.fixture(scope="module")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("psycopg", reason="PostgreSQL tests need psycopg (edgepack[postgres])")
    with postgres_server(tmp_path_factory) as dsn:
        yield fresh_database(dsn, "rollouts")


def test_a_rollout_on_postgresql(postgres_url: str) -> None:
    store = open_store(postgres_url)
    try:
        fleet_of(store)
        clock, sender = Clock(), Recorder()
        rid = start_rollout(store, spec("50%,100%", "failed>0%", soak=0), clock()).rollout_id
        controller = RolloutController(store, sender, clock=clock, holder="pg")
        controller.step(rid)
        with pytest.raises(LeaseHeldError, match="driven by pg"):
            RolloutController(store, sender, clock=clock, holder="other").step(rid)
        finish(store, sender.sent[0][1], JobStatus.SUCCEEDED)
        made = controller.step(rid)
        assert [d.action for d in made] == ["wait", "advance", "deploy"]
        finish(store, sender.sent[1][1], JobStatus.SUCCEEDED)
        assert [d.action for d in controller.step(rid)] == ["wait", "complete"]
        assert store.rollout(rid).state == "completed"  # type: ignore[union-attr]
        assert [d.seq for d in store.decisions(rid)] == list(range(7))
    finally:
        store.close()


class CrashAfterSending(Recorder):
    """Sends, then dies before the step can record it (a controller killed mid-step)."""

    def send(self, kind: str, model: str, jobs: Sequence[tuple[str, str]], **kw: Any) -> None:
        super().send(kind, model, jobs, **kw)
        raise SystemExit("killed")


def test_a_controller_killed_between_sending_and_recording_is_taken_over(
    store: FleetStore,
) -> None:
    clock = Clock()
    rid = start_rollout(store, spec(), clock()).rollout_id
    dying = CrashAfterSending()
    with pytest.raises(SystemExit):
        RolloutController(store, dying, clock=clock, holder="dead").step(rid)
    assert [d.action for d in store.decisions(rid)] == ["start"]  # the send was not recorded
    sender = Recorder()
    clock.advance(61)  # the dead controller's lease expires
    survivor = RolloutController(store, sender, clock=clock, holder="next")
    assert [d.action for d in survivor.step(rid)] == ["deploy"]
    assert sender.sent == dying.sent  # the same job ids again: each device runs its job once


def test_the_cli_records_a_detached_rollout_and_refuses_bad_words(
    store: FleetStore, tmp_path: Path, iris_bundles: dict[str, Path]
) -> None:
    from click.testing import CliRunner

    from edgepack.fleet._cli import cli
    from edgepack.formats.keys import generate_private_key, private_key_pem

    dist = tmp_path / "dist"
    dist.mkdir()
    for name in ("v2", "arm64-v2"):  # real bundles: the fleet reads their manifests
        shutil.copy(iris_bundles[name], dist)
    key = tmp_path / "ops.key"
    key.write_bytes(private_key_pem(generate_private_key()))
    base = ["--store", str(tmp_path / "fleet.db"), "--broker", "127.0.0.1:9"]
    args = ["--version", "2", "--group", "g", "--stages", "d-03,100%", "--bundles", "http://x/",
            "--dist", str(dist), "--key", str(key), "--detach"]  # fmt: skip
    done = CliRunner().invoke(cli, [*base, "rollout", "iris", *args], obj={"clock": Clock()})
    assert done.exit_code == 0, done.output  # `rollout MODEL` is `rollout start MODEL`
    assert "stages d-03 (1), 100% (9)" in done.output
    (row,) = store.rollouts()
    assert (row.state, row.model, row.version, row.spec["soak_s"]) == ("deploying", "iris", 2, 600)
    again = CliRunner().invoke(cli, [*base, "rollout", "iris", *args], obj={"clock": Clock()})
    assert again.exit_code == 1
    assert f"rollout {row.rollout_id} of iris v2 to g is still deploying" in again.output
    store.acquire_lease(row.rollout_id, "ops-b", T0 + dt.timedelta(minutes=5), T0)
    taken = CliRunner().invoke(cli, [*base, "rollout", "drive", row.rollout_id, "--key", str(key)],
                               obj={"clock": Clock()})  # fmt: skip
    assert taken.exit_code == 1
    assert "is driven by ops-b until 2026-12-02 12:05:00 UTC" in taken.output
    bad = CliRunner().invoke(cli, [*base, "rollout", "start", "iris", *args, "--abort-on", "p99>2"])
    assert bad.exit_code == 2
    assert "unknown metric 'p99'" in bad.output
    assert len(store.rollouts()) == 1  # nothing recorded for it


def test_a_device_new_to_the_model_is_retired_not_rolled_back(store: FleetStore) -> None:
    state = build_device_state("fresh", profile="x86_64-cpu", agent_version="t", groups=["g"],
                               models={}, health="ok", ts=T0, session="s")  # fmt: skip
    store.record_state("fresh", json.loads(state), T0)
    store.assign("fresh", ["g"], T0)
    clock, sender = Clock(), Recorder()
    rid = start_rollout(store, spec("fresh+d-01,100%", "failed>0%"), clock()).rollout_id
    controller = RolloutController(store, sender, clock=clock)
    controller.step(rid)
    ((_kind, jobs),) = sender.sent
    assert sorted(device for device, _job in jobs) == ["d-01", "fresh"]
    finish(store, [j for j in jobs if j[0] == "fresh"], JobStatus.SUCCEEDED, before=None)
    finish(store, [j for j in jobs if j[0] == "d-01"], JobStatus.FAILED)
    made = controller.step(rid)
    assert [d.action for d in made] == ["abort", "rollback"]
    assert [(k, [d for d, _j in js]) for k, js in sender.sent[1:]] == [("retire", ["fresh"])]
    assert made[1].figures["retired"] == ["fresh"]
