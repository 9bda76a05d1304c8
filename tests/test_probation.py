"""Probation after an upgrade (edgepack.agent._probation): a new version is marked good once one
daemon run has served it for ``[limits] probation_period`` seconds; a version the daemon keeps
dying with is rolled back by the daemon's next start, on its own, and the history says why.

Time is an injected clock (nothing sleeps). Daemon starts are real ``Agent.start()`` calls on a
real state directory, with real bundles and a real runtime serving them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import KeyPair, write_agent_config

from edgepack.agent._config import load_config
from edgepack.agent._daemon import Agent
from edgepack.agent._lifecycle import Lifecycle

PERIOD = 600


def device(tmp_path: Path, keys: KeyPair) -> Path:
    extra = f"[limits]\nprobation_period = {PERIOD}\nprobation_max_starts = 3\n"
    write_agent_config(tmp_path / "device", keys, extra=extra)
    return tmp_path / "device"


def lifecycle(work: Path) -> Lifecycle:
    return Lifecycle(load_config(work / "agent.toml"), clock=lambda: 0.0)


def iris(work: Path) -> dict:
    return json.loads((work / "state" / "state.json").read_text())["models"]["iris"]


def history(work: Path) -> list[dict]:
    return json.loads((work / "state" / "state.json").read_text())["history"]


@pytest.fixture
def upgraded(tmp_path: Path, keys: KeyPair, iris_bundles: dict[str, Path]) -> Path:
    """v1 installed, then v2: v2 on probation, v1 retained."""
    work = device(tmp_path, keys)
    for version in ("v1", "v2"):
        assert lifecycle(work).install(str(iris_bundles[version])).ok
    model = iris(work)
    assert (model["active"], model["previous"], model["probation"]) == (2, 1, True)
    return work


def test_a_version_that_serves_its_period_is_marked_good(upgraded: Path) -> None:
    life = lifecycle(upgraded)
    assert life.start_probation_check(now=1000.0) == []
    assert iris(upgraded)["probation_starts"] == 1
    assert life.settle(1000.0 + PERIOD - 1) == []
    assert iris(upgraded)["probation"] is True
    assert life.settle(1000.0 + PERIOD) == [f"iris v2: good (served {PERIOD} s without a failure)"]
    model = iris(upgraded)
    assert (model["active"], model["probation"], model["probation_starts"]) == (2, False, 0)
    assert history(upgraded)[-1]["result"] == "good"
    for _ in range(5):  # a good version's starts are not counted any more
        assert lifecycle(upgraded).start_probation_check(now=0.0) == []
    assert iris(upgraded)["active"] == 2


def test_served_time_counts_within_one_run_only(upgraded: Path) -> None:
    """A daemon that dies before the period ends starts the period again."""
    first = lifecycle(upgraded)
    first.start_probation_check(now=0.0)
    assert first.settle(PERIOD - 1) == []
    second = lifecycle(upgraded)  # the daemon died and came back
    second.start_probation_check(now=PERIOD - 1)
    assert second.settle(PERIOD) == []
    assert second.settle(2 * PERIOD - 1) == ["iris v2: good (served 600 s without a failure)"]


def test_the_daemon_dying_with_a_new_version_rolls_it_back_by_itself(
    upgraded: Path, iris_bundles: dict[str, Path]
) -> None:
    config = load_config(upgraded / "agent.toml")
    for start in (1, 2, 3):  # each start serves v2; the daemon then "crashes" (no settle)
        agent = Agent(config).start(serve_http=False)
        assert agent.runtime.get("iris").version == 2
        agent.stop()
        assert iris(upgraded)["probation_starts"] == start
    with Agent(config).start(serve_http=False) as agent:  # the fourth start rolls back
        assert agent.runtime.get("iris").version == 1
    model = iris(upgraded)
    assert (model["active"], model["previous"], model["probation"]) == (1, None, False)
    event = history(upgraded)[-1]
    assert (event["action"], event["version"], event["previous"], event["result"]) == (
        "rollback", 1, 2, "rolled-back-to",
    )  # fmt: skip
    assert event["reason"] == (
        "iris v2 was started 4 times within its probation of 600 s (the daemon kept dying; the "
        "limit is 3 starts)"
    )
    assert lifecycle(upgraded).install(str(iris_bundles["v2"])).result == "rejected"  # highest
    with Agent(config).start(serve_http=False) as agent:  # v1 had served: no probation
        assert agent.runtime.get("iris").version == 1


def test_a_first_version_has_nothing_to_roll_back_to_and_keeps_serving(
    tmp_path: Path, keys: KeyPair, iris_bundles: dict[str, Path]
) -> None:
    work = device(tmp_path, keys)
    assert lifecycle(work).install(str(iris_bundles["v1"])).ok
    for _ in range(3):
        assert lifecycle(work).start_probation_check(now=0.0) == []
    assert lifecycle(work).start_probation_check(now=0.0) == []
    model = iris(work)
    assert (model["active"], model["probation"]) == (1, False)
    event = history(work)[-1]
    assert event["result"] == "probation-failed"
    assert event["reason"].endswith("; no retained previous version to roll back to")


def test_probation_off(tmp_path: Path, keys: KeyPair, iris_bundles: dict[str, Path]) -> None:
    write_agent_config(tmp_path / "d", keys, extra="[limits]\nprobation_period = 0\n")
    life = Lifecycle(load_config(tmp_path / "d" / "agent.toml"))
    assert life.install(str(iris_bundles["v1"])).ok
    assert iris(tmp_path / "d")["probation"] is False
    assert life.start_probation_check() == []
