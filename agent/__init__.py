"""edgepack agent: the device side.

It never imports ``packager`` or ``fleet``, nor onnx, skl2onnx or scikit-learn: a device installs
only ``edgepack[agent]``. The formats it reads (bundles, manifests, signatures, fleet messages)
come from :mod:`edgepack.formats`, shared with the packager and the fleet. The modules are
private; the configuration (``_config``, parsed once), the lifecycle (``_lifecycle``), the
sessions that serve models (``_session``, ``_runtime``) and the daemon that wires them
(``_daemon``) are the places to start reading. Errors: :mod:`edgepack.agent.exceptions`.
"""

__version__ = "0.1.0"
