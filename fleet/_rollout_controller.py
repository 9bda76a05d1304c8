"""Staged rollouts, the acting half: the controller's state machine, its lease and its driver.

:func:`start_rollout` records a rollout (its spec, its plan from
:func:`edgepack.fleet._rollout.plan` with two job ids per device chosen up front, and a first
``start`` decision) in the fleet store.
:class:`RolloutController` then moves it on, one :meth:`~RolloutController.step` at a time: a
pure function of the store and the injected clock (plus the command sender), so tests drive it
with a fake clock and no sleeps. :func:`drive` is the thin loop ``edgepack-fleet rollout start``
and ``rollout drive`` run around it.

The states and every move between them are one table, :data:`TRANSITIONS`; each state has one
small handler that looks at the store and returns an event (or nothing: keep waiting)::

    deploying --sent--> deploying --jobs_done--> soaking --passed--> deploying (next stage)
        |                  |                        |----last_passed--> completed
        |                  +--failed--+             +--condition--+
        +--pause--> paused --resume--> (where it was; a soak starts again)
    deploying | soaking | paused --abort--> aborting --rollback_sent--> rolling_back
    aborting --no_rollback--> aborted            rolling_back --rolled_back--> aborted

**Save before acting.** Every move is one transaction that also records its decision, and only
succeeds if the rollout's ``revision`` is still the one the step read, so two controllers can
never both move it. Commands are sent *before* the move that records them, with job ids fixed
in the plan: after a crash between the two, the next controller sends the same job ids again,
which devices run once. **One controller at a time**: each step first takes or renews the
rollout's lease (:meth:`FleetStore.acquire_lease`), and a second controller is refused with who
holds it and until when (:class:`~edgepack.fleet.exceptions.LeaseHeldError`). Operators pause,
resume and abort by recording a request (:func:`request`), which the controller applies at its
next step. Every wait is bounded: a deploy or rollback without a final status within the job
timeout counts as failed.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

from edgepack._clock import Clock, utc_now
from edgepack.fleet._database import DecisionRow, RolloutDeviceRow, RolloutRow
from edgepack.fleet._rollout import Stage, evaluate, measure, parse_condition, plan
from edgepack.fleet.exceptions import BrokerError, LeaseHeldError, RolloutError, StoreError
from edgepack.formats.messages import TERMINAL, JobStatus

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

    from edgepack.fleet._broker import BrokerOptions
    from edgepack.fleet._database import FleetStore

__all__ = [
    "FINAL",
    "TRANSITIONS",
    "BrokerSender",
    "CommandSender",
    "RolloutController",
    "RolloutSpec",
    "State",
    "drive",
    "live_figures",
    "request",
    "start_rollout",
]

log = logging.getLogger(__name__)
_MAX_MOVES = 8  # per step: enough to send, judge and move on without waiting a poll between


class State(str, Enum):
    DEPLOYING = "deploying"
    SOAKING = "soaking"
    PAUSED = "paused"
    ABORTING = "aborting"
    ROLLING_BACK = "rolling_back"
    COMPLETED = "completed"
    ABORTED = "aborted"


FINAL = frozenset({State.COMPLETED, State.ABORTED})
_D, _S, _P, _A, _R = (
    State.DEPLOYING,
    State.SOAKING,
    State.PAUSED,
    State.ABORTING,
    State.ROLLING_BACK,
)
TRANSITIONS: dict[tuple[State, str], State] = {
    (_D, "sent"): _D,                  # a stage's deploys went out
    (_D, "jobs_done"): _S,             # every deploy of the stage ended (or timed out): soak
    (_D, "failed"): _A,                # ...and too many failed
    (_S, "passed"): _D,                # soak over, no condition triggered: the next stage
    (_S, "last_passed"): State.COMPLETED,
    (_S, "condition"): _A,             # an abort condition triggered (during or after the soak)
    (_D, "pause"): _P, (_S, "pause"): _P,
    (_P, "resume_deploying"): _D, (_P, "resume_soaking"): _S,
    (_D, "abort"): _A, (_S, "abort"): _A, (_P, "abort"): _A,
    (_A, "rollback_sent"): _R,         # the upgraded devices were told to roll back
    (_A, "no_rollback"): State.ABORTED,
    (_R, "rolled_back"): State.ABORTED,  # every rollback ended (or timed out)
}  # fmt: skip
_REQUESTS = ("pause", "resume", "abort", "abort-no-rollback")


class CommandSender(Protocol):
    """Sends one signed command per device, each with its job id (deploy or rollback)."""

    def send(
        self, kind: str, model: str, jobs: Sequence[tuple[str, str]], *,
        version: int | None = None, bundles: Mapping[str, Any] | None = None,
    ) -> None: ...  # fmt: skip


@dataclass(frozen=True)
class BrokerSender:
    """The real sender: :func:`edgepack.fleet._commands.publish_device_commands`."""

    options: BrokerOptions
    key: ec.EllipticCurvePrivateKey
    ttl: dt.timedelta = dt.timedelta(days=7)

    def send(
        self, kind: str, model: str, jobs: Sequence[tuple[str, str]], *,
        version: int | None = None, bundles: Mapping[str, Any] | None = None,
    ) -> None:  # fmt: skip
        from edgepack.fleet._commands import publish_device_commands

        found = {k: dict(v) for k, v in (bundles or {}).items()} or None
        publish_device_commands(
            self.options, kind, model, jobs, self.key, version=version, bundles=found, ttl=self.ttl
        )


@dataclass(frozen=True)
class RolloutSpec:
    """What the operator asked for; stored with the rollout (``spec``)."""

    model: str
    version: int
    group: str
    stages: tuple[Stage, ...]
    bundles: Mapping[str, Any]  # {profile: {url, sha256, size}}, from find_bundles
    soak: float = 600.0  # seconds after a stage's jobs ended
    conditions: tuple[str, ...] = ()
    rollback: bool = True
    job_timeout: float = 1800.0  # seconds for a stage's deploys (and for the rollbacks)

    def to_json(self) -> dict[str, Any]:
        return {
            "stages": [s.to_json() for s in self.stages], "bundles": dict(self.bundles),
            "soak_s": self.soak, "conditions": list(self.conditions), "rollback": self.rollback,
            "job_timeout_s": self.job_timeout,
        }  # fmt: skip

    @classmethod
    def of(cls, row: RolloutRow) -> RolloutSpec:
        s = row.spec
        return cls(
            row.model, row.version, row.group, tuple(Stage.from_json(x) for x in s["stages"]),
            s["bundles"], float(s["soak_s"]), tuple(s["conditions"]), bool(s["rollback"]),
            float(s["job_timeout_s"]),
        )  # fmt: skip


def _t(moment: dt.datetime) -> str:
    return moment.isoformat()


def _at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


def start_rollout(
    store: FleetStore, spec: RolloutSpec, now: dt.datetime, rollout_id: str | None = None
) -> RolloutRow:
    """Plan a rollout and record it (state ``deploying``, nothing sent yet).

    The scope is the devices the operator assigned to the group that have reported a state
    (their profile decides their bundle); assigned devices never seen are left out and named
    in the ``start`` decision.

    Raises:
        RolloutError: a bad condition, another rollout of the model still running, no device
            in scope, a profile without a bundle, or an explicit stage naming a device outside
            the scope.
        StoreError: the store failed.
    """
    conditions = [parse_condition(c) for c in spec.conditions]
    for other in store.rollouts(limit=1000):
        if other.model == spec.model and State(other.state) not in FINAL:
            raise RolloutError(
                f"rollout {other.rollout_id} of {other.model} v{other.version} to "
                f"{other.group} is still {other.state}; wait for it to end or abort it "
                f"(edgepack-fleet rollout abort {other.rollout_id}) before starting another"
            )
    rid = rollout_id or f"rollout-{now:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    assigned = sorted(d for d, groups in store.memberships().items() if spec.group in groups)
    known = {d.device: d for d in store.devices(spec.group)}
    profiles = {d: p for d in assigned if (p := known[d].profile if d in known else None)}
    skipped = [d for d in assigned if d not in profiles]
    if not profiles:
        raise RolloutError(
            f"group {spec.group!r} has no device that reported a state; assign devices with "
            "`edgepack-fleet devices assign DEVICE --group GROUP` and keep the collector running"
        )
    unbundled = sorted({p for p in profiles.values() if p not in spec.bundles})
    if unbundled:
        raise RolloutError(
            f"{spec.model} v{spec.version} has no bundle for profile(s) {', '.join(unbundled)} "
            "that devices of the group run; build them with `edgepack build --profile ...`"
        )
    stage_of = plan(rid, profiles, spec.stages)
    rows = []
    for i, device in enumerate(sorted(profiles)):
        active = (known[device].models.get(spec.model) or {}).get("active")
        old = active if isinstance(active, int) else None
        rows.append(RolloutDeviceRow(rid, device, profiles[device], stage_of[device], old,
                                     f"{rid}-d{i:05d}", f"{rid}-r{i:05d}"))  # fmt: skip
    kinds = sorted(set(profiles.values()))
    counts = [
        {p: sum(1 for r in rows if r.stage == k and r.profile == p) for p in kinds}
        for k in range(len(spec.stages))
    ]
    row = RolloutRow(rid, spec.model, spec.version, spec.group, State.DEPLOYING.value, 0,
                     spec.to_json(), {"sent": False, "stage_started": _t(now)}, None, 0, now,
                     now)  # fmt: skip
    stages = ", ".join(f"{s} ({sum(c.values())})" for s, c in zip(spec.stages, counts, strict=True))
    reason = (
        f"rollout of {spec.model} v{spec.version} to {len(rows)} devices of {spec.group}: "
        f"stages {stages}; abort on {', '.join(map(str, conditions)) or 'nothing'}"
    )
    per_stage = zip(spec.stages, counts, strict=True)
    figures = {"stages": [{"stage": str(s), "new_devices": c} for s, c in per_stage],
               "skipped": skipped}  # fmt: skip
    store.create_rollout(row, rows, DecisionRow(rid, 0, now, 0, "start", reason, figures))
    return row


def request(store: FleetStore, rollout_id: str, what: str) -> RolloutRow:
    """Record an operator's request (pause, resume, abort, abort-no-rollback) for the
    controller's next step.

    Raises:
        RolloutError: an unknown rollout, an unknown request, or one that has already ended.
    """
    if what not in _REQUESTS:
        raise RolloutError(f"unknown request {what!r}; one of {', '.join(_REQUESTS)}")
    row = store.rollout(rollout_id)
    if row is None:
        raise RolloutError(
            f"no rollout {rollout_id!r}; list them with `edgepack-fleet rollout list`"
        )
    if State(row.state) in FINAL:
        raise RolloutError(
            f"rollout {rollout_id} has already ended ({row.state}); nothing to {what}"
        )
    store.request_rollout(rollout_id, what)
    return row


def live_figures(store: FleetStore, row: RolloutRow, now: dt.datetime) -> dict[str, Any]:
    """The figures a step would judge now (over the current soak while one runs), with each
    condition's verdict: what ``rollout status`` shows between decisions."""
    ctx = _Context(row, RolloutSpec.of(row), store.rollout_devices(row.rollout_id), now, store)
    figures = ctx.figures(window=True)
    verdicts = evaluate(_conditions(ctx.spec), figures, row.data.get("baseline"))
    figures["conditions"] = [v.to_json() for v in verdicts]
    return figures


