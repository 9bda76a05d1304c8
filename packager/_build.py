"""``edgepack build``: one trained model in, one signed bundle per device profile out.

The flow for each profile::

    convert (at the profile's opset) → normalize opsets → check limits
      → precision candidates, each made, gated on parity and timed (_precision) → choose one
      → golden samples → manifest → the version-never-changes check (_release) → sign → write

Work shared by all profiles happens once: loading the model (a file, or an MLflow ``models:/``
or ``runs:/`` URI through :mod:`edgepack.packager._mlflow`), the reference rows and their match
to the model's columns, the input layout, the source model's predictions and the drift
statistics (``reference.json``); the ONNX conversion is cached per opset pair. A profile that
fails (conversion, parity, size budget, an existing version with other content) does not stop
the others; :func:`build` returns one :class:`ProfileResult` each, and the CLI exits non-zero if
any failed. Progress is reported through an ``on_step`` callback. Library warnings raised while
building go to the ``edgepack.packager`` logger (the CLI writes it to the build log), not to the
terminal.
"""

from __future__ import annotations

import io
import json
import logging
import platform
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd

import edgepack
from edgepack._clock import utc_text
from edgepack.formats.bundle import (
    GOLDEN_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    QUALITY_FILE,
    REFERENCE_FILE,
    bundle_filename,
    write_bundle,
)
from edgepack.formats.exceptions import EdgepackError, KeyFormatError
from edgepack.formats.keys import load_private_key
from edgepack.formats.manifest import Manifest, check_model_name
from edgepack.formats.quality import quality_json
from edgepack.packager._converters import Converter, Prediction, find_converter
from edgepack.packager._converters.onnx_model import tensor_specs
from edgepack.packager._graph import (
    check_limits,
    classify_family,
    dynamic_batch,
    normalize_opsets,
    opsets_of,
)
from edgepack.packager._parity import MIN_PARITY_ROWS, ParityResult
from edgepack.packager._precision import Measured, Timing, candidates_for, measure, select
from edgepack.packager._profiles import Profile, get_profile
from edgepack.packager._quality import pop_target, quality_reference
from edgepack.packager._reference import (
    InputLayout,
    ReferenceSplit,
    load_reference,
    match_columns,
    split_reference,
)
from edgepack.packager._release import existing_release, previous_choice
from edgepack.packager._sources import SourceModel, load_model
from edgepack.packager._statistics import reference_statistics, to_json
from edgepack.packager.exceptions import (
    ConversionError,
    ParityError,
    ReferenceDataError,
    ReleaseError,
    UnsupportedModelError,
    short_error,
)

if TYPE_CHECKING:
    from edgepack.packager._mlflow import MlflowModel

__all__ = ["BuildRequest", "ProfileResult", "build"]

log = logging.getLogger("edgepack.packager")

GOLDEN_ROWS = 8
CALIBRATION_ROWS = 200
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
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)

StepCallback = Callable[[str, str], None]


@dataclass(frozen=True)
class BuildRequest:
    """Everything ``edgepack build`` was asked to do.

    ``model`` is a file path or an MLflow URI (``models:/NAME/VERSION``, ``runs:/RUN/PATH``).
    ``columns`` names the model's input columns in order, for a model trained without names.
    ``force`` replaces an existing bundle of the same name, version and profile whose content
    differs. ``timing`` bounds how long each precision candidate is timed.
    """

    model: Path | str
    name: str
    version: int
    profiles: Sequence[str]
    reference: Path
    key: Path
    out_dir: Path
    trust_pickle: bool = False
    profile_dirs: Sequence[Path] = ()
    columns: Sequence[str] | None = None
    force: bool = False
    timing: Timing = field(default_factory=Timing)
    target: str | None = None  # the reference column with the ground truth: quality.json


@dataclass(frozen=True)
class ProfileResult:
    """How one profile's build went.

    ``seconds`` is this profile's own work; ``shared_seconds`` the work all profiles shared
    (loading, predictions, drift calibration), the same on every result of one build.
    """

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
    candidates: tuple[dict[str, Any], ...] = ()
    chosen: str | None = None
    unchanged: bool = False
    shared_seconds: float = 0.0


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
    notes: list[str]
    mlflow: MlflowModel | None = None
    seconds: float = 0.0
    quality_json: bytes | None = None
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


