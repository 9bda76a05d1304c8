"""Model signatures: OpenSSF model-signing v1.0 bundles made and checked with ``cryptography``.

The packager signs every bundle's files with :func:`sign_files`, which returns the
``model.sig`` that goes next to them. The agent on the device, and ``edgepack verify`` on a
workstation, check it with :func:`verify_files` (or :func:`verify_digests`, for files hashed
while they streamed past) before anything is installed. The file is
the format of the OpenSSF ``model_signing`` project (v1.x), so a third party can check a bundle
with their own tools: ``model_signing verify key --signature DIR/model.sig --public_key
signing.pub DIR``. The DSSE layer is :mod:`edgepack.formats.dsse`; keys come from
:mod:`edgepack.formats.keys`.

``model.sig`` is a Sigstore bundle v0.3 (JSON) with no transparency-log entries. Its
``verificationMaterial.publicKey.hint`` is the SHA-256 hex of the signer's public PEM
(:func:`key_id`). Its DSSE envelope carries an in-toto Statement v1, signed with ECDSA over the
DSSE pre-authentication encoding, DER-encoded, hashed with SHA-256 on P-256, SHA-384 on P-384
and SHA-512 on P-521 (as ``model_signing`` picks by key size). The statement's predicate
(``https://model_signing/signature/v1.0``) lists one ``{name, algorithm, digest}`` resource per
file, sorted by path components, under the serialization ``{"method": "files", "hash_type":
"sha256", "allow_symlinks": false, "ignore_paths": ["model.sig"]}``. Its one subject is named
after the directory (only informative: ``model_signing`` never compares it) and carries the
SHA-256 of the raw file digests concatenated in resource order.

Verification is stricter than ``model_signing``: every file present must be covered, whatever
the signature's ``ignore_paths`` say (they are parsed, not honoured), so an unsigned file can
never ride along in a bundle. The deciding code takes bytes or digests and does no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from edgepack._digest import sha256
from edgepack.formats.dsse import dsse_sign, dsse_verify
from edgepack.formats.exceptions import SignatureError
from edgepack.formats.keys import key_id

__all__ = [
    "MAX_SIGNATURE_BYTES",
    "SIGNATURE_FILE",
    "VerifiedSignature",
    "sign_digests",
    "sign_files",
    "verify_digests",
    "verify_files",
]

SIGNATURE_FILE = "model.sig"
MAX_SIGNATURE_BYTES = 16 * 1024 * 1024

_BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
_IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
_STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
_PREDICATE_TYPE = "https://model_signing/signature/v1.0"
# model_signing's CLI leaves these out of the hashed files by default (top level only), so a
# signature that covered them would fail there.
_GIT_PATHS = frozenset({".git", ".gitattributes", ".github", ".gitignore"})


@dataclass(frozen=True)
class VerifiedSignature:
    """What a valid ``model.sig`` vouches for: the key id of the trusted key that verified it,
    every covered file (relative POSIX path -> SHA-256 hex), and the subject's SHA-256 over all
    file digests."""

    key_id: str
    files: dict[str, str]
    subject_digest: str


def _check_name(name: object) -> str:
    """Return ``name`` if it is a canonical relative POSIX path, else raise ValueError."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"file name {name!r} is empty or not a string")
    parts = name.split("/")
    if name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"file name {name!r} is absolute, contains '..' or is not normalized")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"file name {name!r} is not valid UTF-8") from e
    return name


def _subject_digest(digests: Sequence[str]) -> str:
    return sha256(b"".join(bytes.fromhex(d) for d in digests)).hexdigest()


