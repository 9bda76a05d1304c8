"""The live fleet console: a small web app over the collector's store, for operators.

``edgepack-fleet console`` (:mod:`edgepack.fleet._cli_console`) serves :func:`create_app`, a
Starlette application run by uvicorn. Its pages read the store through the same functions as
the CLI tables and the HTML report, and render them with Jinja2 (``templates/console*.j2``):

=============  ===============================================================================
page           what it shows
=============  ===============================================================================
``/devices``   devices and their health: online, profile, models, groups, last seen
``/jobs``      jobs (devices per status), staged rollouts (state, stage), policy actions
``/quality``   drift and quality per device and version; ``/report/MODEL`` is the HTML report's
               page with its plots (:func:`edgepack.fleet._report.build_report`)
``/models``    the model index (:func:`edgepack.fleet._model_index.model_index`)
``/audit``     the newest entries of the audit trail (:mod:`edgepack.fleet._audit`), by
               ``?model=``, ``?device=``, ``?kind=``
=============  ===============================================================================

**Live without a reload.** Each page's body is also served alone at ``/fragment/PAGE``; a few
lines of plain JavaScript fetch it every ``refresh`` seconds and swap it in. No build step, no
framework on the page.

**Who may look, who may act.** With a token (``--token-file``; required when the console is
bound to anything but loopback) every request must carry it: ``Authorization: Bearer TOKEN``,
or the ``edgepack_console`` cookie that opening ``/?token=TOKEN`` sets (HttpOnly, SameSite
strict); anything else is 401. The console is read-only unless an operator key is configured
(:class:`Actions`); then ``POST /action/...`` (roll back a model on a device or group, cancel a
job, pause or resume a rollout, approve or reject a policy action) needs the token in the form or
the header (never the cookie alone, so another site cannot make a browser post one), signs with
that key, and records the action in the audit trail (kind ``console.ACTION``, the key's id).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
from cryptography.hazmat.primitives.asymmetric import ec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from edgepack._clock import Clock, utc_now, utc_text
from edgepack.fleet._broker import BrokerOptions
from edgepack.fleet._database import FleetStore
from edgepack.fleet.exceptions import FleetError, StoreError
from edgepack.formats.exceptions import EdgepackError
from edgepack.formats.keys import key_id
from edgepack.formats.topics import NAME

__all__ = ["PAGES", "Actions", "create_app"]

PAGES = ("devices", "jobs", "quality", "models", "audit")
COOKIE = "edgepack_console"
_AUDIT_ROWS = 100


@dataclass(frozen=True)
class Actions:
    """What the console needs to act: the operator's key and the broker to send through."""

    key: ec.EllipticCurvePrivateKey
    broker: BrokerOptions

    @property
    def key_id(self) -> str:
        return key_id(self.key.public_key())


