"""DSSE envelopes: sign a payload with a key, and verify one against trusted keys. No I/O.

The Dead Simple Signing Envelope (v1) signs the pre-authentication encoding of a payload type
and payload; its JSON form carries both base64-encoded with one or more signatures. edgepack uses
it twice: inside ``model.sig`` (an in-toto statement, :mod:`edgepack.formats.modelsig`) and for
fleet commands (:mod:`edgepack.formats.commands`).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec

from edgepack.formats.exceptions import KeyFormatError, SignatureError
from edgepack.formats.keys import check_ecdsa, key_id, signature_algorithm

__all__ = ["dsse_sign", "dsse_verify", "pae"]

_MAX_DSSE_SIGNATURES = 8


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what the signature actually covers."""
    t = payload_type.encode()
    return b"DSSEv1 %d %b %d %b" % (len(t), t, len(payload), payload)


def dsse_sign(payload_type: str, payload: bytes, key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    """Sign ``payload`` into a DSSE envelope (JSON-ready dict, base64 fields).

    Raises:
        KeyFormatError: ``key`` is not an ECDSA P-256/384/521 private key.
    """
    check_ecdsa(key, "signing key")
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFormatError("signing key: this is a public key; a private key is needed")
    sig = key.sign(pae(payload_type, payload), signature_algorithm(key))
    return {
        "payload": base64.b64encode(payload).decode(),
        "payloadType": payload_type,
        "signatures": [{"sig": base64.b64encode(sig).decode(), "keyid": key_id(key)}],
    }


def _b64(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise SignatureError(f"DSSE envelope: {what} is missing or not a string")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error as e:
        raise SignatureError(f"DSSE envelope: {what} is not valid base64") from e


def _dsse_verify(
    envelope: object,
    trusted_keys: Sequence[ec.EllipticCurvePublicKey],
    payload_type: str,
    hint: str | None,
) -> tuple[bytes, ec.EllipticCurvePublicKey]:
    if not isinstance(envelope, Mapping):
        raise SignatureError("DSSE envelope is missing or not an object")
    if envelope.get("payloadType") != payload_type:
        raise SignatureError(
            f"DSSE payload type is {envelope.get('payloadType')!r}, expected {payload_type!r}"
        )
    payload = _b64(envelope.get("payload"), "payload")
    signatures = envelope.get("signatures")
    if not isinstance(signatures, list) or not 1 <= len(signatures) <= _MAX_DSSE_SIGNATURES:
        raise SignatureError(f"DSSE envelope needs 1 to {_MAX_DSSE_SIGNATURES} signatures")
    message = pae(payload_type, payload)
    claimed: list[str] = []
    for entry in signatures:
        if not isinstance(entry, Mapping):
            raise SignatureError("DSSE envelope: a signature entry is not an object")
        sig = _b64(entry.get("sig"), "sig")
        claim = hint or entry.get("keyid") or None
        if isinstance(claim, str):
            claimed.append(claim)
        # The claimed id is unsigned: it only orders the keys, and every key is tried.
        for key in sorted(trusted_keys, key=lambda k: key_id(k) != claim):
            try:
                key.verify(sig, message, signature_algorithm(key))
            except InvalidSignature:
                continue
            return payload, key
    who = claimed[0] if claimed else "with no key id"
    if who in {key_id(k) for k in trusted_keys}:
        raise SignatureError(f"the signature by trusted key {who} does not verify: content altered")
    raise SignatureError(
        f"signed by key {who}, which is not among the {len(trusted_keys)} trusted keys"
    )


def dsse_verify(
    envelope: Mapping[str, Any],
    trusted_keys: Sequence[ec.EllipticCurvePublicKey],
    *,
    payload_type: str,
    hint: str | None = None,
) -> tuple[bytes, ec.EllipticCurvePublicKey]:
    """Check a DSSE envelope against trusted keys. No I/O.

    ``hint`` (a key id named outside the envelope, as a Sigstore bundle does) only orders the
    keys tried first; every trusted key is tried.

    Returns:
        The payload bytes and the trusted key whose signature verified.

    Raises:
        SignatureError: malformed envelope, other payload type, or no trusted key verifies.
    """
    return _dsse_verify(envelope, trusted_keys, payload_type, hint)
