"""``edgepack-fleet experiment start | promote | stop | status | list``: A/B on the devices.

``start`` signs and publishes an ``experiment`` command (edgepack.fleet._experiments) that makes
each targeted device install the candidate version beside its active one, in its shadow
(``--mode shadow --sample 20%``: run on a share of requests, never answering) or on a split
(``--mode split --share 10%``: answering that share, sticky per caller). ``promote`` makes the
candidate the active version through the device's journaled install (the old one is retained:
``rollback`` returns to it); ``stop`` removes the candidate. ``status`` and ``list`` compare the
variants per device and fleet-wide from the collector's store; ``--json`` for scripts. These
commands are registered on :data:`edgepack.fleet._cli.cli` and share its helpers.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from edgepack.fleet._cli import _broker, _fail, _key, _now, _store, _target, cli, console
from edgepack.formats.commands import ExperimentAction, ExperimentMode, ExperimentSpec

__all__: list[str] = []

_KEY = click.option(
    "--key",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Operator signing key.",
)


def share_value(text: str | None, what: str) -> float | None:
    """``10%``, ``0.1`` or ``10`` (read as percent when above 1) as a fraction in (0, 1]."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(%?)\s*", text)
    if not match:
        _fail(f"{what} must be a share such as 10% or 0.1, not {text!r}", 2)
        raise AssertionError  # unreachable
    value = float(match[1])
    if match[2] or value > 1:
        value /= 100
    if not 0 < value <= 1:
        _fail(f"{what} must be above 0% and at most 100%, not {text!r}", 2)
    return value


def _published(kind: str, model: str, target: dict[str, str], job_id: str) -> None:
    where = f"device {target['device']}" if "device" in target else f"group {target['group']}"
    console.print(f"experiment {kind} {model} → {where}: job [bold]{job_id}[/]")
    console.print(f"watch it: edgepack-fleet status {job_id} --wait")


@cli.group()
def experiment() -> None:
    """A/B tests on the devices: a candidate version in the shadow or on a split."""


@experiment.command()
@click.argument("model")
@click.option("--version", "version", required=True, type=int, help="The candidate version.")
@click.option("--mode", type=click.Choice(["shadow", "split"]), required=True)
@click.option("--share", help="split: the share of requests the candidate answers (10%).")
@click.option("--sample", help="shadow: the share of requests it also runs on (default --share).")
@click.option("--device")
@click.option("--group")
@click.option("--bundles", "base_url", required=True, help="Base URL devices download from.")
@click.option(
    "--dist",
    type=click.Path(file_okay=False, path_type=Path),
    help="Local copy of the bundles: hash them here instead of downloading each one.",
)
@_KEY
@click.option("--ttl-hours", default=168, show_default=True, type=int)
@click.pass_context
def start(
    ctx: click.Context,
    model: str,
    version: int,
    mode: str,
    share: str | None,
    sample: str | None,
    device: str | None,
    group: str | None,
    base_url: str,
    dist: Path | None,
    key: Path,
    ttl_hours: int,
) -> None:
    """Install MODEL --version N beside the active version and run the experiment."""
    from edgepack.fleet._cli_governance import record_build_shipped
    from edgepack.fleet._commands import find_bundles
    from edgepack.fleet._experiments import publish_experiment

    target = _target(device, group)
    share_f, sample_f = share_value(share, "--share"), share_value(sample, "--sample")
    if mode == "split":
        if share_f is None:
            _fail("a split needs --share (the share of requests the candidate answers)", 2)
        if sample_f is not None:
            _fail("--sample is for a shadow (a split's candidate answers its --share)", 2)
        spec = ExperimentSpec(ExperimentAction.START, ExperimentMode.SPLIT, share=share_f)
    else:
        sample_f = sample_f or share_f
        if sample_f is None:
            _fail("a shadow needs --sample (the share of requests the candidate runs on)", 2)
        spec = ExperimentSpec(ExperimentAction.START, ExperimentMode.SHADOW, sample=sample_f)
    described: dict[str, Any] = {}  # each bundle's build facts, for the audit trail
    bundles = find_bundles(model, version, base_url, dist, described=described)
    record_build_shipped(ctx, model, version, described)
    published = publish_experiment(
        _broker(ctx), model, target, _key(key), spec, version=version, bundles=bundles,
        ttl=dt.timedelta(hours=ttl_hours),
    )  # fmt: skip
    _published("start", model, target, published.job_id)


