"""edgepack agent: the device side, and the formats every side of edgepack agrees on.

This package is the leaf of edgepack. It never imports ``packager`` or ``fleet``, nor onnx,
skl2onnx or scikit-learn: a device installs only ``edgepack[agent]``. The bundle layout
(:mod:`agent.bundle`, :mod:`agent.manifest`) and signatures (:mod:`agent.signing`) live here,
and the packager and fleet import them from here.
"""

__version__ = "0.1.0"
