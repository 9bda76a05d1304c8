"""Payloads, bounded: the JSON decoding and typed field reading every edgepack parser shares.

Private to :mod:`edgepack.formats`: :mod:`~edgepack.formats.messages` (which re-exports
:func:`decode_json` and the bounds) and :mod:`~edgepack.formats.commands` build and read their
payloads with these, so every MQTT payload is bounded the same way. :func:`decode_json` reads at
most :data:`MAX_MESSAGE_BYTES`, nested at most :data:`MAX_DEPTH` deep, with no integer longer than
:data:`MAX_INT_DIGITS` digits, and a ``schema`` no newer than :data:`SCHEMA`: a hostile payload
costs a bounded parse and ends in a :class:`~edgepack.formats.exceptions.MessageError`, never a
``RecursionError`` or ``ValueError``. :class:`Fields` reads one field at a time and names the field
that is wrong.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import re
from collections.abc import Mapping
from typing import Any, TypeVar

from edgepack._clock import utc_now, utc_text
from edgepack.formats.exceptions import ManifestError, MessageError
from edgepack.formats.manifest import check_model_name

__all__ = [
    "MAX_DEPTH",
    "MAX_INT_DIGITS",
    "MAX_MESSAGE_BYTES",
    "SCHEMA",
    "NAME",
    "Fields",
    "TextEnum",
    "check_schema",
    "decode_json",
    "encode",
    "stamp",
]

SCHEMA = 1
MAX_MESSAGE_BYTES = 256 * 1024
MAX_DEPTH = 16  # the deepest payload edgepack writes (a drift report) is 4 levels
MAX_INT_DIGITS = 32  # a 64-bit integer has at most 20
INT64 = 2**63 - 1  # the largest integer a field may hold (Fields.integer)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")  # device ids, group names, job ids
E = TypeVar("E", bound=enum.Enum)


class TextEnum(str, enum.Enum):
    """A str enum that prints as its value; JSON writes the value either way."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


# -- bounded JSON ---------------------------------------------------------------------------------


class _TooLongError(Exception):
    """An integer literal longer than MAX_INT_DIGITS (raised from inside json.loads)."""


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _TooLongError(text)
    return int(text)


