"""The root of every edgepack exception, and the one fault every part can hit: storage.

Each package extends this tree in its own ``exceptions`` module, grouped by whose fault a
failure is (:mod:`edgepack.formats.exceptions`, :mod:`edgepack.agent.exceptions`,
:mod:`edgepack.packager.exceptions`, :mod:`edgepack.fleet.exceptions`)::

    EdgepackError        every error edgepack raises; its message is meant for the operator
    └── StorageError     a local file or database cannot be read or written (full disk,
                         permissions, corruption): nothing is wrong with the model or the input

A caller that catches :class:`EdgepackError` catches every failure edgepack expects. Misuse by
the calling program raises the ordinary ``ValueError``/``TypeError``/``RuntimeError``.
"""

from __future__ import annotations

__all__ = ["EdgepackError", "StorageError"]


class EdgepackError(Exception):
    """Base of every edgepack error; its message is meant for the operator."""


class StorageError(EdgepackError):
    """A local file could not be written or read (full disk, permissions, corruption)."""
