"""The health check runs in the agent on the session that then serves, loaded once, and stays
bounded: a crash in it resumes from the journal and serves the session the resumed check loaded,
and a load that never returns fails the install at the deadline, after which checks move to a
child process until the stuck one ends.

Real bundles and real onnxruntime sessions throughout. The loads are counted by wrapping
``open_session``, which every load of an installed version goes through (the health check's and
the runtime's alike). The looping model, stopped in the agent by ``RunOptions.terminate``, and a
native crash in the check are covered in test_install_bounds.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest
from conftest import KeyPair, write_agent_config
from test_agent_lifecycle import kill

from edgepack.agent import _health_check, _session
from edgepack.agent._config import load_config
from edgepack.agent._daemon import Agent
from edgepack.agent._lifecycle import Lifecycle
from edgepack.agent.exceptions import HealthCheckError


def make_device(root: Path, keys: KeyPair, limits: str = "") -> Path:
    write_agent_config(root, keys, extra=f"[limits]\nprobation_period = 0\n{limits}")
    return root


def agent(work: Path, **kwargs: Any) -> Agent:
    return Agent(load_config(work / "agent.toml"), **kwargs)


class Loads:
    """Counts the sessions opened, and records the session each golden check ran on."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.opened: list[ort.InferenceSession] = []
        self.checked: list[ort.InferenceSession] = []
        real_open, real_check = _session.open_session, _health_check.check_golden

        def counting_open(*args: Any, **kwargs: Any) -> ort.InferenceSession:
            session = real_open(*args, **kwargs)
            self.opened.append(session)
            return session

        def recording_check(session: ort.InferenceSession, *args: Any, **kwargs: Any) -> int:
            self.checked.append(session)
            return real_check(session, *args, **kwargs)

        monkeypatch.setattr(_session, "open_session", counting_open)
        monkeypatch.setattr(_health_check, "check_golden", recording_check)


def test_each_version_is_loaded_once_and_served_on_the_session_its_check_ran_on(
    tmp_path: Path, keys: KeyPair, iris_bundles: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    work = make_device(tmp_path / "device", keys)
    loads = Loads(monkeypatch)
    # a watcher polling state.json all the time must not load a committed version again
    with agent(work, poll_interval=0.005).start(serve_http=False) as running:
        for step, operation in enumerate(
            [
                lambda: running.install(str(iris_bundles["v1"])),
                lambda: running.install(str(iris_bundles["v2"])),
                lambda: running.rollback("iris"),
            ],
            start=1,
        ):
            outcome = operation()
            assert outcome.ok, outcome.error
            assert outcome.session is None  # handed over to the runtime, not kept
            assert len(loads.opened) == len(loads.checked) == step
            served = running.runtime.get("iris")
            assert served.session is loads.opened[-1] is loads.checked[-1]
            assert served.version == (1 if step == 3 else step)
            assert running.infer("iris", {"input": [5.1, 3.5, 1.4, 0.2]})["label"].shape == (1,)


def test_the_child_check_is_an_opt_in_and_then_the_runtime_loads_the_model(
    tmp_path: Path, keys: KeyPair, iris_bundles: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    work = make_device(tmp_path / "device", keys, "health_check_in_child = true\n")
    loads = Loads(monkeypatch)
    with agent(work).start(serve_http=False) as running:
        assert running.install(str(iris_bundles["v1"])).ok
        assert loads.checked == []  # the check ran in a child process
        assert running.runtime.get("iris").session is loads.opened[-1]
        assert len(loads.opened) == 1  # this process loaded it only to serve it


def test_a_kill_in_the_health_check_resumes_from_the_journal_and_serves_the_resumed_check(
    tmp_path: Path, keys: KeyPair, iris_bundles: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    work = make_device(tmp_path / "device", keys)
    assert Lifecycle(load_config(work / "agent.toml")).install(str(iris_bundles["v1"])).ok
    kill(work, "EDGEPACK_FAULT_KILL_AT", "health_check", "install", iris_bundles["v2"])
    loads = Loads(monkeypatch)
    with agent(work).start(serve_http=False) as running:
        assert running.recovered is not None
        assert running.recovered.trace == ["health_check", "committing", "cleanup", "done"]
        served = running.runtime.get("iris")
        assert served.version == 2
        # v2 by the resumed check, handed to the runtime; v1 is not loaded at all
        assert len(loads.opened) == 1
        assert served.session is loads.opened[0] is loads.checked[0]


class StuckLoad:
    """Once armed, the next session opened in this process does not return until released (a
    loader that hangs in native code)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._monkeypatch = monkeypatch
        self._released = threading.Event()

    def arm(self) -> None:
        real_open, released, calls = _session.open_session, self._released, []

        def hanging_open(*args: Any, **kwargs: Any) -> ort.InferenceSession:
            calls.append(1)
            if len(calls) == 1:
                released.wait(60)
            return real_open(*args, **kwargs)

        self._monkeypatch.setattr(_session, "open_session", hanging_open)

    def release(self) -> None:
        """Let it return, and wait for the health check thread it held to end."""
        self._released.set()
        for thread in threading.enumerate():
            if thread.name.startswith("edgepack-health-check-"):
                thread.join(60)


@pytest.fixture
def stuck_load(monkeypatch: pytest.MonkeyPatch) -> Iterator[StuckLoad]:
    stuck = StuckLoad(monkeypatch)
    yield stuck
    stuck.release()  # whatever the test did


def test_a_load_that_hangs_fails_the_install_at_the_deadline_and_later_checks_use_a_child(
    tmp_path: Path,
    keys: KeyPair,
    iris_bundles: dict[str, Path],
    stuck_load: StuckLoad,
) -> None:
    work = make_device(tmp_path / "device", keys, "health_check_timeout = 1\n")
    lifecycle = Lifecycle(load_config(work / "agent.toml"))
    assert lifecycle.install(str(iris_bundles["v1"])).ok
    stuck_load.arm()
    outcome = lifecycle.install(str(iris_bundles["v2"]))
    assert (outcome.result, outcome.version) == ("rolled-back", 2)
    assert isinstance(outcome.error, HealthCheckError)
    assert "did not finish its health check within 1 s" in str(outcome.error)
    assert lifecycle.store.load().models["iris"].active == 1
    assert not (work / "state" / "models" / "iris" / "2").exists()
    assert _health_check.checks_left_running() == 1
    # while that one is stuck, the next check runs in a child process (no pile-up here); the
    # child starts python and onnxruntime, which a loaded machine may not do within 1 s
    make_device(tmp_path / "device", keys, "health_check_timeout = 60\n")
    lifecycle = Lifecycle(load_config(work / "agent.toml"))
    again = lifecycle.install(str(iris_bundles["v3"]))
    assert again.result == "installed", again.error
    assert again.session is None  # checked in the child: the runtime loads it
    stuck_load.release()
    assert _health_check.checks_left_running() == 0
