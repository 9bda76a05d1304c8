"""``edgepack-fleet policy``: check a policy file, list what the policies did, decide what waits.

The collector evaluates the rules (``collector --policies FILE [--policy-key KEY]``,
:mod:`edgepack.fleet._policies`); these commands read and decide what it recorded in the store:
``policy check FILE`` (the rules as the collector will read them, or the line that is wrong),
``policy list`` (every action, newest first), ``policy pending`` (the rollbacks waiting for an
operator), ``policy approve ID --key ops.key`` (signs and sends the rollbacks) and ``policy
reject ID``. Every decision is recorded in the audit trail. Registered on
:data:`edgepack.fleet._cli.cli`, whose helpers (broker, store, clock, one-line errors) they share.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from edgepack.fleet._cli import _broker, _fail, _key, _legend, _now, _store, cli, console, iso
from edgepack.fleet.exceptions import PolicyError

__all__ = ["policy_engine"]

LEGEND = (
    "state: flagged (recorded, nothing sent), pending (waits for `policy approve ID --key`), "
    "rolling_back (sending), rolled_back (sent), rejected"
)


def policy_engine(ctx: click.Context, store: Any, path: Path, key: Path | None) -> Any:
    """The collector's :class:`~edgepack.fleet._policies.PolicyEngine` for ``--policies`` and
    ``--policy-key`` (errors are one line, exit 1)."""
    from edgepack.fleet._policies import PolicyEngine, load_policies
    from edgepack.fleet._rollout_controller import BrokerSender
    from edgepack.formats.keys import key_id

    try:
        rules = load_policies(path)
        signing = None if key is None else _key(key)
        sender = None if signing is None else BrokerSender(_broker(ctx), signing)
        signer = None if signing is None else key_id(signing.public_key())
        return PolicyEngine(store, rules, sender=sender, clock=ctx.obj["clock"], key_id=signer)
    except PolicyError as e:
        _fail(str(e))


def _row_json(row: Any) -> dict[str, Any]:
    return {
        "action_id": row.action_id,
        "rule": row.rule,
        "model": row.model,
        "version": row.version,
        "action": row.action,
        "state": row.state,
        "created_at": iso(row.created_at),
        "updated_at": iso(row.updated_at),
        "decided_by": row.decided_by,
        "reason": row.data.get("reason"),
        "devices": row.data.get("devices", []),
        "jobs": row.data.get("jobs", {}),
        "figures": row.data.get("figures", {}),
    }


def _show(rows: list[Any], as_json: bool, empty: str) -> None:
    if as_json:
        click.echo(json.dumps([_row_json(r) for r in rows], indent=2, sort_keys=True))
        return
    if not rows:
        console.print(empty)
        return
    table = Table("id", "rule", "model", "state", "devices", "why", "at")
    for r in rows:
        devices = r.data.get("devices", [])
        table.add_row(
            r.action_id,
            r.rule,
            f"{r.model} v{r.version}",
            r.state,
            str(len(devices)),
            escape(str(r.data.get("condition", ""))),
            iso(r.created_at) or "",
        )
    console.print(table)
    _legend(LEGEND)


@cli.group()
def policy() -> None:
    """Retirement and remediation policies: check a file, list actions, approve or reject."""


@policy.command("check")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path, exists=True))
def check(path: Path) -> None:
    """Read a policy file as the collector will; name the line that is wrong."""
    from edgepack.fleet._policies import load_policies

    try:
        rules = load_policies(path)
    except PolicyError as e:
        _fail(str(e))
    table = Table("rule", "model", "when", "action")
    for r in rules:
        action = r.action + (" (after approval)" if r.approval else "")
        table.add_row(r.name, r.model or "every model", escape(r.describe()), action)
    console.print(table)


@policy.command("list")
@click.option(
    "--state",
    type=click.Choice(["flagged", "pending", "rolling_back", "rolled_back", "rejected"]),
    help="Only actions in this state.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def list_actions(ctx: click.Context, state: str | None, as_json: bool) -> None:
    """Every action the policies took or ask for, newest first."""
    _show(_store(ctx).policy_actions(state), as_json, "no policy actions recorded")


@policy.command("pending")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def pending(ctx: click.Context, as_json: bool) -> None:
    """Rollbacks the policies wait to have approved."""
    _show(_store(ctx).policy_actions("pending"), as_json, "no policy action waits for approval")


@policy.command("approve")
@click.argument("action_id")
@click.option(
    "--key",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Operator signing key: it signs the rollback commands.",
)
@click.pass_context
def approve_action(ctx: click.Context, action_id: str, key: Path) -> None:
    """Approve a pending rollback: sign and send it to the devices affected."""
    from edgepack.fleet._policies import approve
    from edgepack.fleet._rollout_controller import BrokerSender
    from edgepack.formats.keys import key_id

    signing = _key(key)
    store = _store(ctx)
    try:
        row = approve(
            store,
            action_id,
            BrokerSender(_broker(ctx), signing),
            key_id(signing.public_key()),
            clock=ctx.obj["clock"],
        )
    except PolicyError as e:
        _fail(str(e))
    jobs = row.data.get("jobs", {})
    console.print(
        f"approved {action_id}: rollback of {row.model} v{row.version} sent to "
        f"{len(jobs)} device(s)"
    )
    for device, job in sorted(jobs.items()):
        console.print(f"  {device}: job {job}")
    if row.data.get("skipped"):
        console.print(
            f"  not sent (no longer on v{row.version}, or nothing to go back to): "
            f"{', '.join(row.data['skipped'])}"
        )


@policy.command("reject")
@click.argument("action_id")
@click.option(
    "--key",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Operator key, to record whose decision it was.",
)
@click.pass_context
def reject_action(ctx: click.Context, action_id: str, key: Path | None) -> None:
    """Reject a pending rollback: nothing is sent; the rule does not act on that version again."""
    from edgepack.fleet._policies import reject
    from edgepack.formats.keys import key_id

    by = None if key is None else key_id(_key(key).public_key())
    try:
        reject(_store(ctx), action_id, by=by, clock=ctx.obj["clock"])
    except PolicyError as e:
        _fail(str(e))
    console.print(f"rejected {action_id} ({iso(_now(ctx))})")
