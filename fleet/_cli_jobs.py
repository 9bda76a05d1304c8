"""``edgepack-fleet status | jobs list | jobs show | jobs cancel``: follow and drive jobs.

A job is one signed command (``deploy``, ``rollback``, ``retire``) and its executions, one per
device, as the collector recorded them. ``status ID`` (``jobs show ID`` is the same) shows every
device the job addresses with its execution, and with ``--wait`` follows it until every device is
done; ``jobs list`` shows the newest jobs with their state as a whole (:data:`JOB_STATES`: active,
done, canceled, expired) and how many devices are at each status; ``jobs cancel ID`` signs and
publishes a cancel through :func:`edgepack.fleet._commands.cancel_job`. An unknown job id is an
error (exit 1), as everywhere in ``edgepack-fleet``. The rows come from
:mod:`edgepack.fleet._views`; this module renders them (rich tables, or ``--json`` with the keys
listed in docs/fleet-cli.md). These commands are registered on :data:`edgepack.fleet._cli.cli`,
whose helpers (broker, store, clock, one-line errors) they share.
"""

from __future__ import annotations

import datetime as dt
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from edgepack.fleet._cli import (
    _broker,
    _echo_json,
    _fail,
    _key,
    _legend,
    _now,
    _seconds,
    _store,
    cli,
    console,
    iso,
)
from edgepack.fleet._views import (
    JOB_STATES,
    JobProgress,
    ago,
    job_progress,
    job_state,
    job_summaries,
)

__all__: list[str] = []

STATUS_STYLE = {
    "SUCCEEDED": "green",
    "FAILED": "red",
    "REJECTED": "red",
    "TIMED_OUT": "red",
    "CANCELED": "magenta",
    "IN_PROGRESS": "yellow",
    "QUEUED": "cyan",
}
STATUS_ORDER = (
    "QUEUED",
    "IN_PROGRESS",
    "SUCCEEDED",
    "FAILED",
    "REJECTED",
    "CANCELED",
    "TIMED_OUT",
    "waiting",
)
STATUS_LEGEND = (
    "waiting: addressed, no update yet; before/after: the active version when the job started "
    "and ended (- none); CANCELED: canceled before it started there; TIMED_OUT: past the job's "
    "in-progress timeout (aborted by the device, or silent)"
)
JOBS_LEGEND = (
    "state: active, done (every device finished), canceled, expired (before every device "
    "finished); counts: devices per status (waiting: no update yet)"
)
JOIN_GRACE = 10.0  # seconds `status --wait` allows the collector to record a job just sent


def _job_json(progress: JobProgress, now: dt.datetime) -> dict[str, Any]:
    job, control = progress.job, progress.control
    assert job is not None
    return {
        "job_id": job.job_id,
        "kind": job.kind,
        "model": job.model,
        "version": job.version,
        "target": {"type": job.target_type, "name": job.target},
        "state": job_state(job, control, progress.done, now),
        "done": progress.done,
        "issued_at": iso(job.issued_at),
        "expires_at": iso(job.expires_at),
        "in_progress_timeout_s": None if control is None else control.in_progress_timeout,
        "canceled_at": None if control is None else iso(control.canceled_at),
        "devices": [
            {
                "device": device,
                "status": None if e is None else str(e.status),
                "step": None if e is None else e.step,
                "version_before": None if e is None else e.version_before,
                "version_after": None if e is None else e.version_after,
                "reason": None if e is None else e.reason,
                "seq": None if e is None else e.seq,
                "updated_at": None if e is None else iso(e.updated_at),
            }
            for device, e in progress.devices
        ],
    }


def _status_table(progress: JobProgress, now: dt.datetime) -> Table:
    table = Table(
        "device",
        "status",
        "step",
        "before",
        "after",
        "reason",
        "updated",
        title=f"job {progress.job_id}: {progress.title}",
    )
    for device, e in progress.devices:
        if e is None:
            table.add_row(device, "[dim]waiting[/]", "", "", "", "", "")
            continue
        style = STATUS_STYLE.get(e.status, "")
        table.add_row(
            device,
            f"[{style}]{e.status}[/]",
            e.step or "",
            str(e.version_before if e.version_before is not None else "-"),
            str(e.version_after if e.version_after is not None else "-"),
            escape(e.reason or ""),
            ago(e.updated_at, now),
        )
    return table


