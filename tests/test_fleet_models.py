"""The model index: each version's state from the audit trail and the devices' states.

A real SQLite store; device states go in as the collector writes them, builds and commands
through the audit trail's own recorders, so the index reads what a running fleet would hold.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import KeyPair

from edgepack.fleet import _audit_facts as facts
from edgepack.fleet._cli import cli
from edgepack.fleet._database import FleetStore, open_store
from edgepack.fleet._model_index import model_history, model_index
from edgepack.formats.commands import make_command, read_command
from edgepack.formats.keys import load_private_key

T0 = dt.datetime(2026, 12, 1, 9, 0, tzinfo=dt.timezone.utc)


def at(minutes: float) -> dt.datetime:
    return T0 + dt.timedelta(minutes=minutes)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FleetStore]:
    opened = open_store(tmp_path / "fleet.db")
    yield opened
    opened.close()


def runs(store: FleetStore, device: str, models: dict[str, Any], minute: float) -> None:
    state = {
        "schema": 1,
        "online": True,
        "profile": "x86_64-cpu",
        "agent_version": "0.1.0",
        "groups": [],
        "models": models,
        "health": "ok",
        "ts": at(minute).isoformat(),
    }
    store.record_state(device, state, at(minute))


def command(store: FleetStore, keys: KeyPair, kind: str, model: str, minute: float,
            version: int | None = None) -> None:  # fmt: skip
    key = load_private_key(keys.private.read_bytes())
    bundles = {"x86_64-cpu": {"url": "http://127.0.0.1:1/b", "sha256": "c" * 64, "size": 9}}
    _job, raw = make_command(kind, model, {"group": "eu"}, key, version=version,
                             bundles=bundles if kind == "deploy" else None,
                             issued_at=at(minute))  # fmt: skip
    facts.record_command(store, read_command(raw, None), by="cli")


def build(store: FleetStore, model: str, version: int, minute: float) -> None:
    profile = {"sha256": f"{version:064d}", "size": 4096, "precision": "fp32",
               "parity": {"passed": True, "rows": 75}, "signer": "k" * 16,
               "source": {"sha256": "s" * 64}}  # fmt: skip
    facts.record_build(store, model, version, {"x86_64-cpu": profile}, at(minute))


def test_states_active_superseded_retired_and_built(store: FleetStore, keys: KeyPair) -> None:
    for version in (1, 2, 3):
        build(store, "iris", version, version)
    command(store, keys, "deploy", "iris", 10, version=1)
    command(store, keys, "deploy", "iris", 20, version=2)
    build(store, "churn", 5, 0)
    command(store, keys, "deploy", "churn", 30, version=5)
    command(store, keys, "retire", "churn", 40)
    store.assign("cam-1", ["eu"], at(0))
    store.assign("cam-2", ["eu", "canary"], at(0))
    runs(store, "cam-1", {"iris": {"active": 2, "previous": 1}}, 50)
    runs(store, "cam-2", {"iris": {"active": 2, "previous": 1}}, 50)
    runs(store, "cam-3", {"iris": {"active": 1, "previous": None}}, 50)  # assigned nowhere

    rows = {(r.model, r.version): r for r in model_index(store)}
    assert {k: r.state for k, r in rows.items()} == {
        ("churn", 5): "retired",  # deployed, then the model was retired
        ("iris", 1): "active",  # cam-3 still runs it
        ("iris", 2): "active",
        ("iris", 3): "built",  # never deployed
    }
    v2 = rows[("iris", 2)]
    assert v2.devices == ["cam-1", "cam-2"]
    assert v2.groups == {"canary": 1, "eu": 2}
    assert v2.profiles["x86_64-cpu"]["precision"] == "fp32"
    assert v2.signers == ["k" * 16]
    assert v2.built_at == at(2)
    assert rows[("iris", 1)].groups == {"": 1}
    assert rows[("iris", 1)].previous_on == ["cam-1", "cam-2"]

    runs(store, "cam-3", {"iris": {"active": 2, "previous": 1}}, 60)  # it upgrades too
    rows = {(r.model, r.version): r for r in model_index(store)}
    assert rows[("iris", 1)].state == "superseded"
    history = [(e.kind, e.version) for e in model_history(store, "churn")]
    assert history == [("build", 5), ("command", 5), ("command", None)]


def test_models_cli_lists_and_shows(store: FleetStore, keys: KeyPair, tmp_path: Path) -> None:
    build(store, "iris", 1, 0)
    command(store, keys, "deploy", "iris", 10, version=1)
    runs(store, "cam-1", {"iris": {"active": 1, "previous": None}}, 20)

    def invoke(*args: str) -> Any:
        return CliRunner().invoke(cli, ["--store", str(tmp_path / "fleet.db"), *args])

    listed = invoke("models", "--json")
    assert listed.exit_code == 0, listed.output
    (row,) = json.loads(listed.output)
    assert (row["model"], row["version"], row["state"], row["devices"]) == (
        "iris", 1, "active", ["cam-1"],
    )  # fmt: skip
    table = invoke("models")
    assert "x86_64-cpu fp32 4 KiB parity ok" in table.output
    assert "file sssssssssss" in table.output  # the source file's sha256
    shown = invoke("models", "show", "iris")
    assert shown.exit_code == 0
    assert "iris@1: active on 1 device(s)" in shown.output
    unknown = invoke("models", "show", "nope")
    assert unknown.exit_code == 1
    assert "no model 'nope'" in unknown.output
