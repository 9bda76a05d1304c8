"""One MQTT client setup for every edgepack process that speaks to the broker.

The device's link (``edgepack.agent._fleet_link``) and the operator's tools and collector
(``edgepack.fleet._broker``) build their paho-mqtt 2.x clients here, so the protocol version,
TLS and mTLS, credentials, persistent sessions and reconnect delays are set up one way. A
persistent session is ``clean_session = false`` on MQTT 3.1.1 and ``clean_start = false`` with a
Session Expiry Interval on MQTT 5 (docs/protocol.md §11): the broker keeps the subscriptions and
queues QoS 1 messages while the client is away. What each side does on the connection (its
callbacks, its topics, its payloads) stays with it; topics and payloads are
:mod:`edgepack.formats`'.

Only the agent and the fleet import this module (it imports paho); :mod:`edgepack.formats` never
does. Files that cannot be read (a password file, TLS certificates) raise
:class:`~edgepack.errors.StorageError` naming the file.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgepack.errors import StorageError

__all__ = ["PROTOCOLS", "ClientSettings", "Will", "connect_options", "make_client"]

PROTOCOLS = ("5", "3.1.1")


@dataclass(frozen=True)
class Will:
    """A Last Will: published by the broker when the connection drops without a DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class ClientSettings:
    """How one client connects.

    ``persistent`` (or a ``session_expiry`` above 0) keeps the session across disconnects;
    ``reconnect_min``/``reconnect_max`` of ``None`` and ``max_queued`` of 0 leave paho's defaults.
    """

    client_id: str
    host: str = "127.0.0.1"
    port: int = 1883
    protocol: str = "5"  # "5" or "3.1.1"
    keepalive: int = 30
    username: str = ""
    password_file: str = ""
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""  # client certificate (mTLS)
    key_file: str = ""
    persistent: bool = False
    session_expiry: int = 0  # seconds (MQTT 5)
    reconnect_min: int | None = None
    reconnect_max: int | None = None
    max_queued: int = 0  # outgoing messages paho holds while offline (0: no bound)

    @property
    def v5(self) -> bool:
        return self.protocol == "5"

    @property
    def keeps_session(self) -> bool:
        return self.persistent or self.session_expiry > 0


def _password(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as e:
        raise StorageError(
            f"cannot read the MQTT password file {path}: {e.strerror or e}; check the path and "
            "that this user may read it"
        ) from e


def make_client(settings: ClientSettings, *, will: Will | None = None) -> mqtt.Client:
    """A paho client, configured but not connected (connect with :func:`connect_options`).

    Args:
        settings: how to connect.
        will: the Last Will to register, if any.

    Returns:
        The client (``CallbackAPIVersion.VERSION2``); the caller sets its callbacks.

    Raises:
        ValueError: an unknown protocol (the callers' configuration checks it first).
        StorageError: the password file or a TLS file cannot be read.
    """
    if settings.protocol not in PROTOCOLS:
        raise ValueError(f"MQTT protocol must be one of {PROTOCOLS}, not {settings.protocol!r}")
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=settings.client_id,
        protocol=mqtt.MQTTv5 if settings.v5 else mqtt.MQTTv311,
        # 3.1.1 only (MQTT 5 sets clean_start at connect): keep the session when persistent
        clean_session=None if settings.v5 else not settings.keeps_session,
    )
    if settings.reconnect_min is not None and settings.reconnect_max is not None:
        client.reconnect_delay_set(settings.reconnect_min, settings.reconnect_max)
    if settings.max_queued:
        client.max_queued_messages_set(settings.max_queued)
    if will is not None:
        client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
    if settings.username:
        password = _password(settings.password_file) if settings.password_file else None
        client.username_pw_set(settings.username, password)
    if settings.tls:
        try:
            client.tls_set(
                ca_certs=settings.ca_file or None,
                certfile=settings.cert_file or None,
                keyfile=settings.key_file or None,
            )
        except (OSError, ssl.SSLError) as e:  # ssl.SSLError is an OSError; named for the reader
            files = ", ".join(
                f for f in (settings.ca_file, settings.cert_file, settings.key_file) if f
            )
            raise StorageError(
                f"cannot load the MQTT TLS files ({files or 'system CAs'}): {e}; check the paths, "
                "that the key matches the certificate, and that this user may read them"
            ) from e
    return client


def connect_options(settings: ClientSettings) -> dict[str, Any]:
    """The keyword arguments for ``client.connect``/``connect_async`` after host, port, keepalive.

    On MQTT 5 a persistent session is ``clean_start=False`` and a Session Expiry Interval
    (``session_expiry`` seconds); otherwise paho's defaults apply.
    """
    if not (settings.v5 and settings.keeps_session):
        return {}
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = settings.session_expiry
    return {"clean_start": False, "properties": properties}
