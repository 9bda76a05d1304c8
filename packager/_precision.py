"""Precision chosen by measurement: try the candidates a profile allows, ship the best that passes.

For each profile the builder hands this module the converted fp32 model. The profile's
``[precision]`` policy for the model's family says how low it may go: ``fp32`` (tree ensembles
and linear models: only fp32 candidates), ``int8`` (CPU profiles: also dynamic int8 and static
int8 per-channel and per-tensor, calibrated with min-max and with percentiles) or ``fp16`` (GPU
profiles: also fp16 and mixed fp16/fp32). Every candidate is made
(:mod:`edgepack.packager._optimize`), checked against the profile's limits and size budget, run on
the held-out parity rows (:mod:`edgepack.packager._parity`: fp32 gated on the maximum error,
quantized candidates on the 99th percentile), and timed at batch 1 and batch 64 with the
profile's threads, in alternating rounds so every candidate sees the same machine state; the
figures are medians, and speed is reported as a ratio against the plain fp32 model timed in the
same rounds. A model whose batch is fixed runs its parity rows and timings one padded batch at
a time, as the device will (:mod:`edgepack.packager._batch`).

:func:`select` then ships, under the profile's objective:

* ``latency``: the passing candidate with the best speed-up, if it is *clearly* faster than fp32
  (geometric mean of the two batch sizes ≥ :data:`MIN_SPEEDUP`, neither below
  :data:`MAX_SLOWDOWN`); else fp32;
* ``size``: the smallest passing candidate, if it is *clearly* smaller (≤ :data:`MAX_SIZE_RATIO`
  of fp32 and at least :data:`MIN_SAVED_BYTES` saved) and not clearly slower; else fp32;
* ``accuracy``: fp32.

A quantized candidate that is neither clearly faster nor clearly smaller never ships (an 8 KiB
MLP gains nothing from int8). Latency on the build machine is evidence for a CPU profile (on
another CPU architecture it is a proxy, and the manifest says so), but not for a GPU profile
whose provider is missing here: then only size counts. A candidate that shipped before under the
same name and version is preferred while it still passes and qualifies, so timing noise does not
flip a rebuild. Every candidate's figures go into the manifest (``candidates``).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from edgepack.formats.exceptions import EdgepackError
from edgepack.packager._batch import run_batched
from edgepack.packager._converters import Prediction
from edgepack.packager._graph import check_limits
from edgepack.packager._optimize import Optimized, graph_optimize, optimize
from edgepack.packager._parity import ParityResult, compare, packaged_prediction
from edgepack.packager._profiles import Profile, Quantization
from edgepack.packager.exceptions import short_error

__all__ = [
    "MAX_SIZE_RATIO",
    "MAX_SLOWDOWN",
    "MIN_SAVED_BYTES",
    "MIN_SPEEDUP",
    "Candidate",
    "Measured",
    "Timing",
    "candidates_for",
    "measure",
    "select",
]

MIN_SPEEDUP = 1.2
MAX_SLOWDOWN = 0.9
MAX_SIZE_RATIO = 0.6
MIN_SAVED_BYTES = 64 * 1024
BATCHES = (1, 64)
OBJECTIVES = ("latency", "size", "accuracy")


@dataclass(frozen=True)
class Timing:
    """How long to time each candidate: ``seconds`` per candidate and batch size, in ``rounds``."""

    seconds: float = 0.25
    rounds: int = 5


@dataclass(frozen=True)
class Candidate:
    """One way to ship the model."""

    name: str
    precision: str  # fp32 | int8 | fp16
    settings: Quantization | None = None
    graph_optimized: bool = False
    mixed: bool = False


@dataclass
class Measured:
    """A candidate after it was made, checked, and timed (``error`` if it could not be)."""

    candidate: Candidate
    optimized: Optimized | None = None
    model_bytes: bytes | None = None
    parity: ParityResult | None = None
    latency_ms: dict[int, float] = dataclasses.field(default_factory=dict)
    speedup: dict[int, float] = dataclasses.field(default_factory=dict)
    error: str | None = None
    session: ort.InferenceSession | None = None
    verdict: str = ""

    @property
    def name(self) -> str:
        return self.candidate.name

    @property
    def passed(self) -> bool:
        return self.error is None and self.parity is not None and self.parity.passed

    @property
    def size(self) -> int | None:
        return len(self.model_bytes) if self.model_bytes is not None else None

    def speedup_mean(self) -> float | None:
        values = [self.speedup[b] for b in BATCHES if b in self.speedup]
        return math.prod(values) ** (1 / len(values)) if values else None

    def to_manifest(self, chosen: bool) -> dict[str, Any]:
        """The candidate's figures as the manifest's ``candidates`` list records them."""
        parity = self.parity
        return {
            "name": self.name,
            "precision": self.candidate.precision,
            "chosen": chosen,
            "model_bytes": self.size,
            "latency_ms": {str(b): round(v, 4) for b, v in self.latency_ms.items()},
            "speedup": {str(b): round(v, 3) for b, v in self.speedup.items()},
            "parity": None
            if parity is None
            else {
                "passed": parity.passed,
                **_brief(parity.metrics),
                "failures": list(parity.failures),
            },
            "quantization": None if self.optimized is None else self.optimized.quantization,
            "error": self.error,
            "verdict": self.verdict,
        }


def _brief(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "label_agreement", "p99_probability_error", "max_probability_error",
        "p99_relative_error", "max_relative_error",
    )  # fmt: skip
    return {k: metrics[k] for k in keys if metrics.get(k) is not None}


def candidates_for(profile: Profile, family: str) -> list[Candidate]:
    """The candidates ``profile`` allows for a model of ``family``, fp32 first."""
    found = [Candidate("fp32", "fp32"), Candidate("fp32-opt", "fp32", graph_optimized=True)]
    lowest = profile.precision_for(family)
    q = profile.quantization
    if lowest == "int8":
        found += [
            Candidate("int8-dynamic", "int8", dataclasses.replace(q, mode="dynamic")),
            Candidate(
                "int8-static-pc-minmax",
                "int8",
                dataclasses.replace(
                    q, mode="static", per_channel=True, calibration_method="minmax"
                ),
            ),
            Candidate(
                "int8-static-pt-minmax",
                "int8",
                dataclasses.replace(
                    q, mode="static", per_channel=False, calibration_method="minmax"
                ),
            ),
            Candidate(
                "int8-static-pc-percentile",
                "int8",
                dataclasses.replace(
                    q, mode="static", per_channel=True, calibration_method="percentile"
                ),
            ),
        ]
    elif lowest == "fp16":
        found += [Candidate("fp16", "fp16"), Candidate("fp16-mixed", "fp16", mixed=True)]
    return found


def _session(model_bytes: bytes, providers: Sequence[str], profile: Profile) -> Any:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = profile.threads.intra_op
    options.inter_op_num_threads = profile.threads.inter_op
    return ort.InferenceSession(model_bytes, options, providers=list(providers))


def _batch(feeds: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    n = len(next(iter(feeds.values())))
    index = np.arange(size) % n
    return {k: np.ascontiguousarray(v[index]) for k, v in feeds.items()}


def _time(
    sessions: dict[str, Any], feeds: dict[str, np.ndarray], timing: Timing, batch: int | None
) -> dict[str, float]:
    """Median milliseconds per run of each session, timed in alternating rounds.

    With a fixed ``batch`` a "run" is the request's rows in chunks, as the device runs them.
    """
    for session in sessions.values():
        run_batched(session, feeds, batch)  # warm-up: first runs allocate
    per_round = max(timing.seconds / max(timing.rounds, 1), 1e-4)
    samples: dict[str, list[float]] = {name: [] for name in sessions}
    for round_index in range(max(timing.rounds, 1)):
        order = list(sessions) if round_index % 2 == 0 else list(reversed(sessions))
        for name in order:
            session, runs, start = sessions[name], 0, time.perf_counter()
            while True:
                run_batched(session, feeds, batch)
                runs += 1
                elapsed = time.perf_counter() - start
                if elapsed >= per_round:
                    break
            samples[name].append(elapsed / runs * 1000)
    return {name: statistics.median(values) for name, values in samples.items()}


def measure(
    model: onnx.ModelProto,
    candidates: Sequence[Candidate],
    *,
    profile: Profile,
    providers: Sequence[str],
    task: str,
    classes: Sequence[Any],
    parity_feeds: dict[str, np.ndarray],
    source: Prediction,
    calibration: dict[str, np.ndarray] | None,
    timing: Timing,
    step: Callable[[str], None] = lambda _step: None,
    batch: int | None = None,
) -> list[Measured]:
    """Make, check, gate and time every candidate; the first one (plain fp32) is the baseline.

    ``batch`` is the model's fixed batch (``None``: dynamic): every candidate then runs its
    parity rows, timings and int8 calibration one padded batch at a time (edgepack.packager._batch).
    """
    measured: list[Measured] = []
    for candidate in candidates:
        step(f"optimizing ({candidate.name})")
        m = Measured(candidate)
        measured.append(m)
        try:
            if candidate.graph_optimized:
                m.optimized = graph_optimize(model)
            else:
                settings = candidate.settings or profile.quantization
                m.optimized = optimize(
                    model,
                    candidate.precision,
                    settings,
                    calibration,
                    mixed=candidate.mixed,
                    batch=batch or 1,
                )
            check_limits(
                m.optimized.model, profile.max_opset, profile.max_ml_opset, profile.max_ir_version
            )
            m.model_bytes = m.optimized.model.SerializeToString()
            if len(m.model_bytes) > profile.budgets.max_model_bytes:
                raise EdgepackError(
                    f"model is {len(m.model_bytes):,} bytes, above the profile's budget of "
                    f"{profile.budgets.max_model_bytes:,}"
                )
        except EdgepackError as e:
            m.error = str(e)
            continue
        step(f"checking parity ({candidate.name})")
        try:
            m.session = _session(m.model_bytes, providers, profile)
            outputs = run_batched(m.session, parity_feeds, batch)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types; recorded
            m.error = f"the packaged model does not run here ({', '.join(providers)}): " + (
                short_error(e)
            )
            m.session = None
            continue
        m.parity = compare(
            task,
            source,
            packaged_prediction(task, outputs),
            profile.tolerance_for(candidate.precision),
            statistic="max" if candidate.precision == "fp32" else "p99",
            classes=classes,
        )
    runnable = {m.name: m.session for m in measured if m.session is not None}
    if runnable:
        step("timing candidates")
        for size in BATCHES:
            times = _time(runnable, _batch(parity_feeds, size), timing, batch)
            for m in measured:
                if m.name in times:
                    m.latency_ms[size] = times[m.name]
        base = measured[0].latency_ms
        for m in measured:
            m.speedup = {b: base[b] / v for b, v in m.latency_ms.items() if b in base and v > 0}
    for m in measured:
        m.session = None  # sessions hold threads and memory; the chosen one is rebuilt
    return measured


def _clearly_faster(m: Measured) -> bool:
    mean = m.speedup_mean()
    return (
        mean is not None
        and mean >= MIN_SPEEDUP
        and min(m.speedup.values(), default=0) >= MAX_SLOWDOWN
    )


def _clearly_smaller(m: Measured, base: Measured) -> bool:
    if m.size is None or base.size is None:
        return False
    return m.size <= MAX_SIZE_RATIO * base.size and base.size - m.size >= MIN_SAVED_BYTES


def select(
    measured: Sequence[Measured],
    objective: str,
    *,
    latency_is_evidence: bool,
    prefer: str | None = None,
) -> Measured | None:
    """The candidate to ship (``None``: nothing passed); sets every candidate's ``verdict``.

    Args:
        measured: from :func:`measure`, plain fp32 first.
        objective: ``latency``, ``size`` or ``accuracy``.
        latency_is_evidence: whether this machine's timings say anything about the target.
        prefer: the candidate shipped before under this name and version, if any.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
    fp32 = [m for m in measured if m.candidate.precision == "fp32" and m.passed]
    for m in measured:
        m.verdict = m.error or ("missed the parity gate" if not m.passed else "")
    if not fp32:
        passing = [m for m in measured if m.passed]
        if not passing:
            return None
        base: Measured | None = None
    else:
        # fp32 with graph optimizations over the plain model when both pass: same numbers,
        # less work at load time; chosen without timing, so the choice is stable.
        base = next((m for m in fp32 if m.candidate.graph_optimized), fp32[0])
    reference = base or measured[0]
    qualified: list[Measured] = []
    for m in measured:
        if not m.passed or m.candidate.precision == "fp32":
            continue
        faster = latency_is_evidence and _clearly_faster(m)
        smaller = _clearly_smaller(m, reference)
        not_slower = not latency_is_evidence or (m.speedup_mean() or 0) >= 1 / MIN_SPEEDUP
        if (objective == "latency" and (faster or (smaller and not latency_is_evidence))) or (
            objective == "size" and smaller and not_slower
        ):
            qualified.append(m)
        else:
            m.verdict = (
                "passes, but not clearly faster or smaller than fp32"
                if objective != "accuracy"
                else "passes; the objective is accuracy"
            )
    if qualified:
        preferred = next((m for m in qualified if m.name == prefer), None)
        if preferred is not None:
            chosen = preferred
        elif objective == "latency" and latency_is_evidence:
            chosen = max(qualified, key=lambda m: m.speedup_mean() or 0)
        else:
            chosen = min(qualified, key=lambda m: m.size or 0)
    elif base is not None:
        chosen = base
    else:
        return None
    for m in qualified:
        if m is not chosen:
            m.verdict = f"qualifies, but {chosen.name} is better for {objective}"
    for m in fp32:
        if m is not chosen:
            m.verdict = m.verdict or f"passes; {chosen.name} ships"
    chosen.verdict = "shipped"
    return chosen
