"""docs/mosquitto.conf and docs/mosquitto.acl, run for real: what a device may and may not do.

One mosquitto is started from docs/mosquitto.conf itself, with only what cannot run here
rewritten (ports on loopback, paths under tmp, persistence off, a throwaway CA for the TLS
listener with its mTLS option switched on, log to stderr), and with docs/mosquitto.acl as its
ACL. If a line of either file stops parsing, the broker does not start and every test fails.

Clients are paho-mqtt 2.x on MQTT 5, so the broker's answers carry reason codes: a denied
publish is PUBACK 0x87. mosquitto acknowledges every SUBSCRIBE and filters reads at delivery,
so read checks look at what arrives. A "nothing arrived" check never sleeps: the client waits
for a barrier message published after the forbidden ones; the broker keeps one client's
messages in order, so anything forbidden that got through would have arrived first.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import pwd
import queue
import shutil
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from brokers import Broker, free_port, mosquitto_binary, start_mosquitto
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

DOCS = Path(__file__).resolve().parent.parent / "docs"
P = "edgepack/v1"
PASSWORDS = {"cam-1": "cam-1-pw", "cam-2": "cam-2-pw", "collector": "coll-pw", "ops": "ops-pw"}
SUCCESS, NOT_AUTHORIZED = 0x00, 0x87
NO_SUBSCRIBERS = 0x10  # a PUBACK that accepts: nobody subscribes to that topic yet
WAIT = 5.0


# -- the broker ------------------------------------------------------------------------------


def _certificates(directory: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate CN=cam-1."""
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgepack test CA")])
    files: dict[str, Path] = {}

    def issue(name: str, cn: str, key: Any, *, ca: bool = False) -> None:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
        )
        if ca:
            usage = {"key_cert_sign": True, "crl_sign": True, "digital_signature": False}
        else:
            usage = {"key_cert_sign": False, "crl_sign": False, "digital_signature": True}
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        builder = builder.add_extension(
            x509.KeyUsage(
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
                **usage,
            ),
            critical=True,
        )
        if name == "server":
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        files[f"{name}.crt"] = directory / f"{name}.crt"
        files[f"{name}.crt"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{name}.key"] = directory / f"{name}.key"
        files[f"{name}.key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    issue("ca", "edgepack test CA", ca_key, ca=True)
    issue("server", "localhost", ec.generate_private_key(ec.SECP256R1()))
    issue("cam-1", "cam-1", ec.generate_private_key(ec.SECP256R1()))
    return files


def _config(directory: Path, tls_port: int, certs: dict[str, Path]) -> str:
    """docs/mosquitto.conf with what cannot run here rewritten, line by exact line."""
    changes = {
        "persistence true": "persistence false",
        "persistence_location /var/lib/mosquitto/": f"persistence_location {directory}/",
        # start_mosquitto opens the loopback listener (on a free port) above this text
        "listener 1883 127.0.0.1": "",
        "password_file /etc/mosquitto/edgepack.passwd": f"password_file {directory / 'passwd'}",
        "acl_file /etc/mosquitto/edgepack.acl": f"acl_file {DOCS / 'mosquitto.acl'}",
        "listener 8883": f"listener {tls_port} 127.0.0.1",
        "cafile /etc/mosquitto/certs/ca.crt": f"cafile {certs['ca.crt']}",
        "certfile /etc/mosquitto/certs/server.crt": f"certfile {certs['server.crt']}",
        "keyfile /etc/mosquitto/certs/server.key": f"keyfile {certs['server.key']}",
        "#require_certificate true": "require_certificate true",  # the documented mTLS option
        "#use_identity_as_username true": "use_identity_as_username true",
        "log_dest file /var/log/mosquitto/mosquitto.log": "log_dest stderr",
    }
    lines = (DOCS / "mosquitto.conf").read_text().splitlines()
    for old, new in changes.items():
        found = [i for i, line in enumerate(lines) if line == old]
        assert len(found) == 1, f"docs/mosquitto.conf has no line {old!r} (or several)"
        lines[found[0]] = new
    # Started as root, mosquitto drops to the `mosquitto` user, which cannot read pytest's tmp.
    lines.append(f"user {pwd.getpwuid(os.geteuid()).pw_name}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class AclBroker:
    """The running broker, its TLS (mTLS) port and the throwaway certificates."""

    broker: Broker
    tls_port: int
    certs: dict[str, Path]


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclBroker]:
    mosquitto_binary()  # installs mosquitto (and its mosquitto_passwd) when it can, as root
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd is not installed (apt-get install mosquitto)")
    directory = tmp_path_factory.mktemp("acl-broker")
    passwd = directory / "passwd"
    for i, (user, password) in enumerate(PASSWORDS.items()):
        create = ["-c"] if i == 0 else []
        command = ["mosquitto_passwd", "-b", *create, str(passwd), user, password]
        subprocess.run(command, check=True, capture_output=True)
    certs = _certificates(directory)
    tls_port = free_port()
    running = start_mosquitto(directory, _config(directory, tls_port, certs))
    yield AclBroker(running, tls_port, certs)
    running.stop()


# -- clients ---------------------------------------------------------------------------------


class Client:
    """One MQTT 5 connection that keeps the broker's reason codes and what it receives."""

    def __init__(
        self,
        port: int,
        username: str | None,
        password: str | None = None,
        *,
        will_topic: str | None = None,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"acl-test-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        if will_topic is not None:
            self.client.will_set(will_topic, b'{"online":false}', qos=1, retain=True)
        if tls is not None:
            ca, cert, key = tls
            self.client.tls_set(ca_certs=str(ca), certfile=str(cert), keyfile=str(key))
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._acks: dict[int, list[int]] = {}
        self._changed = threading.Condition()
        self._connack: int | None = None
        self.closed = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *_args: self.closed.set()
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = lambda _c, _u, message: self.messages.put(message)
        self.client.connect_async("127.0.0.1", port)
        self.client.loop_start()

    def _record(self, key: int, codes: list[int]) -> None:
        with self._changed:
            self._acks[key] = codes
            self._changed.notify_all()

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        with self._changed:
            self._connack = reason.value
            self._changed.notify_all()
        if reason.is_failure:
            self.client.disconnect()  # no automatic reconnects after a refusal

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: Any, _props: Any) -> None:
        self._record(mid, [reason.value])

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reasons: Any, _props: Any) -> None:
        self._record(mid, [r.value for r in reasons])

    def connack(self) -> int:
        """The CONNACK reason code: 0 for success."""
        with self._changed:
            assert self._changed.wait_for(lambda: self._connack is not None, WAIT), "no CONNACK"
            assert self._connack is not None
            return self._connack

    def _ack(self, mid: int) -> list[int]:
        with self._changed:
            assert self._changed.wait_for(lambda: mid in self._acks, WAIT), f"no ack for {mid}"
            return self._acks.pop(mid)

    def publish(self, topic: str, payload: bytes = b'{"schema":1}', *, retain: bool = False) -> int:
        """Publish at QoS 1; the PUBACK reason code (0 when accepted, subscribers or not)."""
        assert self.connack() == SUCCESS
        code = self._ack(self.client.publish(topic, payload, qos=1, retain=retain).mid)[0]
        return SUCCESS if code == NO_SUBSCRIBERS else code

    def subscribe(self, *topics: str, retained: bool = True) -> list[int]:
        """Subscribe at QoS 1 (``retained=False``: no retained copies); SUBACK reason codes."""
        assert self.connack() == SUCCESS
        handling = (
            SubscribeOptions.RETAIN_SEND_ON_SUBSCRIBE
            if retained
            else SubscribeOptions.RETAIN_DO_NOT_SEND
        )
        options = SubscribeOptions(qos=1, retainHandling=handling)
        return self._ack(self.client.subscribe([(t, options) for t in topics])[1])

    def topics_until(self, barrier: str) -> list[str]:
        """Topics received up to (not including) the first message on ``barrier``."""
        seen = []
        while True:
            try:
                message = self.messages.get(timeout=WAIT)
            except queue.Empty:
                raise AssertionError(f"no message on {barrier} after {seen}") from None
            if message.topic == barrier:
                return seen
            seen.append(message.topic)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


Connect = Callable[..., Client]


@pytest.fixture
def connect(broker: AclBroker) -> Iterator[Connect]:
    """``connect(user)`` logs in with that user's password (``tls=``: on the mTLS listener)."""
    opened: list[Client] = []

    def make(user: str | None, password: str | None = None, **kwargs: Any) -> Client:
        secret = password if password is not None else PASSWORDS.get(user or "")
        port = broker.tls_port if kwargs.get("tls") else broker.broker.port
        client = Client(port, user, secret, **kwargs)
        opened.append(client)
        return client

    yield make
    for client in opened:
        client.close()


def _watch(connect: Connect) -> Client:
    """An ops client watching the whole prefix (new messages only)."""
    watcher = connect("ops")
    assert watcher.subscribe(f"{P}/#", retained=False) == [1]
    return watcher


# -- the tests -------------------------------------------------------------------------------


def test_device_cannot_write_as_another_device(connect: Connect) -> None:
    watcher, cam1 = _watch(connect), connect("cam-1")
    forged = [
        f"{P}/devices/cam-2/state",
        f"{P}/devices/cam-2/jobs/deploy-1/status",
        f"{P}/devices/cam-2/pending/get",
        f"{P}/devices/cam-2/telemetry",
        f"{P}/devices/cam-2/drift",
    ]
    assert [cam1.publish(topic) for topic in forged] == [NOT_AUTHORIZED] * len(forged)
    barrier = f"{P}/devices/cam-1/telemetry"
    assert cam1.publish(barrier) == SUCCESS
    assert watcher.topics_until(barrier) == []


def test_device_cannot_publish_commands(connect: Connect) -> None:
    watcher, cam1 = _watch(connect), connect("cam-1")
    commands = [
        f"{P}/devices/cam-1/jobs/acl-a",
        f"{P}/devices/cam-2/jobs/acl-a",
        f"{P}/groups/store-42/jobs/acl-a",
        f"{P}/groups/canary/jobs/acl-a",
    ]
    for topic in commands:
        assert cam1.publish(topic, retain=True) == NOT_AUTHORIZED, topic
    barrier = f"{P}/devices/cam-1/telemetry"
    assert cam1.publish(barrier) == SUCCESS
    assert watcher.topics_until(barrier) == []
    # nor was anything retained: a new subscriber gets no stored copy
    reader, state = connect("ops"), f"{P}/devices/cam-1/state"
    reader.subscribe(*commands)  # stored copies would be sent right after this SUBACK
    reader.subscribe(state)
    assert cam1.publish(state, retain=True) == SUCCESS
    assert reader.topics_until(state) == []


def test_device_reads_only_its_own_and_its_groups_commands(connect: Connect) -> None:
    ops = connect("ops")
    own, group = f"{P}/devices/cam-1/jobs/acl-b", f"{P}/groups/store-42/jobs/acl-b"
    other, other_group = f"{P}/devices/cam-2/jobs/acl-b", f"{P}/groups/canary/jobs/acl-b"
    for topic in (own, group, other, other_group):
        assert ops.publish(topic, json.dumps({"for": topic}).encode(), retain=True) == SUCCESS
    cam1 = connect("cam-1")
    granted = cam1.subscribe(
        f"{P}/devices/cam-1/jobs/+",
        f"{P}/groups/store-42/jobs/+",
        f"{P}/devices/cam-2/jobs/+",
        f"{P}/groups/canary/jobs/+",
        f"{P}/#",
    )
    assert granted[:2] == [1, 1]
    # mosquitto 2.0 grants the others too and decides at delivery; a refusal would do as well
    assert all(code in (1, NOT_AUTHORIZED) for code in granted[2:])
    barrier = f"{P}/devices/cam-1/pending"
    assert connect("collector").publish(barrier, b'{"schema":1,"commands":[]}') == SUCCESS
    received = set(cam1.topics_until(barrier))
    assert own in received
    assert group in received
    assert other not in received
    assert other_group not in received
    # and cam-2, in store-42 and canary, gets its own, both groups', and not cam-1's
    cam2 = connect("cam-2")
    cam2.subscribe(f"{P}/devices/+/jobs/+", f"{P}/groups/+/jobs/+", f"{P}/devices/cam-2/pending")
    barrier2 = f"{P}/devices/cam-2/pending"
    assert connect("collector").publish(barrier2, b'{"schema":1,"commands":[]}') == SUCCESS
    received = set(cam2.topics_until(barrier2))
    assert {other, group, other_group} <= received
    assert own not in received


def test_device_writes_its_own_topics_and_the_collector_reads_them(connect: Connect) -> None:
    collector = connect("collector")
    reads = [
        f"{P}/devices/+/state",
        f"{P}/devices/+/jobs/+/status",
        f"{P}/devices/+/pending/get",
        f"{P}/devices/+/telemetry",
        f"{P}/devices/+/drift",
    ]
    collector.subscribe(*reads, retained=False)
    cam1 = connect("cam-1", will_topic=f"{P}/devices/cam-1/state")
    assert cam1.connack() == SUCCESS  # its Last Will on its own state topic is allowed
    cam1.subscribe(f"{P}/devices/cam-1/pending")
    own = [
        f"{P}/devices/cam-1/state",
        f"{P}/devices/cam-1/jobs/deploy-20261126T164500-3f9a1c/status",
        f"{P}/devices/cam-1/pending/get",
        f"{P}/devices/cam-1/telemetry",
        f"{P}/devices/cam-1/drift",
    ]
    for topic in own:
        assert cam1.publish(topic, retain=topic.endswith("/state")) == SUCCESS, topic
    barrier = f"{P}/devices/cam-1/drift"
    assert collector.topics_until(barrier) == own[:-1]
    # the collector answers pending/get; the device hears it
    assert collector.publish(f"{P}/devices/cam-1/pending", b'{"commands":[]}') == SUCCESS
    assert cam1.messages.get(timeout=WAIT).topic == f"{P}/devices/cam-1/pending"


def test_services_stay_in_their_lane(connect: Connect) -> None:
    ops, collector = connect("ops"), connect("collector")
    assert ops.publish(f"{P}/devices/cam-1/state") == NOT_AUTHORIZED
    assert ops.publish(f"{P}/devices/cam-1/jobs/deploy-1/status") == NOT_AUTHORIZED
    assert ops.publish(f"{P}/devices/cam-1/pending") == NOT_AUTHORIZED
    assert collector.publish(f"{P}/devices/cam-1/jobs/acl-c") == NOT_AUTHORIZED
    assert collector.publish(f"{P}/groups/store-42/jobs/acl-c") == NOT_AUTHORIZED
    assert ops.publish(f"{P}/groups/store-42/jobs/acl-c", b"") == SUCCESS  # clear retained


@pytest.mark.parametrize(
    ("user", "password"),
    [
        ("cam-1", "wrong"),
        ("cam-1", PASSWORDS["cam-2"]),  # another device's password
        ("nobody", "nobody"),
        (None, None),  # anonymous
    ],
)
def test_bad_logins_are_refused(connect: Connect, user: str | None, password: str | None) -> None:
    # mosquitto 2.0 answers 0x87 to a bad password as well as to an anonymous client
    assert connect(user, password).connack() == NOT_AUTHORIZED


def test_a_last_will_reaches_only_the_devices_own_state(connect: Connect) -> None:
    watcher = _watch(connect)
    for will in (f"{P}/devices/cam-2/state", f"{P}/devices/cam-1/state"):
        device = connect("cam-1", will_topic=will)
        assert device.connack() == SUCCESS  # mosquitto checks the will when it sends it
        # DISCONNECT 0x04: "disconnect with will message", as if the connection had dropped
        device.client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=4))
        assert device.closed.wait(WAIT)
    assert watcher.messages.get(timeout=WAIT).topic == f"{P}/devices/cam-1/state"


