"""Does a verified bundle fit this device? A pure check of the manifest against device facts.

The packager writes each profile's constraints into ``manifest.compatibility``; the agent learns
its own facts once (:func:`device_facts`: CPU architecture, onnxruntime version and execution
providers) and :func:`check_compatible` compares the two. No I/O, so it is trivially testable.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from edgepack.agent.exceptions import BundleError, IncompatibleBundleError
from edgepack.formats.manifest import Manifest

__all__ = ["DeviceFacts", "check_compatible", "check_deploy", "device_facts"]

_ARCH_ALIASES = {"amd64": "x86_64", "arm64": "aarch64", "armv8l": "aarch64"}


@dataclass(frozen=True)
class DeviceFacts:
    """What this device is, as far as a bundle cares."""

    profile: str
    arch: str
    onnxruntime: str
    providers: tuple[str, ...]


def device_facts(profile: str) -> DeviceFacts:
    """Read this machine's architecture, onnxruntime version and available providers."""
    import onnxruntime as ort

    machine = platform.machine().lower()
    return DeviceFacts(
        profile=profile,
        arch=_ARCH_ALIASES.get(machine, machine),
        onnxruntime=ort.__version__,
        providers=tuple(ort.get_available_providers()),
    )


def check_compatible(manifest: Manifest, device: DeviceFacts) -> None:
    """Raise :class:`IncompatibleBundleError` unless the bundle was built for this device.

    Checks the profile id, the CPU architecture, the onnxruntime version range, and that at least
    one of the bundle's execution providers exists here.
    """
    what = f"{manifest.name} v{manifest.version}"
    if manifest.profile != device.profile:
        raise IncompatibleBundleError(
            f"{what} was built for profile {manifest.profile!r}, but this device is "
            f"{device.profile!r}; deploy the {device.profile} bundle instead"
        )
    compat = manifest.compatibility
    arches = compat.get("arch", [])
    if isinstance(arches, str):
        arches = [arches]
    if arches and device.arch not in arches:
        raise IncompatibleBundleError(
            f"{what} targets {'/'.join(arches)} CPUs, this device is {device.arch}"
        )
    spec = compat.get("onnxruntime")
    if spec:
        try:
            fits = Version(device.onnxruntime) in SpecifierSet(spec)
        except (InvalidSpecifier, InvalidVersion) as e:
            raise IncompatibleBundleError(f"{what}: bad onnxruntime range {spec!r}: {e}") from e
        if not fits:
            raise IncompatibleBundleError(
                f"{what} needs onnxruntime {spec}, this device has {device.onnxruntime}; "
                "upgrade onnxruntime or rebuild for this runtime"
            )
    wanted = manifest.runtime.get("providers") or compat.get("providers") or []
    if wanted and not set(wanted) & set(device.providers):
        raise IncompatibleBundleError(
            f"{what} runs on {', '.join(wanted)}, none of which this device has "
            f"({', '.join(device.providers)})"
        )


def check_deploy(manifest: Manifest, model: str | None, version: int | None) -> None:
    """The signed manifest must be what a deploy named: a deploy saying v4 whose sha256 points
    at v5's bytes is refused, not installed. ``None`` means the deploy did not say. No I/O.

    Raises:
        BundleError: the manifest's name or version is not the deploy's.
    """
    if (model is None or model == manifest.name) and version in (None, manifest.version):
        return
    said = f"{model or manifest.name}" + (f" v{version}" if version is not None else "")
    raise BundleError(
        f"the deploy names {said}, but its bundle is {manifest.name} v{manifest.version}; "
        "refusing it (a deploy's model and version must match the bundle it points at: fix the "
        "deploy command)"
    )
