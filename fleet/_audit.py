"""The audit trail: an append-only, hash-chained log of what was built, commanded and done.

Every fact that governs what runs where goes into one table of the fleet store (``audit_log``,
:mod:`edgepack.fleet._schema`), one entry per fact, in one chain:

==================  =====================================  ==================================
kind                recorded by                            fact (appended once)
==================  =====================================  ==================================
``build``           ``deploy``/``rollout``/``experiment``  ``build:MODEL:VERSION:DIGEST`` (the
                    (the bundles they ship), ``audit        bundles' sha256s)
                    record-build DIR``
``command``         the CLI that publishes it, and the     ``command:JOB_ID``: the signed
                    collector that hears it                envelope itself
``outcome``         the collector (terminal job statuses)  ``outcome:JOB:DEVICE:SEQ``
``rollout``         the store, with each rollout decision  ``rollout:ROLLOUT_ID:SEQ``
``trust``           the collector (key rotations)          ``trust:VERSION``
==================  =====================================  ==================================

The fleet's own facts are built by :mod:`edgepack.fleet._audit_facts`; other parts (policies,
the console) append their own kinds through :func:`append`.

**The chain.** Entry ``seq`` stores ``hash = sha256(canonical [seq, at, kind, model, version,
device, key_id, fact, payload, prev_hash])`` where ``prev_hash`` is entry ``seq - 1``'s hash
(:data:`GENESIS` for the first). The store appends under a lock (SQLite: the write transaction;
PostgreSQL: an advisory lock held to the commit), so two collectors and a CLI writing at once
make one chain, and a fact already recorded is returned, not appended again.

:func:`verify` walks the chain and names the first entry that was altered (its hash no longer
covers its content, or the next entry chains to another hash), removed (a gap in ``seq``) or
reordered (its content hashes right at another ``seq``), and re-verifies every recorded
command's signature against the trusted operator keys. It does no I/O beyond reading the store.
What this proves and what it does not: docs/governance.md.
"""

from __future__ import annotations

import binascii
import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric import ec

from edgepack.fleet import _schema as sql
from edgepack.fleet._schema import AuditEntry
from edgepack.formats.commands import read_command
from edgepack.formats.exceptions import EdgepackError
from edgepack.formats.keys import key_id, load_public_key

if TYPE_CHECKING:
    from edgepack.fleet._database import FleetStore

__all__ = [
    "GENESIS",
    "AuditDraft",
    "AuditEntry",
    "AuditProblem",
    "AuditVerdict",
    "append",
    "entries",
    "verify",
]

GENESIS = "0" * 64  # the prev_hash of the first entry
_FORMAT = "edgepack-audit/1"
_KIND = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
MAX_PAYLOAD_BYTES = 1 << 20
_PAGE = 1000
_DIAGNOSED = 16  # failing entries whose original seq verify() looks for
_LISTED = 100  # problems a verdict lists (it counts them all)


@dataclass(frozen=True)
class AuditDraft:
    """An entry before the store gives it its place (``seq``) and its link (``prev_hash``)."""

    at: datetime
    kind: str
    model: str | None
    version: int | None
    device: str | None
    key_id: str | None
    fact: str | None
    payload_text: str  # canonical JSON


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def entry_hash(
    seq: int, at: datetime, kind: str, model: str | None, version: int | None,
    device: str | None, key: str | None, fact: str | None, payload_text: str, prev_hash: str,
) -> str:  # fmt: skip
    """The hash an entry stores: its canonical content and the previous entry's hash."""
    content = [_FORMAT, seq, sql.ts(at), kind, model, version, device, key, fact, payload_text,
               prev_hash]  # fmt: skip
    return hashlib.sha256(_canonical(content).encode()).hexdigest()


def _hash_of(e: AuditEntry, seq: int | None = None) -> str:
    return entry_hash(seq if seq is not None else e.seq, e.at, e.kind, e.model, e.version,
                      e.device, e.key_id, e.fact, e.payload_text, e.prev_hash)  # fmt: skip


def seal(draft: AuditDraft, seq: int, prev_hash: str) -> AuditEntry:
    """The entry ``draft`` becomes at ``seq`` after ``prev_hash`` (the store calls this)."""
    d = draft
    digest = entry_hash(seq, d.at, d.kind, d.model, d.version, d.device, d.key_id, d.fact,
                        d.payload_text, prev_hash)  # fmt: skip
    return AuditEntry(seq, sql.utc(d.at), d.kind, d.model, d.version, d.device, d.key_id, d.fact,
                      json.loads(d.payload_text), prev_hash, digest, d.payload_text)  # fmt: skip


