"""What a profile's bundle records: its manifest, its golden rows, or the report of a failure.

Once :mod:`edgepack.packager._precision` chose the candidate a profile ships,
:func:`bundle_content` writes down what was made: the parity document (the gate's figures, which
rows it ran on, the machine it ran on and whether that stands for the target:
:func:`target_mismatch`), the health-check tolerances for the precision, where the model came
from, every candidate's figures, and the files of the bundle (``model.onnx``, ``reference.json``,
``golden.npz``: the first held-out rows and the packaged model's outputs, byte-stable, and with
``--target`` ``quality.json``). :mod:`edgepack.packager._build` then checks the content against
an existing release and signs it. A profile none of whose candidates passed gets
:func:`fail_parity`: the error, and ``NAME-VERSION-PROFILE.parity-report.json`` with the rows
where the models diverged.
"""

from __future__ import annotations

import io
import json
import platform
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

import edgepack
from edgepack._clock import utc_text
from edgepack.formats.bundle import GOLDEN_FILE, MODEL_FILE, QUALITY_FILE, REFERENCE_FILE
from edgepack.formats.manifest import Manifest
from edgepack.packager._batch import run_batched, served_specs
from edgepack.packager._converters.onnx_model import tensor_specs
from edgepack.packager._graph import opsets_of
from edgepack.packager._inputs import BuildRequest, Shared
from edgepack.packager._precision import Measured
from edgepack.packager._profiles import Profile
from edgepack.packager.exceptions import ParityError

__all__ = ["GOLDEN_ROWS", "Content", "bundle_content", "fail_parity", "machine_arch"]

GOLDEN_ROWS = 8
# Tolerances for the device's health check of golden outputs, per precision.
_HEALTH = {
    "fp32": {"atol": 1e-4, "rtol": 1e-4, "min_label_agreement": 1.0},
    "fp16": {"atol": 1e-2, "rtol": 1e-2, "min_label_agreement": 0.875},
    "int8": {"atol": 5e-2, "rtol": 5e-2, "min_label_agreement": 0.875},
}
_ARCH_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class Content:
    """A profile's bundle before signing: the manifest, the other files, and what it noted."""

    manifest: Manifest
    files: dict[str, bytes]
    notes: tuple[str, ...]
    target_verified: bool
    candidates: tuple[dict[str, Any], ...]


def machine_arch() -> str:
    """This machine's architecture, named as the profiles name it (``x86_64``, ``aarch64``)."""
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
    arch = machine_arch()
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


def _golden(shared: Shared, model_bytes: bytes, batch: int | None) -> bytes:
    """``golden.npz``: the first parity rows and the packaged model's outputs, byte-stable."""
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    rows = shared.split.parity.iloc[:GOLDEN_ROWS]
    feeds = shared.layout.feeds(rows)
    outputs = run_batched(session, feeds, batch)
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
    shared: Shared, profile: Profile, chosen: Measured, providers: list[str], mismatch: str | None
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
            "arch": machine_arch(),
            "providers": providers,
            "onnxruntime": ort.__version__,
        },
        "target_verified": mismatch is None,
    }
    if shared.notes:
        doc["warnings"] = list(shared.notes)
    if mismatch is not None:
        doc["note"] = (
            f"not verified on target hardware: checked on {machine_arch()} with "
            f"{', '.join(providers)} ({mismatch})"
        )
    return doc


def fail_parity(
    request: BuildRequest, shared: Shared, profile: Profile, measured: list[Measured]
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


def bundle_content(
    request: BuildRequest,
    shared: Shared,
    profile: Profile,
    family: str,
    chosen: Measured,
    measured: Sequence[Measured],
    providers: list[str],
    available: set[str],
    batch: int | None = None,
) -> Content:
    """The manifest and files of ``profile``'s bundle, shipping ``chosen`` of ``measured``.

    Args:
        request: the build.
        shared: what every profile of the build reuses.
        profile: the profile this bundle is for.
        family: the model's family (``tree``, ``linear``, ``neural``, ``other``).
        chosen: the candidate that ships (it passed the gate).
        measured: every candidate, with its figures, for the manifest's ``candidates``.
        providers: the execution providers the gate ran with here.
        available: the providers this machine has.
        batch: the model's fixed batch (``None``: dynamic); the manifest records it, and shows
            the outputs' batch as dynamic, as the device serves them.
    """
    assert chosen.optimized is not None
    assert chosen.model_bytes is not None
    precision = chosen.candidate.precision
    mismatch = _target_mismatch(profile, precision, available)
    notes = list(shared.notes) + list(chosen.optimized.notes)
    if machine_arch() not in profile.arch and profile.providers[0] in available:
        notes.append(
            f"latencies measured on this {machine_arch()} CPU stand in for the profile's "
            f"{'/'.join(profile.arch)} CPUs"
        )
    parity_doc = _parity_doc(shared, profile, chosen, providers, mismatch)
    if notes:
        parity_doc["notes"] = notes
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
        outputs=served_specs(tensor_specs(optimized, "outputs"), batch),
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
        fixed_batch=batch,
    )
    files = {
        MODEL_FILE: chosen.model_bytes,
        REFERENCE_FILE: shared.reference_json,
        GOLDEN_FILE: _golden(shared, chosen.model_bytes, batch),
    }
    if shared.quality_json is not None:
        files[QUALITY_FILE] = shared.quality_json
    return Content(manifest, files, tuple(notes), mismatch is None, candidates)
