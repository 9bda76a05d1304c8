"""The health check in a child process: a model that loops or crashes onnxruntime cannot take the
daemon with it.

A signed model can still be hostile or broken: a graph that loops 2**62 times, or an operator that
makes onnxruntime crash natively. By default the lifecycle checks a model in the agent itself,
under a deadline (edgepack.agent._health_check); with ``[limits] health_check_in_child = true``,
and whenever an earlier in-process check is still stuck past its deadline, it runs
:func:`check_in_child` instead: a fresh interpreter (``python -m edgepack.agent._probe``) loads
the installed, already verified files, opens the session the way the device will serve it, runs
the golden inputs, and prints one JSON line. The parent waits at most ``deadline`` seconds, then
kills the child's whole process group. Whatever goes wrong becomes a
:class:`~edgepack.agent.exceptions.HealthCheckError` that says what happened, and the lifecycle
rolls back as for any failed health check; a native crash or an out-of-memory kill stays in the
child.

For tests, ``EDGEPACK_FAULT_PROBE_SIGNAL=SIGSEGV`` makes the child kill itself with that signal
once the session is open: the native crash a real part cannot produce on demand.

The child needs only what the daemon has (onnxruntime, numpy); it costs one interpreter start
with its imports (0.6 s on an idle 2-core machine, several seconds under load) on top of what
the load and the golden rows cost, and the runtime loads the model again afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from edgepack.agent.exceptions import HealthCheckError

__all__ = ["check_in_child", "overdue"]

_MAX_OUTPUT = 64 * 1024


def check_in_child(
    version_dir: Path,
    *,
    providers: list[str],
    intra_op_threads: int,
    inter_op_threads: int,
    deadline: float,
    what: str,
) -> int:
    """Health-check the staged files in ``version_dir`` in a child process, within ``deadline``.

    Args:
        version_dir: holds the verified ``manifest.json``, ``model.onnx`` and ``golden.npz``.
        providers, intra_op_threads, inter_op_threads: the agent's ``[runtime]`` overrides.
        deadline: seconds the child may take, loading included.
        what: ``"NAME vVERSION"`` for messages.

    Returns:
        The number of golden rows that matched.

    Raises:
        HealthCheckError: the check failed, the model did not finish within the deadline, or
            the child died (a native crash in onnxruntime, out of memory).
    """
    request = json.dumps(
        {
            "dir": str(version_dir),
            "providers": providers,
            "intra_op_threads": intra_op_threads,
            "inter_op_threads": inter_op_threads,
        }
    )
    try:
        child = subprocess.Popen(
            [sys.executable, "-m", "edgepack.agent._probe"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: killed whole on timeout
        )
    except OSError as e:
        raise HealthCheckError(f"{what}: cannot start the health-check process: {e}") from e
    try:
        out, err = child.communicate(request.encode(), timeout=deadline)
    except subprocess.TimeoutExpired:
        _kill_group(child)
        child.communicate()
        raise overdue(what, deadline) from None
    result = _last_json_line(out)
    if child.returncode < 0 or result is None:
        how = (
            f"was killed by signal {signal.Signals(-child.returncode).name}"
            if child.returncode < 0
            else f"exited with status {child.returncode}"
        )
        detail = err.decode(errors="replace").strip().splitlines()[-1:] or [""]
        raise HealthCheckError(
            f"{what} crashed onnxruntime during its health check: the check process {how}"
            + (f" ({detail[0][:200]})" if detail[0] else "")
        )
    if not result.get("ok"):
        raise HealthCheckError(str(result.get("error", f"{what} failed its health check")))
    return int(result.get("rows", 0))


def overdue(what: str, deadline: float) -> HealthCheckError:
    """The error of a health check that did not finish within ``deadline`` seconds."""
    return HealthCheckError(
        f"{what} did not finish its health check within {deadline:g} s (a model that loops "
        "or is far too slow for this device); raise [limits] health_check_timeout if it is "
        "only slow"
    )


def _kill_group(child: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        child.kill()


def _last_json_line(out: bytes) -> dict[str, Any] | None:
    for line in reversed(out[-_MAX_OUTPUT:].splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _main() -> int:
    """The child: check the files named on stdin, print ``{"ok": ..., ...}`` as the last line."""
    from edgepack.agent._config import RuntimeConfig
    from edgepack.agent._health import check_golden
    from edgepack.agent._session import open_session
    from edgepack.formats.bundle import GOLDEN_FILE, MANIFEST_FILE, MODEL_FILE
    from edgepack.formats.exceptions import EdgepackError
    from edgepack.formats.manifest import parse_manifest

    request = json.loads(sys.stdin.read())
    directory = Path(request["dir"])
    runtime = RuntimeConfig(
        intra_op_threads=int(request["intra_op_threads"]),
        inter_op_threads=int(request["inter_op_threads"]),
        providers=tuple(request["providers"]),
    )
    try:
        manifest = parse_manifest((directory / MANIFEST_FILE).read_bytes())
        session = open_session((directory / MODEL_FILE).read_bytes(), manifest, runtime)
        fault = os.environ.get("EDGEPACK_FAULT_PROBE_SIGNAL")  # tests: a native crash on demand
        if fault:
            os.kill(os.getpid(), signal.Signals[fault])
        rows = check_golden(session, manifest, (directory / GOLDEN_FILE).read_bytes())
    except EdgepackError as e:
        print(json.dumps({"ok": False, "error": str(e)}), flush=True)
        return 0
    except OSError as e:
        print(json.dumps({"ok": False, "error": f"cannot read the staged files: {e}"}), flush=True)
        return 0
    print(json.dumps({"ok": True, "rows": rows}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