def sign_digests(
    digests: Mapping[str, str], key: ec.EllipticCurvePrivateKey, model_name: str
) -> bytes:
    """Sign files by their SHA-256 digests (hashed by the caller as they streamed past).

    Args:
        digests: relative POSIX path -> SHA-256 hex, for every file but model.sig.
        key: the ECDSA private key.
        model_name: the statement's subject name (``model_signing`` uses the directory's name).

    Returns:
        The ``model.sig`` bytes.

    Raises:
        ValueError: a name is not a canonical relative path, or one model_signing would skip.
    """
    for name in digests:
        _check_name(name)
        if name == SIGNATURE_FILE or name.split("/")[0] in _GIT_PATHS:
            raise ValueError(f"{name!r} cannot be signed: model_signing leaves it out")
    # model_signing sorts PurePosixPath objects, i.e. by components: "a/b" before "a-b".
    names = sorted(digests, key=lambda n: n.split("/"))
    statement = {
        "_type": _STATEMENT_TYPE,
        "subject": [
            {"name": model_name, "digest": {"sha256": _subject_digest([digests[n] for n in names])}}
        ],
        "predicateType": _PREDICATE_TYPE,
        "predicate": {
            "serialization": {
                "method": "files",
                "hash_type": "sha256",
                "allow_symlinks": False,
                "ignore_paths": [SIGNATURE_FILE],
            },
            "resources": [{"name": n, "algorithm": "sha256", "digest": digests[n]} for n in names],
        },
    }
    payload = json.dumps(statement, indent=2).encode()
    bundle = {
        "mediaType": _BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {"publicKey": {"hint": key_id(key)}, "tlogEntries": []},
        "dsseEnvelope": dsse_sign(_IN_TOTO_PAYLOAD_TYPE, payload, key),
    }
    return json.dumps(bundle, separators=(",", ":")).encode()


def sign_files(
    files: Mapping[str, bytes], key: ec.EllipticCurvePrivateKey, *, model_name: str
) -> bytes:
    """Sign a model's files; return the ``model.sig`` bytes.

    Args:
        files: relative POSIX path -> content, for every file of the directory but model.sig.
        key: the ECDSA private key.
        model_name: the subject name; ``model_signing`` uses the directory's base name.

    Raises:
        ValueError: a name is not a normalized relative path, or is one ``model_signing``
            leaves out (``model.sig``, ``.git*`` at the top level).
        KeyFormatError: ``key`` is not an ECDSA P-256/384/521 private key.
    """
    digests = {name: sha256(data).hexdigest() for name, data in files.items()}
    return sign_digests(digests, key, model_name)


def _field(obj: object, key: str, kind: type, where: str) -> Any:
    value = obj.get(key) if isinstance(obj, Mapping) else None
    if not isinstance(value, kind):
        raise SignatureError(f"model.sig: {where}{key} is missing or not a {kind.__name__}")
    return value


def _read_statement(
    signature: bytes, trusted_keys: Sequence[ec.EllipticCurvePublicKey]
) -> tuple[dict[str, Any], ec.EllipticCurvePublicKey]:
    if len(signature) > MAX_SIGNATURE_BYTES:
        raise SignatureError(f"model.sig is larger than {MAX_SIGNATURE_BYTES} bytes")
    try:
        bundle = json.loads(signature)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError
        raise SignatureError(f"model.sig is not valid JSON: {e}") from e
    media_type = bundle.get("mediaType") if isinstance(bundle, dict) else None
    if media_type != _BUNDLE_MEDIA_TYPE:
        raise SignatureError(f"model.sig has media type {media_type!r}, not {_BUNDLE_MEDIA_TYPE}")
    material = bundle.get("verificationMaterial")
    public_key = material.get("publicKey") if isinstance(material, Mapping) else None
    hint = public_key.get("hint") if isinstance(public_key, Mapping) else None
    if hint is not None and not isinstance(hint, str):
        raise SignatureError("model.sig: the public key hint is not a string")
    payload, key = dsse_verify(
        bundle.get("dsseEnvelope"), trusted_keys, payload_type=_IN_TOTO_PAYLOAD_TYPE, hint=hint
    )
    if hint and hint != key_id(key):
        # model_signing refuses a hint that names another key; agree with it.
        raise SignatureError(f"model.sig names key {hint} but is signed by {key_id(key)}")
    try:
        statement = json.loads(payload)
    except (ValueError, RecursionError) as e:
        raise SignatureError(f"model.sig: the signed statement is not valid JSON: {e}") from e
    if not isinstance(statement, dict) or statement.get("_type") != _STATEMENT_TYPE:
        raise SignatureError(f"model.sig: the signed payload is not an in-toto {_STATEMENT_TYPE}")
    if statement.get("predicateType") != _PREDICATE_TYPE:
        raise SignatureError(
            f"model.sig: predicate type {statement.get('predicateType')!r} is not supported; "
            f"expected {_PREDICATE_TYPE}"
        )
    return statement, key


