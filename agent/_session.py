"""onnxruntime sessions for installed models: open them as the device serves them, run them.

Two parts of the agent load an installed version: the lifecycle's health check (a new version
before it is committed, a retained one before a rollback; the runtime then serves that session)
and the runtime (the active version of every model at start, and what another process
committed). Both go through :func:`open_installed`: stream the version's files from the state
directory, verify them against the trusted keys again (files changed at rest are never served),
parse the manifest and open the session from the verified bytes of ``model.onnx``.
:func:`open_session` picks the execution providers (:func:`session_providers`: those of the
bundle that this device has, in the bundle's order, CPU last) and threads (the agent's
``[runtime]`` config overrides the profile's).

:func:`run_session` is the seam where inference enters onnxruntime: whatever onnxruntime raises
while computing becomes an :class:`~edgepack.agent.exceptions.InferenceError` (``raise ... from``
keeps the original), so callers handle one family. A model whose batch is fixed (the
manifest's ``fixed_batch``, an export that takes exactly 1 row, or 8, per run) runs there in
chunks of that batch, under the request's one deadline; a dynamic-batch model pays one check.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from edgepack.agent._config import RuntimeConfig
from edgepack.agent._state import Store
from edgepack.agent._unpack import verify_installed
from edgepack.agent.exceptions import HealthCheckError, InferenceError, StorageError
from edgepack.formats.bundle import GOLDEN_FILE, MODEL_FILE
from edgepack.formats.manifest import Manifest

__all__ = ["InstalledVersion", "open_installed", "open_session", "run_session", "session_providers"]

_KEEP = (MODEL_FILE, GOLDEN_FILE)  # what a load needs of the files; the rest only streams


@dataclass(frozen=True)
class InstalledVersion:
    """One installed version, verified and loaded: its files, its manifest, its session."""

    files: Mapping[str, bytes]  # the verified bytes of model.onnx and golden.npz
    manifest: Manifest
    session: ort.InferenceSession


def session_providers(manifest: Manifest, runtime: RuntimeConfig) -> list[str]:
    """The providers to ask for: the config's, else the bundle's that exist here, CPU last."""
    available = ort.get_available_providers()
    wanted = list(runtime.providers) or list(manifest.runtime.get("providers", []))
    chosen = [p for p in wanted if p in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def open_session(model: bytes, manifest: Manifest, runtime: RuntimeConfig) -> ort.InferenceSession:
    """Create the session that will serve ``model``.

    Args:
        model: the ONNX model's bytes.
        manifest: its manifest (providers and threads of the profile it was built for).
        runtime: the agent's ``[runtime]`` settings, which override the manifest's.

    Returns:
        The session.

    Raises:
        HealthCheckError: onnxruntime cannot load the model on this device.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    intra = runtime.intra_op_threads or int(manifest.runtime.get("intra_op_threads", 0))
    inter = runtime.inter_op_threads or int(manifest.runtime.get("inter_op_threads", 0))
    options.intra_op_num_threads = intra
    options.inter_op_num_threads = inter
    try:
        return ort.InferenceSession(model, options, providers=session_providers(manifest, runtime))
    except Exception as e:  # onnxruntime's own exception types, which it does not export
        raise HealthCheckError(
            f"{manifest.name} v{manifest.version} does not load in onnxruntime "
            f"{ort.__version__} here: {_first_line(e)}"
        ) from e


def open_installed(
    store: Store, name: str, version: int, keys: Sequence[Any], runtime: RuntimeConfig
) -> InstalledVersion:
    """Read an installed version's files, verify them, and open its session.

    Args:
        store: the state directory.
        name: the model.
        version: the installed version to open.
        keys: the trusted public keys the files must still verify against.
        runtime: the agent's ``[runtime]`` settings.

    Returns:
        ``model.onnx`` and ``golden.npz`` (the other files are hashed as they stream, not kept),
        the parsed manifest and the session.

    Raises:
        StorageError: the files cannot be read, are incomplete, or are another version's.
        SignatureError: the files on disk are no longer exactly what was signed.
        ManifestError: the manifest does not parse.
        HealthCheckError: onnxruntime cannot load the model here.
    """
    where = store.version_dir(name, version)
    # What is on disk must still be exactly what was signed (disk corruption, tampering); each
    # file is read once, and the model is loaded from the very bytes that were hashed.
    manifest, files = verify_installed(where, keys, name, version, keep=_KEEP)
    if MODEL_FILE not in files:
        raise StorageError(f"{where} is incomplete; reinstall {name}")
    return InstalledVersion(files, manifest, open_session(files[MODEL_FILE], manifest, runtime))


