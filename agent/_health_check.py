"""The lifecycle's health check, bounded in time, run on the very session that will then serve.

HEALTH_CHECK (edgepack.agent._lifecycle) calls :func:`check_installed`. By default the check runs
in the agent, in a worker thread that the lifecycle waits on for at most ``[limits]
health_check_timeout`` seconds:

1. :func:`edgepack.agent._session.open_installed` streams the installed version's files once,
   hashing them, verifies them against the trusted keys, parses the manifest and opens the
   onnxruntime session from the bytes of ``model.onnx`` it hashed (what is loaded is exactly
   what was verified; nothing is read twice, and only the model and the golden rows are held);
2. :func:`edgepack.agent._health.check_golden` runs the golden inputs on that session with
   whatever time is left as its deadline: ``RunOptions.terminate``, which onnxruntime checks
   between nodes and between a Loop's iterations, stops a graph that loops.

The checked session comes back in :class:`Checked`. The lifecycle puts it in the operation's
:class:`~edgepack.agent._states.Outcome`, and the agent serves it after the commit
(:meth:`edgepack.agent._runtime.Runtime.activate`), so the model is loaded once and costs
its load plus its golden rows, not an interpreter start and a second load.

What bounds each failure:

* A graph that loops is stopped at the deadline. The install fails its health check and rolls
  back.
* A load or a single kernel that does not return: the lifecycle stops waiting at the deadline
  (plus :data:`GRACE`), and the install fails and rolls back the same way. A thread cannot be
  killed, so the stuck one is left to finish in the background. While one is left, later checks
  run in a child process (edgepack.agent._probe), so stuck checks cannot pile up.
* A native crash or an out-of-memory kill during the check takes the agent down with it. The
  journal says ``health_check``, so the restart resumes the check, and once the install has
  been interrupted ``[limits] max_install_attempts`` times it is rolled back (the crash-loop
  limit). The previous version serves again after each restart.

``[limits] health_check_in_child = true`` instead runs every check in a child process
(:func:`edgepack.agent._probe.check_in_child`, killed at the deadline), so such a crash cannot
reach the agent. That costs an interpreter start, and the runtime loads the model a second
time afterwards.

For tests, ``EDGEPACK_FAULT_PROBE_SIGNAL=SIGSEGV`` makes whichever process runs the check (the
agent, or the child) kill itself with that signal once the session is open, on every attempt:
the native crash of a hostile model, which a real part cannot produce on demand.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import onnxruntime as ort

from edgepack.agent._config import RuntimeConfig
from edgepack.agent._health import check_golden
from edgepack.agent._probe import check_in_child, overdue
from edgepack.agent._session import open_installed
from edgepack.agent._state import Store
from edgepack.agent._unpack import verify_installed
from edgepack.agent.exceptions import HealthCheckError
from edgepack.formats.bundle import GOLDEN_FILE
from edgepack.formats.manifest import Manifest

__all__ = ["GRACE", "Checked", "check_installed", "checks_left_running"]

log = logging.getLogger("edgepack.agent")

GRACE = 1.0  # seconds past the deadline to wait for a run that onnxruntime was told to stop

_left_lock = threading.Lock()
_left_running: list[threading.Thread] = []  # checks the lifecycle stopped waiting for


@dataclass(frozen=True)
class Checked:
    """A version that passed its health check."""

    manifest: Manifest
    rows: int  # golden rows that matched
    session: ort.InferenceSession | None  # the checked session; None when checked in a child
    load_seconds: float = 0.0  # reading, verifying and loading the files (in process)
    golden_seconds: float = 0.0  # running and comparing the golden rows (in process)


def checks_left_running() -> int:
    """How many in-process checks overran their deadline and are still running."""
    with _left_lock:
        _left_running[:] = [t for t in _left_running if t.is_alive()]
        return len(_left_running)


def check_installed(
    store: Store,
    name: str,
    version: int,
    keys: Sequence[Any],
    runtime: RuntimeConfig,
    *,
    deadline: float,
    in_child: bool = False,
) -> Checked:
    """Verify the installed files of ``name`` ``version``, load them, and run the golden check,
    all within ``deadline`` seconds.

    Args:
        store: the state directory.
        name, version: the installed version to check.
        keys: the trusted bundle-signing keys its files must verify against.
        runtime: the agent's ``[runtime]`` settings (the session is opened as it will serve).
        deadline: seconds the whole check may take, loading included.
        in_child: run it in a child process instead (``[limits] health_check_in_child``).

    Returns:
        The manifest, the golden rows checked and the session they ran on (``None`` from a
        child).

    Raises:
        HealthCheckError: the outputs differ, the model does not load, it did not finish within
            the deadline, or (in a child) it crashed onnxruntime.
        SignatureError: the installed files are no longer exactly what was signed.
        StorageError: the files cannot be read, are incomplete, or are another version's.
        ManifestError: the manifest does not parse.
    """
    what = f"{name} v{version}"
    if not in_child and checks_left_running():
        log.warning(
            "an earlier health check is still running past its deadline; checking %s in a "
            "child process",
            what,
        )
        in_child = True
    if in_child:
        directory = store.version_dir(name, version)
        manifest, _ = verify_installed(directory, keys, name, version)
        rows = check_in_child(
            directory,
            providers=list(runtime.providers),
            intra_op_threads=runtime.intra_op_threads,
            inter_op_threads=runtime.inter_op_threads,
            deadline=deadline,
            what=what,
        )
        log.info("%s healthy: %d golden rows match (in a child process)", what, rows)
        return Checked(manifest, rows, None)
    return _check_in_thread(store, name, version, keys, runtime, deadline, what)


def _check_in_thread(
    store: Store,
    name: str,
    version: int,
    keys: Sequence[Any],
    runtime: RuntimeConfig,
    deadline: float,
    what: str,
) -> Checked:
    started = time.monotonic()
    outcome: list[Checked | Exception] = []

    def work() -> None:
        try:
            installed = open_installed(store, name, version, keys, runtime)
            _fault()
            loaded = time.monotonic()
            left = deadline - (loaded - started)
            if left <= 0:
                raise overdue(what, deadline)
            golden = installed.files.get(GOLDEN_FILE, b"")
            rows = check_golden(installed.session, installed.manifest, golden, timeout=left)
            checked = Checked(
                installed.manifest, rows, installed.session,
                load_seconds=loaded - started, golden_seconds=time.monotonic() - loaded,
            )  # fmt: skip
            log.info(
                "%s healthy: %d golden rows match (loaded in %.3f s, golden rows %.3f s)",
                what, rows, checked.load_seconds, checked.golden_seconds,
            )  # fmt: skip
            outcome.append(checked)
        except Exception as e:  # noqa: BLE001 - handed to the lifecycle, which raises it
            outcome.append(e)

    thread = threading.Thread(target=work, name=f"edgepack-health-check-{what}", daemon=True)
    thread.start()
    thread.join(deadline + GRACE)
    if thread.is_alive():
        with _left_lock:
            _left_running.append(thread)
        log.error(
            "%s: the health check is still running %g s after its deadline (a load or a kernel "
            "that does not return); giving up on it, it is left to finish in the background",
            what,
            GRACE,
        )
        raise overdue(what, deadline)
    if not outcome:
        raise HealthCheckError(f"{what}: the health check ended without a result")
    result = outcome[0]
    if isinstance(result, Checked):
        return result
    if isinstance(result, HealthCheckError) and time.monotonic() - started >= deadline:
        raise overdue(what, deadline) from result  # onnxruntime was told to stop: the deadline
    raise result


def _fault() -> None:
    """Test hook: a native crash of onnxruntime in the check, on every attempt."""
    fault = os.environ.get("EDGEPACK_FAULT_PROBE_SIGNAL")
    if fault:
        os.kill(os.getpid(), signal.Signals[fault])
