"""The Prometheus text exposition format (version 0.0.4): the one writer of ``/metrics`` text.

Whoever has numbers to expose describes them as :class:`Family` objects (a name, a type, a help
text and samples); :func:`render` writes them. The format's rules live here, so no caller has to
remember them:

* every family gets its ``# HELP`` and ``# TYPE`` line, and a family with no sample is left out
  entirely (never declared empty);
* label values are escaped (backslash, double quote, newline), and so is help text (backslash,
  newline);
* numbers are written as Prometheus reads them (``+Inf``, ``-Inf``, ``NaN``; integers without a
  decimal point);
* :func:`histogram` turns per-bucket counts into cumulative ``_bucket`` samples ending in
  ``le="+Inf"``, followed by ``_sum`` and a ``_count`` equal to the ``+Inf`` bucket.

A bad family (a name Prometheus would refuse, an unknown type, the same name twice) is a bug in
the caller and raises ``ValueError`` rather than serving text a scraper would reject.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Family", "Labels", "Sample", "gauge", "histogram", "render"]

Labels = Sequence[tuple[str, str]]
"""Label pairs in the order they are written, e.g. ``(("model", "iris"), ("version", "3"))``."""

Sample = tuple[str, Labels, float]
"""One sample line: its suffix after the family name (``""``, ``"_bucket"``...), labels, value."""

TYPES = frozenset({"counter", "gauge", "histogram"})
_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


@dataclass(frozen=True)
class Family:
    """One metric family: a name, its type, a one-line help text and its samples."""

    name: str
    type: str
    help: str
    samples: Sequence[Sample]


def gauge(name: str, help: str, samples: Iterable[tuple[Mapping[str, str], float]]) -> Family:
    """A gauge family from ``(labels, value)`` pairs (labels written in their mapping order)."""
    return Family(
        name, "gauge", help, [("", tuple(labels.items()), value) for labels, value in samples]
    )


def histogram(
    labels: Labels, bounds: Sequence[float], counts: Sequence[int], total: float
) -> list[Sample]:
    """One labelled series of a histogram family.

    Args:
        labels: the series' labels (``le`` is added per bucket).
        bounds: the buckets' upper bounds, ascending, without ``+Inf``.
        counts: how many observations fell in each bucket (not cumulative), one more than
            ``bounds``: the last is the ``+Inf`` bucket.
        total: the sum of the observations.

    Returns:
        The ``_bucket`` samples (cumulative, ending in ``le="+Inf"``), ``_sum`` and ``_count``.
    """
    if len(counts) != len(bounds) + 1:
        raise ValueError(f"{len(bounds)} bounds need {len(bounds) + 1} counts, not {len(counts)}")
    samples: list[Sample] = []
    running = 0
    for bound, count in zip((*bounds, math.inf), counts, strict=True):
        running += count
        samples.append(("_bucket", (*labels, ("le", _number(bound))), running))
    samples.append(("_sum", labels, total))
    samples.append(("_count", labels, running))
    return samples


def render(families: Iterable[Family]) -> str:
    """The exposition text of ``families``, in the order given, families without samples left out.

    Raises:
        ValueError: a metric or label name Prometheus would refuse, an unknown type, or a
            family name given twice.
    """
    lines: list[str] = []
    seen: set[str] = set()
    for family in families:
        if not _METRIC_NAME.fullmatch(family.name):
            raise ValueError(f"not a Prometheus metric name: {family.name!r}")
        if family.type not in TYPES:
            raise ValueError(f"{family.name}: unknown metric type {family.type!r}")
        if family.name in seen:
            raise ValueError(f"metric family {family.name} given twice")
        seen.add(family.name)
        if not family.samples:
            continue
        lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.type}")
        for suffix, labels, value in family.samples:
            lines.append(f"{family.name}{suffix}{_labels(labels)} {_number(value)}")
    return "\n".join(lines) + "\n" if lines else ""


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    pairs = []
    for key, value in labels:
        if not _LABEL_NAME.fullmatch(key) or key.startswith("__"):
            raise ValueError(f"not a Prometheus label name: {key!r}")
        pairs.append(f'{key}="{_escape_label(value)}"')
    return "{" + ",".join(pairs) + "}"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):  # bool included: True is 1
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))
