"""Strict TOML tables: the one checker behind every configuration file edgepack reads.

The agent's ``agent.toml`` (:mod:`edgepack.agent._config`) and the packager's device profiles
(:mod:`edgepack.packager._profiles`) are tables of typed fields, and both are loaded strictly: a
typo must not pass silently, ``true`` is not a number, a number out of its range is refused, and
the message names the file and the dotted field. Each loader describes a table as a *spec*, a
mapping from key to :data:`Check`, and calls :func:`check_table`, which rejects unknown keys (with
a did-you-mean suggestion), runs every check and returns the clean values. The loader turns them
into its frozen dataclasses and raises its own error type (``ConfigError``, ``ProfileError``),
which :func:`check_table` is told.

A check is a plain function: it returns the clean value (a float for a number, a tuple for a
list) or raises :class:`InvalidValueError` with the text that completes "``<field> must be
...``". The builders below cover what the files use; a loader writes its own for anything else.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "Check",
    "InvalidValueError",
    "boolean",
    "check_table",
    "field_name",
    "integer",
    "number",
    "string",
    "string_list",
]

Check = Callable[[Any], Any]
"""Returns the clean value of a field, or raises :class:`InvalidValueError`."""


class InvalidValueError(Exception):
    """A value failed its check; the text completes '<field> must be ...'."""


def field_name(table: str, key: str) -> str:
    """How messages name a field: ``'key'`` at the top level, ``[table].key`` inside a table."""
    return f"[{table}].{key}" if table else repr(key)


def check_table(
    data: Any,
    spec: Mapping[str, Check],
    *,
    source: str | Path,
    error: Callable[[str], Exception],
    table: str = "",
    required: Collection[str] = (),
) -> dict[str, Any]:
    """Validate one table of a TOML document against ``spec``.

    Args:
        data: the parsed table (anything: a non-table is reported).
        spec: every allowed key and its check, in the order they are checked.
        source: the file, for messages (``<source>: ...``).
        error: the caller's exception type (or factory), called with the message.
        table: the table's dotted name (``"mqtt"``, ``"tolerances.int8"``); ``""`` is the top.
        required: keys that must be present; the others may be left out.

    Returns:
        The clean value of every key present in ``data``, in ``spec`` order.

    Raises:
        The ``error`` type: ``data`` is not a table, has a key ``spec`` does not know (with the
        closest known one, if any, as a suggestion), lacks a required key, or a value fails its
        check (the message says what it must be and what it was).
    """
    if not isinstance(data, dict):
        raise error(f"{source}: [{table}] must be a table, got {data!r}")
    for key in data:
        if key not in spec:
            near = difflib.get_close_matches(key, list(spec), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else f"; known: {', '.join(spec)}"
            raise error(f"{source}: unknown key {field_name(table, key)}{hint}")
    out: dict[str, Any] = {}
    for key, check in spec.items():
        if key not in data:
            if key in required:
                raise error(f"{source}: missing required field {field_name(table, key)}")
            continue
        try:
            out[key] = check(data[key])
        except InvalidValueError as e:
            raise error(
                f"{source}: {field_name(table, key)} must be {e}, got {data[key]!r}"
            ) from None
    return out


def _bounds(lo: float | None, hi: float | None, above: float | None) -> str:
    if above is not None:
        return f" > {above}"
    if lo is None:
        return "" if hi is None else f" <= {hi}"
    if hi is None:
        return f" >= {lo}"
    return f" equal to {lo}" if lo == hi else f" in [{lo}, {hi}]"


def integer(
    lo: int | None = None, hi: int | None = None, *, above: int | None = None, what: str = ""
) -> Check:
    """An integer (never a bool) in ``[lo, hi]`` (or ``> above``); ``what`` replaces the
    default description ("an integer >= 0") in the message."""
    if not what:
        what = "a non-negative integer" if (lo, hi, above) == (0, None, None) else "an integer"
        what += "" if what.startswith("a non") else _bounds(lo, hi, above)

    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidValueError(what)
        if (
            (lo is not None and value < lo)
            or (hi is not None and value > hi)
            or (above is not None and value <= above)
        ):
            raise InvalidValueError(what)
        return value

    return check


def number(
    lo: float | None = None,
    hi: float | None = None,
    *,
    above: float | None = None,
    what: str = "",
) -> Check:
    """A finite number (int or float, never a bool) in ``[lo, hi]`` (or ``> above``), as a
    float; ``what`` replaces the default description in the message."""
    if not what:
        what = "a non-negative number" if (lo, hi, above) == (0, None, None) else "a number"
        what += "" if what.startswith("a non") else _bounds(lo, hi, above)

    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidValueError(what)
        if not math.isfinite(value):
            raise InvalidValueError(what)
        if (
            (lo is not None and value < lo)
            or (hi is not None and value > hi)
            or (above is not None and value <= above)
        ):
            raise InvalidValueError(what)
        return float(value)

    return check


def boolean(value: Any) -> bool:
    """``true`` or ``false`` (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise InvalidValueError("true or false")
    return value


def string(
    *, choices: Sequence[str] = (), pattern: str | None = None, empty_ok: bool = True
) -> Check:
    """A string: one of ``choices``, or matching ``pattern`` in full, or any (non-empty unless
    ``empty_ok``)."""
    if choices:
        what = "one of " + ", ".join(choices)
    elif pattern is not None:
        what = f"a string like {pattern}"
    else:
        what = "a string" if empty_ok else "a non-empty string"

    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise InvalidValueError(what)
        if choices and value not in choices:
            raise InvalidValueError(what)
        if pattern is not None and not re.fullmatch(pattern, value):
            raise InvalidValueError(what)
        if not empty_ok and not value:
            raise InvalidValueError(what)
        return value

    return check


def string_list(
    item: Check | None = None,
    *,
    scalar_ok: bool = False,
    empty_ok: bool = True,
    unique: bool = False,
) -> Check:
    """A list of strings, each passing ``item`` (any string by default), as a tuple.

    Args:
        item: the check of each entry.
        scalar_ok: a single string stands for a list of one.
        empty_ok: whether ``[]`` is allowed.
        unique: whether duplicates are refused.
    """
    each = item or string()
    what = "a list of strings" + (" (or one string)" if scalar_ok else "")

    def check(value: Any) -> tuple[str, ...]:
        if scalar_ok and isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or (not value and not empty_ok):
            raise InvalidValueError(what + ("" if empty_ok else ", not empty"))
        try:
            items = tuple(each(v) for v in value)
        except InvalidValueError as e:
            raise InvalidValueError(f"{what}, each {e}") from None
        if unique and len(set(items)) != len(items):
            raise InvalidValueError(f"{what} without duplicates")
        return items

    return check
