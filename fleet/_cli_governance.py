"""``edgepack-fleet audit | models``: the audit trail and the model index, for operators.

``audit`` lists and filters the hash-chained audit trail (:mod:`edgepack.fleet._audit`) by
model, device, key, kind and time, as a table, ``--json``, or a JSON Lines export of every
matching entry (``--export FILE.jsonl``); ``audit verify`` checks every hash, link and recorded
command signature and exits 1 naming the first entry altered, removed or reordered; ``audit
record-build DIR`` records the bundles of a build directory. ``models`` is the model index
(:mod:`edgepack.fleet._model_index`) and ``models show NAME`` one model's history. They are
registered on :data:`edgepack.fleet._cli.cli`, whose helpers (store, clock, errors) they share.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from edgepack.fleet._cli import _fail, _legend, _now, _store, cli, console, iso
from edgepack.fleet._schema import AuditEntry
from edgepack.formats.exceptions import EdgepackError
from edgepack.formats.keys import load_public_key

__all__: list[str] = []

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
TABLE_ROWS = 200  # entries `audit` shows as a table without --limit
AUDIT_LEGEND = (
    "kinds: build (bundles per profile), command (the signed envelope; key = its signer), "
    "outcome (a device's final job status), rollout (a rollout decision), trust (a key "
    "rotation); `audit verify` checks the chain and every command signature"
)
MODELS_LEGEND = (
    "state: active (runs on a device), superseded (a newer version replaced it), retired "
    "(rolled back from or retired, nothing newer), built (never ran); source: the MLflow run or "
    "the source file's sha256; groups: devices per assigned group running it; kept: devices "
    "keeping it for a rollback"
)


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


def _moment(ctx: click.Context, text: str | None, what: str) -> dt.datetime | None:
    """An ISO 8601 time, or an age such as ``2h`` (that long before now)."""
    if text is None:
        return None
    age = re.fullmatch(r"\s*(\d+)\s*([smhd])\s*", text)
    if age:
        return _now(ctx) - dt.timedelta(seconds=int(age[1]) * _UNITS[age[2]])
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        _fail(f"{what} {text!r} is neither an ISO 8601 time nor an age such as 30m, 2h, 3d", 2)
        raise  # unreachable
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)


def _summary(e: AuditEntry) -> str:
    """One line of what an entry says."""
    p = e.payload
    if e.kind == "build":
        profiles = p.get("profiles", {})
        return ", ".join(
            f"{name} {b.get('precision')} {str(b.get('sha256', ''))[:12]}…"
            f"{'' if (b.get('parity') or {}).get('passed') else ' parity?'}"
            for name, b in sorted(profiles.items())
        )
    if e.kind == "command":
        target = ", ".join(f"{k} {v}" for k, v in (p.get("target") or {}).items())
        extra = f" cancels {p['cancels']}" if p.get("cancels") else ""
        return f"{p.get('kind')} → {target}: job {p.get('job_id')}{extra}"
    if e.kind == "outcome":
        reason = f" ({p['reason']})" if p.get("reason") else ""
        return f"job {p.get('job_id')} {p.get('status')}{reason}"
    if e.kind == "rollout":
        return f"{p.get('rollout_id')} #{p.get('decision')} {p.get('action')}: {p.get('reason')}"
    if e.kind == "trust":
        return f"trust v{p.get('version')}: command keys {', '.join(p.get('command_keys', []))}"
    if e.kind.startswith("policy.") and isinstance(p.get("reason"), str):  # fleet._policies
        return f"{p.get('action_id')} {p.get('state')}: {p['reason']}"
    if e.kind.startswith("console.") and isinstance(p.get("done"), str):  # fleet._console
        return f"console: {p['done']}"
    text = json.dumps(p, sort_keys=True)
    return text if len(text) <= 80 else text[:79] + "…"


@cli.group(invoke_without_command=True)
@click.option("--model", help="Only entries about this model.")
@click.option("--device", help="Only entries about this device.")
@click.option("--key", "key_id", help="Only entries signed by this key id.")
@click.option("--kind", help="Only this kind (build, command, outcome, rollout, trust, ...).")
@click.option("--since", metavar="TIME", help="From this time on (ISO 8601, or an age: 2h, 3d).")
@click.option("--until", metavar="TIME", help="Up to this time (ISO 8601, or an age).")
@click.option("--limit", type=click.IntRange(1), help="Only the newest N entries.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--export",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write every matching entry to FILE as JSON Lines (one entry a line).",
)
@click.pass_context
def audit(
    ctx: click.Context, model: str | None, device: str | None, key_id: str | None,
    kind: str | None, since: str | None, until: str | None, limit: int | None, as_json: bool,
    export: Path | None,
) -> None:  # fmt: skip
    """The audit trail: builds, commands, device outcomes, rollout decisions, key rotations."""
    if ctx.invoked_subcommand is not None:
        return
    from edgepack.fleet import _audit

    table_only = limit is None and export is None and not as_json
    shown = TABLE_ROWS + 1 if table_only else limit  # a table shows the newest 200 by default
    found = _audit.entries(
        _store(ctx), model=model, device=device, key_id=key_id, kind=kind,
        since=_moment(ctx, since, "--since"), until=_moment(ctx, until, "--until"), limit=shown,
    )  # fmt: skip
    more = table_only and len(found) > TABLE_ROWS
    found = found[1:] if more else found
    if export is not None:
        temporary = export.with_name(export.name + ".tmp")
        try:
            with temporary.open("w", encoding="utf-8") as out:
                for e in found:
                    out.write(json.dumps(e.to_json(), sort_keys=True) + "\n")
            os.replace(temporary, export)
        except OSError as error:
            temporary.unlink(missing_ok=True)
            _fail(f"cannot write {export}: {error.strerror or error}; check the path")
        if not as_json:
            console.print(f"wrote {len(found)} audit entries to {export}")
    if as_json:
        _echo_json([e.to_json() for e in found])
        return
    if export is not None:
        return
    if not found:
        filtered = any((model, device, key_id, kind, since, until))
        console.print("no audit entries match" if filtered else
                      "no audit entries yet: the collector and the CLI record them")  # fmt: skip
        return
    table = Table("seq", "at", "kind", "model", "device", "key", "what")
    for e in found:
        what = f"{e.model}@{e.version}" if e.version is not None else (e.model or "")
        table.add_row(str(e.seq), iso(e.at), e.kind, what, e.device or "", (e.key_id or "")[:16],
                      escape(_summary(e)))  # fmt: skip
    console.print(table)
    if more:
        console.print(f"the newest {TABLE_ROWS} entries; --limit N, --since or --export FILE for "
                      "more")  # fmt: skip
    _legend(AUDIT_LEGEND)


def _recorded(ctx: click.Context, what: str, record: Any) -> None:
    """Run ``record(store)`` on the ``--store`` that exists (the CLI never creates one for
    this); without one, or when it fails, say so and go on: what was sent is out, and the
    collector records the command when it sees it."""
    from edgepack.fleet._database import open_store
    from edgepack.fleet.exceptions import StoreError

    url = str(ctx.obj["store"])
    local = not re.match(r"^(postgres|postgresql)://", url)
    if local and not Path(url.removeprefix("sqlite://")).expanduser().exists():
        console.print(f"[dim]{what} not in the audit trail: no store at {url} (the collector "
                      "records commands when it sees them)[/]")  # fmt: skip
        return
    try:
        store = open_store(url)
    except StoreError as e:
        console.print(f"[yellow]{what} not recorded in the audit trail: {e}[/]")
        return
    try:
        record(store)
    except (StoreError, ValueError) as e:
        console.print(f"[yellow]{what} not recorded in the audit trail: {e}[/]")
    finally:
        store.close()


def record_build_shipped(
    ctx: click.Context, model: str, version: int, build: dict[str, dict[str, Any]]
) -> None:
    """Record the build a deploy (rollout, experiment) is about to ship, before it is sent."""
    from edgepack.fleet import _audit_facts

    now = _now(ctx)

    def record(store: Any) -> None:
        _audit_facts.record_build(store, model, version, build, now)

    _recorded(ctx, f"build {model}@{version}", record)


def record_issued(ctx: click.Context, published: Any) -> None:
    """Record the signed command the CLI just published (a ``Published``)."""
    from edgepack.fleet import _audit_facts
    from edgepack.formats.commands import read_command

    if published.envelope:
        command = read_command(published.envelope, None)
        _recorded(ctx, f"job {published.job_id}",
                  lambda store: _audit_facts.record_command(store, command, by="cli"))  # fmt: skip


def _trusted(paths: tuple[Path, ...]) -> list[Any] | None:
    keys = []
    for path in paths:
        try:
            keys.append(load_public_key(path.read_bytes(), source=str(path)))
        except OSError as e:
            _fail(f"cannot read key {path}: {e.strerror or e}", 2)
        except EdgepackError as e:
            _fail(str(e), 2)
    return keys or None


@audit.command()
@click.option(
    "--key-file",
    "key_files",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Operator public key(s) the commands must verify against.",
)
@click.option(
    "--root-key",
    "root_files",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Offline root public key(s): the command keys named by the recorded trust documents "
    "these signed are used (without --key-file or --root-key, signatures are not checked).",
)
@click.option(
    "--head",
    metavar="SEQ:HASH",
    help="A head kept elsewhere (from an earlier `audit verify --json`): the chain must still "
    "hold that entry with that hash.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def verify(
    ctx: click.Context,
    key_files: tuple[Path, ...],
    root_files: tuple[Path, ...],
    head: str | None,
    as_json: bool,
) -> None:
    """Check every entry's hash and link and every command's signature; exit 1 if broken."""
    from edgepack.fleet import _audit

    anchor = None
    if head is not None:
        match = re.fullmatch(r"(\d+):([0-9a-f]{64})", head.strip())
        if match is None:
            _fail(f"--head {head!r} is not SEQ:HASH (a seq and a 64-digit sha256)", 2)
            raise AssertionError  # unreachable
        anchor = (int(match[1]), match[2])
    roots = _trusted(root_files) or []
    verdict = _audit.verify(_store(ctx), _trusted(key_files), head=anchor, roots=roots)
    problems = verdict.problems
    if as_json:
        _echo_json(verdict.to_json())
    elif verdict.ok:
        signed = (
            f"{verdict.signatures} command signature(s) verified with {', '.join(verdict.keys)}"
            if verdict.keys
            else "command signatures NOT checked (pass --key-file, or --root-key to use the "
            "recorded trust documents the root signed)"
        )
        console.print(
            f"audit trail intact: {verdict.checked} entries, head {verdict.head_seq} "
            f"{verdict.head_hash}; {signed}"
        )
    else:
        first = problems[0]
        console.print(f"[red]audit trail broken[/] at entry {first.seq}: {first.what}: "
                      f"{escape(first.detail)}")  # fmt: skip
        for p in problems[1:10]:
            console.print(f"  also entry {p.seq}: {p.what}: {escape(p.detail)}")
        if verdict.problem_count > 10:
            console.print(f"  and {verdict.problem_count - 10} more problems (--json lists 100)")
    if not verdict.ok:
        ctx.exit(1)


@audit.command(name="record-build")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def record_build(ctx: click.Context, directory: Path, as_json: bool) -> None:
    """Record the bundles in a build DIRECTORY (per model version) in the audit trail."""
    from edgepack.fleet import _audit_facts
    from edgepack.fleet._commands import describe_bundles
    from edgepack.fleet.exceptions import BundleLookupError

    try:
        releases = describe_bundles(directory)
    except BundleLookupError as error:
        _fail(str(error))
        raise  # unreachable
    store = _store(ctx, create=True)
    now = _now(ctx)
    recorded = [
        _audit_facts.record_build(store, model, version, profiles, now)
        for (model, version), profiles in sorted(releases.items())
    ]
    if as_json:
        _echo_json([e.to_json() for e in recorded])
        return
    for e in recorded:
        console.print(f"build {e.model}@{e.version}: entry {e.seq} ({escape(_summary(e))})")


@cli.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def models(ctx: click.Context, as_json: bool) -> None:
    """The model index: each version's bundles, where it runs, and its state."""
    if ctx.invoked_subcommand is not None:
        return
    from edgepack.fleet._model_index import model_index

    rows = model_index(_store(ctx))
    if as_json:
        _echo_json([r.to_json() for r in rows])
        return
    if not rows:
        console.print("no models yet: deploy one, or `edgepack-fleet audit record-build DIR`")
        return
    table = Table(
        "model", "version", "state", "profiles", "signer", "source", "devices", "groups", "kept"
    )
    for r in rows:
        profiles = "\n".join(
            f"{name} {p.get('precision')} {_size(p.get('size'))}"
            f"{' parity ok' if (p.get('parity') or {}).get('passed') else ''}"
            for name, p in sorted(r.profiles.items())
        )
        groups = ", ".join(f"{g or '(none)'} {n}" for g, n in r.groups.items())
        table.add_row(r.model, str(r.version), r.state, profiles or "(no build recorded)",
                      ", ".join(s[:16] for s in r.signers), _origin(r.profiles),
                      str(len(r.devices)), groups, str(len(r.previous_on)))  # fmt: skip
    console.print(table)
    _legend(MODELS_LEGEND)


