"""Model signatures: OpenSSF model-signing v1.0 bundles made and checked with ``cryptography``.

The packager signs every bundle directory with :func:`sign_directory`, which writes
``model.sig`` next to the files it covers. The agent on the device, and ``edgepack verify`` on a
workstation, check it with :func:`verify_directory` before anything is installed. The file is
the format of the OpenSSF ``model_signing`` project (v1.x), so a third party can check a bundle
with their own tools: ``model_signing verify key --signature DIR/model.sig --public_key
signing.pub DIR``. The fleet reuses :func:`dsse_sign`/:func:`dsse_verify` to sign MQTT commands.

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
never ride along in a bundle. The deciding code (:func:`verify_files`) takes bytes and does no
I/O; the ``*_directory`` functions are the thin layer that reads and writes files.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.exceptions import KeyFormatError, SignatureError

__all__ = [
    "SIGNATURE_FILE",
    "VerifiedSignature",
    "dsse_sign",
    "dsse_verify",
    "generate_private_key",
    "key_id",
    "load_private_key",
    "load_public_key",
    "private_key_pem",
    "public_key_pem",
    "sign_directory",
    "sign_files",
    "verify_directory",
    "verify_files",
]

SIGNATURE_FILE = "model.sig"

_BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
_IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
_STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
_PREDICATE_TYPE = "https://model_signing/signature/v1.0"
_HASH_FOR_CURVE: dict[str, type[hashes.HashAlgorithm]] = {
    "secp256r1": hashes.SHA256,
    "secp384r1": hashes.SHA384,
    "secp521r1": hashes.SHA512,
}
# model_signing's CLI leaves these out of the hashed files by default (top level only), so a
# signature that covered them would fail there.
_GIT_PATHS = frozenset({".git", ".gitattributes", ".github", ".gitignore"})
_MAX_SIGNATURE_BYTES = 16 * 1024 * 1024
_MAX_DSSE_SIGNATURES = 8
_CHUNK = 1024 * 1024

_AnyKey = ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey


@dataclass(frozen=True)
class VerifiedSignature:
    """What a valid ``model.sig`` vouches for: the :func:`key_id` of the trusted key that
    verified it, every covered file (relative POSIX path -> SHA-256 hex), and the subject's
    SHA-256 over all file digests."""

    key_id: str
    files: dict[str, str]
    subject_digest: str


# --- keys -----------------------------------------------------------------------------------


def generate_private_key() -> ec.EllipticCurvePrivateKey:
    """Return a new ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Return ``key`` as unencrypted PKCS#8 PEM (the form ``model_signing`` reads)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_key_pem(key: _AnyKey) -> bytes:
    """Return the SubjectPublicKeyInfo PEM of ``key`` (or of a private key's public half)."""
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_id(public_key: _AnyKey) -> str:
    """Return the SHA-256 hex of the public PEM: the Sigstore bundle's key ``hint``."""
    return hashlib.sha256(public_key_pem(public_key)).hexdigest()


def _kind(key: object) -> str:
    return type(key).__name__.removesuffix("PrivateKey").removesuffix("PublicKey").lstrip("_")


def _check_ecdsa(key: object, source: str) -> None:
    if not isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        raise KeyFormatError(
            f"{source}: {_kind(key)} keys are not supported; "
            "use an ECDSA key on P-256, P-384 or P-521"
        )
    if key.curve.name not in _HASH_FOR_CURVE:
        raise KeyFormatError(
            f"{source}: ECDSA curve {key.curve.name} is not supported; use P-256, P-384 or P-521"
        )


def load_private_key(pem: bytes, *, source: str = "key") -> ec.EllipticCurvePrivateKey:
    """Load an unencrypted PEM ECDSA private key; errors name it ``source`` (its path).

    Raises:
        KeyFormatError: not a PEM private key, encrypted, a public key, or not ECDSA P-256/384/521.
    """
    if b"-----BEGIN PUBLIC KEY-----" in pem:
        raise KeyFormatError(f"{source}: this is a public key; pass the private key file")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError as e:
        raise KeyFormatError(f"{source}: the private key is encrypted; pass it unencrypted") from e
    except (ValueError, UnsupportedAlgorithm) as e:
        raise KeyFormatError(f"{source}: not a readable PEM private key ({e})") from e
    _check_ecdsa(key, source)
    return cast(ec.EllipticCurvePrivateKey, key)


def load_public_key(pem: bytes, *, source: str = "key") -> ec.EllipticCurvePublicKey:
    """Load a PEM (SubjectPublicKeyInfo) ECDSA public key; errors name it ``source``.

    Raises:
        KeyFormatError: not a PEM public key, a private key, or not ECDSA P-256/384/521.
    """
    if b"PRIVATE KEY-----" in pem:
        raise KeyFormatError(f"{source}: this is a private key; pass the .pub file")
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise KeyFormatError(f"{source}: not a readable PEM public key ({e})") from e
    _check_ecdsa(key, source)
    return cast(ec.EllipticCurvePublicKey, key)


# --- DSSE -----------------------------------------------------------------------------------


