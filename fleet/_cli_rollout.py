"""``edgepack-fleet rollout start | drive | status | list | pause | resume | abort``.

The operator's side of staged rollouts (:mod:`edgepack.fleet._rollout` judges,
:mod:`edgepack.fleet._rollout_controller` acts): ``start`` plans a rollout, records it in the
fleet store and drives it in the foreground until it ends (``--detach``: record only); ``drive``
takes a recorded rollout over (after the first controller stopped or died; its lease must be
free or expired); ``status`` and ``list`` read the store (``--json`` for scripts); ``pause``,
``resume`` and ``abort`` record a request that the controller driving the rollout applies at its
next step. These commands are registered on :data:`edgepack.fleet._cli.cli` and share its
helpers (broker, store, clock, one-line errors).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from edgepack.fleet._cli import _broker, _fail, _key, _now, _store, cli, console, err
from edgepack.fleet.exceptions import RolloutError

__all__: list[str] = []

_STATE_STYLE = {"completed": "green", "aborted": "red", "paused": "yellow", "soaking": "cyan"}


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


class _RolloutGroup(click.Group):
    """``rollout MODEL ...`` is ``rollout start MODEL ...`` (the issue's spelling), unless MODEL
    is one of the subcommands' names."""

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["start", *args]
        return super().resolve_command(ctx, args)


@cli.group(cls=_RolloutGroup)
def rollout() -> None:
    """Staged rollouts that judge the new version by its behaviour and stop by themselves.

    `rollout MODEL ...` is short for `rollout start MODEL ...`.
    """


@contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    stop = threading.Event()
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in saved:
        signal.signal(sig, lambda *_: stop.set())
    try:
        yield stop
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _drive(ctx: click.Context, rollout_id: str, key: Path, poll: float, lease: float) -> None:
    from edgepack.fleet._rollout_controller import BrokerSender, RolloutController, drive

    controller = RolloutController(
        _store(ctx), BrokerSender(_broker(ctx), _key(key)), clock=ctx.obj["clock"],
        lease=dt.timedelta(seconds=lease),
    )  # fmt: skip

    def report(d: Any) -> None:
        console.print(f"{d.at:%H:%M:%S} [bold]{d.action}[/] {escape(d.reason)}", soft_wrap=True)

    def trouble(e: Exception) -> None:
        err.print(f"[yellow]warning:[/] {escape(str(e))}; trying again", soft_wrap=True)

    console.print(f"driving rollout {rollout_id} as {controller.holder} (Ctrl-C leaves it)")
    with _stop_on_signals() as stop:
        try:
            row = drive(controller, rollout_id, wait=stop.wait, poll=poll, report=report,
                        trouble=trouble)  # fmt: skip
        except RolloutError as e:  # another controller holds the lease, or moved it on
            _fail(str(e))
            raise  # unreachable
    _ended(row)


def _ended(row: Any) -> None:
    if row.state == "aborted":
        _fail(f"rollout {row.rollout_id} aborted (see: edgepack-fleet rollout status "
              f"{row.rollout_id})")  # fmt: skip
    if row.state == "completed":
        console.print(f"rollout {row.rollout_id} completed")
    else:
        console.print(f"rollout {row.rollout_id} is {row.state}; continue it with: "
                      f"edgepack-fleet rollout drive {row.rollout_id} --key KEY")  # fmt: skip


_KEY = click.option("--key", required=True, type=click.Path(dir_okay=False, path_type=Path),
                    help="Operator signing key (deploy and rollback commands).")  # fmt: skip
_POLL = click.option("--poll", default=5.0, show_default=True, type=click.FloatRange(min=0.01),
                     help="Seconds between the controller's steps.")  # fmt: skip
_LEASE = click.option("--lease", default=60.0, show_default=True, type=click.FloatRange(min=1),
                      help="Seconds a controller's lease lasts (renewed every step).")  # fmt: skip


@rollout.command()
@click.argument("model")
@click.option("--version", "version", required=True, type=int)
@click.option("--group", required=True, help="The devices the operator assigned to it.")
@click.option(
    "--stages",
    default="1%,10%,50%,100%",
    show_default=True,
    help="Cumulative shares per profile, or devices (cam-1+cam-7), comma-separated.",
)
@click.option(
    "--soak",
    default="10m",
    show_default=True,
    help="How long each stage runs before it is judged (30s, 10m, 1h).",
)
@click.option(
    "--abort-on",
    "conditions",
    multiple=True,
    metavar="CONDITION",
    help="METRIC OP VALUE[x|%], e.g. 'failed>2%', 'p95_latency>1.2x'; repeatable.",
)
@click.option("--no-rollback", is_flag=True, help="On abort, leave upgraded devices as they are.")
@click.option(
    "--job-timeout",
    default="30m",
    show_default=True,
    help="A deploy (or rollback) without a final status by then counts as failed.",
)
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
@click.option("--detach", is_flag=True, help="Record the rollout only; drive it with `drive`.")
@_KEY
@_POLL
@_LEASE
@click.pass_context
def start(
    ctx: click.Context, model: str, version: int, group: str, stages: str, soak: str,
    conditions: tuple[str, ...], no_rollback: bool, job_timeout: str, base_url: str,
    dist: Path | None, detach: bool, key: Path, poll: float, lease: float,
) -> None:  # fmt: skip
    """Roll MODEL --version N out to a group in stages; abort (and roll back) on a condition."""
    from edgepack.fleet._cli_governance import record_build_shipped
    from edgepack.fleet._commands import find_bundles
    from edgepack.fleet._rollout import parse_condition, parse_duration, parse_stages
    from edgepack.fleet._rollout_controller import RolloutSpec, start_rollout

    try:
        for condition in conditions:
            parse_condition(condition)
        spec = RolloutSpec(
            model, version, group, tuple(parse_stages(stages)), {}, parse_duration(soak),
            conditions, not no_rollback, parse_duration(job_timeout),
        )  # fmt: skip
    except RolloutError as e:
        _fail(str(e), 2)
        raise  # unreachable
    _key(key)  # a key that cannot be read fails before anything is recorded
    described: dict[str, Any] = {}  # each bundle's build facts, for the audit trail
    bundles = find_bundles(model, version, base_url, dist, described=described)
    spec = dataclasses.replace(spec, bundles=bundles)
    record_build_shipped(ctx, model, version, described)
    try:
        row = start_rollout(_store(ctx), spec, _now(ctx))
    except RolloutError as e:
        _fail(str(e))
        raise  # unreachable
    console.print(f"rollout [bold]{row.rollout_id}[/]: {model} v{version} → group {group}")
    for decision in _store(ctx).decisions(row.rollout_id):
        console.print(escape(decision.reason), soft_wrap=True)
    if detach:
        console.print(f"drive it: edgepack-fleet rollout drive {row.rollout_id} --key {key}")
        return
    _drive(ctx, row.rollout_id, key, poll, lease)


@rollout.command(name="drive")
@click.argument("rollout_id")
@_KEY
@_POLL
@_LEASE
@click.pass_context
def drive_command(
    ctx: click.Context, rollout_id: str, key: Path, poll: float, lease: float
) -> None:
    """Drive a recorded rollout (take it over after its controller stopped or died)."""
    if _store(ctx).rollout(rollout_id) is None:
        _fail(f"no rollout {rollout_id!r}; list them with `edgepack-fleet rollout list`")
    _drive(ctx, rollout_id, key, poll, lease)


def _summary(store: Any, row: Any, now: dt.datetime) -> dict[str, Any]:
    from edgepack.fleet._rollout_controller import live_figures

    devices = store.rollout_devices(row.rollout_id)
    current = {d.device: d for d in store.devices(row.group)}
    on_new = sum(
        1 for d in devices
        if d.device in current
        and (current[d.device].models.get(row.model) or {}).get("active") == row.version
    )  # fmt: skip
    decisions = store.decisions(row.rollout_id)
    figured = [d for d in decisions if d.figures and "jobs" in d.figures]
    per_stage = []
    for index, stage in enumerate(row.spec["stages"]):
        members = [d for d in devices if d.stage == index]
        per_stage.append({
            "stage": index + 1,
            "share": f"{stage['percent']:g}%" if stage.get("percent") is not None
            else "+".join(stage["devices"]),
            "devices": len(members),
            "statuses": _statuses(store, [d.deploy_job for d in members]),
            "rollbacks": _statuses(store, [d.rollback_job for d in members]),
        })  # fmt: skip
    return {
        "rollout_id": row.rollout_id, "model": row.model, "version": row.version,
        "group": row.group, "state": row.state, "stage": row.stage + 1,
        "stages": len(row.spec["stages"]), "request": row.request,
        "created_at": row.created_at.isoformat(), "updated_at": row.updated_at.isoformat(),
        "conditions": row.spec["conditions"], "soak_s": row.spec["soak_s"],
        "devices": {"total": len(devices), "on_new_version": on_new, "per_stage": per_stage},
        "figures": figured[-1].figures if figured and row.state in ("completed", "aborted")
        else live_figures(store, row, now),
        "decisions": [{"seq": d.seq, "at": d.at.isoformat(), "stage": d.stage + 1,
                       "action": d.action, "reason": d.reason, "figures": d.figures}
                      for d in decisions],
    }  # fmt: skip


def _statuses(store: Any, jobs: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for job in jobs:
        runs = store.executions(job)
        if runs:
            counts[runs[0].status.value] = counts.get(runs[0].status.value, 0) + 1
    return counts


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _print_status(s: dict[str, Any]) -> None:
    style = _STATE_STYLE.get(s["state"], "")
    state = f"[{style}]{s['state']}[/]" if style else s["state"]
    asked = f", {s['request']} requested" if s["request"] else ""
    console.print(f"rollout [bold]{s['rollout_id']}[/]: {s['model']} v{s['version']} → group "
                  f"{s['group']}: {state}{asked}, stage {s['stage']}/{s['stages']}; "
                  f"{s['devices']['on_new_version']} of {s['devices']['total']} devices on "
                  f"v{s['version']}")  # fmt: skip
    table = Table("stage", "share", "devices", "deploys", "rollbacks", title="devices per state")
    for st in s["devices"]["per_stage"]:
        text = ", ".join(f"{k} {v}" for k, v in sorted(st["statuses"].items())) or "-"
        back = ", ".join(f"{k} {v}" for k, v in sorted(st["rollbacks"].items())) or "-"
        table.add_row(str(st["stage"]), st["share"], str(st["devices"]), text, back)
    console.print(table)
    figures = s["figures"] or {}
    if figures.get("new") or figures.get("old"):
        table = Table("figure", f"new (v{s['version']})", "old", title="new vs old version")
        new, old = figures.get("new", {}), figures.get("old", {})
        for name in ("devices", "requests", "error_rate", "p95_latency", "drift_share",
                     "accuracy", "f1", "mae"):  # fmt: skip
            table.add_row(name, _fmt(new.get(name)), _fmt(old.get(name)))
        console.print(table)
    table = Table("time", "stage", "action", "reason", title="decisions")
    for d in s["decisions"]:
        table.add_row(d["at"][11:19], str(d["stage"]), d["action"], escape(d["reason"]))
    console.print(table)


@rollout.command()
@click.argument("rollout_id")
@click.option("--wait", is_flag=True, help="Wait until the rollout ends (exit 1 if it aborted).")
@click.option("--timeout", default=3600.0, show_default=True, help="Seconds to wait at most.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status(ctx: click.Context, rollout_id: str, wait: bool, timeout: float, as_json: bool) -> None:
    """Stage, devices per state, new vs old figures and every decision of a rollout."""
    store = _store(ctx)
    row = store.rollout(rollout_id)
    if row is None:
        _fail(f"no rollout {rollout_id!r}; list them with `edgepack-fleet rollout list`")
    deadline = time.monotonic() + timeout
    while wait and row.state not in ("completed", "aborted"):
        if time.monotonic() > deadline:
            _fail(f"rollout {rollout_id} is still {row.state} after {timeout:g} s")
        time.sleep(1.0)
        row = store.rollout(rollout_id)
    summary = _summary(store, row, _now(ctx))
    if as_json:
        _echo_json(summary)
    else:
        _print_status(summary)
    if wait and row.state == "aborted":
        _fail(f"rollout {rollout_id} aborted")


@rollout.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def list_command(ctx: click.Context, as_json: bool) -> None:
    """Rollouts, newest first."""
    rows = _store(ctx).rollouts()
    if as_json:
        _echo_json([{"rollout_id": r.rollout_id, "model": r.model, "version": r.version,
                     "group": r.group, "state": r.state, "stage": r.stage + 1,
                     "stages": len(r.spec["stages"]), "request": r.request,
                     "created_at": r.created_at.isoformat()} for r in rows])  # fmt: skip
        return
    table = Table("rollout", "model", "version", "group", "state", "stage", "created")
    for r in rows:
        table.add_row(r.rollout_id, r.model, str(r.version), r.group, r.state,
                      f"{r.stage + 1}/{len(r.spec['stages'])}",
                      r.created_at.strftime("%Y-%m-%d %H:%M:%S"))  # fmt: skip
    console.print(table if rows else "no rollouts yet (edgepack-fleet rollout start ...)")


def _request(ctx: click.Context, rollout_id: str, what: str) -> None:
    from edgepack.fleet._rollout_controller import request

    try:
        request(_store(ctx), rollout_id, what)
    except RolloutError as e:
        _fail(str(e))
    console.print(
        f"{what} recorded for rollout {rollout_id}: its controller applies it at its next step "
        f"(none running? edgepack-fleet rollout drive {rollout_id} --key KEY)"
    )


@rollout.command()
@click.argument("rollout_id")
@click.pass_context
def pause(ctx: click.Context, rollout_id: str) -> None:
    """Hold a rollout where it is (jobs already sent still finish)."""
    _request(ctx, rollout_id, "pause")


@rollout.command()
@click.argument("rollout_id")
@click.pass_context
def resume(ctx: click.Context, rollout_id: str) -> None:
    """Continue a paused rollout (a soak it was in starts again)."""
    _request(ctx, rollout_id, "resume")


@rollout.command()
@click.argument("rollout_id")
@click.option("--no-rollback", is_flag=True, help="Leave upgraded devices on the new version.")
@click.pass_context
def abort(ctx: click.Context, rollout_id: str, no_rollback: bool) -> None:
    """Stop a rollout and roll its upgraded devices back."""
    _request(ctx, rollout_id, "abort-no-rollback" if no_rollback else "abort")
