"""edgepack.formats.modelsig: our model.sig must be what the OpenSSF model_signing CLI accepts, and
both must
refuse the same tampering. Each attack test sets up one lie and checks both verifiers."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from edgepack.agent.exceptions import KeyFormatError, SignatureError
from edgepack.formats.dsse import dsse_sign, dsse_verify
from edgepack.formats.keys import (
    generate_private_key,
    key_id,
    load_private_key,
    load_public_key,
    private_key_pem,
    public_key_pem,
)
from edgepack.formats.modelsig import SIGNATURE_FILE, sign_files, verify_files
from tests.signed_dirs import sign_directory, verify_directory

CLI = Path(sys.executable).parent / "model_signing"
needs_cli = pytest.mark.skipif(not CLI.exists(), reason="model_signing CLI not installed")

FILES = {
    "model.onnx": b"\x08\x07onnx-bytes" * 50,
    "manifest.json": b'{"name": "demo"}',
    "data/weights.bin": bytes(range(256)),
    "data-card.txt": b"sorted after data/ by components, before it as a string",
}


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return generate_private_key()


@pytest.fixture
def model(tmp_path: Path) -> Path:
    root = tmp_path / "demo-model"
    for name, data in FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def write_pub(tmp_path: Path, key: ec.EllipticCurvePrivateKey, name: str = "signing.pub") -> Path:
    path = tmp_path / name
    path.write_bytes(public_key_pem(key))
    return path


def cli_verify(model: Path, pub: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLI), "verify", "key", "--signature", str(model / SIGNATURE_FILE),
         "--public_key", str(pub), str(model)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def statement_of(signature: bytes) -> dict[str, Any]:
    bundle = json.loads(signature)
    return json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))


def resign(signature: bytes, key: ec.EllipticCurvePrivateKey, mutate: Callable) -> bytes:
    """Re-sign a model.sig after `mutate` changed its statement: a validly signed lie."""
    bundle = json.loads(signature)
    statement = statement_of(signature)
    mutate(statement)
    payload = json.dumps(statement).encode()
    bundle["dsseEnvelope"] = dsse_sign("application/vnd.in-toto+json", payload, key)
    return json.dumps(bundle).encode()


# --- interoperability with the real model_signing CLI ----------------------------------------


@needs_cli
def test_signed_directory_verifies_with_cli_and_ours(model, key, tmp_path):
    sig = sign_directory(model, key)

    assert sig == model / SIGNATURE_FILE
    result = cli_verify(model, write_pub(tmp_path, key))
    assert result.returncode == 0, result.stderr
    verified = verify_directory(model, [load_public_key(public_key_pem(key))])
    assert verified.key_id == key_id(key)
    assert set(verified.files) == set(FILES)


def test_payload_matches_model_signing_library(model, key):
    hashing = pytest.importorskip("model_signing.hashing")
    sign_directory(model, key)
    statement = statement_of((model / SIGNATURE_FILE).read_bytes())

    theirs = hashing.Config().set_ignored_paths(paths=[SIGNATURE_FILE]).hash(model)
    expected = [(r.identifier, r.digest.digest_hex) for r in theirs.resource_descriptors()]
    ours = [(r["name"], r["digest"]) for r in statement["predicate"]["resources"]]
    assert ours == expected  # same names, digests and order ("data/..." before "data-card.txt")
    assert statement["subject"][0]["name"] == "demo-model"
    assert statement["predicate"]["serialization"] == {
        "method": "files", "hash_type": "sha256", "allow_symlinks": False,
        "ignore_paths": [SIGNATURE_FILE],
    }  # fmt: skip


def _flip_byte(model: Path) -> None:
    data = bytearray((model / "data/weights.bin").read_bytes())
    data[10] ^= 0x01
    (model / "data/weights.bin").write_bytes(bytes(data))


TAMPERING = {  # how to lie, what we say, what the CLI says
    "flip": (_flip_byte, "'data/weights.bin' was modified after signing",
             "Hash mismatch for 'data/weights.bin'"),
    "add": (lambda m: (m / "extra.py").write_text("import os"),
            "extra file 'extra.py' is not covered", "Extra files found in model .*: extra.py"),
    "remove": (lambda m: (m / "manifest.json").unlink(),
               "signed file 'manifest.json' is missing", "Missing files in .*: manifest.json"),
}  # fmt: skip


@needs_cli
@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_tampering_fails_both_verifiers(model, key, tmp_path, case):
    tamper, message, cli_message = TAMPERING[case]
    sign_directory(model, key)
    tamper(model)

    result = cli_verify(model, write_pub(tmp_path, key))
    assert result.returncode != 0
    assert re.search(cli_message, result.stderr), result.stderr
    with pytest.raises(SignatureError, match=message):
        verify_directory(model, [key.public_key()])


@needs_cli
def test_another_key_fails_both_verifiers(model, key, tmp_path):
    sign_directory(model, key)
    other = generate_private_key()

    result = cli_verify(model, write_pub(tmp_path, other))
    assert result.returncode != 0
    assert "Key mismatch" in result.stderr, result.stderr
    with pytest.raises(SignatureError, match=f"signed by key {key_id(key)}, which is not among"):
        verify_directory(model, [other.public_key()])


@needs_cli
@pytest.mark.parametrize(
    ("curve", "hash_cls"), [(ec.SECP384R1, hashes.SHA384), (ec.SECP521R1, hashes.SHA512)]
)
def test_larger_curves_round_trip_through_cli(model, tmp_path, curve, hash_cls):
    key = ec.generate_private_key(curve())
    sign_directory(model, key)

    result = cli_verify(model, write_pub(tmp_path, key))
    assert result.returncode == 0, result.stderr
    assert verify_directory(model, [key.public_key()]).key_id == key_id(key)
    envelope = json.loads((model / SIGNATURE_FILE).read_bytes())["dsseEnvelope"]
    payload = base64.b64decode(envelope["payload"])
    pae = b"DSSEv1 28 application/vnd.in-toto+json %d %b" % (len(payload), payload)
    sig = base64.b64decode(envelope["signatures"][0]["sig"])
    key.public_key().verify(sig, pae, ec.ECDSA(hash_cls()))  # DER, with the curve's hash


@needs_cli
def test_cli_signature_verifies_with_ours(model, tmp_path):
    key = generate_private_key()
    priv = tmp_path / "signing.key"
    priv.write_bytes(private_key_pem(key))
    subprocess.run(
        [str(CLI), "sign", "key", "--private_key", str(priv),
         "--signature", str(model / SIGNATURE_FILE), str(model)],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip

    verified = verify_directory(model, [generate_private_key().public_key(), key.public_key()])
    assert verified.key_id == key_id(key)


# --- directories -----------------------------------------------------------------------------


def test_symlink_is_refused_when_signing_and_verifying(model, key):
    (model / "data/link").symlink_to("weights.bin")
    with pytest.raises(SignatureError, match=r"'data/link' is a symbolic link"):
        sign_directory(model, key)

    (model / "data/link").unlink()
    sign_directory(model, key)
    (model / "data/link").symlink_to("weights.bin")
    with pytest.raises(SignatureError, match="symbolic link"):
        verify_directory(model, [key.public_key()])


def test_missing_signature_file(model, key):
    with pytest.raises(SignatureError, match=r"model\.sig is missing"):
        verify_directory(model, [key.public_key()])


# --- the pure verifier: one lie per case -----------------------------------------------------


def _set(path: str, value: object) -> Callable[[dict[str, Any]], None]:
    def mutate(statement: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = statement
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        node[last] = value

    return mutate


def _add_resource(name: str, *, digest: str = "00" * 32) -> Callable[[dict[str, Any]], None]:
    return lambda st: st["predicate"]["resources"].append(
        {"name": name, "algorithm": "sha256", "digest": digest}
    )


LIES = {
    "predicate type": (_set("predicateType", "https://model_signing/Digests/v0.1"),
                       "predicate type .* is not supported"),
    "shards": (_set("predicate.serialization.method", "shards"), "'shards' .* not supported"),
    "blake2": (_set("predicate.serialization.hash_type", "blake2"), "not supported"),
    "symlinks": (_set("predicate.serialization.allow_symlinks", True), "allows symlinks"),
    "duplicate": (_add_resource("model.onnx"), "lists 'model.onnx' twice"),
    "dotdot": (_add_resource("../etc/passwd"), "contains '..'"),
    "absolute": (_add_resource("/etc/passwd"), "is absolute"),
    "subject": (_set("subject.0.digest.sha256", "ab" * 32), "inconsistent"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(LIES))
def test_signed_but_malformed_statements_are_refused(key, case):
    mutate, message = LIES[case]
    lie = resign(sign_files(FILES, key, model_name="m"), key, mutate)
    with pytest.raises(SignatureError, match=message):
        verify_files(FILES, lie, [key.public_key()])


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda sig: sig[:-5], "not valid JSON"),
        (lambda sig: sig.replace(b"bundle.v0.3", b"bundle.v0.1"), "media type"),
        (lambda sig: sig.replace(b'"payload":"', b'"payload":"AAAA'), "does not verify"),
    ],
)
def test_malformed_bundles_are_refused(key, mangle, message):
    sig = mangle(sign_files(FILES, key, model_name="m"))
    with pytest.raises(SignatureError, match=message):
        verify_files(FILES, sig, [key.public_key()])


def test_verify_files_reports_every_difference(key):
    sig = sign_files(FILES, key, model_name="m")
    files = dict(FILES, **{"model.onnx": b"evil", "new.bin": b""})
    del files["manifest.json"]
    with pytest.raises(SignatureError) as err:
        verify_files(files, sig, [key.public_key()])
    assert "'model.onnx' was modified after signing" in str(err.value)
    assert "extra file 'new.bin'" in str(err.value)
    assert "'manifest.json' is missing" in str(err.value)


def test_hint_only_narrows_the_search(key):
    other = generate_private_key()
    sig = json.loads(sign_files(FILES, key, model_name="m"))
    sig["verificationMaterial"]["publicKey"]["hint"] = key_id(other)
    lying = json.dumps(sig).encode()
    with pytest.raises(SignatureError, match=r"names key .* but is signed by"):
        verify_files(FILES, lying, [other.public_key(), key.public_key()])
    with pytest.raises(SignatureError, match="does not verify"):
        verify_files(FILES, lying, [other.public_key()])


def test_sign_files_refuses_what_model_signing_would_skip(key):
    for name in (SIGNATURE_FILE, ".git/config", ".gitignore", "../x", "/abs", "a//b"):
        with pytest.raises(ValueError, match=re.escape(repr(name))):
            sign_files({name: b""}, key, model_name="m")


# --- keys ------------------------------------------------------------------------------------


def _pems(key: Any) -> tuple[bytes, bytes]:
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )  # fmt: skip
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (ed25519.Ed25519PrivateKey.generate, "Ed25519"),
        (lambda: rsa.generate_private_key(65537, 2048), "RSA"),
        (lambda: ec.generate_private_key(ec.SECP256K1()), "secp256k1"),
    ],
)
def test_non_ecdsa_keys_are_refused(make, kind):
    private, public = _pems(make())
    with pytest.raises(KeyFormatError, match=f"keys/x.pem: .*{kind}"):
        load_private_key(private, source="keys/x.pem")
    with pytest.raises(KeyFormatError, match=f"keys/x.pub: .*{kind}"):
        load_public_key(public, source="keys/x.pub")


def test_key_kind_mixups_are_explained(key):
    with pytest.raises(KeyFormatError, match=r"signing\.key: this is a private key; pass the .pub"):
        load_public_key(private_key_pem(key), source="signing.key")
    with pytest.raises(KeyFormatError, match="this is a public key"):
        load_private_key(public_key_pem(key))
    with pytest.raises(KeyFormatError, match=r"junk\.pem: not a readable PEM"):
        load_public_key(b"not a key", source="junk.pem")
    encrypted = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )  # fmt: skip
    with pytest.raises(KeyFormatError, match="encrypted"):
        load_private_key(encrypted)


def test_pem_round_trip(key):
    loaded = load_private_key(private_key_pem(key))
    assert key_id(loaded) == key_id(load_public_key(public_key_pem(key))) == key_id(key)
    assert len(key_id(key)) == 64


# --- DSSE ------------------------------------------------------------------------------------


def test_dsse_round_trip_picks_the_verifying_key(key):
    others = [generate_private_key().public_key() for _ in range(2)]
    envelope = dsse_sign("application/vnd.edgepack.command+json", b'{"cmd": "reboot"}', key)
    envelope["signatures"][0]["keyid"] = key_id(others[0])  # unsigned; must not matter

    payload, signer = dsse_verify(
        envelope, [*others, key.public_key()], payload_type="application/vnd.edgepack.command+json"
    )
    assert payload == b'{"cmd": "reboot"}'
    assert key_id(signer) == key_id(key)


def test_dsse_tampering_is_refused(key):
    ptype = "application/vnd.edgepack.command+json"
    envelope = dsse_sign(ptype, b'{"cmd": "reboot"}', key)
    trusted = [key.public_key()]

    forged = dict(envelope, payload=base64.b64encode(b'{"cmd": "wipe"}').decode())
    with pytest.raises(SignatureError, match="does not verify"):
        dsse_verify(forged, trusted, payload_type=ptype)
    with pytest.raises(SignatureError, match="payload type"):
        dsse_verify(envelope, trusted, payload_type="application/other")
    with pytest.raises(SignatureError, match="not among the 1 trusted keys"):
        dsse_verify(envelope, [generate_private_key().public_key()], payload_type=ptype)
    with pytest.raises(SignatureError, match="base64"):
        dsse_verify(dict(envelope, payload="@@@"), trusted, payload_type=ptype)
