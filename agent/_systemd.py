"""Talking to systemd: readiness, status and the watchdog, over the ``sd_notify`` datagram protocol.

systemd's ``Type=notify`` services tell the service manager how they are doing by sending
newline-separated ``KEY=VALUE`` datagrams to the ``AF_UNIX`` socket named in ``$NOTIFY_SOCKET``
(a path, or an abstract name written with a leading ``@``)::

    READY=1        the agent is serving: systemd marks the unit started only now
    STATUS=...     one line shown by ``systemctl status``
    WATCHDOG=1     a heartbeat; without one every ``WatchdogSec`` systemd restarts the unit
    STOPPING=1     shutting down on purpose

No library is needed (the protocol is one ``sendto``), and outside systemd (no
``$NOTIFY_SOCKET``) every call is a cheap no-op, so the daemon always calls it. The agent's
watchdog thread (:mod:`edgepack.agent._supervise`) sends ``WATCHDOG=1`` only while the command
path and the HTTP server both prove alive, so a wedged agent is restarted rather than left
serving nothing.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["Notifier", "watchdog_interval"]

log = logging.getLogger("edgepack.agent")


class Notifier:
    """Sends ``sd_notify`` messages to the socket named in the environment, if any.

    Args:
        environ: where ``NOTIFY_SOCKET`` is read (default: ``os.environ``); tests pass their own.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        name = env.get("NOTIFY_SOCKET", "")
        if name.startswith("@"):
            name = "\0" + name[1:]  # an abstract socket
        self._address = name or None
        self._socket: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        """Whether a service manager is listening (``$NOTIFY_SOCKET`` is set)."""
        return self._address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send one message, e.g. ``notify(READY=1, STATUS="serving 2 models")``.

        Returns:
            True if it was sent; False outside systemd or if the socket is gone (logged once:
            a lost notification must never stop the agent).
        """
        if self._address is None:
            return False
        message = "\n".join(f"{key}={_one_line(value)}" for key, value in fields.items())
        try:
            if self._socket is None:
                kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                self._socket = socket.socket(socket.AF_UNIX, kind)
            self._socket.sendto(message.encode(), self._address)
        except OSError as e:
            log.warning("cannot notify systemd at %r: %s", self._address.lstrip("\0"), e)
            self.close()
            return False
        return True

    def ready(self, status: str) -> bool:
        """The agent serves: ``READY=1`` with a status line."""
        return self.notify(READY=1, STATUS=status)

    def status(self, status: str) -> bool:
        """A new status line for ``systemctl status``."""
        return self.notify(STATUS=status)

    def watchdog(self) -> bool:
        """One watchdog heartbeat."""
        return self.notify(WATCHDOG=1)

    def stopping(self) -> bool:
        """The agent is shutting down on purpose."""
        return self.notify(STOPPING=1)

    def close(self) -> None:
        """Close the socket (a later message opens a new one)."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between heartbeats systemd asks for, or None when no watchdog is set.

    systemd sets ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``, the process it applies to); heartbeats
    go at half that period, as ``sd_watchdog_enabled(3)`` recommends.
    """
    env = os.environ if environ is None else environ
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (e.g. a wrapper that exec'd us)
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    return usec / 2_000_000 if usec > 0 else None


def _one_line(value: str | int) -> str:
    return str(value).replace("\n", " ")[:500]
