"""edgepack fleet: the operator's side (signed fleet commands over MQTT, the collector, reports).

The front door for scripts (``edgepack-fleet`` is the same thing on the command line)::

    from edgepack.fleet import BrokerOptions, find_bundles, open_store, publish_command

Errors are in :mod:`edgepack.fleet.exceptions`; everything else is private (``_*`` modules).
The fleet imports :mod:`edgepack.formats`, never the agent or onnxruntime: an operator's machine
installs ``edgepack[fleet]``. Names load lazily (the report's matplotlib only when it is drawn).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgepack._lazy import lazy_exports

if TYPE_CHECKING:
    from edgepack.fleet._broker import BrokerOptions
    from edgepack.fleet._collector import Collector
    from edgepack.fleet._commands import find_bundles, publish_command
    from edgepack.fleet._database import FleetStore, open_store
    from edgepack.fleet._report import write_report

__all__ = [
    "BrokerOptions",
    "Collector",
    "FleetStore",
    "find_bundles",
    "open_store",
    "publish_command",
    "write_report",
]

_HOMES = {
    "BrokerOptions": "edgepack.fleet._broker",
    "Collector": "edgepack.fleet._collector",
    "find_bundles": "edgepack.fleet._commands",
    "publish_command": "edgepack.fleet._commands",
    "FleetStore": "edgepack.fleet._database",
    "open_store": "edgepack.fleet._database",
    "write_report": "edgepack.fleet._report",
}

__getattr__ = lazy_exports("edgepack.fleet", _HOMES)
