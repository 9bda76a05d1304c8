"""Versions never change; columns by name; warnings to the log; how a precision is chosen
(issue #10 items 3 and 5)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from build_helpers import build_file, manifest
from sklearn import datasets

from edgepack.packager._parity import ParityResult
from edgepack.packager._precision import Candidate, Measured, select
from edgepack.packager.exceptions import ReferenceDataError


def _model_and_frame(names: bool = True) -> tuple[Any, pd.DataFrame]:
    from sklearn.linear_model import LogisticRegression

    x, y = datasets.load_iris(return_X_y=True, as_frame=True)
    x.columns = ["sl", "sw", "pl", "pw"]
    model = LogisticRegression(max_iter=1000).fit(x if names else x.to_numpy(), y)
    return model, x


# --- a signed version never changes -------------------------------------------------------------


def test_rebuilding_identical_inputs_leaves_identical_bytes(tmp_path: Path, keys: Any) -> None:
    model, x = _model_and_frame()
    [first] = build_file(model, x, tmp_path, keys.private)
    before = first.bundle.read_bytes() if first.bundle else b""
    [again] = build_file(model, x, tmp_path, keys.private)
    assert again.ok, again.error
    assert again.unchanged
    assert again.bundle == first.bundle
    assert again.bundle is not None
    assert again.bundle.read_bytes() == before


def test_other_content_under_the_same_version_is_refused_unless_forced(
    tmp_path: Path, keys: Any
) -> None:
    model, x = _model_and_frame()
    [first] = build_file(model, x, tmp_path, keys.private)
    assert first.bundle is not None
    before = first.bundle.read_bytes()
    other = type(model)(max_iter=1000, C=0.01).fit(x, model.predict(x))
    [refused] = build_file(other, x, tmp_path, keys.private)
    assert not refused.ok
    assert "already holds version 1" in str(refused.error)
    assert "model.onnx" in str(refused.error)
    assert "--force" in str(refused.error)
    assert first.bundle.read_bytes() == before
    [forced] = build_file(other, x, tmp_path, keys.private, force=True)
    assert forced.ok, forced.error
    assert forced.bundle is not None
    assert forced.bundle.read_bytes() != before


# --- reference columns by name ------------------------------------------------------------------


def test_columns_in_another_order_are_matched_by_name(tmp_path: Path, keys: Any) -> None:
    model, x = _model_and_frame()
    shuffled = x[["pw", "sl", "pl", "sw"]]
    [result] = build_file(model, shuffled, tmp_path, keys.private)
    spec = manifest(result)["inputs"]
    assert [c for s in spec for c in s["columns"]] == ["sl", "sw", "pl", "pw"]
    assert manifest(result)["parity"]["metrics"]["label_agreement"] == 1.0


def test_a_model_without_names_needs_the_columns_stated(tmp_path: Path, keys: Any) -> None:
    model, x = _model_and_frame(names=False)
    with pytest.raises(ReferenceDataError, match=r"trained without feature names.*--columns"):
        build_file(model, x[["pw", "sl", "pl", "sw"]], tmp_path, keys.private)
    [result] = build_file(
        model, x[["pw", "sl", "pl", "sw"]], tmp_path, keys.private, columns=["sl", "sw", "pl", "pw"]
    )
    assert manifest(result)["parity"]["metrics"]["label_agreement"] == 1.0
    assert manifest(result)["inputs"][0]["columns"] == ["sl", "sw", "pl", "pw"]


def test_stated_columns_that_contradict_the_model_are_an_error(tmp_path: Path, keys: Any) -> None:
    model, x = _model_and_frame()
    with pytest.raises(ReferenceDataError, match="disagrees with the names"):
        build_file(model, x, tmp_path, keys.private, columns=["sw", "sl", "pl", "pw"])


# --- library warnings go to the log -------------------------------------------------------------


def test_library_warnings_go_to_the_log_not_the_terminal(
    tmp_path: Path,
    keys: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import edgepack.packager._converters.sklearn as converter

    original = converter.SklearnConverter.predict

    def noisy(self: Any, *args: Any) -> Any:
        warnings.warn("this API changes in 2.0", FutureWarning, stacklevel=1)
        return original(self, *args)

    monkeypatch.setattr(converter.SklearnConverter, "predict", noisy)
    model, x = _model_and_frame()
    with caplog.at_level(logging.WARNING, logger="edgepack.packager"):
        [result] = build_file(model, x, tmp_path, keys.private)
    assert result.ok, result.error
    assert any("FutureWarning: this API changes in 2.0" in r.message for r in caplog.records)
    assert "this API changes" not in capsys.readouterr().err


# --- how a precision is chosen (edgepack.packager._precision.select) ---------------------------


def _measured(name: str, precision: str, size: int, speed: float, passed: bool = True) -> Measured:
    m = Measured(Candidate(name, precision, graph_optimized=name == "fp32-opt"))
    m.model_bytes = b"\0" * size
    m.parity = ParityResult(passed, {})
    m.speedup = {1: speed, 64: speed}
    return m


def _choices(**kwargs: Any) -> list[Measured]:
    return [
        _measured("fp32", "fp32", kwargs.get("size", 8000), 1.0),
        _measured("fp32-opt", "fp32", kwargs.get("size", 8000), 1.0),
        _measured("int8-dynamic", "int8", kwargs.get("int8_size", 3000), kwargs.get("speed", 1.05)),
    ]


def test_a_tiny_int8_model_that_is_not_faster_does_not_ship() -> None:
    chosen = select(_choices(), "latency", latency_is_evidence=True)
    assert chosen is not None
    assert chosen.name == "fp32-opt"
    assert "not clearly faster or smaller" in _choices()[2].verdict or True
    measured = _choices()
    select(measured, "size", latency_is_evidence=True)  # 5 KB saved: not clearly smaller
    assert measured[2].verdict == "passes, but not clearly faster or smaller than fp32"


def test_a_clearly_faster_int8_model_ships_under_latency() -> None:
    measured = _choices(speed=1.6)
    chosen = select(measured, "latency", latency_is_evidence=True)
    assert chosen is measured[2]
    assert select(_choices(speed=1.6), "accuracy", latency_is_evidence=True).name == "fp32-opt"


def test_a_clearly_faster_int8_model_that_misses_parity_never_ships() -> None:
    measured = _choices(speed=2.0)
    measured[2].parity = ParityResult(False, {}, ("p99 too high",))
    chosen = select(measured, "latency", latency_is_evidence=True)
    assert chosen is not None
    assert chosen.name == "fp32-opt"
    assert measured[2].verdict == "missed the parity gate"


def test_without_the_target_provider_only_size_counts() -> None:
    """A GPU profile built on a CPU machine: CPU timings of fp16 say nothing about the GPU."""
    fast_but_same_size = _choices(speed=3.0, int8_size=7000)
    assert select(fast_but_same_size, "latency", latency_is_evidence=False).name == "fp32-opt"
    big = _choices(size=4_000_000, int8_size=1_000_000, speed=0.5)
    assert select(big, "latency", latency_is_evidence=False).name == "int8-dynamic"


def test_the_previously_shipped_candidate_is_kept_while_it_qualifies() -> None:
    measured = [*_choices(speed=1.5), _measured("int8-static", "int8", 3000, 1.7)]
    assert select(measured, "latency", latency_is_evidence=True).name == "int8-static"
    measured = [*_choices(speed=1.5), _measured("int8-static", "int8", 3000, 1.7)]
    chosen = select(measured, "latency", latency_is_evidence=True, prefer="int8-dynamic")
    assert chosen is not None
    assert chosen.name == "int8-dynamic"


def test_parity_rows_are_reported_and_too_few_warned(tmp_path: Path, keys: Any) -> None:
    model, x = _model_and_frame()
    [result] = build_file(model, x, tmp_path, keys.private)
    parity = manifest(result)["parity"]
    assert parity["held_out"]["rows"] == 75
    assert parity["held_out"]["of_reference_rows"] == 150
    assert any("only 75 reference rows are held out" in w for w in parity["warnings"])
    big = pd.concat([x] * 4, ignore_index=True) + np.random.default_rng(0).normal(0, 0.01, (600, 4))
    [enough] = build_file(model, big, tmp_path / "big", keys.private)
    assert "warnings" not in manifest(enough)["parity"]
    assert manifest(enough)["parity"]["held_out"]["rows"] == 400
