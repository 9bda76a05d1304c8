"""Device profiles: the shipped ones load, and every malformed profile names its file and field."""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from edgepack.packager._profiles import (
    DEFAULT_PROFILE_DIR,
    FAMILIES,
    PRECISIONS,
    Profile,
    get_profile,
    load_profile,
    load_profiles,
)
from edgepack.packager.exceptions import PackagerError, ProfileError

REQUIRED_IDS = {"x86_64-cpu", "x86_64-vnni-cpu", "arm64-cpu", "nvidia-gpu"}
BASE = (DEFAULT_PROFILE_DIR / "x86_64-cpu.toml").read_text(encoding="utf-8")


def _write(directory: Path, stem: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stem}.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _sub(old: str, new: str, text: str = BASE) -> str:
    """Replace the line that starts with ``old`` (a TOML key or header) by ``new``."""
    pattern = re.compile(rf"^{re.escape(old)}.*$", re.MULTILINE)
    assert pattern.search(text), old
    return pattern.sub(lambda _: new, text, count=1)


def test_shipped_profiles_load() -> None:
    profiles = load_profiles()
    assert set(profiles) >= REQUIRED_IDS
    for pid, profile in profiles.items():
        assert isinstance(profile, Profile)
        assert profile.id == pid == profile.source.stem
        assert set(profile.precision) == set(FAMILIES)
        for family in FAMILIES:
            assert profile.tolerance_for(profile.precision_for(family))
        assert profile.tolerance_for("fp32").min_label_agreement >= 0.999
        json.dumps(profile.compatibility())


def test_shipped_profile_choices() -> None:
    assert get_profile("x86_64-cpu").quantization.reduce_range is True
    assert get_profile("x86_64-vnni-cpu").quantization.reduce_range is False
    arm = get_profile("arm64-cpu")
    assert arm.arch == ("aarch64",)
    assert arm.threads.intra_op == 4
    gpu = get_profile("nvidia-gpu")
    assert gpu.arch == ("x86_64", "aarch64")
    assert gpu.precision_for("neural") == "fp16"
    assert gpu.providers[-1] == "CPUExecutionProvider"


def test_compatibility_is_json_ready() -> None:
    compat = get_profile("nvidia-gpu").compatibility()
    assert compat == json.loads(json.dumps(compat))
    assert compat["profile"] == "nvidia-gpu"
    assert compat["arch"] == ["x86_64", "aarch64"]
    assert set(compat) == {
        "profile",
        "arch",
        "providers",
        "onnxruntime",
        "max_opset",
        "max_ml_opset",
        "max_ir_version",
    }


def test_profile_pickles() -> None:
    profile = get_profile("arm64-cpu")  # the builder may hand profiles to worker processes
    assert pickle.loads(pickle.dumps(profile)) == profile


def test_misuse_raises_value_error() -> None:
    profile = get_profile("x86_64-cpu")
    with pytest.raises(ValueError, match="family"):
        profile.precision_for("forest")
    with pytest.raises(ValueError, match="precision"):
        profile.tolerance_for("int4")
    assert set(PRECISIONS) == {"fp32", "int8", "fp16"}


def test_missing_optional_tolerance_table(tmp_path: Path) -> None:
    path = _write(tmp_path, "x86_64-cpu", _drop_table("tolerances.fp16"))
    profile = load_profile(path)
    with pytest.raises(ProfileError, match=r"\[tolerances\.fp16\]"):
        profile.tolerance_for("fp16")


def _drop_table(header: str, text: str = BASE) -> str:
    """Remove the table ``[header]`` and its keys, up to the next table."""
    return re.sub(rf"^\[{re.escape(header)}\]$.*?(?=^\[|\Z)", "", text, flags=re.M | re.S)


def _edit(old: str, new: str) -> Callable[[], str]:
    return lambda: _sub(old, new)


