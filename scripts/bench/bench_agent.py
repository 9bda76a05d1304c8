"""Agent benchmark: latency, throughput and memory of local inference, four ways, one model.

Trains an MLP on scikit-learn's digits (no download), builds one real signed bundle for the
profile matching this machine, and serves the bundle's ``model.onnx`` four ways:

* **raw** ``session.run`` in this process (the floor: onnxruntime alone);
* **in-process** ``Agent.infer`` (an :class:`edgepack.agent._daemon.Agent` without HTTP, in this
process),
  once with telemetry and drift detection off and once on (the default);
* **agent HTTP**: ``edgepack-agent run`` in its own process, Open Inference Protocol JSON;
* **FastAPI**: the server users write themselves (FastAPI + uvicorn + onnxruntime, pydantic
  request model, OIP-shaped JSON), in its own process, with the same onnxruntime thread settings.

It measures single-row latency (sequential requests), throughput with 1 and 8 client threads,
64-row batch throughput, and the resident memory of each server process, then writes the table
into BENCHMARKS.md between the ``<!-- agent -->`` markers.

Every request goes to 127.0.0.1; every loop is bounded in count and in time; every process and
temporary directory the script made is gone when it exits, whatever happens.
Run: ``.venv/bin/python scripts/bench/bench_agent.py`` (about a minute and a half).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import version as package_version
from pathlib import Path

import httpx
import joblib
import numpy as np
import onnxruntime as ort
import pandas as pd
from sklearn.datasets import load_digits
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
NAME = "digits"
INPUT = "input"
HOST = "127.0.0.1"
BIN = Path(sys.executable).parent

WARMUP = 100
LATENCY_REQUESTS = 2000  # per variant, sequential, after the warm-up ...
LATENCY_SECONDS = 20.0  # ... or until this much time has passed
CLIENTS = (1, 8)
THROUGHPUT_SECONDS = 5.0  # per variant and client count
BATCH_ROWS = 64
BATCH_SECONDS = 3.0
MAX_REQUESTS_PER_THREAD = 200_000  # a count bound on every timed loop
START_TIMEOUT = 30.0

# The hand-written server: what a user puts in front of onnxruntime themselves.
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
    s.run(None, {s.get_inputs()[0].name: np.zeros((1, 64), np.float32)})
    print(open("/proc/self/status").read())
    """
)


# -- the model and its bundle ----------------------------------------------------------------


@dataclass(frozen=True)
class Bundle:
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


def make_bundle(tmp: Path) -> Bundle:
    """Train the digits MLP and build a real, signed bundle of it for this machine's profile."""
    x, y = load_digits(return_X_y=True)
    model = make_pipeline(StandardScaler(), MLPClassifier((256, 128), max_iter=300, random_state=0))
    model.fit(x, y)
    joblib.dump(model, tmp / "model.joblib")
    pd.DataFrame(x, columns=[f"px{i}" for i in range(64)]).to_csv(tmp / "ref.csv", index=False)
    key = generate_private_key()
    (tmp / "signing.key").write_bytes(private_key_pem(key))
    (tmp / "signing.pub").write_bytes(public_key_pem(key))
    profile = profile_here()
    (result,) = build(
        BuildRequest(
            model=tmp / "model.joblib",
            name=NAME,
            version=1,
            profiles=(profile,),
            reference=tmp / "ref.csv",
            key=tmp / "signing.key",
            out_dir=tmp / "dist",
            trust_pickle=True,
            columns=[f"px{i}" for i in range(64)],  # trained on an array: say the order
        )
    )
    if not result.ok or result.bundle is None:
        raise SystemExit(f"building the bundle failed: {result.error}")
    _top, files = read_archive(result.bundle.read_bytes())
    manifest = json.loads(files[MANIFEST_FILE])
    return Bundle(
        path=result.bundle,
        public_key=tmp / "signing.pub",
        profile=profile,
        precision=manifest["precision"],
        model=files[MODEL_FILE],
        intra_op=int(manifest["runtime"]["intra_op_threads"]),
        inter_op=int(manifest["runtime"]["inter_op_threads"]),
        rows=x[::7].astype(np.float32),
    )


def oip_body(rows: np.ndarray) -> bytes:
    """The same Open Inference Protocol JSON body for the agent and the FastAPI server."""
    request = {
        "inputs": [
            {
                "name": INPUT,
                "shape": list(rows.shape),
                "datatype": "FP32",
                "data": rows.ravel().tolist(),
            }
        ]
    }
    return json.dumps(request).encode()


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