@dataclass(frozen=True)
class _Move:
    event: str
    data: dict[str, Any]
    action: str | None = None  # the decision recorded with it (None: none)
    reason: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    stage: int | None = None  # the next stage, when it changes


@dataclass(frozen=True)
class _Context:
    row: RolloutRow
    spec: RolloutSpec
    devices: list[RolloutDeviceRow]
    now: dt.datetime
    store: FleetStore

    @property
    def state(self) -> State:
        return State(self.row.state)

    @property
    def label(self) -> str:
        k = self.row.stage
        return f"stage {k + 1}/{len(self.spec.stages)} ({self.spec.stages[k]})"

    def figures(self, *, window: bool) -> dict[str, Any]:
        data = self.row.data
        since = _at(data["soak_from"]) if window and data.get("soak_from") else None
        started = _at(data["stage_started"]) if data.get("stage_started") else None
        timeout = dt.timedelta(seconds=self.spec.job_timeout)
        return measure(self.store, self.row, self.devices, self.now, since, timeout, started)


class RolloutController:
    """Moves rollouts on; see the module docstring.

    Args:
        store: the fleet store (the collector writes jobs and reports there).
        sender: sends the signed commands (:class:`BrokerSender`).
        clock: the current moment (tests inject one).
        holder: this controller's name in the lease (default: host, pid and a random tag).
        lease: how long a lease lasts; every step renews it.
    """

    def __init__(
        self,
        store: FleetStore,
        sender: CommandSender,
        *,
        clock: Clock = utc_now,
        holder: str | None = None,
        lease: dt.timedelta = dt.timedelta(seconds=60),
    ) -> None:
        self.store, self.sender, self.clock, self.lease = store, sender, clock, lease
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"

    def acquire(self, rollout_id: str) -> None:
        """Take or renew the lease. Raises LeaseHeldError when another controller holds it."""
        now = self.clock()
        lease = self.store.acquire_lease(rollout_id, self.holder, now + self.lease, now)
        if lease.holder != self.holder:
            raise LeaseHeldError(
                f"rollout {rollout_id} is driven by {lease.holder} until "
                f"{lease.expires_at:%Y-%m-%d %H:%M:%S} UTC (its lease, renewed while it runs); "
                "stop that controller or wait for its lease to expire"
            )

    def release(self, rollout_id: str) -> None:
        """Give the lease back (if ours), so another controller may take over at once."""
        self.store.release_lease(rollout_id, self.holder)

    def step(self, rollout_id: str) -> list[DecisionRow]:
        """Renew the lease, then apply every move that is due now (at most a few).

        Returns:
            The decisions recorded (none while it waits).

        Raises:
            LeaseHeldError: another controller holds the lease.
            RolloutError: an unknown rollout, or another controller moved it meanwhile.
            BrokerError: a command could not be sent (nothing was recorded; the next step
                sends it again).
            StoreError: the store failed.
        """
        self.acquire(rollout_id)
        made: list[DecisionRow] = []
        for _ in range(_MAX_MOVES):
            row = self.store.rollout(rollout_id)
            if row is None:
                raise RolloutError(f"no rollout {rollout_id!r} in the store")
            state = State(row.state)
            if state in FINAL:
                break
            ctx = _Context(row, RolloutSpec.of(row), self.store.rollout_devices(rollout_id),
                           self.clock(), self.store)  # fmt: skip
            move = _requested(ctx) or _HANDLERS[state](self, ctx)
            if move is None:
                break
            made += self._apply(ctx, move)
        return made

    def _apply(self, ctx: _Context, move: _Move) -> list[DecisionRow]:
        row = ctx.row
        if move.event == "ignore":
            target = ctx.state
        elif (ctx.state, move.event) in TRANSITIONS:
            target = TRANSITIONS[(ctx.state, move.event)]
        else:  # a handler returned a move the table does not allow: a bug, said loudly
            raise RuntimeError(f"rollout {row.rollout_id}: no transition from {ctx.state.value} "
                               f"on {move.event!r}")  # fmt: skip
        stage = row.stage if move.stage is None else move.stage
        decisions = []
        if move.action is not None:
            decisions.append(DecisionRow(row.rollout_id, row.revision + 1, ctx.now, row.stage,
                                         move.action, move.reason, move.figures))  # fmt: skip
            log.info("rollout %s: %s: %s", row.rollout_id, move.action, move.reason)
        if not self.store.update_rollout(row, target.value, stage, move.data, decisions, ctx.now):
            raise RolloutError(
                f"rollout {row.rollout_id} was moved on by another controller meanwhile; "
                "this one stops (check `edgepack-fleet rollout status`)"
            )
        return decisions

    # -- the handlers: one per state; None means keep waiting -------------------------------

    def _deploying(self, ctx: _Context) -> _Move | None:
        row, spec, data = ctx.row, ctx.spec, dict(ctx.row.data)
        stage = [d for d in ctx.devices if d.stage == row.stage]
        if not data.get("sent"):
            jobs = [(d.device, d.deploy_job) for d in stage]
            self.sender.send("deploy", row.model, jobs, version=row.version, bundles=spec.bundles)
            names = [d.device for d in stage]
            # the job timeout runs from now: the stage may have waited (a dead broker, a
            # rollout recorded with --detach and driven later) since it was recorded
            sent = {**data, "sent": True, "stage_started": _t(ctx.now)}
            return _Move("sent", sent, "deploy",
                         f"{ctx.label}: deploy v{row.version} sent to {len(stage)} device(s)",
                         {"devices": names[:100], "count": len(names)})  # fmt: skip
        figures = ctx.figures(window=False)
        if figures["jobs"]["pending"]:
            return None
        verdicts = evaluate(_conditions(spec), figures, jobs_only=True)
        jobs = figures["jobs"]
        figures["conditions"] = [v.to_json() for v in verdicts]
        fired = [v for v in verdicts if v.triggered]
        if fired:
            return _Move("failed", data, "abort", f"{ctx.label}: {_why(fired)}", figures)
        until = ctx.now + dt.timedelta(seconds=spec.soak)
        reason = (f"{ctx.label}: {jobs['succeeded']} of {figures['staged']} deploys so far "
                  f"succeeded, {jobs['failed'] + jobs['timed_out']} failed; soaking "
                  f"{spec.soak:g} s until {until:%H:%M:%S}")  # fmt: skip
        return _Move("jobs_done", {**data, "soak_from": _t(ctx.now), "soak_until": _t(until)},
                     "wait", reason, figures)  # fmt: skip

    def _soaking(self, ctx: _Context) -> _Move | None:
        row, spec, data = ctx.row, ctx.spec, dict(ctx.row.data)
        figures = ctx.figures(window=True)
        verdicts = evaluate(_conditions(spec), figures, data.get("baseline"))
        figures["conditions"] = [v.to_json() for v in verdicts]
        fired = [v for v in verdicts if v.triggered]
        if fired:
            return _Move("condition", data, "abort", f"{ctx.label}: {_why(fired)}", figures)
        if ctx.now < _at(data["soak_until"]):
            return None
        old = {k: v for k, v in figures.get("old", {}).items() if v is not None}
        baseline = {**(data.get("baseline") or {}), **(old if old.get("devices") else {})}
        checked = "; ".join(f"{v.condition}: {v.note}" for v in verdicts) or "no conditions"
        if row.stage + 1 >= len(spec.stages):
            return _Move("last_passed", {**data, "baseline": baseline}, "complete",
                         f"{ctx.label} passed ({checked}); rollout complete", figures)  # fmt: skip
        nxt = {"sent": False, "stage_started": _t(ctx.now), "baseline": baseline}
        return _Move("passed", nxt, "advance",
                     f"{ctx.label} passed ({checked}); on to stage {row.stage + 2}", figures,
                     stage=row.stage + 1)  # fmt: skip

    def _paused(self, ctx: _Context) -> _Move | None:
        return None  # only an operator's request moves it (see _requested)

    def _aborting(self, ctx: _Context) -> _Move | None:
        row, data = ctx.row, dict(ctx.row.data)
        figures = ctx.figures(window=False)
        if figures["jobs"]["pending"] and self._stage_went_out(ctx):
            return None  # the stage's deploys first: one still running could land after
        targets = []
        for d in ctx.devices:
            runs = self.store.executions(d.deploy_job) if d.stage is not None else []
            e = runs[0] if runs else None
            if (
                e is not None
                and e.status is JobStatus.SUCCEEDED
                and (e.version_after == row.version and e.version_before != e.version_after)
            ):
                targets.append((d, e.version_before))
        if not targets or not data.get("rollback", ctx.spec.rollback):
            why = "no device to roll back" if targets == [] else "no rollback, as asked"
            upgraded = [d.device for d, _before in targets]
            return _Move("no_rollback", data, "done", f"aborted: {why}", {"upgraded": upgraded})
        # a device that had no version of the model before is returned to that: retired
        fresh = [d for d, before in targets if before is None]
        back = [d for d, before in targets if before is not None]
        for kind, chosen in (("rollback", back), ("retire", fresh)):
            if chosen:
                self.sender.send(kind, row.model, [(d.device, d.rollback_job) for d in chosen])
        names = [d.device for d, _before in targets]
        retired = f" ({len(fresh)} retired: they had no earlier version)" if fresh else ""
        return _Move("rollback_sent", {**data, "rollback_started": _t(ctx.now),
                                       "rolled_back": names},
                     "rollback", f"rollback sent to {len(names)} upgraded device(s){retired}",
                     {"devices": names[:100], "count": len(names),
                      "retired": [d.device for d in fresh][:100]})  # fmt: skip

    def _stage_went_out(self, ctx: _Context) -> bool:
        """Whether the current stage's deploys may be on their way: recorded as sent, or (a
        controller that sent them and stopped before recording it) reported by a device. A
        stage whose send failed (a dead broker) has nothing running to wait for."""
        if ctx.row.data.get("sent"):
            return True
        stage = (d for d in ctx.devices if d.stage == ctx.row.stage)
        return any(self.store.executions(d.deploy_job) for d in stage)

    def _rolling_back(self, ctx: _Context) -> _Move | None:
        data = dict(ctx.row.data)
        names = set(data.get("rolled_back") or ())
        late = ctx.now >= _at(data["rollback_started"]) + dt.timedelta(seconds=ctx.spec.job_timeout)
        outcome: dict[str, list[str]] = {"succeeded": [], "failed": [], "no_answer": []}
        for d in (d for d in ctx.devices if d.device in names):
            runs = self.store.executions(d.rollback_job)
            e = runs[0] if runs else None
            if e is not None and e.status is JobStatus.SUCCEEDED:
                outcome["succeeded"].append(d.device)
            elif e is not None and e.status in TERMINAL:
                outcome["failed"].append(f"{d.device}: {e.status.value} {e.reason or ''}".strip())
            elif not late:
                return None
            else:
                outcome["no_answer"].append(d.device)
        reason = (f"aborted: {len(outcome['succeeded'])} of {len(names)} device(s) rolled back"
                  + (f", {len(outcome['failed'])} failed" if outcome["failed"] else "")
                  + (f", {len(outcome['no_answer'])} did not answer" if outcome["no_answer"]
                     else ""))  # fmt: skip
        return _Move("rolled_back", data, "done", reason, outcome)


