"""``edgepack-fleet``: deploy, roll back and retire models on devices, and watch the fleet.

Commands: ``serve`` (bundles over HTTP), ``deploy``, ``rollback``, ``retire`` (signed commands
over MQTT; no collector needed), ``collector`` (keeps fleet state in a store), ``telemetry``,
``drift``, ``report`` (read that store); ``status`` and ``jobs list|show|cancel`` are in
edgepack.fleet._cli_jobs; ``devices`` (and ``devices assign|unassign``), ``acl`` and ``trust``
in edgepack.fleet._cli_access. A store path that does not exist is an error, except for the
commands that create stores (``collector``, ``devices assign|unassign``, ``trust publish``).
Every listing and status command takes ``--json`` (stable keys, times in ISO 8601 UTC, listed
in docs/fleet-cli.md) and prints a legend for the glyphs of its table under it.

Broker and store come from ``--broker``/``--store`` or the
``EDGEPACK_BROKER``/``EDGEPACK_STORE`` environment variables. Errors are one red ``error:`` line
and exit code 1 (2 for bad usage).

``telemetry``, ``drift`` and ``report`` read the collector's store through edgepack.fleet._views
(the rows) and edgepack.fleet._report (the HTML page); this module only renders them. Ages ("12m
ago") and report times come from the clock in click's context object (``obj={"clock": ...}``, an
:data:`edgepack._clock.Clock`; default: the wall clock), so tests fix it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgepack._clock import Clock, utc_now
from edgepack.errors import StorageError
from edgepack.formats.exceptions import EdgepackError, KeyFormatError
from edgepack.formats.keys import load_private_key, load_public_key

__all__ = ["main"]

_WIDTH = None if sys.stdout.isatty() else 160
console = Console(highlight=False, width=_WIDTH)
err = Console(stderr=True, highlight=False, width=_WIDTH)


def _fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    sys.exit(code)


def _now(ctx: click.Context) -> dt.datetime:
    """The current moment, from the context's clock (see the module docstring)."""
    clock: Clock = ctx.obj["clock"]
    return clock()


def _broker(ctx: click.Context) -> Any:
    from edgepack.fleet._broker import BrokerOptions

    o = ctx.obj
    return BrokerOptions.parse(
        o["broker"],
        prefix=o["prefix"],
        protocol=o["protocol"],
        username=o["username"] or "",
        password_file=o["password_file"] or "",
        tls=bool(o["ca_file"] or o["tls"]),
        ca_file=o["ca_file"] or "",
        cert_file=o["cert_file"] or "",
        key_file=o["client_key"] or "",
    )


def _store(ctx: click.Context, create: bool = False) -> Any:
    """The fleet store named by ``--store``. Only commands that must be able to start a store
    (the collector, the operator's own records) pass ``create``: for every other command a
    SQLite path that does not exist is a typo, not a new empty fleet."""
    from edgepack.fleet._database import StoreError, open_store

    url = str(ctx.obj["store"])
    if not create and not re.match(r"^(postgres|postgresql)://", url):
        path = Path(url.removeprefix("sqlite://")).expanduser()
        if not path.exists():
            _fail(
                f"no fleet store at {path}: check --store (or EDGEPACK_STORE); the collector "
                "creates the store (edgepack-fleet collector --store PATH)"
            )
    try:
        return open_store(ctx.obj["store"])
    except StoreError as e:
        _fail(str(e))
        raise  # unreachable


def _key(path: Path) -> Any:
    try:
        return load_private_key(path.read_bytes(), source=str(path))
    except OSError as e:
        raise KeyFormatError(f"cannot read signing key {path}: {e.strerror or e}") from e


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_MAX_SECONDS = 36500 * 86400  # a century


