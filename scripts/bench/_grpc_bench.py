"""gRPC benchmark: latency and throughput of the agent's Open Inference Protocol over gRPC.

:func:`measure_grpc` is what ``bench_agent.py`` calls: given a running agent (its gRPC address,
or an in-process :class:`~edgepack.agent._daemon.Agent` started with ``[grpc] enabled``), a model
and rows, it measures with the official ``tritonclient.grpc`` (binary tensors, as it sends them
by default): sequential single-row latency (p50/p99), single-row throughput with each client
count, and the same for 64-row batches. :func:`measure_http` does the same over HTTP with
``tritonclient.http`` (binary tensor extension), so the two protocols are compared with one
client library and one loop. Each client thread has a connection of its own.

Every request goes to 127.0.0.1 (the address is refused otherwise); every loop is bounded in
count and in time (``seconds`` per measurement, at most :data:`MAX_REQUESTS_PER_THREAD` calls
per thread, :data:`MAX_LATENCY_REQUESTS` sequential ones).

Run alone, ``.venv/bin/python scripts/bench/_grpc_bench.py [--seconds S] [--model mlp|forest]``
builds that digits bundle of ``bench_agent.py``, starts ``edgepack-agent run`` with HTTP and gRPC,
and prints both (about two minutes with the defaults); it writes nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import numpy as np

WARMUP = 50
MAX_LATENCY_REQUESTS = 2000
MAX_REQUESTS_PER_THREAD = 200_000
BATCH_ROWS = 64
JOIN_SLACK = 30.0  # seconds a client thread may overrun its measurement before it is abandoned
LOOPBACK = ("127.0.0.1", "localhost", "[::1]")

Call = Callable[[], object]
Client = tuple[Call, Callable[[], None]]  # one call, and how to close its connection
Maker = Callable[[Mapping[str, np.ndarray]], Client]  # makes a client for these inputs


def _loopback(address: str) -> str:
    host = address.rpartition(":")[0]
    if host not in LOOPBACK:
        raise ValueError(f"benchmarks only talk to this machine; {address!r} is not loopback")
    return address


def _grpc_address(target: Any) -> str:
    """``host:port``, from a string or from an agent whose gRPC server runs."""
    if isinstance(target, str):
        return _loopback(target.removeprefix("grpc://"))
    server = getattr(target, "grpc_server", None)
    if server is None:
        raise ValueError("the agent serves no gRPC: start it with [grpc] enabled = true")
    return _loopback(server.address)


def _inputs(rows: np.ndarray | Mapping[str, np.ndarray], metadata: Mapping[str, Any]) -> dict:
    """Input name -> array; a bare array goes to the model's only input."""
    if isinstance(rows, Mapping):
        return dict(rows)
    names = [tensor["name"] for tensor in metadata["inputs"]]
    if len(names) != 1:
        raise ValueError(f"the model takes {names}: pass rows as {{name: array}}")
    return {names[0]: rows}


def _datatype(array: np.ndarray) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return str(np_to_triton_dtype(array.dtype))


def grpc_client(address: str, model: str) -> Maker:
    """Per thread: a ``tritonclient.grpc`` client on a connection of its own."""
    import tritonclient.grpc as triton

    # a local subchannel pool: without it every client in the process shares one connection
    channel_args = [
        ("grpc.max_send_message_length", 2**31 - 1),
        ("grpc.max_receive_message_length", 2**31 - 1),
        ("grpc.use_local_subchannel_pool", 1),
    ]

    def make(inputs: Mapping[str, np.ndarray]) -> Client:
        client = triton.InferenceServerClient(url=address, channel_args=channel_args)
        tensors = []
        for name, array in inputs.items():
            tensor = triton.InferInput(name, list(array.shape), _datatype(array))
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        return (lambda: client.infer(model, tensors, client_timeout=30)), client.close

    return make


def http_client(address: str, model: str) -> Maker:
    """Per thread: a ``tritonclient.http`` client (binary tensors) on a connection of its own."""
    import tritonclient.http as triton

    def make(inputs: Mapping[str, np.ndarray]) -> Client:
        client = triton.InferenceServerClient(url=address, connection_timeout=30)
        tensors = []
        for name, array in inputs.items():
            tensor = triton.InferInput(name, list(array.shape), _datatype(array))
            tensor.set_data_from_numpy(array, binary_data=True)
            tensors.append(tensor)
        return (lambda: client.infer(model, tensors)), client.close

    return make