# fmt: off
MALFORMED = [
    # (case, make the bad TOML text, field the message must name)
    ("wrong type", _edit("max_opset =", 'max_opset = "17"'), "max_opset"),
    ("bool is not int", _edit("calibration_samples =", "calibration_samples = true"),
     "[quantization].calibration_samples"),
    ("wrong type in table", _edit("per_channel =", 'per_channel = "yes"'),
     "[quantization].per_channel"),
    ("out-of-range tolerance", _edit("min_label_agreement = 0.995", "min_label_agreement = 1.5"),
     "[tolerances.int8].min_label_agreement"),
    ("negative tolerance", _edit("max_relative_error = 0.01", "max_relative_error = -0.01"),
     "[tolerances.int8].max_relative_error"),
    ("unknown key", _edit("other =", 'other = "fp32"\nneurall = "int8"'), "[precision].neurall"),
    ("unknown top-level key", _edit("model_format =", 'model_format = "onnx"\nmax_opsets = 3'),
     "max_opsets"),
    ("unknown precision", _edit("neural =", 'neural = "int4"'), "[precision].neural"),
    ("unknown tolerance table", _edit("[tolerances.fp16]", "[tolerances.bf16]"),
     "[tolerances].bf16"),
    ("bad enum", _edit("weight_type =", 'weight_type = "int4"'), "[quantization].weight_type"),
    ("bad specifier", _edit("onnxruntime =", 'onnxruntime = "1.17+"'), "onnxruntime"),
    ("empty specifier", _edit("onnxruntime =", 'onnxruntime = ""'), "onnxruntime"),
    ("unknown arch", _edit("arch =", 'arch = ["x86_64", "riscv64"]'), "arch"),
    ("empty providers", _edit("providers =", "providers = []"), "providers"),
    ("missing field", _edit("max_ir_version =", ""), "max_ir_version"),
    ("missing table field", _edit("inter_op =", ""), "[threads].inter_op"),
    ("missing table", lambda: _drop_table("budgets"), "[budgets]"),
    ("schema version", _edit("schema =", "schema = 2"), "schema"),
    ("TOML syntax error", _edit("max_opset =", "max_opset = = 17"), "line"),
    ("id differs from file name", _edit("id =", 'id = "x86-cpu"'), "id"),
    ("qoperator with int8 activations", _edit("format =", 'format = "qoperator"'),
     "[quantization].activation_type"),
    ("no tolerance for a used precision",
     lambda: _drop_table("tolerances.fp16", _sub("neural =", 'neural = "fp16"')),
     "[tolerances.fp16]"),
]
# fmt: on


@pytest.mark.parametrize(
    ("make_text", "field"),
    [pytest.param(make, field, id=case) for case, make, field in MALFORMED],
)
def test_malformed_profile_names_file_and_field(
    tmp_path: Path, make_text: Callable[[], str], field: str
) -> None:
    path = _write(tmp_path, "x86_64-cpu", make_text())
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert field in message


def test_syntax_error_gives_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "x86_64-cpu", _sub("max_opset =", "max_opset = = 17"))
    line = 1 + BASE.splitlines().index(next(x for x in BASE.splitlines() if "max_opset" in x))
    with pytest.raises(ProfileError, match=rf"line {line}\b"):
        load_profile(path)


def test_qoperator_with_uint8_activations_is_allowed(tmp_path: Path) -> None:
    text = _sub("format =", 'format = "qoperator"')
    text = _sub("activation_type =", 'activation_type = "uint8"', text)
    profile = load_profile(_write(tmp_path, "x86_64-cpu", text))
    assert profile.quantization.format == "qoperator"


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ProfileError, match=re.escape(str(missing))):
        load_profile(missing)


def test_user_dir_overrides_and_adds(tmp_path: Path) -> None:
    _write(tmp_path, "x86_64-cpu", _sub("max_opset =", "max_opset = 15"))
    _write(tmp_path, "my-board", _sub("id =", 'id = "my-board"'))
    profiles = load_profiles([tmp_path])
    assert set(profiles) >= REQUIRED_IDS
    assert profiles["x86_64-cpu"].max_opset == 15
    assert profiles["x86_64-cpu"].source.parent == tmp_path
    assert profiles["my-board"].id == "my-board"
    assert profiles["arm64-cpu"].source.parent == DEFAULT_PROFILE_DIR
    assert get_profile("my-board", [tmp_path]).max_opset == 17


def test_later_dir_wins(tmp_path: Path) -> None:
    _write(tmp_path / "a", "x86_64-cpu", _sub("max_opset =", "max_opset = 15"))
    _write(tmp_path / "b", "x86_64-cpu", _sub("max_opset =", "max_opset = 16"))
    assert get_profile("x86_64-cpu", [tmp_path / "a", tmp_path / "b"]).max_opset == 16


def test_missing_user_dir(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="does not exist"):
        load_profiles([tmp_path / "absent"])


def test_unknown_id_lists_known_ones() -> None:
    with pytest.raises(ProfileError) as info:
        get_profile("riscv-cpu")
    message = str(info.value)
    assert "riscv-cpu" in message
    for pid in REQUIRED_IDS:
        assert pid in message
    assert isinstance(info.value, PackagerError)
