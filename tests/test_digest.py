"""edgepack._digest: SHA-256 through cryptography's OpenSSL gives hashlib's answers."""

from __future__ import annotations

import hashlib

import pytest

from edgepack._digest import sha256


@pytest.mark.parametrize("data", [b"", b"abc", bytes(range(256)) * 4099])
def test_sha256_equals_hashlib_fed_whole_or_in_pieces(data: bytes) -> None:
    assert sha256(data).hexdigest() == hashlib.sha256(data).hexdigest()
    running = sha256()
    for start in range(0, len(data), 1000):
        running.update(memoryview(data)[start : start + 1000])
    assert running.digest() == hashlib.sha256(data).digest()


def test_digest_does_not_end_the_running_hash_and_copies_are_independent() -> None:
    running = sha256(b"ab")
    assert running.hexdigest() == hashlib.sha256(b"ab").hexdigest()
    branch = running.copy()
    running.update(bytearray(b"c"))
    branch.update(b"x")
    assert running.hexdigest() == hashlib.sha256(b"abc").hexdigest()
    assert branch.hexdigest() == hashlib.sha256(b"abx").hexdigest()
