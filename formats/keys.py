"""Signing keys: ECDSA P-256/384/521 in PEM, loaded strictly, and their key ids.

Every signature edgepack makes or checks (``model.sig`` in :mod:`edgepack.formats.modelsig`,
signed fleet commands in :mod:`edgepack.formats.commands`) uses keys loaded here, so the rules
are one: unencrypted PKCS#8 private keys, SubjectPublicKeyInfo public keys, ECDSA only. A key's
id (:func:`key_id`) is the SHA-256 hex of its public PEM, the Sigstore bundle's key ``hint``.
"""

from __future__ import annotations

from typing import cast

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgepack._digest import sha256
from edgepack.formats.exceptions import KeyFormatError

__all__ = [
    "AnyKey",
    "check_ecdsa",
    "generate_private_key",
    "key_id",
    "load_private_key",
    "load_public_key",
    "private_key_pem",
    "public_key_pem",
    "signature_algorithm",
]

_HASH_FOR_CURVE: dict[str, type[hashes.HashAlgorithm]] = {
    "secp256r1": hashes.SHA256,
    "secp384r1": hashes.SHA384,
    "secp521r1": hashes.SHA512,
}

AnyKey = ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey


def signature_algorithm(key: AnyKey) -> ec.ECDSA:
    """ECDSA with the hash ``model_signing`` picks for the key's curve (SHA-256 on P-256...)."""
    return ec.ECDSA(_HASH_FOR_CURVE[key.curve.name]())


def generate_private_key() -> ec.EllipticCurvePrivateKey:
    """Return a new ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Return ``key`` as unencrypted PKCS#8 PEM (the form ``model_signing`` reads)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_key_pem(key: AnyKey) -> bytes:
    """Return the SubjectPublicKeyInfo PEM of ``key`` (or of a private key's public half)."""
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_id(public_key: AnyKey) -> str:
    """Return the SHA-256 hex of the public PEM: the Sigstore bundle's key ``hint``."""
    return sha256(public_key_pem(public_key)).hexdigest()


def _kind(key: object) -> str:
    return type(key).__name__.removesuffix("PrivateKey").removesuffix("PublicKey").lstrip("_")


def check_ecdsa(key: object, source: str) -> None:
    """Raise KeyFormatError unless ``key`` is an ECDSA key on a supported curve."""
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
    check_ecdsa(key, source)
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
    check_ecdsa(key, source)
    return cast(ec.EllipticCurvePublicKey, key)