_HANDLERS: dict[State, Callable[[RolloutController, _Context], _Move | None]] = {
    State.DEPLOYING: RolloutController._deploying,
    State.SOAKING: RolloutController._soaking,
    State.PAUSED: RolloutController._paused,
    State.ABORTING: RolloutController._aborting,
    State.ROLLING_BACK: RolloutController._rolling_back,
}


def _conditions(spec: RolloutSpec) -> list[Any]:
    return [parse_condition(c) for c in spec.conditions]


def _why(fired: Sequence[Any]) -> str:
    return "; ".join(f"{v.condition} triggered: {v.note}" for v in fired)


def _requested(ctx: _Context) -> _Move | None:
    """The operator's request, applied where it may be (else consumed without a move)."""
    what, data, state = ctx.row.request, dict(ctx.row.data), ctx.state
    if what is None:
        return None
    if what.startswith("abort") and state in (_D, _S, _P):
        rollback = ctx.spec.rollback and what == "abort"
        figures = ctx.figures(window=False)
        return _Move("abort", {**data, "rollback": rollback}, "abort",
                     f"{ctx.label}: abort requested by an operator"
                     + ("" if rollback else ", without rollback"), figures)  # fmt: skip
    if what == "pause" and state in (_D, _S):
        figures = ctx.figures(window=state is _S)
        why = f"{ctx.label}: paused by an operator (was {state.value})"
        return _Move("pause", {**data, "paused_from": state.value}, "pause", why, figures)
    if what == "resume" and state is _P:
        back = State(data.get("paused_from") or _D.value)
        figures = ctx.figures(window=False)
        if back is _S:
            until = ctx.now + dt.timedelta(seconds=ctx.spec.soak)
            data.update(soak_from=_t(ctx.now), soak_until=_t(until))
            why = f"{ctx.label}: resumed; the soak starts again, until {until:%H:%M:%S}"
            return _Move("resume_soaking", data, "resume", why, figures)
        return _Move("resume_deploying", data, "resume", f"{ctx.label}: resumed", figures)
    return _Move("ignore", data)  # e.g. resume while running: nothing to do


def drive(
    controller: RolloutController,
    rollout_id: str,
    *,
    wait: Callable[[float], bool],
    poll: float = 5.0,
    report: Callable[[DecisionRow], None] = lambda _d: None,
    trouble: Callable[[Exception], None] = lambda _e: None,
) -> RolloutRow:
    """Step a rollout until it ends, or until ``wait(poll)`` returns True (asked to stop).

    A broker or store failure is handed to ``trouble`` and the step is tried again after the
    next wait (nothing was recorded for it). The lease is given back at the end.

    Raises:
        LeaseHeldError: another controller drives it.
        RolloutError: an unknown rollout, or another controller moved it meanwhile.
    """
    try:
        while True:
            try:
                for decision in controller.step(rollout_id):
                    report(decision)
            except (BrokerError, StoreError) as e:
                trouble(e)
            row = controller.store.rollout(rollout_id)
            if row is None:
                raise RolloutError(f"no rollout {rollout_id!r} in the store")
            if State(row.state) in FINAL or wait(poll):
                return row
    finally:
        try:
            controller.release(rollout_id)
        except StoreError as e:
            trouble(e)
