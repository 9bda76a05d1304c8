"""Optional sample capture: off by default, rate limited, bounded, exported as CSV/Parquet."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from conftest import KeyPair, write_agent_config

from edgepack.agent._capture import SampleStore
from edgepack.agent._config import CaptureConfig, load_config
from edgepack.agent._daemon import Agent
from edgepack.agent.exceptions import ConfigError

COLUMNS = {"input": ["a", "b"]}


def _batch(rows: int, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    x = np.random.default_rng(seed).random((rows, 2)).astype(np.float32)
    return {"input": x}, {"label": (x[:, 0] > 0.5).astype(np.int64)}


def test_rate_limit_and_bound(tmp_path: Path) -> None:
    now = [1000.0]
    config = CaptureConfig(enabled=True, per_minute=60, max_rows=50)
    store = SampleStore(tmp_path / "s.db", config, clock=lambda: now[0])
    inputs, outputs = _batch(100)
    assert store.offer("m", 1, inputs, outputs, COLUMNS) == 60  # the bucket holds one minute
    assert store.offer("m", 1, inputs, outputs, COLUMNS) == 0  # empty until it refills
    assert store.count("m") == 50  # the bound keeps the newest rows
    now[0] += 1.5
    assert store.offer("m", 1, inputs, outputs, COLUMNS) == 1  # 1 row per second refills
    now[0] += 3600
    assert store.offer("m", 1, inputs, outputs, COLUMNS) == 60  # never more than a minute's
    assert store.count() == 50


def test_export_csv_and_parquet_round_trip(tmp_path: Path) -> None:
    store = SampleStore(tmp_path / "s.db", CaptureConfig(enabled=True, per_minute=10))
    inputs, outputs = _batch(5, seed=3)
    store.offer("m", 2, inputs, outputs, COLUMNS)
    assert store.export("m", tmp_path / "out.csv") == 5
    with (tmp_path / "out.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["a"]) for r in rows] == pytest.approx(inputs["input"][:, 0].tolist())
    assert [int(r["output.label"]) for r in rows] == outputs["label"].tolist()
    assert {r["version"] for r in rows} == {"2"}
    pq = pytest.importorskip("pyarrow.parquet")
    assert store.export("m", tmp_path / "out.parquet") == 5
    table = pq.read_table(tmp_path / "out.parquet").to_pydict()
    assert table["b"] == pytest.approx(inputs["input"][:, 1].tolist())


@pytest.mark.parametrize(
    ("table", "says"),
    [
        ("per_minute = -1", r"\[capture\]\.per_minute must be an integer >= 1, got -1"),
        ("max_rows = 1.5", r"\[capture\]\.max_rows must be an integer >= 1, got 1.5"),
        ("rate = 1", r"unknown key \[capture\]\.rate"),
    ],
)
def test_bad_capture_config_names_the_field(
    table: str, says: str, tmp_path: Path, keys: KeyPair
) -> None:
    path = write_agent_config(tmp_path, keys, extra=f"[capture]\n{table}\n")
    with pytest.raises(ConfigError, match=says):
        load_config(path)


def test_agent_captures_served_rows_only_when_enabled(
    tmp_path: Path, keys: KeyPair, iris_bundles: dict[str, Path]
) -> None:
    rows = np.random.default_rng(0).random((8, 4)).astype(np.float32)
    off = Agent(load_config(write_agent_config(tmp_path / "off", keys))).start(serve_http=False)
    with off:
        assert off.samples is None
    config = write_agent_config(
        tmp_path / "on", keys, extra="[capture]\nenabled = true\nper_minute = 600\n"
    )
    with Agent(load_config(config)).start(serve_http=False) as agent:
        assert agent.install(str(iris_bundles["v1"])).ok
        labels = agent.infer("iris", {"input": rows})["label"]
        agent.monitor.tick()
        assert agent.samples is not None
        assert agent.samples.count("iris") == 8
        assert agent.samples.export("iris", tmp_path / "x.csv") == 8
    with (tmp_path / "x.csv").open() as handle:
        exported = list(csv.DictReader(handle))
    assert [int(r["output.label"]) for r in exported] == labels.tolist()
    assert float(exported[0]["sepal length (cm)"]) == pytest.approx(float(rows[0, 0]))
