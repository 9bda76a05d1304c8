"""MQTT connections for the operator's tools: connect, publish and wait, subscribe.

The CLI needs short-lived connections (publish a signed command, wait for the broker's PUBACK);
the collector a long-lived one. Both are paho-mqtt 2.x clients set up by :mod:`edgepack._mqtt`
(the same setup as the device's: protocol, TLS/mTLS, credentials, persistent sessions), and this
module turns paho's failures into :class:`~edgepack.fleet.exceptions.BrokerError` with a message
that names the broker and says what to check.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass

import paho.mqtt.client as mqtt

from edgepack._mqtt import ClientSettings, Will, connect_options, make_client
from edgepack.errors import StorageError
from edgepack.fleet.exceptions import BrokerError
from edgepack.formats.topics import DEFAULT_PREFIX

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

    Args:
        options: the broker and how to log in.
        timeout: seconds to wait for the CONNACK.
        client_id: default: ``options.client_id``, else a random ``edgepack-fleet-…``.
        session_expiry: seconds the broker keeps the session (0: a clean session).
        will: ``(topic, payload)`` of a retained QoS 1 Last Will.

    Returns:
        The connected client, its network loop running.

    Raises:
        BrokerError: unreachable, refused, no CONNACK within ``timeout``, or a password or TLS
            file that cannot be read.
    """
    settings = ClientSettings(
        client_id=client_id or options.client_id or f"edgepack-fleet-{uuid.uuid4().hex[:8]}",
        host=options.host,
        port=options.port,
        protocol=options.protocol,
        username=options.username,
        password_file=options.password_file,
        tls=options.tls,
        ca_file=options.ca_file,
        cert_file=options.cert_file,
        key_file=options.key_file,
        session_expiry=session_expiry,
    )
    try:
        client = make_client(settings, will=None if will is None else Will(*will))
    except (ValueError, StorageError) as e:
        raise BrokerError(f"cannot set up the MQTT client: {e}") from e
    done = threading.Event()
    result: list[str] = []

    def on_connect(_c: mqtt.Client, _u: object, _f: object, reason: object, _p: object) -> None:
        if getattr(reason, "is_failure", False):
            result.append(str(reason))
        done.set()

    client.on_connect = on_connect
    where = f"{options.host}:{options.port}"
    try:
        client.connect(
            options.host, options.port, keepalive=settings.keepalive, **connect_options(settings)
        )
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
