"""edgepack: ship trained models to fleets of edge devices, and keep watching them there.

One distribution, four packages, each imported under this name::

    edgepack.formats    what every side agrees on: the bundle, its manifest and signatures, keys,
                        MQTT topics and messages, reference.json drift statistics (no onnxruntime)
    edgepack.packager   the build server: convert, optimize, check parity, sign one bundle a profile
    edgepack.agent      the device: verified atomic installs, local inference, telemetry, drift
    edgepack.fleet      the operator: signed commands, the collector and its store, tables, reports

``formats`` imports only this root package; ``packager``, ``agent`` and ``fleet`` import
``formats`` and never each other, so a device installs ``edgepack[agent]`` alone. The modules
here (``_files``, ``_clock``, ``_tables``, ``_mqtt``, ``_lazy``) are the plumbing every package
shares; ``errors`` holds the root of every edgepack exception. See ``docs/architecture.md``.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
