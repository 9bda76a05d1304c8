"""Key rotation and revocation: the trust document, signed by an offline root key. No I/O.

A device starts with the keys in its ``agent.toml``: ``trusted_keys`` (who may sign bundles) and
``[mqtt] command_keys`` (who may sign fleet commands), plus ``root_keys``, the public halves of
keys the operator keeps offline. To add or retire bundle-signing and command keys later, the
operator signs a **trust document** with a root key (``edgepack-fleet trust``); the fleet
publishes it retained, so a device that was offline during the rotation catches up when it
returns. As in TUF's root metadata:

- the document lists the *whole* set of bundle keys and command keys in force: a key that is
  not listed is retired, and bundles or commands signed by it are refused from then on;
- it carries a ``version`` that must grow: an older or equal document (a replay, or a
  compromised mirror rolling a revocation back) is refused;
- it is a DSSE envelope (payload type :data:`TRUST_PAYLOAD_TYPE`) that must verify against a
  *root* key; the root set can only change by a document signed with the current root (and
  then it needs ``threshold`` signatures from the current roots), so a stolen command or bundle
  key can never rotate keys.

Wire form (inside the envelope)::

    {"schema": 1, "type": "edgepack-trust", "version": 3, "issued_at": "...",
     "root_keys": ["-----BEGIN PUBLIC KEY-----..."], "threshold": 1,
     "bundle_keys": ["-----BEGIN PUBLIC KEY-----..."], "command_keys": ["..."]}

:func:`make_trust` builds and signs one; :func:`open_trust` verifies one against the trust a
device holds now and returns the new :class:`Trust`, or raises :class:`TrustError` with the
reason.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec

from edgepack._clock import utc_now, utc_text
from edgepack.formats.dsse import dsse_sign, pae
from edgepack.formats.exceptions import KeyFormatError, MessageError
from edgepack.formats.keys import key_id, load_public_key, public_key_pem, signature_algorithm

__all__ = [
    "MAX_TRUST_BYTES",
    "TRUST_PAYLOAD_TYPE",
    "Trust",
    "TrustError",
    "make_trust",
    "open_trust",
]

TRUST_PAYLOAD_TYPE = "application/vnd.edgepack.trust+json"
SCHEMA = 1
MAX_TRUST_BYTES = 256 * 1024
_MAX_KEYS = 32


class TrustError(MessageError):
    """A trust document was refused; the message says why. The keys in force are unchanged."""


@dataclass(frozen=True)
class Trust:
    """The keys a device trusts now.

    ``version`` 0 is the trust from ``agent.toml``, before any document was applied.
    """

    version: int
    root_keys: tuple[ec.EllipticCurvePublicKey, ...]
    threshold: int
    bundle_keys: tuple[ec.EllipticCurvePublicKey, ...]
    command_keys: tuple[ec.EllipticCurvePublicKey, ...]
    issued_at: str = ""

    def summary(self) -> dict[str, Any]:
        """Key ids per role, for status output and reports."""
        return {
            "version": self.version,
            "threshold": self.threshold,
            "root_keys": [key_id(k) for k in self.root_keys],
            "bundle_keys": [key_id(k) for k in self.bundle_keys],
            "command_keys": [key_id(k) for k in self.command_keys],
        }


def make_trust(
    *,
    version: int,
    root_keys: Sequence[ec.EllipticCurvePublicKey],
    bundle_keys: Sequence[ec.EllipticCurvePublicKey],
    command_keys: Sequence[ec.EllipticCurvePublicKey],
    signers: Sequence[ec.EllipticCurvePrivateKey],
    threshold: int = 1,
    issued_at: dt.datetime | None = None,
) -> bytes:
    """Build and sign a trust document; returns the envelope's bytes (JSON).

    Args:
        version: above the version the devices hold (the first document is 1).
        root_keys: the root keys in force after this document (usually unchanged).
        bundle_keys, command_keys: the whole sets in force after it; keys left out are retired.
        signers: the current root private keys that sign it (at least the current threshold).
        threshold: how many root signatures later documents need.

    Raises:
        ValueError: a non-positive version, an empty key set, or a threshold above the roots.
    """
    if version < 1:
        raise ValueError("a trust document's version starts at 1")
    if not root_keys or not bundle_keys or not command_keys:
        raise ValueError("a trust document needs at least one root, bundle and command key")
    if not 1 <= threshold <= len(root_keys):
        raise ValueError(f"threshold must be between 1 and the {len(root_keys)} root keys")
    if not signers:
        raise ValueError("a trust document must be signed by at least one root key")
    body = {
        "schema": SCHEMA,
        "type": "edgepack-trust",
        "version": version,
        "issued_at": utc_text(issued_at or utc_now()),
        "threshold": threshold,
        "root_keys": [public_key_pem(k).decode() for k in root_keys],
        "bundle_keys": [public_key_pem(k).decode() for k in bundle_keys],
        "command_keys": [public_key_pem(k).decode() for k in command_keys],
    }
    payload = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    envelope = dsse_sign(TRUST_PAYLOAD_TYPE, payload, signers[0])
    for extra in signers[1:]:
        envelope["signatures"].extend(dsse_sign(TRUST_PAYLOAD_TYPE, payload, extra)["signatures"])
    return json.dumps(envelope, separators=(",", ":")).encode()


def _b64(value: object, what: str) -> bytes:
    if not isinstance(value, str) or len(value) > 4 * MAX_TRUST_BYTES:
        raise TrustError(f"trust document: {what} is missing or not a string")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error as e:
        raise TrustError(f"trust document: {what} is not valid base64") from e


def _keys(body: Mapping[str, Any], field: str) -> tuple[ec.EllipticCurvePublicKey, ...]:
    raw = body.get(field)
    if not isinstance(raw, list) or not 1 <= len(raw) <= _MAX_KEYS:
        raise TrustError(f"trust document: {field} must list 1 to {_MAX_KEYS} public keys")
    keys = []
    for i, pem in enumerate(raw):
        if not isinstance(pem, str):
            raise TrustError(f"trust document: {field}[{i}] is not a PEM string")
        try:
            keys.append(load_public_key(pem.encode(), source=f"{field}[{i}]"))
        except KeyFormatError as e:
            raise TrustError(f"trust document: {e}") from e
    return tuple(keys)


def _signers(
    envelope: Mapping[str, Any], payload: bytes, roots: Sequence[ec.EllipticCurvePublicKey]
) -> set[str]:
    """Key ids of the distinct ``roots`` that signed ``payload``."""
    signatures = envelope.get("signatures")
    if not isinstance(signatures, list) or not 1 <= len(signatures) <= _MAX_KEYS:
        raise TrustError(f"trust document needs 1 to {_MAX_KEYS} signatures")
    message = pae(TRUST_PAYLOAD_TYPE, payload)
    good: set[str] = set()
    for entry in signatures:
        if not isinstance(entry, Mapping):
            raise TrustError("trust document: a signature entry is not an object")
        sig = _b64(entry.get("sig"), "sig")
        for key in roots:
            try:
                key.verify(sig, message, signature_algorithm(key))
            except InvalidSignature:
                continue
            good.add(key_id(key))
    return good


def open_trust(raw: bytes, current: Trust) -> Trust:
    """Verify a trust document against the trust held now and return the trust it establishes.

    Args:
        raw: the envelope's bytes (from the retained trust topic or a pending answer).
        current: the trust in force on this device.

    Returns:
        The new :class:`Trust` (its version is above ``current.version``).

    Raises:
        TrustError: oversized or malformed; not signed by ``current.threshold`` current root
            keys (a command or bundle key can never sign one); not newer than ``current``; or
            establishing a threshold the new roots cannot meet. Nothing changes on error.
    """
    if len(raw) > MAX_TRUST_BYTES:
        raise TrustError(f"trust document is {len(raw)} bytes, above {MAX_TRUST_BYTES}")
    try:
        envelope = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise TrustError(f"trust document is not JSON: {str(e)[:100]}") from None
    if not isinstance(envelope, Mapping) or envelope.get("payloadType") != TRUST_PAYLOAD_TYPE:
        raise TrustError(f"not a trust document (payload type must be {TRUST_PAYLOAD_TYPE})")
    payload = _b64(envelope.get("payload"), "payload")
    good = _signers(envelope, payload, current.root_keys)
    if len(good) < current.threshold:
        raise TrustError(
            f"trust document is signed by {len(good)} of the device's root keys; it needs "
            f"{current.threshold}: only the offline root keys may change trust"
        )
    try:
        body = json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise TrustError(f"trust document payload is not JSON: {str(e)[:100]}") from None
    if not isinstance(body, Mapping) or body.get("type") != "edgepack-trust":
        raise TrustError("trust document payload is not of type 'edgepack-trust'")
    schema = body.get("schema")
    if type(schema) is not int or schema > SCHEMA:
        raise TrustError(
            f"trust document schema {schema!r} is newer than this agent understands "
            f"({SCHEMA}); upgrade edgepack on the device"
        )
    version = body.get("version")
    if type(version) is not int or not 0 < version < 2**53:
        raise TrustError("trust document: version must be a positive integer")
    if version <= current.version:
        raise TrustError(
            f"trust document version {version} is not newer than the version {current.version} "
            "in force (a replay or a rollback of a revocation)"
        )
    threshold = body.get("threshold", 1)
    roots = _keys(body, "root_keys")
    if type(threshold) is not int or not 1 <= threshold <= len(roots):
        raise TrustError(f"trust document: threshold must be between 1 and {len(roots)}")
    issued = body.get("issued_at", "")
    return Trust(
        version=version,
        root_keys=roots,
        threshold=threshold,
        bundle_keys=_keys(body, "bundle_keys"),
        command_keys=_keys(body, "command_keys"),
        issued_at=issued if isinstance(issued, str) else "",
    )