def _seconds(text: str, what: str) -> int:
    """A duration such as ``90s``, ``30m``, ``2h`` or ``3d`` (a bare number: seconds)."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", text)
    if match is None or int(match[1]) == 0:
        _fail(f"{what} {text!r} is not a duration such as 90s, 30m, 2h or 3d", 2)
        raise AssertionError  # unreachable
    seconds = int(match[1]) * _UNITS[match[2] or "s"]
    if seconds > _MAX_SECONDS:  # no time or signed field holds more
        _fail(f"{what} {text!r} is longer than {_MAX_SECONDS // 86400} days", 2)
    return seconds


def _target(device: str | None, group: str | None) -> dict[str, str]:
    if bool(device) == bool(group):
        _fail("name exactly one target: --device ID or --group NAME", 2)
    return {"device": device} if device else {"group": group}  # type: ignore[dict-item]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--broker",
    envvar="EDGEPACK_BROKER",
    default="127.0.0.1:1883",
    show_default=True,
    help="MQTT broker HOST[:PORT].",
)
@click.option("--prefix", envvar="EDGEPACK_PREFIX", default="edgepack/v1", show_default=True)
@click.option("--protocol", type=click.Choice(["5", "3.1.1"]), default="5", show_default=True)
@click.option(
    "--store",
    envvar="EDGEPACK_STORE",
    default="fleet.db",
    show_default=True,
    help="Collector store: a SQLite file or postgresql://...",
)
@click.option("--username", envvar="EDGEPACK_MQTT_USERNAME")
@click.option("--password-file", type=click.Path(dir_okay=False))
@click.option("--tls", is_flag=True, help="Use TLS with the system CAs.")
@click.option("--ca-file", type=click.Path(dir_okay=False), help="CA bundle (implies --tls).")
@click.option("--cert-file", type=click.Path(dir_okay=False), help="Client certificate (mTLS).")
@click.option("--client-key", type=click.Path(dir_okay=False), help="Client key (mTLS).")
@click.option("-v", "--verbose", is_flag=True)
@click.pass_context
def cli(ctx: click.Context, verbose: bool, **options: Any) -> None:
    """Deploy, roll back and retire models on edge devices over MQTT."""
    ctx.obj = {"clock": utc_now, **(ctx.obj or {}), **options}  # obj may bring a clock (tests)
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
def serve(directory: Path, host: str, port: int) -> None:
    """Serve the bundles in DIRECTORY over HTTP (with resumable downloads)."""
    from edgepack.fleet._bundle_server import BundleServer

    if not directory.is_dir():
        _fail(f"{directory} is not a directory", 2)
    server = BundleServer(directory, host=host, port=port).start()
    console.print(f"serving {directory} at {server.url}/ (Ctrl-C to stop)")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop()


def _send(
    ctx: click.Context, kind: str, model: str, target: dict[str, str], key: Path,
    build: dict[str, dict[str, Any]] | None = None, **kwargs: Any,
) -> None:  # fmt: skip
    from edgepack.fleet._cli_governance import record_build_shipped, record_issued
    from edgepack.fleet._commands import publish_command

    if build:  # the audit trail: the build before the command that ships it
        record_build_shipped(ctx, model, kwargs["version"], build)
    published = publish_command(_broker(ctx), kind, model, target, _key(key), **kwargs)
    record_issued(ctx, published)
    where = f"device {target['device']}" if "device" in target else f"group {target['group']}"
    console.print(f"{kind} {model} → {where}: job [bold]{published.job_id}[/]")
    if published.bundles:
        table = Table("profile", "bundle", "size", "sha256")
        for profile, entry in sorted(published.bundles.items()):
            table.add_row(profile, entry["url"], f"{entry['size']:,}", entry["sha256"][:16] + "…")
        console.print(table)
    console.print(f"watch it: edgepack-fleet status {published.job_id} --wait")


@cli.command()
@click.argument("model")
@click.option("--version", "version", required=True, type=int)
@click.option("--device")
@click.option("--group")
@click.option(
    "--bundles",
    "base_url",
    required=True,
    help="Base URL the devices download bundles from (e.g. http://host:8000/).",
)
@click.option(
    "--dist",
    type=click.Path(file_okay=False, path_type=Path),
    help="Local copy of the bundles: hash them here instead of downloading each one.",
)
@click.option(
    "--key",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Operator signing key.",
)
@click.option(
    "--ttl-hours",
    default=168,
    show_default=True,
    type=int,
    help="The command expires after this long.",
)
@click.option(
    "--in-progress-timeout",
    "in_progress_timeout",
    metavar="DURATION",
    help="Bound each device's run of the job (30m, 2h, 90s): past it the device aborts, "
    "keeps what was installed and reports TIMED_OUT.",
)
@click.pass_context
def deploy(
    ctx: click.Context,
    model: str,
    version: int,
    device: str | None,
    group: str | None,
    base_url: str,
    dist: Path | None,
    key: Path,
    ttl_hours: int,
    in_progress_timeout: str | None,
) -> None:
    """Deploy MODEL --version N to a device or a group."""
    from edgepack.fleet._commands import find_bundles

    target = _target(device, group)
    timeout = None if in_progress_timeout is None else _seconds(in_progress_timeout, "timeout")
    described: dict[str, dict[str, Any]] = {}  # each bundle's build facts, for the audit trail
    bundles = find_bundles(model, version, base_url, dist, described=described)
    _send(
        ctx,
        "deploy",
        model,
        target,
        key,
        described,
        version=version,
        bundles=bundles,
        ttl=dt.timedelta(hours=ttl_hours),
        in_progress_timeout=timeout,
    )


def _simple_command(kind: str, help_text: str) -> None:
    """Register ``rollback``/``retire``: a model, one target, the operator key."""

    @cli.command(name=kind, help=help_text)
    @click.argument("model")
    @click.option("--device")
    @click.option("--group")
    @click.option(
        "--key",
        required=True,
        type=click.Path(dir_okay=False, path_type=Path),
        help="Operator signing key.",
    )
    @click.pass_context
    def command(
        ctx: click.Context, model: str, device: str | None, group: str | None, key: Path
    ) -> None:
        _send(ctx, kind, model, _target(device, group), key)


_simple_command(
    "rollback", "Roll MODEL back to the retained previous version on a device or a group."
)
_simple_command("retire", "Uninstall MODEL from a device or a group.")


@cli.command()
@click.option("--share", help="Shared-subscription name, to run several collectors together.")
@click.option(
    "--client-id",
    help="MQTT client id (its session persists across restarts); give "
    "each collector instance its own. Default: edgepack-collector-HOST[-SHARE].",
)
@click.option(
    "--command-key",
    "command_keys",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Operator public key(s): record only commands they signed.",
)
@click.option(
    "--root-key",
    "root_keys",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Offline root public key(s): record (and hand on) only trust documents they signed.",
)
@click.option(
    "--alert-webhook",
    "alert_webhooks",
    multiple=True,
    metavar="URL",
    help="POST alerts (Alertmanager webhook JSON) to URL; repeatable. See docs/alerts.md.",
)
@click.option(
    "--alert-state",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Keep alert state (de-duplication across restarts) in this SQLite file instead of "
    "the fleet store's alerts table.",
)
@click.option(
    "--alert-repeat",
    type=click.FloatRange(min=0.01),
    default=4.0,
    show_default=True,
    help="Hours before a still-firing alert is sent again.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    help="Serve fleet-level Prometheus /metrics on this port (off by default).",
)
@click.option(
    "--metrics-host", default="127.0.0.1", show_default=True, help="Address for /metrics."
)
@click.option(
    "--job-grace",
    type=click.FloatRange(min=0),
    default=300.0,
    show_default=True,
    help="Seconds past a job's in-progress timeout before a silent device is marked TIMED_OUT.",
)
@click.option(
    "--policies",
    "policy_file",
    type=click.Path(dir_okay=False, path_type=Path, exists=True),
    help="Retirement and remediation rules (TOML) to evaluate; see docs/governance.md.",
)
@click.option(
    "--policy-key",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Operator signing key for rollbacks the policies send without approval.",
)
@click.option(
    "--policy-interval",
    type=click.FloatRange(min=0.1),
    default=60.0,
    show_default=True,
    help="Seconds between two evaluations of the policies.",
)
@click.pass_context
def collector(
    ctx: click.Context,
    share: str | None,
    client_id: str | None,
    command_keys: tuple[Path, ...],
    root_keys: tuple[Path, ...],
    alert_webhooks: tuple[str, ...],
    alert_state: Path | None,
    alert_repeat: float,
    metrics_port: int | None,
    metrics_host: str,
    job_grace: float,
    policy_file: Path | None,
    policy_key: Path | None,
    policy_interval: float,
) -> None:
    """Run the collector: keep device state and job progress in the store."""
    from edgepack.fleet._alerts import Alerter, WebhookSender
    from edgepack.fleet._collector import Collector

    store = _store(ctx, create=True)
    alerter = Alerter(
        alert_state or store,
        [WebhookSender(url) for url in alert_webhooks],
        repeat_interval=dt.timedelta(hours=alert_repeat),
    )

    keys = [load_public_key(p.read_bytes(), source=str(p)) for p in command_keys] or None
    roots = [load_public_key(p.read_bytes(), source=str(p)) for p in root_keys] or None
    policies = None
    if policy_file is not None:
        from edgepack.fleet._cli_policy import policy_engine

        policies = policy_engine(ctx, store, policy_file, policy_key)
    elif policy_key is not None:
        _fail("--policy-key signs the rollbacks of --policies FILE: give the policy file too", 2)
    running = Collector(
        _broker(ctx),
        store,
        share=share,
        command_keys=keys,
        root_keys=roots,
        client_id=client_id,
        alerter=alerter,
        job_grace=job_grace,
        policies=policies,
        policy_interval=policy_interval,
    ).start()
    console.print(f"collector running: broker {ctx.obj['broker']}, store {ctx.obj['store']}")
    metrics = None
    if metrics_port is not None:
        from edgepack.fleet._metrics import MetricsServer, render

        store = running.store
        metrics = MetricsServer(
            lambda: render(store, running.stats, alerter), metrics_host, metrics_port
        ).start()
        console.print(f"fleet metrics on {metrics.url}")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(60):
        alerter.repeat_due()
    running.stop()
    if metrics is not None:
        metrics.stop()
    alerter.close()
    console.print(f"collector stopped: {running.stats}")


@cli.command()
@click.option(
    "--alert-state",
    type=click.Path(dir_okay=False, path_type=Path, exists=True),
    help="The collector's own alert state file, if it ran with --alert-state "
    "(default: the fleet store).",
)
@click.option("--firing", is_flag=True, help="Only alerts still firing.")
@click.option("--json", "as_json", is_flag=True, help="JSON (Alertmanager alert objects).")
@click.pass_context
def alerts(ctx: click.Context, alert_state: Path | None, firing: bool, as_json: bool) -> None:
    """Alerts the collector has fired (drift, quality, health check, failed jobs)."""
    from edgepack.fleet._alerts import Alerter

    alerter = Alerter(alert_state if alert_state is not None else _store(ctx))
    try:
        found = alerter.alerts("firing" if firing else None)
    finally:
        alerter.close()
    if as_json:
        click.echo(json.dumps([a.to_json() for a in found], indent=2))
        return
    table = Table("status", "alert", "device", "model", "version", "severity", "since", "ended")
    for a in found:
        version = a.labels.get("version") or a.annotations.get("version", "")
        table.add_row(
            a.status, a.labels.get("alertname", ""), a.labels.get("device", ""),
            a.labels.get("model", ""), version, a.labels.get("severity", ""),
            a.starts_at.strftime("%Y-%m-%d %H:%M:%S"),
            "" if a.ends_at is None else a.ends_at.strftime("%Y-%m-%d %H:%M:%S"),
        )  # fmt: skip
    console.print(table if found else "no alerts")


_DRIFT_STYLE = {"ok": "green", "warning": "yellow", "drift": "bold red"}
TELEMETRY_LEGEND = (
    "p95 trend: p95 latency of the last reports, oldest first, ▁ lowest … █ highest of them "
    "(all ▄: flat); errors in red"
)
DRIFT_LEGEND = (
    "trend: last windows, oldest first (· ok, ! warning, ✗ drift); worst / thr: KS over its "
    "threshold (red: above); joint: all features together; quality: ~ an estimate"
)


def iso(moment: dt.datetime | None) -> str | None:
    """A time for ``--json``: ISO 8601 in UTC, to the second; None stays null."""
    if moment is None:
        return None
    return moment.astimezone(dt.timezone.utc).replace(microsecond=0).isoformat()


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


def _legend(text: str) -> None:
    """The key to a table's glyphs, printed under it (dim)."""
    console.print(f"[dim]{escape(text)}[/]", soft_wrap=True)


