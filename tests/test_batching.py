"""Dynamic batching: the batcher alone (a plain function as the model, so every batch is seen),
then through the runtime and over HTTP with a real iris bundle and real onnxruntime sessions."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import KeyPair, write_agent_config

from edgepack.agent._batching import Batcher, Pending
from edgepack.agent._config import load_config
from edgepack.agent._daemon import Agent
from edgepack.agent.exceptions import InferenceError, RequestError

WAIT = 30.0


class Model:
    """Doubles its input; fails on a row holding -1; records every batch it was given."""

    def __init__(self, scalar: bool = False) -> None:
        self.batches: list[int] = []
        self.scalar = scalar
        self.lock = threading.Lock()

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        x = feeds["x"]
        with self.lock:
            self.batches.append(len(x))
        if (x == -1).any():
            raise InferenceError("the model failed on a row of -1")
        out = [x * 2, x.sum(axis=1)]
        return [np.float32(out[1].sum()), *out] if self.scalar else out


def pending(value: float, rows: int = 1, width: int = 3) -> Pending:
    return Pending({"x": np.full((rows, width), value, np.float32)}, rows)


def submit_together(batcher: Batcher, items: list[Pending]) -> None:
    gate = threading.Barrier(len(items))

    def go(item: Pending) -> None:
        gate.wait(WAIT)
        assert batcher.submit(item)

    threads = [threading.Thread(target=go, args=(item,)) for item in items]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    for item in items:
        assert item.wait(WAIT), "a request got no answer"


def test_concurrent_requests_run_as_one_batch_and_each_gets_its_rows() -> None:
    model = Model()
    batcher = Batcher(model, "m v1", max_delay=WAIT, max_rows=8)  # runs once 8 rows wait
    items = [pending(float(i)) for i in range(8)]
    submit_together(batcher, items)
    batcher.stop()
    assert model.batches == [8]
    for i, item in enumerate(items):
        assert item.error is None
        assert item.result is not None
        np.testing.assert_array_equal(item.result[0], np.full((1, 3), 2.0 * i, np.float32))
        np.testing.assert_array_equal(item.result[1], [3.0 * i])
    assert (batcher.batches, batcher.requests) == (1, 8)


def test_a_failing_batch_is_rerun_alone_so_only_the_guilty_request_fails() -> None:
    model = Model()
    batcher = Batcher(model, "m v1", max_delay=WAIT, max_rows=4)
    items = [pending(1.0), pending(-1.0), pending(3.0), pending(4.0)]
    submit_together(batcher, items)
    batcher.stop()
    assert model.batches[0] == 4
    assert sorted(model.batches[1:]) == [1, 1, 1, 1]
    assert isinstance(items[1].error, InferenceError)
    for item in (items[0], items[2], items[3]):
        assert item.error is None
        assert item.result is not None


def test_an_output_without_a_batch_dimension_stops_batching_that_model() -> None:
    model = Model(scalar=True)
    batcher = Batcher(model, "m v1", max_delay=WAIT, max_rows=2)
    items = [pending(1.0), pending(2.0)]
    submit_together(batcher, items)
    assert all(item.error is None and item.result is not None for item in items)
    assert items[1].result is not None
    assert float(items[1].result[0]) == 6.0  # its own run: the scalar is of its rows alone
    assert not batcher.splittable
    assert not batcher.submit(pending(5.0))  # its caller runs it from now on
    batcher.stop()


def test_requests_of_other_shapes_wait_for_a_batch_of_their_own() -> None:
    model = Model()
    batcher = Batcher(model, "m v1", max_delay=0.05, max_rows=64)
    items = [pending(1.0), pending(2.0, width=5), pending(3.0), pending(4.0, width=5)]
    submit_together(batcher, items)
    batcher.stop()
    assert sum(model.batches) == 4
    for item in items:
        assert item.error is None
        assert item.result is not None
        assert item.result[0].shape == item.feeds["x"].shape


def test_a_full_queue_sends_requests_back_to_their_callers() -> None:
    block = threading.Event()

    def slow(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        block.wait(WAIT)
        return [feeds["x"]]

    batcher = Batcher(slow, "m v1", max_delay=0.0, max_rows=1, max_waiting=2)
    first = pending(1.0)
    assert batcher.submit(first)
    accepted = [batcher.submit(pending(2.0)) for _ in range(4)]
    assert accepted.count(False) >= 2  # at most max_waiting wait, the rest run alone
    block.set()
    assert first.wait(WAIT)
    batcher.stop()


# --- through the runtime and over HTTP ---------------------------------------------------------


@pytest.fixture
def batching_agent(tmp_path: Path, keys: KeyPair, iris_bundles: dict[str, Path]) -> Iterator[Agent]:
    path = write_agent_config(tmp_path, keys)
    text = path.read_text()
    runtime = "[runtime]\nbatch_delay_ms = 1000\nbatch_rows = 8\n"
    path.write_text(
        text.replace("[runtime]\n", runtime) if "[runtime]\n" in text else text + runtime
    )
    agent = Agent(load_config(path)).start(serve_http=True)
    assert agent.install(str(iris_bundles["v1"])).ok
    yield agent
    agent.stop()


def rows(n: int) -> np.ndarray:
    rng = np.random.default_rng(n)
    centre = np.asarray([5.8, 3.0, 3.7, 1.2])
    return (rng.normal(size=(n, 4)) + centre).astype(np.float32)


def test_the_runtime_batches_concurrent_callers_and_answers_as_alone(
    batching_agent: Agent,
) -> None:
    agent = batching_agent
    served = agent.runtime.get("iris")
    assert agent.runtime.batching(served)
    inputs = [rows(1 + i % 3) for i in range(8)]
    alone = [
        dict(zip(served.output_names, served.session.run(None, {"input": x}), strict=True))
        for x in inputs
    ]
    got: list[Any] = [None] * len(inputs)
    gate = threading.Barrier(len(inputs))

    def call(i: int) -> None:
        gate.wait(WAIT)
        got[i] = agent.infer("iris", {"input": inputs[i]})

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    for want, answer in zip(alone, got, strict=True):
        assert answer is not None
        for name, value in want.items():
            np.testing.assert_allclose(answer[name], value, rtol=0, atol=1e-6)
    (batcher,) = agent.runtime._batchers.values()
    assert batcher.requests == len(inputs)
    assert batcher.batches < len(inputs)  # coalesced
    counted = re.search(
        r'^edgepack_requests_total\{model="iris",version="1",outcome="ok"\} (\d+)',
        agent.metrics(),
        re.M,
    )
    assert counted is not None
    assert int(counted[1]) == len(inputs)  # each request counted once, not once per batch
    with pytest.raises(RequestError):  # validation still happens on the caller's thread
        agent.infer("iris", {"input": np.zeros((1, 3), np.float32)})


def test_batched_requests_over_http_answer_each_client(batching_agent: Agent) -> None:
    assert batching_agent.server is not None
    url = batching_agent.server.url
    inputs = [rows(1 + i % 2) for i in range(8)]
    answers: list[Any] = [None] * len(inputs)
    gate = threading.Barrier(len(inputs))

    def call(i: int) -> None:
        body = {
            "inputs": [
                {"name": "input", "shape": list(inputs[i].shape), "datatype": "FP32",
                 "data": inputs[i].ravel().tolist()}
            ]
        }  # fmt: skip
        with httpx.Client(base_url=url, timeout=WAIT) as client:
            gate.wait(WAIT)
            answers[i] = client.post("/v2/models/iris/infer", json=body)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    for x, response in zip(inputs, answers, strict=True):
        assert response is not None
        assert response.status_code == 200, response.text
        out = {o["name"]: o for o in response.json()["outputs"]}
        want = batching_agent.runtime.get("iris").session.run(None, {"input": x})
        np.testing.assert_array_equal(np.asarray(out["label"]["data"]), want[0].ravel())
        assert out["probabilities"]["shape"] == [len(x), 3]
    (batcher,) = batching_agent.runtime._batchers.values()
    assert batcher.requests == len(inputs)
    assert batcher.batches < len(inputs)  # one HTTP worker thread, and still coalesced
