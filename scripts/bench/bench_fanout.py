"""Fleet benchmark: deploy fan-out to N simulated devices, and the collector's ingest rate.

For each N (100, 1,000, 5,000) on a fresh mosquitto of its own (loopback, free port):

1. a collector (``edgepack.fleet._collector.Collector``, SQLite store in a temporary directory,
operator
   key required for commands, as ``edgepack-fleet collector --command-key`` runs it) starts in
   its own process;
2. N simulated devices (``simdevices.SimFleet``: one process, one epoll thread for every client)
   connect through a sliding window, subscribe like the agent, publish their retained state and
   ask for pending work; we time that, and how long until the collector has every state stored;
3. ``edgepack.fleet._commands.publish_command`` publishes one signed deploy to the devices' group;
each
   device verifies it (signature, target, expiry) and reports QUEUED → IN_PROGRESS (downloading)
   → IN_PROGRESS (health-check) → SUCCEEDED and a new state. Nothing is downloaded and no model
   loaded: this measures the fan-out path, not installs. We time publish → every device has the
   command → the broker acknowledged every SUCCEEDED → every execution SUCCEEDED in the store;
4. we check that nothing was lost or doubled: N executions, all SUCCEEDED, one per device,
   exactly 4·N history rows, every device's stored state showing the new version, and the
   collector's counters adding up (received = written + answered, no duplicates, no rejects).

The collector's ingest rate is the messages it wrote per second during the status burst, from
its own counters sampled every 10 ms. Everything runs on this one machine, so the simulator,
mosquitto and the collector share its cores. Every process and temporary directory the script
made is gone when it exits, whatever happens.
Run: ``.venv/bin/python scripts/bench/bench_fanout.py`` (about two minutes; ``... 100 1000`` runs
only those sizes and leaves BENCHMARKS.md alone).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import platform
import resource
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version as package_version
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import write_section  # noqa: E402
from simdevices import STEPS, SimFleet  # noqa: E402

from edgepack.fleet._broker import BrokerOptions  # noqa: E402
from edgepack.formats.keys import (  # noqa: E402
    generate_private_key,
    load_private_key,
    load_public_key,
    private_key_pem,
    public_key_pem,
)

SIZES = (100, 1_000, 5_000)
GROUP, MODEL, VERSION, PROFILE = "bench", "iris", 2, "x86_64-cpu"
MOSQUITTO = "/usr/sbin/mosquitto"
MARK = "fanout"
BUNDLES = {
    PROFILE: {
        "url": "http://127.0.0.1:9/iris-2-x86_64-cpu.edgepack",  # never fetched
        "sha256": "0" * 64,
        "size": 123_456,
    }
}


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def mosquitto(directory: Path) -> Iterator[int]:
    """A mosquitto on a free loopback port with room for thousands of clients; yields the port."""
    port = free_port()
    config = directory / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\nmax_connections -1\nallow_anonymous true\n"
        "persistence false\nmax_queued_messages 1000000\nlog_type error\nlog_type warning\n"
    )
    log = directory / "mosquitto.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_raise_nofile,  # noqa: PLW1509 - only setrlimit, before exec
        )
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {log.read_text()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("mosquitto did not listen within 10 s")
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        problems = log.read_text(errors="replace").strip()
        if problems:
            print(f"mosquitto log:\n{problems[-2000:]}", file=sys.stderr)


# -- the collector, in its own process ---------------------------------------------------------


def _collector_process(pipe: Connection, port: int, prefix: str, db: str, key_pem: bytes) -> None:
    """Run a Collector; answer "samples" and "stop" over ``pipe``."""
    from edgepack.fleet._collector import Collector
    from edgepack.fleet._database import open_store

    logging.basicConfig(level=logging.WARNING, format="collector: %(levelname)s %(message)s")
    options = BrokerOptions(port=port, prefix=prefix)
    store = open_store(db)
    collector = Collector(
        options, store, command_keys=[load_public_key(key_pem)], client_id="bench-collector"
    ).start()
    samples: list[tuple[float, int, int, int]] = []
    quit_sampling = threading.Event()

    def sample() -> None:
        while not quit_sampling.wait(0.01):
            s = collector.stats
            # _queue is the collector's internal hand-off queue: its depth says who is slower
            samples.append((time.monotonic(), s.received, s.written, collector._queue.qsize()))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    pipe.send("ready")
    while True:
        request = pipe.recv()
        if request == "samples":
            pipe.send(list(samples))
        elif request == "stop":
            collector.stop(drain_timeout=60)
            quit_sampling.set()
            sampler.join()
            store.close()
            pipe.send(dict(collector.stats.__dict__))
            return


class CollectorProcess:
    def __init__(self, port: int, prefix: str, db: Path, key_pem: bytes) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._pipe, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_collector_process, args=(child, port, prefix, str(db), key_pem), daemon=True
        )
        self.final: dict[str, int] | None = None

    def start(self) -> CollectorProcess:
        self._proc.start()
        if not self._pipe.poll(30) or self._pipe.recv() != "ready":
            raise RuntimeError("the collector did not start within 30 s")
        return self

    def samples(self) -> list[tuple[float, int, int, int]]:
        self._pipe.send("samples")
        return self._pipe.recv()  # type: ignore[no-any-return]

    def stop(self) -> dict[str, int] | None:
        """Drain and stop; the final counters, or None if it did not stop cleanly."""
        if self._proc.pid is None:
            return None
        if self.final is None and self._proc.is_alive():
            self._pipe.send("stop")
            if self._pipe.poll(90):
                self.final = self._pipe.recv()
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        return self.final


# -- the operator, in its own process ----------------------------------------------------------
# Not in this one: edgepack.fleet._broker.connect runs paho's loop_start() thread, whose select()
# cannot watch a descriptor above 1023, and this process holds one socket per simulated device.


def _operator_process(pipe: Connection, port: int, prefix: str, key_pem: bytes) -> None:
    """On "go", publish one signed deploy to the group; send back its job id."""
    from edgepack.fleet._commands import publish_command

    key = load_private_key(key_pem)
    pipe.send("ready")
    go = None
    with contextlib.suppress(EOFError):  # the parent gave up before "go"
        go = pipe.recv()
    if go == "go":
        published = publish_command(
            BrokerOptions(port=port, prefix=prefix),
            "deploy",
            MODEL,
            {"group": GROUP},
            key,
            version=VERSION,
            bundles=BUNDLES,
        )
        pipe.send(published.job_id)


@contextlib.contextmanager
def operator(port: int, prefix: str, key_pem: bytes) -> Iterator[Connection]:
    ctx = multiprocessing.get_context("spawn")
    pipe, child = ctx.Pipe()
    proc = ctx.Process(target=_operator_process, args=(child, port, prefix, key_pem), daemon=True)
    proc.start()
    try:
        if not pipe.poll(30) or pipe.recv() != "ready":
            raise RuntimeError("the operator process did not start within 30 s")
        yield pipe
    finally:
        pipe.close()
        proc.join(15)
        if proc.is_alive():
            proc.kill()
            proc.join(5)


# -- one run -----------------------------------------------------------------------------------


@dataclass
class Result:
    n: int
    connect_s: float
    states_stored_s: float
    fanout_s: float
    fanout_p50_s: float
    devices_done_s: float
    store_done_s: float
    ingest_per_s: float
    burst_messages: int
    peak_queue: int
    checks: list[str]


def _count(db: Path, sql: str, params: tuple[Any, ...] = ()) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as conn:
        return int(conn.execute(sql, params).fetchone()[0])


def _poll(done: Any, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not done():
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"{what}: not done within {timeout:.0f} s")
        time.sleep(0.02)
    return time.monotonic() - start


def _ingest(samples: list[tuple[float, int, int, int]], t0: float) -> tuple[float, int, int]:
    """(messages written per second, messages, peak queue) during the burst after ``t0``."""
    burst = [s for s in samples if s[0] >= t0]
    base, final = burst[0][2], burst[-1][2]
    first = next(s for s in burst if s[2] > base)
    last = next(s for s in burst if s[2] == final)
    # from the sample before the first write to the sample that saw the last one
    start = burst[max(0, burst.index(first) - 1)][0]
    span = max(last[0] - start, 0.01)
    return (final - base) / span, final - base, max(s[3] for s in burst)


def run_one(n: int, tmp: Path) -> Result:
    from edgepack.fleet._database import open_store

    key = generate_private_key()
    prefix = f"edgepack/bench{n}"
    db = tmp / f"fleet-{n}.db"
    directory = tmp / f"broker-{n}"
    directory.mkdir()
    budget = 30 + n / 50  # generous, but bounded
    with mosquitto(directory) as port:
        collector = CollectorProcess(port, prefix, db, public_key_pem(key))
        fleet = SimFleet("127.0.0.1", port, [key.public_key()], n, prefix=prefix)
        try:
            collector.start()
            with operator(port, prefix, private_key_pem(key)) as deploy:
                fleet.start()
                connect_s = fleet.connect_all(budget)
                states_s = connect_s + _poll(
                    lambda: _count(db, "SELECT count(*) FROM devices") >= n, budget, "states"
                )
                t0 = time.monotonic()
                deploy.send("go")
                if not deploy.poll(30):
                    raise RuntimeError("the deploy was not published within 30 s")
                job = deploy.recv()
                fleet.wait(lambda: fleet.succeeded >= n, budget, "devices reporting SUCCEEDED")
                done_sql = (
                    "SELECT count(*) FROM executions WHERE job_id = ? AND status = 'SUCCEEDED'"
                )
                _poll(lambda: _count(db, done_sql, (job,)) >= n, budget, "store: SUCCEEDED")
                store_done = time.monotonic() - t0
                time.sleep(0.3)  # let the last states land, so the counters below are final
                samples = collector.samples()
        finally:
            fleet.stop()
            final = collector.stop()
    if final is None:
        raise RuntimeError("the collector did not stop cleanly")
    got = [d.command_at - t0 for d in fleet.devices if d.command_at is not None]
    done = [d.succeeded_at - t0 for d in fleet.devices if d.succeeded_at is not None]
    rate, burst, peak = _ingest(samples, t0)
    store = open_store(db)
    try:
        executions = store.executions(job)
        history = _count(db, "SELECT count(*) FROM execution_history WHERE job_id = ?", (job,))
        distinct = _count(
            db,
            "SELECT count(*) FROM (SELECT DISTINCT job_id, device, seq FROM execution_history"
            " WHERE job_id = ?)",
            (job,),
        )
        updated = sum(
            1 for d in store.devices() if (d.models.get(MODEL) or {}).get("active") == VERSION
        )
    finally:
        store.close()
    devices = {e.device for e in executions}
    expected_written = n + 1 + len(STEPS) * n + n  # states, the job, the updates, new states
    checks = {
        "every device got the deploy": len(got) == n,
        f"{n} executions, one per device": len(executions) == n and len(devices) == n,
        "all SUCCEEDED": all(e.status == "SUCCEEDED" and e.seq == len(STEPS) for e in executions),
        f"history rows = {len(STEPS)}·N": history == len(STEPS) * n == distinct,
        "every stored state shows the new version": updated == n,
        "collector: nothing lost": final["received"] == expected_written + n
        and final["written"] == expected_written
        and final["answered"] == n,
        "collector: no duplicates or rejects": final["duplicates"] == 0 and final["rejected"] == 0,
        "simulator: no errors": not fleet.errors,
    }
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        print(f"N={n}: FAILED {failed}; collector {final}; sim errors {fleet.errors[:5]}")
    return Result(
        n=n,
        connect_s=connect_s,
        states_stored_s=states_s,
        fanout_s=max(got) if got else float("nan"),
        fanout_p50_s=statistics.median(got) if got else float("nan"),
        devices_done_s=max(done) if done else float("nan"),
        store_done_s=store_done,
        ingest_per_s=rate,
        burst_messages=burst,
        peak_queue=peak,
        checks=failed,
    )


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def table(results: list[Result], seconds: float) -> str:
    mosquitto_version = subprocess.run(
        [MOSQUITTO, "-h"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[0]
    rows = [
        f"| {r.n:,} | {r.connect_s:.2f} ({r.n / r.connect_s:,.0f}/s) | {r.states_stored_s:.2f} | "
        f"{r.fanout_p50_s:.2f} / {r.fanout_s:.2f} | {r.devices_done_s:.2f} | "
        f"{r.store_done_s:.2f} | {r.burst_messages:,} | {r.ingest_per_s:,.0f} | "
        f"{r.peak_queue:,} | {'yes' if not r.checks else 'NO: ' + ', '.join(r.checks)} |"
        for r in results
    ]
    return "\n".join(
        [
            f"Machine: {_cpu_model()}, {os.cpu_count()} cores, Linux {platform.release()}, "
            f"Python {platform.python_version()}, {mosquitto_version}, paho-mqtt "
            f"{package_version('paho-mqtt')}, SQLite {sqlite3.sqlite_version} on the local disk "
            f"(WAL, the store's defaults). Broker, simulator and collector share these cores. "
            f"Numbers from `scripts/bench/bench_fanout.py` ({seconds:.0f} s in all).",
            "",
            "Simulated devices (`scripts/bench/simdevices.py`): one process, one epoll thread "
            "driving every paho client through its external-loop API, MQTT 5 persistent "
            "sessions, connecting 200 at a time. Each verifies the signed deploy for real "
            "(`edgepack.formats.commands.open_command`) and reports QUEUED → IN_PROGRESS "
            "(downloading) → IN_PROGRESS (health-check) → SUCCEEDED plus a new retained state, at "
            "once: **no download, no onnxruntime, no health check** (and not the agent's 0.3 s "
            "batching pause): this is the fan-out and ingest path, not install time. The collector "
            "runs in its own process with a SQLite store, verifying the operator's key.",
            "",
            "| devices | connect + subscribe s | all states in store s | publish → command "
            "p50 / all s | publish → all SUCCEEDED at broker s | publish → all SUCCEEDED in "
            "store s | burst messages | collector ingest msg/s | peak collector queue | "
            "nothing lost or doubled |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
            *rows,
            "",
            "*Nothing lost or doubled* means: every device received the deploy; the store holds N "
            "executions, one per device, all SUCCEEDED at seq 4; exactly 4·N distinct history "
            "rows; every device's stored state shows the new version; the collector received "
            "exactly what was sent (2 per device on connect, 1 job, 5 per device in the burst) "
            "and recorded no duplicates or rejects. Ingest rate: messages written (status "
            "updates, states, the job) per second, from the collector's counters sampled every "
            "10 ms between its first and last write of the burst.",
        ]
    )


def main() -> None:
    _raise_nofile()
    sizes = tuple(int(a) for a in sys.argv[1:]) or SIZES
    start = time.monotonic()
    results = []
    with tempfile.TemporaryDirectory(prefix="edgepack-fanout-") as tmp:
        for n in sizes:
            result = run_one(n, Path(tmp))
            print(
                f"N={n}: connect {result.connect_s:.2f} s, store done {result.store_done_s:.2f} s, "
                f"ingest {result.ingest_per_s:,.0f} msg/s, checks {result.checks or 'ok'}",
                flush=True,
            )
            results.append(result)
    body = table(results, time.monotonic() - start)
    if sizes == SIZES:
        write_section(MARK, "## Fleet: deploy fan-out and collector ingest", body)
    print(body)
    if any(r.checks for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
