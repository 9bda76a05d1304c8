"""``edgepack build``: one trained model in, one signed bundle per device profile out.

The flow for each profile::

    convert (at the profile's opset) → normalize opsets → check limits
      → precision candidates, each made, gated on parity and timed (_precision) → choose one
      → golden samples → manifest → the version-never-changes check (_release) → sign → write

This module drives it. Work shared by all profiles happens once, in
:func:`edgepack.packager._inputs.prepare`: loading the model (a file or an MLflow URI), the
reference rows and their match to the model's columns, the input layout, the source model's
predictions and the drift statistics; the ONNX conversion is cached per opset pair
(:func:`edgepack.packager._inputs.convert`). What a profile's bundle records (manifest, golden
rows, the parity report of a failure) is written down by :mod:`edgepack.packager._record`. A
profile that fails (conversion, parity, size budget, an existing version with other content)
does not stop the others; :func:`build` returns one :class:`ProfileResult` each, and the CLI
exits non-zero if any failed. Progress is reported through an ``on_step`` callback. Library
warnings raised while building go to the ``edgepack.packager`` logger (the CLI writes it to the
build log), not to the terminal.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import onnxruntime as ort

from edgepack.formats.bundle import MANIFEST_FILE, MODEL_FILE, bundle_filename, write_bundle
from edgepack.formats.exceptions import EdgepackError, KeyFormatError
from edgepack.formats.keys import load_private_key
from edgepack.packager._batch import fixed_batch
from edgepack.packager._graph import classify_family
from edgepack.packager._inputs import BuildRequest, Shared, convert, prepare
from edgepack.packager._parity import ParityResult
from edgepack.packager._precision import candidates_for, measure, select
from edgepack.packager._profiles import Profile, get_profile
from edgepack.packager._record import bundle_content, fail_parity
from edgepack.packager._release import existing_release, previous_choice
from edgepack.packager.exceptions import (
    ParityError,
    ReleaseError,
    UnsupportedModelError,
)

__all__ = ["BuildRequest", "ProfileResult", "build"]

log = logging.getLogger("edgepack.packager")

StepCallback = Callable[[str, str], None]


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
    fixed_batch: int | None = None  # the model runs on exactly this many rows (None: any)
    shared_seconds: float = 0.0


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


def _build_one(
    request: BuildRequest, shared: Shared, profile: Profile, key: Any, step: StepCallback
) -> ProfileResult:
    start = time.perf_counter()
    step(profile.id, "converting")
    model = convert(shared, profile)
    family = shared.converter.family(shared.source.obj) or classify_family(model)
    batch = fixed_batch(model)  # checked safe to pad by the converter (edgepack.packager._batch)
    parity_feeds = shared.layout.feeds(shared.split.parity)
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
        parity_feeds=parity_feeds,
        source=shared.source_parity,
        calibration=calibration,
        timing=request.timing,
        step=lambda text: step(profile.id, text),
        batch=batch,
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
        raise fail_parity(request, shared, profile, measured)

    step(profile.id, "signing")
    content = bundle_content(
        request, shared, profile, family, chosen, measured, providers, available, batch
    )
    manifest, files = content.manifest, content.files
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
        precision=manifest.precision,
        family=family,
        model_bytes=len(files[MODEL_FILE]),
        bundle_bytes=path.stat().st_size,
        parity=chosen.parity,
        target_verified=content.target_verified,
        notes=content.notes,
        candidates=content.candidates,
        chosen=chosen.name,
        unchanged=unchanged,
        shared_seconds=shared.seconds,
        fixed_batch=batch,
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
        shared = prepare(request)
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