class _Deadlines:
    """One thread that stops overdue inferences: it sets ``RunOptions.terminate``, which
    onnxruntime checks between nodes (a Loop's iterations included), so the run ends with an
    error instead of holding its thread and a core forever. Only runs in flight are kept (a
    dict, bounded by the requests being served at once). Registering is one dict insert and
    one pop, with no lock: each is atomic under the GIL, and the watcher works on a snapshot.
    Deadlines are checked every ``tick`` seconds (the watcher is never woken per request:
    that would cost a thread switch each time)."""

    def __init__(self, tick: float = 0.25) -> None:
        self._tick = tick
        self._flying: dict[int, tuple[float, ort.RunOptions]] = {}
        self._serial = itertools.count(1)
        self._start = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, seconds: float, options: ort.RunOptions) -> int:
        ticket = next(self._serial)
        self._flying[ticket] = (time.monotonic() + seconds, options)
        if self._thread is None:
            with self._start:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="edgepack-deadlines", daemon=True
                    )
                    self._thread.start()
        return ticket

    def remove(self, ticket: int) -> bool:
        """Forget ``ticket``; False if the watcher claimed it (its options may be stopped)."""
        return self._flying.pop(ticket, None) is not None

    def _run(self) -> None:
        while True:
            now = time.monotonic()
            for ticket, (due, options) in list(self._flying.items()):
                if due <= now and self._flying.pop(ticket, None) is not None:
                    options.terminate = True
            time.sleep(self._tick)


_DEADLINES = _Deadlines()
_RUN_OPTIONS = threading.local()


def run_session(
    session: ort.InferenceSession,
    outputs: Sequence[str] | None,
    feeds: Mapping[str, np.ndarray],
    what: str,
    timeout: float = 0.0,
    direct: bool = False,
    batch: int | None = None,
) -> list[np.ndarray]:
    """Run ``session`` on ``feeds``: the one call into onnxruntime's inference.

    Args:
        session: the model's session.
        outputs: the outputs to compute (all when ``None``).
        feeds: input name → validated array.
        what: the model, for the message (``"iris v2"``).
        timeout: seconds before onnxruntime is told to stop (0: no limit).
        direct: call onnxruntime's compiled session without its Python wrapper, which checks
            again what the caller validated already (input names, ownership) and retries a
            failed GPU provider on the CPU; for CPU-only sessions and named outputs (a few µs
            a call, which for a small model is a tenth of its time).
        batch: the model's fixed batch (the manifest's ``fixed_batch``; ``None``: dynamic). The
            rows then run in chunks of it, the last padded with copies of its last row, and the
            outputs are joined with the padding dropped; ``timeout`` covers all the chunks.

    Returns:
        The outputs, in the order asked for.

    Raises:
        InferenceError: onnxruntime failed while computing, or did not finish within
            ``timeout`` (the original is the ``__cause__``).
    """
    names = outputs if outputs is None or type(outputs) is list else list(outputs)
    run = session._sess.run if direct and names else session.run  # see direct
    if batch:
        run = _in_chunks(run, batch)
    if timeout <= 0:
        try:
            return run(names, feeds, None)  # a list already
        except Exception as e:  # onnxruntime's own exception types, which it does not export
            raise InferenceError(
                f"{what} failed while computing an answer: {_first_line(e)}"
            ) from e
    options = getattr(_RUN_OPTIONS, "options", None)
    if options is None:  # one per thread, reused: making one per request costs ~10 µs
        options = _RUN_OPTIONS.options = ort.RunOptions()
    ticket = _DEADLINES.add(timeout, options)
    try:
        return run(names, feeds, options)
    except Exception as e:
        if options.terminate:
            raise InferenceError(
                f"{what} did not answer within {timeout:g} s, was stopped (a model that "
                "loops or is far too slow on these inputs; [runtime] request_timeout sets the "
                "limit)"
            ) from e
        raise InferenceError(f"{what} failed while computing an answer: {_first_line(e)}") from e
    finally:
        if not _DEADLINES.remove(ticket):  # the watcher claimed it, and may set terminate
            _RUN_OPTIONS.options = None  # at any moment: the next run gets fresh options


def _in_chunks(run: Callable[..., Any], batch: int) -> Callable[..., list[np.ndarray]]:
    """``run`` for a model whose batch is fixed: the rows one padded chunk of ``batch`` at a time.

    As the packager runs such a model (edgepack.packager._batch), which checked at build time
    that a row's outputs do not depend on the padding beside it.
    """

    def chunked(
        names: list[str] | None, feeds: Mapping[str, np.ndarray], options: Any
    ) -> list[np.ndarray]:
        items = list(feeds.items())
        rows = len(items[0][1])
        if rows == batch:
            return list(run(names, feeds, options))
        full = rows - rows % batch
        parts = [
            run(names, {k: v[at : at + batch] for k, v in items}, options)
            for at in range(0, full, batch)
        ]
        if full < rows or not rows:  # the last chunk, padded; zeros when there are no rows
            real = rows - full
            padded = {
                k: np.concatenate([v[full:], np.repeat(v[-1:], batch - real, axis=0)])
                if real
                else np.zeros((batch, *v.shape[1:]), dtype=v.dtype)
                for k, v in items
            }
            parts.append([o[:real] for o in _batched(run(names, padded, options), batch)])
        else:
            _batched(parts[0], batch)  # every chunk has the same output shapes
        return [np.concatenate(column) for column in zip(*parts, strict=True)]

    return chunked


def _batched(outputs: list[np.ndarray], batch: int) -> list[np.ndarray]:
    """``outputs`` of one chunk, if each has the chunk's ``batch`` rows (ValueError otherwise)."""
    for output in outputs:
        if np.ndim(output) == 0 or len(output) != batch:
            raise ValueError(f"an output has shape {list(np.shape(output))}, no batch of {batch}")
    return outputs


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
