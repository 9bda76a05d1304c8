"""MQTT connections for the operator's tools: connect, publish and wait, subscribe.

The CLI needs short-lived connections (publish a signed command, wait for the broker's PUBACK);
the collector a long-lived one. Both use paho-mqtt 2.x with ``CallbackAPIVersion.VERSION2`` and
turn paho's failures into :class:`~edgepack.fleet.exceptions.BrokerError` with a message that names
the broker and says what to check.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgepack.fleet.exceptions import BrokerError
from edgepack.formats.messages import DEFAULT_PREFIX

__all__ = ["BrokerOptions", "connect", "publish_and_wait"]


@dataclass(frozen=True)
class BrokerOptions:
    """Where the broker is and how to log in."""

    host: str = "127.0.0.1"
    port: int = 1883
    prefix: str = DEFAULT_PREFIX
    protocol: str = "5"
    username: str = ""
    password_file: str = ""
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    client_id: str = ""

    @classmethod
    def parse(cls, address: str, **kwargs: object) -> BrokerOptions:
        """``host[:port]`` plus keyword options."""
        host, _, port = address.rpartition(":") if ":" in address else (address, "", "1883")
        try:
            return cls(host=host or "127.0.0.1", port=int(port or 1883), **kwargs)  # type: ignore[arg-type]
        except ValueError as e:
            raise BrokerError(f"bad broker address {address!r}; use HOST or HOST:PORT") from e


def connect(
    options: BrokerOptions,
    *,
    timeout: float = 10.0,
    client_id: str | None = None,
    session_expiry: int = 0,
    will: tuple[str, bytes] | None = None,
) -> mqtt.Client:
    """Connect (blocking until CONNACK) and start the network loop.

    With ``session_expiry`` (seconds) and a fixed ``client_id`` the session persists: QoS 1
    messages published while this client is away are kept for it by the broker.

    Raises:
        BrokerError: unreachable, refused, or no CONNACK within ``timeout``.
    """
    v5 = options.protocol == "5"
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id or options.client_id or f"edgepack-fleet-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else not session_expiry,
    )
    if will is not None:
        client.will_set(will[0], will[1], qos=1, retain=True)
    if options.username:
        password = (
            Path(options.password_file).read_text().strip() if options.password_file else None
        )
        client.username_pw_set(options.username, password)
    if options.tls:
        client.tls_set(
            ca_certs=options.ca_file or None,
            certfile=options.cert_file or None,
            keyfile=options.key_file or None,
        )
    done = threading.Event()
    result: list[str] = []

    def on_connect(_c: mqtt.Client, _u: object, _f: object, reason: object, _p: object) -> None:
        if getattr(reason, "is_failure", False):
            result.append(str(reason))
        done.set()

    client.on_connect = on_connect
    where = f"{options.host}:{options.port}"
    try:
        if v5 and session_expiry:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = session_expiry
            client.connect(
                options.host, options.port, keepalive=30, clean_start=False, properties=props
            )
        else:
            client.connect(options.host, options.port, keepalive=30)
    except OSError as e:
        raise BrokerError(
            f"cannot reach the MQTT broker at {where}: {e.strerror or e} (is it running? "
            "check --broker)"
        ) from e
    sock = client.socket()
    if sock is not None and sock.fileno() >= 1024:
        client.disconnect()
        raise BrokerError(
            "this process has more than 1023 open files, and paho's network loop (select()) "
            "cannot watch a socket numbered above that; open fewer files in this process or run "
            "the collector/commands in their own process"
        )
    client.loop_start()
    if not done.wait(timeout):
        client.loop_stop()
        raise BrokerError(f"the MQTT broker at {where} did not answer within {timeout:.0f} s")
    if result:
        client.loop_stop()
        raise BrokerError(f"the MQTT broker at {where} refused the connection: {result[0]}")
    client.on_connect = None
    return client


def publish_and_wait(
    client: mqtt.Client, topic: str, payload: bytes, *, retain: bool, timeout: float = 10.0
) -> None:
    """Publish at QoS 1 and wait for the broker's acknowledgement.

    Raises:
        BrokerError: the publish failed or was not acknowledged in time.
    """
    info = client.publish(topic, payload, qos=1, retain=retain)
    if info.rc != mqtt.MQTT_ERR_SUCCESS:
        raise BrokerError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
    try:
        info.wait_for_publish(timeout)
    except (ValueError, RuntimeError) as e:
        raise BrokerError(f"publish to {topic} failed: {e}") from e
    if not info.is_published():
        raise BrokerError(f"the broker did not acknowledge {topic} within {timeout:.0f} s")
