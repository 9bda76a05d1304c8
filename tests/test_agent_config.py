"""agent.toml: the shipped example parses in every table; a mistake anywhere fails at load_config,
naming the file and the field (with a suggestion for a typo), before any part of the agent runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO, KeyPair

from edgepack.agent._config import (
    CaptureConfig,
    DownloadConfig,
    MonitorConfig,
    MqttConfig,
    load_config,
)
from edgepack.agent.exceptions import ConfigError


def _base(keys: KeyPair) -> str:
    return (
        f'device_id = "cam-1"\nprofile = "x86_64-cpu"\nstate_dir = "s"\n'
        f'trusted_keys = ["{keys.public}"]\n'
    )


def test_the_shipped_example_parses_in_every_table(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text((REPO / "scripts" / "agent.example.toml").read_text())
    config = load_config(path)
    assert (config.device_id, config.profile, config.groups) == (
        "cam-17",
        "arm64-cpu",
        ("store-42",),
    )
    assert config.server.host == "127.0.0.1"
    assert config.mqtt is not None
    assert config.mqtt.tls
    assert config.mqtt.protocol == "5"
    assert config.mqtt.command_keys == ("/etc/edgepack/keys/ops.pub",)
    assert config.mqtt.password_file == "/etc/edgepack/mqtt.password"
    assert config.monitor == MonitorConfig(interval=60.0, drift=True, window=500, max_age=3600.0)
    assert config.capture == CaptureConfig(enabled=False, per_minute=60, max_rows=10_000)
    assert config.download == DownloadConfig()
    assert isinstance(config.download.connect_timeout, float)  # 10 in the file, a float here


def test_the_minimal_file_gets_every_default(tmp_path: Path, keys: KeyPair) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(_base(keys))
    config = load_config(path)
    assert config.mqtt is None  # no [mqtt]: the device works offline
    assert (config.download, config.monitor, config.capture) == (
        DownloadConfig(),
        MonitorConfig(),
        CaptureConfig(),
    )
    assert config.state_dir == tmp_path / "s"
    assert config.trusted_keys == (keys.public,)


def test_relative_paths_are_relative_to_the_file(tmp_path: Path, keys: KeyPair) -> None:
    path = tmp_path / "etc" / "agent.toml"
    path.parent.mkdir()
    path.write_text(
        _base(keys) + '[mqtt]\ncommand_keys = ["keys/ops.pub"]\nca_file = "ca.pem"\n'
        'password_file = "/abs/pw"\n'
    )
    config = load_config(path)
    assert config.mqtt == MqttConfig(
        command_keys=(str(path.parent / "keys" / "ops.pub"),),
        ca_file=str(path.parent / "ca.pem"),
        password_file="/abs/pw",
    )
    assert config.state_dir == path.parent / "s"


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ('groups = ["store#42"]', "group 'store#42'"),
        ('groups = ["+"]', "group '+'"),
        ('device_id = "a/b"', "device_id"),
        ("[drift]\nwindow = -5", "[drift].window must be at least 100 rows"),
        ("[drift]\nmin_rows = 50", "[drift].min_rows must be at least 100 rows"),
        ("[drift]\nenabled = 1", "[drift].enabled must be true or false, got 1"),
        ("[telemetry]\ninterval = 0", "[telemetry].interval must be a number > 0, got 0"),
        ("[download]\nretries = true", "[download].retries must be a non-negative integer"),
        ("[download]\nread_timeout = -1", "[download].read_timeout must be a non-negative"),
        ("[capture]\nper_minute = 0", "[capture].per_minute must be an integer >= 1, got 0"),
        ("[mqtt]\nport = 1883", "[mqtt].command_keys is empty"),
        ('[mqtt]\nprotocol = "4"\ncommand_keys = ["k.pub"]', "[mqtt].protocol must be one of"),
        ('[mqtt]\nport = 70000\ncommand_keys = ["k.pub"]', "[mqtt].port must be an integer in"),
        ("[mqtt]\nreconnect_min = 90\ncommand_keys = ['k.pub']", "[mqtt].reconnect_min (90)"),
        ("[server]\nport = true", "[server].port must be an integer in [0, 65535], got True"),
        ("[limits]\nhealth_check_in_child = 1", "[limits].health_check_in_child must be true or"),
        ("mqtt = 5", "[mqtt] must be a table, got 5"),
        ("trusted_keys = []", "trusted_keys is empty"),
    ],
)
def test_bad_values_name_the_field(text: str, phrase: str, tmp_path: Path, keys: KeyPair) -> None:
    base = _base(keys)
    first = text.split(" =", 1)[0]
    if first in ("device_id", "trusted_keys"):
        base = "\n".join(line for line in base.splitlines() if not line.startswith(first)) + "\n"
    path = tmp_path / "agent.toml"
    path.write_text(base + text + "\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert phrase in str(caught.value)


# (table, a typo of one of its keys, the key it suggests)
TYPOS = [
    ("", "device_idd", "device_id"),
    ("", "mqt", "mqtt"),
    ("server", "max_request_byte", "max_request_bytes"),
    ("runtime", "provider", "providers"),
    ("limits", "max_install_attempt", "max_install_attempts"),
    ("mqtt", "comand_keys", "command_keys"),
    ("download", "retrys", "retries"),
    ("telemetry", "intervall", "interval"),
    ("drift", "windw", "window"),
    ("capture", "enable", "enabled"),
]


@pytest.mark.parametrize(("table", "typo", "meant"), TYPOS, ids=[t[0] or "top" for t in TYPOS])
def test_a_typo_in_any_table_fails_at_load_with_a_suggestion(
    table: str, typo: str, meant: str, tmp_path: Path, keys: KeyPair
) -> None:
    path = tmp_path / "agent.toml"
    value = "{}" if typo == "mqt" else "1"
    if table:
        mqtt = 'command_keys = ["k.pub"]\n' if table == "mqtt" else ""
        path.write_text(_base(keys) + f"[{table}]\n{mqtt}{typo} = {value}\n")
        where = f"[{table}].{typo}"
    else:
        path.write_text(f"{typo} = {value}\n" + _base(keys))
        where = repr(typo)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: unknown key {where} (did you mean {meant!r}?)"


def test_an_unknown_key_with_no_near_match_lists_the_known_ones(
    tmp_path: Path, keys: KeyPair
) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(_base(keys) + "[capture]\nzzz = 1\n")
    with pytest.raises(ConfigError, match=r"unknown key \[capture\]\.zzz; known: enabled, "):
        load_config(path)


def test_overrides_replace_required_fields(tmp_path: Path, keys: KeyPair) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(_base(keys).replace('state_dir = "s"\n', ""))
    with pytest.raises(ConfigError, match="missing required field 'state_dir'"):
        load_config(path)
    assert load_config(path, state_dir=tmp_path / "elsewhere").state_dir == tmp_path / "elsewhere"


def test_importing_the_config_loads_no_runtime_or_network_stack() -> None:
    import subprocess
    import sys

    probe = (
        "import sys, edgepack.agent._config; "
        "print(' '.join(m for m in ('onnxruntime', 'paho', 'httpx') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_experiments_bounds_come_from_the_config(tmp_path: Path, keys: KeyPair) -> None:
    """[experiments] sets the shadow queue and CPU share the agent gives experiments; out of
    range is a ConfigError naming the key."""
    from conftest import write_agent_config

    from edgepack.agent._daemon import Agent

    extra = "[experiments]\nshadow_queue = 3\nshadow_cpu_share = 0.5\n"
    agent = Agent(load_config(write_agent_config(tmp_path / "a", keys, extra=extra)))
    assert (agent.experiments.config.queue, agent.experiments.config.cpu_share) == (3, 0.5)
    wrong = write_agent_config(tmp_path / "b", keys, extra="[experiments]\nshadow_cpu_share = 2\n")
    with pytest.raises(ConfigError, match="shadow_cpu_share"):
        load_config(wrong)
