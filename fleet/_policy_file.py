"""The policy file: retirement and remediation rules, read strictly.

An operator writes the rules the collector evaluates (:mod:`edgepack.fleet._policies`) in a TOML
file of ``[[rule]]`` tables (``edgepack-fleet collector --policies FILE``; the format is in
docs/governance.md). :func:`load_policies` reads it: an unknown key (with the closest known one),
a wrong type, a missing or a second condition, or two rules of one name is a
:class:`~edgepack.fleet.exceptions.PolicyError` naming the file, the line, and what to write
instead. ``edgepack-fleet policy check FILE`` shows the rules as read.
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack._tables import InvalidValueError, boolean, integer, number, string
from edgepack.fleet._rollout import parse_duration
from edgepack.fleet.exceptions import PolicyError, RolloutError
from edgepack.formats.topics import NAME

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = ["CONDITIONS", "Rule", "load_policies", "parse_policies"]

CONDITIONS = ("quality_below", "mae_above", "drift_share")


@dataclass(frozen=True)
class Rule:
    """One policy rule, as read from the file (see docs/governance.md)."""

    name: str
    condition: str  # one of CONDITIONS
    threshold: float  # quality_below / mae_above / drift_share's value
    model: str | None = None  # None: every model
    metric: str = "accuracy"  # quality_below: accuracy or f1; mae_above: mae
    estimated: bool = True  # quality: a CBPE estimate counts where a window has no labels
    drift_windows: int = 1  # drift: the device's last N windows of the version all drifted
    min_devices: int = 1  # fires only when at least this many devices are affected
    lookback: float = 3600.0  # seconds of reports read
    action: str = "flag"  # or "rollback"
    approval: bool = False  # rollback: wait for an operator's approval

    def describe(self) -> str:
        """The condition in words: ``"accuracy < 0.85 on >= 1 device(s)"``."""
        if self.condition == "drift_share":
            return (
                f"drifting on > {self.threshold:.0%} of its devices for "
                f"{self.drift_windows} window(s)"
            )
        sign = "<" if self.condition == "quality_below" else ">"
        return f"{self.metric} {sign} {self.threshold:g} on >= {self.min_devices} device(s)"


# -- the file ------------------------------------------------------------------------------------

_HINTS = {
    "name": 'name = "accuracy-floor" (letters, digits, "_", ".", ":" or "-")',
    "model": 'model = "churn" (leave it out for every model)',
    "quality_below": "quality_below = 0.85 (accuracy or f1 below this)",
    "mae_above": "mae_above = 0.5 (a regression's mean absolute error above this)",
    "drift_share": "drift_share = 0.3 (more than this share of the version's devices drift)",
    "metric": 'metric = "accuracy" (or "f1")',
    "estimated": "estimated = true (count the CBPE estimate where a window has no labels)",
    "drift_windows": "drift_windows = 3 (each of a device's last 3 windows drifted)",
    "min_devices": "min_devices = 1",
    "lookback": 'lookback = "1h" (reports received in the last hour; 90s, 30m, 2d)',
    "action": 'action = "flag" (or "rollback")',
    "approval": "approval = true (a rollback waits for `edgepack-fleet policy approve`)",
}


def _duration(value: Any) -> float:
    if not isinstance(value, str):
        raise InvalidValueError('a duration such as "1h"')
    try:
        seconds = parse_duration(value)
    except RolloutError:
        raise InvalidValueError('a duration such as "1h"') from None
    if seconds <= 0:
        raise InvalidValueError("a duration above 0")
    return seconds


_CHECKS: dict[str, Callable[[Any], Any]] = {
    "name": string(pattern=NAME.pattern.strip("^$")),
    "model": string(pattern=NAME.pattern.strip("^$")),
    "quality_below": number(0.0, 1.0, what="a number in [0, 1]"),
    "mae_above": number(above=0.0),
    "drift_share": number(0.0, 1.0, what="a share in (0, 1) (0.3 is 30 %)"),
    "metric": string(choices=("accuracy", "f1")),
    "estimated": boolean,
    "drift_windows": integer(1, 100),
    "min_devices": integer(1),
    "lookback": _duration,
    "action": string(choices=("flag", "rollback")),
    "approval": boolean,
}


def _rule_lines(text: str) -> list[tuple[int, dict[str, int]]]:
    """Per ``[[rule]]`` table in the text: its header's line and each key's line (1-based)."""
    tables: list[tuple[int, dict[str, int]]] = []
    for number_, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if re.match(r"^\[\[\s*rule\s*\]\]", stripped):
            tables.append((number_, {}))
        elif stripped.startswith("["):
            tables.append((number_, {}))  # another table: its keys are not a rule's
        elif tables and (m := re.match(r"^([A-Za-z0-9_-]+)\s*=", stripped)):
            tables[-1][1].setdefault(m.group(1), number_)
    return [t for t in tables if re.match(r"^\s*\[\[\s*rule", text.splitlines()[t[0] - 1])]


def parse_policies(text: str, source: str = "<policies>") -> list[Rule]:
    """Read policy rules from TOML text.

    Args:
        text: the file's text.
        source: the file, for messages.

    Returns:
        The rules, in file order (an empty file: none).

    Raises:
        PolicyError: not TOML, or a rule that is not valid; the message names the line and
            says what to write instead.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(
            f"{source}: not valid TOML: {e}; each rule is a [[rule]] table of "
            'key = value lines, e.g. name = "accuracy-floor"'
        ) from None
    for key in data:
        if key != "rule":
            line = next(
                (
                    i
                    for i, t in enumerate(text.splitlines(), 1)
                    if re.match(rf"^\s*\[*\s*{re.escape(key)}\b", t)
                ),
                0,
            )
            raise PolicyError(
                f"{source} line {line}: unknown {key!r}; the file holds only "
                "[[rule]] tables (see docs/governance.md)"
            )
    raw = data.get("rule", [])
    if not isinstance(raw, list):
        raise PolicyError(f"{source}: 'rule' must be [[rule]] tables, one per rule")
    lines = _rule_lines(text)
    rules: list[Rule] = []
    for index, table in enumerate(raw):
        header, keys = lines[index] if index < len(lines) else (0, {})
        rules.append(_rule(table, f"{source} line {{}}: rule #{index + 1}", header, keys))
    seen: set[str] = set()
    for index, rule in enumerate(rules):
        if rule.name in seen:
            line = lines[index][1].get("name", lines[index][0]) if index < len(lines) else 0
            raise PolicyError(
                f"{source} line {line}: a second rule named {rule.name!r}; give "
                "each rule its own name"
            )
        seen.add(rule.name)
    return rules