def draft(
    kind: str, payload: Mapping[str, Any], *, at: datetime, model: str | None = None,
    version: int | None = None, device: str | None = None, key_id: str | None = None,
    fact: str | None = None,
) -> AuditDraft:  # fmt: skip
    """Check an entry's fields and make its draft.

    Raises:
        ValueError: a bad kind, a payload that is not a JSON object (or holds NaN, or is above
            1 MiB), a naive time, or a non-integer version.
    """
    if not isinstance(kind, str) or not _KIND.match(kind):
        raise ValueError(f"audit kind {kind!r} must be 1-64 of a-z, 0-9, '_', '.', '-'")
    if not isinstance(payload, Mapping):
        raise ValueError(f"an audit payload must be a JSON object, not {type(payload).__name__}")
    if not isinstance(at, datetime) or at.tzinfo is None:
        raise ValueError("an audit entry's time must be an aware datetime (UTC)")
    if version is not None and (type(version) is not int):
        raise ValueError(f"an audit entry's version must be an integer, not {version!r}")
    try:
        text = _canonical(dict(payload))
    except (TypeError, ValueError) as e:
        raise ValueError(f"audit payload of a {kind} entry is not plain JSON: {e}") from e
    if len(text) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"audit payload of a {kind} entry is {len(text)} bytes, above 1 MiB")
    return AuditDraft(sql.utc(at), kind, model, version, device, key_id, fact, text)


def append(
    store: FleetStore, kind: str, payload: Mapping[str, Any], *, at: datetime,
    model: str | None = None, version: int | None = None, device: str | None = None,
    key_id: str | None = None, fact: str | None = None,
) -> AuditEntry:  # fmt: skip
    """Append one entry to the audit trail (inside ``store.batch``, in the batch's transaction).

    Args:
        store: the fleet store.
        kind: what happened (``build``, ``command``, ``outcome``, ``rollout``, ``trust``, or
            another part's own kind, e.g. ``policy``).
        payload: the fact's details (a JSON object, at most 1 MiB).
        at: when it happened (aware).
        model, version, device, key_id: what it concerns and who signed it (filterable).
        fact: what makes it unique; an entry with the same fact is returned, not appended twice.

    Returns:
        The entry, with its ``seq`` and ``hash``.

    Raises:
        ValueError: a malformed field (see :func:`draft`).
        StoreError: the store failed.
    """
    made = draft(kind, payload, at=at, model=model, version=version, device=device,
                 key_id=key_id, fact=fact)  # fmt: skip
    return store.append_audit(made)[0]


def entries(
    store: FleetStore, *, model: str | None = None, device: str | None = None,
    key_id: str | None = None, kind: str | None = None, since: datetime | None = None,
    until: datetime | None = None, limit: int | None = None,
) -> list[AuditEntry]:  # fmt: skip
    """The entries matching every filter given, oldest first (the newest ``limit`` of them).

    ``since``/``until`` bound the entries' ``at`` (inclusive); ``key_id`` may be the first 8 or
    more hex digits of a key id, as tables show them. Raises StoreError.
    """
    where: list[tuple[str, Any]] = []
    for column, value in (("model", model), ("device", device), ("kind", kind)):
        if value is not None:
            where.append((f"{column} = ?", value))
    if key_id is not None:  # a key id, or the first 8 or more of its hex digits (as shown)
        if re.fullmatch(r"[0-9a-f]{8,63}", key_id):
            where.append(("key_id LIKE ?", key_id + "%"))
        else:
            where.append(("key_id = ?", key_id))
    if since is not None:
        where.append(("at >= ?", sql.ts(since)))
    if until is not None:
        where.append(("at <= ?", sql.ts(until)))
    if limit is not None:
        return list(reversed(store.audit_rows(where, limit=limit, newest=True)))
    found: list[AuditEntry] = []
    for page in _pages(store, where):
        found.extend(page)
    return found


def _pages(store: FleetStore, where: Sequence[tuple[str, Any]] = ()) -> Iterator[list[AuditEntry]]:
    after = 0
    while True:
        page = store.audit_rows(where, after=after, limit=_PAGE)
        if not page:
            return
        yield page
        after = page[-1].seq


# -- verifying -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditProblem:
    """What is wrong at one place in the chain."""

    seq: int
    what: str  # "altered", "removed", "reordered" or "signature"
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "what": self.what, "detail": self.detail}


