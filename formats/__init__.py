"""edgepack.formats: what every side of edgepack agrees on, each format with one owner.

The packager writes these formats, the agent reads and verifies them, the fleet builds and reads
the messages; all three import them from here, and nothing here imports onnxruntime, paho or
httpx. Every reader takes bytes and returns a validated object or raises an error from
:mod:`edgepack.formats.exceptions`; none does I/O beyond the thin file wrappers named so.

=============  ===============================================================================
module         owns
=============  ===============================================================================
``bundle``     the ``.edgepack`` archive: layout, safe reading, the one verification path
``manifest``   ``manifest.json``: what the model is and what it was built for
``keys``       ECDSA signing keys in PEM, and key ids
``dsse``       DSSE envelopes (signed payloads)
``modelsig``   ``model.sig``, the OpenSSF model-signing v1.0 signature over a bundle's files
``topics``     MQTT topic names under the prefix, and the one topic parser
``messages``   every MQTT payload but commands: job status, device state and Last Will, collector
               presence and ping, pending work, telemetry and drift envelopes; bounded JSON
               decoding (shared with ``commands`` through the private ``_payload``)
``commands``   signed fleet commands (deploy, rollback, retire): made, read, verified
``drift``      the drift statistics (bins, binned KS, PSI, calibration) shared by build and device
``reference``  ``reference.json``: the drift reference a bundle carries, with its format version
=============  ===============================================================================
"""

from edgepack.formats.bundle import BUNDLE_SUFFIX, open_bundle, read_archive, verify_bundle_file
from edgepack.formats.keys import key_id, load_private_key, load_public_key
from edgepack.formats.manifest import Manifest, parse_manifest

__all__ = [
    "BUNDLE_SUFFIX",
    "Manifest",
    "key_id",
    "load_private_key",
    "load_public_key",
    "open_bundle",
    "parse_manifest",
    "read_archive",
    "verify_bundle_file",
]