def _pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what the signature actually covers."""
    t = payload_type.encode()
    return b"DSSEv1 %d %b %d %b" % (len(t), t, len(payload), payload)


def _ecdsa(key: _AnyKey) -> ec.ECDSA:
    return ec.ECDSA(_HASH_FOR_CURVE[key.curve.name]())


def dsse_sign(payload_type: str, payload: bytes, key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    """Sign ``payload`` into a DSSE envelope (JSON-ready dict, base64 fields).

    Raises:
        KeyFormatError: ``key`` is not an ECDSA P-256/384/521 private key.
    """
    _check_ecdsa(key, "signing key")
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFormatError("signing key: this is a public key; a private key is needed")
    sig = key.sign(_pae(payload_type, payload), _ecdsa(key))
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
    message = _pae(payload_type, payload)
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
                key.verify(sig, message, _ecdsa(key))
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
) -> tuple[bytes, ec.EllipticCurvePublicKey]:
    """Check a DSSE envelope against trusted keys. No I/O.

    Returns:
        The payload bytes and the trusted key whose signature verified.

    Raises:
        SignatureError: malformed envelope, other payload type, or no trusted key verifies.
    """
    return _dsse_verify(envelope, trusted_keys, payload_type, None)


# --- model signatures -----------------------------------------------------------------------


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
    return hashlib.sha256(b"".join(bytes.fromhex(d) for d in digests)).hexdigest()


def _sign_digests(
    digests: Mapping[str, str], key: ec.EllipticCurvePrivateKey, model_name: str
) -> bytes:
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
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    return _sign_digests(digests, key, model_name)


def _field(obj: object, key: str, kind: type, where: str) -> Any:
    value = obj.get(key) if isinstance(obj, Mapping) else None
    if not isinstance(value, kind):
        raise SignatureError(f"model.sig: {where}{key} is missing or not a {kind.__name__}")
    return value


def _read_statement(
    signature: bytes, trusted_keys: Sequence[ec.EllipticCurvePublicKey]
) -> tuple[dict[str, Any], ec.EllipticCurvePublicKey]:
    if len(signature) > _MAX_SIGNATURE_BYTES:
        raise SignatureError(f"model.sig is larger than {_MAX_SIGNATURE_BYTES} bytes")
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
    payload, key = _dsse_verify(
        bundle.get("dsseEnvelope"), trusted_keys, _IN_TOTO_PAYLOAD_TYPE, hint
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


def _verify_digests(
    actual: Mapping[str, str],
    signature: bytes,
    trusted_keys: Sequence[ec.EllipticCurvePublicKey],
) -> VerifiedSignature:
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
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    return _verify_digests(digests, signature, trusted_keys)


# --- directories (the I/O layer) ------------------------------------------------------------


def _walk(root: Path, prefix: str = "") -> Iterator[tuple[str, Path]]:
    """Yield (relative POSIX name, path) for every regular file; refuse anything else."""
    with os.scandir(root) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            name = prefix + entry.name
            if entry.is_symlink():
                raise SignatureError(f"{name!r} is a symbolic link; a model may not contain links")
            if entry.is_dir(follow_symlinks=False):
                yield from _walk(Path(entry.path), name + "/")
            elif entry.is_file(follow_symlinks=False):
                if name != SIGNATURE_FILE:
                    yield name, Path(entry.path)
            else:
                raise SignatureError(f"{name!r} is not a regular file or directory")


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _digest_tree(path: Path) -> dict[str, str]:
    if path.is_symlink() or not path.is_dir():
        raise SignatureError(f"{path} is not a directory (or is a symbolic link)")
    return {name: _hash_file(p) for name, p in _walk(path)}


def sign_directory(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    """Sign every file under ``path``; write and return ``path/model.sig`` (replacing any).

    Files are hashed as they are read, not loaded whole. The subject is named as
    ``model_signing`` names it: the directory's base name.

    Raises:
        SignatureError: the directory holds a symlink or a special file.
        ValueError: it holds a top-level ``.git*`` entry, which ``model_signing`` would skip.
        OSError: reading or writing failed.
    """
    digests = _digest_tree(path)
    name = path.name if path.name not in ("", "..") else path.resolve().name
    out = path / SIGNATURE_FILE
    out.write_bytes(_sign_digests(digests, key, name))
    return out


def verify_directory(
    path: Path, trusted_keys: Sequence[ec.EllipticCurvePublicKey]
) -> VerifiedSignature:
    """Verify ``path/model.sig`` against every file under ``path``, streaming the hashes.

    Raises:
        SignatureError: model.sig is missing or invalid, the directory holds a symlink or a
            special file, or a file is extra, missing or modified.
        OSError: reading failed.
    """
    sig_path = path / SIGNATURE_FILE
    if sig_path.is_symlink() or not sig_path.is_file():
        raise SignatureError(f"{sig_path} is missing or not a regular file")
    if sig_path.stat().st_size > _MAX_SIGNATURE_BYTES:
        raise SignatureError(f"model.sig is larger than {_MAX_SIGNATURE_BYTES} bytes")
    return _verify_digests(_digest_tree(path), sig_path.read_bytes(), trusted_keys)
