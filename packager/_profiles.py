"""Device profiles: what a class of edge device can run, and how to build for it.

A profile is a small TOML file in ``device-profiles/`` (one per device class, the file stem is
its id). It says which CPU architectures and onnxruntime versions the device has, the highest
ONNX opset and IR version its runtime accepts, the execution providers to ask for, and, per
model family (tree ensembles, linear models, neural nets), whether to ship the graph in fp32,
int8 or fp16. It also holds the quantization recipe, the size budget the bundle must fit, and
the parity tolerances the packaged model must meet against the source model.

The builder reads a profile at each step: conversion targets ``max_opset``/``max_ml_opset``,
optimization picks :meth:`Profile.precision_for` the model's family and quantizes with
:attr:`Profile.quantization`, the parity gate checks :meth:`Profile.tolerance_for` that
precision, and :meth:`Profile.compatibility` goes into the bundle manifest so the agent can
refuse a bundle built for another device.

Loading is strict: a wrong type, an out-of-range number, an unknown key (a typo must not pass
silently) or a missing field is a :class:`~edgepack.packager.exceptions.ProfileError` naming the
file and the dotted field, e.g. ``[quantization].weight_type``. The checking is the one shared
with ``agent.toml`` (edgepack._tables); this module only says what each field must be.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from packaging.specifiers import InvalidSpecifier, SpecifierSet

from edgepack._tables import (
    Check,
    InvalidValueError,
    boolean,
    check_table,
    integer,
    number,
    string,
    string_list,
)
from edgepack.packager.exceptions import ProfileError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "DEFAULT_PROFILE_DIR",
    "FAMILIES",
    "PRECISIONS",
    "Budgets",
    "Precision",
    "Profile",
    "Quantization",
    "Threads",
    "Tolerance",
    "get_profile",
    "load_profile",
    "load_profiles",
]

Precision = Literal["fp32", "int8", "fp16"]
PRECISIONS: tuple[str, ...] = ("fp32", "int8", "fp16")
FAMILIES: tuple[str, ...] = ("tree", "linear", "neural", "other")
ARCHES: tuple[str, ...] = ("x86_64", "aarch64", "armv7l")
SCHEMA_VERSION = 1


def _default_profile_dir() -> Path:
    """$EDGEPACK_PROFILE_DIR, else the checkout's device-profiles/, else the installed copy."""
    env = os.environ.get("EDGEPACK_PROFILE_DIR")
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parent.parent / "device-profiles"
    installed = Path(sys.prefix) / "share" / "edgepack" / "device-profiles"
    return checkout if checkout.is_dir() or not installed.is_dir() else installed


DEFAULT_PROFILE_DIR: Path = _default_profile_dir()


@dataclass(frozen=True)
class Quantization:
    """How to quantize a graph whose family is shipped as int8 (onnxruntime.quantization)."""

    format: str  # "qdq" | "qoperator"
    mode: str  # "static" | "dynamic"
    weight_type: str  # "int8" | "uint8"
    activation_type: str  # "int8" | "uint8"
    per_channel: bool
    reduce_range: bool
    calibration_method: str  # "minmax" | "entropy" | "percentile"
    calibration_samples: int


@dataclass(frozen=True)
class Tolerance:
    """The parity gate for one precision: how far the packaged model may drift from the source."""

    min_label_agreement: float
    max_probability_error: float
    max_relative_error: float


@dataclass(frozen=True)
class Threads:
    """onnxruntime session threads on the device; 0 lets onnxruntime choose."""

    intra_op: int
    inter_op: int


@dataclass(frozen=True)
class Budgets:
    """Limits the bundle must respect on the device."""

    max_model_bytes: int
    max_memory_bytes: int


