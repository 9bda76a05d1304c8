"""``edgepack build``: one trained model in, one signed bundle per device profile out.

The flow for each profile::

    convert (at the profile's opset) → normalize opsets → check limits → optimize (fp32/int8/fp16)
      → parity gate against the source model → golden samples → manifest → sign → write bundle

Work shared by all profiles happens once: loading the model and the reference rows, the input
layout, the source model's predictions and the drift statistics (``reference.json``); the ONNX
conversion is cached per opset pair. A profile that fails (conversion, quantization, parity, size
budget) does not stop the others; :func:`build` returns one :class:`ProfileResult` each, and the
CLI exits non-zero if any failed. Progress is reported through an ``on_step`` callback.
"""

from __future__ import annotations

import dataclasses
import io
import json
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

import edgepack
from edgepack._clock import utc_text
from edgepack.formats.bundle import GOLDEN_FILE, MODEL_FILE, REFERENCE_FILE, write_bundle
from edgepack.formats.exceptions import EdgepackError, KeyFormatError
from edgepack.formats.keys import load_private_key
from edgepack.formats.manifest import Manifest, check_model_name
from edgepack.packager._converters import Converter, Prediction, find_converter
from edgepack.packager._converters.onnx_model import tensor_specs
from edgepack.packager._graph import check_limits, classify_family, normalize_opsets, opsets_of
from edgepack.packager._optimize import optimize
from edgepack.packager._parity import ParityResult, compare, packaged_prediction
from edgepack.packager._profiles import Profile, get_profile
from edgepack.packager._reference import (
    InputLayout,
    ReferenceSplit,
    load_reference,
    split_reference,
)
from edgepack.packager._sources import SourceModel, load_model
from edgepack.packager._statistics import reference_statistics, to_json
from edgepack.packager.exceptions import (
    ConversionError,
    ParityError,
    ReferenceDataError,
    UnsupportedModelError,
    short_error,
)

__all__ = ["BuildRequest", "ProfileResult", "build"]

GOLDEN_ROWS = 8
# Highest opsets the converters are known to produce correctly; profiles may allow more.
MAX_CONVERTER_OPSET = 18
MAX_CONVERTER_ML_OPSET = 3
# Tolerances for the device's health check of golden outputs, per precision.
_HEALTH = {
    "fp32": {"atol": 1e-4, "rtol": 1e-4, "min_label_agreement": 1.0},
    "fp16": {"atol": 1e-2, "rtol": 1e-2, "min_label_agreement": 0.875},
    "int8": {"atol": 5e-2, "rtol": 5e-2, "min_label_agreement": 0.875},
}
_ARCH_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}

StepCallback = Callable[[str, str], None]


@dataclass(frozen=True)
class BuildRequest:
    """Everything ``edgepack build`` was asked to do."""

    model: Path
    name: str
    version: int
    profiles: Sequence[str]
    reference: Path
    key: Path
    out_dir: Path
    trust_pickle: bool = False
    profile_dirs: Sequence[Path] = ()


@dataclass(frozen=True)
class ProfileResult:
    """How one profile's build went."""

    profile: str
    ok: bool
    seconds: float
    bundle: Path | None = None
    precision: str | None = None
    family: str | None = None
    model_bytes: int | None = None
    bundle_bytes: int | None = None
    parity: ParityResult | None = None
    target_verified: bool = False
    error: str | None = None
    report: Path | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)


@dataclass
class _Shared:
    """What every profile's build reuses."""

    source: SourceModel
    converter: Converter
    task: str
    layout: InputLayout
    split: ReferenceSplit
    source_parity: Prediction
    reference_json: bytes
    labels: list[Any]
    converted: dict[tuple[int, int], onnx.ModelProto] = field(default_factory=dict)


def _machine_arch() -> str:
    machine = platform.machine().lower()
    return _ARCH_ALIASES.get(machine, machine)