def _depth(value: Any) -> int:
    """How deeply ``value`` nests (a scalar is 0, ``{}`` is 1), iteratively."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        deepest = max(deepest, level)
        stack.extend((c, level + 1) for c in children if isinstance(c, (dict, list)))
    return deepest if isinstance(value, (dict, list)) else 0


def decode_json(
    raw: bytes, what: str, *, schema: bool = True, error: type[MessageError] = MessageError
) -> dict[str, Any]:
    """Parse a JSON object payload, bounded (see the module docstring).

    Args:
        raw: the payload.
        what: names the payload in error messages ("job status", "command").
        schema: require a ``schema`` we understand.
        error: the error class to raise (commands raise :class:`CommandError`).

    Raises:
        MessageError: too large, not UTF-8 JSON, not an object, nested too deeply, an absurdly
            long integer, or a missing or newer ``schema``.
    """
    if len(raw) > MAX_MESSAGE_BYTES:
        raise error(f"{what} is {len(raw)} bytes, above the limit of {MAX_MESSAGE_BYTES}")
    try:
        data = json.loads(raw, parse_int=_bounded_int)
    except _TooLongError as e:
        digits = len(str(e).lstrip("-"))
        raise error(
            f"{what} holds an integer of {digits} digits (at most {MAX_INT_DIGITS})"
        ) from None
    except RecursionError as e:
        raise error(f"{what} is nested more than {MAX_DEPTH} levels deep") from e
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise error(f"{what} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise error(f"{what} must be a JSON object, not {type(data).__name__}")
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _depth(data) > MAX_DEPTH:
        raise error(f"{what} is nested more than {MAX_DEPTH} levels deep")
    if schema:
        check_schema(data, what, error)
    return data


def check_schema(data: Mapping[str, Any], what: str, error: type[MessageError]) -> None:
    version = data.get("schema")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise error(f"{what} has no valid 'schema' version (this side writes {SCHEMA})")
    if version > SCHEMA:
        raise error(
            f"{what} uses schema {version}, newer than this edgepack understands ({SCHEMA}): "
            "upgrade edgepack on this side"
        )


def encode(payload: Mapping[str, Any]) -> bytes:
    """Compact JSON with sorted keys and the schema version."""
    return json.dumps({**payload, "schema": SCHEMA}, separators=(",", ":"), sort_keys=True).encode()


# -- typed fields -------------------------------------------------------------------------------


class Fields:
    """Typed access to a decoded payload's fields; each miss raises ``error`` naming the field.

    Shared by the parsers here and in :mod:`edgepack.formats.commands`.
    """

    def __init__(
        self, data: Mapping[str, Any], what: str, error: type[MessageError] = MessageError
    ) -> None:
        self.data, self.what, self.error = data, what, error

    def fail(self, key: str, wanted: str) -> MessageError:
        value = repr(self.data.get(key))
        shown = value if len(value) <= 60 else value[:57] + "..."
        return self.error(f"{self.what}: field {key!r} must be {wanted}, not {shown}")

    def _present(self, key: str) -> bool:
        return self.data.get(key) is not None

    def text(self, key: str, pattern: re.Pattern[str] | None = None) -> str:
        value = self.data.get(key)
        if not isinstance(value, str) or (pattern is not None and not pattern.match(value)):
            raise self.fail(key, "a string" if pattern is None else "a valid name")
        return value

    def maybe_text(self, key: str, pattern: re.Pattern[str] | None = None) -> str | None:
        return self.text(key, pattern) if self._present(key) else None

    def integer(self, key: str, minimum: int = 0) -> int:
        """An integer from ``minimum`` up to a signed 64-bit one's limit (what the fleet's
        stores hold: SQLite and PostgreSQL refuse more, and a row that cannot be written
        must be refused here, not fail the transaction it shares with other messages)."""
        value = self.data.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(key, f"an integer >= {minimum}")
        if value > INT64:
            raise self.fail(key, "an integer of at most 64 bits (2**63 - 1)")
        return value

    def maybe_integer(self, key: str, minimum: int = 0) -> int | None:
        return self.integer(key, minimum) if self._present(key) else None

    def flag(self, key: str, default: bool | None = None) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, "true or false")
        return value

    def time(self, key: str) -> dt.datetime:
        value = self.data.get(key)
        if not isinstance(value, str):
            raise self.fail(key, "an ISO 8601 time")
        try:
            moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as e:
            raise self.fail(key, "an ISO 8601 time") from e
        return moment.replace(tzinfo=dt.timezone.utc) if moment.tzinfo is None else moment

    def maybe_time(self, key: str) -> dt.datetime | None:
        return self.time(key) if self._present(key) else None

    def names(self, key: str) -> tuple[str, ...]:
        value = self.data.get(key)
        if value is None:
            return ()
        names_ok = isinstance(value, list) and all(
            isinstance(v, str) and NAME.match(v) for v in value
        )
        if not names_ok:
            raise self.fail(key, "a list of names")
        return tuple(value)

    def model(self, key: str) -> str:
        try:
            return check_model_name(self.text(key))
        except ManifestError as e:
            raise self.error(f"{self.what}: field {key!r}: {e}") from e

    def choice(self, key: str, kind: type[E]) -> E:
        try:
            return kind(self.data.get(key))
        except ValueError as e:
            allowed = ", ".join(str(member.value) for member in kind)
            raise self.fail(key, f"one of {allowed}") from e

    def maybe_choice(self, key: str, kind: type[E]) -> E | None:
        return self.choice(key, kind) if self._present(key) else None

    def device(self, expected: str | None) -> str:
        """The ``device`` field; absent, ``expected`` (the topic's device) stands in for it."""
        if expected is not None and self.data.get("device") is None:
            return expected
        device = self.text("device", NAME)
        if expected is not None and device != expected:
            raise self.error(f"{self.what} from {device!r} on the topic of {expected!r}")
        return device


def stamp(ts: dt.datetime | None) -> str:
    """``ts`` (default: now) as a payload's ``ts`` text."""
    return utc_text(ts if ts is not None else utc_now())
