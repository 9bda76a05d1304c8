"""The agent's configuration: one object, loaded once from ``agent.toml``, passed everywhere.

Every knob has a safe default and a bound; the file only needs what cannot be guessed (the device
id, its profile and the trusted public keys). Loading is strict: an unknown key or a wrong type is
a :class:`~edgepack.agent.exceptions.ConfigError` that names the file and the field. See
``scripts/agent.example.toml`` for a commented example.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from edgepack.agent.exceptions import ConfigError, KeyFormatError
from edgepack.formats.bundle import ArchiveLimits
from edgepack.formats.keys import load_public_key

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = ["AgentConfig", "LimitsConfig", "RuntimeConfig", "ServerConfig", "load_config"]

_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


@dataclass(frozen=True)
class ServerConfig:
    """The local Open Inference Protocol server."""

    enabled: bool = True
    host: str = "127.0.0.1"  # local only unless asked otherwise
    port: int = 8080
    max_request_bytes: int = 16 * 1024**2
    max_batch_rows: int = 4096


@dataclass(frozen=True)
class RuntimeConfig:
    """onnxruntime settings; 0 threads means "what the bundle's profile says"."""

    intra_op_threads: int = 0
    inter_op_threads: int = 0
    providers: tuple[str, ...] = ()  # empty: the bundle's providers that this device has


@dataclass(frozen=True)
class LimitsConfig:
    """Bounds on what a bundle may make the agent read and write."""

    max_bundle_bytes: int = 1024**3
    max_file_bytes: int = 1024**3
    max_total_bytes: int = 2 * 1024**3
    max_install_attempts: int = 3  # a crash loop in one install stops after this many restarts

    def archive_limits(self) -> ArchiveLimits:
        return ArchiveLimits(
            max_archive_bytes=self.max_bundle_bytes,
            max_member_bytes=self.max_file_bytes,
            max_total_bytes=self.max_total_bytes,
        )


@dataclass(frozen=True)
class AgentConfig:
    """Everything the agent needs to know about the device it runs on."""

    device_id: str
    profile: str
    state_dir: Path
    trusted_keys: tuple[Path, ...]
    groups: tuple[str, ...] = ()
    server: ServerConfig = field(default_factory=ServerConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    source: Path | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # sections later parts add (mqtt, ...)

    def public_keys(self) -> list[ec.EllipticCurvePublicKey]:
        """Load the trusted keys.

        Raises:
            ConfigError: a key file is missing or is not an ECDSA public key.
        """
        keys = []
        for path in self.trusted_keys:
            try:
                keys.append(load_public_key(path.read_bytes(), source=str(path)))
            except OSError as e:
                raise ConfigError(
                    f"{self.source or 'config'}: trusted key {path} cannot be read: "
                    f"{e.strerror or e}"
                ) from e
            except KeyFormatError as e:
                raise ConfigError(f"{self.source or 'config'}: {e}") from e
        return keys


def _section(cls: type, data: Any, where: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: [{where}] must be a table")
    known = {f.name: f for f in fields(cls)}
    values = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(
                f"{source}: unknown key [{where}].{key}; known: {', '.join(sorted(known))}"
            )
        default = getattr(cls(), key)
        values[key] = _coerce(value, default, f"[{where}].{key}", source)
    return cls(**values)


def _coerce(value: Any, default: Any, where: str, source: str) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {where} must be true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{source}: {where} must be a non-negative integer, got {value!r}")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{source}: {where} must be a list of strings")
        return tuple(value)
    if not isinstance(value, str):
        raise ConfigError(f"{source}: {where} must be a string, got {value!r}")
    return value


def load_config(path: Path, **overrides: Any) -> AgentConfig:
    """Load and validate ``agent.toml``. Relative paths in it are relative to the file.

    Args:
        path: the TOML file.
        overrides: top-level fields to replace (tests and the CLI's ``--state-dir``).

    Raises:
        ConfigError: missing file, TOML syntax error, unknown key, wrong type, missing field.
    """
    source = str(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(
            f"config file {path} does not exist; copy scripts/agent.example.toml and edit it"
        ) from e
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    base = path.resolve().parent  # journaled paths must not depend on the working directory
    sections = {"server": ServerConfig, "runtime": RuntimeConfig, "limits": LimitsConfig}
    top: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in data.items():
        if key in sections:
            top[key] = _section(sections[key], value, key, source)
        elif key in ("device_id", "profile"):
            if not isinstance(value, str):
                raise ConfigError(f"{source}: {key} must be a string")
            top[key] = value
        elif key == "state_dir":
            if not isinstance(value, str):
                raise ConfigError(f"{source}: state_dir must be a path string")
            top[key] = base / value
        elif key in ("trusted_keys", "groups"):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{source}: {key} must be a list of strings")
            top[key] = tuple(base / v for v in value) if key == "trusted_keys" else tuple(value)
        elif key in ("mqtt", "download", "telemetry", "drift", "capture"):
            extra[key] = value  # read by the parts that own them
        else:
            raise ConfigError(f"{source}: unknown key '{key}'")
    top.update(overrides)
    for required in ("device_id", "profile", "state_dir", "trusted_keys"):
        if required not in top:
            raise ConfigError(f"{source}: missing required field '{required}'")
    if not _DEVICE_ID.match(top["device_id"]):
        raise ConfigError(
            f"{source}: device_id {top['device_id']!r} must be 1-128 letters, digits, '.', '_', "
            "':' or '-' (it becomes part of MQTT topics)"
        )
    for group in top.get("groups", ()):
        if not _DEVICE_ID.match(group):
            raise ConfigError(
                f"{source}: group {group!r} must be 1-128 letters, digits, '.', '_', ':' or '-' "
                "(it becomes part of MQTT topics; '+', '#' and '/' are not allowed)"
            )
    if not top["trusted_keys"]:
        raise ConfigError(f"{source}: trusted_keys is empty; the agent would trust no bundle")
    return AgentConfig(**top, extra=extra, source=path)
