"""A/B on the device: shadow and split experiments on a real agent over real HTTP.

Real parts only: packager-built iris bundles (the same forest as v1, and a differently trained
model), real onnxruntime sessions, the agent's HTTP server on a free loopback port, its journaled
lifecycle in a temporary state directory. What is checked:

* a shadow of an identical candidate agrees on 100 % of rows; a shadow of a different model agrees
  exactly as often as the two models do on those rows (computed here, with onnxruntime on the
  bundles' own model files); the shadow never answers and no request on the active path fails,
  even while its queue is full and drops;
* a split serves its share within a binomial tolerance, the same variant for a caller key every
  time, names the version that answered, and reports telemetry and drift per variant;
* promote and stop are journaled operations that survive a restart (promote keeps rollback); a
  candidate that is corrupt or fails its health check is refused and the active model serves on;
  a kill at any state of a candidate install leaves the active version untouched and the
  candidate committed or absent.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bundle_forge
import httpx
import numpy as np
import onnxruntime as ort
import pytest
from conftest import KeyPair, write_agent_config

from edgepack.agent._config import load_config
from edgepack.agent._daemon import Agent
from edgepack.agent._experiment import ExperimentConfig, caller_fraction
from edgepack.agent._lifecycle import Result
from edgepack.formats.bundle import MODEL_FILE, read_archive

WAIT = 20.0
LIMITS = "[limits]\nprobation_period = 0\n"


def rows(n: int, seed: int = 0) -> np.ndarray:
    """``n`` iris-like flowers spread over the whole feature range (float32)."""
    rng = np.random.default_rng(seed)
    low, high = np.array([4.3, 2.0, 1.0, 0.1]), np.array([7.9, 4.4, 6.9, 2.5])
    return rng.uniform(low, high, size=(n, 4)).astype(np.float32)


def body(x: np.ndarray, **top: Any) -> dict[str, Any]:
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
    return {"inputs": [{**tensor, "data": x.ravel().tolist()}], **top}


def until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def labels_of(bundle: Path, x: np.ndarray) -> np.ndarray:
    """The labels the bundle's own model gives ``x`` (onnxruntime on its model.onnx)."""
    _, files = read_archive(bundle.read_bytes())
    session = ort.InferenceSession(files[MODEL_FILE], providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"input": x})[0]).reshape(-1)


@pytest.fixture(scope="module")
def stump(tmp_path_factory: pytest.TempPathFactory, keys: KeyPair) -> Path:
    """iris v2 trained differently: a one-split decision tree (it knows only two classes)."""
    from build_helpers import build_file
    from sklearn.datasets import load_iris
    from sklearn.tree import DecisionTreeClassifier

    x, y = load_iris(return_X_y=True, as_frame=True)
    model = DecisionTreeClassifier(max_depth=1, random_state=0).fit(x, y)
    (result,) = build_file(
        model, x, tmp_path_factory.mktemp("stump"), keys.private, name="iris", version=2
    )
    assert result.ok, result.error
    assert result.bundle is not None
    return result.bundle


def start_agent(root: Path, keys: KeyPair, config: ExperimentConfig | None = None) -> Agent:
    path = write_agent_config(root, keys, extra=LIMITS)
    agent = Agent(load_config(path), experiments=config)
    return agent.start(serve_http=True)


@pytest.fixture
def agent(tmp_path: Path, keys: KeyPair, iris_bundles: dict[str, Path]) -> Iterator[Agent]:
    running = start_agent(tmp_path / "device", keys, ExperimentConfig(queue=10_000, cpu_share=1))
    assert running.install(str(iris_bundles["v1"])).ok
    yield running
    running.stop()


def shadow_totals(agent: Agent, until_offered: int) -> dict[str, float]:
    """Sum the shadow's interval reports until every offered request was compared or dropped."""
    totals: dict[str, float] = {}
    p50s: list[float] = []

    def drained() -> bool:
        (report,) = agent.experiments.report()
        for key in ("offered", "dropped", "compared", "rows", "agreed_rows", "errors"):
            totals[key] = totals.get(key, 0) + (report["shadow"].get(key) or 0)
        if report["shadow"]["mean_abs_error"] is not None:
            error = report["shadow"]["mean_abs_error"] * report["shadow"]["rows"]
            totals["abs_error"] = totals.get("abs_error", 0) + error
        if report["shadow"]["latency_ms"]["p50"] is not None:
            p50s.append(report["shadow"]["latency_ms"]["p50"])
        return totals.get("offered", 0) >= until_offered and report["shadow"]["queued"] == 0

    until(drained, "the shadow to drain")
    totals["p50_reports"] = len(p50s)
    return totals


