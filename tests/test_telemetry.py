"""Request telemetry: what the agent reports must equal what it was sent.

First :class:`Telemetry` alone, fed known requests (seeded latencies, two kinds of error): the
interval report's counts, error counts and p50/p95/p99 equal numpy's on the recorded latencies,
the interval resets, and the Prometheus text is valid exposition format whose counters and
cumulative histogram agree with the requests. Every scrape is read twice: line by line by the
strict checker below, and by prometheus_client's own parser, which must find HELP, TYPE and
samples for every family, no sample outside a declared family, and a ``version`` label wherever
there is a ``model`` label. Failed requests count alike in the requests counter and the latency
histogram (the same ``outcome`` series, the same numbers); label values are escaped; the process
start time is this process's. Then a real :class:`Agent` serving iris over HTTP: N good and M
bad requests, and ``GET /metrics`` counts exactly those; enough rows close a drift window and
``status()`` shows its verdict. Nothing here asserts on how long anything took.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import KeyPair, write_agent_config
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from edgepack.agent._config import load_config
from edgepack.agent._daemon import Agent
from edgepack.agent._prometheus import Family, gauge, render
from edgepack.agent._telemetry import LATENCY_BUCKETS, RESERVOIR, Telemetry

# --- Prometheus text exposition format 0.0.4, checked line by line --------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
_VALUE = r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|Inf|NaN)"
_HELP = re.compile(rf"# HELP ({_NAME}) .*")
_TYPE = re.compile(rf"# TYPE ({_NAME}) (counter|gauge|histogram|summary|untyped)")
_SAMPLE = re.compile(rf"({_NAME})(?:\{{((?:{_LABEL})(?:,{_LABEL})*)?\}})? ({_VALUE})(?: -?\d+)?")
_PAIR = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)=\"((?:[^\"\\\n]|\\[\\\"n])*)\"")

Labels = tuple[tuple[str, str], ...]


def parse_exposition(text: str) -> tuple[dict[str, str], dict[tuple[str, Labels], float]]:
    """Validate Prometheus text and return ({family: type}, {(sample name, labels): value}).

    Every line must be a HELP, TYPE or sample line; a family has at most one TYPE line, before
    its samples, and its lines are contiguous; no sample (name and labels) appears twice.
    """
    assert text.endswith("\n")
    types: dict[str, str] = {}
    samples: dict[tuple[str, Labels], float] = {}
    finished: set[str] = set()
    sampled: set[str] = set()
    current: str | None = None

    def family_of(name: str) -> str:
        for suffix in ("_bucket", "_sum", "_count"):
            base = name.removesuffix(suffix)
            if name.endswith(suffix) and types.get(base) in ("histogram", "summary"):
                return base
        return name

    for number, line in enumerate(text.splitlines(), 1):
        where = f"line {number}: {line!r}"
        if line.startswith("#"):
            help_ = _HELP.fullmatch(line)
            type_ = _TYPE.fullmatch(line)
            assert help_ or type_, f"not a HELP or TYPE line: {where}"
            family = (help_ or type_).group(1)  # type: ignore[union-attr]
            if type_:
                assert family not in types, f"second TYPE for {family}: {where}"
                assert family not in sampled, f"TYPE after samples: {where}"
                types[family] = type_.group(2)
        else:
            match = _SAMPLE.fullmatch(line)
            assert match, f"not a sample line: {where}"
            name, raw_labels, value = match.groups()
            family = family_of(name)
            labels = tuple(_PAIR.findall(raw_labels or ""))
            assert (name, labels) not in samples, f"duplicate sample: {where}"
            sampled.add(family)
            samples[(name, labels)] = float(value.replace("Inf", "inf"))
        if family != current:
            assert family not in finished, f"{family} is not contiguous: {where}"
            if current is not None:
                finished.add(current)
            current = family
    return types, samples


def check_histogram(samples: dict[tuple[str, Labels], float], name: str) -> dict[Labels, float]:
    """Buckets cumulative and ending in +Inf == _count, per label set; returns {labels: count}."""
    series: dict[Labels, list[tuple[float, float]]] = collections.defaultdict(list)
    for (sample, labels), value in samples.items():
        if sample == f"{name}_bucket":
            rest = tuple(p for p in labels if p[0] != "le")
            le = dict(labels)["le"]
            series[rest].append((float(le.replace("Inf", "inf")), value))
    counts = {}
    for labels, buckets in series.items():
        buckets.sort()
        values = [v for _, v in buckets]
        assert values == sorted(values), (labels, values)
        assert buckets[-1][0] == math.inf
        assert samples[(f"{name}_count", labels)] == values[-1]
        assert (f"{name}_sum", labels) in samples
        counts[labels] = values[-1]
    return counts


Families = dict[str, Metric]
Samples = dict[tuple[str, Labels], float]
# the sample names a family of each type may have, after the family's name as the parser gives it
# (it drops a counter's _total: family edgepack_requests, sample edgepack_requests_total)
SUFFIXES = {"counter": {"_total"}, "gauge": {""}, "histogram": {"_bucket", "_sum", "_count"}}


def scrape(text: str) -> tuple[Families, Samples]:
    """Check ``text`` against the exposition format and the conventions ``/metrics`` keeps.

    Returns the families as prometheus_client parses them (by family name) and the strict
    checker's {(sample name, labels in order): value}.
    """
    _, samples = parse_exposition(text)
    families: Families = {}
    for family in text_string_to_metric_families(text):
        name = family.name
        assert name not in families, f"{name} split in two"
        assert family.type in SUFFIXES, f"{name}: no TYPE line (parsed as {family.type})"
        assert family.documentation, f"{name}: no HELP line"
        assert family.samples, f"{name} declared without samples"
        for sample in family.samples:
            suffix = sample.name.removeprefix(name)
            assert sample.name.startswith(name), f"{sample.name} outside its family {name}"
            assert suffix in SUFFIXES[family.type], f"{sample.name} in a {family.type}"
            if "model" in sample.labels:
                assert sample.labels.get("version", "").isdigit(), f"no version: {sample}"
        families[name] = family
    assert sum(len(f.samples) for f in families.values()) == len(samples)
    return families, samples


def series(samples: Samples, name: str) -> dict[Labels, float]:
    """{labels: value} of one sample name."""
    return {labels: value for (sample, labels), value in samples.items() if sample == name}


# --- Telemetry alone ------------------------------------------------------------------------------


class Sent:
    """What was recorded, to compare the telemetry with."""

    def __init__(self) -> None:
        self.latencies: list[float] = []  # seconds, successful requests only
        self.rows: list[int] = []
        self.errors: collections.Counter[str] = collections.Counter()

    @property
    def requests(self) -> int:
        return len(self.latencies) + sum(self.errors.values())


def send(telemetry: Telemetry, model: str, version: int, n: int, seed: int) -> Sent:
    """Record ``n`` requests: seeded log-normal latencies, ~5% bad requests, ~2% runtime errors."""
    rng = np.random.default_rng(seed)
    sent = Sent()
    for _ in range(n):
        roll = rng.random()
        if roll < 0.05:
            telemetry.record(model, version, 0.0, 0, "bad_request")  # as Monitor.failed does
            sent.errors["bad_request"] += 1
        elif roll < 0.07:
            telemetry.record(model, version, 0.0, 0, "runtime_error")
            sent.errors["runtime_error"] += 1
        else:
            seconds = float(rng.lognormal(math.log(0.004), 0.9))
            rows = int(rng.integers(1, 65))
            telemetry.record(model, version, seconds, rows)
            sent.latencies.append(seconds)
            sent.rows.append(rows)
    return sent


def entry_for(report: dict[str, Any], model: str, version: int) -> dict[str, Any]:
    found = [m for m in report["models"] if (m["model"], m["version"]) == (model, version)]
    assert len(found) == 1, report["models"]
    return found[0]


def assert_report_matches(entry: dict[str, Any], sent: Sent) -> None:
    assert entry["requests"] == sent.requests
    assert entry["rows"] == sum(sent.rows)
    assert entry["errors"] == dict(sent.errors)
    ms = np.asarray(sent.latencies) * 1000
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    latency = entry["latency_ms"]
    assert latency["p50"] == pytest.approx(p50, abs=1e-4)  # reported rounded to 4 decimals
    assert latency["p95"] == pytest.approx(p95, abs=1e-4)
    assert latency["p99"] == pytest.approx(p99, abs=1e-4)
    assert latency["mean"] == pytest.approx(ms.mean(), abs=1e-4)
    assert entry["batch"]["mean"] == pytest.approx(np.mean(sent.rows), abs=1e-3)
    assert entry["batch"]["max"] == max(sent.rows)


def test_report_counts_errors_and_percentiles_match_the_requests() -> None:
    telemetry = Telemetry()
    first = send(telemetry, "churn", 3, 1000, seed=1)
    other = send(telemetry, "churn", 4, 200, seed=2)  # another version is its own series
    telemetry.event("install:installed")
    assert set(first.errors) == {"bad_request", "runtime_error"}

    report = telemetry.report()
    assert [(m["model"], m["version"]) for m in report["models"]] == [("churn", 3), ("churn", 4)]
    assert_report_matches(entry_for(report, "churn", 3), first)
    assert_report_matches(entry_for(report, "churn", 4), other)
    assert report["events"] == {"install:installed": 1}
    assert report["interval_end"] >= report["interval_start"]

    # a new interval: nothing yet, then only what came after the report
    quiet = telemetry.report()
    assert quiet["models"] == []
    assert quiet["interval_start"] == report["interval_end"]
    later = send(telemetry, "churn", 3, 50, seed=3)
    assert_report_matches(entry_for(telemetry.report(), "churn", 3), later)


def test_percentiles_stay_close_beyond_the_reservoir() -> None:
    telemetry = Telemetry()
    sent = send(telemetry, "big", 1, int(RESERVOIR * 2.5), seed=4)
    entry = entry_for(telemetry.report(), "big", 1)
    assert entry["requests"] == sent.requests  # counts stay exact
    assert entry["rows"] == sum(sent.rows)
    exact = np.percentile(np.asarray(sent.latencies) * 1000, [50, 95, 99])
    sampled = [entry["latency_ms"][p] for p in ("p50", "p95", "p99")]
    np.testing.assert_allclose(sampled, exact, rtol=0.05)  # a uniform sample of 10,000


def test_prometheus_text_is_valid_and_cumulative() -> None:
    telemetry = Telemetry()
    first = send(telemetry, "churn", 3, 1000, seed=1)
    telemetry.report()  # an interval report must not reset the cumulative numbers
    later = send(telemetry, "churn", 3, 300, seed=5)
    other = send(telemetry, "fraud", 1, 100, seed=6)
    telemetry.event("rollback:rolled-back-to")

    extra = [gauge("edgepack_example", "An example.", [({"model": "a", "version": "1"}, 1)])]
    families, samples = scrape(telemetry.prometheus(extra))
    assert families["edgepack_requests"].type == "counter"
    assert families["edgepack_request_seconds"].type == "histogram"
    churn = (("model", "churn"), ("version", "3"))
    ok, error = (*churn, ("outcome", "ok")), (*churn, ("outcome", "error"))
    fraud_ok = (("model", "fraud"), ("version", "1"), ("outcome", "ok"))
    latencies = first.latencies + later.latencies
    errors = sum(first.errors.values()) + sum(later.errors.values())
    assert samples[("edgepack_requests_total", ok)] == len(latencies)
    assert samples[("edgepack_requests_total", error)] == errors
    assert len(latencies) + errors == first.requests + later.requests
    assert samples[("edgepack_requests_total", fraud_ok)] == len(other.latencies)
    assert samples[("edgepack_rows_total", churn)] == sum(first.rows) + sum(later.rows)
    for kind in ("bad_request", "runtime_error"):
        labels = (*churn, ("kind", kind))
        want = first.errors[kind] + later.errors[kind]
        assert samples[("edgepack_request_errors_total", labels)] == want
    counts = check_histogram(samples, "edgepack_request_seconds")
    assert counts[ok] == len(latencies)
    assert counts[error] == errors
    assert counts[fraud_ok] == len(other.latencies)
    for bound in LATENCY_BUCKETS:
        labels = (*ok, ("le", repr(bound)))
        assert samples[("edgepack_request_seconds_bucket", labels)] == sum(
            1 for s in latencies if s <= bound
        )
    assert samples[("edgepack_request_seconds_sum", ok)] == pytest.approx(sum(latencies), abs=1e-6)
    assert samples[("edgepack_events_total", (("kind", "rollback:rolled-back-to"),))] == 1
    assert families["edgepack_example"].type == "gauge"
    assert samples[("edgepack_example", (("model", "a"), ("version", "1")))] == 1
    assert samples[("process_resident_memory_bytes", ())] > 0


def test_failed_requests_count_alike_in_the_counter_and_the_histogram() -> None:
    telemetry = Telemetry()
    sent = {
        ("churn", 3): send(telemetry, "churn", 3, 500, seed=11),
        ("churn", 4): send(telemetry, "churn", 4, 200, seed=12),
        ("fraud", 1): send(telemetry, "fraud", 1, 100, seed=13),
    }
    telemetry.record("fraud", 2, 0.0, 0, "runtime_error")  # a version that never answered
    sent[("fraud", 2)] = Sent()
    sent[("fraud", 2)].errors["runtime_error"] = 1
    _, samples = scrape(telemetry.prometheus())

    counters = series(samples, "edgepack_requests_total")
    assert counters == check_histogram(samples, "edgepack_request_seconds")  # same series, counts
    by_kind = series(samples, "edgepack_request_errors_total")
    for (model, version), want in sent.items():
        key = (("model", model), ("version", str(version)))
        ok, error = counters[(*key, ("outcome", "ok"))], counters[(*key, ("outcome", "error"))]
        assert ok + error == want.requests
        assert error == sum(want.errors.values()) > 0
        assert error == sum(n for labels, n in by_kind.items() if labels[:2] == key)
    assert len(counters) == 2 * len(sent)  # both outcomes, always: no series comes and goes


def test_no_family_is_declared_without_samples() -> None:
    telemetry = Telemetry()
    no_window_yet = gauge("edgepack_drift_status", "Drift.", [])
    text = telemetry.prometheus([no_window_yet])
    families, _ = scrape(text)
    process = {"process_start_time_seconds", "process_resident_memory_bytes", "process_cpu_seconds"}
    assert set(families) == process
    assert "edgepack_" not in text  # not even a HELP line

    telemetry.record("iris", 1, 0.001, 3)  # answered: no error, no event yet
    families, _ = scrape(telemetry.prometheus([no_window_yet]))
    assert set(families) - process == {
        "edgepack_requests",
        "edgepack_rows",
        "edgepack_request_seconds",
    }
    telemetry.record("iris", 1, 0.0, 0, "bad_request")
    telemetry.event("install:installed")
    families, _ = scrape(telemetry.prometheus())
    assert {"edgepack_request_errors", "edgepack_events"} <= set(families)


def test_label_values_and_help_are_escaped() -> None:
    odd = 'the "best" \\ model\nreally'  # a double quote, a backslash and a newline
    about = "help with \\ and\na newline"
    telemetry = Telemetry()
    telemetry.record(odd, 2, 0.01, 1)
    telemetry.event(odd)
    extra = [gauge("edgepack_example", about, [({"model": odd, "version": "2"}, 1)])]
    text = telemetry.prometheus(extra)
    families, _ = scrape(text)
    found = [
        s.labels[key] for f in families.values() for s in f.samples for key in ("model", "kind")
        if key in s.labels
    ]  # fmt: skip
    assert len(found) > 4
    assert set(found) == {odd}
    assert families["edgepack_events"].samples[0].labels == {"kind": odd}
    assert families["edgepack_example"].documentation == about


# this process is older than this module: pytest imported it
IMPORTED = time.time()


def test_process_start_time_is_this_processes() -> None:
    _, samples = scrape(Telemetry().prometheus())
    start = samples[("process_start_time_seconds", ())]
    # independently: the process's age from /proc/uptime and its start tick
    with open("/proc/self/stat") as stat:
        ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as uptime:
        age = float(uptime.read().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")
    assert start == pytest.approx(time.time() - age, abs=1.5)  # /proc/stat btime is whole seconds
    assert start <= IMPORTED  # not when the telemetry (or its module) began
    assert samples[("process_cpu_seconds_total", ())] > 0
    assert samples[("process_resident_memory_bytes", ())] > 1 << 20


def test_render_refuses_what_a_scraper_would_reject() -> None:
    one = [("", (), 1)]
    for families in (
        [Family("edgepack_x", "gauge", "x", one), Family("edgepack_x", "gauge", "x", one)],
        [Family("edgepack-x", "gauge", "x", one)],
        [Family("edgepack_x", "summary", "x", one)],
        [Family("edgepack_x", "gauge", "x", [("", (("bad-label", "v"),), 1)])],
    ):
        with pytest.raises(ValueError):
            render(families)
    with pytest.raises(ValueError):  # the agent's own names are taken
        Telemetry().prometheus([gauge("process_cpu_seconds_total", "again", [({}, 1)])])


def test_exposition_checker_rejects_what_prometheus_rejects() -> None:
    for bad in (
        'x{a="1"} one\n',  # not a number
        "# TYPE x counter\n# TYPE x counter\nx 1\n",  # two TYPE lines
        'x 1\n# TYPE x{a="1"} gauge\n',  # labels in a TYPE line
        "x 1\ny 1\nx 2\n",  # a family split in two
        "x 1",  # no final newline
    ):
        with pytest.raises(AssertionError):
            parse_exposition(bad)


# --- a real agent over HTTP -----------------------------------------------------------------------

GOOD = 30
ROWS = 5  # per good request: 150 rows close one 100-row drift window
DRIFT = "[telemetry]\ninterval = 0.5\n[drift]\nwindow = 100\nmin_rows = 100\n"
BAD_INPUTS: list[dict[str, Any]] = [  # valid JSON that the runtime refuses: "bad_request"
    {"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]},
    {"name": "input", "shape": [2, 3], "datatype": "FP32", "data": [5.1, 3.5, 1.4] * 2},
    {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [math.nan, 3.5, 1.4, 0.2]},
]


@pytest.fixture
def served(tmp_path: Path, keys: KeyPair, iris_bundles: dict[str, Path]) -> Iterator[Agent]:
    config = load_config(write_agent_config(tmp_path, keys, extra=DRIFT))
    settings = config.monitor
    assert (settings.interval, settings.window, settings.min_rows) == (0.5, 100, 100)
    agent = Agent(config).start(serve_http=True)
    try:
        assert agent.install(str(iris_bundles["v1"])).ok
        yield agent
    finally:
        agent.stop()


def iris_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    centre = np.array([5.8, 3.0, 3.8, 1.2])
    spread = np.array([0.8, 0.4, 1.7, 0.7])
    return np.abs(rng.normal(centre, spread, (n, 4))).round(1)


def infer(client: httpx.Client, rows: np.ndarray, **top: Any) -> httpx.Response:
    request = {
        "inputs": [
            {"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": rows.tolist()}
        ],
        **top,
    }
    return client.post("/v2/models/iris/infer", json=request)


def wait_for(condition: Callable[[], Any], seconds: float = 15.0) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"not true within {seconds} s: {condition}")


def metrics(client: httpx.Client) -> tuple[Families, Samples]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return scrape(response.text)


IRIS = (("model", "iris"), ("version", "1"))
OK, ERROR = (*IRIS, ("outcome", "ok")), (*IRIS, ("outcome", "error"))


def test_metrics_endpoint_counts_the_requests_sent(served: Agent) -> None:
    assert served.server is not None
    rng = np.random.default_rng(7)
    bad = [BAD_INPUTS[i % len(BAD_INPUTS)] for i in range(7)]
    with httpx.Client(base_url=served.server.url, timeout=10) as client:
        for i in range(GOOD):
            assert infer(client, iris_rows(rng, ROWS)).status_code == 200
            if i < len(bad):
                content = json.dumps({"inputs": [bad[i]]}).encode()  # NaN: not via httpx's json=
                response = client.post("/v2/models/iris/infer", content=content)
                assert response.status_code == 400, response.text
        _families, samples = metrics(client)
    assert samples[("edgepack_requests_total", OK)] == GOOD
    assert samples[("edgepack_requests_total", ERROR)] == len(bad)
    assert samples[("edgepack_request_errors_total", (*IRIS, ("kind", "bad_request")))] == len(bad)
    assert samples[("edgepack_rows_total", IRIS)] == GOOD * ROWS
    histogram = check_histogram(samples, "edgepack_request_seconds")
    assert histogram == series(samples, "edgepack_requests_total") == {OK: GOOD, ERROR: len(bad)}
    assert samples[("edgepack_events_total", (("kind", "install:installed"),))] == 1
    # (whether a drift window closed by now is the monitor thread's timing: an undeclared
    # family without samples is checked race-free by test_no_family_is_declared_without_samples)


def test_drift_verdict_appears_in_status_after_a_window(served: Agent) -> None:
    assert served.status()["models"]["iris"]["drift"] is None
    rng = np.random.default_rng(8)
    for _ in range(GOOD):  # in-process requests count the same as HTTP ones
        served.infer("iris", {"input": iris_rows(rng, ROWS).astype(np.float32)})
    verdict = wait_for(lambda: served.status()["models"]["iris"]["drift"])
    assert verdict in ("ok", "warning", "drift")
    report = served.monitor.latest["iris"]
    assert (report["model"], report["version"], report["n"]) == ("iris", 1, 100)
    assert {f["name"] for f in report["features"] if not f["output"]} == {
        "sepal length (cm)",
        "sepal width (cm)",
        "petal length (cm)",
        "petal width (cm)",
    }


def test_metrics_with_a_drift_verdict_are_valid_exposition(served: Agent) -> None:
    assert served.server is not None
    rng = np.random.default_rng(9)
    for _ in range(GOOD):
        served.infer("iris", {"input": iris_rows(rng, ROWS).astype(np.float32)})
    verdict = wait_for(lambda: served.status()["models"]["iris"]["drift"])
    with httpx.Client(base_url=served.server.url, timeout=10) as client:
        families, samples = metrics(client)
    assert families["edgepack_drift_status"].type == "gauge"
    assert families["edgepack_drift_status"].documentation
    level = {"ok": 0, "warning": 1, "drift": 2}[served.monitor.latest["iris"]["status"]]
    assert verdict in ("ok", "warning", "drift")
    assert series(samples, "edgepack_drift_status") == {IRIS: level}
    start = samples[("process_start_time_seconds", ())]
    assert start <= IMPORTED
    assert families["process_cpu_seconds"].type == "counter"
    assert families["process_resident_memory_bytes"].type == "gauge"


def test_a_request_for_an_unknown_output_is_counted_as_bad(served: Agent) -> None:
    assert served.server is not None
    rng = np.random.default_rng(10)
    with httpx.Client(base_url=served.server.url, timeout=10) as client:
        response = infer(client, iris_rows(rng, 1), outputs=[{"name": "score"}])
        assert response.status_code == 400
        _, samples = metrics(client)
    assert series(samples, "edgepack_requests_total") == {OK: 0, ERROR: 1}
    assert samples.get(("edgepack_request_errors_total", (*IRIS, ("kind", "bad_request")))) == 1
    assert check_histogram(samples, "edgepack_request_seconds") == {OK: 0, ERROR: 1}


def test_drift_counts_what_was_asked_even_if_the_caller_refills_its_array(served: Agent) -> None:
    """An in-process caller that reuses one buffer: the drift queue keeps what each request held."""
    buffer = iris_rows(np.random.default_rng(3), 1).astype(np.float32)  # the fast path
    asked = buffer.copy()
    monitor = served.monitor
    monitor._stop.set()  # hold the monitor thread's hand: nothing is counted meanwhile
    monitor._thread.join(10)
    try:
        served.infer("iris", {"input": buffer})
        buffer[:] = -1.0  # the next request's values, written into the same array
        *_, (_model, _version, inputs, _outputs) = monitor._queue
        np.testing.assert_array_equal(inputs["input"], asked)
    finally:
        monitor._stop.clear()
        monitor._thread = threading.Thread(target=monitor._loop, daemon=True)
        monitor._thread.start()


def test_status_from_another_process_shows_the_serving_daemons_verdict(
    served: Agent, tmp_path: Path
) -> None:
    """`edgepack-agent status --json` runs in its own process and counts no windows: it reads
    the verdict the daemon wrote (it showed "drift": null while /metrics said drift 2)."""
    rng = np.random.default_rng(10)
    for _ in range(GOOD):
        served.infer("iris", {"input": iris_rows(rng, ROWS).astype(np.float32)})
    verdict = wait_for(lambda: served.status()["models"]["iris"]["drift"])
    config = tmp_path / "agent.toml"
    out = subprocess.run(
        [sys.executable, "-m", "edgepack.agent._cli", "--config", str(config), "status", "--json"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    shown = json.loads(out.stdout)["models"]["iris"]["drift"]
    assert shown == served.monitor.latest["iris"]["status"]
    assert shown == verdict  # no traffic since: no other window closed
    other = Agent(load_config(config))  # not started: a verdict of another version is not shown
    assert other.monitor.verdict("iris", 2) is None
    assert other.monitor.verdict("iris", 1) == shown
