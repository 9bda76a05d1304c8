"""Retirement and remediation policies: rules the collector evaluates against its store.

An operator writes rules in a TOML file (``edgepack-fleet collector --policies FILE``; the format
is in docs/governance.md): "a version whose accuracy drops below 0.85 on a device", "a version
that drifts on more than 30 % of its devices for 3 windows in a row". Each rule flags the model
version it fires on, or rolls it back on the devices affected, at once or after an operator
approves (``approval = true``; ``edgepack-fleet policy pending | approve | reject``).

The flow has three parts, each testable alone:

* :mod:`edgepack.fleet._policy_file` reads the file strictly (a mistake names its line and
  what to write instead) into :class:`~edgepack.fleet._policy_file.Rule` objects;
* :func:`evaluate` is a pure function of (store, rules, now): it reads the drift and quality
  reports the collector kept (per device and version, the experiment candidate's left out) and
  returns one :class:`Finding` per (rule, model, version) that fires, with the figures;
* :class:`PolicyEngine` acts on the findings: each (rule, model, version) acts once, recorded
  first in the store's ``policy_actions`` (a second collector inserts nothing) and in the audit
  trail (:func:`edgepack.fleet._audit.append`) with its numbers; a rollback records the job ids
  it will send before it sends them (``rolling_back``), so an interrupted send is sent again,
  with the same ids, on the next run, and a device runs a job id once.

Rolling back signs commands, so it needs an operator key: the collector's ``--policy-key`` for a
rule without approval (a collector without one refuses such a rule when it starts), or the key of
the operator who approves.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgepack._clock import Clock, utc_now
from edgepack.fleet._database import FleetStore, PolicyActionRow
from edgepack.fleet._policy_file import Rule, load_policies, parse_policies
from edgepack.fleet._rollout_controller import CommandSender
from edgepack.fleet._views import as_dict, latest_reports
from edgepack.fleet._views import number as as_number
from edgepack.fleet.exceptions import PolicyError
from edgepack.formats.commands import new_job_id

__all__ = [
    "ACTION_STATES",
    "Finding",
    "PolicyEngine",
    "Rule",
    "approve",
    "evaluate",
    "load_policies",
    "parse_policies",
    "reject",
]

ACTION_STATES = ("flagged", "pending", "rolling_back", "rolled_back", "rejected")
"""Where a policy action stands: ``flagged`` (done: a flag rule), ``pending`` (waits for an
operator), ``rolling_back`` (the commands are recorded and being sent), ``rolled_back`` (sent),
``rejected`` (an operator said no)."""


@dataclass(frozen=True)
class Finding:
    """A rule that fires on one model version: the devices affected and the figures why."""

    rule: Rule
    model: str
    version: int
    devices: tuple[str, ...]  # affected, by name
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        return f"rule {self.rule.name}: {self.model} v{self.version} {self.rule.describe()}"


# -- evaluation: a pure function of (store, rules, now) ------------------------------------------


def _version(payload: Mapping[str, Any]) -> int | None:
    version = payload.get("version")
    return version if isinstance(version, int) and not isinstance(version, bool) else None


def _active(payload: Mapping[str, Any]) -> bool:
    """Not an experiment's candidate (whose figures are the experiment's, not the version's)."""
    return payload.get("variant") in (None, "active")


def _on_version(store: FleetStore) -> dict[tuple[str, int], set[str]]:
    """(model, version) -> the devices whose stored state has it active."""
    found: dict[tuple[str, int], set[str]] = {}
    for device in store.devices():
        for name, entry in device.models.items():
            version = as_dict(entry).get("active")
            if isinstance(version, int) and not isinstance(version, bool):
                found.setdefault((name, version), set()).add(device.device)
    return found


def _quality_value(rule: Rule, payload: Mapping[str, Any]) -> tuple[float, bool] | None:
    """A quality report's value of the rule's metric, and whether it is an estimate."""
    labeled = as_number(payload.get("labeled")) or 0
    value = as_number(as_dict(payload.get("metrics")).get(rule.metric))
    if value is not None and labeled > 0:
        return value, False
    estimate = as_number(as_dict(payload.get("estimated")).get("accuracy"))
    if rule.estimated and rule.metric == "accuracy" and estimate is not None:
        return estimate, True
    return None