def drive(url: str, batches: list[np.ndarray], **top: Any) -> list[httpx.Response]:
    with httpx.Client(base_url=url, timeout=10) as client:
        return [client.post("/v2/models/iris/infer", json=body(b, **top)) for b in batches]


# -- shadow ---------------------------------------------------------------------------------------


def test_shadow_of_an_identical_candidate_agrees_on_every_row(
    agent: Agent, iris_bundles: dict[str, Path]
) -> None:
    outcome = agent.start_experiment(str(iris_bundles["v2"]), plan={"mode": "shadow", "sample": 1})
    assert outcome.result is Result.CANDIDATE, outcome.reason
    assert agent.status()["models"]["iris"]["candidate"]["running"] is True
    assert agent.server is not None
    batches = [rows(1 + i % 5, seed=i) for i in range(200)]
    answers = drive(agent.server.url, batches)
    assert [r.status_code for r in answers] == [200] * 200
    assert {r.json()["model_version"] for r in answers} == {"1"}  # the shadow never answers
    totals = shadow_totals(agent, 200)
    assert totals["dropped"] == 0
    assert totals["errors"] == 0
    assert totals["compared"] == 200
    assert totals["rows"] == sum(len(b) for b in batches)
    assert totals["agreed_rows"] == totals["rows"]  # 100 %
    assert totals["abs_error"] == 0.0  # the same probabilities too
    assert totals["p50_reports"] >= 1  # the candidate's latency is reported


def test_shadow_of_a_different_model_agrees_as_often_as_the_models_do(
    agent: Agent, iris_bundles: dict[str, Path], stump: Path
) -> None:
    assert agent.start_experiment(str(stump), plan={"mode": "shadow", "sample": 1}).ok
    assert agent.server is not None
    batches = [rows(3, seed=100 + i) for i in range(150)]
    answers = drive(agent.server.url, batches)
    assert all(r.status_code == 200 for r in answers)
    everything = np.concatenate(batches)
    truth = labels_of(iris_bundles["v1"], everything) == labels_of(stump, everything)
    assert 0.3 < truth.mean() < 0.95  # the models do differ, and not everywhere
    totals = shadow_totals(agent, 150)
    assert totals["dropped"] == 0
    assert totals["rows"] == len(everything)
    assert totals["agreed_rows"] == int(truth.sum())
    assert totals["abs_error"] > 0


