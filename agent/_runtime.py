"""The models this device serves: one onnxruntime session per model, swappable under load.

:class:`Runtime` maps model names to :class:`ServedModel` (session + manifest). Swapping in a new
version replaces the map with a new one in a single assignment; a request that already holds the
old :class:`ServedModel` finishes on the old session, so a hot swap never fails or drops a request.
:meth:`Runtime.infer` is the one inference path: the in-process Python API and the HTTP server
both go through it, and it validates inputs against the manifest before onnxruntime sees them.
A request that is valid but on which the model itself fails (onnxruntime raises while computing)
is an :class:`~edgepack.agent.exceptions.InferenceError` (edgepack.agent._session.run_session).
Every request is reported to the monitor given to the constructor (telemetry and drift).

A model with an experiment (edgepack.agent._experiment) also has a candidate version: :meth:`route`
picks the version that answers a request (the candidate for a split's share), and a served
request is offered to a shadow candidate in :meth:`_finish`. :meth:`sync` loads and ends
experiments as ``state.json`` says, like active versions. With no experiment both cost one check
of an empty dict.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from edgepack.agent._batching import Batcher, Pending
from edgepack.agent._config import RuntimeConfig
from edgepack.agent._experiment import Experiment, Experiments, Plan
from edgepack.agent._monitor import Monitor
from edgepack.agent._session import open_installed, run_session
from edgepack.agent._state import DeviceState, Store
from edgepack.agent.exceptions import (
    EdgepackError,
    InferenceError,
    ModelNotFoundError,
    RequestError,
)
from edgepack.formats.manifest import Manifest, TensorSpec

__all__ = ["NUMPY_DTYPES", "Runtime", "ServedModel"]

log = logging.getLogger("edgepack.agent")

_SUM = np.add.reduce
_SMALL = 256  # elements summed as Python floats in the fast path's finiteness check
NUMPY_DTYPES: dict[str, Any] = {
    "float32": np.float32,
    "float64": np.float64,
    "float16": np.float16,
    "int64": np.int64,
    "int32": np.int32,
    "int8": np.int8,
    "uint8": np.uint8,
    "bool": np.bool_,
    "string": np.str_,
}


@dataclass(frozen=True)
class ServedModel:
    """One loaded model version (what requests need of it is worked out once, at load)."""

    manifest: Manifest
    session: ort.InferenceSession

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    @functools.cached_property
    def label(self) -> str:
        return f"{self.manifest.name} v{self.manifest.version}"

    @functools.cached_property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    @functools.cached_property
    def direct(self) -> bool:
        """Whether requests may call the compiled session directly (see run_session)."""
        return hasattr(self.session, "_sess") and self.session.get_providers() == [
            "CPUExecutionProvider"
        ]

    @functools.cached_property
    def fixed_batch(self) -> int | None:
        """Rows per run of a model whose batch is fixed (requests run in chunks); else None."""
        return self.manifest.fixed_batch

    @functools.cached_property
    def specs(self) -> dict[str, TensorSpec]:
        return {spec.name: spec for spec in self.manifest.inputs}

    @functools.cached_property
    def fast_plan(self) -> tuple[tuple[str, np.dtype[Any], int, tuple[tuple[int, int], ...]], ...]:
        """Per input: name, dtype, dimensions and the fixed ones (axis, size), for inputs that
        may take the fast path (numbers; text always goes the careful way)."""
        if any(spec.dtype == "string" for spec in self.manifest.inputs):
            return ()
        return tuple(
            (
                spec.name,
                np.dtype(NUMPY_DTYPES[spec.dtype]),
                len(spec.shape),
                tuple((axis, dim) for axis, dim in enumerate(spec.shape) if dim is not None),
            )
            for spec in self.manifest.inputs
        )


def _check_input(spec: TensorSpec, value: Any, max_rows: int, model: str) -> np.ndarray:
    """Convert and validate one input; RequestError says exactly what is wrong."""
    want = NUMPY_DTYPES[spec.dtype]
    try:
        array = np.asarray(value)
        if spec.dtype == "string":
            if array.dtype.kind not in "USO":
                raise TypeError(f"got {array.dtype}")
            # object, not fixed-width unicode: that costs 4 bytes x the longest string for
            # every element (one long string among many short ones is a memory bomb)
            array = array.astype(object)
            if not all(isinstance(item, str) for item in array.flat):
                raise TypeError("got values that are not text")
        elif array.dtype.kind in "USO":
            raise TypeError(f"got text ({array.dtype})")
        elif array.dtype != want:
            lossy = spec.dtype.startswith(("int", "uint")) and array.dtype.kind == "f"
            if lossy and not (np.all(np.isfinite(array)) and np.all(np.mod(array, 1) == 0)):
                raise TypeError("got non-integer numbers")
            array = array.astype(want)
    except (TypeError, ValueError) as e:
        raise RequestError(f"{model}: input {spec.name!r} must be {spec.dtype}: {e}") from e
    if array.ndim == len(spec.shape) - 1:
        array = array.reshape(1, *array.shape)  # one row without its batch dimension
    if array.ndim != len(spec.shape):
        raise RequestError(
            f"{model}: input {spec.name!r} must have {len(spec.shape)} dimensions "
            f"{_shape(spec.shape)}, got shape {list(array.shape)}"
        )
    for axis, (got, want_dim) in enumerate(zip(array.shape, spec.shape, strict=True)):
        if want_dim is not None and got != want_dim:
            raise RequestError(
                f"{model}: input {spec.name!r} dimension {axis} must be {want_dim} "
                f"{_shape(spec.shape)}, got shape {list(array.shape)}"
            )
    if array.ndim and array.shape[0] > max_rows:
        raise RequestError(f"{model}: {array.shape[0]} rows is above the limit of {max_rows}")
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise RequestError(f"{model}: input {spec.name!r} contains NaN or infinity")
    return np.ascontiguousarray(array)


def _rows(feeds: Mapping[str, np.ndarray]) -> int:
    first = next(iter(feeds.values()), None)
    return len(first) if first is not None and first.ndim else 0


def _shape(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("batch" if d is None else str(d) for d in shape) + "]"


class Runtime:
    """Serves the active version of every installed model.

    Args:
        runtime: the agent's ``[runtime]`` settings (providers, threads).
        max_rows: the most rows one request may carry.
        monitor: told of every request (telemetry and drift); none: nothing is recorded.
        experiments: the registry of running experiments (shared with the monitor); none: a
            registry of this runtime's own.
        on_crash: told when a shadow thread crashed (the agent counts it).
    """

    def __init__(
        self,
        runtime: RuntimeConfig,
        max_rows: int = 4096,
        monitor: Monitor | None = None,
        experiments: Experiments | None = None,
        on_crash: Callable[[str, str, str], None] | None = None,
    ) -> None:
        self._config = runtime
        self._max_rows = max_rows
        self._monitor = monitor
        self.experiments = experiments or Experiments()
        self._on_crash = on_crash
        self._models: dict[str, ServedModel] = {}
        self._sync_lock = threading.Lock()
        self._batchers: dict[tuple[str, int], Batcher] = {}
        self._batch_lock = threading.Lock()
        self.generation = -1
        self.failed: dict[str, tuple[int, str]] = {}  # model -> (version, why it is not served)

    def get(self, name: str, version: int | None = None) -> ServedModel:
        """The served model, or :class:`ModelNotFoundError` naming what is there."""
        served = self._models.get(name)
        if served is None:
            known = ", ".join(sorted(self._models)) or "none"
            raise ModelNotFoundError(f"model {name!r} is not served here (serving: {known})")
        if version is not None and version != served.version:
            raise ModelNotFoundError(
                f"{name} v{version} is not served; the active version is v{served.version}"
            )
        return served

    def route(
        self, name: str, version: int | None = None, caller: str | None = None
    ) -> ServedModel:
        """The version that answers a request: the active one, or while a split runs the
        candidate for its share (sticky per ``caller`` when given); asking for the candidate's
        version by number gets the candidate.

        Raises:
            ModelNotFoundError: no such model or version.
        """
        running = self.experiments.running
        if running:
            experiment = running.get(name)
            if experiment is not None:
                candidate = experiment.candidate
                if version == candidate.version:
                    return candidate
                if version is None and experiment.split and experiment.answers(caller):
                    return candidate
        return self.get(name, version)

    def models_by_name(self) -> dict[str, ServedModel]:
        """The active versions served, by model (a snapshot)."""
        return self._models

    def models(self) -> list[ServedModel]:
        return sorted(self._models.values(), key=lambda m: m.name)

    def put(self, served: ServedModel) -> None:
        """Serve ``served`` from now on; requests in flight finish on the model they hold."""
        self._models = {**self._models, served.name: served}
        if self._batchers:
            self._retire_batchers()

    def remove(self, name: str) -> None:
        self._models = {k: v for k, v in self._models.items() if k != name}
        if self._batchers:
            self._retire_batchers()

    def sync(self, store: Store, state: DeviceState, keys: Sequence[Any]) -> list[str]:
        """Make the served set match ``state``: load new active versions, drop retired models.

        Installed files are verified against the trusted keys again before loading, so files
        changed at rest are never served. Returns a line per change.
        """
        changes = []
        with self._sync_lock:
            for name, model in state.models.items():
                current = self._models.get(name)
                if model.active is None:
                    if current is not None:
                        self.remove(name)
                        changes.append(f"{name}: retired")
                    continue
                if current is not None and current.version == model.active:
                    continue
                if self.failed.get(name, (None,))[0] == model.active:
                    continue  # already reported; retried when the active version changes
                try:
                    self.put(self._load(store, name, model.active, keys))
                    self.failed.pop(name, None)
                    changes.append(f"{name}: serving v{model.active}")
                except EdgepackError as e:
                    # One broken model must not take the others down with it.
                    self.remove(name)
                    self.failed[name] = (model.active, str(e))
                    log.error("runtime: not serving %s v%d: %s", name, model.active, e)
            for name in [n for n in self._models if n not in state.models]:
                self.remove(name)
                changes.append(f"{name}: removed")
            changes += self._sync_experiments(store, state, keys)
            self.generation = state.generation
        for line in changes:
            log.info("runtime: %s", line)
        return changes

    def _sync_experiments(self, store: Store, state: DeviceState, keys: Sequence[Any]) -> list[str]:
        """Run the experiments ``state`` records (candidates loaded and verified like active
        versions), end the others; a candidate that cannot be loaded is not run (logged)."""
        changes = []
        for name, model in state.models.items():
            running = self.experiments.get(name)
            candidate = model.candidate
            active = self._models.get(name)
            if candidate is None or active is None:
                if running is not None:
                    self.experiments.end(name)
                    changes.append(f"{name}: experiment ended")
                continue
            version, plan = int(candidate["version"]), Plan.from_json(candidate["plan"])
            if (
                running is not None
                and running.candidate.version == version
                and running.plan == plan
                and running.active == active.version
            ):
                continue
            try:
                served = (
                    running.candidate
                    if running is not None and running.candidate.version == version
                    else self._load(store, name, version, keys)
                )
            except EdgepackError as e:
                log.error("runtime: not running the candidate %s v%d: %s", name, version, e)
                if running is not None:
                    self.experiments.end(name)
                continue
            self.start_experiment(served, plan, active.version)
            changes.append(f"{name}: experiment {plan.mode} with candidate v{version}")
        for name in [n for n in self.experiments.running if n not in state.models]:
            self.experiments.end(name)
            changes.append(f"{name}: experiment ended")
        return changes

    def start_experiment(self, candidate: ServedModel, plan: Plan, active: int) -> None:
        """Run ``candidate`` (loaded and checked) in an experiment beside ``active``."""
        names = candidate.output_names
        self.experiments.start(
            Experiment(
                candidate,
                active,
                plan,
                lambda served, feeds: self._session_run(served, names, feeds),
                self.experiments.config,
                on_crash=self._on_crash,
            )
        )

    def _load(self, store: Store, name: str, version: int, keys: Sequence[Any]) -> ServedModel:
        installed = open_installed(store, name, version, keys, self._config)
        return ServedModel(installed.manifest, installed.session)

    def prepare(self, served: ServedModel, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Validate ``inputs`` against the manifest and build onnxruntime feeds.

        Raises:
            RequestError: an input is missing, unknown, or of the wrong dtype or shape.
        """
        specs = served.specs
        unknown = sorted(set(inputs) - set(specs))
        if unknown:
            raise RequestError(
                f"{served.name}: unknown input(s) {', '.join(map(repr, unknown))}; the model "
                f"takes {', '.join(map(repr, specs))}"
            )
        missing = [name for name in specs if name not in inputs]
        if missing:
            raise RequestError(f"{served.name}: missing input(s) {', '.join(map(repr, missing))}")
        feeds = {
            name: _check_input(spec, inputs[name], self._max_rows, served.name)
            for name, spec in specs.items()
        }
        rows = {len(v) for v in feeds.values() if v.ndim}
        if len(rows) > 1:
            raise RequestError(
                f"{served.name}: inputs have different numbers of rows {sorted(rows)}"
            )
        return feeds

    def _fast_feeds(
        self, served: ServedModel, inputs: Mapping[str, Any]
    ) -> dict[str, np.ndarray] | None:
        """The feeds when every input already is a C-ordered array of the manifest's dtype and
        shape, finite, within the row limit; otherwise None, and :meth:`prepare` checks (and
        explains) the slow way. A handful of attribute reads per input: what a caller that
        passes ready arrays pays."""
        plan = served.fast_plan
        if not plan or len(inputs) != len(plan):
            return None
        rows = -1
        for name, dtype, ndim, fixed in plan:
            array = inputs.get(name)
            if (
                type(array) is not np.ndarray
                or array.dtype != dtype
                or array.ndim != ndim
                or not array.flags.c_contiguous
            ):
                return None
            shape = array.shape
            for axis, dim in fixed:
                if shape[axis] != dim:
                    return None
            if ndim:
                if rows < 0:
                    rows = shape[0]
                if shape[0] != rows or rows > self._max_rows:
                    return None
            # NaN or infinity makes the sum non-finite; a float64 sum of float32 rows cannot
            # overflow, and float64 rows near 1e308 merely go to the exact check in prepare.
            # A few rows are summed as Python floats: right after onnxruntime ran, numpy's
            # ufunc machinery is out of the CPU's caches and costs twice as much.
            if dtype.kind == "f":
                small = array.size <= _SMALL
                total = sum(array.ravel().tolist()) if small else _SUM(array, None, np.float64)
                if not math.isfinite(total):
                    return None  # prepare says which input holds NaN or infinity
        return dict(inputs)

    def infer(
        self,
        name: str,
        inputs: Mapping[str, Any],
        version: int | None = None,
        outputs: Sequence[str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Run one request through the active model.

        Args:
            name: the model.
            inputs: input name → array-like (a single row may omit the batch dimension).
            version: fail unless this is the active version.
            outputs: the outputs wanted (all when ``None``).

        Raises:
            ModelNotFoundError: no such model or version.
            RequestError: bad inputs or unknown outputs.
            InferenceError: the inputs were valid but the model failed on them (onnxruntime
                raised; it is the ``__cause__``).
        """
        return self.run(self.route(name, version), inputs, outputs)

    def run(
        self, served: ServedModel, inputs: Mapping[str, Any], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run on the model already held, even if a newer version was swapped in meanwhile.

        Raises:
            RequestError: bad inputs or unknown outputs.
            InferenceError: the model failed on valid inputs.
        """
        feeds, wanted, run = self._validated(served, inputs, outputs)
        batcher = self._batcher(served)
        if batcher is not None:
            pending = Pending(feeds, _rows(feeds))
            if batcher.submit(pending):
                limit = self._config.request_timeout
                if not pending.wait(limit + 10.0 if limit > 0 else 1e9):  # the run has its own
                    self._failed(served, "runtime_error")
                    raise InferenceError(f"{served.label}: no answer from the batcher")
                return self._answered(served, feeds, wanted, run, pending)
        start = time.perf_counter()
        try:
            results = self._session_run(served, run, feeds)
        except InferenceError:
            self._failed(served, "runtime_error")
            raise
        return self._finish(served, feeds, wanted, run, results, time.perf_counter() - start)

    def run_async(
        self,
        served: ServedModel,
        inputs: Mapping[str, Any],
        outputs: Sequence[str] | None,
        done: Callable[[dict[str, np.ndarray] | None, BaseException | None], None],
    ) -> bool:
        """Queue the request on the model's batcher and return at once; ``done`` gets the
        outputs (or the error) on the batcher's thread. False, with nothing queued, when the
        model does not batch (or its queue is full): then call :meth:`run`.

        Raises:
            RequestError: bad inputs or unknown outputs (at once, on the caller's thread).
        """
        batcher = self._batcher(served)
        if batcher is None or not batcher.splittable:
            return False
        feeds, wanted, run = self._validated(served, inputs, outputs)

        def answered(pending: Pending) -> None:
            try:
                result = self._answered(served, feeds, wanted, run, pending)
            except BaseException as e:  # noqa: BLE001 - handed to the callback, like a result
                done(None, e)
                return
            done(result, None)

        return batcher.submit(Pending(feeds, _rows(feeds), answered))

    def batching(self, served: ServedModel) -> bool:
        """Whether requests for ``served`` go through a batcher (``[runtime] batch_delay_ms``)."""
        return self._batcher(served) is not None

    def _validated(
        self, served: ServedModel, inputs: Mapping[str, Any], outputs: Sequence[str] | None
    ) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
        """Feeds, the outputs wanted and the outputs to compute; RequestError otherwise."""
        feeds = self._fast_feeds(served, inputs)
        if feeds is None:
            try:
                feeds = self.prepare(served, inputs)
            except RequestError:
                self._failed(served, "bad_request")
                raise
        names = served.output_names
        if not outputs:
            return feeds, names, names
        wanted = list(outputs)
        unknown = [o for o in wanted if o not in names]
        if unknown:
            self._failed(served, "bad_request")
            raise RequestError(
                f"{served.name}: unknown output(s) {', '.join(map(repr, unknown))}; "
                f"the model has {', '.join(map(repr, names))}"
            )
        if self._batcher(served) is not None:
            return feeds, wanted, names  # a batch computes every output once
        # drift watches the model's first output (label / prediction): always compute it
        monitored = self._monitor is None or names[0] in wanted
        return feeds, wanted, wanted if monitored else [names[0], *wanted]

    def _session_run(
        self, served: ServedModel, run: list[str], feeds: dict[str, np.ndarray]
    ) -> list[np.ndarray]:
        return run_session(
            served.session,
            run,
            feeds,
            served.label,
            timeout=self._config.request_timeout,
            direct=served.direct,
            batch=served.fixed_batch,
        )

    def _answered(
        self,
        served: ServedModel,
        feeds: dict[str, np.ndarray],
        wanted: list[str],
        run: list[str],
        pending: Pending,
    ) -> dict[str, np.ndarray]:
        if pending.error is not None or pending.result is None:
            self._failed(served, "runtime_error")
            if isinstance(pending.error, InferenceError):
                raise pending.error
            raise InferenceError(f"{served.label} failed: {pending.error!r}") from pending.error
        return self._finish(served, feeds, wanted, run, pending.result, pending.seconds)

    def _finish(
        self,
        served: ServedModel,
        feeds: dict[str, np.ndarray],
        wanted: list[str],
        run: list[str],
        results: list[np.ndarray],
        elapsed: float,
    ) -> dict[str, np.ndarray]:
        computed = dict(zip(run, results, strict=True))
        monitor = self._monitor
        if monitor is not None:
            first = served.output_names[0]
            observed = {first: computed[first]}
            monitor.observe(served.name, served.version, feeds, observed, elapsed, _rows(feeds))
        running = self.experiments.running
        if running:
            experiment = running.get(served.name)
            if experiment is not None and experiment.shadow and served is not experiment.candidate:
                experiment.offer(feeds, computed)
        return computed if run is wanted else {key: computed[key] for key in wanted}

    @property
    def monitor(self) -> Monitor | None:
        return self._monitor

    def remember(
        self, served: ServedModel, request_id: str | None, outputs: Mapping[str, Any]
    ) -> None:
        """Keep the predictions of a request by its id, for feedback (``[quality]``)."""
        if self._monitor is not None and request_id is not None:
            self._monitor.remember(served.name, served.version, request_id, outputs)

    def _failed(self, served: ServedModel, kind: str) -> None:
        if self._monitor is not None:
            self._monitor.failed(served.name, served.version, kind)

    def _batcher(self, served: ServedModel) -> Batcher | None:
        """The batcher of ``served`` when its model batches (made on first use)."""
        config = self._config
        if config.batch_delay_ms <= 0 or (
            config.batch_models and served.name not in config.batch_models
        ):
            return None
        key = (served.name, served.version)
        batcher = self._batchers.get(key)
        if batcher is None:
            with self._batch_lock:
                batcher = self._batchers.get(key)
                if batcher is None:
                    names = served.output_names
                    batcher = Batcher(
                        lambda feeds: self._session_run(served, names, feeds),
                        served.label,
                        config.batch_delay_ms / 1000.0,
                        config.batch_rows,
                    )
                    self._batchers = {**self._batchers, key: batcher}
        return batcher

    def _retire_batchers(self) -> None:
        """Stop the batchers of versions no longer served (their waiting requests answered)."""
        live = {(m.name, m.version) for m in self._models.values()}
        live |= {(e.model, e.candidate.version) for e in self.experiments.running.values()}
        with self._batch_lock:
            gone = [b for key, b in self._batchers.items() if key not in live]
            self._batchers = {k: b for k, b in self._batchers.items() if k in live}
        for batcher in gone:
            threading.Thread(target=batcher.stop, name="edgepack-batch-stop", daemon=True).start()

    def activate(self, served: ServedModel) -> None:
        """Serve ``served``, a version the lifecycle has already loaded and health-checked
        (edgepack.agent._health_check), instead of loading it again; requests in flight finish
        on the model they hold. Call it only for the committed active version: the next
        :meth:`sync` keeps it while ``state.json`` says so, and replaces it otherwise."""
        with self._sync_lock:
            self.put(served)
            self.failed.pop(served.name, None)
            log.info("runtime: %s: serving v%d, the checked session", served.name, served.version)