@contextmanager
def _warnings_to_log() -> Iterator[None]:
    """Send library warnings (FutureWarning, UserWarning...) to the log, each once."""

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        log.warning("%s: %s (%s:%d)", category.__name__, message, filename, lineno)

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = show
        yield


def _load_source(request: BuildRequest) -> tuple[SourceModel, MlflowModel | None]:
    """The model, and what MLflow says about it (``None`` for a file)."""
    text = str(request.model)
    if text.startswith(("models:/", "runs:/")):
        from edgepack.packager._mlflow import load_mlflow_model

        loaded = load_mlflow_model(text, trust_pickle=request.trust_pickle)
        return loaded.source, loaded
    return load_model(Path(request.model), trust_pickle=request.trust_pickle), None


def _prepare(request: BuildRequest) -> _Shared:
    start = time.perf_counter()
    check_model_name(request.name)
    if request.version < 0:
        raise ValueError("--version must be a non-negative integer release counter")
    source, from_mlflow = _load_source(request)
    signature_columns = from_mlflow.columns if from_mlflow else None
    converter = find_converter(source.obj)
    frame = load_reference(request.reference)
    truth = None
    if request.target:
        frame, truth = pop_target(frame, request.target)
    model_names = converter.feature_names(source.obj)
    # --columns as given; else the MLflow signature's names, unless the model has its own
    stated = (
        list(request.columns)
        if request.columns
        else (signature_columns if model_names is None else None)
    )
    frame = match_columns(frame, model_names, stated)
    if from_mlflow is not None:
        from edgepack.packager._mlflow import check_signature_types

        check_signature_types(frame, from_mlflow.column_types)
    layout = converter.layout(source.obj, frame)
    split = split_reference(frame, layout, calibration_rows=CALIBRATION_ROWS)
    task = converter.task(source.obj)
    try:
        source_all = converter.predict(source.obj, layout, split.all)
    except Exception as e:
        hint = _value_hint(split.all)
        raise ReferenceDataError(
            f"the source model failed on the reference rows: {short_error(e)}{hint}"
        ) from e
    notes = []
    if len(split.parity) < MIN_PARITY_ROWS:
        notes.append(
            f"only {len(split.parity)} reference rows are held out for the parity gate "
            f"(of {len(split.all)}; {len(split.calibration)} calibrate int8): too few for a "
            f"99.5% label agreement or a 99th percentile to mean much; give "
            f"{MIN_PARITY_ROWS + CALIBRATION_ROWS:,} rows or more"
        )
    stats = reference_statistics(split.all, layout, task, source_all)
    labels = converter.class_labels(source.obj)
    quality = (
        None
        if truth is None
        else quality_json(quality_reference(task, truth, source_all, list(labels)))
    )
    return _Shared(
        source=source,
        converter=converter,
        task=task,
        layout=layout,
        split=split,
        source_parity=converter.predict(source.obj, layout, split.parity),
        reference_json=to_json(stats),
        labels=labels,
        notes=notes,
        mlflow=from_mlflow,
        seconds=time.perf_counter() - start,
        quality_json=quality,
    )


def _value_hint(frame: pd.DataFrame) -> str:
    """Which column (and row) holds the value a source model choked on, if one can tell."""
    for column in frame.columns:
        values = frame[column]
        if not pd.api.types.is_numeric_dtype(values):
            numbers = pd.to_numeric(values, errors="coerce")
            bad = numbers.isna() & values.notna()
            if bad.any() and bad.mean() < 0.5:  # a numeric column with a stray text value
                row = int(np.flatnonzero(bad.to_numpy())[0])
                return (
                    f" (reference column {column!r}, row {row} (0 = first data row): value "
                    f"{values.iloc[row]!r} is not numeric)"
                )
    nulls = [c for c in frame.columns if frame[c].isna().any()]
    if nulls:
        return (
            f" (reference column(s) {', '.join(map(repr, nulls))} hold missing values the model "
            "does not accept: fill or drop them, or put a SimpleImputer in the pipeline)"
        )
    return ""