def test_a_full_shadow_queue_drops_comparisons_and_fails_no_request(
    tmp_path: Path, keys: KeyPair, iris_bundles: dict[str, Path]
) -> None:
    # a queue of two and a hundredth of a core: the shadow falls behind at once
    agent = start_agent(tmp_path / "d", keys, ExperimentConfig(queue=2, cpu_share=0.01))
    try:
        assert agent.install(str(iris_bundles["v1"])).ok
        assert agent.start_experiment(
            str(iris_bundles["v2"]), plan={"mode": "shadow", "sample": 1}
        ).ok
        assert agent.server is not None
        statuses: list[int] = []
        url = agent.server.url

        def client(seed: int) -> None:
            batches = [rows(2, seed + i) for i in range(150)]
            statuses.extend(r.status_code for r in drive(url, batches))

        threads = [threading.Thread(target=client, args=(s,)) for s in range(0, 4000, 1000)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert statuses == [200] * 600
        (report,) = agent.experiments.report()
        shadow = report["shadow"]
        assert shadow["dropped"] > 0  # the queue was full, and said so
        # every request was offered: compared, failed or dropped, or still queued (one running)
        assert 598 <= shadow["offered"] + shadow["queued"] <= 600
        agent.monitor.telemetry.fold()
        text = agent.metrics()
        assert 'edgepack_requests_total{model="iris",version="1",outcome="error"} 0' in text
        assert 'edgepack_requests_total{model="iris",version="1",outcome="ok"} 600' in text
        assert 'version="2"' not in text.split("edgepack_events_total")[0]  # no shadow requests
    finally:
        agent.stop()


# -- split ----------------------------------------------------------------------------------------


def binomial_ok(hits: int, n: int, p: float) -> bool:
    """Within 4 standard deviations of n * p (a false failure once in ~16,000 runs)."""
    return abs(hits - n * p) <= 4 * math.sqrt(n * p * (1 - p))


def test_split_serves_its_share_and_keeps_each_caller_on_one_variant(
    tmp_path: Path, keys: KeyPair, iris_bundles: dict[str, Path]
) -> None:
    path = write_agent_config(
        tmp_path / "d", keys, extra=LIMITS + "[drift]\nwindow = 100\nmin_rows = 100\n"
    )
    reports: list[tuple[str, dict[str, Any]]] = []
    agent = Agent(load_config(path)).start(serve_http=True)
    agent.reports.connect(lambda kind, report: reports.append((kind, report)))
    try:
        assert agent.install(str(iris_bundles["v1"])).ok
        assert agent.start_experiment(
            str(iris_bundles["v2"]), plan={"mode": "split", "share": 0.2}
        ).ok
        assert agent.server is not None
        # without a caller key: the share of any run of requests
        answers = drive(agent.server.url, [rows(1, seed=i) for i in range(1000)])
        versions = [r.json()["model_version"] for r in answers]
        assert binomial_ok(versions.count("2"), 1000, 0.2), versions.count("2")
        # with caller keys: sticky, and the callers split by the share
        callers = [f"store-{i}" for i in range(400)]
        seen: dict[str, set[str]] = {}
        with httpx.Client(base_url=agent.server.url, timeout=10) as client:
            for round_ in range(3):
                for i, caller in enumerate(callers):
                    x = rows(1, seed=10_000 + i + round_)
                    if i % 2:  # the header, or the OIP parameter
                        r = client.post(
                            "/v2/models/iris/infer",
                            json=body(x),
                            headers={"X-Edgepack-Caller": caller},
                        )
                    else:
                        r = client.post(
                            "/v2/models/iris/infer", json=body(x, parameters={"caller": caller})
                        )
                    assert r.status_code == 200
                    seen.setdefault(caller, set()).add(r.json()["model_version"])
        assert all(len(v) == 1 for v in seen.values())  # sticky
        with httpx.Client(base_url=agent.server.url, timeout=10) as client:
            long_key = "k" * 257
            for refused in (
                client.post("/v2/models/iris/infer", json=body(rows(1)),
                            headers={"X-Edgepack-Caller": long_key}),
                client.post("/v2/models/iris/infer",
                            json=body(rows(1), parameters={"caller": long_key})),
            ):  # fmt: skip
                assert refused.status_code == 400
                assert "256" in refused.text
        on_candidate = [c for c, v in seen.items() if v == {"2"}]
        assert binomial_ok(len(on_candidate), 400, 0.2), len(on_candidate)
        assert all(caller_fraction("iris/2", c) < 0.2 for c in on_candidate)  # by the hash
        # in-process callers are routed the same way
        assert agent.infer("iris", {"input": rows(1)}, caller=on_candidate[0]) is not None
        # telemetry and drift per variant
        agent.monitor.tick(force_report=True)
        telemetry = [r for k, r in reports if k == "telemetry"][-1]
        by_version = {m["version"]: m for m in telemetry["models"]}
        assert by_version[1]["variant"] == "active"
        assert by_version[2]["variant"] == "candidate"
        served_2 = versions.count("2") + 3 * len(on_candidate) + 1
        assert by_version[2]["requests"] == served_2
        assert by_version[1]["requests"] == 1000 + 1200 + 1 - served_2
        (experiment,) = telemetry["experiments"]
        assert experiment == {
            "model": "iris", "active": 1, "candidate": 2, "mode": "split", "share": 0.2
        }  # fmt: skip
        drift = {(r["version"], r["variant"]) for k, r in reports if k == "drift"}
        assert drift == {(1, "active"), (2, "candidate")}
        assert agent.status()["models"]["iris"]["drift"] is not None  # the active one's verdict
    finally:
        agent.stop()


# -- promote, stop, restarts, refusals ------------------------------------------------------------


def test_promote_survives_a_restart_and_keeps_rollback(
    tmp_path: Path, keys: KeyPair, iris_bundles: dict[str, Path]
) -> None:
    root = tmp_path / "d"
    agent = start_agent(root, keys)
    assert agent.install(str(iris_bundles["v1"])).ok
    assert agent.start_experiment(str(iris_bundles["v2"]), plan={"mode": "split", "share": 0.5}).ok
    agent.stop()
    agent = start_agent(root, keys)  # the experiment comes back with the agent
    try:
        running = agent.experiments.get("iris")
        assert running is not None
        assert running.candidate.version == 2
        assert running.split
        outcome = agent.promote("iris")
        assert outcome.result is Result.PROMOTED, outcome.reason
        assert agent.experiments.get("iris") is None
        assert agent.runtime.get("iris").version == 2
    finally:
        agent.stop()
    agent = start_agent(root, keys)
    try:
        model = agent.status()["models"]["iris"]
        assert (model["active"], model["previous"], model["serving"]) == (2, 1, 2)
        assert model["candidate"] is None
        assert agent.rollback("iris").result is Result.ROLLED_BACK_TO
        assert agent.runtime.get("iris").version == 1
    finally:
        agent.stop()


def test_stop_removes_the_candidate_and_survives_a_restart(
    tmp_path: Path, keys: KeyPair, iris_bundles: dict[str, Path]
) -> None:
    root = tmp_path / "d"
    agent = start_agent(root, keys)
    try:
        assert agent.install(str(iris_bundles["v1"])).ok
        assert agent.start_experiment(
            str(iris_bundles["v3"]), plan={"mode": "shadow", "sample": 0.5}
        ).ok
        assert (root / "state" / "models" / "iris" / "3").is_dir()
        assert agent.stop_experiment("iris").result is Result.STOPPED
        assert agent.experiments.get("iris") is None
        assert not (root / "state" / "models" / "iris" / "3").exists()
    finally:
        agent.stop()
    agent = start_agent(root, keys)
    try:
        assert agent.experiments.get("iris") is None
        assert agent.status()["models"]["iris"]["active"] == 1
        with pytest.raises(Exception, match="no candidate"):
            agent.promote("iris")
    finally:
        agent.stop()


def test_a_candidate_failing_its_health_check_is_refused_and_the_active_one_serves_on(
    tmp_path: Path, keys: KeyPair, iris_bundles: dict[str, Path]
) -> None:
    _, files = bundle_forge.unpack(iris_bundles["v2"])
    lying = bundle_forge.resign(
        iris_bundles["v2"], keys.private, tmp_path / "forged", version=2,
        replace={"golden.npz": bundle_forge.wrong_golden(files, "label")},
    )  # fmt: skip
    corrupt = tmp_path / "corrupt.edgepack"
    raw = bytearray(iris_bundles["v2"].read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(raw))
    agent = start_agent(tmp_path / "d", keys)
    try:
        assert agent.install(str(iris_bundles["v1"])).ok
        assert agent.server is not None
        for bad, result in ((lying, Result.ROLLED_BACK), (corrupt, Result.REJECTED)):
            outcome = agent.start_experiment(str(bad), plan={"mode": "split", "share": 1})
            assert outcome.result is result, outcome.reason
            assert agent.experiments.get("iris") is None
            model = agent.status()["models"]["iris"]
            assert (model["active"], model["serving"], model["candidate"]) == (1, 1, None)
            assert not (tmp_path / "d" / "state" / "models" / "iris" / "2").exists()
            (answer,) = drive(agent.server.url, [rows(2)])
            assert answer.status_code == 200
            assert answer.json()["model_version"] == "1"
    finally:
        agent.stop()
    empty = start_agent(tmp_path / "empty", keys)  # nothing to run a candidate beside
    try:
        plan = {"mode": "split", "share": 1}
        outcome = empty.start_experiment(str(iris_bundles["v2"]), plan=plan)
        assert outcome.result is Result.REJECTED
        assert "deploy one first" in str(outcome.reason)
        assert empty.status()["models"] == {}
    finally:
        empty.stop()


@pytest.mark.parametrize("state", ["verifying", "staging", "health_check", "committing"])
def test_a_kill_during_a_candidate_install_leaves_the_active_version_untouched(
    tmp_path: Path, keys: KeyPair, iris_bundles: dict[str, Path], state: str
) -> None:
    root = tmp_path / "d"
    agent = start_agent(root, keys)
    assert agent.install(str(iris_bundles["v1"])).ok
    agent.stop()
    script = (
        "import sys; from pathlib import Path\n"
        "from edgepack.agent._config import load_config\n"
        "from edgepack.agent._lifecycle import Lifecycle\n"
        "Lifecycle(load_config(Path(sys.argv[1]))).install_candidate(\n"
        "    sys.argv[2], plan={'mode': 'shadow', 'sample': 0.5})\n"
    )
    env = {**os.environ, "EDGEPACK_FAULT_KILL_AT": state}
    done = subprocess.run(
        [sys.executable, "-c", script, str(root / "agent.toml"), str(iris_bundles["v2"])],
        env=env, capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    agent = start_agent(root, keys)  # recovers the interrupted install
    try:
        model = agent.status()["models"]["iris"]
        assert (model["active"], model["serving"]) == (1, 1)
        candidate = model["candidate"]
        on_disk = (root / "state" / "models" / "iris" / "2").is_dir()
        if candidate is None:
            assert not on_disk  # absent...
        else:  # ...or fully there, and running
            assert candidate["version"] == 2
            assert on_disk
            assert candidate["running"]
        assert agent.recovered is not None
        assert agent.recovered.result in (
            Result.CANDIDATE,
            Result.ROLLED_BACK,
            Result.REJECTED,
        )
    finally:
        agent.stop()


# -- the command's experiment field ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "message"),
    [
        (None, "has no 'experiment' object"),
        ({"action": "pause"}, "'action' must be one of start, promote, stop"),
        ({"action": "start"}, "'mode' must be one of shadow, split"),
        ({"action": "start", "mode": "split"}, "'share' must be a number in (0, 1]"),
        ({"action": "start", "mode": "split", "share": 1.5}, "'share' must be a number in (0, 1]"),
        ({"action": "start", "mode": "shadow", "sample": True}, "'sample' must be a number"),
        ({"action": "promote"}, "'version' must be an integer"),
    ],
)
def test_a_malformed_experiment_command_is_refused_naming_the_field(
    keys: KeyPair, field: Any, message: str
) -> None:
    import base64
    import json

    from edgepack.formats.commands import COMMAND_PAYLOAD_TYPE, read_command
    from edgepack.formats.dsse import dsse_sign
    from edgepack.formats.exceptions import CommandError
    from edgepack.formats.keys import load_private_key

    payload = {
        "schema": 1, "kind": "experiment", "job_id": "experiment-1", "model": "iris",
        "target": {"device": "cam-1"}, "issued_at": "2026-12-02T15:00:00+00:00",
        "expires_at": "2026-12-09T15:00:00+00:00",
        **({} if field is None else {"experiment": field}),
    }  # fmt: skip
    key = load_private_key(keys.private.read_bytes())
    envelope = dsse_sign(COMMAND_PAYLOAD_TYPE, json.dumps(payload).encode(), key)
    raw = json.dumps(envelope).encode()
    assert json.loads(base64.b64decode(envelope["payload"]))["kind"] == "experiment"
    with pytest.raises(CommandError, match=re.escape(message)):
        read_command(raw, None)


@pytest.mark.parametrize(
    ("op", "state"),
    [("promote", "health_check"), ("promote", "committing"), ("stop", "committing")],
)
def test_a_kill_during_promote_or_stop_ends_as_an_uninterrupted_run_would(
    tmp_path: Path, keys: KeyPair, iris_bundles: dict[str, Path], op: str, state: str
) -> None:
    root = tmp_path / "d"
    agent = start_agent(root, keys)
    assert agent.install(str(iris_bundles["v1"])).ok
    assert agent.start_experiment(str(iris_bundles["v2"]), plan={"mode": "split", "share": 0.5}).ok
    agent.stop()
    call = "promote('iris')" if op == "promote" else "stop_experiment('iris')"
    script = (
        "import sys; from pathlib import Path\n"
        "from edgepack.agent._config import load_config\n"
        "from edgepack.agent._lifecycle import Lifecycle\n"
        f"Lifecycle(load_config(Path(sys.argv[1]))).{call}\n"
    )
    env = {**os.environ, "EDGEPACK_FAULT_KILL_AT": state}
    done = subprocess.run(
        [sys.executable, "-c", script, str(root / "agent.toml")],
        env=env, capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    agent = start_agent(root, keys)  # resumes the interrupted operation
    try:
        model = agent.status()["models"]["iris"]
        if op == "promote":
            assert (model["active"], model["previous"], model["serving"]) == (2, 1, 2)
        else:
            assert (model["active"], model["serving"]) == (1, 1)
            assert not (root / "state" / "models" / "iris" / "2").exists()
        assert model["candidate"] is None
        assert agent.experiments.get("iris") is None
    finally:
        agent.stop()
