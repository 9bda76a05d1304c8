"""The keys this device trusts now: from ``agent.toml`` at first, then from signed trust documents.

The lifecycle asks :meth:`TrustStore.bundle_keys` before it verifies a bundle (install, rollback,
and loading the active versions), the job runner asks :meth:`TrustStore.command_keys` before it
verifies a command. Both start as the configured ``trusted_keys`` and ``[mqtt] command_keys``.
A trust document (:mod:`edgepack.formats.trust`: the whole key sets in force, a growing version,
signed by the offline ``root_keys``) arrives over MQTT, retained on the trust topic or inside a
pending answer; :meth:`TrustStore.apply` verifies it against the trust in force, saves it
durably (``trust.json`` in the state directory: temp file, fsync, rename) and only then swaps
it in. From then on a retired key signs nothing this device accepts, and a restart keeps the
rotation. Without configured ``root_keys`` a device refuses every trust document.
"""

from __future__ import annotations

import base64
import logging
import threading
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from edgepack._files import read_json, write_json_atomic
from edgepack.agent._config import AgentConfig
from edgepack.agent.exceptions import KeyFormatError, StorageError
from edgepack.formats.keys import load_public_key, public_key_pem
from edgepack.formats.trust import Trust, TrustError, open_trust

__all__ = ["TrustStore"]

log = logging.getLogger("edgepack.agent")

_FILE = "trust.json"


class TrustStore:
    """The bundle and command keys in force on this device, rotated by root-signed documents.

    Args:
        config: the agent configuration (initial keys, the state directory).

    Raises:
        ConfigError: a configured key cannot be loaded.
        StorageError: ``trust.json`` exists but is unreadable or corrupt.
    """

    def __init__(self, config: AgentConfig) -> None:
        self.path = config.state_dir / _FILE
        command = config.mqtt.keys() if config.mqtt is not None else []
        self._initial = Trust(
            version=0,
            root_keys=tuple(config.root_public_keys()),
            threshold=1,
            bundle_keys=tuple(config.public_keys()),
            command_keys=tuple(command),
        )
        self._lock = threading.Lock()
        self._trust = self._load() or self._initial

    @property
    def current(self) -> Trust:
        """The trust in force."""
        return self._trust

    def bundle_keys(self) -> list[ec.EllipticCurvePublicKey]:
        """Keys whose bundle signatures are accepted now."""
        return list(self._trust.bundle_keys)

    def command_keys(self) -> list[ec.EllipticCurvePublicKey]:
        """Keys whose fleet commands are accepted now."""
        return list(self._trust.command_keys)

    def apply(self, raw: bytes) -> Trust | None:
        """Verify a trust document and make it the trust in force.

        Returns:
            The new trust, or None when the document is the one already in force (a retained
            message delivered again).

        Raises:
            TrustError: refused (not root-signed, older, malformed, or no root keys here).
            StorageError: it could not be saved; the trust in force is unchanged.
        """
        with self._lock:
            current = self._trust
            if not current.root_keys:
                raise TrustError(
                    "this device has no root_keys in agent.toml, so it accepts no trust "
                    "document; add the fleet's root public key to rotate keys"
                )
            try:
                new = open_trust(raw, current)
            except TrustError:
                if self._same_as_saved(raw):
                    return None
                raise
            write_json_atomic(self.path, _to_json(new, raw))
            self._trust = new
        log.warning(
            "trust document v%d applied: %d bundle key(s), %d command key(s)",
            new.version, len(new.bundle_keys), len(new.command_keys),
        )  # fmt: skip
        return new

    def _same_as_saved(self, raw: bytes) -> bool:
        saved = read_json(self.path)
        return isinstance(saved, dict) and saved.get("document") == base64.b64encode(raw).decode()

    def _load(self) -> Trust | None:
        data = read_json(self.path)
        if data is None:
            return None
        try:
            return _from_json(data)
        except (KeyError, TypeError, ValueError, KeyFormatError) as e:
            raise StorageError(
                f"{self.path} is corrupt ({e}); move it aside and republish the trust document"
            ) from e


def _to_json(trust: Trust, raw: bytes) -> dict[str, Any]:
    return {
        "version": trust.version,
        "threshold": trust.threshold,
        "issued_at": trust.issued_at,
        "root_keys": [public_key_pem(k).decode() for k in trust.root_keys],
        "bundle_keys": [public_key_pem(k).decode() for k in trust.bundle_keys],
        "command_keys": [public_key_pem(k).decode() for k in trust.command_keys],
        "document": base64.b64encode(raw).decode(),
    }


def _from_json(data: dict[str, Any]) -> Trust:
    def keys(field: str) -> tuple[ec.EllipticCurvePublicKey, ...]:
        return tuple(
            load_public_key(str(pem).encode(), source=f"{_FILE} {field}") for pem in data[field]
        )

    return Trust(
        version=int(data["version"]),
        root_keys=keys("root_keys"),
        threshold=int(data["threshold"]),
        bundle_keys=keys("bundle_keys"),
        command_keys=keys("command_keys"),
        issued_at=str(data.get("issued_at", "")),
    )