@dataclass(frozen=True)
class Profile:
    """One device class, as loaded and validated from ``source``.

    ``precision`` and ``tolerances`` are plain dicts (so a profile pickles into a worker
    process); treat them as read-only.
    """

    id: str
    description: str
    arch: tuple[str, ...]
    isa: tuple[str, ...]
    onnxruntime: str
    max_opset: int
    max_ml_opset: int
    max_ir_version: int
    providers: tuple[str, ...]
    model_format: str
    precision: Mapping[str, str]
    quantization: Quantization
    threads: Threads
    budgets: Budgets
    tolerances: Mapping[str, Tolerance]
    source: Path
    # what the measured precision choice optimizes (edgepack.packager._precision)
    objective: str = "latency"

    def precision_for(self, family: str) -> str:
        """The precision to ship a model of ``family`` (one of :data:`FAMILIES`) in.

        Raises:
            ValueError: ``family`` is not one of :data:`FAMILIES`.
        """
        if family not in FAMILIES:
            raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")
        return self.precision[family]

    def tolerance_for(self, precision: str) -> Tolerance:
        """The parity tolerance for ``precision``.

        Raises:
            ValueError: ``precision`` is not one of :data:`PRECISIONS`.
            ProfileError: the profile has no ``[tolerances.<precision>]`` table.
        """
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
        try:
            return self.tolerances[precision]
        except KeyError:
            raise ProfileError(
                f"{self.source}: [tolerances.{precision}] is missing but the build needs it"
            ) from None

    def compatibility(self) -> dict[str, Any]:
        """What the device must offer to run the bundle; JSON-ready, for the manifest."""
        return {
            "profile": self.id,
            "arch": list(self.arch),
            "providers": list(self.providers),
            "onnxruntime": self.onnxruntime,
            "max_opset": self.max_opset,
            "max_ml_opset": self.max_ml_opset,
            "max_ir_version": self.max_ir_version,
        }


# --- the schema, as one table of field checks (edgepack._tables) ------------------------------


def _specifier(v: Any) -> str:
    try:
        if isinstance(v, str) and v.strip() and SpecifierSet(v) is not None:
            return v
    except InvalidSpecifier:
        pass
    raise InvalidValueError("a PEP 440 version specifier such as '>=1.17,<2'")


def _choice(*choices: str) -> Check:
    return string(choices=choices)


def _names(*choices: str, scalar_ok: bool = False, empty_ok: bool = False) -> Check:
    item = string(choices=choices, empty_ok=False)
    return string_list(item, scalar_ok=scalar_ok, empty_ok=empty_ok, unique=True)


_TOLERANCE = {
    "min_label_agreement": number(0.0, 1.0),
    "max_probability_error": number(0.0, 1.0),
    "max_relative_error": number(0.0),
}

# table name ("" = top level) -> field -> check; every field is required, no other key allowed.
_SCHEMA: dict[str, dict[str, Check]] = {
    "": {
        "schema": integer(SCHEMA_VERSION, SCHEMA_VERSION),
        "id": string(pattern=r"[a-z0-9][a-z0-9._-]*"),
        "description": string(empty_ok=False),
        "arch": _names(*ARCHES, scalar_ok=True),
        "isa": _names(empty_ok=True),
        "onnxruntime": _specifier,
        "max_opset": integer(7),
        "max_ml_opset": integer(1),
        "max_ir_version": integer(3),
        "providers": _names(),
        "model_format": _choice("onnx"),
        "objective": _choice("latency", "size", "accuracy"),
    },
    "precision": {family: _choice(*PRECISIONS) for family in FAMILIES},
    "quantization": {
        "format": _choice("qdq", "qoperator"),
        "mode": _choice("static", "dynamic"),
        "weight_type": _choice("int8", "uint8"),
        "activation_type": _choice("int8", "uint8"),
        "per_channel": boolean,
        "reduce_range": boolean,
        "calibration_method": _choice("minmax", "entropy", "percentile"),
        "calibration_samples": integer(1),
    },
    "threads": {"intra_op": integer(0), "inter_op": integer(0)},
    "budgets": {"max_model_bytes": integer(1), "max_memory_bytes": integer(1)},
}


def _check_table(src: Path, table: str, data: Any, spec: Mapping[str, Check]) -> dict[str, Any]:
    required = [k for k in spec if k not in _OPTIONAL]
    return check_table(data, spec, source=src, error=ProfileError, table=table, required=required)


_OPTIONAL = frozenset({"objective"})  # fields with a default in Profile


