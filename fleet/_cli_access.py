"""``edgepack-fleet devices | acl | trust``: who is in which group, and which keys are in force.

The operator's side of trust: group membership is recorded here, by the operator, in the fleet
store (``devices assign`` / ``unassign``), and only there; the collector answers pending work by
it and ``acl`` turns it into the broker's ACL (:mod:`edgepack.fleet._acl`), so both enforce the
same records. ``devices`` lists them next to what each device declares about itself, with a
``mismatch`` flag where the two differ. ``trust publish`` rotates keys
(:mod:`edgepack.fleet._trust`) and ``trust show`` prints the key ids in force per role. Every
listing has ``--json`` for scripts. These commands are registered on
:data:`edgepack.fleet._cli.cli`, whose helpers (broker, store, clock, one-line errors) they share.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from edgepack.fleet._cli import _broker, _fail, _key, _legend, _now, _store, cli, console, iso
from edgepack.formats.keys import load_public_key
from edgepack.formats.topics import NAME

__all__: list[str] = []


DEVICES_LEGEND = (
    "groups: assigned by the operator (the only ones that count); declares: what the device "
    "says, (differs) when not the same; never seen: assigned, no state received yet"
)


def _names(values: tuple[str, ...], what: str) -> list[str]:
    bad = [v for v in values if not NAME.match(v)]
    if bad:
        _fail(f"{what} {bad[0]!r} is not 1-128 letters, digits, '_', '.', ':' or '-'", 2)
    return list(values)


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


@cli.group(invoke_without_command=True)
@click.option("--group", help="Only devices in this group (assigned or declared).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def devices(ctx: click.Context, group: str | None, as_json: bool) -> None:
    """List devices: online, profile, models, health, groups (assigned vs declared), last seen.

    `devices assign` and `devices unassign` change the groups a device is in.

    \b
    models: NAME@ACTIVE; declares: "(differs)" when the groups the device declares
    are not those the operator assigned (only the assigned ones count).
    """
    if ctx.invoked_subcommand is not None:
        return
    from edgepack.fleet._views import ago, installed_models

    store = _store(ctx)
    rows, now, members = store.devices(group), _now(ctx), store.memberships()
    seen = {d.device for d in rows}
    unseen = sorted(
        d for d, groups in members.items() if d not in seen and (group is None or group in groups)
    )
    if as_json:
        listed = [
            {"device": d.device, "online": d.online, "profile": d.profile,
             "agent_version": d.agent_version, "models": d.models, "health": d.health,
             "groups": d.assigned, "declared_groups": d.groups,
             "mismatch": sorted(d.assigned) != sorted(d.groups),
             "last_seen": iso(d.last_seen)}
            for d in rows
        ]  # fmt: skip
        listed += [
            {"device": d, "online": False, "profile": None, "agent_version": None, "models": {},
             "health": None, "groups": members[d], "declared_groups": [], "mismatch": True,
             "last_seen": None}
            for d in unseen
        ]  # fmt: skip
        _echo_json(listed)
        return
    table = Table("device", "online", "profile", "models", "health", "groups", "declares")
    table.add_column("last seen")
    for d in rows:
        mismatch = sorted(d.assigned) != sorted(d.groups)
        declared = ", ".join(d.groups) or "-"
        table.add_row(
            d.device,
            "[green]yes[/]" if d.online else "[red]no[/]",
            d.profile or "-",
            installed_models(d.models),
            d.health or "-",
            ", ".join(d.assigned) or "-",
            f"[yellow]{declared} (differs)[/]" if mismatch else declared,
            ago(d.last_seen, now),
        )
    for name in unseen:
        table.add_row(name, "[dim]never seen[/]", "-", "-", "-", ", ".join(members[name]), "-", "-")
    if not rows and not unseen:
        console.print("no devices known yet (is the collector running?)")
        return
    console.print(table)
    _legend(DEVICES_LEGEND)


def _change(
    ctx: click.Context, device: str, groups: tuple[str, ...], add: bool, as_json: bool
) -> None:
    _names((device,), "device")
    wanted = _names(groups, "group")
    store = _store(ctx, create=True)  # the operator's records may come before any collector
    changed = store.assign(device, wanted, _now(ctx)) if add else store.unassign(device, wanted)
    now_in = store.memberships().get(device, [])
    if as_json:
        _echo_json({"device": device, "changed": changed, "groups": now_in})
        return
    verb = "assigned to" if add else "removed from"
    what = ", ".join(changed) if changed else "nothing changed"
    console.print(f"{device} {verb}: {what}; now in: {', '.join(now_in) or 'no group'}")
    console.print(
        "the broker enforces it after: edgepack-fleet acl --out FILE, then SIGHUP mosquitto"
    )


@devices.command()
@click.argument("device")
@click.option("--group", "groups", required=True, multiple=True, help="A group (repeatable).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def assign(ctx: click.Context, device: str, groups: tuple[str, ...], as_json: bool) -> None:
    """Put DEVICE in group(s): it is served their commands (pending answers, and the ACL)."""
    _change(ctx, device, groups, True, as_json)


@devices.command()
@click.argument("device")
@click.option("--group", "groups", required=True, multiple=True, help="A group (repeatable).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def unassign(ctx: click.Context, device: str, groups: tuple[str, ...], as_json: bool) -> None:
    """Take DEVICE out of group(s)."""
    _change(ctx, device, groups, False, as_json)


@cli.command()
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The ACL file to write (mosquitto's acl_file), replaced atomically.",
)
@click.option("--collector-user", default="collector", show_default=True)
@click.option("--ops-user", default="ops", show_default=True)
@click.pass_context
def acl(ctx: click.Context, out: Path, collector_user: str, ops_user: str) -> None:
    """Write the broker's ACL from the group memberships; then SIGHUP mosquitto to reload it."""
    from edgepack.fleet._acl import render_acl, write_acl

    members = _store(ctx).memberships()
    try:
        text = render_acl(members, prefix=ctx.obj["prefix"], collector=collector_user, ops=ops_user)
    except ValueError as e:
        _fail(str(e))
    write_acl(out, text)
    console.print(
        f"{out}: {len(members)} device(s) with groups; reload: kill -HUP $(pidof mosquitto)"
    )


