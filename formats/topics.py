"""MQTT topic names under the prefix, and the one parser every subscriber reads them with. No I/O.

Every topic edgepack publishes or subscribes to is built by :class:`Topics`, and every topic a
subscriber receives (the agent's link, the collector) is read by :func:`parse_topic` into a
:class:`Topic`: its :class:`TopicKind` and the names it carries. Nobody splits topic strings by
hand, so the topic tree lives here and in ``docs/protocol.md`` §1. Under a configurable prefix
(default ``edgepack/v1``)::

    {prefix}/devices/{device}/jobs/{model}         retained  the latest signed command for a device
    {prefix}/groups/{group}/jobs/{model}           retained  the latest signed command for a group
    {prefix}/devices/{device}/jobs/{job}/status    job execution updates (QoS 1)
    {prefix}/devices/{device}/state                retained  online, profile, models (Last Will)
    {prefix}/devices/{device}/pending/get          the device asks for pending work (every connect)
    {prefix}/devices/{device}/pending              the collector answers with pending commands
    {prefix}/devices/{device}/telemetry            telemetry reports
    {prefix}/devices/{device}/drift                drift reports
    {prefix}/devices/{device}/quality              model-quality reports (ground truth, estimates)
    {prefix}/collectors/{collector}                retained  a collector is online and subscribed
    {prefix}/presence/ping                         a device asks connected collectors to answer
    {prefix}/trust                                 retained  the signed trust document (keys)

Device ids, group names and job ids are 1-128 of ``A-Z a-z 0-9 _ . : -`` starting with a letter
or digit (:data:`NAME`); model names follow :func:`edgepack.formats.manifest.check_model_name`.
The builders take ``"+"`` where a subscription wants any one level.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgepack.formats._payload import NAME, TextEnum
from edgepack.formats.exceptions import ManifestError, MessageError
from edgepack.formats.manifest import check_model_name

__all__ = ["DEFAULT_PREFIX", "NAME", "Topic", "TopicKind", "Topics", "parse_topic"]

DEFAULT_PREFIX = "edgepack/v1"
_WILDCARDS = ("+", "#", "\x00")


class TopicKind(TextEnum):
    """What a topic carries; the value is a short stable name (logs, metrics)."""

    DEVICE_JOBS = "device_jobs"
    GROUP_JOBS = "group_jobs"
    JOB_STATUS = "job_status"
    STATE = "state"
    PENDING_GET = "pending_get"
    PENDING = "pending"
    TELEMETRY = "telemetry"
    DRIFT = "drift"
    QUALITY = "quality"
    COLLECTOR = "collector"
    PRESENCE_PING = "presence_ping"
    TRUST = "trust"


@dataclass(frozen=True)
class Topic:
    """A parsed topic: its kind and the names in it (``None`` where the kind has none)."""

    kind: TopicKind
    device: str | None = None
    group: str | None = None
    model: str | None = None
    job_id: str | None = None
    collector: str | None = None


# the last levels of a device topic -> its kind (``jobs/{model}`` and ``jobs/{job}/status``
# are told apart by their length)
_DEVICE_LEAVES = {
    ("state",): TopicKind.STATE,
    ("pending",): TopicKind.PENDING,
    ("pending", "get"): TopicKind.PENDING_GET,
    ("telemetry",): TopicKind.TELEMETRY,
    ("drift",): TopicKind.DRIFT,
    ("quality",): TopicKind.QUALITY,
}


def _name(value: str, what: str, topic: str) -> str:
    if not NAME.match(value):
        raise MessageError(
            f"topic {topic!r}: {what} {value!r} is not 1-128 letters, digits, '_', '.', ':' or '-'"
        )
    return value


def _model(value: str, topic: str) -> str:
    try:
        return check_model_name(value)
    except ManifestError as e:
        raise MessageError(f"topic {topic!r}: {e}") from e


def parse_topic(topic: str, prefix: str = DEFAULT_PREFIX) -> Topic:
    """Read a topic a subscriber received.

    Args:
        topic: the topic of a received message (never a subscription filter).
        prefix: the deployment's prefix, e.g. ``edgepack/v1``.

    Returns:
        The :class:`Topic`, with the device, group, model, job id or collector it names.

    Raises:
        MessageError: not under ``prefix``, an empty level, a wildcard, a name that is not
            allowed, or a shape that is not one of edgepack's topics.
    """
    head = prefix + "/"
    if not topic.startswith(head):
        raise MessageError(f"topic {topic!r} is not under the prefix {prefix!r}")
    parts = tuple(topic[len(head) :].split("/"))
    if any(part == "" for part in parts):
        raise MessageError(f"topic {topic!r} has an empty level")
    if any(mark in part for part in parts for mark in _WILDCARDS):
        raise MessageError(f"topic {topic!r} holds a wildcard ('+' or '#'); it is not a topic")
    root, rest = parts[0], parts[1:]
    if root == "devices" and len(rest) >= 2:
        device = _name(rest[0], "device", topic)
        leaf = rest[1:]
        if leaf in _DEVICE_LEAVES:
            return Topic(_DEVICE_LEAVES[leaf], device=device)
        if len(leaf) == 2 and leaf[0] == "jobs":
            return Topic(TopicKind.DEVICE_JOBS, device=device, model=_model(leaf[1], topic))
        if len(leaf) == 3 and leaf[0] == "jobs" and leaf[2] == "status":
            job_id = _name(leaf[1], "job id", topic)
            return Topic(TopicKind.JOB_STATUS, device=device, job_id=job_id)
    elif root == "groups" and len(rest) == 3 and rest[1] == "jobs":
        group = _name(rest[0], "group", topic)
        return Topic(TopicKind.GROUP_JOBS, group=group, model=_model(rest[2], topic))
    elif root == "collectors" and len(rest) == 1:
        return Topic(TopicKind.COLLECTOR, collector=rest[0])
    elif parts == ("presence", "ping"):
        return Topic(TopicKind.PRESENCE_PING)
    elif parts == ("trust",):
        return Topic(TopicKind.TRUST)
    raise MessageError(f"topic {topic!r} is not an edgepack topic (see docs/protocol.md §1)")


@dataclass(frozen=True)
class Topics:
    """Topic names under one prefix; pass ``"+"`` for a level a subscription leaves open."""

    prefix: str = DEFAULT_PREFIX

    def device_jobs(self, device: str, model: str = "+") -> str:
        """Retained commands for one device (one topic per model)."""
        return f"{self.prefix}/devices/{device}/jobs/{model}"

    def group_jobs(self, group: str, model: str = "+") -> str:
        """Retained commands for a group (one topic per model)."""
        return f"{self.prefix}/groups/{group}/jobs/{model}"

    def pending_get(self, device: str) -> str:
        """Where a device asks the collector for pending work."""
        return f"{self.prefix}/devices/{device}/pending/get"

    def pending(self, device: str) -> str:
        """Where the collector answers a device's request for pending work."""
        return f"{self.prefix}/devices/{device}/pending"

    def state(self, device: str) -> str:
        """A device's retained state (and its Last Will)."""
        return f"{self.prefix}/devices/{device}/state"

    def job_status(self, device: str, job_id: str) -> str:
        """A device's execution updates of one job."""
        return f"{self.prefix}/devices/{device}/jobs/{job_id}/status"

    def telemetry(self, device: str) -> str:
        return f"{self.prefix}/devices/{device}/telemetry"

    def drift(self, device: str) -> str:
        return f"{self.prefix}/devices/{device}/drift"

    def quality(self, device: str) -> str:
        return f"{self.prefix}/devices/{device}/quality"

    def collector(self, collector: str = "+") -> str:
        """Retained presence of a collector (online while it is subscribed; LWT offline)."""
        return f"{self.prefix}/collectors/{collector}"

    def presence_ping(self) -> str:
        """Devices ask here; every connected collector answers with a live presence message."""
        return f"{self.prefix}/presence/ping"

    def trust(self) -> str:
        """The retained trust document: bundle and command keys in force (formats.trust)."""
        return f"{self.prefix}/trust"

    def parse(self, topic: str) -> Topic:
        """:func:`parse_topic` under this prefix; raises :class:`MessageError`."""
        return parse_topic(topic, self.prefix)
