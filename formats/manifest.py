"""The bundle's ``manifest.json``: what the model is, what it was built for, how well it matched.

The packager fills a :class:`Manifest` and writes it with :meth:`Manifest.to_json`; the agent and
``edgepack verify``/``inspect`` read it with :func:`parse_manifest`, which validates the schema and
raises :class:`~edgepack.agent.exceptions.ManifestError` naming the field that is wrong. Parsing
does no I/O.

The schema is documented for third parties in ``docs/bundle-format.md``; keep the two in step.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from edgepack.formats.exceptions import ManifestError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "Manifest",
    "TensorSpec",
    "check_model_name",
    "parse_manifest",
]

FORMAT = "edgepack-bundle"
FORMAT_VERSION = 1

# Model names become file and MQTT topic names: keep them boring.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_DTYPES = frozenset(
    {"float32", "float64", "float16", "int64", "int32", "int8", "uint8", "bool", "string"}
)
_PRECISIONS = frozenset({"fp32", "fp16", "int8"})
_TASKS = frozenset({"classification", "regression", "anomaly", "tensor"})


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output.

    ``shape`` uses ``None`` for a dynamic dimension (the batch). ``columns`` names the features
    packed along the last axis of an input (or is the single column a per-column input carries);
    drift statistics and the HTTP API use these names.
    """

    name: str
    dtype: str
    shape: tuple[int | None, ...]
    columns: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.columns:
            out["columns"] = list(self.columns)
        return out


@dataclass(frozen=True)
class Manifest:
    """Everything a device needs to decide whether and how to run a bundle's model."""

    name: str
    version: int
    profile: str
    task: str
    family: str
    precision: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    compatibility: Mapping[str, Any]
    runtime: Mapping[str, Any]
    parity: Mapping[str, Any]
    health: Mapping[str, Any]
    source: Mapping[str, Any]
    created: str
    packager_version: str
    quantization: Mapping[str, Any] | None = None
    labels: tuple[Any, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)
    # the precision candidates the packager measured (docs/bundle-format.md §3.6); optional,
    # absent from older bundles; the agent does not need it
    candidates: tuple[Mapping[str, Any], ...] = ()
    # rows every run of model.onnx must have (its inputs' first dimension is this fixed value);
    # None, and absent from the file, for a dynamic batch and in older bundles
    fixed_batch: int | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["inputs"] = [t.to_dict() for t in self.inputs]
        data["outputs"] = [t.to_dict() for t in self.outputs]
        data["labels"] = list(self.labels)
        data["candidates"] = [dict(c) for c in self.candidates]
        if not self.candidates:
            del data["candidates"]
        if self.fixed_batch is None:
            del data["fixed_batch"]
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **data}

    def to_json(self) -> bytes:
        """Canonical JSON (sorted keys, UTF-8, final newline): equal manifests, equal bytes."""
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode()

    @property
    def bundle_stem(self) -> str:
        """``NAME-VERSION-PROFILE``: the bundle's file stem and its top-level directory."""
        return f"{self.name}-{self.version}-{self.profile}"