@cli.group()
def trust() -> None:
    """Rotate keys: publish a trust document signed by the offline root key(s); show it."""


def _public(path: Path) -> Any:
    try:
        return load_public_key(path.read_bytes(), source=str(path))
    except OSError as e:
        _fail(f"cannot read public key {path}: {e.strerror or e}")


_PATH = click.Path(dir_okay=False, path_type=Path)


@trust.command()
@click.option(
    "--root-key",
    "root_keys",
    multiple=True,
    required=True,
    type=_PATH,
    help="An offline root private key that signs (repeat for a threshold).",
)
@click.option(
    "--bundle-key",
    "bundle_keys",
    multiple=True,
    required=True,
    type=_PATH,
    help="A bundle-signing public key in force afterwards (all of them; repeat).",
)
@click.option(
    "--command-key",
    "command_keys",
    multiple=True,
    required=True,
    type=_PATH,
    help="A command-signing public key in force afterwards (all of them; repeat).",
)
@click.option(
    "--new-root",
    "new_roots",
    multiple=True,
    type=_PATH,
    help="Root public keys in force afterwards (default: the signing roots).",
)
@click.option(
    "--version",
    "version",
    type=click.IntRange(min=1),
    help="Default: one above the highest published (store or retained topic).",
)
@click.option("--threshold", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def publish(
    ctx: click.Context,
    root_keys: tuple[Path, ...],
    bundle_keys: tuple[Path, ...],
    command_keys: tuple[Path, ...],
    new_roots: tuple[Path, ...],
    version: int | None,
    threshold: int,
    as_json: bool,
) -> None:
    """Publish the keys in force (retained on the trust topic) and record them in the store."""
    from edgepack.fleet._trust import publish_trust

    try:
        done = publish_trust(
            _broker(ctx),
            _store(ctx, create=True),
            signers=[_key(p) for p in root_keys],
            bundle_keys=[_public(p) for p in bundle_keys],
            command_keys=[_public(p) for p in command_keys],
            root_keys=[_public(p) for p in new_roots],
            version=version,
            threshold=threshold,
            now=_now(ctx),
        )
    except ValueError as e:
        _fail(str(e), 2)
        raise  # unreachable
    if as_json:
        _echo_json({**done.summary.as_json(), "topic": done.topic})
        return
    console.print(f"trust version {done.summary.version} published on {done.topic} (retained)")
    _show_table(done.summary)


def _show_table(summary: Any) -> None:
    table = Table(
        "role", "key id", title=f"trust v{summary.version} (threshold {summary.threshold})"
    )
    for role, ids in summary.keys.items():
        for key in ids:
            table.add_row(role.removesuffix("_keys"), key)
    console.print(table)


@trust.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def show(ctx: click.Context, as_json: bool) -> None:
    """The key ids in force per role, from the latest recorded trust document."""
    from edgepack.fleet._trust import peek_trust

    row = _store(ctx).latest_trust()
    if row is None:
        _fail("no trust document recorded yet; publish one with: edgepack-fleet trust publish")
        raise AssertionError  # unreachable
    summary = peek_trust(row.document)
    if as_json:
        _echo_json({**summary.as_json(), "recorded_at": row.recorded_at.isoformat()})
        return
    _show_table(summary)