def _latency_us(call: Call, seconds: float) -> tuple[float, float, int]:
    """p50 and p99 of sequential calls in µs, and how many were timed."""
    for _ in range(WARMUP):
        call()
    times = []
    deadline = time.perf_counter() + seconds
    for _ in range(MAX_LATENCY_REQUESTS):
        start = time.perf_counter()
        call()
        end = time.perf_counter()
        times.append(end - start)
        if end > deadline:
            break
    cuts = statistics.quantiles(times, n=100, method="inclusive")
    return cuts[49] * 1e6, cuts[98] * 1e6, len(times)


def _throughput(
    make: Maker, inputs: Mapping[str, np.ndarray], clients: int, seconds: float
) -> tuple[float, int]:
    """Calls per second over ``clients`` threads for ``seconds``, and the failures. Each thread
    makes its own client (tritonclient.http's cannot be used from another thread), connects and
    warms up before the clock starts, and closes it at the end."""
    done, failed = [0] * clients, [0] * clients
    ready = threading.Barrier(clients + 1)  # every client connected and warmed up
    go = threading.Event()  # set once stop_at is
    stop_at = [0.0]

    def worker(slot: int) -> None:
        call, close = make(inputs)
        try:
            try:
                call()
            except Exception:  # noqa: BLE001 - a failed warm-up is a failed request, counted
                failed[slot] += 1
            ready.wait()
            go.wait(timeout=JOIN_SLACK)
            for _ in range(MAX_REQUESTS_PER_THREAD):
                if time.perf_counter() >= stop_at[0]:
                    break
                try:
                    call()
                    done[slot] += 1
                except Exception:  # noqa: BLE001 - any error is one failed request, counted
                    failed[slot] += 1
        finally:
            with contextlib.suppress(Exception):
                close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    ready.wait(timeout=JOIN_SLACK)
    start = time.perf_counter()
    stop_at[0] = start + seconds
    go.set()
    for t in threads:
        t.join(timeout=seconds + JOIN_SLACK)
    elapsed = time.perf_counter() - start
    return sum(done) / elapsed, sum(failed)


def _measure(
    make: Maker,
    inputs: dict[str, np.ndarray],
    seconds: float,
    clients: Sequence[int],
    batch_rows: int,
) -> dict[str, Any]:
    one = {name: array[:1] for name, array in inputs.items()}
    batch = {name: _rows(array, batch_rows) for name, array in inputs.items()}
    out: dict[str, Any] = {"failures": 0}
    for label, feeds in (("", one), ("batch_", batch)):
        call, close = make(feeds)
        try:
            p50, p99, count = _latency_us(call, seconds)
        finally:
            close()
        out.update({f"{label}p50": p50, f"{label}p99": p99, f"{label}latency_n": count})
        for n in clients:
            rate, failures = _throughput(make, feeds, n, seconds)
            out[f"{label}rps{n}"] = rate
            out["failures"] += failures
            if label:
                out[f"rows_s{n}"] = rate * batch_rows
    out["rows_s"] = out.get(f"rows_s{clients[0]}", 0.0) if clients else 0.0
    return out


