"""The collector's fleet-level ``/metrics``, in the Prometheus text format (opt-in).

Gauges are read from the store when scraped (devices online/offline, installed model versions,
the latest drift status and quality metrics per device and model, alerts firing); counters come
from the collector and its alerter (messages received, reports and job outcomes recorded).
"""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from edgepack.fleet._alerts import Alerter
from edgepack.fleet._collector import CollectorStats
from edgepack.fleet._database import FleetStore
from edgepack.fleet._views import latest_reports

__all__ = ["MetricsServer", "render"]

log = logging.getLogger("edgepack.fleet.metrics")
P = "edgepack_fleet_"
_DRIFT = {"ok": 0, "warning": 1, "drift": 2}
_QUALITY = {"ok": 0, "warning": 1, "degraded": 2}


def _escape(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: Any) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


class _Out:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(
        self, name: str, kind: str, help_text: str, samples: Iterable[tuple[str, float]]
    ) -> None:
        self.lines += [f"# HELP {P}{name} {help_text}", f"# TYPE {P}{name} {kind}"]
        self.lines += [f"{P}{name}{labels} {_number(value)}" for labels, value in samples]


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def render(store: FleetStore, stats: CollectorStats, alerter: Alerter | None = None) -> str:
    """The exposition text for one scrape."""
    out = _Out()
    devices = store.devices()
    online = sum(1 for d in devices if d.online)
    out.family(
        "devices",
        "gauge",
        "Devices by connection state.",
        [(_labels(state="online"), online), (_labels(state="offline"), len(devices) - online)],
    )
    installed: Counter[tuple[str, str]] = Counter()
    for d in devices:
        for model, info in d.models.items():
            active = info.get("active") if isinstance(info, dict) else None
            if active is not None:
                installed[(model, str(active))] += 1
    out.family(
        "model_installed_devices",
        "gauge",
        "Devices running each model version.",
        [(_labels(model=m, version=v), n) for (m, v), n in sorted(installed.items())],
    )

    drift: list[tuple[str, float]] = []
    quality: list[tuple[str, float]] = []
    quality_status: list[tuple[str, float]] = []
    for kind, target in (("drift", drift), ("quality", quality_status)):
        for device, reports in latest_reports(store, kind, None, per_device=1).items():
            latest: dict[str, dict[str, Any]] = {}
            for _at, payload in reports:
                if isinstance(payload.get("model"), str):
                    latest[payload["model"]] = payload
            for model, payload in sorted(latest.items()):
                labels = {"device": device, "model": model, "version": payload.get("version")}
                code = (_DRIFT if kind == "drift" else _QUALITY).get(str(payload.get("status")))
                if code is not None:
                    target.append((_labels(**labels), code))
                if kind == "quality" and isinstance(payload.get("metrics"), dict):
                    for metric, value in sorted(payload["metrics"].items()):
                        if isinstance(value, int | float) and not isinstance(value, bool):
                            quality.append((_labels(**labels, metric=metric), float(value)))
    out.family(
        "drift_status",
        "gauge",
        "Latest drift status per device and model: 0 ok, 1 warning, 2 drift.",
        drift,
    )
    out.family(
        "quality_status",
        "gauge",
        "Latest quality status per device and model: 0 ok, 1 warning, 2 degraded.",
        quality_status,
    )
    out.family(
        "quality_metric",
        "gauge",
        "Latest windowed quality metric per device and model (accuracy, f1, mae, ...).",
        quality,
    )
    out.family(
        "messages_received_total",
        "counter",
        "MQTT messages the collector received.",
        [("", stats.received)],
    )
    out.family(
        "messages_rejected_total",
        "counter",
        "Malformed or hostile messages ignored.",
        [("", stats.rejected)],
    )
    if alerter is not None:
        out.family(
            "reports_received_total",
            "counter",
            "Reports recorded (each counted once), by kind.",
            [(_labels(kind=k), n) for k, n in sorted(alerter.reports.items())],
        )
        out.family(
            "job_outcomes_total",
            "counter",
            "Job execution updates recorded with a final status, by status.",
            [(_labels(status=s), n) for s, n in sorted(alerter.job_outcomes.items())],
        )
        firing = Counter(a.labels.get("alertname", "") for a in alerter.alerts("firing"))
        out.family(
            "alerts_firing",
            "gauge",
            "Alerts firing, by alertname.",
            [(_labels(alertname=n), c) for n, c in sorted(firing.items())],
        )
        out.family(
            "alert_notifications_total",
            "counter",
            "Alert notifications, by outcome.",
            [
                (_labels(outcome=o), getattr(alerter.delivery, o))
                for o in ("sent", "failed", "retries", "dropped")
            ],
        )
    return "\n".join(out.lines) + "\n"


class MetricsServer:
    """Serves ``GET /metrics`` from its own thread; ``port=0`` picks a free one."""

    def __init__(self, text: Callable[[], str], host: str = "127.0.0.1", port: int = 0) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                try:
                    body = text().encode()
                except Exception:
                    log.exception("rendering /metrics failed")
                    self.send_error(500)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.host, self.port = host, int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="edgepack-fleet-metrics", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