@cli.command()
@click.option("--group", help="Only devices in this group.")
@click.option("--model", help="Only this model.")
@click.option("--version", "version", type=int, help="Only this model version.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def telemetry(
    ctx: click.Context, group: str | None, model: str | None, version: int | None, as_json: bool
) -> None:
    """Latest telemetry per device and model version: requests, errors, latency, memory.

    \b
    p95 trend: the p95 latency of the last reports, oldest first, as bars
    ▁▂▃▄▅▆▇█ scaled between their own lowest and highest (all ▄: flat).
    """
    from edgepack.fleet._views import ago, milliseconds, sparkline, telemetry_rows

    rows = telemetry_rows(_store(ctx), group=group, model=model, version=version)
    now = _now(ctx)
    if as_json:
        _echo_json([
            {"device": r.device, "model": r.model, "version": r.version,
             "requests": r.requests, "errors": r.errors, "p50_ms": r.p50, "p95_ms": r.p95,
             "p99_ms": r.p99, "rss_mib": r.rss_mib, "p95_trend_ms": r.trend,
             "last_seen": iso(r.seen)}
            for r in rows
        ])  # fmt: skip
        return
    table = Table("device", "model", "version", "requests", "errors", "p50 ms", "p95 ms")
    table.add_column("p99 ms")
    table.add_column("RSS MiB")
    table.add_column("p95 trend")
    table.add_column("last seen")
    for column in table.columns[3:9]:
        column.justify = "right"
    for r in rows:
        errors = sum(r.errors.values())
        table.add_row(
            escape(r.device),
            escape(r.model),
            escape(str(r.version)),
            f"{r.requests:,}",
            f"[red]{errors:,}[/]" if errors else "0",
            milliseconds(r.p50),
            milliseconds(r.p95),
            milliseconds(r.p99),
            "-" if r.rss_mib is None else f"{r.rss_mib:.1f}",
            sparkline(r.trend),
            ago(r.seen, now),
        )
    if not rows:
        console.print("no telemetry reports yet (is the collector running?)")
        return
    console.print(table)
    _legend(TELEMETRY_LEGEND)