def _quality(store: FleetStore, rule: Rule, since: dt.datetime) -> list[Finding]:
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for device, reports in latest_reports(store, "quality", None, 8, since).items():
        for _at, payload in reports:  # oldest first: the latest of each model wins
            name = payload.get("model")
            if isinstance(name, str) and (rule.model in (None, name)) and _active(payload):
                latest[(device, name)] = payload
    per_version: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for (device, name), payload in latest.items():
        version, read = _version(payload), _quality_value(rule, payload)
        if version is None or read is None:
            continue
        value, estimated = read
        per_version.setdefault((name, version), {})[device] = {
            "value": value,
            "estimated": estimated,
            "status": payload.get("status"),
        }
    below = rule.condition == "quality_below"
    findings = []
    for (name, version), values in sorted(per_version.items()):
        hit = sorted(
            d
            for d, v in values.items()
            if (v["value"] < rule.threshold if below else v["value"] > rule.threshold)
        )
        if len(hit) >= rule.min_devices:
            figures = {
                "metric": rule.metric,
                "threshold": rule.threshold,
                "values": values,
                "reporting": len(values),
                "affected": len(hit),
            }
            findings.append(Finding(rule, name, version, tuple(hit), figures))
    return findings


def _drift(store: FleetStore, rule: Rule, since: dt.datetime) -> list[Finding]:
    history = max(4 * rule.drift_windows, 12)
    series: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for device, reports in latest_reports(store, "drift", None, history, since).items():
        for _at, payload in reports:
            name = payload.get("model")
            if isinstance(name, str) and (rule.model in (None, name)) and _active(payload):
                series.setdefault((device, name), []).append(payload)
    reporting: dict[tuple[str, int], set[str]] = {}
    drifting: dict[tuple[str, int], set[str]] = {}
    for (device, name), payloads in series.items():
        version = _version(payloads[-1])
        if version is None:
            continue
        mine = [p for p in payloads if _version(p) == version][-rule.drift_windows :]
        reporting.setdefault((name, version), set()).add(device)
        if len(mine) == rule.drift_windows and all(p.get("status") == "drift" for p in mine):
            drifting.setdefault((name, version), set()).add(device)
    running = _on_version(store)
    findings = []
    for key in sorted(reporting):
        devices = reporting[key] | running.get(key, set())
        hit = sorted(drifting.get(key, ()))
        share = len(hit) / len(devices)
        if share > rule.threshold and len(hit) >= rule.min_devices:
            figures = {
                "drift_share": share,
                "threshold": rule.threshold,
                "windows": rule.drift_windows,
                "devices": len(devices),
                "drifting": hit,
                "reporting": len(reporting[key]),
            }
            findings.append(Finding(rule, key[0], key[1], tuple(hit), figures))
    return findings


def evaluate(store: FleetStore, rules: Sequence[Rule], now: dt.datetime) -> list[Finding]:
    """Every (rule, model, version) that fires on what the store holds at ``now``.

    A quality rule reads each device's latest quality report of each model (received within the
    rule's ``lookback``): the labeled window's metric, or, with ``estimated``, the CBPE accuracy
    estimate of a window without labels. A drift rule reads each device's drift windows of the
    version it reports last: a device drifts when each of its last ``drift_windows`` windows
    has status ``drift``; the share is over the devices that report the version or run it.

    Args:
        store: the collector's store.
        rules: the rules (:func:`load_policies`).
        now: the moment of the evaluation (the caller's clock).

    Returns:
        The findings, by rule, then model and version.
    """
    findings: list[Finding] = []
    for rule in rules:
        since = now - dt.timedelta(seconds=rule.lookback)
        find = _drift if rule.condition == "drift_share" else _quality
        findings += find(store, rule, since)
    return findings