@dataclass(frozen=True)
class AuditVerdict:
    """What :func:`verify` found: ``ok`` when every hash, link and signature holds."""

    ok: bool
    checked: int  # entries read
    signatures: int  # command envelopes whose signature was verified
    head_seq: int  # the last entry's seq (0: empty)
    head_hash: str  # its hash: keep it elsewhere to detect a rewrite of the whole chain
    keys: list[str] = field(default_factory=list)  # the key ids signatures were checked with
    problems: list[AuditProblem] = field(default_factory=list)  # in seq order; [0] is first
    problem_count: int = 0  # all found (``problems`` lists the first 100)

    @property
    def problem(self) -> AuditProblem | None:
        return self.problems[0] if self.problems else None

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "checked": self.checked, "signatures_checked": self.signatures,
            "head": {"seq": self.head_seq, "hash": self.head_hash}, "keys": self.keys,
            "problem": None if self.problem is None else self.problem.to_json(),
            "problems": [p.to_json() for p in self.problems],
            "problem_count": self.problem_count,
        }  # fmt: skip


def _trust_command_keys(
    rows: Sequence[AuditEntry], roots: Sequence[ec.EllipticCurvePublicKey]
) -> list[ec.EllipticCurvePublicKey]:
    """The command keys named by the recorded trust documents that one of the ``roots`` (the
    offline root keys, given by the operator) signed (a key retired later still signed the
    commands it issued while in force). A document no root signed names no key: anyone who can
    write to the store could have appended it."""
    from edgepack.formats.dsse import dsse_verify
    from edgepack.formats.trust import TRUST_PAYLOAD_TYPE

    keys: dict[str, ec.EllipticCurvePublicKey] = {}
    for e in rows:
        if e.kind != "trust":
            continue
        try:
            envelope = json.loads(str(e.payload.get("document", "")))
            payload, _root = dsse_verify(envelope, roots, payload_type=TRUST_PAYLOAD_TYPE)
            body = json.loads(payload)
            for pem in body["command_keys"]:
                key = load_public_key(pem.encode(), source="trust document")
                keys[key_id(key)] = key
        except (ValueError, KeyError, TypeError, binascii.Error, EdgepackError):
            continue  # the entry's hash still covers it; a bad document names no key
    return list(keys.values())


def verify(
    store: FleetStore,
    trusted_keys: Sequence[ec.EllipticCurvePublicKey] | None = None,
    *,
    head: tuple[int, str] | None = None,
    roots: Sequence[ec.EllipticCurvePublicKey] = (),
) -> AuditVerdict:
    """Check every entry's hash and link, and every recorded command's signature.

    Args:
        store: the fleet store.
        trusted_keys: the operator keys commands must verify against; None: the command keys
            named by the recorded trust documents that one of ``roots`` signed (none: the
            signatures are not checked; a key named by the store alone proves nothing).
        roots: offline root keys, for the trust documents.
        head: ``(seq, hash)`` of a head kept elsewhere (an earlier verdict's): the chain must
            still hold that entry with that hash, which shows entries cut from the end and a
            chain rewritten whole.

    Returns:
        The verdict: every problem found, in ``seq`` order, the first one first.

    Raises:
        StoreError: the store cannot be read.
    """
    # Pass 1: every entry's seq and hash (small), read in pages; pass 2 reads the entries again
    # one page at a time, up to the last seq pass 1 saw (appends meanwhile wait for next time).
    index = [(e.seq, e.hash) for page in _pages(store) for e in page]
    if trusted_keys is not None:
        keys = list(trusted_keys)
    else:
        keys = _trust_command_keys(entries(store, kind="trust"), roots) if roots else []
    last = index[-1][0] if index else 0
    bounded = [("seq <= ?", last)]
    rows = (e for page in _pages(store, bounded) for e in page)
    problems, signatures = _chain_problems(rows, index, keys)
    if head is not None:
        problems.extend(_anchor_problems(index, *head))
    problems.sort(key=lambda p: p.seq)
    return AuditVerdict(
        not problems, len(index), signatures, last, index[-1][1] if index else GENESIS,
        sorted(key_id(k) for k in keys), problems[:_LISTED], len(problems),
    )  # fmt: skip


