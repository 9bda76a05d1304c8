"""Key rotation, operator side: build, publish, record and show trust documents.

``edgepack-fleet trust publish`` signs a trust document with the offline root key(s)
(:func:`edgepack.formats.trust.make_trust`: the whole set of bundle-signing and command keys in
force from now on; a key left out is retired), publishes it **retained** at QoS 1 on
``{prefix}/trust`` (:meth:`~edgepack.formats.topics.Topics.trust`), so that a device offline
during the rotation catches up when it returns, and records it in the fleet store; the collector
also records every document it sees on that topic and hands the latest to devices in its
pending answers. Devices verify each document against the trust they hold
(:func:`~edgepack.formats.trust.open_trust`): only their current root keys can change it, and
the version must grow. Hence the version of a new document defaults to one above the highest
known, whether the store recorded it or the broker retains it.

:func:`peek_trust` reads a document's version and key ids *without* verifying it (bounded, for
choosing the next version and for ``trust show``); :func:`verify_trust` checks one against a set
of root keys (the collector's ``--root-key``), as a device holding those roots would.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from edgepack.fleet._broker import BrokerOptions, connect, publish_and_wait
from edgepack.fleet._database import FleetStore
from edgepack.fleet.exceptions import BrokerError
from edgepack.formats.exceptions import KeyFormatError
from edgepack.formats.keys import key_id, load_public_key
from edgepack.formats.messages import decode_json
from edgepack.formats.topics import Topics
from edgepack.formats.trust import (
    MAX_TRUST_BYTES,
    TRUST_PAYLOAD_TYPE,
    Trust,
    TrustError,
    make_trust,
    open_trust,
)

__all__ = ["PublishedTrust", "TrustSummary", "peek_trust", "publish_trust", "verify_trust"]

_ROLES = ("root_keys", "bundle_keys", "command_keys")


@dataclass(frozen=True)
class TrustSummary:
    """What a trust document says, read without verifying it: version and key ids per role."""

    version: int
    threshold: int
    issued_at: str
    keys: dict[str, list[str]]  # role -> key ids

    def as_json(self) -> dict[str, Any]:
        return {"version": self.version, "threshold": self.threshold,
                "issued_at": self.issued_at, **self.keys}  # fmt: skip


@dataclass(frozen=True)
class PublishedTrust:
    summary: TrustSummary
    document: bytes
    topic: str


def peek_trust(raw: bytes) -> TrustSummary:
    """Read a trust document's version and key ids, bounded, without checking its signatures.

    Raises:
        TrustError: oversized, malformed, or not an ``edgepack-trust`` document.
    """
    if len(raw) > MAX_TRUST_BYTES:
        raise TrustError(f"trust document is {len(raw)} bytes, above {MAX_TRUST_BYTES}")
    envelope = decode_json(raw, "trust document", schema=False, error=TrustError)
    if envelope.get("payloadType") != TRUST_PAYLOAD_TYPE:
        raise TrustError(f"not a trust document (payload type must be {TRUST_PAYLOAD_TYPE})")
    payload = envelope.get("payload")
    try:
        body_bytes = base64.b64decode(payload if isinstance(payload, str) else "!", validate=True)
    except binascii.Error as e:
        raise TrustError("trust document: payload is not valid base64") from e
    body = decode_json(body_bytes, "trust document payload", error=TrustError)
    version, threshold = body.get("version"), body.get("threshold", 1)
    if body.get("type") != "edgepack-trust" or type(version) is not int or version < 1:
        raise TrustError("trust document payload is not an edgepack-trust with a version >= 1")
    keys: dict[str, list[str]] = {}
    for role in _ROLES:
        pems = body.get(role)
        if not isinstance(pems, list) or not all(isinstance(p, str) for p in pems):
            raise TrustError(f"trust document: {role} must be a list of PEM public keys")
        try:
            keys[role] = [key_id(load_public_key(p.encode(), source=role)) for p in pems]
        except KeyFormatError as e:
            raise TrustError(f"trust document: {e}") from e
    issued = body.get("issued_at")
    threshold = threshold if type(threshold) is int else 1
    return TrustSummary(version, threshold, issued if isinstance(issued, str) else "", keys)


def verify_trust(raw: bytes, root_keys: Sequence[ec.EllipticCurvePublicKey]) -> Trust:
    """Verify a document as a device whose roots are ``root_keys`` (threshold 1) would.

    Raises:
        TrustError: not signed by one of ``root_keys``, or malformed.
    """
    base = Trust(version=0, root_keys=tuple(root_keys), threshold=1, bundle_keys=(),
                 command_keys=())  # fmt: skip
    return open_trust(raw, base)


def retained_trust(options: BrokerOptions, timeout: float = 3.0) -> bytes | None:
    """The trust document the broker retains now, or None.

    mosquitto sends a retained message right after the SUBACK; we wait for the SUBACK, then at
    most ``timeout`` seconds for the message (a broker retaining nothing sends nothing).

    Raises:
        BrokerError: the broker cannot be reached.
    """
    client = connect(options)
    got, subscribed, found = threading.Event(), threading.Event(), []
    topic = Topics(options.prefix).trust()

    def on_message(_c: Any, _u: Any, message: Any) -> None:
        if message.retain and message.payload:
            found.append(bytes(message.payload))
        got.set()

    client.on_message = on_message
    client.on_subscribe = lambda *_args: subscribed.set()
    try:
        client.subscribe(topic, qos=1)
        if not subscribed.wait(timeout):
            raise BrokerError(f"the broker did not confirm a subscription to {topic}")
        got.wait(timeout)
        return found[0] if found else None
    finally:
        client.disconnect()
        client.loop_stop()


def publish_trust(
    options: BrokerOptions,
    store: FleetStore | None,
    *,
    signers: Sequence[ec.EllipticCurvePrivateKey],
    bundle_keys: Sequence[ec.EllipticCurvePublicKey],
    command_keys: Sequence[ec.EllipticCurvePublicKey],
    root_keys: Sequence[ec.EllipticCurvePublicKey] = (),
    version: int | None = None,
    threshold: int = 1,
    now: dt.datetime,
) -> PublishedTrust:
    """Sign, publish (retained, QoS 1, acknowledged) and record a trust document.

    Args:
        options: the broker.
        store: where to record it (None: not recorded).
        signers: the current root private keys.
        bundle_keys, command_keys: the whole sets in force afterwards.
        root_keys: the roots in force afterwards (default: the signers' public halves).
        version: default: one above the highest the store or the broker knows.
        threshold: root signatures later documents need.
        now: its ``issued_at``, and when it was recorded.

    Raises:
        ValueError: an empty key set, a bad threshold or version (make_trust's checks).
        BrokerError: the broker is unreachable or did not acknowledge.
        StoreError: recording failed (the document was published).
    """
    if version is None:
        known = [0]
        if store is not None and (row := store.latest_trust()) is not None:
            known.append(row.version)
        retained = retained_trust(options)
        if retained is not None:
            # a malformed retained document: the devices refused it too
            with contextlib.suppress(TrustError):
                known.append(peek_trust(retained).version)
        version = max(known) + 1
    roots = list(root_keys) or [k.public_key() for k in signers]
    document = make_trust(version=version, root_keys=roots, bundle_keys=bundle_keys,
                          command_keys=command_keys, signers=signers, threshold=threshold,
                          issued_at=now)  # fmt: skip
    topic = Topics(options.prefix).trust()
    client = connect(options)
    try:
        publish_and_wait(client, topic, document, retain=True)
    finally:
        client.disconnect()
        client.loop_stop()
    if store is not None:
        from edgepack.fleet._audit_facts import record_trust  # it imports this module

        store.batch(lambda: (store.record_trust(version, document, now),
                             record_trust(store, document, now)))  # fmt: skip
    return PublishedTrust(peek_trust(document), document, topic)
