"""The agent's configuration: one object, loaded once from ``agent.toml``, passed everywhere.

Every knob has a safe default and a bound; the file only needs what cannot be guessed (the device
id, its profile and the trusted public keys). :func:`load_config` parses every table into its
frozen dataclass at once, so a typo anywhere (``[mqtt]`` included) stops the agent before it
starts, not when the part that reads it does. Loading is strict (edgepack._tables): an unknown
key (with a suggestion), a wrong type or a value out of range is a
:class:`~edgepack.agent.exceptions.ConfigError` that names the file and the field. Relative paths
are resolved against the file's directory. See ``scripts/agent.example.toml`` for a commented
example.

The parts take their own table: :class:`ServerConfig` the HTTP server, :class:`GrpcConfig` the
gRPC server (edgepack.agent._grpc_server, the ``grpc`` extra), :class:`RuntimeConfig`
onnxruntime, :class:`LimitsConfig` the lifecycle, :class:`MqttConfig` the fleet link
(edgepack.agent._fleet_link), :class:`DownloadConfig` the HTTP fetcher (edgepack.agent._download),
:class:`MonitorConfig` telemetry and drift (edgepack.agent._monitor, from ``[telemetry]`` and
``[drift]``), :class:`CaptureConfig` the sample store (edgepack.agent._capture). This module stays
light (no onnxruntime, paho or httpx), so reading the configuration loads none of them.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from edgepack._tables import (
    Check,
    InvalidValueError,
    boolean,
    check_table,
    integer,
    number,
    string,
    string_list,
)
from edgepack.agent.exceptions import ConfigError, KeyFormatError
from edgepack.formats.bundle import ArchiveLimits
from edgepack.formats.keys import load_public_key
from edgepack.formats.topics import DEFAULT_PREFIX

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "AgentConfig",
    "CaptureConfig",
    "DownloadConfig",
    "GrpcConfig",
    "LimitsConfig",
    "MonitorConfig",
    "MqttConfig",
    "QualityConfig",
    "RuntimeConfig",
    "ServerConfig",
    "load_config",
]

_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


@dataclass(frozen=True)
class ServerConfig:
    """``[server]``: the local Open Inference Protocol server."""

    enabled: bool = True
    host: str = "127.0.0.1"  # local only unless asked otherwise
    port: int = 8080
    max_request_bytes: int = 16 * 1024**2
    max_batch_rows: int = 4096
    # connections open at once; when full, the longest-idle one is closed for a newcomer, and
    # a 503 goes out only when every one is mid-request (capped by the open-file limit)
    max_connections: int = 1024
    workers: int = 1  # threads running inference; 0: on the server's event loop itself
    read_timeout: float = 30.0  # seconds a request may take to arrive, from its first byte
    idle_timeout: float = 60.0  # seconds an idle keep-alive connection stays open


@dataclass(frozen=True)
class GrpcConfig:
    """``[grpc]``: the Open Inference Protocol over gRPC (off by default; the ``grpc`` extra)."""

    enabled: bool = False
    host: str = "127.0.0.1"  # local only unless asked otherwise
    port: int = 8001  # Triton's gRPC port
    max_workers: int = 4  # threads running requests (the unit's TasksMax is 256)
    max_concurrent_rpcs: int = 64  # calls admitted at once; more get RESOURCE_EXHAUSTED at once
    max_message_bytes: int = 16 * 1024**2  # each request and each response


@dataclass(frozen=True)
class RuntimeConfig:
    """``[runtime]``: onnxruntime settings; 0 threads means "what the bundle's profile says"."""

    intra_op_threads: int = 0
    inter_op_threads: int = 0
    providers: tuple[str, ...] = ()  # empty: the bundle's providers that this device has
    # seconds one inference may take before onnxruntime is told to stop (a model that loops
    # on some live inputs must not hold a thread and a core forever); 0: no limit
    request_timeout: float = 60.0
    # dynamic batching (edgepack.agent._batching): concurrent requests coalesced into one run
    batch_delay_ms: float = 0.0  # the longest a request waits for company; 0: no batching
    batch_rows: int = 64  # rows at which a batch runs without waiting longer
    batch_models: tuple[str, ...] = ()  # the models that batch; empty: every model


@dataclass(frozen=True)
class LimitsConfig:
    """``[limits]``: bounds on what a bundle may make the agent read and write."""

    max_bundle_bytes: int = 1024**3
    max_file_bytes: int = 1024**3
    max_total_bytes: int = 2 * 1024**3
    max_install_attempts: int = 3  # a crash loop in one install stops after this many restarts
    health_check_timeout: float = 120.0  # seconds a health check may take, loading included
    # true: health checks run in a child process (a native crash stays there; costs an
    # interpreter start and a second load); false: in the agent, on the session that serves
    health_check_in_child: bool = False
    probation_period: float = 600.0  # seconds a new version must serve to be marked good; 0: off
    probation_max_starts: int = 3  # daemon starts within probation before it rolls back

    def archive_limits(self) -> ArchiveLimits:
        return ArchiveLimits(
            max_archive_bytes=self.max_bundle_bytes,
            max_member_bytes=self.max_file_bytes,
            max_total_bytes=self.max_total_bytes,
        )


@dataclass(frozen=True)
class MqttConfig:
    """``[mqtt]``: the broker the fleet link connects to. File paths are resolved against the
    config file's directory; ``""`` means none."""

    host: str = "127.0.0.1"
    port: int = 1883
    prefix: str = DEFAULT_PREFIX
    protocol: str = "5"  # "5" or "3.1.1"
    client_id: str = ""  # default: edgepack-<device_id>
    username: str = ""
    password_file: str = ""
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""  # client certificate (mTLS)
    key_file: str = ""
    keepalive: int = 30
    session_expiry: int = 7 * 24 * 3600
    reconnect_min: int = 1
    reconnect_max: int = 60
    command_keys: tuple[str, ...] = ()  # operator public keys trusted to sign commands
    outbox_max_messages: int = 10_000  # store-and-forward bound (telemetry dropped first)

    def keys(self) -> list[ec.EllipticCurvePublicKey]:
        """Load the operator keys trusted to sign commands.

        Raises:
            ConfigError: a key file is missing or is not an ECDSA public key.
        """
        out = []
        for path in self.command_keys:
            try:
                out.append(load_public_key(Path(path).read_bytes(), source=path))
            except OSError as e:
                raise ConfigError(f"[mqtt] command key {path} cannot be read: {e.strerror}") from e
            except KeyFormatError as e:
                raise ConfigError(f"[mqtt] command key: {e}") from e
        return out


