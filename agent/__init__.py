"""edgepack agent: the device side.

The front door for applications that embed the agent::

    from edgepack.agent import Agent, load_config

    with Agent(load_config(Path("agent.toml"))).start(serve_http=False) as agent:
        agent.install("churn-7-arm64-cpu.edgepack")
        agent.infer("churn", {"input": rows})

Errors are in :mod:`edgepack.agent.exceptions`; everything else is private (``_*`` modules).
The agent never imports ``packager`` or ``fleet``, nor onnx, skl2onnx or scikit-learn: a device
installs only ``edgepack[agent]``. The formats it reads (bundles, manifests, signatures, fleet
messages) come from :mod:`edgepack.formats`, shared with the packager and the fleet. To read
the code, start with the configuration (``_config``, parsed once), the lifecycle
(``_lifecycle``), the sessions that serve models (``_session``, ``_runtime``) and the daemon that
wires them (``_daemon``). Names load lazily, so ``import edgepack.agent`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgepack._lazy import lazy_exports

if TYPE_CHECKING:
    from edgepack.agent._config import AgentConfig, load_config
    from edgepack.agent._daemon import Agent
    from edgepack.agent._lifecycle import Outcome

__all__ = ["Agent", "AgentConfig", "Outcome", "load_config"]

_HOMES = {
    "Agent": "edgepack.agent._daemon",
    "AgentConfig": "edgepack.agent._config",
    "load_config": "edgepack.agent._config",
    "Outcome": "edgepack.agent._lifecycle",
}

__getattr__ = lazy_exports("edgepack.agent", _HOMES)