def _convert(shared: _Shared, profile: Profile) -> onnx.ModelProto:
    opset = min(profile.max_opset, MAX_CONVERTER_OPSET)
    ml_opset = min(profile.max_ml_opset, MAX_CONVERTER_ML_OPSET)
    key = (opset, ml_opset)
    if key not in shared.converted:
        model = shared.converter.convert(shared.source.obj, shared.layout, opset, ml_opset)
        normalize_opsets(model, opset)
        dynamic_batch(model)
        # skl2onnx names each graph with a random uuid; the same inputs must give the same bytes
        model.graph.name = f"edgepack-{shared.source.sha256[:16]}"
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


def _golden(shared: _Shared, model_bytes: bytes) -> bytes:
    """``golden.npz``: the first parity rows and the packaged model's outputs, byte-stable."""
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    rows = shared.split.parity.iloc[:GOLDEN_ROWS]
    feeds = shared.layout.feeds(rows)
    outputs = session.run(None, feeds)
    arrays: dict[str, np.ndarray] = {f"input.{k}": v for k, v in feeds.items()}
    for meta, output in zip(session.get_outputs(), outputs, strict=True):
        value = np.asarray(output)
        arrays[f"output.{meta.name}"] = value.astype(str) if value.dtype == object else value
    # np.savez stamps each member with the current time; a fixed stamp keeps rebuilds identical.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for key in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()


def _parity_doc(
    shared: _Shared, profile: Profile, chosen: Measured, providers: list[str], mismatch: str | None
) -> dict[str, Any]:
    parity = chosen.parity
    assert parity is not None
    split = shared.split
    doc: dict[str, Any] = {
        "passed": parity.passed,
        "rows": parity.metrics.get("rows"),
        "metrics": parity.metrics,
        "tolerance": vars(profile.tolerance_for(chosen.candidate.precision)),
        "held_out": {
            "rows": len(split.parity),
            "of_reference_rows": len(split.all),
            "calibration_rows": len(split.calibration),
            "how": "reference rows shuffled with seed 0; the first calibrate int8, the next "
            "(up to 5,000) are held out for this gate",
        },
        "checked_on": {
            "arch": _machine_arch(),
            "providers": providers,
            "onnxruntime": ort.__version__,
        },
        "target_verified": mismatch is None,
    }
    if shared.notes:
        doc["warnings"] = list(shared.notes)
    if mismatch is not None:
        doc["note"] = (
            f"not verified on target hardware: checked on {_machine_arch()} with "
            f"{', '.join(providers)} ({mismatch})"
        )
    return doc


def _fail_parity(
    request: BuildRequest, shared: _Shared, profile: Profile, measured: list[Measured]
) -> ParityError:
    """The error for a profile none of whose candidates passed, with its report written."""
    gated = [m for m in measured if m.parity is not None]
    if not gated:
        reasons = "; ".join(f"{m.name}: {m.error}" for m in measured)
        return ParityError(f"no precision candidate could be built or run ({reasons})")
    worst = gated[0]  # fp32 first: the conversion itself, before any quantization
    assert worst.parity is not None
    report = request.out_dir / f"{request.name}-{request.version}-{profile.id}.parity-report.json"
    doc = {
        "passed": False,
        "candidate": worst.name,
        "rows": worst.parity.metrics.get("rows"),
        "metrics": worst.parity.metrics,
        "tolerance": vars(profile.tolerance_for(worst.candidate.precision)),
        "failures": list(worst.parity.failures),
        "worst_rows": [
            # the row's position in the user's reference data (0 = first data row)
            {**row, "row": int(shared.split.parity.index[row["row"]])}
            for row in worst.parity.worst_rows
        ],
        "candidates": [m.to_manifest(False) for m in measured],
    }
    request.out_dir.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return ParityError("; ".join(worst.parity.failures), {"report": str(report), **doc})


