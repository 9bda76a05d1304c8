"""The wire formats' parsers, table-driven and fast: commands, every MQTT payload, topic names.

Everything here is pure (bytes in, a validated object or an error out; no broker, no clock: the
device's "now" is passed in). The command table is the device's threat model in one place: each
row is one lie (a forged or untrusted signature, an expired or future command, one for another
device or group, a field of the wrong type, an oversized, deeply nested or huge-integer payload,
a newer schema) and the reason the device would report with ``REJECTED``. The message tables
check a round trip through each ``build_*``/``parse_*`` pair, then one malformed variant per row.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from edgepack.formats.commands import (
    COMMAND_PAYLOAD_TYPE,
    BundleRef,
    CommandKind,
    make_command,
    open_command,
    peek_command,
    read_command,
)
from edgepack.formats.dsse import dsse_sign
from edgepack.formats.exceptions import CommandError, MessageError
from edgepack.formats.keys import generate_private_key
from edgepack.formats.messages import (
    MAX_DEPTH,
    MAX_MESSAGE_BYTES,
    TERMINAL,
    CollectorPresence,
    DeviceOffline,
    DeviceState,
    JobStatus,
    JobStep,
    ModelState,
    PendingAnswer,
    PendingGet,
    PresencePing,
    ReportKind,
    build_collector_presence,
    build_device_offline,
    build_device_state,
    build_job_status,
    build_pending_answer,
    build_pending_get,
    build_presence_ping,
    build_report,
    decode_json,
    parse_collector_presence,
    parse_device_state,
    parse_job_status,
    parse_pending_answer,
    parse_pending_get,
    parse_presence_ping,
    parse_report,
)
from edgepack.formats.topics import Topic, TopicKind, Topics, parse_topic

NOW = dt.datetime(2026, 11, 26, 17, 0, tzinfo=dt.timezone.utc)
OPERATOR = generate_private_key()
STRANGER = generate_private_key()
TRUSTED = [OPERATOR.public_key()]
BUNDLE = {"url": "http://fleet/iris-2-x86_64-cpu.edgepack", "sha256": "ab" * 32, "size": 4493}


def _payload(**changes: Any) -> dict[str, Any]:
    """A valid deploy for cam-1, issued a minute ago; ``None`` in ``changes`` drops a field."""
    payload: dict[str, Any] = {
        "schema": 1,
        "kind": "deploy",
        "job_id": "deploy-20261126T165900-4ac93c",
        "model": "iris",
        "version": 2,
        "bundles": {"x86_64-cpu": dict(BUNDLE)},
        "target": {"device": "cam-1"},
        "issued_at": (NOW - dt.timedelta(minutes=1)).isoformat(),
        "expires_at": (NOW + dt.timedelta(days=7)).isoformat(),
    }
    payload.update(changes)
    return {k: v for k, v in payload.items() if v is not None}


def _sign(body: bytes, key: ec.EllipticCurvePrivateKey = OPERATOR) -> bytes:
    return json.dumps(dsse_sign(COMMAND_PAYLOAD_TYPE, body, key)).encode()


def signed(**changes: Any) -> bytes:
    return _sign(json.dumps(_payload(**changes)).encode())


def _forged() -> bytes:
    envelope = json.loads(signed())
    sig = base64.b64decode(envelope["signatures"][0]["sig"])
    envelope["signatures"][0]["sig"] = base64.b64encode(sig[:-1] + bytes([sig[-1] ^ 1])).decode()
    return json.dumps(envelope).encode()


def _tampered() -> bytes:
    envelope = json.loads(signed())
    envelope["payload"] = base64.b64encode(json.dumps(_payload(version=3)).encode()).decode()
    return json.dumps(envelope).encode()


def _other_type() -> bytes:
    envelope = dsse_sign("application/json", json.dumps(_payload()).encode(), OPERATOR)
    return json.dumps(envelope).encode()


def _nested() -> bytes:
    deep: Any = "x"
    for _ in range(MAX_DEPTH + 4):
        deep = {"a": deep}
    return signed(note=deep)


def _oversized() -> bytes:
    return signed(note="x" * MAX_MESSAGE_BYTES)


# name -> (the command bytes, the reason the device reports)
COMMANDS: dict[str, tuple[Callable[[], bytes], str]] = {
    "forged signature": (_forged, "signature by trusted key .* does not verify"),
    "payload changed after signing": (_tampered, "does not verify: content altered"),
    "untrusted key": (
        lambda: _sign(json.dumps(_payload()).encode(), STRANGER),
        "signed by key .*, which is not among the 1 trusted keys",
    ),
    "unsigned": (lambda: json.dumps(_payload()).encode(), "not a signed DSSE envelope"),
    "not json": (lambda: b"{deploy iris", "command is not valid JSON"),
    "another payload type": (_other_type, "payload type is 'application/json'"),
    "expired": (
        lambda: signed(expires_at=(NOW - dt.timedelta(seconds=1)).isoformat()),
        "command deploy-20261126T165900-4ac93c expired at 2026-11-26T16:59:59",
    ),
    "issued in the future": (
        lambda: signed(issued_at=(NOW + dt.timedelta(minutes=6)).isoformat()),
        r"is issued in the future \(2026-11-26T17:06:00\+00:00\)",
    ),
    "expires before issued": (
        lambda: signed(expires_at=(NOW - dt.timedelta(minutes=2)).isoformat()),
        "expires before it is issued",
    ),
    "for another device": (
        lambda: signed(target={"device": "cam-2"}),
        "command is for device 'cam-2', not 'cam-1'",
    ),
    "for another group": (
        lambda: signed(target={"group": "eu"}),
        "command is for group 'eu', which cam-1 is not in",
    ),
    "unknown kind": (
        lambda: signed(kind="reboot"),
        "field 'kind' must be one of deploy, rollback, retire, cancel, .*not 'reboot'",
    ),
    "kind not a string": (lambda: signed(kind=1), "field 'kind' must be one of"),
    "no job id": (lambda: signed(job_id=None), "field 'job_id' must be a valid name, not None"),
    "job id not a string": (lambda: signed(job_id=7), "field 'job_id' must be a valid name"),
    "job id with a slash": (lambda: signed(job_id="a/b"), "field 'job_id' must be a valid name"),
    "job id a wildcard": (lambda: signed(job_id="+"), "field 'job_id' must be a valid name"),
    "model not a string": (lambda: signed(model=["iris"]), "field 'model' must be a string"),
    "model a bad name": (lambda: signed(model="ir is"), "field 'model': model name 'ir is'"),
    "target a string": (lambda: signed(target="cam-1"), "target must name one device or one"),
    "target names two": (
        lambda: signed(target={"device": "cam-1", "group": "eu"}),
        "target must name one device or one group",
    ),
    "target not a name": (lambda: signed(target={"device": 1}), "target must name one device"),
    "target a wildcard": (lambda: signed(target={"device": "#"}), "target must name one device"),
    "issued_at a number": (
        lambda: signed(issued_at=1795712700),
        "field 'issued_at' must be an ISO 8601 time",
    ),
    "issued_at not a time": (
        lambda: signed(issued_at="yesterday"),
        "field 'issued_at' is not an ISO time: 'yesterday'",
    ),
    "issued_at without zone": (
        lambda: signed(issued_at="2026-11-26T16:59:00"),
        "field 'issued_at' has no time zone",
    ),
    "no expires_at": (lambda: signed(expires_at=None), "field 'expires_at' must be an ISO 8601"),
    "version as text": (lambda: signed(version="2"), "field 'version' must be an integer >= 0"),
    "version a boolean": (lambda: signed(version=True), "field 'version' must be an integer"),
    "version negative": (lambda: signed(version=-1), "field 'version' must be an integer >= 0"),
    "deploy without version": (lambda: signed(version=None), "a deploy names the version"),
    "bundles a list": (lambda: signed(bundles=[BUNDLE]), "deploy command has no 'bundles'"),
    "bundles empty": (lambda: signed(bundles={}), "deploy command has no 'bundles'"),
    "bundle not an object": (lambda: signed(bundles={"p": "x"}), "bundle entry for 'p' needs"),
    "bundle url not http": (
        lambda: signed(bundles={"p": {**BUNDLE, "url": "file:///etc/passwd"}}),
        "bundle url for 'p' must be http",
    ),
    "bundle sha256 short": (
        lambda: signed(bundles={"p": {**BUNDLE, "sha256": "ab"}}),
        "needs a sha256 .64 hex digits.",
    ),
    "bundle sha256 uppercase": (
        lambda: signed(bundles={"p": {**BUNDLE, "sha256": "AB" * 32}}),
        "needs a sha256",
    ),
    "bundle size zero": (
        lambda: signed(bundles={"p": {**BUNDLE, "size": 0}}),
        "needs a positive 'size'",
    ),
    "bundle size a boolean": (
        lambda: signed(bundles={"p": {**BUNDLE, "size": True}}),
        "needs a positive 'size'",
    ),
    "no schema": (lambda: signed(schema=None), "command payload has no valid 'schema' version"),
    "schema as text": (lambda: signed(schema="1"), "has no valid 'schema' version"),
    "newer schema": (
        lambda: signed(schema=2),
        "command payload uses schema 2, newer than this edgepack understands .1.: upgrade",
    ),
    "oversized": (_oversized, f"command is .* bytes, above the limit of {MAX_MESSAGE_BYTES}"),
    "deeply nested": (_nested, f"command payload is nested more than {MAX_DEPTH} levels deep"),
    "huge integer": (
        lambda: signed(version=10**40),
        "command payload holds an integer of 41 digits .at most 32.",
    ),
    "payload not an object": (lambda: _sign(b"[1, 2]"), "command payload must be a JSON object"),
}


@pytest.mark.parametrize("case", list(COMMANDS))
def test_a_refused_command_says_why(case: str) -> None:
    make, reason = COMMANDS[case]
    with pytest.raises(CommandError, match=reason) as caught:
        open_command(make(), TRUSTED, device="cam-1", groups=("store-42",), now=NOW)
    assert isinstance(caught.value, MessageError)  # one family for every bad message


def test_a_valid_command_opens_into_typed_fields() -> None:
    command = open_command(signed(), TRUSTED, device="cam-1", now=NOW)
    assert command.kind is CommandKind.DEPLOY
    assert (command.job_id, command.model, command.version) == (
        "deploy-20261126T165900-4ac93c",
        "iris",
        2,
    )
    assert command.target == {"device": "cam-1"}
    assert command.bundle_for("x86_64-cpu") == BundleRef(**BUNDLE)
    assert command.expires_at - command.issued_at == dt.timedelta(days=7, minutes=1)
    assert len(command.key_id) == 64
    with pytest.raises(CommandError, match=r"no bundle for profile 'arm64' \(it has x86_64-cpu\)"):
        command.bundle_for("arm64")
    group = open_command(
        signed(target={"group": "store-42"}), TRUSTED, device="cam-1", groups=["store-42"], now=NOW
    )
    assert group.target == {"group": "store-42"}
    within_skew = signed(issued_at=(NOW + dt.timedelta(minutes=4)).isoformat())
    assert open_command(within_skew, TRUSTED, device="cam-1", now=NOW).job_id


def test_make_command_round_trips_and_refuses_misuse() -> None:
    _job_id, raw = make_command(
        "rollback", "iris", {"group": "store-42"}, OPERATOR, issued_at=NOW, job_id="rb-1"
    )
    read = read_command(raw, None)  # the collector may record without the keys
    assert (read.kind, read.job_id, read.key_id, read.raw) == (
        CommandKind.ROLLBACK,
        "rb-1",
        "",
        raw,
    )
    assert read.version is None
    assert not read.bundles
    assert json.loads(base64.b64decode(json.loads(raw)["payload"]))["kind"] == "rollback"
    with pytest.raises(ValueError, match="'reboot' is not a valid CommandKind"):
        make_command("reboot", "iris", {"device": "cam-1"}, OPERATOR)
    with pytest.raises(ValueError, match="target must be"):
        make_command("retire", "iris", {"device": "a/b"}, OPERATOR)
    with pytest.raises(ValueError, match="a deploy needs a version"):
        make_command(CommandKind.DEPLOY, "iris", {"device": "cam-1"}, OPERATOR, version=2)


@pytest.mark.parametrize(
    ("raw", "job_id", "issued_at"),
    [
        (signed(), "deploy-20261126T165900-4ac93c", "2026-11-26T16:59:00+00:00"),
        (signed(schema=2), "deploy-20261126T165900-4ac93c", "2026-11-26T16:59:00+00:00"),
        (_forged(), "deploy-20261126T165900-4ac93c", "2026-11-26T16:59:00+00:00"),
        (signed(job_id="a/#"), None, "2026-11-26T16:59:00+00:00"),  # unsafe in a topic
        (signed(schema=None), None, "2026-11-26T16:59:00+00:00"),
        (json.dumps(_payload()).encode(), None, ""),  # no envelope
        (b"\xff" * 10, None, ""),
        (b'{"payload": "not base64!"}', None, ""),
    ],
)
def test_peek_reads_what_a_refusal_is_reported_against(
    raw: bytes, job_id: str | None, issued_at: str
) -> None:
    peek = peek_command(raw)
    assert (peek.job_id, peek.issued_at) == (job_id, issued_at)


# -- bounded JSON ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"x" * (MAX_MESSAGE_BYTES + 1), "above the limit"),
        (b'{"a":' + b"[" * 40 + b"1" + b"]" * 40 + b"}", "nested more than 16 levels deep"),
        (b"[" * 100_000, "nested more than 16|not valid JSON"),  # C parser's own recursion limit
        (b'{"n": -' + b"9" * 5000 + b"}", "integer of 5000 digits"),
        (b'{"a": 1,}', "not valid JSON"),
        (b"\xff\xfe\x00", "not valid JSON"),
        (b"null", "must be a JSON object, not NoneType"),
        (b'{"schema": 0}', "no valid 'schema' version"),
        (b'{"schema": true}', "no valid 'schema' version"),
        (b'{"schema": 7}', "uses schema 7, newer than this edgepack understands"),
    ],
)
def test_decode_json_is_bounded(raw: bytes, says: str) -> None:
    with pytest.raises(MessageError, match=says):
        decode_json(raw, "payload")


def test_decode_json_accepts_what_is_within_bounds() -> None:
    nested: Any = 1
    for _ in range(MAX_DEPTH - 1):
        nested = [nested]
    raw = json.dumps({"schema": 1, "deep": nested, "n": 10**31, "x": " " * 1000}).encode()
    assert decode_json(raw, "payload")["n"] == 10**31  # 32 digits: at the bound
    assert decode_json(b'{"free": "form"}', "x", schema=False) == {"free": "form"}


# -- job status -----------------------------------------------------------------------------------


def _status(**changes: Any) -> bytes:
    body = json.loads(
        build_job_status(
            "deploy-1",
            "cam-1",
            JobStatus.IN_PROGRESS,
            model="iris",
            step=JobStep.HEALTH_CHECK,
            version_before=1,
            seq=5,
            ts=NOW,
        )
    )
    body.update(changes)
    return json.dumps({k: v for k, v in body.items() if v != "<drop>"}).encode()


def test_job_status_round_trip() -> None:
    raw = build_job_status(
        "deploy-1",
        "cam-1",
        JobStatus.SUCCEEDED,
        model="iris",
        version_before=1,
        version_after=2,
        seq=8,
        ts=NOW,
    )
    assert json.loads(raw) == {
        "schema": 1, "job_id": "deploy-1", "device": "cam-1", "status": "SUCCEEDED",
        "model": "iris", "step": None, "reason": None, "version_before": 1, "version_after": 2,
        "seq": 8, "ts": "2026-11-26T17:00:00+00:00",
    }  # fmt: skip
    update = parse_job_status(raw, device="cam-1")
    assert (update.status, update.step, update.seq, update.ts) == (
        JobStatus.SUCCEEDED,
        None,
        8,
        NOW,
    )
    assert update.status in TERMINAL
    assert parse_job_status(_status()).step is JobStep.HEALTH_CHECK
    assert json.loads(_status())["step"] == "health-check"  # enums are written as their text


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (_status(job_id="<drop>"), "field 'job_id' must be a valid name, not None"),
        (_status(job_id="a/b"), "field 'job_id' must be a valid name"),
        (_status(device=3), "field 'device' must be a valid name, not 3"),
        (_status(status="DONE"), "field 'status' must be one of QUEUED, IN_PROGRESS, SUCCEEDED"),
        (_status(status=None), "field 'status' must be one of"),
        (_status(step="download"), "field 'step' must be one of downloading, verifying"),
        (_status(seq="5"), "field 'seq' must be an integer >= 0, not '5'"),
        (_status(seq=-1), "field 'seq' must be an integer >= 0"),
        (_status(seq=True), "field 'seq' must be an integer"),
        (_status(model=4), "field 'model' must be a string"),
        (_status(reason=["no"]), "field 'reason' must be a string"),
        (_status(version_before="1"), "field 'version_before' must be an integer"),
        (_status(version_after=2.5), "field 'version_after' must be an integer"),
        (_status(ts="yesterday"), "field 'ts' must be an ISO 8601 time"),
        (_status(schema=2), "job status uses schema 2"),
        (_status(device="cam-2"), "job status from 'cam-2' on the topic of 'cam-1'"),
    ],
)
def test_malformed_job_status_is_refused(raw: bytes, says: str) -> None:
    with pytest.raises(MessageError, match=says):
        parse_job_status(raw, device="cam-1")


def test_job_status_build_refuses_unknown_values() -> None:
    with pytest.raises(ValueError, match="'DONE' is not a valid JobStatus"):
        build_job_status("j", "cam-1", "DONE")  # type: ignore[arg-type]


# -- device state and Last Will -------------------------------------------------------------------


def _state(**changes: Any) -> bytes:
    body = json.loads(
        build_device_state(
            "cam-1",
            profile="x86_64-cpu",
            agent_version="0.1.0",
            groups=["store-42"],
            models={"iris": ModelState(2, 1, 2)},
            health="ok",
            session="a4d2f6ff5916",
            ts=NOW,
        )
    )
    body.update(changes)
    return json.dumps(body).encode()


def test_device_state_and_will_round_trip() -> None:
    assert json.loads(_state()) == {
        "schema": 1, "device": "cam-1", "online": True, "profile": "x86_64-cpu",
        "agent_version": "0.1.0", "groups": ["store-42"],
        "models": {"iris": {"active": 2, "previous": 1, "serving": 2}}, "health": "ok",
        "ts": "2026-11-26T17:00:00+00:00", "session": "a4d2f6ff5916",
    }  # fmt: skip
    state = parse_device_state(_state(), device="cam-1")
    assert state == DeviceState(
        "cam-1", "x86_64-cpu", "0.1.0", ("store-42",), {"iris": ModelState(2, 1, 2)}, "ok",
        "a4d2f6ff5916", NOW,
    )  # fmt: skip
    will = build_device_offline("cam-1", "a4d2f6ff5916", ts=NOW)
    assert json.loads(will) == {
        "schema": 1, "device": "cam-1", "online": False, "session": "a4d2f6ff5916",
        "ts": "2026-11-26T17:00:00+00:00",
    }  # fmt: skip
    assert parse_device_state(will) == DeviceOffline("cam-1", "a4d2f6ff5916", NOW)
    # a hand-published state may leave out the device: the topic names it
    bare = json.dumps({"schema": 1, "online": False}).encode()
    assert parse_device_state(bare, device="cam-9") == DeviceOffline("cam-9")
    # an offline message with a state's fields is a state, not a will
    offline_state = parse_device_state(_state(online=False))
    assert isinstance(offline_state, DeviceState)
    assert not offline_state.online


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (_state(device="cam-2"), "device state from 'cam-2' on the topic of 'cam-1'"),
        (_state(online="yes"), "field 'online' must be true or false"),
        (_state(groups="store-42"), "field 'groups' must be a list of names"),
        (_state(groups=["a/b"]), "field 'groups' must be a list of names"),
        (_state(models=[]), "field 'models' must be an object"),
        (_state(models={"iris": 2}), "field 'models' must be an object of model name"),
        (_state(models={"ir is": {}}), "model name 'ir is'"),
        (_state(models={"iris": {"active": "2"}}), "model 'iris': field 'active' must be an int"),
        (_state(profile=5), "field 'profile' must be a string"),
        (_state(health={"ok": True}), "field 'health' must be a string"),
        (_state(session=1), "field 'session' must be a string"),
        (_state(ts="soon"), "field 'ts' must be an ISO 8601 time"),
        (_state(schema=9), "device state uses schema 9"),
        (b"[]", "device state must be a JSON object"),
    ],
)
def test_malformed_device_state_is_refused(raw: bytes, says: str) -> None:
    with pytest.raises(MessageError, match=says):
        parse_device_state(raw, device="cam-1")


# -- pending work ---------------------------------------------------------------------------------


def test_pending_round_trips() -> None:
    ask = build_pending_get("cam-2", ["store-42", "canary"], ts=NOW)
    assert json.loads(ask) == {
        "schema": 1, "device": "cam-2", "groups": ["store-42", "canary"],
        "ts": "2026-11-26T17:00:00+00:00",
    }  # fmt: skip
    assert parse_pending_get(ask, device="cam-2") == PendingGet(
        "cam-2", ("store-42", "canary"), NOW
    )
    by_hand = b'{"schema":1,"device":"cam-2","groups":["store-42","canary"]}'  # docs §9
    assert parse_pending_get(by_hand, device="cam-2").ts is None
    commands = (signed(), signed(job_id="deploy-2"))
    answer = build_pending_answer("cam-2", commands)
    assert all(isinstance(c, str) for c in json.loads(answer)["commands"])  # envelopes as strings
    assert parse_pending_answer(answer, device="cam-2") == PendingAnswer("cam-2", commands)


@pytest.mark.parametrize(
    ("parse", "raw", "says"),
    [
        (parse_pending_get, b'{"schema":1,"device":"cam-3"}', "from 'cam-3' on the topic of"),
        (parse_pending_get, b'{"schema":1,"device":"cam-2","groups":"eu"}', "'groups' must be"),
        (parse_pending_get, b'{"schema":1,"device":"cam-2","ts":5}', "'ts' must be an ISO"),
        (parse_pending_answer, b'{"schema":1,"device":"cam-2","commands":"x"}', "'commands'"),
        (parse_pending_answer, b'{"schema":1,"device":"cam-2","commands":[{}]}', "as strings"),
        (parse_pending_answer, b'{"schema":1,"device":"cam-3","commands":[]}', "'cam-3' on"),
        (parse_pending_answer, b'{"device":"cam-2","commands":[]}', "no valid 'schema'"),
    ],
)
def test_malformed_pending_messages_are_refused(
    parse: Callable[..., Any], raw: bytes, says: str
) -> None:
    with pytest.raises(MessageError, match=says):
        parse(raw, device="cam-2")


def test_a_pending_request_needs_a_device_when_the_topic_gives_none() -> None:
    with pytest.raises(MessageError, match="field 'device' must be a valid name, not None"):
        parse_pending_get(b'{"schema":1}')


# -- telemetry and drift reports ------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(ReportKind))
def test_report_round_trip(kind: ReportKind) -> None:
    body = {"models": [], "cpu_s": 0.5, "device": "forged", "seq": -1}  # the envelope wins
    raw = build_report(kind, "cam-1", 6, body, ts=NOW)
    data = json.loads(raw)
    assert (data["device"], data["seq"], data["ts"], data["schema"]) == (
        "cam-1",
        6,
        NOW.isoformat(),
        1,
    )
    report = parse_report(raw, kind, device="cam-1")
    assert (report.kind, report.device, report.seq, report.ts) == (kind, "cam-1", 6, NOW)
    assert report.payload["cpu_s"] == 0.5
    assert report.payload == data  # what the store keeps


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b'{"schema":1,"device":"cam-1"}', "field 'seq' must be an integer >= 0, not None"),
        (b'{"schema":1,"device":"cam-1","seq":"6"}', "field 'seq' must be an integer"),
        (b'{"schema":1,"device":"cam-2","seq":6}', "drift report from 'cam-2' on the topic of"),
        (b'{"schema":1,"device":"cam-1","seq":6,"ts":[]}', "field 'ts' must be an ISO 8601"),
        (b'{"schema":2,"device":"cam-1","seq":6}', "drift report uses schema 2"),
    ],
)
def test_malformed_report_is_refused(raw: bytes, says: str) -> None:
    with pytest.raises(MessageError, match=says):
        parse_report(raw, ReportKind.DRIFT, device="cam-1")


def test_an_oversized_report_is_not_built() -> None:
    with pytest.raises(MessageError, match=r"telemetry report is \d+ bytes, above the limit"):
        build_report(ReportKind.TELEMETRY, "cam-1", 1, {"blob": "x" * MAX_MESSAGE_BYTES})


# -- collector presence ---------------------------------------------------------------------------


def test_presence_round_trips() -> None:
    online = build_collector_presence("edgepack-collector-a", True, ts=NOW)
    assert parse_collector_presence(online) == CollectorPresence("edgepack-collector-a", True, NOW)
    offline = parse_collector_presence(build_collector_presence("c", False))
    assert not offline.online
    assert parse_collector_presence(b"") == CollectorPresence("", False)  # a cleared retained one
    ping = build_presence_ping("cam-1", ts=NOW)
    assert json.loads(ping) == {"schema": 1, "device": "cam-1", "ts": "2026-11-26T17:00:00+00:00"}
    assert parse_presence_ping(ping) == PresencePing("cam-1", NOW)


@pytest.mark.parametrize(
    ("parse", "raw", "says"),
    [
        (parse_collector_presence, b'{"schema":1,"online":true}', "field 'collector' must be"),
        (parse_collector_presence, b'{"schema":1,"collector":"c","online":1}', "true or false"),
        (parse_collector_presence, b'{"schema":1,"collector":"c"}', "'online' must be true"),
        (parse_collector_presence, b"online", "not valid JSON"),
        (parse_presence_ping, b'{"schema":1,"device":"+"}', "field 'device' must be a valid"),
        (parse_presence_ping, b'{"schema":1}', "field 'device' must be a valid name"),
        (parse_presence_ping, b'{"device":"cam-1"}', "presence ping has no valid 'schema'"),
    ],
)
def test_malformed_presence_is_refused(
    parse: Callable[[bytes], Any], raw: bytes, says: str
) -> None:
    with pytest.raises(MessageError, match=says):
        parse(raw)


# -- topics ---------------------------------------------------------------------------------------

T = Topics("edgepack/v1")
K = TopicKind
HOST = "edgepack-collector-host.lan-a"


@pytest.mark.parametrize(
    ("topic", "parsed"),
    [
        (T.device_jobs("cam-1", "iris"), Topic(K.DEVICE_JOBS, device="cam-1", model="iris")),
        (T.group_jobs("store-42", "iris"), Topic(K.GROUP_JOBS, group="store-42", model="iris")),
        (
            T.job_status("cam-1", "deploy-20261126T170521-4ac93c"),
            Topic(K.JOB_STATUS, device="cam-1", job_id="deploy-20261126T170521-4ac93c"),
        ),
        (T.state("cam-1"), Topic(K.STATE, device="cam-1")),
        (T.pending_get("cam-1"), Topic(K.PENDING_GET, device="cam-1")),
        (T.pending("cam-1"), Topic(K.PENDING, device="cam-1")),
        (T.telemetry("cam-1"), Topic(K.TELEMETRY, device="cam-1")),
        (T.drift("cam-1"), Topic(K.DRIFT, device="cam-1")),
        (T.collector(HOST), Topic(K.COLLECTOR, collector=HOST)),
        (T.presence_ping(), Topic(K.PRESENCE_PING)),
        # a job id may look like a model name: the level count tells jobs/{model} from status
        (f"{T.prefix}/devices/cam-1/jobs/state", Topic(K.DEVICE_JOBS, "cam-1", model="state")),
        ("edgepack/v1/devices/state/state", Topic(K.STATE, device="state")),
    ],
)  # fmt: skip
def test_every_topic_parses_into_its_kind(topic: str, parsed: Topic) -> None:
    assert T.parse(topic) == parsed
    assert parse_topic(topic) == parsed  # the default prefix


@pytest.mark.parametrize(
    ("topic", "says"),
    [
        ("edgepack/v2/devices/cam-1/state", "not under the prefix 'edgepack/v1'"),
        ("edgepack/v1", "not under the prefix"),
        ("edgepack/v1x/devices/cam-1/state", "not under the prefix"),
        ("other/devices/cam-1/state", "not under the prefix"),
        ("edgepack/v1/devices/+/state", "holds a wildcard"),
        ("edgepack/v1/devices/cam-1/jobs/#", "holds a wildcard"),
        ("edgepack/v1/groups/eu+/jobs/iris", "holds a wildcard"),
        ("edgepack/v1/devices//state", "has an empty level"),
        ("edgepack/v1/devices/cam-1/state/", "has an empty level"),
        ("edgepack/v1/", "has an empty level"),
        ("edgepack/v1/devices/cam-1", "not an edgepack topic"),
        ("edgepack/v1/devices/cam-1/reboot", "not an edgepack topic"),
        ("edgepack/v1/devices/cam-1/jobs/j/status/extra", "not an edgepack topic"),
        ("edgepack/v1/devices/cam-1/jobs/j/result", "not an edgepack topic"),
        ("edgepack/v1/groups/eu/jobs", "not an edgepack topic"),
        ("edgepack/v1/collectors", "not an edgepack topic"),
        ("edgepack/v1/presence/pong", "not an edgepack topic"),
        ("edgepack/v1/junk", "not an edgepack topic"),
        ("edgepack/v1/devices/-cam/state", "device '-cam' is not 1-128 letters"),
        ("edgepack/v1/devices/" + "c" * 129 + "/state", "is not 1-128 letters"),
        ("edgepack/v1/devices/cam-1/jobs/ir:is", "model name 'ir:is'"),
        ("edgepack/v1/devices/cam-1/jobs/.j/status", "job id '.j' is not"),
        ("edgepack/v1/groups/-eu/jobs/iris", "group '-eu' is not"),
    ],
)
def test_junk_topics_are_refused(topic: str, says: str) -> None:
    with pytest.raises(MessageError, match=says):
        T.parse(topic)


def test_a_prefix_with_its_own_levels() -> None:
    topics = Topics("t123/v1")
    assert topics.parse("t123/v1/devices/cam-1/state") == Topic(K.STATE, device="cam-1")
    with pytest.raises(MessageError, match="not under the prefix 't123/v1'"):
        topics.parse("edgepack/v1/devices/cam-1/state")


def test_subscription_filters_come_from_the_same_builders() -> None:
    assert T.device_jobs("cam-1") == "edgepack/v1/devices/cam-1/jobs/+"
    assert T.job_status("+", "+") == "edgepack/v1/devices/+/jobs/+/status"
    assert T.collector() == "edgepack/v1/collectors/+"
    assert dataclasses.replace(T, prefix="p").state("+") == "p/devices/+/state"