def _rule(table: Any, where: str, header: int, keys: Mapping[str, int]) -> Rule:
    def fail(key: str | None, what: str) -> PolicyError:
        line = keys.get(key, header) if key else header
        hint = f"; write e.g. {_HINTS[key]}" if key in _HINTS else ""
        return PolicyError(where.format(line) + f": {what}{hint}")

    if not isinstance(table, dict):
        return _raise(fail(None, "must be a [[rule]] table"))
    clean: dict[str, Any] = {}
    for key, value in table.items():
        check = _CHECKS.get(key)
        if check is None:
            near = difflib.get_close_matches(key, list(_CHECKS), n=1)
            suggestion = f" (did you mean {near[0]!r}?)" if near else ""
            known = ", ".join(_CHECKS)
            raise PolicyError(
                where.format(keys.get(key, header))
                + f": unknown key {key!r}{suggestion}; a rule knows {known}"
            )
        try:
            clean[key] = check(value)
        except InvalidValueError as e:
            raise fail(key, f"{key} must be {e}, got {value!r}") from None
    if "name" not in clean:
        raise fail("name", "has no name")
    conditions = [c for c in CONDITIONS if c in clean]
    if len(conditions) != 1:
        what = "has no condition" if not conditions else f"has {' and '.join(conditions)}"
        raise PolicyError(
            where.format(keys.get(conditions[-1], header) if conditions else header)
            + f": {what}; a rule has exactly one of quality_below = 0.85, "
            "mae_above = 0.5 or drift_share = 0.3 (write two rules for two)"
        )
    condition = conditions[0]
    if condition == "drift_share" and not 0.0 < clean[condition] < 1.0:
        raise fail(
            "drift_share",
            "drift_share must be above 0 and below 1 (more than that share of a version's "
            f"devices drifting fires; 0 would fire on one drifting device), got "
            f"{clean[condition]!r}",
        )
    if "metric" in clean and condition != "quality_below":
        raise fail("metric", f"metric goes with quality_below (this rule has {condition})")
    if "drift_windows" in clean and condition != "drift_share":
        raise fail("drift_windows", f"drift_windows goes with drift_share, not {condition}")
    if "estimated" in clean and condition == "drift_share":
        raise fail("estimated", "estimated goes with quality_below or mae_above")
    if clean.get("approval") and clean.get("action", "flag") != "rollback":
        raise fail("approval", 'approval applies to action = "rollback" (a flag waits for no one)')
    metric = "mae" if condition == "mae_above" else clean.get("metric", "accuracy")
    return Rule(
        name=clean["name"],
        condition=condition,
        threshold=clean[condition],
        model=clean.get("model"),
        metric=metric,
        estimated=clean.get("estimated", True),
        drift_windows=clean.get("drift_windows", 1),
        min_devices=clean.get("min_devices", 1),
        lookback=clean.get("lookback", 3600.0),
        action=clean.get("action", "flag"),
        approval=clean.get("approval", False),
    )


def _raise(error: PolicyError) -> Rule:
    raise error


def load_policies(path: Path) -> list[Rule]:
    """:func:`parse_policies` of a file.

    Raises:
        PolicyError: the file cannot be read, or is not valid (line and fix in the message).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyError(f"cannot read the policy file {path}: {e}; check --policies") from e
    return parse_policies(text, str(path))