def agent_config(directory: Path, public_key: Path, profile: str, port: int) -> Path:
    directory.mkdir(parents=True)
    path = directory / "agent.toml"
    path.write_text(
        f'device_id = "bench"\nprofile = "{profile}"\nstate_dir = "state"\n'
        f'trusted_keys = ["{public_key}"]\n[server]\nhost = "{HOST}"\nport = {port}\n'
    )
    return path


def agent_cli() -> list[str]:
    script = BIN / "edgepack-agent"
    return [str(script)] if script.exists() else [sys.executable, "-m", "edgepack.agent._cli"]


def bare_memory_mib(model: Path, bundle: Bundle) -> float:
    """RSS of a process that only loaded the model into onnxruntime and ran one row."""
    threads = [str(bundle.intra_op), str(bundle.inter_op)]
    out = subprocess.run(
        [sys.executable, "-c", BARE_PROCESS, str(model), *threads],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


# -- measuring -------------------------------------------------------------------------------

Call = Callable[[], object]


@dataclass
class Variant:
    """One way of serving the model; ``caller`` makes a per-thread (call, close) pair."""

    label: str
    what: str
    caller: Callable[[np.ndarray], tuple[Call, Callable[[], None]]]
    pid: int | None = None
    results: dict[str, float] = field(default_factory=dict)


class RequestFailedError(Exception):
    """A request did not return 200."""


def http_caller(base: str) -> Callable[[np.ndarray], tuple[Call, Callable[[], None]]]:
    """A keep-alive httpx client per thread, posting pre-encoded JSON."""

    def make(rows: np.ndarray) -> tuple[Call, Callable[[], None]]:
        client = httpx.Client(base_url=base, timeout=10.0)
        body = oip_body(rows)
        headers = {"Content-Type": "application/json"}
        path = f"/v2/models/{NAME}/infer"

        def call() -> httpx.Response:
            response = client.post(path, content=body, headers=headers)
            if response.status_code != 200:
                raise RequestFailedError(f"HTTP {response.status_code}: {response.text[:200]}")
            return response

        return call, client.close

    return make


def latency_us(call: Call) -> tuple[float, float, int]:
    """p50 and p99 of sequential calls in µs, and how many were timed."""
    for _ in range(WARMUP):
        call()
    times = []
    deadline = time.perf_counter() + LATENCY_SECONDS
    for _ in range(LATENCY_REQUESTS):
        start = time.perf_counter()
        call()
        end = time.perf_counter()
        times.append(end - start)
        if end > deadline:
            break
    cuts = statistics.quantiles(times, n=100, method="inclusive")
    return cuts[49] * 1e6, cuts[98] * 1e6, len(times)


def throughput(
    variant: Variant, rows: np.ndarray, clients: int, seconds: float
) -> tuple[float, int]:
    """Calls per second over ``clients`` threads for ``seconds``, and the failure count."""
    done = [0] * clients
    failed = [0] * clients
    pairs = [variant.caller(rows) for _ in range(clients)]
    for call, _close in pairs:
        call()  # connect and warm up before the clock starts
    barrier = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def worker(slot: int) -> None:
        call = pairs[slot][0]
        barrier.wait()
        for _ in range(MAX_REQUESTS_PER_THREAD):
            if time.perf_counter() >= stop_at[0]:
                break
            try:
                call()
                done[slot] += 1
            except Exception:  # noqa: BLE001 - any error is one failed request, counted
                failed[slot] += 1

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    start = time.perf_counter()
    stop_at[0] = start + seconds
    barrier.wait()
    for t in threads:
        t.join(timeout=seconds + 30)
    elapsed = time.perf_counter() - start
    for _call, close in pairs:
        close()
    return sum(done) / elapsed, sum(failed)


def probabilities(variant: Variant, rows: np.ndarray) -> np.ndarray:
    """The model's probabilities as ``variant`` returns them (to check all four agree)."""
    call, close = variant.caller(rows)
    try:
        out = call()
    finally:
        close()
    if isinstance(out, httpx.Response):
        (entry,) = [o for o in out.json()["outputs"] if o["name"] == "probabilities"]
        return np.asarray(entry["data"], np.float32).reshape(entry["shape"])
    if isinstance(out, dict):
        return np.asarray(out["probabilities"])
    return np.asarray(out[1])  # raw session.run: [label, probabilities]


def measure(variant: Variant, bundle: Bundle) -> None:
    one = bundle.rows[:1]
    call, close = variant.caller(one)
    try:
        p50, p99, count = latency_us(call)
    finally:
        close()
    variant.results.update(p50=p50, p99=p99, latency_n=count, failures=0)
    for clients in CLIENTS:
        rate, failures = throughput(variant, one, clients, THROUGHPUT_SECONDS)
        variant.results[f"rps{clients}"] = rate
        variant.results["failures"] += failures
    batch = bundle.rows[:BATCH_ROWS]
    rate, failures = throughput(variant, batch, 1, BATCH_SECONDS)
    variant.results["rows_s"] = rate * len(batch)
    variant.results["failures"] += failures
    if variant.pid is not None:
        variant.results["rss_peak"] = memory_mib(variant.pid)[1]
    print(f"  {variant.label}: {variant.results}", flush=True)


def health_p50_us(url: str) -> float:
    """p50 of a GET that runs no model: the HTTP client + server floor."""
    with httpx.Client(timeout=10.0) as client:
        p50, _p99, _n = latency_us(lambda: client.get(url))
    return p50


# -- the run and the table -------------------------------------------------------------------


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith(("model name", "Model")):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def table(
    variants: list[Variant], bundle: Bundle, floors: dict[str, float], load: tuple[float, float]
) -> str:
    raw = variants[0].results["p50"]
    threads = f"intra_op {bundle.intra_op or 'auto'}, inter_op {bundle.inter_op or 'auto'}"
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores ({cpu_model()}), Python "
        f"{platform.python_version()}, onnxruntime {ort.__version__}; load average "
        f"{load[0]:.2f} at start, {load[1]:.2f} at the end. Model: MLP 64→256→128→10 on digits, "
        f"bundle for `{bundle.profile}` "
        f"({bundle.precision}, {len(bundle.model):,} bytes), the same `model.onnx` in every row, "
        f"onnxruntime threads as the profile says ({threads}). Numbers from "
        f"`scripts/bench/bench_agent.py`.",
        "",
        "Latency: one row per request, sequential, p50/p99 over up to "
        f"{LATENCY_REQUESTS:,} requests after {WARMUP} warm-up. Throughput: "
        f"{' and '.join(map(str, CLIENTS))} client threads for {THROUGHPUT_SECONDS:g} s, "
        "one row per request; batch: "
        f"{BATCH_ROWS}-row requests from one client for {BATCH_SECONDS:g} s. HTTP clients: one "
        "keep-alive `httpx.Client` per thread in the benchmark process, the same JSON body for "
        "both servers; clients and servers share the machine's cores. RSS: the server process "
        "after loading the model (peak during the run in brackets); for *raw* a bare process "
        "that only loaded the model into onnxruntime; *in-process* shares the benchmark's "
        "own process, so it has no figure of its own.",
        "",
        "| variant | what runs | p50 µs | p99 µs | p50 over raw µs | 1 client req/s | "
        f"{CLIENTS[-1]} clients req/s | {BATCH_ROWS}-row batches rows/s | failed | RSS MiB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for v in variants:
        r = v.results
        over = "—" if v is variants[0] else f"+{r['p50'] - raw:,.0f}"
        rss = "—" if "rss" not in r else f"{r['rss']:.0f}"
        rss += f" ({r['rss_peak']:.0f})" if "rss_peak" in r else ""
        lines.append(
            f"| {v.label} | {v.what} | {r['p50']:,.0f} | {r['p99']:,.0f} | {over} | "
            f"{r['rps1']:,.0f} | {r[f'rps{CLIENTS[-1]}']:,.0f} | {r['rows_s']:,.0f} | "
            f"{r['failures']:.0f} | {rss} |"
        )
    lines += [
        "",
        "HTTP floor (a GET that runs no model, same client), p50: "
        + ", ".join(f"{k} {v:,.0f} µs" for k, v in floors.items())
        + ". FastAPI runs on uvicorn "
        f"{package_version('uvicorn')} with its pure-Python defaults here (h11, asyncio; "
        "no uvloop/httptools installed), sync endpoint, access log off.",
    ]
    return "\n".join(lines)


def run(tmp: Path) -> tuple[str, int]:
    """Build, start everything, measure; returns the table and the number of failed requests."""
    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {load:.2f}: other work will disturb the numbers", flush=True)
    print("training and building the bundle ...", flush=True)
    bundle = make_bundle(tmp)
    model_path = tmp / "model.onnx"
    model_path.write_bytes(bundle.model)

    options = ort.SessionOptions()
    options.intra_op_num_threads = bundle.intra_op
    options.inter_op_num_threads = bundle.inter_op
    session = ort.InferenceSession(bundle.model, options, providers=["CPUExecutionProvider"])

    def raw_caller(rows: np.ndarray) -> tuple[Call, Callable[[], None]]:
        feeds = {INPUT: np.ascontiguousarray(rows)}
        return (lambda: session.run(None, feeds)), (lambda: None)

    inproc_config = agent_config(tmp / "inproc", bundle.public_key, bundle.profile, free_port())
    quiet_config = agent_config(tmp / "quiet", bundle.public_key, bundle.profile, free_port())
    agent_port, api_port = free_port(), free_port()
    daemon_config = agent_config(tmp / "daemon", bundle.public_key, bundle.profile, agent_port)
    subprocess.run(
        [*agent_cli(), "--config", str(daemon_config), "install", str(bundle.path)],
        check=True,
        timeout=120,
    )
    (tmp / "api").mkdir()
    (tmp / "api" / "app.py").write_text(FASTAPI_APP)
    api_env = {
        **os.environ,
        "MODEL_PATH": str(model_path),
        "INTRA_OP": str(bundle.intra_op),
        "INTER_OP": str(bundle.inter_op),
    }
    api_argv = [sys.executable, "-m", "uvicorn", "app:app", "--host", HOST, "--port", str(api_port)]
    api_argv += ["--log-level", "warning", "--no-access-log"]

    with (
        Agent(load_config(inproc_config)).start(serve_http=False) as inproc,
        Agent(load_config(quiet_config)).start(serve_http=False) as quiet,
        spawned(
            [*agent_cli(), "--config", str(daemon_config), "run"], tmp / "agent.log"
        ) as agent_proc,
        spawned(api_argv, tmp / "api.log", cwd=tmp / "api", env=api_env) as api_proc,
    ):
        outcome = inproc.install(str(bundle.path))
        if not outcome.ok:
            raise SystemExit(f"in-process install failed: {outcome.reason}")
        if not quiet.install(str(bundle.path)).ok:
            raise SystemExit("in-process install failed")
        # the same models in a runtime with no monitor: telemetry and drift off, to price them
        unmonitored = Runtime(quiet.config.runtime, quiet.config.server.max_batch_rows)
        store = quiet.lifecycle.store
        unmonitored.sync(store, store.load(), quiet.config.public_keys())

        def quiet_caller(rows: np.ndarray) -> tuple[Call, Callable[[], None]]:
            inputs = {INPUT: rows}
            return (lambda: unmonitored.infer(NAME, inputs)), (lambda: None)

        def inproc_caller(rows: np.ndarray) -> tuple[Call, Callable[[], None]]:
            inputs = {INPUT: rows}
            return (lambda: inproc.infer(NAME, inputs)), (lambda: None)

        agent_url, api_url = f"http://{HOST}:{agent_port}", f"http://{HOST}:{api_port}"
        wait_ready(f"{agent_url}/v2/health/ready", agent_proc, tmp / "agent.log")
        wait_ready(f"{api_url}/v2/health/ready", api_proc, tmp / "api.log")
        variants = [
            Variant("raw", "`session.run` in this process", raw_caller),
            Variant("in-process, monitoring off", "`Runtime.infer`, no monitor", quiet_caller),
            Variant("in-process", "`Agent.infer`, telemetry and drift on", inproc_caller),
            Variant(
                "agent HTTP",
                "`edgepack-agent run`, `POST /v2/models/…/infer`",
                http_caller(agent_url),
                agent_proc.pid,
            ),
            Variant(
                "FastAPI",
                "hand-written FastAPI + uvicorn + onnxruntime",
                http_caller(api_url),
                api_proc.pid,
            ),
        ]
        reference = probabilities(variants[0], bundle.rows[:BATCH_ROWS])
        for v in variants[1:]:
            got = probabilities(v, bundle.rows[:BATCH_ROWS])
            if not np.allclose(got, reference, rtol=0, atol=1e-6):
                raise SystemExit(f"{v.label} does not serve the same model as raw session.run")
        variants[0].results["rss"] = bare_memory_mib(model_path, bundle)
        for v in variants[3:]:
            assert v.pid is not None
            v.results["rss"] = memory_mib(v.pid)[0]
        print("measuring ...", flush=True)
        for v in variants:
            measure(v, bundle)
        floors = {
            "agent": health_p50_us(f"{agent_url}/v2/health/ready"),
            "FastAPI": health_p50_us(f"{api_url}/v2/health/ready"),
        }
    failures = sum(int(v.results["failures"]) for v in variants)
    return table(variants, bundle, floors, (load, os.getloadavg()[0])), failures


def main() -> None:
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as tmp:
        body, failures = run(Path(tmp))
    write_section(MARK, "## Agent: local inference latency, throughput and memory", body)
    print(body)
    print(f"\n({time.perf_counter() - started:.0f} s)")
    if failures:
        raise SystemExit(f"{failures} requests failed; every request should succeed")


if __name__ == "__main__":
    main()