def _known(ctx: click.Context, store: Any, job_id: str, wait: bool) -> JobProgress:
    """The job's progress; an unknown id is an error. With ``wait`` the collector gets a few
    seconds to record a job that was only just published."""
    progress = job_progress(store, job_id)
    deadline = time.monotonic() + (JOIN_GRACE if wait else 0.0)
    while progress.job is None and time.monotonic() < deadline:
        time.sleep(0.25)
        progress = job_progress(store, job_id)
    if progress.job is None:
        _fail(
            f"no job {job_id} in store {ctx.obj['store']}; `edgepack-fleet jobs list` shows "
            "the jobs"
        )
    return progress


def _show_status(
    ctx: click.Context, job_id: str, wait: bool, timeout: float, as_json: bool
) -> None:
    store = _store(ctx)
    progress = _known(ctx, store, job_id, wait)
    deadline = time.monotonic() + timeout
    if wait and console.is_terminal and not as_json:
        with Live(
            _status_table(progress, _now(ctx)), console=console, refresh_per_second=4
        ) as live:
            while not progress.done and time.monotonic() < deadline:
                time.sleep(0.5)
                progress = job_progress(store, job_id)
                live.update(_status_table(progress, _now(ctx)))
    else:  # logs, pipes and --json get the final table only
        while wait and not progress.done and time.monotonic() < deadline:
            time.sleep(0.5)
            progress = job_progress(store, job_id)
        if as_json:
            _echo_json(_job_json(progress, _now(ctx)))
        else:
            console.print(_status_table(progress, _now(ctx)))
    if not as_json:
        _legend(STATUS_LEGEND)
    if not wait:
        return
    if not progress.done:
        _fail(f"job {job_id} not finished on every device after {timeout:.0f} s")
    failed = [e for _d, e in progress.devices if e is None or e.status != "SUCCEEDED"]
    sys.exit(1 if failed else 0)


_WAIT = click.option(
    "--wait",
    is_flag=True,
    help="Follow live until every device is done; exit 1 unless every device SUCCEEDED.",
)
_TIMEOUT = click.option(
    "--timeout", default=600.0, show_default=True, help="Seconds to wait at most."
)
_JSON = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


@cli.command()
@click.argument("job_id")
@_WAIT
@_TIMEOUT
@_JSON
@click.pass_context
def status(ctx: click.Context, job_id: str, wait: bool, timeout: float, as_json: bool) -> None:
    """Per-device progress of a job (from the collector's store).

    \b
    waiting: the device is addressed and has not reported yet.
    CANCELED: canceled before it started there; TIMED_OUT: ran past the job's
    in-progress timeout (the device aborted it, or went silent).
    """
    _show_status(ctx, job_id, wait, timeout, as_json)


@cli.group()
def jobs() -> None:
    """List, show and cancel jobs."""


@jobs.command(name="show")
@click.argument("job_id")
@_WAIT
@_TIMEOUT
@_JSON
@click.pass_context
def show(ctx: click.Context, job_id: str, wait: bool, timeout: float, as_json: bool) -> None:
    """The same as `status JOB_ID`."""
    _show_status(ctx, job_id, wait, timeout, as_json)


def _state_filter(value: str | None) -> tuple[str | None, str | None]:
    """(job state, device status) from ``--state``: a job state, or a device status such as
    FAILED (jobs with at least one device at that status)."""
    if value is None:
        return None, None
    if value.lower() in JOB_STATES:
        return value.lower(), None
    if value.upper() in STATUS_ORDER[:-1]:
        return None, value.upper()
    _fail(
        f"--state {value!r} is neither a job state ({', '.join(JOB_STATES)}) nor a device "
        f"status ({', '.join(STATUS_ORDER[:-1])})",
        2,
    )
    raise AssertionError  # unreachable