def _has_vnni() -> bool | None:
    """Whether this x86 CPU has VNNI (``None`` where /proc/cpuinfo cannot tell)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return None
    return "avx512_vnni" in flags or "avx_vnni" in flags


def _target_mismatch(profile: Profile, precision: str, available: set[str]) -> str | None:
    """Why running the model here does not check what the target will compute (``None``: it does).

    Same architecture and the profile's first provider available; for int8 on x86 also the same
    VNNI support, since onnxruntime's int8 kernels (and their saturation) differ with and without.
    """
    arch = _machine_arch()
    if arch not in profile.arch:
        return f"this machine is {arch}, the profile targets {'/'.join(profile.arch)}"
    if profile.providers[0] not in available:
        return f"{profile.providers[0]} is not available on this machine"
    if precision == "int8" and arch == "x86_64":
        here = _has_vnni()
        if here is None or here != ("vnni" in profile.isa):
            return (
                f"int8 kernels differ: this CPU {'has' if here else 'lacks'} VNNI, the "
                f"profile's CPUs {'have' if 'vnni' in profile.isa else 'lack'} it"
            )
    return None


def _prepare(request: BuildRequest) -> _Shared:
    check_model_name(request.name)
    if request.version < 0:
        raise ValueError("--version must be a non-negative integer release counter")
    source = load_model(request.model, trust_pickle=request.trust_pickle)
    converter = find_converter(source.obj)
    frame = load_reference(request.reference)
    layout = converter.layout(source.obj, frame)
    split = split_reference(frame, layout, calibration_rows=200)
    task = converter.task(source.obj)
    try:
        source_all = converter.predict(source.obj, layout, split.all)
    except Exception as e:
        raise ReferenceDataError(
            f"the source model failed on the reference rows: {short_error(e)}"
        ) from e
    stats = reference_statistics(split.all, layout, task, source_all)
    return _Shared(
        source=source,
        converter=converter,
        task=task,
        layout=layout,
        split=split,
        source_parity=converter.predict(source.obj, layout, split.parity),
        reference_json=to_json(stats),
        labels=converter.class_labels(source.obj),
    )


def _convert(shared: _Shared, profile: Profile) -> onnx.ModelProto:
    opset = min(profile.max_opset, MAX_CONVERTER_OPSET)
    ml_opset = min(profile.max_ml_opset, MAX_CONVERTER_ML_OPSET)
    key = (opset, ml_opset)
    if key not in shared.converted:
        model = shared.converter.convert(shared.source.obj, shared.layout, opset, ml_opset)
        normalize_opsets(model, opset)
        model.ir_version = min(model.ir_version, profile.max_ir_version)
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as e:
            raise ConversionError(f"the converted model is not valid ONNX: {e}") from e
        shared.converted[key] = model
    model = onnx.ModelProto()
    model.CopyFrom(shared.converted[key])
    check_limits(model, profile.max_opset, profile.max_ml_opset, profile.max_ir_version)
    return model


def _session(model_bytes: bytes, providers: Sequence[str]) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=list(providers))


def _golden(shared: _Shared, session: ort.InferenceSession) -> bytes:
    rows = shared.split.parity.iloc[:GOLDEN_ROWS]
    feeds = shared.layout.feeds(rows)
    outputs = session.run(None, feeds)
    arrays: dict[str, np.ndarray] = {f"input.{k}": v for k, v in feeds.items()}
    for meta, output in zip(session.get_outputs(), outputs, strict=True):
        value = np.asarray(output)
        arrays[f"output.{meta.name}"] = value.astype(str) if value.dtype == object else value
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def _build_one(
    request: BuildRequest, shared: _Shared, profile: Profile, key: Any, step: StepCallback
) -> ProfileResult:
    start = time.perf_counter()
    step(profile.id, "converting")
    model = _convert(shared, profile)
    family = shared.converter.family(shared.source.obj) or classify_family(model)
    precision = profile.precision_for(family)
    step(profile.id, f"optimizing ({precision})")
    calibration = (
        shared.layout.feeds(
            shared.split.calibration.iloc[: profile.quantization.calibration_samples]
        )
        if len(shared.split.calibration)
        else None
    )
    available = set(ort.get_available_providers())
    providers = [p for p in profile.providers if p in available] or ["CPUExecutionProvider"]
    mismatch = _target_mismatch(profile, precision, available)
    target_verified = mismatch is None
    notes: list[str] = []
    # int8: static (calibrated) first; if it misses the parity gate, dynamic before giving up.
    ladder = [profile.quantization]
    if precision == "int8" and profile.quantization.mode == "static" and calibration is not None:
        ladder.append(dataclasses.replace(profile.quantization, mode="dynamic"))
    for settings in ladder:
        optimized = optimize(model, precision, settings, calibration)
        check_limits(
            optimized.model, profile.max_opset, profile.max_ml_opset, profile.max_ir_version
        )
        model_bytes = optimized.model.SerializeToString()
        notes += optimized.notes
        if len(model_bytes) > profile.budgets.max_model_bytes:
            raise ConversionError(
                f"model is {len(model_bytes):,} bytes, above the profile's budget of "
                f"{profile.budgets.max_model_bytes:,}"
            )
        step(profile.id, "checking parity")
        try:
            session = _session(model_bytes, providers)
            outputs = session.run(None, shared.layout.feeds(shared.split.parity))
        except Exception as e:
            if target_verified:
                raise ConversionError(f"the packaged model does not run: {e}") from e
            return ProfileResult(
                profile.id,
                False,
                time.perf_counter() - start,
                precision=precision,
                family=family,
                error=f"the packaged model cannot run on this build machine ({providers}): {e}",
            )
        parity = compare(
            shared.task,
            shared.source_parity,
            packaged_prediction(shared.task, outputs),
            profile.tolerance_for(precision),
        )
        if parity.passed:
            break
        if settings is not ladder[-1]:
            notes.append(
                f"{settings.mode} int8 missed the parity gate ({'; '.join(parity.failures)}); "
                "tried dynamic int8"
            )
    parity_doc = {
        "passed": parity.passed,
        "rows": parity.metrics.get("rows"),
        "metrics": parity.metrics,
        "tolerance": vars(profile.tolerance_for(precision)),
        "checked_on": {
            "arch": _machine_arch(),
            "providers": providers,
            "onnxruntime": ort.__version__,
        },
        "target_verified": target_verified,
    }
    if notes:
        parity_doc["notes"] = notes
    if not target_verified:
        parity_doc["note"] = (
            f"not verified on target hardware: checked on {_machine_arch()} with "
            f"{', '.join(providers)} ({mismatch})"
        )
    if not parity.passed:
        report = request.out_dir / (
            f"{request.name}-{request.version}-{profile.id}.parity-report.json"
        )
        request.out_dir.mkdir(parents=True, exist_ok=True)
        report.write_text(
            json.dumps(
                {
                    **parity_doc,
                    "failures": list(parity.failures),
                    "worst_rows": [
                        # the row's position in the user's reference data (0 = first data row)
                        {**row, "row": int(shared.split.parity.index[row["row"]])}
                        for row in parity.worst_rows
                    ],
                },
                indent=2,
                default=str,
            )
            + "\n"
        )
        raise ParityError("; ".join(parity.failures), {"report": str(report), **parity_doc})

    step(profile.id, "signing")
    manifest = Manifest(
        name=request.name,
        version=request.version,
        profile=profile.id,
        task=shared.task,
        family=family,
        precision=precision,
        inputs=shared.layout.specs,
        outputs=tensor_specs(optimized.model, "outputs"),
        compatibility={
            **profile.compatibility(),
            "opset": opsets_of(optimized.model),
            "ir_version": optimized.model.ir_version,
        },
        runtime={
            "providers": list(profile.providers),
            "intra_op_threads": profile.threads.intra_op,
            "inter_op_threads": profile.threads.inter_op,
        },
        parity=parity_doc,
        health={"golden_rows": min(GOLDEN_ROWS, len(shared.split.parity)), **_HEALTH[precision]},
        source={
            "format": shared.source.format,
            "framework": shared.converter.name,
            "model": shared.converter.describe(shared.source.obj),
            "file": shared.source.path.name,
            "sha256": shared.source.sha256,
        },
        created=utc_text(),
        packager_version=edgepack.__version__,
        quantization=optimized.quantization,
        labels=tuple(shared.labels),
    )
    path = write_bundle(
        request.out_dir,
        manifest,
        {
            MODEL_FILE: model_bytes,
            REFERENCE_FILE: shared.reference_json,
            GOLDEN_FILE: _golden(shared, session),
        },
        key,
    )
    return ProfileResult(
        profile.id,
        True,
        time.perf_counter() - start,
        bundle=path,
        precision=precision,
        family=family,
        model_bytes=len(model_bytes),
        bundle_bytes=path.stat().st_size,
        parity=parity,
        target_verified=target_verified,
        notes=tuple(notes),
    )


def build(request: BuildRequest, on_step: StepCallback | None = None) -> list[ProfileResult]:
    """Build one signed bundle per requested profile.

    Args:
        request: model, name, version, profiles, reference data, signing key, output directory.
        on_step: called with ``(profile_id, step)`` as each profile progresses.

    Returns:
        One result per profile, in the order asked; failed profiles carry ``error``.

    Raises:
        EdgepackError: a problem shared by all profiles (unknown profile, unreadable model or
            key, untrusted pickle, unsupported model, mismatched reference data).
    """
    step = on_step or (lambda _profile, _step: None)
    if not request.profiles:
        raise ValueError("name at least one --profile")
    profiles = [get_profile(pid, request.profile_dirs) for pid in dict.fromkeys(request.profiles)]
    try:
        key = load_private_key(request.key.read_bytes(), source=str(request.key))
    except OSError as e:
        raise KeyFormatError(f"cannot read signing key {request.key}: {e.strerror or e}") from e
    shared = _prepare(request)
    results = []
    for profile in profiles:
        start = time.perf_counter()
        try:
            results.append(_build_one(request, shared, profile, key, step))
        except UnsupportedModelError:
            raise  # the same for every profile: one clear error, not one per profile
        except EdgepackError as e:
            report = e.report.get("report") if isinstance(e, ParityError) else None
            results.append(
                ProfileResult(
                    profile.id,
                    False,
                    time.perf_counter() - start,
                    error=str(e),
                    report=Path(report) if report else None,
                )
            )
        step(profile.id, "done")
    return results