def _signature_problem(
    e: AuditEntry, keys: Sequence[ec.EllipticCurvePublicKey]
) -> AuditProblem | None:
    raw = e.payload.get("envelope")
    if not isinstance(raw, str):
        return AuditProblem(e.seq, "signature", "the command entry holds no envelope")
    try:
        command = read_command(raw.encode(), keys)
    except EdgepackError as e_:
        return AuditProblem(e.seq, "signature", f"command {e.fact}: {e_}")
    if command.job_id != e.payload.get("job_id") or (e.key_id and command.key_id != e.key_id):
        return AuditProblem(
            e.seq, "signature", f"the envelope is job {command.job_id} signed by "
            f"{command.key_id}, not what the entry says ({e.payload.get('job_id')}, {e.key_id})",
        )  # fmt: skip
    return None


def _chain_problems(
    rows: Iterable[AuditEntry], index: Sequence[tuple[int, str]],
    keys: Sequence[ec.EllipticCurvePublicKey],
) -> tuple[list[AuditProblem], int]:  # fmt: skip
    """Every problem of the chain ``rows`` (by seq; ``index``: each one's seq and hash), and
    of its commands' signatures; and how many signatures were checked."""
    problems: list[AuditProblem] = []
    by_hash = {digest: seq for seq, digest in index}
    seqs = [seq for seq, _digest in index]
    expected, prev, diagnosed, signatures = 1, GENESIS, 0, 0
    before: AuditEntry | None = None
    for e in rows:
        if e.kind == "command" and keys:
            signatures += 1
            problem = _signature_problem(e, keys)
            if problem is not None:
                problems.append(problem)
        if e.seq != expected:
            gone = f"{expected}" if e.seq == expected + 1 else f"{expected}-{e.seq - 1}"
            problems.append(AuditProblem(expected, "removed", f"entry {gone} is missing"))
        if _hash_of(e) != e.hash:
            # Where was it written? One pass over the chain each: only for the first few, so a
            # chain renumbered whole costs O(n), not O(n^2).
            diagnosed += 1
            written = _written_as(e, seqs) if diagnosed <= _DIAGNOSED else None
            if written is None:
                what, detail = "altered", f"entry {e.seq}'s content no longer matches its hash"
            elif written > e.seq and e.prev_hash not in by_hash:
                gone = f"{e.seq}" if written == e.seq + 1 else f"{e.seq}-{written - 1}"
                what, detail = (
                    "removed",
                    (
                        f"entry {gone} was removed and the later ones renumbered (the entry at "
                        f"{e.seq} was written as {written})"
                    ),
                )
            else:
                what, detail = "reordered", f"the entry at {e.seq} was written as {written}"
            problems.append(AuditProblem(e.seq, what, detail))
        elif e.prev_hash != prev and before is not None and before.seq == e.seq - 1:
            if e.prev_hash in by_hash:
                what, detail = (
                    "reordered",
                    (
                        f"entry {e.seq} follows the entry now at "
                        f"{by_hash[e.prev_hash]}, not {before.seq}"
                    ),
                )
            elif _hash_of(before) == before.hash:
                what, detail = (
                    "altered",
                    (
                        f"entry {before.seq} was rewritten with a new hash; "
                        f"entry {e.seq} chains to its original"
                    ),
                )
            else:
                what, detail = "", ""  # already named as altered
            if what and not any(p.seq == before.seq for p in problems):
                problems.append(AuditProblem(before.seq, what, detail))
        elif e.seq == 1 and e.prev_hash != GENESIS:
            problems.append(
                AuditProblem(
                    e.seq,
                    "altered",
                    "the first entry does not start the "
                    "chain (its prev_hash is not the genesis hash)",
                )
            )
        expected, prev, before = e.seq + 1, e.hash, e
    return problems, signatures


def _anchor_problems(index: Sequence[tuple[int, str]], seq: int, digest: str) -> list[AuditProblem]:
    held = dict(index).get(seq)
    if held is None:
        return [
            AuditProblem(
                seq,
                "removed",
                f"the kept head {seq} is no longer in the chain "
                f"(it ends at {index[-1][0] if index else 0}): entries were cut",
            )
        ]
    if held != digest:
        return [
            AuditProblem(
                seq,
                "altered",
                f"entry {seq}'s hash is {held}, not the kept "
                f"head's {digest}: the chain was rewritten up to there",
            )
        ]
    return []


def _written_as(e: AuditEntry, seqs: Sequence[int]) -> int | None:
    """The seq ``e``'s content hashes right at, when not its own (bounded: one pass)."""
    for seq in seqs:
        if seq != e.seq and _hash_of(e, seq) == e.hash:
            return seq
    last = seqs[-1] if seqs else 0
    for seq in range(last + 1, last + 65):  # entries removed and the rest renumbered
        if _hash_of(e, seq) == e.hash:
            return seq
    return None
