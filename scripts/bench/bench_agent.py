"""Agent benchmark: what the agent adds to onnxruntime, against a hand-written server, one run.

Two models (a RandomForest of 100 trees and an MLP 64→256→128→10, both on scikit-learn's digits,
no download), each built into a real signed bundle for this machine's profile and served from
the same ``model.onnx`` by:

* **bare** ``session.run`` in this process (the floor: onnxruntime alone);
* **in-process** ``Agent.infer`` with telemetry and drift on (the default), and
  ``Runtime.infer`` with no monitor;
* **agent HTTP**: ``edgepack-agent run`` in its own process, Open Inference Protocol JSON;
* **FastAPI**: the server users write themselves (FastAPI + uvicorn + onnxruntime, pydantic
  request model, OIP-shaped JSON), in its own process, with the same onnxruntime threads.

HTTP load comes from ``wrk`` (one thread, 8 keep-alive connections; installed with apt when
missing and run as root), single rows and 64-row batches, once more with 300 idle connections
held open against the agent. Every figure is measured in ``ROUNDS`` rounds that alternate the
servers, and the median is reported; in-process figures are medians of interleaved calls
(bare, agent, bare, agent, ...), so load on the machine hits both alike. Memory: each server
process's RSS after the load against a bare python + onnxruntime process holding the same
model. With ``--deploy`` and ``--grpc`` (on by default when their modules are there) the table
also gets deploy → new version serving under load (``_deploy_time``) and the gRPC path
(``_grpc_bench``).

Every request goes to 127.0.0.1; every loop is bounded in count and in time; every process and
temporary directory the script made is gone when it exits, whatever happens.
Run: ``.venv/bin/python scripts/bench/bench_agent.py`` (about five minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import httpx
import joblib
import numpy as np
import onnxruntime as ort
import pandas as pd
from sklearn.datasets import load_digits
from sklearn.ensemble import RandomForestClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import write_section  # noqa: E402

from edgepack.agent._config import load_config  # noqa: E402
from edgepack.agent._daemon import Agent  # noqa: E402
from edgepack.agent._runtime import Runtime  # noqa: E402
from edgepack.formats.bundle import MANIFEST_FILE, MODEL_FILE, read_archive  # noqa: E402
from edgepack.formats.keys import (  # noqa: E402
    generate_private_key,
    private_key_pem,
    public_key_pem,
)
from edgepack.packager._build import BuildRequest, build  # noqa: E402

MARK = "agent"
INPUT = "input"
HOST = "127.0.0.1"
BIN = Path(sys.executable).parent

ROUNDS = 3  # alternated rounds per HTTP figure; the median is reported
WRK_SECONDS = 4  # per wrk run
CONNECTIONS = 8
MANY_CONNECTIONS = 64
BATCHING_DELAY_MS = 2
# the batched agent's settings
BATCHING = f"[runtime]\nbatch_delay_ms = {BATCHING_DELAY_MS}\nbatch_rows = 64\n"
IDLE_CONNECTIONS = 300
BATCH_ROWS = 64
INPROC_CALLS = 6000  # interleaved in-process calls per variant, after the warm-up
WARMUP = 300
START_TIMEOUT = 60.0

FASTAPI_APP = textwrap.dedent(
    """
    import os

    import numpy as np
    import onnxruntime as ort
    from fastapi import FastAPI
    from pydantic import BaseModel

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(os.environ["INTRA_OP"])
    options.inter_op_num_threads = int(os.environ["INTER_OP"])
    session = ort.InferenceSession(
        os.environ["MODEL_PATH"], options, providers=["CPUExecutionProvider"]
    )
    OUTPUTS = [o.name for o in session.get_outputs()]
    DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}
    NAMES = {np.dtype(v).name: k for k, v in DTYPES.items()}


    class Tensor(BaseModel):
        name: str
        shape: list[int]
        datatype: str
        data: list[float]


    class InferRequest(BaseModel):
        inputs: list[Tensor]
        id: str | None = None


    app = FastAPI()


    @app.get("/v2/health/ready")
    def ready():
        return {"ready": True}


    @app.post("/v2/models/{name}/infer")
    def infer(name: str, request: InferRequest):
        feeds = {
            t.name: np.asarray(t.data, dtype=DTYPES[t.datatype]).reshape(t.shape)
            for t in request.inputs
        }
        results = session.run(OUTPUTS, feeds)
        return {
            "model_name": name,
            "outputs": [
                {
                    "name": n,
                    "datatype": NAMES[r.dtype.name],
                    "shape": list(r.shape),
                    "data": r.ravel().tolist(),
                }
                for n, r in zip(OUTPUTS, results)
            ],
        }
    """
)

# In a child process: just onnxruntime and the model, to show the memory floor of any server.
BARE_PROCESS = textwrap.dedent(
    """
    import sys, numpy as np, onnxruntime as ort
    o = ort.SessionOptions()
    o.intra_op_num_threads, o.inter_op_num_threads = int(sys.argv[2]), int(sys.argv[3])
    s = ort.InferenceSession(sys.argv[1], o, providers=["CPUExecutionProvider"])
    for rows in (1, 64):  # what the servers are asked, so their arenas compare
        s.run(None, {s.get_inputs()[0].name: np.zeros((rows, 64), np.float32)})
    print(open("/proc/self/status").read())
    """
)


# -- the models and their bundles ------------------------------------------------------------


@dataclass(frozen=True)
class Bundle:
    kind: str  # "forest" or "mlp"
    name: str  # the served model's name
    what: str  # for the table
    path: Path
    public_key: Path
    profile: str
    precision: str
    model: bytes
    intra_op: int
    inter_op: int
    rows: np.ndarray  # float32 [n, 64], held-out-like rows to send


def profile_here() -> str:
    """The built-in profile that matches this machine's CPU."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "arm64-cpu"
    flags = Path("/proc/cpuinfo").read_text().split()
    return "x86_64-vnni-cpu" if {"avx512_vnni", "avx_vnni"} & set(flags) else "x86_64-cpu"