@dataclass(frozen=True)
class DownloadConfig:
    """``[download]``: timeouts, retries and backoff for bundle downloads (seconds)."""

    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    retries: int = 5  # attempts after the first
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    deadline: float = 3600.0  # the whole download, retries and backoff included
    min_rate: float = 1024.0  # bytes/s averaged over min_rate_window; slower is cut off; 0: off
    min_rate_window: float = 60.0


@dataclass(frozen=True)
class MonitorConfig:
    """``[telemetry] interval`` and ``[drift]`` (``enabled`` is :attr:`drift` here)."""

    interval: float = 60.0  # seconds between telemetry reports
    drift: bool = True
    window: int = 500  # rows per drift window
    min_rows: int = 100  # the fewest rows a time-flushed window may have
    max_age: float = 3600.0  # seconds after which a window with min_rows closes
    # drift work waiting (each queued row holds its arrays: ~1 KB for a single-row request);
    # beyond it new batches are skipped, counted, so a monitor that falls behind costs no memory
    max_queued_rows: int = 10_000


@dataclass(frozen=True)
class QualityConfig:
    """``[quality]``: model quality from delayed ground truth and CBPE (edgepack.agent._quality)."""

    enabled: bool = True
    window: int = 200  # labeled rows per quality window
    estimate_window: int = 500  # predictions per CBPE (estimated accuracy) window
    max_predictions: int = 10_000  # rows of recent predictions kept for feedback to join


@dataclass(frozen=True)
class ExperimentsConfig:
    """``[experiments]``: bounds of a shadow experiment's work (edgepack.agent._experiment)."""

    shadow_queue: int = 256  # sampled requests waiting for the candidate; more are dropped
    shadow_cpu_share: float = 0.25  # seconds of candidate compute per second (a core's share)


@dataclass(frozen=True)
class CaptureConfig:
    """``[capture]``: the rate-limited sample store for retraining (off by default)."""

    enabled: bool = False
    per_minute: int = 60
    max_rows: int = 10_000


