"""The live fleet console: real uvicorn on a loopback port, a real SQLite store, real chromium.

The pages are checked in Debian's headless chromium, driven over the DevTools protocol on a
pipe (``--remote-debugging-pipe``: no extra library): every page renders its section, and a
device the store gains while a page is open appears on it without a reload (a mark set in the
page's JavaScript survives). Token and key enforcement are checked over HTTP with httpx, and an
action (reject a policy action) is clicked in the browser. Waits are bounded polls.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from brokers import free_port, mosquitto
from click.testing import CliRunner
from conftest import KeyPair, _write_pair
from test_fleet_report import chromium  # noqa: F401  (the fixture)

from edgepack.fleet._audit import append, entries
from edgepack.fleet._broker import BrokerOptions
from edgepack.fleet._cli import cli
from edgepack.fleet._console import Actions, create_app
from edgepack.fleet._database import FleetStore, open_store
from edgepack.fleet._policies import PolicyEngine
from edgepack.fleet._policy_file import parse_policies
from edgepack.fleet._rollout import parse_stages
from edgepack.fleet._rollout_controller import RolloutSpec, start_rollout
from edgepack.formats.commands import read_command
from edgepack.formats.keys import load_private_key

WAIT = 20.0
TOKEN = "console-test-token-0123456789"
NOW = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
PLOTS = "document.querySelector('iframe').contentDocument.querySelectorAll('img')"


def poll(done: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + WAIT
    while not (found := done()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {WAIT:.0f} s")
        time.sleep(0.05)
    return found


_ticks = iter(range(1, 100_000))


def device(store: FleetStore, name: str, active: int = 2) -> None:
    ts = (NOW + dt.timedelta(milliseconds=next(_ticks))).isoformat()
    state = {
        "schema": 1,
        "device": name,
        "ts": ts,
        "online": True,
        "profile": "x86_64-cpu",
        "groups": [],
        "health": "ok",
        "models": {"churn": {"active": active, "previous": 1}},
    }
    store.record_state(name, state, NOW)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FleetStore]:
    opened = open_store(tmp_path / "fleet.db")
    for name in ("cam-1", "cam-2"):
        device(opened, name)
        opened.assign(name, ["store-42"], NOW)
    for seq, (name, status) in enumerate([("cam-1", "drift"), ("cam-2", "ok")], 1):
        payload = {"model": "churn", "version": 2, "status": status, "n": 100, "features": []}
        opened.record_event("drift", name, payload, seq, NOW)
    quality = {
        "model": "churn",
        "version": 2,
        "status": "degraded",
        "labeled": 200,
        "metrics": {"accuracy": 0.61},
        "reference": {"accuracy": 0.9},
    }
    opened.record_event("quality", "cam-1", quality, 1, NOW)
    served = {
        "models": [
            {
                "model": "churn",
                "version": 2,
                "requests": 5,
                "errors": {"x": 1},
                "latency_ms": {"p95": 3.25},
            }
        ]
    }
    opened.record_event("telemetry", "cam-1", served, 1, NOW)
    rules = parse_policies(
        '[[rule]]\nname = "floor"\nquality_below = 0.8\naction = "rollback"\napproval = true\n'
    )
    PolicyEngine(opened, rules, clock=lambda: NOW).run()  # one pending action
    bundles = {"x86_64-cpu": {"url": "http://127.0.0.1:9/b", "sha256": "0" * 64, "size": 1}}
    spec = RolloutSpec("churn", 3, "store-42", tuple(parse_stages("50%,100%")), bundles)
    start_rollout(opened, spec, NOW, rollout_id="rollout-console-1")
    append(opened, "note", {"text": "hello"}, at=NOW, model="churn", version=2)
    yield opened
    opened.close()


class Served:
    """The console app under uvicorn on a free loopback port, in a thread."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        poll(lambda: self.server.started, "the console started")
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def serve() -> Iterator[Callable[..., Served]]:
    running: list[Served] = []

    def start(app: Any) -> Served:
        running.append(Served(app))
        return running[-1]

    yield start
    for served in running:
        served.stop()


@pytest.fixture
def ops(tmp_path: Path) -> KeyPair:
    return _write_pair(tmp_path / "ops", "ops")