def verify_digests(
    actual: Mapping[str, str],
    signature: bytes,
    trusted_keys: Sequence[ec.EllipticCurvePublicKey],
) -> VerifiedSignature:
    """Check ``model.sig`` against files known by their digests (path -> SHA-256 hex). No I/O.

    Every file in ``actual`` must be covered, and every covered file present and unchanged.

    Raises:
        SignatureError: malformed, untrusted or invalid signature; a file extra, missing or
            modified.
    """
    statement, key = _read_statement(signature, trusted_keys)
    subjects = _field(statement, "subject", list, "")
    if len(subjects) != 1:
        raise SignatureError(f"model.sig: expected one subject, found {len(subjects)}")
    subject_digest = _field(
        _field(subjects[0], "digest", dict, "subject."), "sha256", str, "subject.digest."
    )
    predicate = _field(statement, "predicate", dict, "")
    ser = _field(predicate, "serialization", dict, "predicate.")
    if ser.get("method") != "files" or ser.get("hash_type") != "sha256":
        raise SignatureError(
            f"model.sig: serialization {ser.get('method')!r} with hash {ser.get('hash_type')!r} "
            "is not supported; only 'files' with 'sha256'"
        )
    if ser.get("allow_symlinks") is not False:
        raise SignatureError("model.sig: the signature allows symlinks; bundles may not have any")
    ignored = ser.get("ignore_paths", [])
    if not isinstance(ignored, list) or not all(isinstance(p, str) for p in ignored):
        raise SignatureError("model.sig: ignore_paths is not a list of strings")

    signed: dict[str, str] = {}
    for resource in _field(predicate, "resources", list, "predicate."):
        name = _field(resource, "name", str, "resource.")
        try:
            _check_name(name)
        except ValueError as e:
            raise SignatureError(f"model.sig: {e}") from e
        if resource.get("algorithm") != "sha256":
            raise SignatureError(f"model.sig: {name!r} is not hashed with sha256")
        digest = _field(resource, "digest", str, "resource.").lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise SignatureError(f"model.sig: the digest of {name!r} is not a SHA-256 hex digest")
        if name in signed:
            raise SignatureError(f"model.sig lists {name!r} twice")
        signed[name] = digest
    if _subject_digest(list(signed.values())) != subject_digest.lower():
        raise SignatureError("model.sig is inconsistent: the subject digest does not match files")

    problems = sorted(
        f"extra file {n!r} is not covered by the signature" for n in actual if n not in signed
    ) + sorted(
        f"signed file {n!r} is missing" if n not in actual else f"{n!r} was modified after signing"
        for n in signed
        if actual.get(n) != signed[n]
    )
    if problems:
        more = f"; and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise SignatureError("; ".join(problems[:10]) + more)
    return VerifiedSignature(key_id(key), signed, subject_digest.lower())


def verify_files(
    files: Mapping[str, bytes],
    signature: bytes,
    trusted_keys: Sequence[ec.EllipticCurvePublicKey],
) -> VerifiedSignature:
    """Check ``model.sig`` against a model's files and the trusted keys. No I/O.

    Args:
        files: every file found in the model directory except model.sig: path -> content.
        signature: the bytes of model.sig.
        trusted_keys: the public keys allowed to sign models.

    Returns:
        What the signature covers and which key made it.

    Raises:
        SignatureError: with the reason: malformed or unsupported signature, no trusted key
            verifies, or a file is extra, missing or modified.
    """
    digests = {name: sha256(data).hexdigest() for name, data in files.items()}
    return verify_digests(digests, signature, trusted_keys)