@experiment.command()
@click.argument("model")
@click.option(
    "--version",
    "version",
    type=int,
    help="The candidate (default: the latest start on the same --device or --group).",
)
@click.option("--device")
@click.option("--group")
@_KEY
@click.pass_context
def promote(
    ctx: click.Context,
    model: str,
    version: int | None,
    device: str | None,
    group: str | None,
    key: Path,
) -> None:
    """Make the candidate of MODEL the active version (the old one is kept for a rollback)."""
    from edgepack.fleet._experiments import latest_start, publish_experiment

    target = _target(device, group)
    if version is None:
        started = latest_start(_store(ctx), model, target)
        if started is None or started[1] is None:
            where = " ".join(f"{k} {v}" for k, v in target.items())
            _fail(f"no experiment on {model} for {where} is recorded in the store; name --version",
                  1)  # fmt: skip
            raise AssertionError  # unreachable
        version = started[1]
    spec = ExperimentSpec(ExperimentAction.PROMOTE)
    published = publish_experiment(_broker(ctx), model, target, _key(key), spec, version=version)
    _published("promote", model, target, published.job_id)


@experiment.command()
@click.argument("model")
@click.option("--device")
@click.option("--group")
@_KEY
@click.pass_context
def stop(ctx: click.Context, model: str, device: str | None, group: str | None, key: Path) -> None:
    """End the experiment on MODEL: the candidate is removed, the active version serves alone."""
    from edgepack.fleet._experiments import publish_experiment

    target = _target(device, group)
    spec = ExperimentSpec(ExperimentAction.STOP)
    published = publish_experiment(_broker(ctx), model, target, _key(key), spec)
    _published("stop", model, target, published.job_id)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _error(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _show(ctx: click.Context, model: str | None, group: str | None, as_json: bool) -> None:
    from edgepack.fleet._experiments import experiment_rows, latest_start, rows_json
    from edgepack.fleet._views import ago

    store = _store(ctx)
    if model is not None and latest_start(store, model) is None:
        _fail(f"no experiment on {model} is recorded in the store (experiment start starts one)")
    rows = experiment_rows(store, model, group)
    if as_json:
        click.echo(json.dumps(rows_json(rows), indent=2, sort_keys=True))
        return
    if not rows:
        where = f" on {model}" if model else ""
        console.print(f"no experiment{where} has reported yet (is the collector running?)")
        return
    now = _now(ctx)
    table = Table(
        "device", "model", "mode", "variant", "version", "requests", "errors", "p50 ms",
        "p95 ms", "agreement", "output error", "drift", "quality", "last report",
    )  # fmt: skip
    for r in rows:
        plan = f"{r.mode} {_pct(r.share if r.mode == 'split' else r.sample)}"
        if not r.running:
            plan += " (ended)"
        device = escape(r.device if r.devices == 1 else f"{r.device} ×{r.devices}")
        for variant, figures in (("active", r.active), ("candidate", r.candidate)):
            shadow = r.shadow if variant == "candidate" else None
            requests: Any = figures.requests
            p50, p95 = figures.p50_ms, figures.p95_ms
            if shadow is not None:  # the candidate answered nothing: its shadow runs
                requests = f"{shadow.compared} shadow"
                if shadow.dropped:
                    requests += f" ({shadow.dropped} dropped)"
                p50, p95 = shadow.p50_ms, shadow.p95_ms
            table.add_row(
                device if variant == "active" else "",
                escape(r.model) if variant == "active" else "",
                plan if variant == "active" else "",
                variant,
                str(figures.version),
                str(requests),
                str(figures.errors if shadow is None else shadow.errors),
                _ms(p50),
                _ms(p95),
                _pct(shadow.agreement) if shadow else "-",
                _error(shadow.mean_abs_error if shadow else None),
                escape(figures.drift or "-"),
                escape(figures.quality or "-"),
                ago(r.last_report, now) if variant == "active" else "",
            )
    console.print(table)
    console.print(
        "agreement: the share of shadow rows whose label equals the active version's; output "
        "error: mean absolute difference of the probabilities (or of a regressor's output); "
        "p50/p95 of a shadow candidate: its own compute time. Fleet rows sum the devices "
        "that run the same plan, one row per plan (latency: request-weighted mean of their "
        "percentiles)."
    )


@experiment.command()
@click.argument("model")
@click.option("--group", help="Only devices in this group.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status(ctx: click.Context, model: str, group: str | None, as_json: bool) -> None:
    """Compare the variants of MODEL's latest experiment, per device and fleet-wide."""
    _show(ctx, model, group, as_json)


@experiment.command(name="list")
@click.option("--group", help="Only devices in this group.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def list_(ctx: click.Context, group: str | None, as_json: bool) -> None:
    """Every model's latest experiment, per device and fleet-wide."""
    _show(ctx, None, group, as_json)