def _rows(array: np.ndarray, count: int) -> np.ndarray:
    """``count`` rows of ``array``, repeating it when it has fewer."""
    reps = -(-count // len(array))
    return np.ascontiguousarray(np.concatenate([array] * reps)[:count])


def measure_grpc(
    target: Any,
    model: str,
    rows: np.ndarray | Mapping[str, np.ndarray],
    seconds: float = 3.0,
    clients: Sequence[int] = (1, 8),
    batch_rows: int = BATCH_ROWS,
) -> dict[str, Any]:
    """Latency and throughput of ``model`` over gRPC, with ``tritonclient.grpc``.

    Args:
        target: ``"127.0.0.1:PORT"`` of a running agent's gRPC server, or an in-process
            ``Agent`` started with ``[grpc] enabled = true`` (its clients then share the
            process, and the GIL, with the server).
        model: the served model's name.
        rows: the rows to send (float32 ``[n, features]`` for a one-input model, or input name
            -> array); single-row calls send the first, batches the first ``batch_rows``
            (repeated if there are fewer).
        seconds: how long each measurement runs (latency, then each client count, for single
            rows and for batches).
        clients: the client thread counts to measure throughput with.
        batch_rows: the rows of a batch request.

    Returns:
        ``p50``, ``p99`` (µs, sequential single rows) and ``latency_n``; ``rps{n}`` per client
        count; the same for batches as ``batch_p50``, ``batch_p99``, ``batch_latency_n``,
        ``batch_rps{n}``, with ``rows_s{n}`` rows per second and ``rows_s`` for the first client
        count (the keys ``bench_agent.py`` uses); ``failures`` (calls that failed, all counted);
        ``client`` (the library versions).

    Raises:
        ValueError: the address is not loopback, the agent serves no gRPC, or the model takes
            several inputs and ``rows`` is one array.
    """
    import tritonclient.grpc as triton

    address = _grpc_address(target)
    with triton.InferenceServerClient(url=address) as probe:
        metadata = probe.get_model_metadata(model, as_json=True)
    inputs = _inputs(rows, metadata)
    out = _measure(grpc_client(address, model), inputs, seconds, clients, batch_rows)
    out["client"] = (
        f"tritonclient.grpc {package_version('tritonclient')}, grpcio {package_version('grpcio')}"
    )
    return out


def measure_http(
    address: str,
    model: str,
    rows: np.ndarray | Mapping[str, np.ndarray],
    seconds: float = 3.0,
    clients: Sequence[int] = (1, 8),
    batch_rows: int = BATCH_ROWS,
) -> dict[str, Any]:
    """:func:`measure_grpc` over HTTP (``"127.0.0.1:PORT"``), with ``tritonclient.http`` and
    its binary tensor extension: the same loops and keys, to compare the two protocols."""
    import tritonclient.http as triton

    address = _loopback(address.removeprefix("http://"))
    probe = triton.InferenceServerClient(url=address)
    try:
        metadata = probe.get_model_metadata(model)
    finally:
        probe.close()
    inputs = _inputs(rows, metadata)
    out = _measure(http_client(address, model), inputs, seconds, clients, batch_rows)
    out["client"] = f"tritonclient.http {package_version('tritonclient')}"
    return out


# -- run alone -------------------------------------------------------------------------------


def _table(results: Mapping[str, Mapping[str, Any]], clients: Sequence[int]) -> str:
    head = ["", "p50 µs", "p99 µs", *(f"req/s ×{n}" for n in clients)]
    head += ["64-row p50 µs", "64-row p99 µs", *(f"rows/s ×{n}" for n in clients), "failed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in results.items():
        cells = [label, f"{r['p50']:,.0f}", f"{r['p99']:,.0f}"]
        cells += [f"{r[f'rps{n}']:,.0f}" for n in clients]
        cells += [f"{r['batch_p50']:,.0f}", f"{r['batch_p99']:,.0f}"]
        cells += [f"{r[f'rows_s{n}']:,.0f}" for n in clients]
        cells.append(str(r["failures"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--model", choices=("mlp", "forest"), default="mlp")
    args = parser.parse_args()
    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here))
    sys.path.insert(0, str(here.parents[1]))
    # the bundle and the process helpers of the agent benchmark, so both measure one model
    from bench_agent import HOST, agent_cli, free_port, make_bundle, spawned, wait_ready

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-grpc-") as name:
        tmp = Path(name)
        print("training and building the bundle ...", flush=True)
        bundle = make_bundle(tmp, args.model)
        http_port, grpc_port = free_port(), free_port()
        (tmp / "agent").mkdir()
        config = tmp / "agent" / "agent.toml"
        config.write_text(
            f'device_id = "bench"\nprofile = "{bundle.profile}"\nstate_dir = "state"\n'
            f'trusted_keys = ["{bundle.public_key}"]\n[server]\nhost = "{HOST}"\n'
            f'port = {http_port}\n[grpc]\nenabled = true\nhost = "{HOST}"\nport = {grpc_port}\n'
        )
        cli = [*agent_cli(), "--config", str(config)]
        subprocess.run([*cli, "install", str(bundle.path)], check=True, timeout=120)
        with spawned([*cli, "run"], tmp / "agent.log") as proc:
            wait_ready(f"http://{HOST}:{http_port}/v2/health/ready", proc, tmp / "agent.log")
            results = {}
            print("measuring gRPC ...", flush=True)
            results["agent gRPC (tritonclient.grpc)"] = measure_grpc(
                f"{HOST}:{grpc_port}", bundle.name, bundle.rows, args.seconds, args.clients
            )
            print("measuring HTTP ...", flush=True)
            results["agent HTTP (tritonclient.http, binary)"] = measure_http(
                f"{HOST}:{http_port}", bundle.name, bundle.rows, args.seconds, args.clients
            )
    print(_table(results, args.clients))
    for label, r in results.items():
        print(f"{label}: {r['client']}, latency n={r['latency_n']}/{r['batch_latency_n']}")
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