def _origin(profiles: dict[str, dict[str, Any]]) -> str:
    """Where a build came from: its MLflow run, or the source file's sha256 (shortened)."""
    source = next(iter(profiles.values()), {}).get("source") or {}
    run = (source.get("mlflow") or {}).get("run_id")
    if run:
        return f"mlflow run {run}"
    digest = str(source.get("sha256") or "")
    return f"{source.get('file') or 'file'} {digest[:12]}…" if digest else ""


def _size(value: Any) -> str:
    return f"{value / 1024:,.0f} KiB" if isinstance(value, int) else "?"


@models.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def show(ctx: click.Context, name: str, as_json: bool) -> None:
    """The history of model NAME, from build to retirement, and its versions now."""
    from edgepack.fleet._model_index import model_history, model_index

    store = _store(ctx)
    history = model_history(store, name)
    versions = [r for r in model_index(store) if r.model == name]
    if not history and not versions:
        _fail(f"no model {name!r} in store {getattr(store, 'name', '')}: "
              "`edgepack-fleet models` lists the models")  # fmt: skip
    if as_json:
        _echo_json({"model": name, "versions": [r.to_json() for r in versions],
                    "history": [e.to_json() for e in history]})  # fmt: skip
        return
    for r in versions:
        where = f"on {len(r.devices)} device(s)" if r.devices else "on no device"
        origin = _origin(r.profiles)
        console.print(f"{name}@{r.version}: {r.state} {where}"
                      + (f"; source {origin}" if origin else ""))  # fmt: skip
    table = Table("seq", "at", "kind", "version", "device", "key", "what")
    for e in history:
        table.add_row(str(e.seq), iso(e.at), e.kind, "" if e.version is None else str(e.version),
                      e.device or "", (e.key_id or "")[:16], escape(_summary(e)))  # fmt: skip
    console.print(table)
    _legend(AUDIT_LEGEND)
