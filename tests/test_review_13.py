"""Review of issue 13 (staged rollouts, experiments, the job lifecycle): each case is a defect
found by attacking the feature, kept as a regression test. Real parts, no sleeps."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import KeyPair, write_agent_config

from edgepack.agent._config import load_config
from edgepack.agent._daemon import Agent
from edgepack.agent._experiment import Experiment, ExperimentConfig
from edgepack.agent.exceptions import InferenceError
from edgepack.fleet._database import FleetStore, open_store
from edgepack.fleet._rollout import parse_stages
from edgepack.fleet._rollout_controller import (
    RolloutController,
    RolloutSpec,
    request,
    start_rollout,
)
from edgepack.fleet.exceptions import BrokerError
from edgepack.formats.messages import ModelState, build_device_state

T0 = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.timezone.utc)
BUNDLES = {"x86_64-cpu": {"url": "http://127.0.0.1:9/m.edgepack", "sha256": "0" * 64, "size": 1}}


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


class Recorder:
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


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FleetStore]:
    opened = open_store(tmp_path / "fleet.db")
    for i in range(4):
        name = f"d-{i}"
        state = build_device_state(name, profile="x86_64-cpu", agent_version="t", groups=["g"],
                                   models={"m": ModelState(1, None, 1)}, health="ok", ts=T0,
                                   session="s")  # fmt: skip
        opened.record_state(name, json.loads(state), T0)
        opened.assign(name, ["g"], T0)
    yield opened
    opened.close()


# -- rollouts ----------------------------------------------------------------------------------


def test_a_stage_sent_late_gets_its_whole_job_timeout(store: FleetStore) -> None:
    """A rollout recorded with --detach and driven later (or a stage whose send waited out a
    dead broker) used to be judged at once: the job timeout ran from when the stage was
    recorded, not from when its deploys went out, so every device counted as timed out the
    moment the commands were sent, and the rollout aborted before any device could answer."""
    clock, sender = Clock(), Recorder()
    spec = RolloutSpec("m", 2, "g", tuple(parse_stages("50%,100%")), BUNDLES, soak=60,
                       conditions=("failed>0%",), job_timeout=300)  # fmt: skip
    rid = start_rollout(store, spec, clock()).rollout_id
    clock.advance(3600)  # `rollout drive` started an hour after `rollout start --detach`
    made = RolloutController(store, sender, clock=clock).step(rid)
    assert [d.action for d in made] == ["deploy"]  # sent, and now waiting for the devices
    row = store.rollout(rid)
    assert row is not None
    assert row.state == "deploying"
    clock.advance(299)  # still within the job timeout of the send: nothing judged yet
    assert RolloutController(store, sender, clock=clock).step(rid) == []


def test_an_abort_does_not_wait_for_deploys_that_never_went_out(store: FleetStore) -> None:
    """The broker was down when a stage was to be sent, and the operator aborted: the abort
    waited for the stage's deploys to end, deploys no device had been sent, so the rollout
    hung in 'aborting' for the whole job timeout (30 minutes by default) before it ended."""
    clock, sender = Clock(), Recorder()
    spec = RolloutSpec("m", 2, "g", tuple(parse_stages("50%,100%")), BUNDLES, soak=60,
                       job_timeout=1800)  # fmt: skip
    rid = start_rollout(store, spec, clock()).rollout_id
    controller = RolloutController(store, sender, clock=clock)
    sender.fail = 1
    with pytest.raises(BrokerError):
        controller.step(rid)
    request(store, rid, "abort")
    clock.advance(5)
    made = controller.step(rid)
    assert [d.action for d in made] == ["abort", "done"]
    assert "no device to roll back" in made[-1].reason
    row = store.rollout(rid)
    assert row is not None
    assert row.state == "aborted"
    assert sender.sent == []  # nothing was ever deployed, nothing to undo


# -- shadow experiments ------------------------------------------------------------------------


def test_a_shadow_that_falls_behind_holds_a_bounded_number_of_bytes(
    tmp_path: Path, keys: KeyPair, iris_bundles: dict[str, Path]
) -> None:
    """The shadow queue was bounded by requests only (256 by default): with requests near the
    server's 16 MiB limit and a candidate that falls behind, the copies waiting for it could
    reach 4 GiB on an edge device. It is bounded by bytes too, and drops (counted) beyond."""
    agent = Agent(load_config(write_agent_config(tmp_path / "d", keys))).start()
    try:
        assert agent.install(str(iris_bundles["v1"])).ok
        assert agent.start_experiment(
            str(iris_bundles["v2"]), plan={"mode": "shadow", "sample": 1}
        ).ok
        experiment = agent.experiments.get("iris")
        assert experiment is not None
        experiment.stop()  # the candidate falls behind completely: nothing drains the queue
        mib = np.zeros((65536, 4), np.float32)  # 1 MiB of rows
        label = np.zeros(65536, np.int64)
        for _ in range(128):
            experiment.offer({"input": mib}, {"label": label})
        queued = experiment.queued()
        assert queued * (mib.nbytes + label.nbytes) <= experiment.config.queue_bytes
        assert 0 < queued < 128
        shadow = experiment.report()["shadow"]
        assert shadow["dropped"] == 128 - queued  # dropped, and counted as such
    finally:
        agent.stop()


def test_a_candidate_that_fails_slowly_still_pays_its_cpu_budget(
    tmp_path: Path, keys: KeyPair, iris_bundles: dict[str, Path]
) -> None:
    """A shadow run that failed (a candidate that loops until request_timeout stops it, or
    raises after computing) was not charged to the CPU budget: only a comparison that
    succeeded paid, so a hanging candidate ran back to back on a whole core, not its share."""
    agent = Agent(load_config(write_agent_config(tmp_path / "d", keys))).start()
    try:
        assert agent.install(str(iris_bundles["v1"])).ok
        assert agent.start_experiment(
            str(iris_bundles["v2"]), plan={"mode": "shadow", "sample": 1}
        ).ok
        running = agent.experiments.get("iris")
        assert running is not None
        running.stop()
        spent = 0.3  # of compute before the candidate failed

        def slow_failure(_served: Any, _feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            start = time.perf_counter()
            while time.perf_counter() - start < spent:
                pass
            raise InferenceError("iris v2 did not answer within 0.3 s, was stopped")

        frozen = 100.0  # the budget's clock stands still: only the charge moves the tokens
        share = 0.25
        config = ExperimentConfig(cpu_share=share)
        experiment = Experiment(
            running.candidate, 1, running.plan, slow_failure, config, clock=lambda: frozen
        )
        experiment.compare({"input": np.zeros((1, 4), np.float32)}, {})
        assert experiment.report()["shadow"]["errors"] == 1
        stop = threading.Event()
        waiter = threading.Thread(target=experiment._wait_for_budget, args=(stop,))
        waiter.start()
        waiter.join(timeout=0.5)
        assert waiter.is_alive()  # over budget: the next run waits for its share of the CPU
        stop.set()
        waiter.join(timeout=5)
    finally:
        agent.stop()


# -- experiments across the fleet --------------------------------------------------------------


def _telemetry(device: str, seq: int, plan: dict[str, Any], served: dict[int, int]) -> Any:
    return {
        "schema": 1, "device": device, "seq": seq, "ts": T0.isoformat(),
        "experiments": [{"model": "iris", "active": 1, "candidate": 2, **plan}],
        "models": [{"model": "iris", "version": v, "requests": n, "rows": n, "errors": {},
                    "latency_ms": {"p50": 1.0, "p95": 2.0}} for v, n in served.items()],
    }  # fmt: skip


def test_fleet_rows_never_mix_a_split_with_a_shadow(tmp_path: Path) -> None:
    """One device ran a split and another a shadow of the same candidate (experiment start
    --device twice): the one fleet-wide row was labeled with the first device's plan ('split
    50%') and its candidate line showed only the shadow's runs, dropping the requests the split
    candidate answered. Fleet rows sum devices that run the same plan, one row per plan."""
    from edgepack.fleet._collector import _job_row
    from edgepack.fleet._experiments import FLEET, experiment_rows
    from edgepack.formats.commands import (
        CommandKind,
        ExperimentAction,
        ExperimentMode,
        ExperimentSpec,
        make_command,
        read_command,
    )
    from edgepack.formats.keys import generate_private_key

    key = generate_private_key()
    store = open_store(tmp_path / "fleet.db")
    try:
        spec = ExperimentSpec(ExperimentAction.START, ExperimentMode.SPLIT, share=0.5)
        target = {"device": "cam-1"}
        _, raw = make_command(
            CommandKind.EXPERIMENT, "iris", target, key, version=2, bundles=BUNDLES,
            experiment=spec, issued_at=T0,
        )  # fmt: skip
        store.record_job(_job_row(read_command(raw, None)))
        at = T0 + dt.timedelta(seconds=5)
        split, shadow = {"mode": "split", "share": 0.5}, {"mode": "shadow", "sample": 0.5}
        for device, plan, served in (
            ("cam-1", split, {1: 110, 2: 90}), ("cam-2", shadow, {1: 200}),
            ("cam-3", split, {1: 100, 2: 100}),
        ):  # fmt: skip
            store.record_event("telemetry", device, _telemetry(device, 1, plan, served), 1, at)
        rows = experiment_rows(store, "iris")
        fleet = [r for r in rows if r.device == FLEET]
        assert [(r.mode, r.devices) for r in fleet] == [("split", 2)]  # cam-2 alone: no sum
        assert (fleet[0].active.requests, fleet[0].candidate.requests) == (210, 190)
    finally:
        store.close()


# -- the job lifecycle -------------------------------------------------------------------------


def test_an_integer_beyond_64_bits_costs_only_its_own_message(tmp_path: Path) -> None:
    """A signed deploy with --in-progress-timeout 99999999999999999999d (the CLI took it), or a
    job status whose seq is 10**25 (any publisher on a device's status topic), passed the
    readers (which bound integers to 32 digits, not to 64 bits) and raised OverflowError in
    SQLite: not a StoreError, so the whole batch was dropped, other devices' states and job
    updates received in the same moment with it. Readers now refuse integers beyond 64 bits."""
    from edgepack.fleet._broker import BrokerOptions
    from edgepack.fleet._collector import Collector
    from edgepack.formats.commands import CommandKind, make_command
    from edgepack.formats.keys import generate_private_key
    from edgepack.formats.messages import JobStatus, build_job_status
    from edgepack.formats.topics import Topics

    key = generate_private_key()
    topics = Topics("edgepack/v1")
    store = open_store(tmp_path / "fleet.db")
    try:
        collector = Collector(BrokerOptions(), store, client_id="review", clock=lambda: T0)
        job, deploy = make_command(CommandKind.DEPLOY, "m", {"device": "d-1"}, key, version=2,
                                   bundles=BUNDLES, in_progress_timeout=10**24)  # fmt: skip
        good, ok = make_command(CommandKind.DEPLOY, "m", {"device": "d-2"}, key, version=2,
                                bundles=BUNDLES)  # fmt: skip
        huge = build_job_status(good, "d-2", JobStatus.QUEUED, model="m", seq=10**25)
        state = build_device_state("d-3", profile="x86_64-cpu", agent_version="t", groups=[],
                                   models={}, health="ok", ts=T0, session="s")  # fmt: skip
        collector.process([
            (topics.device_jobs("d-1", "m"), deploy), (topics.device_jobs("d-2", "m"), ok),
            (topics.job_status("d-2", good), huge), (topics.state("d-3"), state),
        ])  # fmt: skip
        assert store.job(job) is None  # refused, and only it
        assert store.job(good) is not None
        assert [d.device for d in store.devices()] == ["d-3"]
        assert collector.stats.errors == 0
        assert collector.stats.rejected == 2
    finally:
        store.close()
    # and the CLI refuses such a duration instead of signing it (or crashing on --since)
    from click.testing import CliRunner

    from edgepack.fleet._cli import cli

    deploy = ["deploy", "m", "--version", "2", "--device", "d-1", "--bundles", str(tmp_path),
              "--key", str(tmp_path / "none.key")]  # fmt: skip
    for args in (
        ["jobs", "list", "--since", "99999999999999999999d"],
        [*deploy, "--in-progress-timeout", "99999999999999999999d"],
    ):
        result = CliRunner().invoke(cli, ["--store", str(tmp_path / "fleet.db"), *args])
        assert result.exit_code == 2, result.output
        assert "is longer than 36500 days" in result.output