@dataclass(frozen=True)
class AgentConfig:
    """Everything the agent needs to know about the device it runs on."""

    device_id: str
    profile: str
    state_dir: Path
    trusted_keys: tuple[Path, ...]
    groups: tuple[str, ...] = ()
    # offline root keys that may sign trust documents (key rotation); none: rotation disabled
    root_keys: tuple[Path, ...] = ()
    server: ServerConfig = field(default_factory=ServerConfig)
    grpc: GrpcConfig = field(default_factory=GrpcConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    mqtt: MqttConfig | None = None  # None: no fleet link, the device works offline
    download: DownloadConfig = field(default_factory=DownloadConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    experiments: ExperimentsConfig = field(default_factory=ExperimentsConfig)
    source: Path | None = None

    def public_keys(self) -> list[ec.EllipticCurvePublicKey]:
        """Load the keys trusted to sign bundles (``trusted_keys``).

        Raises:
            ConfigError: a key file is missing or is not an ECDSA public key.
        """
        return self._load(self.trusted_keys, "trusted key")

    def root_public_keys(self) -> list[ec.EllipticCurvePublicKey]:
        """Load the offline root keys that may sign trust documents (``root_keys``).

        Raises:
            ConfigError: a key file is missing or is not an ECDSA public key.
        """
        return self._load(self.root_keys, "root key")

    def _load(self, paths: tuple[Path, ...], what: str) -> list[ec.EllipticCurvePublicKey]:
        keys = []
        for path in paths:
            try:
                keys.append(load_public_key(path.read_bytes(), source=str(path)))
            except OSError as e:
                raise ConfigError(
                    f"{self.source or 'config'}: {what} {path} cannot be read: {e.strerror or e}"
                ) from e
            except KeyFormatError as e:
                raise ConfigError(f"{self.source or 'config'}: {e}") from e
        return keys


# --- the schema: one spec per table (edgepack._tables), checked when the file is loaded --------

_SERVER: dict[str, Check] = {
    "enabled": boolean,
    "host": string(empty_ok=False),
    "port": integer(0, 65535),
    "max_request_bytes": integer(0),
    "max_batch_rows": integer(0),
    "max_connections": integer(1, 65536),
    "workers": integer(0, 64),
    "read_timeout": number(0.1, 3600),
    "idle_timeout": number(0.1, 86400),
}
_GRPC: dict[str, Check] = {
    "enabled": boolean,
    "host": string(empty_ok=False),
    "port": integer(0, 65535),
    "max_workers": integer(1, 64),
    "max_concurrent_rpcs": integer(1, 4096),
    "max_message_bytes": integer(1024, 2**31 - 1),  # gRPC's limits are 32-bit
}
_RUNTIME: dict[str, Check] = {
    "intra_op_threads": integer(0),
    "inter_op_threads": integer(0),
    "providers": string_list(),
    "request_timeout": number(0, 24 * 3600),
    "batch_delay_ms": number(0, 1000),
    "batch_rows": integer(1, 65536),
    "batch_models": string_list(),
}
_LIMITS: dict[str, Check] = {
    "max_bundle_bytes": integer(0),
    "max_file_bytes": integer(0),
    "max_total_bytes": integer(0),
    "max_install_attempts": integer(0),
    "health_check_timeout": number(1, 3600),
    "health_check_in_child": boolean,
    "probation_period": number(0, 7 * 24 * 3600),
    "probation_max_starts": integer(1, 100),
}
_DOWNLOAD: dict[str, Check] = {
    "connect_timeout": number(0),
    "read_timeout": number(0),
    "retries": integer(0),
    "backoff_initial": number(0),
    "backoff_max": number(0),
    "deadline": number(1, 7 * 24 * 3600),
    "min_rate": number(0),
    "min_rate_window": number(1, 3600),
}
_TELEMETRY: dict[str, Check] = {"interval": number(above=0)}
_CALIBRATED = integer(
    100,
    what="at least 100 rows (a whole number; thresholds are calibrated for windows of 100, 250, "
    "500 and 1000 rows)",
)
_DRIFT: dict[str, Check] = {
    "enabled": boolean,
    "window": _CALIBRATED,
    "min_rows": _CALIBRATED,
    "max_age": number(above=0),
    "max_queued_rows": integer(1),
}
_QUALITY: dict[str, Check] = {
    "enabled": boolean,
    "window": integer(20),
    "estimate_window": integer(20),
    "max_predictions": integer(1),
}
_EXPERIMENTS: dict[str, Check] = {
    "shadow_queue": integer(1),
    "shadow_cpu_share": number(0.01, 1.0),
}
_CAPTURE: dict[str, Check] = {
    "enabled": boolean,
    "per_minute": integer(1),
    "max_rows": integer(1),
}
_REQUIRED = ("device_id", "profile", "state_dir", "trusted_keys")


def _path(base: Path) -> Check:
    """A path string, resolved against the config file's directory."""

    def check(value: Any) -> Path:
        if not isinstance(value, str) or not value:
            raise InvalidValueError("a path (a non-empty string)")
        return base / value

    return check


def _optional_path(base: Path) -> Check:
    """A path string resolved like :func:`_path`, kept as text; ``""`` stays ``""`` (no file)."""

    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise InvalidValueError('a path (a string; "" for none)')
        return str(base / value) if value else ""

    return check


def _mqtt_spec(base: Path) -> dict[str, Check]:
    text = string()
    return {
        "host": string(empty_ok=False),
        "port": integer(0, 65535),
        "prefix": string(empty_ok=False),
        "protocol": string(choices=("5", "3.1.1")),
        "client_id": text,
        "username": text,
        "password_file": _optional_path(base),
        "tls": boolean,
        "ca_file": _optional_path(base),
        "cert_file": _optional_path(base),
        "key_file": _optional_path(base),
        "keepalive": integer(0),
        "session_expiry": integer(0),
        "reconnect_min": integer(0),
        "reconnect_max": integer(0),
        "command_keys": string_list(lambda v: str(_path(base)(v))),
        "outbox_max_messages": integer(0),
    }


def _schema(source: str, base: Path) -> dict[str, Check]:
    """The top level of ``agent.toml``: its fields, and a check per table that parses it."""

    def table(name: str, spec: Mapping[str, Check]) -> Check:
        return lambda value: check_table(value, spec, source=source, error=ConfigError, table=name)

    def mqtt(value: Any) -> MqttConfig:
        config = MqttConfig(**table("mqtt", _mqtt_spec(base))(value))
        if not config.command_keys:
            raise ConfigError(
                f"{source}: [mqtt].command_keys is empty; no command would verify (list the "
                "operator public keys that sign fleet commands)"
            )
        if config.reconnect_min > config.reconnect_max:
            raise ConfigError(
                f"{source}: [mqtt].reconnect_min ({config.reconnect_min}) is above "
                f"[mqtt].reconnect_max ({config.reconnect_max})"
            )
        return config

    return {
        "device_id": string(),
        "profile": string(empty_ok=False),
        "state_dir": _path(base),
        "trusted_keys": string_list(_path(base)),
        "root_keys": string_list(_path(base)),
        "groups": string_list(),
        "server": lambda v: ServerConfig(**table("server", _SERVER)(v)),
        "grpc": lambda v: GrpcConfig(**table("grpc", _GRPC)(v)),
        "runtime": lambda v: RuntimeConfig(**table("runtime", _RUNTIME)(v)),
        "limits": lambda v: LimitsConfig(**table("limits", _LIMITS)(v)),
        "mqtt": mqtt,
        "download": lambda v: DownloadConfig(**table("download", _DOWNLOAD)(v)),
        "telemetry": table("telemetry", _TELEMETRY),  # with [drift]: one MonitorConfig
        "drift": table("drift", _DRIFT),
        "capture": lambda v: CaptureConfig(**table("capture", _CAPTURE)(v)),
        "quality": lambda v: QualityConfig(**table("quality", _QUALITY)(v)),
        "experiments": lambda v: ExperimentsConfig(**table("experiments", _EXPERIMENTS)(v)),
    }


def _read(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(
            f"config file {path} does not exist; copy scripts/agent.example.toml and edit it"
        ) from e
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e


def load_config(path: Path, **overrides: Any) -> AgentConfig:
    """Load and validate ``agent.toml``: every table, once. Relative paths in it are relative
    to the file.

    Args:
        path: the TOML file.
        overrides: top-level fields to replace (tests and the CLI's ``--state-dir``).

    Returns:
        The configuration, with a typed sub-config per table (``mqtt`` is ``None`` without an
        ``[mqtt]`` table: the device works offline).

    Raises:
        ConfigError: missing file, TOML syntax error, unknown key (with a suggestion), wrong type,
            value out of range, missing field; the message names the file and the field.
    """
    source = str(path)
    base = path.resolve().parent  # journaled paths must not depend on the working directory
    values = check_table(
        _read(path),
        _schema(source, base),
        source=source,
        error=ConfigError,
        required=[key for key in _REQUIRED if key not in overrides],
    )
    drift = values.pop("drift", {})
    if "enabled" in drift:
        drift["drift"] = drift.pop("enabled")
    values["monitor"] = MonitorConfig(**values.pop("telemetry", {}), **drift)
    values.update(overrides)
    if not _DEVICE_ID.match(values["device_id"]):
        raise ConfigError(
            f"{source}: device_id {values['device_id']!r} must be 1-128 letters, digits, '.', "
            "'_', ':' or '-' (it becomes part of MQTT topics)"
        )
    for group in values.get("groups", ()):
        if not _DEVICE_ID.match(group):
            raise ConfigError(
                f"{source}: group {group!r} must be 1-128 letters, digits, '.', '_', ':' or '-' "
                "(it becomes part of MQTT topics; '+', '#' and '/' are not allowed)"
            )
    if not values["trusted_keys"]:
        raise ConfigError(f"{source}: trusted_keys is empty; the agent would trust no bundle")
    return AgentConfig(**values, source=path)
