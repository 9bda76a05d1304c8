"""The health check: does a loaded model reproduce its golden outputs on this device?

:func:`check_golden` runs the bundle's ``golden.npz`` inputs through the session that will serve
the model (opened by :func:`edgepack.agent._session.open_installed`, as the runtime opens it) and
compares the outputs with the ones recorded at build time, within the manifest's ``health``
tolerance. The lifecycle runs it (through edgepack.agent._health_check, under a deadline) before
committing a new version and before rolling back to a retained one; a failure means automatic
rollback (or the rollback is refused).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from edgepack.agent._session import run_session
from edgepack.agent.exceptions import HealthCheckError, InferenceError
from edgepack.formats.manifest import Manifest

__all__ = ["check_golden"]


def _compare(name: str, got: np.ndarray, want: np.ndarray, health: dict) -> str | None:
    if got.shape != want.shape:
        return f"output {name!r} has shape {got.shape}, expected {want.shape}"
    if want.dtype.kind in "fc":
        got64, want64 = got.astype(np.float64), want.astype(np.float64)
        atol, rtol = float(health.get("atol", 1e-4)), float(health.get("rtol", 1e-4))
        if not np.allclose(got64, want64, atol=atol, rtol=rtol, equal_nan=False):
            worst = float(np.nanmax(np.abs(got64 - want64))) if got.size else 0.0
            return (
                f"output {name!r} differs by up to {worst:.4g} (allowed atol {atol}, rtol {rtol})"
            )
        return None
    same = got.astype(str) == want.astype(str)
    agreement = float(same.mean()) if same.size else 1.0
    needed = float(health.get("min_label_agreement", 1.0))
    if agreement < needed:
        return f"output {name!r} matches on {agreement:.0%} of golden rows (needs {needed:.0%})"
    return None


def check_golden(
    session: ort.InferenceSession, manifest: Manifest, golden: bytes, timeout: float = 0.0
) -> int:
    """Run the golden inputs and compare with the recorded outputs.

    Args:
        session: the loaded model (the one that will serve it).
        manifest: its manifest (the ``health`` tolerances).
        golden: the bytes of its ``golden.npz``.
        timeout: seconds before onnxruntime is told to stop the run (0: no limit).

    Returns:
        The number of golden rows checked.

    Raises:
        HealthCheckError: an output differs beyond tolerance, the model fails to run, or the
            golden file is unreadable. The message names the output and the size of the error.
    """
    what = f"{manifest.name} v{manifest.version}"
    try:
        with np.load(io.BytesIO(golden), allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except Exception as e:
        raise HealthCheckError(f"{what}: golden.npz is unreadable: {e}") from e
    feeds = {k.removeprefix("input."): v for k, v in arrays.items() if k.startswith("input.")}
    names: Sequence[str] = [o.name for o in session.get_outputs()]
    try:
        outputs = run_session(
            session,
            None,
            feeds,
            f"{what} on its golden inputs",
            timeout,
            batch=manifest.fixed_batch,
        )
    except InferenceError as e:
        raise HealthCheckError(str(e)) from e
    problems = []
    for name, got in zip(names, outputs, strict=True):
        want = arrays.get(f"output.{name}")
        if want is None:
            problems.append(f"golden.npz has no expected value for output {name!r}")
            continue
        problem = _compare(name, np.asarray(got), want, dict(manifest.health))
        if problem:
            problems.append(problem)
    if problems:
        raise HealthCheckError(f"{what} failed its health check: " + "; ".join(problems))
    return len(next(iter(feeds.values()))) if feeds else 0