def _parse(src: Path, doc: dict[str, Any]) -> Profile:
    tables = [t for t in _SCHEMA if t] + ["tolerances"]
    top = _check_table(src, "", {k: v for k, v in doc.items() if k not in tables}, _SCHEMA[""])
    for table in tables:
        if table not in doc:
            raise ProfileError(f"{src}: missing required table [{table}]")
    sub = {t: _check_table(src, t, doc[t], _SCHEMA[t]) for t in tables if t != "tolerances"}

    raw_tol = doc["tolerances"]
    tolerances: dict[str, Tolerance] = {}
    if not isinstance(raw_tol, dict):
        raise ProfileError(f"{src}: [tolerances] must be a table")
    for precision, table in raw_tol.items():
        if precision not in PRECISIONS:
            raise ProfileError(
                f"{src}: unknown key [tolerances].{precision} (one of {', '.join(PRECISIONS)})"
            )
        name = f"tolerances.{precision}"
        tolerances[precision] = Tolerance(**_check_table(src, name, table, _TOLERANCE))
    for needed in ("fp32", *sub["precision"].values()):
        if needed not in tolerances:
            why = "always required" if needed == "fp32" else f"[precision] uses {needed}"
            raise ProfileError(f"{src}: missing required table [tolerances.{needed}] ({why})")

    quant = Quantization(**sub["quantization"])
    if quant.format == "qoperator" and quant.activation_type == "int8":
        # onnxruntime's docs: S8S8 in QOperator format is slow on x86-64 and should be avoided;
        # S8S8 belongs in QDQ form, QOperator takes U8S8.
        raise ProfileError(
            f"{src}: [quantization].activation_type must be uint8 when format is 'qoperator'"
            " (use format = 'qdq' for int8 activations), got 'int8'"
        )
    if top["id"] != src.stem:
        raise ProfileError(f"{src}: id must equal the file name {src.stem!r}, got {top['id']!r}")

    return Profile(
        **{k: v for k, v in top.items() if k != "schema"},
        precision=sub["precision"],
        quantization=quant,
        threads=Threads(**sub["threads"]),
        budgets=Budgets(**sub["budgets"]),
        tolerances=tolerances,
        source=src,
    )


# --- loading -----------------------------------------------------------------------------------


def load_profile(path: Path) -> Profile:
    """Read and validate one profile file.

    Args:
        path: a ``<id>.toml`` file.

    Returns:
        The validated :class:`Profile`.

    Raises:
        ProfileError: the file is unreadable, not valid TOML (the message has the line), or
            breaks the schema (the message names the file and the dotted field).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"{path}: cannot read profile: {e}") from e
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{path}: not valid TOML: {e}") from e
    return _parse(path, doc)


def load_profiles(dirs: Sequence[Path] = ()) -> dict[str, Profile]:
    """Load every ``*.toml`` in :data:`DEFAULT_PROFILE_DIR`, then in each of ``dirs``.

    A profile in a later directory replaces one with the same id from an earlier one, so a
    user directory can override a shipped profile or add new ones.

    Returns:
        Profiles by id.

    Raises:
        ProfileError: a directory does not exist, or any profile in it is malformed.
    """
    profiles: dict[str, Profile] = {}
    for directory in (DEFAULT_PROFILE_DIR, *map(Path, dirs)):
        if not directory.is_dir():
            hint = " (set EDGEPACK_PROFILE_DIR)" if directory == DEFAULT_PROFILE_DIR else ""
            raise ProfileError(f"{directory}: profile directory does not exist{hint}")
        for path in sorted(directory.glob("*.toml")):
            profile = load_profile(path)
            profiles[profile.id] = profile
    return profiles


def get_profile(profile_id: str, dirs: Sequence[Path] = ()) -> Profile:
    """The profile called ``profile_id``, from the default directory and ``dirs``.

    Raises:
        ProfileError: no such profile (the message lists the known ids), or a profile is
            malformed.
    """
    profiles = load_profiles(dirs)
    try:
        return profiles[profile_id]
    except KeyError:
        known = ", ".join(sorted(profiles)) or "none"
        raise ProfileError(f"unknown device profile {profile_id!r}; known: {known}") from None