@cli.command()
@click.option("--group", help="Only devices in this group.")
@click.option("--model", help="Only this model.")
@click.option("--version", "version", type=int, help="Only this model version.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def drift(
    ctx: click.Context, group: str | None, model: str | None, version: int | None, as_json: bool
) -> None:
    """Latest drift window per device and model: status, drifting features, trend.

    \b
    trend: the statuses of the last windows, oldest first: · ok, ! warning, ✗ drift.
    worst / thr: the feature furthest over its threshold, KS/threshold (red: above).
    joint: all features together, the statistic furthest over its threshold.
    quality: the latest quality report; ~ marks an estimate (no labels).
    """
    from edgepack.fleet._views import (
        STATUS_GLYPHS,
        ago,
        drift_rows,
        latest_quality,
        multivariate_text,
        quality_text,
    )

    store = _store(ctx)
    rows = drift_rows(store, group=group, model=model, version=version)
    quality = latest_quality(store, group)
    now = _now(ctx)
    if as_json:
        _echo_json([
            {"device": r.device, "model": r.model, "version": r.version, "status": r.status,
             "rows": r.n, "window_end": iso(r.window_end), "drifting": r.drifting,
             "alarms": r.alarms,
             "worst": None if r.worst is None else {
                 "feature": r.worst, "ks": r.worst_ks, "threshold": r.worst_threshold},
             "joint": multivariate_text(r.payload),
             "quality": quality_text(quality.get((r.device, r.model))),
             "history": r.history, "received_at": iso(r.seen)}
            for r in rows
        ])  # fmt: skip
        return
    table = Table("device", "model", "version", "status", "window", "drifting", "worst / thr")
    table.add_column("joint")
    table.add_column("quality")
    table.add_column("trend")
    for r in rows:
        style = _DRIFT_STYLE.get(r.status, "")
        worst = "-" if r.worst_text is None else escape(r.worst_text)
        worst = f"[red]{worst}[/]" if (r.worst_ratio or 0) > 1 else worst
        trend = "".join(
            f"[{_DRIFT_STYLE.get(s, 'dim')}]{escape(STATUS_GLYPHS.get(s, '?'))}[/]"
            for s in r.history
        )
        table.add_row(
            escape(r.device),
            escape(r.model),
            escape(str(r.version)),
            f"[{style}]{escape(r.status)}[/]" if style else escape(r.status),
            f"{r.n:,} rows, {ago(r.window_end, now)}",
            escape(", ".join(r.drifting)) or "-",
            worst,
            escape(multivariate_text(r.payload) or "-"),
            escape(quality_text(quality.get((r.device, r.model))) or "-"),
            trend,
        )
    if not rows:
        console.print("no drift reports yet (is the collector running?)")
        return
    console.print(table)
    _legend(DRIFT_LEGEND)