def check_model_name(name: str) -> str:
    """Return ``name`` if it is a valid model name, else raise :class:`ManifestError`."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ManifestError(
            f"model name {name!r} must be 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def _req(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in data:
        raise ManifestError(f"manifest.json: missing field '{where}{key}'")
    value = data[key]
    # bool is an int in Python; a version of `true` is still wrong.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ManifestError(f"manifest.json: field '{where}{key}' must not be a boolean")
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ManifestError(
            f"manifest.json: field '{where}{key}' must be {names}, got {type(value).__name__}"
        )
    return value


def _tensor(data: Any, where: str) -> TensorSpec:
    if not isinstance(data, dict):
        raise ManifestError(f"manifest.json: '{where}' must be an object")
    name = _req(data, "name", str, f"{where}.")
    dtype = _req(data, "dtype", str, f"{where}.")
    if dtype not in _DTYPES:
        raise ManifestError(f"manifest.json: '{where}.dtype' {dtype!r} is not a known dtype")
    shape = _req(data, "shape", list, f"{where}.")
    for dim in shape:
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 0):
            raise ManifestError(f"manifest.json: '{where}.shape' has a bad dimension {dim!r}")
    columns = data.get("columns", [])
    if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
        raise ManifestError(f"manifest.json: '{where}.columns' must be a list of strings")
    return TensorSpec(name=name, dtype=dtype, shape=tuple(shape), columns=tuple(columns))


def _optional_object(data: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ManifestError(f"manifest.json: '{key}' must be an object")
    return value


def parse_manifest(raw: bytes) -> Manifest:
    """Parse and validate ``manifest.json`` bytes.

    Raises:
        ManifestError: not JSON, another format or a newer format version, or a field missing
            or of the wrong type. The message names the field.
    """
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"manifest.json is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ManifestError("manifest.json must hold a JSON object")
    if data.get("format") != FORMAT:
        raise ManifestError(
            f"manifest.json: 'format' must be {FORMAT!r}, got {data.get('format')!r}"
        )
    version = _req(data, "format_version", int, "")
    if version < 1:
        raise ManifestError(f"manifest.json: 'format_version' {version} is not valid")
    if version > FORMAT_VERSION:
        raise ManifestError(
            f"manifest.json: bundle format version {version} is newer than this edgepack "
            f"understands ({FORMAT_VERSION}); upgrade edgepack"
        )
    name = _req(data, "name", str, "")
    try:
        check_model_name(name)
    except ManifestError as e:
        raise ManifestError(f"manifest.json: {e}") from None
    model_version = _req(data, "version", int, "")
    if model_version < 0:
        raise ManifestError("manifest.json: 'version' must be a non-negative integer")
    task = _req(data, "task", str, "")
    if task not in _TASKS:
        raise ManifestError(f"manifest.json: 'task' must be one of {sorted(_TASKS)}, got {task!r}")
    precision = _req(data, "precision", str, "")
    if precision not in _PRECISIONS:
        raise ManifestError(f"manifest.json: 'precision' {precision!r} is not fp32, fp16 or int8")
    inputs = _req(data, "inputs", list, "")
    outputs = _req(data, "outputs", list, "")
    if not inputs or not outputs:
        raise ManifestError("manifest.json: a model needs at least one input and one output")
    quantization = data.get("quantization")
    if quantization is not None and not isinstance(quantization, dict):
        raise ManifestError("manifest.json: 'quantization' must be an object or null")
    profile = _req(data, "profile", str, "")
    compatibility = _req(data, "compatibility", dict, "")
    if compatibility.get("profile", profile) != profile:
        raise ManifestError(
            f"manifest.json: 'profile' {profile!r} disagrees with compatibility.profile "
            f"{compatibility.get('profile')!r}"
        )
    labels = data.get("labels", [])
    if not isinstance(labels, list):
        raise ManifestError("manifest.json: 'labels' must be a list")
    candidates = data.get("candidates", [])
    if not isinstance(candidates, list) or not all(isinstance(c, dict) for c in candidates):
        raise ManifestError("manifest.json: 'candidates' must be a list of objects")
    fixed_batch = data.get("fixed_batch")
    if fixed_batch is not None and (
        isinstance(fixed_batch, bool) or not isinstance(fixed_batch, int) or fixed_batch < 1
    ):
        raise ManifestError(
            f"manifest.json: 'fixed_batch' must be a positive integer or null, got {fixed_batch!r}"
        )
    return Manifest(
        name=name,
        version=model_version,
        profile=profile,
        task=task,
        family=_req(data, "family", str, ""),
        precision=precision,
        inputs=tuple(_tensor(t, f"inputs[{i}]") for i, t in enumerate(inputs)),
        outputs=tuple(_tensor(t, f"outputs[{i}]") for i, t in enumerate(outputs)),
        compatibility=compatibility,
        runtime=_req(data, "runtime", dict, ""),
        parity=_req(data, "parity", dict, ""),
        health=_req(data, "health", dict, ""),
        source=_req(data, "source", dict, ""),
        created=_req(data, "created", str, ""),
        packager_version=_req(data, "packager_version", str, ""),
        quantization=quantization,
        labels=tuple(labels),
        extra=_optional_object(data, "extra"),
        candidates=tuple(candidates),
        fixed_batch=fixed_batch,
    )
