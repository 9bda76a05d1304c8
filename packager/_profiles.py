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
file and the dotted field, e.g. ``[quantization].weight_type``.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from packaging.specifiers import InvalidSpecifier, SpecifierSet

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


# --- the schema, as one table of field checks --------------------------------------------------


class _InvalidError(Exception):
    """A value failed its check; the text completes '<field> must be ...'."""


_Check = Callable[[Any], Any]


def _number(lo: float, hi: float | None = None, *, integer: bool = False) -> _Check:
    what = "an integer" if integer else "a number"
    what += f" >= {lo}" if hi is None else f" equal to {lo}" if lo == hi else f" in [{lo}, {hi}]"

    def check(v: Any) -> Any:
        types = int if integer else (int, float)
        if isinstance(v, bool) or not isinstance(v, types) or not math.isfinite(v):
            raise _InvalidError(what)
        if v < lo or (hi is not None and v > hi):
            raise _InvalidError(what)
        return v if integer else float(v)

    return check


def _int(lo: int, hi: int | None = None) -> _Check:
    return _number(lo, hi, integer=True)


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _InvalidError("true or false")
    return v


def _str(choices: Sequence[str] = (), pattern: str = r".+") -> _Check:
    def check(v: Any) -> str:
        if choices and (not isinstance(v, str) or v not in choices):
            raise _InvalidError(f"one of {', '.join(choices)}")
        if not isinstance(v, str) or not re.fullmatch(pattern, v):
            raise _InvalidError(
                "a non-empty string" if pattern == r".+" else f"a string like {pattern}"
            )
        return v

    return check


def _str_list(
    choices: Sequence[str] = (), *, scalar_ok: bool = False, empty_ok: bool = False
) -> _Check:
    item = _str(choices)

    def check(v: Any) -> tuple[str, ...]:
        if scalar_ok and isinstance(v, str):
            v = [v]
        what = "a list of strings" + (" (or one string)" if scalar_ok else "")
        if not isinstance(v, list) or (not v and not empty_ok):
            raise _InvalidError(what + ("" if empty_ok else ", not empty"))
        try:
            items = tuple(item(x) for x in v)
        except _InvalidError as e:
            raise _InvalidError(f"{what}, each {e}") from None
        if len(set(items)) != len(items):
            raise _InvalidError(f"{what} without duplicates")
        return items

    return check


def _specifier(v: Any) -> str:
    try:
        if isinstance(v, str) and v.strip() and SpecifierSet(v) is not None:
            return v
    except InvalidSpecifier:
        pass
    raise _InvalidError("a PEP 440 version specifier such as '>=1.17,<2'")


_TOLERANCE = {
    "min_label_agreement": _number(0.0, 1.0),
    "max_probability_error": _number(0.0, 1.0),
    "max_relative_error": _number(0.0),
}

# table name ("" = top level) -> field -> check; every field is required, no other key allowed.
_SCHEMA: dict[str, dict[str, _Check]] = {
    "": {
        "schema": _int(SCHEMA_VERSION, SCHEMA_VERSION),
        "id": _str(pattern=r"[a-z0-9][a-z0-9._-]*"),
        "description": _str(),
        "arch": _str_list(ARCHES, scalar_ok=True),
        "isa": _str_list(empty_ok=True),
        "onnxruntime": _specifier,
        "max_opset": _int(7),
        "max_ml_opset": _int(1),
        "max_ir_version": _int(3),
        "providers": _str_list(),
        "model_format": _str(("onnx",)),
    },
    "precision": {family: _str(PRECISIONS) for family in FAMILIES},
    "quantization": {
        "format": _str(("qdq", "qoperator")),
        "mode": _str(("static", "dynamic")),
        "weight_type": _str(("int8", "uint8")),
        "activation_type": _str(("int8", "uint8")),
        "per_channel": _bool,
        "reduce_range": _bool,
        "calibration_method": _str(("minmax", "entropy", "percentile")),
        "calibration_samples": _int(1),
    },
    "threads": {"intra_op": _int(0), "inter_op": _int(0)},
    "budgets": {"max_model_bytes": _int(1), "max_memory_bytes": _int(1)},
}


def _field(table: str, key: str) -> str:
    return f"[{table}].{key}" if table else key


def _check_table(src: Path, table: str, data: Any, spec: Mapping[str, _Check]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ProfileError(f"{src}: [{table}] must be a table")
    for key in data:
        if key not in spec:
            near = difflib.get_close_matches(key, spec, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ProfileError(f"{src}: unknown key {_field(table, key)}{hint}")
    out: dict[str, Any] = {}
    for key, check in spec.items():
        if key not in data:
            raise ProfileError(f"{src}: missing required field {_field(table, key)}")
        try:
            out[key] = check(data[key])
        except _InvalidError as e:
            raise ProfileError(
                f"{src}: {_field(table, key)} must be {e}, got {data[key]!r}"
            ) from None
    return out


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