@cli.command()
@click.option("--model", required=True, help="The model to report on.")
@click.option("--group", help="Only devices in this group.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="HTML file to write (default: report-MODEL.html).",
)
@click.option("--hours", type=click.FloatRange(min=0, min_open=True), help="Only the last H hours.")
@click.pass_context
def report(
    ctx: click.Context, model: str, group: str | None, out: Path | None, hours: float | None
) -> None:
    """Write one self-contained HTML report on MODEL: drift, latency, versions."""
    from edgepack.fleet._report import default_path, write_report

    now = _now(ctx)
    since = now - dt.timedelta(hours=hours) if hours else None
    try:
        path = write_report(
            _store(ctx), model, out or default_path(model), group=group, since=since, now=now
        )
    except StorageError as e:
        _fail(str(e))
        raise  # unreachable
    console.print(str(path), soft_wrap=True)


# devices (assign, unassign), acl, trust, status and jobs register themselves on `cli` (they use
# the helpers above, so they are imported once this module is complete).
from edgepack.fleet import (  # noqa: E402, F401
    _cli_access,
    _cli_console,
    _cli_experiment,
    _cli_governance,
    _cli_jobs,
    _cli_policy,
    _cli_rollout,
)


def main() -> None:
    """Console-script entry point."""
    try:
        cli(standalone_mode=True)
    except EdgepackError as e:
        _fail(str(e))
    except ValueError as e:
        _fail(str(e), 2)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