def _templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("edgepack.fleet", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["when"] = lambda moment: "-" if moment is None else utc_text(moment)
    return env


# -- what each page shows ------------------------------------------------------------------------


def _devices(store: FleetStore, now: datetime, query: Mapping[str, str]) -> dict[str, Any]:
    from edgepack.fleet._views import ago, installed_models, milliseconds, telemetry_rows

    serving: dict[str, list[str]] = {}
    for t in telemetry_rows(store, history=1):
        errors = sum(t.errors.values())
        serving.setdefault(t.device, []).append(
            f"{t.model} v{t.version}: {t.requests} req, {errors} err, p95 {milliseconds(t.p95)} ms"
        )
    rows = [
        {
            "device": d.device,
            "online": d.online,
            "profile": d.profile or "-",
            "models": installed_models(d.models),
            "health": d.health or "-",
            "groups": ", ".join(d.assigned) or "-",
            "seen": ago(d.last_seen, now),
            "serving": "; ".join(serving.get(d.device, [])) or "-",
        }
        for d in store.devices()
    ]
    return {"devices": rows}


def _jobs(store: FleetStore, now: datetime, query: Mapping[str, str]) -> dict[str, Any]:
    from edgepack.fleet._views import job_summaries

    jobs = [
        {
            "job_id": s.job.job_id,
            "kind": s.job.kind,
            "model": s.job.model,
            "version": s.job.version,
            "target": f"{s.job.target_type} {s.job.target}",
            "state": s.state,
            "issued": s.job.issued_at,
            "counts": ", ".join(f"{n} {k}" for k, n in sorted(s.counts.items())) or "-",
        }
        for s in job_summaries(store, now, limit=30)
    ]
    rollouts = [
        {
            "rollout_id": r.rollout_id,
            "model": r.model,
            "version": r.version,
            "group": r.group,
            "state": r.state,
            "stage": r.stage,
            "updated": r.updated_at,
            "running": r.state in ("deploying", "soaking", "paused"),
        }
        for r in store.rollouts(limit=20)
    ]
    return {"jobs": jobs, "rollouts": rollouts, "policies": store.policy_actions(limit=30)}


def _quality(store: FleetStore, now: datetime, query: Mapping[str, str]) -> dict[str, Any]:
    from edgepack.fleet._views import STATUS_GLYPHS, drift_rows, latest_quality, quality_text

    quality = latest_quality(store)
    drift = [
        {
            "device": r.device,
            "model": r.model,
            "version": r.version,
            "status": r.status,
            "worst": r.worst_text or "-",
            "drifting": ", ".join(r.drifting) or "-",
            "history": "".join(STATUS_GLYPHS.get(s, "?") for s in r.history),
            "quality": quality_text(quality.get((r.device, r.model))) or "-",
        }
        for r in drift_rows(store)
    ]
    seen = {(r["device"], r["model"]) for r in drift}
    only_quality = [
        {
            "device": d,
            "model": m,
            "version": p.get("version"),
            "status": "-",
            "worst": "-",
            "drifting": "-",
            "history": "",
            "quality": quality_text(p),
        }
        for (d, m), p in sorted(quality.items())
        if (d, m) not in seen
    ]
    rows = drift + only_quality
    return {"rows": rows, "models": sorted({str(r["model"]) for r in rows})}


def _models(store: FleetStore, now: datetime, query: Mapping[str, str]) -> dict[str, Any]:
    from edgepack.fleet._model_index import model_index

    return {"versions": model_index(store)}


def _audit(store: FleetStore, now: datetime, query: Mapping[str, str]) -> dict[str, Any]:
    from edgepack.fleet._audit import entries

    chosen = {k: v for k in ("model", "device", "kind") if NAME.match(v := query.get(k, ""))}
    found = entries(store, model=chosen.get("model"), device=chosen.get("device"),
                    kind=chosen.get("kind"), limit=_AUDIT_ROWS)  # fmt: skip
    return {"entries": list(reversed(found)), "filters": chosen}


_VIEWS: dict[str, Callable[[FleetStore, datetime, Mapping[str, str]], dict[str, Any]]] = {
    "devices": _devices,
    "jobs": _jobs,
    "quality": _quality,
    "models": _models,
    "audit": _audit,
}


# -- the app -------------------------------------------------------------------------------------


def create_app(
    store: FleetStore,
    *,
    token: str | None = None,
    actions: Actions | None = None,
    clock: Clock = utc_now,
    refresh: float = 2.0,
) -> Starlette:
    """The console's ASGI application.

    Args:
        store: the collector's store (read on each request; the console writes only what its
            actions record).
        token: required on every request when given (see the module docstring).
        actions: the operator key and broker; None: read-only.
        clock: the moment pages are rendered at (ages, job states).
        refresh: seconds between two fetches of a page's live part.

    Raises:
        ValueError: actions without a token (an action needs both).
    """
    if actions is not None and not token:
        raise ValueError(
            "the console's actions need a token as well as the operator key: give "
            "--token-file FILE (a line of random text) with --operator-key"
        )
    env = _templates()

    def matches(given: str) -> bool:
        return bool(token) and hmac.compare_digest(given.encode(), str(token).encode())

    def authorized(request: Request, *, post: bool = False) -> bool:
        """The token in the header, or (a page) the cookie or the query, or (an action) the
        form: never the cookie alone for an action, which another site could make one send."""
        if not token:
            return True
        offered = [request.headers.get("authorization", "").removeprefix("Bearer ").strip()]
        if post:
            offered.append(str(request.scope.get("edgepack_form_token", "")))
        else:
            offered += [request.cookies.get(COOKIE, ""), request.query_params.get("token", "")]
        return any(matches(given) for given in offered if given)

    def keep_token(request: Request, response: Response) -> Response:
        """Opened with a right ``?token=``: keep it in a cookie for the page's fetches."""
        given = request.query_params.get("token", "")
        if given and matches(given):
            response.set_cookie(COOKIE, given, httponly=True, samesite="strict")
        return response

    def denied() -> Response:
        return PlainTextResponse(
            "401: this console needs its token: open /?token=TOKEN once (a cookie keeps it), or "
            "send Authorization: Bearer TOKEN; the token is in the console's --token-file\n",
            status_code=401,
        )

    def context(page: str, query: Mapping[str, str]) -> dict[str, Any]:
        now = clock()
        return {
            "page": page,
            "pages": PAGES,
            "now": now,
            "refresh": refresh,
            "can_act": actions is not None,
            "token": token or "",
            **_VIEWS[page](store, now, query),
        }

    def render_page(request: Request) -> Response:
        page = request.path_params.get("page", "devices")
        if page not in PAGES:
            return PlainTextResponse(f"no page {page!r}; pages: {', '.join(PAGES)}\n", 404)
        if not authorized(request):
            return denied()
        html = env.get_template("console.html.j2").render(
            **context(page, request.query_params), message=None
        )
        return keep_token(request, HTMLResponse(html))

    def fragment(request: Request) -> Response:
        page = request.path_params["page"]
        if page not in PAGES:
            return PlainTextResponse(f"no page {page!r}\n", 404)
        if not authorized(request):
            return denied()
        return HTMLResponse(
            env.get_template("console_live.j2").render(**context(page, request.query_params))
        )

    def root(request: Request) -> Response:
        if not authorized(request):
            return denied()
        return keep_token(request, RedirectResponse("/devices", status_code=303))

    def report(request: Request) -> Response:
        if not authorized(request):
            return denied()
        model = request.path_params["model"]
        if not NAME.match(model):
            return PlainTextResponse("not a model name\n", 400)
        from edgepack.fleet._report import build_report

        return HTMLResponse(build_report(store, model, now=clock()))

    async def act(request: Request) -> Response:
        form = await request.form()
        request.scope["edgepack_form_token"] = str(form.get("token", ""))
        if not authorized(request, post=True):
            return denied()
        if actions is None:
            return PlainTextResponse(
                "403: this console is read-only: start it with --operator-key KEY (and "
                "--token-file) to act\n",
                status_code=403,
            )
        fields = {k: str(v) for k, v in form.items() if k != "token"}
        what = request.path_params["action"]
        from starlette.concurrency import run_in_threadpool

        try:
            done = await run_in_threadpool(_act, store, actions, what, fields, clock)
        except (EdgepackError, ValueError) as e:
            return PlainTextResponse(f"400: {what} failed: {e}\n", status_code=400)
        html = env.get_template("console.html.j2").render(**context("jobs", {}), message=done)
        return HTMLResponse(html)

    routes = [
        Route("/", root),
        Route("/fragment/{page}", fragment),
        Route("/report/{model}", report),
        Route("/action/{action:str}", act, methods=["POST"]),
        Route("/{page}", render_page),
    ]

    async def store_failed(request: Request, error: Exception) -> Response:
        return PlainTextResponse(f"503: {error}\n", status_code=503)  # e.g. the database is down

    return Starlette(routes=routes, exception_handlers={StoreError: store_failed})


def _field(fields: dict[str, str], name: str) -> str:
    value = fields.get(name, "").strip()
    if not NAME.match(value):
        raise ValueError(f"{name} must be 1-128 letters, digits, '_', '.', ':' or '-'")
    return value


def _act(
    store: FleetStore, actions: Actions, what: str, fields: dict[str, str], clock: Clock
) -> str:
    """Do one console action; returns what was done, in a sentence. Each is in the audit trail:
    its commands by the functions that send them, the operator's request as ``console.WHAT``."""
    from edgepack.fleet._audit import append

    now, by = clock(), actions.key_id
    record: dict[str, Any] = {"action": what, **fields}
    if what == "rollback":
        from edgepack.fleet._commands import publish_command

        model, target_type = _field(fields, "model"), fields.get("target_type", "device")
        if target_type not in ("device", "group"):
            raise ValueError("target_type must be device or group")
        target = {target_type: _field(fields, "target")}
        published = publish_command(actions.broker, "rollback", model, target, actions.key)
        record["job_id"] = published.job_id
        said = f"rollback {model} → {target_type} {target[target_type]}: job {published.job_id}"
    elif what == "cancel":
        from edgepack.fleet._commands import cancel_job

        canceled = cancel_job(
            actions.broker, store, actions.key, _field(fields, "job_id"), clock=clock
        )
        record["cancel_job_id"] = canceled.cancel_job_id
        said = f"canceled {canceled.job_id} ({len(canceled.unstarted)} device(s) had not started)"
    elif what == "rollout":
        from edgepack.fleet._rollout_controller import request

        verb = fields.get("request", "")
        if verb not in ("pause", "resume"):
            raise ValueError("request must be pause or resume")
        row = request(store, _field(fields, "rollout_id"), verb)
        said = f"asked rollout {row.rollout_id} to {verb}"
    elif what == "policy":
        from edgepack.fleet._policies import approve, reject
        from edgepack.fleet._rollout_controller import BrokerSender

        action_id, verb = _field(fields, "action_id"), fields.get("decision", "")
        if verb == "approve":
            approve(store, action_id, BrokerSender(actions.broker, actions.key), by, clock=clock)
        elif verb == "reject":
            reject(store, action_id, by=by, clock=clock)
        else:
            raise ValueError("decision must be approve or reject")
        said = f"{verb.removesuffix('e')}ed policy action {action_id}"
    else:
        raise ValueError(f"no action {what!r}: rollback, cancel, rollout or policy")
    record["done"] = said
    named = fields.get("model", "")
    try:
        append(
            store,
            f"console.{what}",
            record,
            at=now,
            key_id=by,
            model=named if NAME.match(named) else None,
        )
    except FleetError as e:  # done but not recorded: say so rather than pretend
        return f"{said}; NOT recorded in the audit trail: {e}"
    return said