def make_bundle(tmp: Path, kind: str) -> Bundle:
    """Train the model and build a real, signed bundle of it for this machine's profile."""
    x, y = load_digits(return_X_y=True)
    if kind == "forest":
        model: Any = RandomForestClassifier(n_estimators=100, random_state=0, n_jobs=1)
        what = "RandomForest, 100 trees, on digits"
    else:
        model = make_pipeline(
            StandardScaler(), MLPClassifier((256, 128), max_iter=300, random_state=0)
        )
        what = "MLP 64→256→128→10 on digits"
    model.fit(x, y)
    work = tmp / kind
    work.mkdir()
    joblib.dump(model, work / "model.joblib")
    columns = [f"px{i}" for i in range(64)]
    pd.DataFrame(x, columns=columns).to_csv(work / "ref.csv", index=False)
    key = generate_private_key()
    (work / "signing.key").write_bytes(private_key_pem(key))
    (work / "signing.pub").write_bytes(public_key_pem(key))
    profile = profile_here()
    (result,) = build(
        BuildRequest(
            model=work / "model.joblib",
            name=kind,
            version=1,
            profiles=(profile,),
            reference=work / "ref.csv",
            key=work / "signing.key",
            out_dir=work / "dist",
            trust_pickle=True,
            columns=columns,  # trained on an array: say the order
        )
    )
    if not result.ok or result.bundle is None:
        raise SystemExit(f"building the {kind} bundle failed: {result.error}")
    _top, files = read_archive(result.bundle.read_bytes())
    manifest = json.loads(files[MANIFEST_FILE])
    return Bundle(
        kind=kind,
        name=kind,
        what=what,
        path=result.bundle,
        public_key=work / "signing.pub",
        profile=profile,
        precision=manifest["precision"],
        model=files[MODEL_FILE],
        intra_op=int(manifest["runtime"]["intra_op_threads"]),
        inter_op=int(manifest["runtime"]["inter_op_threads"]),
        rows=x[::7].astype(np.float32),
    )


def oip_body(rows: np.ndarray) -> bytes:
    """The same Open Inference Protocol JSON body for the agent and the FastAPI server."""
    tensor = {"name": INPUT, "shape": list(rows.shape), "datatype": "FP32"}
    return json.dumps({"inputs": [{**tensor, "data": rows.ravel().tolist()}]}).encode()


# -- processes -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def memory_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of ``pid`` in MiB, from /proc (no psutil needed)."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