# -- acting ---------------------------------------------------------------------------------------


def _audit(
    store: FleetStore,
    kind: str,
    row: PolicyActionRow,
    at: dt.datetime,
    key_id: str | None = None,
    **extra: Any,
) -> None:
    from edgepack.fleet._audit import append

    payload = {
        "action_id": row.action_id,
        "rule": row.rule,
        "action": row.action,
        "state": row.state,
        **row.data,
        **extra,
    }
    append(store, kind, payload, at=at, model=row.model, version=row.version, key_id=key_id)


def _send(
    store: FleetStore, row: PolicyActionRow, sender: CommandSender, at: dt.datetime,
    signer: str | None,
) -> PolicyActionRow:  # fmt: skip
    """Send the rollback jobs ``row`` (``rolling_back``) recorded, then mark it rolled back;
    ``signer`` is the id of the key ``sender`` signs with (for the audit entry)."""
    jobs = [(d, j) for d, j in as_dict(row.data.get("jobs")).items() if isinstance(j, str)]
    sender.send("rollback", row.model, sorted(jobs))

    def record() -> PolicyActionRow:
        moved = store.update_policy_action(row, "rolled_back", row.data, at)
        done = store.policy_action(row.action_id)
        assert done is not None
        if moved:  # not when another collector marked it first (the same job ids: no harm)
            sent = sorted(d for d, _j in jobs)
            _audit(store, "policy.rollback", done, at, signer, devices=sent)
        return done

    return store.batch(record)


def _rollback_plan(
    store: FleetStore, model: str, version: int, devices: Sequence[str], now: dt.datetime
) -> tuple[dict[str, str], list[str]]:
    """Job ids for the devices still on ``version`` with a previous one to go back to."""
    states = {d.device: as_dict(d.models.get(model)) for d in store.devices()}
    jobs, skipped = {}, []
    for device in devices:
        state = states.get(device, {})
        if state.get("active") == version and state.get("previous") is not None:
            jobs[device] = new_job_id("rollback", now)
        else:
            skipped.append(device)
    return jobs, skipped


class PolicyEngine:
    """Evaluates the rules against the store and acts on what fires (see the module docstring).

    Args:
        store: the collector's store.
        rules: the rules.
        sender: signs and sends rollback commands (the collector's ``--policy-key``); None:
            the engine cannot roll back, and refuses rules that would without approval.
        clock: the moment of each evaluation.
        key_id: the id of the sender's key, recorded with what it signs.

    Raises:
        PolicyError: a rule rolls back without approval and there is no sender.
    """

    def __init__(
        self,
        store: FleetStore,
        rules: Sequence[Rule],
        *,
        sender: CommandSender | None = None,
        clock: Clock = utc_now,
        key_id: str | None = None,
    ) -> None:
        unsigned = [r.name for r in rules if r.action == "rollback" and not r.approval]
        if unsigned and sender is None:
            raise PolicyError(
                f"rule {unsigned[0]} rolls back without approval, which signs commands: give "
                "the collector --policy-key ops.key, or set approval = true (the approver's key "
                'signs) or action = "flag" in the rule'
            )
        self.store, self.rules, self.sender = store, list(rules), sender
        self.clock, self.key_id = clock, key_id

    def run(self) -> list[PolicyActionRow]:
        """One evaluation: act on every new finding, and finish rollbacks a crash or a broker
        failure interrupted (sent again with the same job ids).

        Returns:
            The actions recorded or moved on by this run.

        Raises:
            StoreError: the store failed. BrokerError: a rollback could not be sent (it is
                recorded ``rolling_back`` and sent again on the next run).
        """
        now, done = self.clock(), []
        if self.sender is not None:
            for row in self.store.policy_actions("rolling_back", limit=1000):
                done.append(_send(self.store, row, self.sender, now, self.key_id))
        for finding in evaluate(self.store, self.rules, now):
            acted = self._act(finding, now)
            if acted is not None:
                done.append(acted)
        return done

    def _act(self, finding: Finding, now: dt.datetime) -> PolicyActionRow | None:
        rule = finding.rule
        data: dict[str, Any] = {
            "reason": finding.reason,
            "condition": rule.describe(),
            "devices": list(finding.devices),
            "figures": finding.figures,
        }
        if rule.action == "flag":
            state = "flagged"
        elif rule.approval:
            state = "pending"
        else:
            state = "rolling_back"
            data["jobs"], data["skipped"] = _rollback_plan(
                self.store, finding.model, finding.version, finding.devices, now
            )
        action_id = f"policy-{now:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
        row = PolicyActionRow(
            action_id,
            rule.name,
            finding.model,
            finding.version,
            rule.action,
            state,
            now,
            now,
            self.key_id if state == "rolling_back" else None,
            data,
        )
        kind = {"flagged": "policy.flag", "pending": "policy.pending"}.get(state, "policy.act")

        def record() -> bool:
            if not self.store.record_policy_action(row):
                return False  # this rule already acted on this version
            _audit(self.store, kind, row, now, row.decided_by)
            return True

        if not self.store.batch(record):
            return None
        if state == "rolling_back":
            assert self.sender is not None
            return _send(self.store, row, self.sender, now, self.key_id)
        return row