@jobs.command(name="list")
@click.option("--model", help="Only jobs for this model.")
@click.option(
    "--state",
    metavar="STATE",
    help="A job state (active, done, canceled, expired), or "
    "a device status (e.g. FAILED: jobs with a device at it).",
)
@click.option("--since", metavar="AGE", help="Only jobs issued in the last AGE (2h, 3d, 30m).")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=1))
@_JSON
@click.pass_context
def list_jobs(
    ctx: click.Context,
    model: str | None,
    state: str | None,
    since: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """The newest jobs: what they ask, their state, and devices per status."""
    wanted_state, device_status = _state_filter(state)
    now = _now(ctx)
    after = None if since is None else now - dt.timedelta(seconds=_seconds(since, "--since"))
    store = _store(ctx)
    found = job_summaries(
        store, now, model=model, since=after, limit=limit if not state else limit * 10
    )
    found = [
        s
        for s in found
        if (wanted_state is None or s.state == wanted_state)
        and (device_status is None or s.counts.get(device_status))
    ][:limit]
    if as_json:
        _echo_json(
            [
                {
                    "job_id": s.job.job_id,
                    "kind": s.job.kind,
                    "model": s.job.model,
                    "version": s.job.version,
                    "target": {"type": s.job.target_type, "name": s.job.target},
                    "state": s.state,
                    "counts": s.counts,
                    "issued_at": iso(s.job.issued_at),
                    "expires_at": iso(s.job.expires_at),
                    "in_progress_timeout_s": None
                    if s.control is None
                    else s.control.in_progress_timeout,
                    "canceled_at": None if s.control is None else iso(s.control.canceled_at),
                }
                for s in found
            ]
        )
        return
    if not found:
        console.print(
            "no jobs match"
            if (model or state or since)
            else "no jobs recorded yet (is the collector running?)"
        )
        return
    table = Table("job", "kind", "model", "version", "target", "issued", "state", "devices")
    for s in found:
        counts = ", ".join(
            f"[{STATUS_STYLE.get(name, 'dim')}]{s.counts[name]} {name}[/]"
            for name in STATUS_ORDER
            if s.counts.get(name)
        )
        table.add_row(
            s.job.job_id,
            s.job.kind,
            s.job.model,
            "-" if s.job.version is None else str(s.job.version),
            f"{s.job.target_type} {s.job.target}",
            ago(s.job.issued_at, now),
            s.state,
            counts or "-",
        )
    console.print(table)
    _legend(JOBS_LEGEND)


@jobs.command()
@click.argument("job_id")
@click.option(
    "--key",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Operator signing key (devices verify the cancel like any command).",
)
@_JSON
@click.pass_context
def cancel(ctx: click.Context, job_id: str, key: Path, as_json: bool) -> None:
    """Cancel JOB_ID: withdraw its retained command; devices that have not started it report
    CANCELED. Devices that finished it keep their status."""
    from edgepack.fleet._commands import cancel_job
    from edgepack.fleet.exceptions import JobError

    store = _store(ctx)
    try:
        done = cancel_job(_broker(ctx), store, _key(key), job_id, clock=ctx.obj["clock"])
    except JobError as e:
        _fail(str(e))
        raise  # unreachable
    if as_json:
        _echo_json(
            {
                "job_id": done.job_id,
                "cancel_job_id": done.cancel_job_id,
                "topic": done.topic,
                "retained": done.retained,
                "unstarted": done.unstarted,
                "started": done.started,
            }
        )
        return
    where = "replaced its retained command" if done.retained else "a newer command is retained"
    console.print(
        f"job [bold]{job_id}[/] canceled by {done.cancel_job_id} on {done.topic} ({where})"
    )
    console.print(
        f"not started (now CANCELED): {', '.join(done.unstarted) or 'none'}; "
        f"started or finished (unchanged): {', '.join(done.started) or 'none'}"
    )
    console.print(f"watch it: edgepack-fleet status {job_id}")
