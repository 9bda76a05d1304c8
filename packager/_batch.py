"""Models whose batch is fixed: found in the graph, checked, and run one fixed batch at a time.

Some exporters leave a graph whose inputs take exactly ``B`` rows per run (PyTorch's tracer
without ``dynamic_axes``, a TensorFlow signature with a batch of 1): the first dimension of the
input is the value 1 (or 8...), not a symbolic batch. onnxruntime refuses any other number of
rows, so everything the packager runs on such a model goes through :func:`run_batched`: the
source model's reference predictions (:mod:`edgepack.packager._converters.onnx_model`), each
precision candidate's parity rows and timings (:mod:`edgepack.packager._precision`), int8
calibration (:mod:`edgepack.packager._optimize`, one batch per calibration step) and the golden
outputs (:mod:`edgepack.packager._record`). The ONNX converter calls :func:`check_batch` once,
when it decides the model's input layout. The rows are cut into chunks of ``B``; a last chunk
with fewer real rows is padded with copies of its last row, and the padding's outputs dropped.
The agent runs requests the same way (``edgepack.agent._session.run_session``), from the
manifest's ``fixed_batch`` (docs/bundle-format.md §3.1), and the manifest's input and output
specs show the batch as dynamic, since that is what the device accepts.

Padding is only correct when a row's outputs do not depend on the other rows of its batch.
That holds for ordinary networks (every operator works row by row at inference), but not for a
graph that reduces, normalizes or reshapes across the batch axis. :func:`check_batch` measures
it before anything is gated: the first ``B`` reference rows run as one batch, then the first row
alone and the first half, each padded as the agent pads; if a row's outputs move, or an output
has no batch dimension to cut, the build is refused with the reason (re-export the model with a
dynamic batch). A batch of 1 has no other rows, so only the output shapes are checked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import onnx

from edgepack.formats.manifest import TensorSpec
from edgepack.packager.exceptions import UnsupportedModelError

__all__ = ["check_batch", "fixed_batch", "run_batched", "served_specs"]

# How far a row's outputs may move with its batch-mates (float rounding of batched kernels).
_RTOL = 1e-4
_ATOL = 1e-5


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The number of rows every run of ``model`` must have, or ``None`` for a dynamic batch.

    Raises:
        UnsupportedModelError: two inputs fix their batch at different sizes.
    """
    weights = {t.name for t in model.graph.initializer}
    fixed = {}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if value.name in weights or not dims:
            continue
        if dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            fixed[value.name] = dims[0].dim_value
    sizes = set(fixed.values())
    if len(sizes) > 1:
        shown = ", ".join(f"{name!r} {size}" for name, size in fixed.items())
        raise UnsupportedModelError(
            f"the model's inputs fix their batch at different sizes ({shown}); edgepack cannot "
            "tell how many rows one run takes: re-export it with one batch dimension for all"
        )
    return sizes.pop() if sizes else None


def _rows(feeds: Mapping[str, np.ndarray]) -> int:
    return len(next(iter(feeds.values())))


def _chunk(feeds: Mapping[str, np.ndarray], start: int, batch: int) -> dict[str, np.ndarray]:
    """Rows ``start`` to ``start + batch``, the missing ones copies of the last (zeros if none)."""
    out = {}
    for name, value in feeds.items():
        part = value[start : start + batch]
        if len(part) == 0:
            part = np.zeros((batch, *value.shape[1:]), dtype=value.dtype)
        elif len(part) < batch:
            part = np.concatenate([part, np.repeat(part[-1:], batch - len(part), axis=0)])
        out[name] = np.ascontiguousarray(part)
    return out


def run_batched(
    session: Any,
    feeds: Mapping[str, np.ndarray],
    batch: int | None,
    names: Sequence[str] | None = None,
) -> list[np.ndarray]:
    """Run ``session`` on ``feeds``; with a fixed ``batch``, one padded chunk at a time.

    Args:
        session: an onnxruntime session.
        feeds: input name → array, every one with the same number of rows.
        batch: the model's fixed batch (``None``: one run of all rows).
        names: the outputs to compute (all when ``None``).

    Returns:
        The outputs, one row per row of ``feeds``.
    """
    wanted = None if names is None else list(names)
    if not batch:
        return session.run(wanted, feeds)  # as before: no copies
    rows = _rows(feeds)
    parts: list[list[np.ndarray]] = []
    for start in range(0, max(rows, 1), batch):
        real = min(batch, rows - start)
        outputs = [np.asarray(o) for o in session.run(wanted, _chunk(feeds, start, batch))]
        if any(o.ndim == 0 or len(o) != batch for o in outputs):
            raise ValueError(f"an output has no batch dimension of {batch} rows to cut")
        parts.append([o[:real] for o in outputs])
    return [np.concatenate(column) for column in zip(*parts, strict=True)]


def _moved(want: np.ndarray, got: np.ndarray) -> bool:
    if want.shape != got.shape:
        return True
    if want.dtype.kind not in "fc":
        return not np.array_equal(want.astype(str), got.astype(str))
    scale = max(float(np.nanmax(np.abs(want), initial=0.0)), 1.0)
    return not np.allclose(got, want, rtol=_RTOL, atol=_ATOL * scale, equal_nan=True)


def check_batch(
    session: Any, feeds: Mapping[str, np.ndarray], batch: int, output_names: Sequence[str]
) -> None:
    """Refuse a fixed-batch model that cannot be run in padded chunks of ``batch``.

    Args:
        session: the converted fp32 model's session.
        feeds: reference rows (the held-out parity rows).
        batch: the model's fixed batch.
        output_names: the model's outputs, for the message.

    Raises:
        UnsupportedModelError: an output has no batch dimension of ``batch`` rows, or a row's
            outputs change with the other rows of its batch.
    """
    full = _chunk(feeds, 0, batch)
    outputs = [np.asarray(o) for o in session.run(None, full)]
    for name, value in zip(output_names, outputs, strict=True):
        if value.ndim == 0 or len(value) != batch:
            raise UnsupportedModelError(
                f"the model's batch is fixed at {batch} but its output {name!r} has shape "
                f"{list(value.shape)}, with no batch dimension of {batch} to cut into rows; "
                "edgepack cannot run it on other numbers of rows: re-export the model with a "
                "dynamic batch"
            )
    for real in sorted({1, max(batch // 2, 1)}) if batch > 1 else ():
        padded = _chunk({k: v[:real] for k, v in full.items()}, 0, batch)
        again = session.run(None, padded)
        for name, want, got in zip(output_names, outputs, again, strict=True):
            if _moved(want[:real], np.asarray(got)[:real]):
                raise UnsupportedModelError(
                    f"the model's batch is fixed at {batch} and its output {name!r} for a row "
                    "changes with the other rows of the batch (the graph mixes rows: a "
                    "reduction, normalization or reshape across the batch axis), so edgepack "
                    "cannot pad a last chunk of fewer rows: re-export the model with a "
                    "dynamic batch, or with a batch of 1"
                )


def served_specs(specs: Sequence[TensorSpec], batch: int | None) -> tuple[TensorSpec, ...]:
    """``specs`` as the device serves them: with a fixed batch, the first dimension dynamic."""
    if not batch:
        return tuple(specs)
    return tuple(
        replace(spec, shape=(None, *spec.shape[1:])) if spec.shape else spec for spec in specs
    )
