"""Trust documents (key rotation and revocation), against the pure verifier: only the offline root
keys can change trust, versions only grow, retired keys are gone, and every malformed document is
refused with a reason while the trust in force stays as it was."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from edgepack.formats.dsse import dsse_sign
from edgepack.formats.keys import generate_private_key, key_id
from edgepack.formats.trust import (
    MAX_TRUST_BYTES,
    TRUST_PAYLOAD_TYPE,
    Trust,
    TrustError,
    make_trust,
    open_trust,
)

ROOT = generate_private_key()
ROOT2 = generate_private_key()
BUILD_OLD, BUILD_NEW = generate_private_key(), generate_private_key()
OPS_OLD, OPS_NEW = generate_private_key(), generate_private_key()


def pub(*keys: ec.EllipticCurvePrivateKey) -> tuple[ec.EllipticCurvePublicKey, ...]:
    return tuple(k.public_key() for k in keys)


INITIAL = Trust(
    version=0,
    root_keys=pub(ROOT),
    threshold=1,
    bundle_keys=pub(BUILD_OLD),
    command_keys=pub(OPS_OLD),
)


def rotate(version: int = 1, signers: tuple[ec.EllipticCurvePrivateKey, ...] = (ROOT,)) -> bytes:
    return make_trust(
        version=version,
        root_keys=pub(ROOT),
        bundle_keys=pub(BUILD_NEW),
        command_keys=pub(OPS_OLD, OPS_NEW),
        signers=signers,
    )


def test_a_root_signed_rotation_replaces_the_key_sets() -> None:
    trust = open_trust(rotate(), INITIAL)
    assert trust.version == 1
    assert [key_id(k) for k in trust.bundle_keys] == [key_id(BUILD_NEW)]  # BUILD_OLD retired
    assert {key_id(k) for k in trust.command_keys} == {key_id(OPS_OLD), key_id(OPS_NEW)}
    assert trust.summary()["root_keys"] == [key_id(ROOT)]


@pytest.mark.parametrize(
    ("signer", "why"),
    [
        (OPS_OLD, "signed by 0 of the device's root keys"),  # a stolen command key
        (BUILD_OLD, "signed by 0 of the device's root keys"),  # a stolen bundle key
        (generate_private_key(), "signed by 0 of the device's root keys"),
    ],
)
def test_only_a_root_key_can_change_trust(signer: ec.EllipticCurvePrivateKey, why: str) -> None:
    with pytest.raises(TrustError, match=why):
        open_trust(rotate(signers=(signer,)), INITIAL)


def test_versions_only_grow() -> None:
    applied = open_trust(rotate(version=5), INITIAL)
    for stale in (5, 4, 1):
        with pytest.raises(TrustError, match="not newer than the version 5"):
            open_trust(rotate(version=stale), applied)
    assert open_trust(rotate(version=6), applied).version == 6


def test_a_threshold_of_roots_is_enforced_for_the_next_rotation() -> None:
    two_roots = make_trust(
        version=1, root_keys=pub(ROOT, ROOT2), threshold=2,
        bundle_keys=pub(BUILD_NEW), command_keys=pub(OPS_NEW), signers=(ROOT,),
    )  # fmt: skip
    trust = open_trust(two_roots, INITIAL)
    assert trust.threshold == 2
    with pytest.raises(TrustError, match="signed by 1 of the device's root keys; it needs 2"):
        open_trust(rotate(version=2, signers=(ROOT,)), trust)
    with pytest.raises(TrustError, match="signed by 1 of the device's root keys; it needs 2"):
        open_trust(rotate(version=2, signers=(ROOT, ROOT)), trust)  # the same root twice
    assert open_trust(rotate(version=2, signers=(ROOT, ROOT2)), trust).version == 2


def _envelope(body: object, key: ec.EllipticCurvePrivateKey = ROOT) -> bytes:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    return json.dumps(dsse_sign(TRUST_PAYLOAD_TYPE, payload, key)).encode()


GOOD_BODY = json.loads(base64.b64decode(json.loads(rotate())["payload"]))


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"x" * (MAX_TRUST_BYTES + 1), "above"),
        (b"not json", "not JSON"),
        (b"[" * 100_000, "not JSON"),
        (b"{}", "not a trust document"),
        (json.dumps({"payloadType": TRUST_PAYLOAD_TYPE, "payload": 7}).encode(), "payload is"),
        (json.dumps({"payloadType": TRUST_PAYLOAD_TYPE, "payload": "!!"}).encode(), "base64"),
        (json.dumps({"payloadType": TRUST_PAYLOAD_TYPE, "payload": "", "signatures": 3}).encode(),
         "needs 1 to"),
        (_envelope(b"\xff\xfe"), "not JSON"),
        (_envelope([1, 2]), "not of type"),
        (_envelope({**GOOD_BODY, "schema": 2}), "newer than this agent understands"),
        (_envelope({**GOOD_BODY, "schema": "1"}), "schema '1'"),
        (_envelope({**GOOD_BODY, "version": "2"}), "version must be a positive integer"),
        (_envelope({**GOOD_BODY, "version": True}), "version must be a positive integer"),
        (_envelope({**GOOD_BODY, "version": 10**400}), "version must be a positive integer"),
        (_envelope({**GOOD_BODY, "bundle_keys": []}), "bundle_keys must list"),
        (_envelope({**GOOD_BODY, "command_keys": [7]}), "command_keys\\[0\\] is not a PEM"),
        (_envelope({**GOOD_BODY, "command_keys": ["junk"]}), "not a readable PEM"),
        (_envelope({**GOOD_BODY, "threshold": 3}), "threshold must be between 1 and 1"),
        (_envelope({**GOOD_BODY, "root_keys": "x"}), "root_keys must list"),
    ],
)
def test_malformed_documents_are_refused_with_a_reason(raw: bytes, why: str) -> None:
    with pytest.raises(TrustError, match=why):
        open_trust(raw, INITIAL)


def test_make_trust_refuses_what_could_never_verify() -> None:
    with pytest.raises(ValueError, match="starts at 1"):
        make_trust(version=0, root_keys=pub(ROOT), bundle_keys=pub(BUILD_NEW),
                   command_keys=pub(OPS_NEW), signers=(ROOT,))  # fmt: skip
    with pytest.raises(ValueError, match="threshold"):
        make_trust(version=1, root_keys=pub(ROOT), bundle_keys=pub(BUILD_NEW),
                   command_keys=pub(OPS_NEW), signers=(ROOT,), threshold=2)  # fmt: skip
    with pytest.raises(ValueError, match="at least one root, bundle and command key"):
        make_trust(version=1, root_keys=pub(ROOT), bundle_keys=(),
                   command_keys=pub(OPS_NEW), signers=(ROOT,))  # fmt: skip
