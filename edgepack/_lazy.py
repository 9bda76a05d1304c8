"""Lazy front doors: a package names its public objects and where they live; each loads on use.

``edgepack.agent``, ``edgepack.packager`` and ``edgepack.fleet`` export a few names each, but
importing the package must stay cheap (the agent's front door must not load onnxruntime before
``Agent`` is used; the fleet's not matplotlib). :func:`lazy_exports` makes the module-level
``__getattr__`` (PEP 562) that imports a name's home module on first access.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, homes: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that loads each name from ``homes[name]``."""

    def load(name: str) -> Any:
        if name in homes:
            return getattr(importlib.import_module(homes[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return load