@contextlib.contextmanager
def spawned(
    argv: list[str], log: Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` for the length of the block; then SIGTERM, and SIGKILL if it lingers."""
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Poll ``url`` until it answers 200; fail early if the process died."""
    deadline = time.monotonic() + START_TIMEOUT
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"{proc.args} exited with {proc.returncode}:\n{log.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(url).status_code == 200:
                    return
            time.sleep(0.1)
    raise SystemExit(f"{url} not ready after {START_TIMEOUT} s:\n{log.read_text()}")


def agent_config(directory: Path, bundle: Bundle, port: int, extra: str = "") -> Path:
    directory.mkdir(parents=True)
    path = directory / "agent.toml"
    path.write_text(
        f'device_id = "bench"\nprofile = "{bundle.profile}"\nstate_dir = "state"\n'
        f'trusted_keys = ["{bundle.public_key}"]\n[server]\nhost = "{HOST}"\nport = {port}\n'
        + extra
    )
    return path


def agent_cli() -> list[str]:
    script = BIN / "edgepack-agent"
    return [str(script)] if script.exists() else [sys.executable, "-m", "edgepack.agent._cli"]


def rss_of_child(code: str, *args: str) -> float:
    """VmRSS (MiB) of a python child that runs ``code`` and then prints /proc/self/status."""
    script = code + "\nprint(open('/proc/self/status').read())"
    out = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, check=True,
        timeout=120, cwd=REPO,
    ).stdout  # fmt: skip
    line = next(x for x in out.splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def bare_memory_mib(model: Path, bundle: Bundle) -> float:
    """RSS of a process that only loaded the model into onnxruntime and ran one row."""
    return rss_of_child(BARE_PROCESS, str(model), str(bundle.intra_op), str(bundle.inter_op))


# -- wrk -------------------------------------------------------------------------------------

WRK_SCRIPT = textwrap.dedent(
    """
    wrk.method = "POST"
    wrk.headers["Content-Type"] = "application/json"
    local f = assert(io.open(os.getenv("EDGEPACK_BENCH_BODY"), "rb"))
    wrk.body = f:read("*all")
    f:close()
    """
)


def ensure_wrk() -> str:
    """The wrk binary; installed with apt-get when missing and run as root (as CI is)."""
    found = shutil.which("wrk")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        print("installing wrk with apt-get ...", flush=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "wrk"], check=False, timeout=300,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        found = shutil.which("wrk")
    if found is None:
        raise SystemExit("wrk is needed for the HTTP figures: apt-get install wrk (or brew)")
    return found


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def wrk(binary: str, script: Path, url: str, body: Path, connections: int) -> dict[str, float]:
    """One wrk run: requests/s, p50 and p99 in ms, and the failed requests."""
    out = subprocess.run(
        [binary, "-t1", f"-c{connections}", f"-d{WRK_SECONDS}s", "--latency", "-s", str(script),
         url],
        capture_output=True, text=True, timeout=WRK_SECONDS + 60, check=False,
        env={**os.environ, "EDGEPACK_BENCH_BODY": str(body)},
    ).stdout  # fmt: skip
    rps = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    if not (rps and p50 and p99):
        raise SystemExit(f"could not read wrk's output:\n{out}")
    failed = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses:\s+(\d+)", out))
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    if socket_errors:
        failed += sum(int(n) for n in socket_errors.groups())
    return {"rps": float(rps[1]), "p50": _ms(p50[1]), "p99": _ms(p99[1]), "failed": failed}


@contextlib.contextmanager
def idle_connections(port: int, count: int) -> Iterator[None]:
    """``count`` keep-alive connections that each asked once and then say nothing."""
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection((HOST, port), timeout=10)
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: bench\r\n\r\n")
            held.append(sock)
        for sock in held:
            if not sock.recv(4096).startswith(b"HTTP/1.1 200"):
                raise SystemExit("an idle connection was refused")
        yield
    finally:
        for sock in held:
            sock.close()


# -- in-process ------------------------------------------------------------------------------


def interleaved(calls: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Median µs of each call, measured round-robin so that load hits every variant alike."""
    for _ in range(WARMUP):
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {label: [] for label in calls}
    clock = time.perf_counter
    for _ in range(INPROC_CALLS):
        for label, call in calls.items():
            start = clock()
            call()
            times[label].append(clock() - start)
    return {label: statistics.median(t) * 1e6 for label, t in times.items()}


def probabilities_over_http(url: str, name: str, rows: np.ndarray) -> np.ndarray:
    with httpx.Client(timeout=10.0) as client:
        response = client.post(
            f"{url}/v2/models/{name}/infer",
            content=oip_body(rows),
            headers={"Content-Type": "application/json"},
        )
    response.raise_for_status()
    (entry,) = [o for o in response.json()["outputs"] if o["name"] == "probabilities"]
    return np.asarray(entry["data"], np.float32).reshape(entry["shape"])


# -- one model -------------------------------------------------------------------------------


def measure_model(tmp: Path, kind: str, wrk_binary: str) -> dict[str, Any]:
    print(f"{kind}: training and building the bundle ...", flush=True)
    bundle = make_bundle(tmp, kind)
    work = tmp / kind
    model_path = work / "model.onnx"
    model_path.write_bytes(bundle.model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = bundle.intra_op
    options.inter_op_num_threads = bundle.inter_op
    session = ort.InferenceSession(bundle.model, options, providers=["CPUExecutionProvider"])

    agent_port, api_port, batched_port = free_port(), free_port(), free_port()
    daemon_config = agent_config(work / "daemon", bundle, agent_port)
    batched_config = agent_config(work / "batched", bundle, batched_port, BATCHING)
    for config in (daemon_config, batched_config):
        subprocess.run(
            [*agent_cli(), "--config", str(config), "install", str(bundle.path)],
            check=True, timeout=300, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    (work / "api").mkdir()
    (work / "api" / "app.py").write_text(FASTAPI_APP)
    api_env = {
        **os.environ,
        "MODEL_PATH": str(model_path),
        "INTRA_OP": str(bundle.intra_op),
        "INTER_OP": str(bundle.inter_op),
    }
    api_argv = [sys.executable, "-m", "uvicorn", "app:app", "--host", HOST, "--port", str(api_port)]
    api_argv += ["--log-level", "warning", "--no-access-log"]
    script = work / "post.lua"
    script.write_text(WRK_SCRIPT)
    bodies = {1: work / "body1.json", BATCH_ROWS: work / f"body{BATCH_ROWS}.json"}
    for rows, path in bodies.items():
        path.write_bytes(oip_body(bundle.rows[:rows]))
    results: dict[str, Any] = {"bundle": bundle}

    inproc_config = agent_config(work / "inproc", bundle, free_port())
    with (
        Agent(load_config(inproc_config)).start(serve_http=False) as inproc,
        spawned(
            [*agent_cli(), "--config", str(daemon_config), "run"], work / "agent.log"
        ) as agent_proc,
        spawned(api_argv, work / "api.log", cwd=work / "api", env=api_env) as api_proc,
        spawned(
            [*agent_cli(), "--config", str(batched_config), "run"], work / "batched.log"
        ) as batched_proc,
    ):
        if not inproc.install(str(bundle.path)).ok:
            raise SystemExit("in-process install failed")
        bare_runtime = Runtime(inproc.config.runtime, inproc.config.server.max_batch_rows)
        store = inproc.lifecycle.store
        bare_runtime.sync(store, store.load(), inproc.config.public_keys())
        agent_url, api_url = f"http://{HOST}:{agent_port}", f"http://{HOST}:{api_port}"
        batched_url = f"http://{HOST}:{batched_port}"
        wait_ready(f"{agent_url}/v2/health/ready", agent_proc, work / "agent.log")
        wait_ready(f"{api_url}/v2/health/ready", api_proc, work / "api.log")
        wait_ready(f"{batched_url}/v2/health/ready", batched_proc, work / "batched.log")
        check = bundle.rows[:BATCH_ROWS]
        want = session.run(None, {INPUT: check})[1]
        for url in (agent_url, api_url, batched_url):
            got = probabilities_over_http(url, bundle.name, check)
            if not np.allclose(got, want, rtol=0, atol=1e-6):
                raise SystemExit(f"{url} does not serve the same model as bare session.run")

        print(f"{kind}: in-process ...", flush=True)
        for rows in (1, BATCH_ROWS):
            feeds = {INPUT: np.ascontiguousarray(bundle.rows[:rows])}
            results[f"inproc{rows}"] = interleaved(
                {
                    "bare": lambda f=feeds: session.run(None, f),
                    "agent": lambda f=feeds: inproc.infer(bundle.name, f),
                    "runtime": lambda f=feeds: bare_runtime.infer(bundle.name, f),
                }
            )
        print(f"{kind}: HTTP with wrk ...", flush=True)
        servers = {"agent": agent_url, "fastapi": api_url, "batched": batched_url}
        loads = {  # (rows per request, connections) measured on each server
            "agent": [(1, CONNECTIONS), (BATCH_ROWS, CONNECTIONS), (1, MANY_CONNECTIONS)],
            "fastapi": [(1, CONNECTIONS), (BATCH_ROWS, CONNECTIONS), (1, MANY_CONNECTIONS)],
            "batched": [(1, CONNECTIONS), (1, MANY_CONNECTIONS)],
        }
        runs: dict[tuple[str, int, int], list[dict[str, float]]] = {}
        infer = f"/v2/models/{bundle.name}/infer"
        for round_ in range(ROUNDS):
            order = list(servers) if round_ % 2 == 0 else list(servers)[::-1]
            for label in order:
                for rows, connections in loads[label]:
                    url = servers[label] + infer
                    got = wrk(wrk_binary, script, url, bodies[rows], connections)
                    runs.setdefault((label, rows, connections), []).append(got)
            with idle_connections(agent_port, IDLE_CONNECTIONS):
                got = wrk(wrk_binary, script, agent_url + infer, bodies[1], CONNECTIONS)
                runs.setdefault(("agent+idle", 1, CONNECTIONS), []).append(got)
        results["http"] = {
            key: {
                "rps": statistics.median(r["rps"] for r in values),
                "p50": statistics.median(r["p50"] for r in values),
                "p99": statistics.median(r["p99"] for r in values),
                "failed": sum(r["failed"] for r in values),
            }
            for key, values in runs.items()
        }
        results["rss"] = {
            "agent": memory_mib(agent_proc.pid),
            "fastapi": memory_mib(api_proc.pid),
            "bare": bare_memory_mib(model_path, bundle),
        }
    return results


# -- the table -------------------------------------------------------------------------------


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith(("model name", "Model")):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _goal(met: bool) -> str:
    return "met" if met else "**missed**"


def model_table(results: dict[str, Any]) -> list[str]:
    bundle: Bundle = results["bundle"]
    http, rss = results["http"], results["rss"]
    lines = [
        f"**{bundle.what}** (`{bundle.profile}`, {bundle.precision}, "
        f"{len(bundle.model):,} bytes of `model.onnx`; onnxruntime intra_op "
        f"{bundle.intra_op or 'auto'}, inter_op {bundle.inter_op or 'auto'})",
        "",
        "| figure | edgepack | comparator | ratio | goal |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for rows, conns in ((1, CONNECTIONS), (BATCH_ROWS, CONNECTIONS), (1, MANY_CONNECTIONS)):
        agent, api = http[("agent", rows, conns)], http[("fastapi", rows, conns)]
        what = "single rows" if rows == 1 else f"{rows}-row batches"
        ratio = agent["rps"] / api["rps"]
        lines.append(
            f"| HTTP throughput, {conns} connections, {what} (req/s) | "
            f"{agent['rps']:,.0f} | FastAPI {api['rps']:,.0f} | {ratio:.2f}× | "
            f"≥ 2×: {_goal(ratio >= 2)} |"
        )
        lines.append(
            f"| HTTP p50 / p99, {conns} connections, {what} (ms) | "
            f"{agent['p50']:.2f} / {agent['p99']:.2f} | "
            f"FastAPI {api['p50']:.2f} / {api['p99']:.2f} | p99 {agent['p99'] / api['p99']:.2f}× | "
            f"p99 no worse: {_goal(agent['p99'] <= api['p99'])} |"
        )
    for conns in (CONNECTIONS, MANY_CONNECTIONS):
        batched, plain = http[("batched", 1, conns)], http[("agent", 1, conns)]
        lines.append(
            f"| dynamic batching ({BATCHING_DELAY_MS} ms), {conns} connections, single rows "
            f"(req/s; p99 ms) | {batched['rps']:,.0f}; {batched['p99']:.2f} | agent without it "
            f"{plain['rps']:,.0f}; {plain['p99']:.2f} | {batched['rps'] / plain['rps']:.2f}× | "
            "what it buys |"
        )
    idle, busy = http[("agent+idle", 1, CONNECTIONS)], http[("agent", 1, CONNECTIONS)]
    lines.append(
        f"| HTTP throughput with {IDLE_CONNECTIONS} idle connections held open (req/s) | "
        f"{idle['rps']:,.0f} | agent without them {busy['rps']:,.0f} | "
        f"{idle['rps'] / busy['rps']:.2f}× | "
        f"not starved: {_goal(idle['rps'] >= 0.8 * busy['rps'])} |"
    )
    for rows in (1, BATCH_ROWS):
        inproc = results[f"inproc{rows}"]
        what = "one row" if rows == 1 else f"{rows} rows"
        ratio = inproc["agent"] / inproc["bare"]
        goal = f"≤ 1.2×: {_goal(ratio <= 1.2)}" if rows == 1 else "—"
        lines.append(
            f"| in-process `Agent.infer` p50, {what}, telemetry and drift on (µs) | "
            f"{inproc['agent']:,.1f} | bare `session.run` {inproc['bare']:,.1f} | "
            f"{ratio:.2f}× | {goal} |"
        )
        lines.append(
            f"| in-process `Runtime.infer` p50, {what}, no monitor (µs) | "
            f"{inproc['runtime']:,.1f} | bare `session.run` {inproc['bare']:,.1f} | "
            f"{inproc['runtime'] / inproc['bare']:.2f}× | — |"
        )
    agent_rss, bare = rss["agent"][0], rss["bare"]
    lines.append(
        f"| RSS after the load (MiB; peak) | {agent_rss:.0f} ({rss['agent'][1]:.0f}) | "
        f"bare python + onnxruntime + the model {bare:.0f} | {agent_rss / bare:.2f}× | "
        f"≤ 1.3×: {_goal(agent_rss <= 1.3 * bare)} |"
    )
    lines.append(
        f"| FastAPI server RSS after the load (MiB; peak) | — | {rss['fastapi'][0]:.0f} "
        f"({rss['fastapi'][1]:.0f}) | — | — |"
    )
    failed = sum(v["failed"] for v in http.values())
    lines += ["", f"Failed HTTP requests over every run of this model: {failed:.0f}."]
    return lines


def import_costs() -> list[str]:
    """Where the agent's memory goes before any model: python, onnxruntime, the agent."""
    base = rss_of_child("pass")
    runtime = rss_of_child("import numpy, onnxruntime")
    agent = rss_of_child(
        "import edgepack.agent._cli, edgepack.agent._daemon, edgepack.agent._http_server"
    )
    return [
        f"Where the memory goes (RSS of a python process, MiB, no model loaded): python alone "
        f"{base:.0f}; + numpy and onnxruntime {runtime:.0f}; + everything `edgepack-agent run` "
        f"imports (the agent's modules, cryptography for the signatures) "
        f"{agent:.0f}, so the agent's own share is {agent - runtime:.0f} MiB. paho-mqtt and "
        f"httpx load only with a fleet link or a download, grpc only with `[grpc]`.",
    ]


def run(tmp: Path, kinds: list[str], deploy: bool, grpc: bool) -> tuple[str, int]:
    load_start = os.getloadavg()[0]
    if load_start > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {load_start:.2f}: other work will disturb the numbers")
    wrk_binary = ensure_wrk()
    results = [measure_model(tmp, kind, wrk_binary) for kind in kinds]
    sections: list[str] = []
    for r in results:
        sections += [*model_table(r), ""]
    sections += [*import_costs(), ""]
    if deploy:
        sections += [*deploy_section(), ""]
    if grpc:
        sections += [*grpc_section(tmp, results[-1]["bundle"]), ""]
    load_end = os.getloadavg()[0]
    failed = sum(int(v["failed"]) for r in results for v in r["http"].values())
    head = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores ({cpu_model()}), Python "
        f"{platform.python_version()}, onnxruntime {ort.__version__}; load average "
        f"{load_start:.2f} at start, {load_end:.2f} at the end. Numbers from "
        "`scripts/bench/bench_agent.py`, one run.",
        "",
        f"HTTP: `wrk` (one thread, {CONNECTIONS} or {MANY_CONNECTIONS} keep-alive connections, "
        f"{WRK_SECONDS} s a run, the same JSON body for every server), {ROUNDS} rounds "
        "alternating the servers (agent, FastAPI, and an agent with dynamic batching), "
        "medians; wrk and the servers share the machine's cores. FastAPI runs on uvicorn "
        f"{package_version('uvicorn')} (h11, asyncio: what `pip install fastapi uvicorn` gives), "
        "a sync endpoint, access log off. In-process: medians of "
        f"{INPROC_CALLS:,} interleaved calls per variant (bare, agent, runtime, bare, ...), "
        "ready float32 arrays. RSS: each server process after the load; *bare* is a process "
        "that only loaded the model into onnxruntime and ran a single row and a 64-row batch.",
        "",
    ]
    return "\n".join(head + sections).rstrip(), failed


def deploy_section() -> list[str]:
    try:
        from _deploy_time import measure_deploy
    except ImportError as e:
        return [f"Deploy → serving: not measured ({e})."]
    print("deploy → serving under load ...", flush=True)
    got = measure_deploy(log=lambda line: print(line, flush=True))
    phases = ", ".join(f"{k} {v:.2f} s" for k, v in got["phases"].items() if v is not None)
    seconds = got["deploy_to_serving"]
    if seconds is None:
        return [f"Deploy → serving: v2 never answered ({got.get('failures')})."]
    return [
        f"**Deploy → new version answering**, a {got['trees']}-tree forest "
        f"({got['bundle_bytes'] / 1e6:.1f} MB bundle), {got['rounds']} rounds under "
        f"{got['rate']:.0f} req/s of background single-row requests: median "
        f"**{seconds:.2f} s** (goal ≤ 2 s: {_goal(seconds <= 2.0)}; every round: "
        + ", ".join(f"{s:.2f}" for s in got["deploy_to_serving_all"])
        + f" s). Phases (median): {phases}. Requests failed: {got['failed']} of "
        f"{got['requests']:,}.",
    ]


def grpc_section(tmp: Path, bundle: Bundle) -> list[str]:
    try:
        import grpc  # noqa: F401
        from _grpc_bench import measure_grpc, measure_http
    except ImportError as e:
        return [f"gRPC: not measured ({e}; install the `grpc` extra)."]
    print("gRPC against HTTP ...", flush=True)
    http_port, grpc_port = free_port(), free_port()
    config = agent_config(
        tmp / "grpc", bundle, http_port, f"[grpc]\nenabled = true\nport = {grpc_port}\n"
    )
    subprocess.run(
        [*agent_cli(), "--config", str(config), "install", str(bundle.path)],
        check=True, timeout=300, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    with spawned([*agent_cli(), "--config", str(config), "run"], tmp / "grpc.log") as proc:
        wait_ready(f"http://{HOST}:{http_port}/v2/health/ready", proc, tmp / "grpc.log")
        over_grpc = measure_grpc(f"{HOST}:{grpc_port}", bundle.name, bundle.rows)
        over_http = measure_http(f"{HOST}:{http_port}", bundle.name, bundle.rows)
    lines = [
        f"**gRPC against HTTP** ({bundle.what}; {over_grpc['client']} against "
        f"{over_http['client']}, binary tensors both ways, client threads in the benchmark "
        "process, so the client's own cost is in every figure):",
        "",
        "| protocol | p50 µs | p99 µs | req/s, 1 client | req/s, 8 clients | "
        f"{BATCH_ROWS}-row batches rows/s, 1 client |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, got in (("gRPC", over_grpc), ("HTTP", over_http)):
        lines.append(
            f"| {label} | {got['p50']:,.0f} | {got['p99']:,.0f} | {got['rps1']:,.0f} | "
            f"{got['rps8']:,.0f} | {got['rows_s']:,.0f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="forest,mlp", help="forest, mlp or both")
    parser.add_argument("--no-deploy", action="store_true", help="skip deploy → serving")
    parser.add_argument("--no-grpc", action="store_true", help="skip the gRPC comparison")
    parser.add_argument("--print-only", action="store_true", help="do not write BENCHMARKS.md")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    kinds = [k.strip() for k in args.models.split(",") if k.strip()]
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as tmp:
        body, failures = run(Path(tmp), kinds, not args.no_deploy, not args.no_grpc)
    if not args.print_only:
        write_section(MARK, "## Agent: speed and memory against bare onnxruntime and FastAPI", body)
    print(body)
    print(f"\n({time.perf_counter() - started:.0f} s)")
    if failures:
        raise SystemExit(f"{failures} requests failed; every request should succeed")


if __name__ == "__main__":
    main()