def _build_one(
    request: BuildRequest, shared: _Shared, profile: Profile, key: Any, step: StepCallback
) -> ProfileResult:
    start = time.perf_counter()
    step(profile.id, "converting")
    model = _convert(shared, profile)
    family = shared.converter.family(shared.source.obj) or classify_family(model)
    calibration = (
        shared.layout.feeds(
            shared.split.calibration.iloc[: profile.quantization.calibration_samples]
        )
        if len(shared.split.calibration)
        else None
    )
    available = set(ort.get_available_providers())
    providers = [p for p in profile.providers if p in available] or ["CPUExecutionProvider"]
    measured = measure(
        model,
        candidates_for(profile, family),
        profile=profile,
        providers=providers,
        task=shared.task,
        classes=shared.labels,
        parity_feeds=shared.layout.feeds(shared.split.parity),
        source=shared.source_parity,
        calibration=calibration,
        timing=request.timing,
        step=lambda text: step(profile.id, text),
    )
    path = request.out_dir / bundle_filename(request.name, request.version, profile.id)
    target_provider_here = profile.providers[0] in available
    chosen = select(
        measured,
        profile.objective,
        latency_is_evidence=target_provider_here,
        prefer=previous_choice(path),
    )
    if chosen is None:
        raise _fail_parity(request, shared, profile, measured)
    assert chosen.optimized is not None
    assert chosen.model_bytes is not None
    precision = chosen.candidate.precision
    mismatch = _target_mismatch(profile, precision, available)
    notes = list(shared.notes) + list(chosen.optimized.notes)
    if _machine_arch() not in profile.arch and target_provider_here:
        notes.append(
            f"latencies measured on this {_machine_arch()} CPU stand in for the profile's "
            f"{'/'.join(profile.arch)} CPUs"
        )
    parity_doc = _parity_doc(shared, profile, chosen, providers, mismatch)
    if notes:
        parity_doc["notes"] = notes

    step(profile.id, "signing")
    optimized = chosen.optimized.model
    candidates = tuple(m.to_manifest(m is chosen) for m in measured)
    manifest = Manifest(
        name=request.name,
        version=request.version,
        profile=profile.id,
        task=shared.task,
        family=family,
        precision=precision,
        inputs=shared.layout.specs,
        outputs=tensor_specs(optimized, "outputs"),
        compatibility={
            **profile.compatibility(),
            "opset": opsets_of(optimized),
            "ir_version": optimized.ir_version,
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
            **(
                {"mlflow": {"uri": shared.mlflow.uri, "run_id": shared.mlflow.run_id}}
                if shared.mlflow
                else {}
            ),
        },
        created=utc_text(),
        packager_version=edgepack.__version__,
        quantization=chosen.optimized.quantization if precision != "fp32" else None,
        labels=tuple(shared.labels),
        candidates=candidates,
    )
    files = {
        MODEL_FILE: chosen.model_bytes,
        REFERENCE_FILE: shared.reference_json,
        GOLDEN_FILE: _golden(shared, chosen.model_bytes),
    }
    if shared.quality_json is not None:
        files[QUALITY_FILE] = shared.quality_json
    existing = existing_release(path, {MANIFEST_FILE: manifest.to_json(), **files})
    unchanged = bool(existing and existing["same"])
    if existing and not existing["same"] and not request.force:
        raise ReleaseError(
            f"{path} already holds version {request.version} of {request.name} for "
            f"{profile.id}, with different content ({'; '.join(existing['differences'])}); a "
            "signed version never changes: build a new --version, or pass --force to replace it"
        )
    if not unchanged:
        path = write_bundle(request.out_dir, manifest, files, key)
    return ProfileResult(
        profile.id,
        True,
        time.perf_counter() - start,
        bundle=path,
        precision=precision,
        family=family,
        model_bytes=len(chosen.model_bytes),
        bundle_bytes=path.stat().st_size,
        parity=chosen.parity,
        target_verified=mismatch is None,
        notes=tuple(notes),
        candidates=candidates,
        chosen=chosen.name,
        unchanged=unchanged,
        shared_seconds=shared.seconds,
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
    with _warnings_to_log():
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
                candidates = e.report.get("candidates", ()) if isinstance(e, ParityError) else ()
                results.append(
                    ProfileResult(
                        profile.id,
                        False,
                        time.perf_counter() - start,
                        error=str(e),
                        report=Path(report) if report else None,
                        candidates=tuple(candidates),
                        shared_seconds=shared.seconds,
                    )
                )
            step(profile.id, "done")
    if shared.mlflow is not None:
        from edgepack.packager._mlflow import record_build

        record_build(shared.mlflow, request.name, request.version, results)
    return results