def test_mtls_certificate_cn_is_the_username(broker: AclBroker, connect: Connect) -> None:
    certs = broker.certs
    cam1 = connect(None, tls=(certs["ca.crt"], certs["cam-1.crt"], certs["cam-1.key"]))
    assert cam1.connack() == SUCCESS
    assert cam1.publish(f"{P}/devices/cam-1/state", retain=True) == SUCCESS
    assert cam1.publish(f"{P}/devices/cam-2/state") == NOT_AUTHORIZED
    assert cam1.publish(f"{P}/devices/cam-1/jobs/acl-d") == NOT_AUTHORIZED


def test_an_agent_over_mtls_gets_its_commands_and_reports_back(
    broker: AclBroker, connect: Connect, keys: Any, tmp_path: Path
) -> None:
    """The agent's own TLS options end to end: mTLS login (CN = device id) under the ACL, a
    retained command delivered over TLS, its job status readable by the collector."""
    from conftest import _write_pair, write_agent_config

    from edgepack.agent._config import load_config
    from edgepack.agent._daemon import Agent
    from edgepack.agent._fleet_link import DeviceLink
    from edgepack.formats.commands import make_command
    from edgepack.formats.keys import load_private_key

    ops = _write_pair(tmp_path / "ops", "ops")
    certs = broker.certs
    extra = (
        f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.tls_port}\ntls = true\n'
        f'ca_file = "{certs["ca.crt"]}"\ncert_file = "{certs["cam-1.crt"]}"\n'
        f'key_file = "{certs["cam-1.key"]}"\ncommand_keys = ["{ops.public}"]\n'
    )
    path = write_agent_config(tmp_path / "cam-1", keys, extra=extra)
    path.write_text(
        path.read_text()
        .replace('device_id = "test-device"', 'device_id = "cam-1"\ngroups = ["store-42"]')
        .replace("[server]\n", "[server]\nenabled = false\n")
    )
    collector = connect("collector")
    assert collector.connack() == SUCCESS
    collector.subscribe(f"{P}/devices/cam-1/jobs/+/status", f"{P}/devices/cam-1/state")
    config = load_config(path)
    agent = Agent(config).start(serve_http=False)
    assert config.mqtt is not None
    link = DeviceLink(agent, config.mqtt)
    try:
        link.start()
        assert link.connected.wait(WAIT), "the agent did not connect over mTLS"
        job_id, command = make_command(
            "rollback", "iris", {"group": "store-42"}, load_private_key(ops.private.read_bytes())
        )
        ops_client = connect("ops")
        assert ops_client.publish(f"{P}/groups/store-42/jobs/iris", command, retain=True) == (
            SUCCESS
        )
        seen: dict[str, Any] = {}
        while "status" not in seen or seen["status"].get("status") != "REJECTED":
            message = collector.messages.get(timeout=WAIT)
            body = json.loads(message.payload) if message.payload else {}
            seen["state" if message.topic.endswith("/state") else "status"] = body
        assert seen["status"]["job_id"] == job_id
        assert "not installed" in seen["status"]["reason"]  # nothing to roll back: refused
        assert seen["state"]["online"] is True
        assert seen["state"]["groups"] == ["store-42"]
    finally:
        link.stop()
        agent.stop()


def test_the_shipped_acl_is_what_edgepack_fleet_acl_generates() -> None:
    """docs/mosquitto.acl is the generator's output for its example inventory, so the file the
    docs describe and the file operators deploy cannot drift apart."""
    from edgepack.fleet._acl import render_acl

    example = {"cam-1": ["store-42"], "cam-2": ["store-42", "canary"]}
    assert (DOCS / "mosquitto.acl").read_text() == render_acl(example)


def test_only_ops_writes_the_trust_document_and_every_device_reads_it(connect: Connect) -> None:
    trust = f"{P}/trust"
    cam1, collector = connect("cam-1"), connect("collector")
    assert cam1.publish(trust, b'{"forged":1}', retain=True) == NOT_AUTHORIZED
    assert collector.publish(trust, b'{"forged":2}', retain=True) == NOT_AUTHORIZED
    assert connect("ops").publish(trust, b'{"signed":true}', retain=True) == SUCCESS
    reader = connect("cam-2")
    reader.subscribe(trust)
    assert reader.messages.get(timeout=WAIT).payload == b'{"signed":true}'
    assert connect("ops").publish(trust, b"", retain=True) == SUCCESS  # cleared again
