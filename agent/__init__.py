"""edgepack agent: the device side, and the formats every side of edgepack agrees on.

This package is the leaf of edgepack. It never imports ``packager`` or ``fleet``, nor onnx,
skl2onnx or scikit-learn: a device installs only ``edgepack[agent]``. The bundle layout
(:mod:`edgepack.formats.bundle`, :mod:`edgepack.formats.manifest`) and signatures
(:mod:`edgepack.formats.modelsig`) live here, and the packager and fleet import them from here.
"""

__version__ = "0.1.0"
