"""agent.toml: the shipped example parses in every section; bad values name the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO, KeyPair

from edgepack.agent._capture import CaptureConfig
from edgepack.agent._config import load_config
from edgepack.agent._download import download_config
from edgepack.agent._fleet_link import MqttConfig
from edgepack.agent._monitor import MonitorConfig
from edgepack.agent.exceptions import ConfigError


def test_the_shipped_example_parses_in_every_section(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text((REPO / "scripts" / "agent.example.toml").read_text())
    config = load_config(path)
    assert (config.device_id, config.profile, config.groups) == (
        "cam-17",
        "arm64-cpu",
        ("store-42",),
    )
    assert config.server.host == "127.0.0.1"
    mqtt = MqttConfig.from_agent(config.extra["mqtt"], str(path), path.parent)
    assert mqtt.tls
    assert mqtt.protocol == "5"
    assert mqtt.command_keys
    assert MonitorConfig.from_extra(config.extra, str(path)).window == 500
    assert not CaptureConfig.from_extra(config.extra, str(path)).enabled
    assert download_config(config).retries == 5


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ('groups = ["store#42"]', "group 'store#42'"),
        ('groups = ["+"]', "group '+'"),
        ('device_id = "a/b"', "device_id"),
        ("[drift]\nwindow = -5", "[drift].window"),
        ("[telemetry]\nspeed = 1", "unknown key [telemetry].speed"),
        ("[download]\nretries = true", "[download].retries"),
        ("[mqtt]\nport = 1883", "[mqtt].command_keys is empty"),
        ('[mqtt]\nprotocol = "4"\ncommand_keys = ["k.pub"]', "[mqtt].protocol"),
    ],
)
def test_bad_values_name_the_field(text: str, phrase: str, tmp_path: Path, keys: KeyPair) -> None:
    base = (
        f'device_id = "cam-1"\nprofile = "x86_64-cpu"\nstate_dir = "s"\n'
        f'trusted_keys = ["{keys.public}"]\n'
    )
    if text.startswith("device_id"):
        base = base.replace('device_id = "cam-1"\n', "")
    path = tmp_path / "agent.toml"
    path.write_text(base + text + "\n")
    with pytest.raises(ConfigError) as caught:
        _load_everything(path)
    assert phrase in str(caught.value)


def _load_everything(path: Path) -> None:
    """What the agent reads at start, section by section."""
    config = load_config(path)
    MonitorConfig.from_extra(config.extra, str(path))
    download_config(config)
    if "mqtt" in config.extra:
        MqttConfig.from_agent(config.extra["mqtt"], str(path), path.parent)
