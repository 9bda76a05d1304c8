"""Deploy time under load: how long from ``install`` until the new version answers requests.

:func:`measure_deploy` trains a RandomForest on scikit-learn's digits (no download), builds a
real signed bundle of it with the packager (about 10 MB of ``model.onnx`` at the default 280
trees; gzip makes the archive itself much smaller, since tree thresholds on 0-16 pixel values
compress well), and a v2 of the same files re-signed under the next version number. Each round
then gets a fresh state directory and an in-process :class:`edgepack.agent._daemon.Agent`
serving HTTP on 127.0.0.1 (the daemon's own path: a fleet job installs through
``Agent.install`` the same way), installs v1, starts a load generator in a child process (single
rows at ``rate`` requests/s over keep-alive connections), deploys v2 and waits until a response
names version 2. It reports, as medians over the rounds:

* the time in each lifecycle state (``fetching`` … ``cleanup``, from the ``on_state`` marks),
  the health check's split into ``health_check.load`` (reading, verifying and loading the
  files) and ``health_check.golden`` (running the golden rows; from its log line, when it ran
  in the agent), ``activate`` (from ``done`` until ``install`` returned: swapping the model
  in) and ``install`` (the whole call);
* ``deploy_to_serving``: from the start of ``install`` to the first response from v2, as the
  load generator saw it (both processes read the same ``CLOCK_MONOTONIC``);
* the load: requests sent, failed (anything but a 200, or no answer), the achieved rate, and the
  machine's load average.

Every request goes to 127.0.0.1; every loop is bounded in count and in time; the load child and
the temporary directory are gone when it returns, whatever happens. Used by
``scripts/bench/bench_agent.py``; run alone: ``.venv/bin/python scripts/bench/_deploy_time.py``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import joblib
import pandas as pd
from sklearn.datasets import load_digits
from sklearn.ensemble import RandomForestClassifier

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from edgepack.agent._config import load_config  # noqa: E402
from edgepack.agent._daemon import Agent  # noqa: E402
from edgepack.formats.bundle import (  # noqa: E402
    MANIFEST_FILE,
    SIGNATURE_FILE,
    read_archive,
    write_bundle,
)
from edgepack.formats.keys import (  # noqa: E402
    generate_private_key,
    private_key_pem,
    public_key_pem,
)
from edgepack.formats.manifest import parse_manifest  # noqa: E402
from edgepack.packager._build import BuildRequest, build  # noqa: E402

__all__ = ["measure_deploy"]

NAME = "forest"
HOST = "127.0.0.1"
PHASES = ("fetching", "verifying", "staging", "health_check", "committing", "cleanup")
WARMUP = 2.0  # seconds of load before the deploy, and after the swap
SERVE_TIMEOUT = 60.0  # seconds, after install returned, for v2 to show up in the responses
LOAD_SECONDS_MAX = 600.0  # the load child stops by itself after this, whatever happens
LOAD_REQUESTS_MAX = 200_000  # ... or after this many requests

# The load generator, in its own process (so its own GIL): ``threads`` keep-alive connections
# share ``rate`` requests/s, paced, each request one row (the bodies, in turn). It runs until its
# stdin closes (or its bounds), then prints one JSON line per thread: the answers it got.
LOAD_CHILD = textwrap.dedent(
    """
    import http.client, json, sys, threading, time
    port, rate, threads, seconds, limit = (int(sys.argv[1]), float(sys.argv[2]),
                                           int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]))
    bodies = [b.encode() for b in json.loads(sys.stdin.readline())]
    stop = threading.Event()
    results = [None] * threads
    def worker(k):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        got, failed = [], []  # got: [monotonic seconds, version]; failed: [monotonic, why]
        interval, start = threads / rate, time.monotonic() + k / rate
        for i in range(limit // threads):
            if stop.is_set() or time.monotonic() - start > seconds:
                break
            delay = start + i * interval - time.monotonic()
            if delay > 0 and stop.wait(delay):
                break
            try:
                conn.request("POST", "/v2/models/forest/infer", bodies[i % len(bodies)],
                             {"Content-Type": "application/json"})
                answer = conn.getresponse()
                data = answer.read()
                if answer.status == 200:
                    got.append([time.monotonic(), json.loads(data)["model_version"]])
                else:
                    failed.append([time.monotonic(), f"HTTP {answer.status}: {data[:200]!r}"])
            except Exception as e:
                failed.append([time.monotonic(), repr(e)[:200]])
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.close()
        results[k] = {"got": got, "failed": failed}
    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    print("started", flush=True)
    sys.stdin.read()  # until the parent closes it
    stop.set()
    for t in pool:
        t.join(30)
    for r in results:
        print(json.dumps(r), flush=True)
    """
)


@dataclasses.dataclass(frozen=True)
class _Bundles:
    v1: Path
    v2: Path
    public_key: Path
    model_bytes: int  # model.onnx, unpacked
    unpacked_bytes: int  # every file, unpacked
    rows: list[list[float]]  # digits rows to send, in turn


def profile_here() -> str:
    """The built-in profile that matches this machine's CPU."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "arm64-cpu"
    flags = Path("/proc/cpuinfo").read_text().split()
    return "x86_64-vnni-cpu" if {"avx512_vnni", "avx_vnni"} & set(flags) else "x86_64-cpu"


def _make_bundles(tmp: Path, trees: int) -> _Bundles:
    x, y = load_digits(return_X_y=True)
    model = RandomForestClassifier(n_estimators=trees, random_state=0, n_jobs=1).fit(x, y)
    joblib.dump(model, tmp / "model.joblib")
    columns = [f"px{i}" for i in range(64)]
    pd.DataFrame(x, columns=columns).to_csv(tmp / "ref.csv", index=False)
    key = generate_private_key()
    (tmp / "signing.key").write_bytes(private_key_pem(key))
    (tmp / "signing.pub").write_bytes(public_key_pem(key))
    (result,) = build(
        BuildRequest(
            model=tmp / "model.joblib",
            name=NAME,
            version=1,
            profiles=(profile_here(),),
            reference=tmp / "ref.csv",
            key=tmp / "signing.key",
            out_dir=tmp / "dist",
            trust_pickle=True,
            columns=columns,
        )
    )
    if not result.ok or result.bundle is None:
        raise RuntimeError(f"building the forest bundle failed: {result.error}")
    # v2: the same files under the next version, signed again (what a retrain costs the device)
    _top, files = read_archive(result.bundle.read_bytes())
    manifest = dataclasses.replace(parse_manifest(files[MANIFEST_FILE]), version=2)
    content = {k: v for k, v in files.items() if k not in (MANIFEST_FILE, SIGNATURE_FILE)}
    v2 = write_bundle(tmp / "dist", manifest, content, key)
    return _Bundles(
        v1=result.bundle,
        v2=v2,
        public_key=tmp / "signing.pub",
        model_bytes=len(files["model.onnx"]),
        unpacked_bytes=sum(len(v) for v in files.values()),
        rows=x[::9].astype("float32").tolist(),
    )


def _device(root: Path, bundles: _Bundles, extra: str) -> Path:
    root.mkdir(parents=True)
    config = root / "agent.toml"
    config.write_text(
        f'device_id = "bench-deploy"\nprofile = "{profile_here()}"\nstate_dir = "state"\n'
        f'trusted_keys = ["{bundles.public_key}"]\n[server]\nhost = "{HOST}"\nport = 0\n'
        f"{extra}"
    )
    return config


def _start_load(port: int, rate: float, threads: int, bodies: list[str]) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", LOAD_CHILD, str(port), str(rate), str(threads),
         str(LOAD_SECONDS_MAX), str(LOAD_REQUESTS_MAX)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert child.stdin is not None
    assert child.stdout is not None
    child.stdin.write(json.dumps(bodies) + "\n")
    child.stdin.flush()
    if child.stdout.readline().strip() != "started":
        child.kill()
        raise RuntimeError("the load generator did not start")
    return child


def _stop_load(child: subprocess.Popen[str]) -> tuple[list[list[Any]], list[list[Any]]]:
    try:
        out, _ = child.communicate(timeout=60)  # closes stdin: the child stops and reports
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        raise RuntimeError("the load generator did not stop within 60 s") from None
    got: list[list[Any]] = []
    failed: list[list[Any]] = []
    for line in out.splitlines():
        if line.startswith("{"):
            part = json.loads(line)
            got += part["got"]
            failed += part["failed"]
    return sorted(got), sorted(failed)


class _HealthLog(logging.Handler):
    """Picks the health check's own split (load, golden rows) out of its log line."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.parts: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if "healthy" in record.msg and "loaded in" in record.msg and len(record.args or ()) == 4:
            args: Any = record.args
            self.parts = {"health_check.load": args[2], "health_check.golden": args[3]}


def _one_round(
    root: Path, bundles: _Bundles, rate: float, threads: int, extra: str
) -> dict[str, Any]:
    config = load_config(_device(root, bundles, extra))
    bodies = [
        json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                "data": row}]})
        for row in bundles.rows
    ]  # fmt: skip
    with Agent(config).start(serve_http=True) as agent:
        first = agent.install(str(bundles.v1))
        if not first.ok:
            raise RuntimeError(f"installing v1 failed: {first.reason}")
        assert agent.server is not None
        port = int(agent.server.url.rsplit(":", 1)[1].split("/")[0])
        load = _start_load(port, rate, threads, bodies)
        try:
            time.sleep(WARMUP)  # steady load before the deploy
            marks: list[tuple[str, float]] = []
            checks, logger = _HealthLog(), logging.getLogger("edgepack.agent")
            level = logger.level
            logger.addHandler(checks)
            logger.setLevel(logging.INFO)  # the health check's split is an INFO line
            started = time.monotonic()
            try:
                outcome = agent.install(
                    str(bundles.v2), on_state=lambda e: marks.append((e.state, time.monotonic()))
                )
                returned = time.monotonic()
            finally:
                logger.removeHandler(checks)
                logger.setLevel(level)
            if not outcome.ok:
                raise RuntimeError(f"deploying v2 failed: {outcome.reason}")
            until = returned + SERVE_TIMEOUT
            while time.monotonic() < until and agent.runtime.get(NAME).version != 2:
                time.sleep(0.05)
            time.sleep(WARMUP)  # keep the load on for a while after the swap
        finally:
            got, failed = _stop_load(load)
    served_v2 = [t for t, version in got if version == "2" and t >= started]
    times = [t for t, _ in got]
    phases = {}
    for (state, at), (_next, after) in zip(marks, [*marks[1:], ("end", returned)], strict=True):
        if state in PHASES:
            phases[state] = after - at
        elif state == "done":
            phases["activate"] = after - at
    phases.update(checks.parts)
    phases["install"] = returned - started
    return {
        "phases": phases,
        "deploy_to_serving": (served_v2[0] - started) if served_v2 else None,
        "requests": len(got) + len(failed),
        "failed": len(failed),
        "failures": [why for _, why in failed[:5]],
        "rate": (len(times) / (times[-1] - times[0])) if len(times) > 1 else 0.0,
    }


def measure_deploy(
    *,
    trees: int = 280,
    rounds: int = 3,
    rate: float = 200.0,
    threads: int = 4,
    config_extra: str = "",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure deploy → new version serving for a ~10 MB forest under background load.

    Args:
        trees: trees of the RandomForest (280 on digits: about 10 MB of ``model.onnx``).
        rounds: deploys measured, each on a fresh device; medians are reported.
        rate: background requests per second (single rows over HTTP on 127.0.0.1).
        threads: keep-alive connections the load is spread over.
        config_extra: more ``agent.toml`` text (for example a ``[limits]`` table).
        log: where progress lines go.

    Returns:
        ``phases`` (state → median seconds, plus ``activate`` and ``install``),
        ``deploy_to_serving`` (median seconds, and ``deploy_to_serving_all``: every round's),
        ``requests``, ``failed`` (summed over rounds), ``failures`` (up to five reasons),
        ``rate`` (median achieved requests/s), ``bundle_bytes``, ``model_bytes``,
        ``unpacked_bytes``, ``trees``, ``rounds``, ``loadavg`` (1-minute, at the end).
    """
    with tempfile.TemporaryDirectory(prefix="edgepack-deploy-") as scratch:
        tmp = Path(scratch)
        log(f"deploy time: training a {trees}-tree forest and building its bundle ...")
        bundles = _make_bundles(tmp, trees)
        log(
            f"deploy time: model.onnx {bundles.model_bytes / 1e6:.1f} MB, bundle "
            f"{bundles.v2.stat().st_size / 1e6:.2f} MB; {rounds} rounds at {rate:g} req/s"
        )
        results = []
        for k in range(rounds):
            result = _one_round(tmp / f"device-{k}", bundles, rate, threads, config_extra)
            log(
                f"deploy time: round {k + 1}: deploy→serving "
                f"{_seconds(result['deploy_to_serving'])}, "
                + ", ".join(f"{p} {s:.3f}" for p, s in result["phases"].items())
                + f"; {result['failed']} failed of {result['requests']}"
            )
            results.append(result)
        names = list(results[0]["phases"])
        serving = [r["deploy_to_serving"] for r in results]
        return {
            "phases": {
                p: statistics.median(r["phases"].get(p, 0.0) for r in results) for p in names
            },
            "deploy_to_serving": statistics.median(serving)
            if all(s is not None for s in serving)
            else None,
            "deploy_to_serving_all": serving,
            "requests": sum(r["requests"] for r in results),
            "failed": sum(r["failed"] for r in results),
            "failures": [why for r in results for why in r["failures"]][:5],
            "rate": statistics.median(r["rate"] for r in results),
            "bundle_bytes": bundles.v2.stat().st_size,
            "model_bytes": bundles.model_bytes,
            "unpacked_bytes": bundles.unpacked_bytes,
            "trees": trees,
            "rounds": rounds,
            "loadavg": os.getloadavg()[0],
        }


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.3f} s"


if __name__ == "__main__":
    print(json.dumps(measure_deploy(), indent=2))
