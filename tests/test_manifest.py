"""manifest.json: round trip, and every malformed field named in the error."""

from __future__ import annotations

import json
from typing import Any

import pytest

from edgepack.agent.exceptions import ManifestError
from edgepack.formats.manifest import (
    FORMAT_VERSION,
    Manifest,
    TensorSpec,
    check_model_name,
    parse_manifest,
)


def _manifest() -> Manifest:
    return Manifest(
        name="churn",
        version=7,
        profile="arm64-cpu",
        task="classification",
        family="neural",
        precision="int8",
        inputs=(TensorSpec("input", "float32", (None, 4), ("a", "b", "c", "d")),),
        outputs=(
            TensorSpec("label", "int64", (None,)),
            TensorSpec("probabilities", "float32", (None, 3)),
        ),
        compatibility={"profile": "arm64-cpu", "arch": ["aarch64"]},
        runtime={"providers": ["CPUExecutionProvider"]},
        parity={"passed": True},
        health={"atol": 0.05},
        source={"sha256": "00"},
        created="2026-11-26T00:00:00+00:00",
        packager_version="0.1.0",
        quantization={"mode": "static"},
        labels=(0, 1, 2),
    )


def test_round_trip_is_exact_and_canonical() -> None:
    manifest = _manifest()
    raw = manifest.to_json()
    assert parse_manifest(raw) == manifest
    assert parse_manifest(raw).to_json() == raw
    assert manifest.bundle_stem == "churn-7-arm64-cpu"


def _mutated(change: dict[str, Any], drop: str | None = None) -> bytes:
    data = json.loads(_manifest().to_json())
    data.update(change)
    if drop:
        del data[drop]
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    ("raw", "phrase"),
    [
        (b"{not json", "not valid JSON"),
        (b"[]", "JSON object"),
        (_mutated({"format": "other"}), "'format'"),
        (_mutated({"format_version": FORMAT_VERSION + 1}), "upgrade edgepack"),
        (_mutated({}, drop="version"), "missing field 'version'"),
        (_mutated({"version": "7"}), "'version' must be int"),
        (_mutated({"version": True}), "must not be a boolean"),
        (_mutated({"version": -1}), "non-negative"),
        (_mutated({"name": "../evil"}), "model name"),
        (_mutated({"task": "magic"}), "'task'"),
        (_mutated({"precision": "int4"}), "'precision'"),
        (_mutated({"inputs": []}), "at least one input"),
        (
            _mutated({"inputs": [{"name": "x", "dtype": "complex", "shape": [1]}]}),
            "inputs[0].dtype",
        ),
        (_mutated({"inputs": [{"name": "x", "dtype": "float32", "shape": [-1]}]}), "bad dimension"),
        (_mutated({"outputs": [{"dtype": "float32", "shape": [1]}]}), "outputs[0].name"),
        (_mutated({"quantization": "yes"}), "'quantization'"),
    ],
)
def test_malformed_manifest_names_the_field(raw: bytes, phrase: str) -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest(raw)
    assert phrase in str(info.value)


@pytest.mark.parametrize("name", ["", "-x", "a/b", "a b", "x" * 65, "..", "é"])
def test_bad_model_names_are_refused(name: str) -> None:
    with pytest.raises(ManifestError):
        check_model_name(name)


@pytest.mark.parametrize("name", ["churn", "Churn_v2.onnx", "a", "x" * 64])
def test_good_model_names_pass(name: str) -> None:
    assert check_model_name(name) == name