def test_the_token_is_enforced_and_actions_need_the_key(
    store: FleetStore, serve: Callable[..., Served], ops: KeyPair
) -> None:
    read_only = serve(create_app(store, token=TOKEN, refresh=0.2))
    with httpx.Client(base_url=read_only.url, timeout=10, follow_redirects=True) as client:
        for path in ("/devices", "/fragment/jobs", "/report/churn", "/audit"):
            assert client.get(path).status_code == 401, path
        assert client.get("/devices", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = client.get("/jobs", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200
        assert "read-only" in ok.text
        assert "/action/policy" not in ok.text  # no buttons without the key
        wrong = client.get("/?token=not-the-token")
        assert wrong.status_code == 401
        assert "set-cookie" not in wrong.headers
        url, stale_cookie = f"{read_only.url}/devices?token={TOKEN}", {"edgepack_console": "old"}
        stale = httpx.get(url, cookies=stale_cookie, timeout=10)
        assert stale.status_code == 200  # a right token in the query beats a stale cookie
        opened = client.get(f"/?token={TOKEN}")  # sets the cookie the page's fetches carry
        assert opened.status_code == 200
        assert client.get("/fragment/devices").status_code == 200
        devices = client.get("/fragment/devices").text
        assert "churn v2: 5 req, 1 err, p95 3.25 ms" in devices
        notes = client.get("/audit?kind=note").text
        assert "note" in notes
        assert "policy.pending" not in notes
        assert "policy.pending" in client.get("/fragment/audit").text
        assert "policy.pending" not in client.get("/fragment/audit?kind=note").text
        plots = client.get("/report/churn")  # the HTML report's page, with its plots
        assert plots.status_code == 200
        assert "data:image/png;base64," in plots.text
        posted = client.post(
            "/action/rollout",
            data={"token": TOKEN, "request": "pause", "rollout_id": "rollout-console-1"},
        )
        assert posted.status_code == 403
        assert "read-only" in posted.text
    key = load_private_key(ops.private.read_bytes())
    actions = Actions(key, BrokerOptions(host="127.0.0.1", port=free_port()))
    acting = serve(create_app(store, token=TOKEN, actions=actions, refresh=0.2))
    with httpx.Client(base_url=acting.url, timeout=10, follow_redirects=True) as client:
        client.get(f"/?token={TOKEN}")
        pause = {"rollout_id": "rollout-console-1", "request": "pause"}
        assert client.post("/action/rollout", data=pause).status_code == 401  # the cookie alone
        done = client.post("/action/rollout", data={**pause, "token": TOKEN})
        assert done.status_code == 200, done.text
        assert "asked rollout rollout-console-1 to pause" in done.text
    row = store.rollout("rollout-console-1")
    assert row is not None
    assert row.request == "pause"
    (entry,) = entries(store, kind="console.rollout")
    assert entry.key_id == actions.key_id
    assert entry.payload["request"] == "pause"
    assert entry.payload["done"] == "asked rollout rollout-console-1 to pause"
    with pytest.raises(ValueError, match="need a token"):
        create_app(store, actions=actions)


def test_the_console_refuses_to_start_exposed_without_a_token(tmp_path: Path, ops: KeyPair) -> None:
    db = tmp_path / "fleet.db"
    open_store(db).close()
    runner = CliRunner()
    exposed = runner.invoke(cli, ["--store", str(db), "console", "--host", "0.0.0.0"])
    assert exposed.exit_code == 2
    assert "without a token" in exposed.output
    keyed = runner.invoke(cli, ["--store", str(db), "console", "--operator-key", str(ops.private)])
    assert keyed.exit_code == 2
    assert "give --token-file FILE too" in keyed.output
    short = tmp_path / "token"
    short.write_text("abc\n")
    weak = runner.invoke(cli, ["--store", str(db), "console", "--token-file", str(short)])
    assert weak.exit_code == 1
    assert "at least 16" in weak.output


class Browser:
    """Headless chromium driven over the DevTools protocol on a pipe (fds 3 and 4)."""

    def __init__(self, binary: str, profile: Path) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        args = [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--remote-debugging-pipe",
            "about:blank",
        ]

        # chromium reads the protocol on fd 3 and writes on fd 4: bash puts the pipes there
        # (no preexec_fn: the console's server thread is running; dash takes one-digit fds only)
        shell = f'exec "$0" "$@" 3<&{to_chrome_r} 4>&{from_chrome_w}'
        self.process = subprocess.Popen(
            ["bash", "-c", shell, *args],
            pass_fds=(to_chrome_r, from_chrome_w),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._id, self._buffer, self.session = 0, b"", ""

    def call(self, method: str, session: str = "", **params: Any) -> dict[str, Any]:
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                answer = json.loads(raw)
                if answer.get("id") == self._id:
                    if "error" in answer:
                        raise AssertionError(f"{method}: {answer['error']}")
                    return dict(answer.get("result", {}))
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                raise AssertionError("chromium closed the DevTools pipe")
            self._buffer += chunk
        raise AssertionError(f"{method}: no answer within {WAIT:.0f} s")

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", url=url)["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        self.call("Runtime.enable", self.session)
        poll(
            lambda: (
                self.js("document.readyState === 'complete' && location.href") == url
                or self.js("document.body && document.body.dataset.page")
            ),
            f"{url} loaded",
        )

    def js(self, expression: str) -> Any:
        result = self.call(
            "Runtime.evaluate", self.session, expression=expression, returnByValue=True
        )
        return result.get("result", {}).get("value")

    def close(self) -> None:
        self.process.kill()
        self.process.wait(10)
        os.close(self._to_chrome)
        os.close(self._from_chrome)


@pytest.fixture
def browser(chromium: str, tmp_path: Path) -> Iterator[Browser]:  # noqa: F811
    opened = Browser(chromium, tmp_path / "profile")
    yield opened
    opened.close()


def test_pages_render_and_update_live_in_headless_chromium(
    store: FleetStore, serve: Callable[..., Served], browser: Browser, ops: KeyPair
) -> None:
    key = load_private_key(ops.private.read_bytes())
    actions = Actions(key, BrokerOptions(host="127.0.0.1", port=free_port()))
    served = serve(create_app(store, token=TOKEN, actions=actions, refresh=0.2))
    browser.open(f"{served.url}/devices?token={TOKEN}")
    assert browser.js("document.querySelectorAll('#devices tr[data-device]').length") == 2
    expected = {
        "jobs": ["#rollouts [data-rollout='rollout-console-1']", "#policies [data-policy]"],
        "quality": ["#quality [data-device='cam-1']", "iframe[src='/report/churn']"],
        "models": ["#models"],
        "audit": ["#audit tr[data-seq]"],
    }
    for page, selectors in expected.items():
        browser.js(f"location.href = '/{page}'")
        poll(lambda p=page: browser.js("document.body.dataset.page") == p, f"{page} opened")
        poll(lambda: browser.js("document.readyState") == "complete", f"{page} loaded")
        for selector in selectors:
            found = browser.js(f"document.querySelector({json.dumps(selector)}) !== null")
            assert found, f"{page}: {selector} not on the page"
        if page == "quality":
            assert "accuracy 0.61" in browser.js("document.querySelector('#live').innerText")
            poll(lambda: browser.js(f"({PLOTS} || []).length") >= 2, "the report's plots")

    # a live update: a device appears while the page stays open (the mark survives: no reload)
    browser.js("location.href = '/devices'")
    poll(lambda: browser.js("document.body.dataset.page") == "devices", "devices opened")
    poll(lambda: browser.js("document.readyState") == "complete", "devices loaded")
    browser.js("window.stillTheSamePage = true")
    poll(lambda: int(browser.js("document.body.dataset.updates || '0'")) >= 1, "a first update")
    assert browser.js("document.querySelector(\"[data-device='cam-9']\")") is None
    device(store, "cam-9", active=3)
    poll(
        lambda: browser.js("document.querySelector(\"[data-device='cam-9']\") !== null"),
        "cam-9 on the open page",
    )
    assert browser.js("window.stillTheSamePage") is True
    assert "churn@3" in browser.js("document.querySelector(\"[data-device='cam-9']\").innerText")

    # an action clicked in the page: reject the pending policy action (token in the form)
    (pending,) = store.policy_actions("pending")
    browser.js("location.href = '/jobs'")
    poll(lambda: browser.js("document.body.dataset.page") == "jobs", "jobs opened")
    poll(lambda: browser.js("document.readyState") == "complete", "jobs loaded")
    button = f"[data-policy='{pending.action_id}'] button[value='reject']"
    browser.js(f"document.querySelector({json.dumps(button)}).click()")
    poll(
        lambda: (store.policy_action(pending.action_id) or pending).state == "rejected",
        "the action rejected",
    )
    poll(
        lambda: browser.js("(document.getElementById('message') || {}).innerText || ''"),
        "the message shown",
    )
    assert "rejected policy action" in browser.js("document.getElementById('message').innerText")
    kinds = [e.kind for e in entries(store)]
    assert kinds[-2:] == ["policy.reject", "console.policy"]
    assert entries(store, kind="console.policy")[0].key_id == actions.key_id


def test_a_rollback_from_the_console_is_signed_and_published(
    store: FleetStore, serve: Callable[..., Served], ops: KeyPair, tmp_path: Path
) -> None:
    with mosquitto(tmp_path / "broker") as broker:
        key = load_private_key(ops.private.read_bytes())
        actions = Actions(key, BrokerOptions(host=broker.host, port=broker.port, prefix="c/v1"))
        served = serve(create_app(store, token=TOKEN, actions=actions))
        with httpx.Client(base_url=served.url, timeout=20, follow_redirects=True) as client:
            form = {"token": TOKEN, "model": "churn", "target_type": "device", "target": "cam-1"}
            done = client.post("/action/rollback", data=form)
            assert done.status_code == 200, done.text
            assert "rollback churn → device cam-1: job rollback-" in done.text
            bad = client.post("/action/rollback", data={**form, "target": "no/such"})
            assert bad.status_code == 400
        (entry,) = entries(store, kind="console.rollback")
        assert entry.payload["job_id"].startswith("rollback-")
        assert entry.key_id == actions.key_id
        shown = subprocess.run(
            [
                "mosquitto_sub",
                "-h",
                broker.host,
                "-p",
                str(broker.port),
                "-t",
                "c/v1/#",
                "-C",
                "1",
                "-W",
                "5",
            ],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        command = read_command(shown.stdout.strip().encode(), [key.public_key()])  # verified
        assert (command.job_id, command.kind.value) == (entry.payload["job_id"], "rollback")
        assert command.target == {"device": "cam-1"}


def test_a_store_that_fails_is_a_503_with_the_reason(
    tmp_path: Path, serve: Callable[..., Served]
) -> None:
    broken = open_store(tmp_path / "broken.db")
    served = serve(create_app(broken))
    broken.close()  # every query now fails
    answer = httpx.get(f"{served.url}/devices", timeout=10)
    assert answer.status_code == 503
    assert "fleet store" in answer.text