def _pending(store: FleetStore, action_id: str, *, resend: bool = False) -> PolicyActionRow:
    row = store.policy_action(action_id)
    if row is None:
        raise PolicyError(
            f"no policy action {action_id!r}; `edgepack-fleet policy pending` "
            "lists those waiting for approval"
        )
    if row.state != "pending" and not (resend and row.state == "rolling_back"):
        raise PolicyError(
            f"policy action {action_id} is {row.state}, not pending: nothing to approve or reject"
        )
    return row


def approve(
    store: FleetStore, action_id: str, sender: CommandSender, key_id: str, *, clock: Clock = utc_now
) -> PolicyActionRow:
    """An operator approves a pending rollback: the jobs are recorded, then sent. Approving an
    action whose sending was interrupted (``rolling_back``) sends its recorded jobs again.

    Args:
        store: the collector's store.
        action_id: the pending action.
        sender: signs with the approving operator's key and sends.
        key_id: that key's id (recorded as who approved).
        clock: the moment of the approval.

    Returns:
        The action, ``rolled_back``.

    Raises:
        PolicyError: no such action, it is not pending, or another operator decided first.
        BrokerError: the commands could not be sent (the action stays ``rolling_back``;
            approve it again, or a collector with ``--policy-key`` sends it again).
    """
    row, now = _pending(store, action_id, resend=True), clock()
    if row.state == "rolling_back":  # approved before, the send interrupted: the same job ids
        return _send(store, row, sender, now, key_id)
    data = dict(row.data)
    data["jobs"], data["skipped"] = _rollback_plan(
        store, row.model, row.version, row.data.get("devices", []), now
    )

    def record() -> PolicyActionRow:
        if not store.update_policy_action(row, "rolling_back", data, now, key_id):
            raise PolicyError(
                f"policy action {action_id} was decided meanwhile; see `edgepack-fleet policy list`"
            )
        moved = store.policy_action(action_id)
        assert moved is not None
        _audit(store, "policy.approve", moved, now, key_id)
        return moved

    return _send(store, store.batch(record), sender, now, key_id)


def reject(
    store: FleetStore, action_id: str, *, by: str | None = None, clock: Clock = utc_now
) -> PolicyActionRow:
    """An operator rejects a pending rollback: nothing is sent; the rule does not act on that
    version again.

    Raises:
        PolicyError: no such action, it is not pending, or another operator decided first.
    """
    row, now = _pending(store, action_id), clock()

    def record() -> PolicyActionRow:
        if not store.update_policy_action(row, "rejected", row.data, now, by or ""):
            raise PolicyError(f"policy action {action_id} was decided meanwhile")
        moved = store.policy_action(action_id)
        assert moved is not None
        _audit(store, "policy.reject", moved, now, by)
        return moved

    return store.batch(record)
