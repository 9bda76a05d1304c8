"""Every error the packager raises.

All of them derive from :class:`PackagerError`, itself an
:class:`edgepack.agent.exceptions.EdgepackError`, so the CLI catches one family and prints the
message. They are grouped by whose fault the failure is::

    EdgepackError                    (edgepack.agent.exceptions)
    ├── KeyFormatError               a signing key cannot be used (reused from the agent)
    └── PackagerError
        ├── ModelLoadError           input's fault: the model file is missing or corrupt
        ├── UntrustedPickleError     input's fault: a pickle, and --trust-pickle was not given
        ├── UnsupportedModelError    input's fault: no converter for this estimator class
        ├── ReferenceDataError       input's fault: reference data unreadable or not matching
        ├── ProfileError             input's fault: unknown or malformed device profile
        ├── ConversionError          build outcome: conversion to ONNX failed
        ├── OptimizationError        build outcome: graph optimization or quantization failed
        ├── ParityError              build outcome: packaged model diverges beyond tolerance
        ├── ReleaseError             misuse: that name+version+profile exists with other content
        └── BuildError               build outcome: one or more profiles failed

Misuse by the calling program raises the ordinary ``ValueError``/``TypeError``/``RuntimeError``.
"""

from __future__ import annotations

from typing import Any

from edgepack.formats.exceptions import EdgepackError, KeyFormatError

__all__ = [
    "BuildError",
    "ConversionError",
    "KeyFormatError",
    "ModelLoadError",
    "OptimizationError",
    "PackagerError",
    "ParityError",
    "ProfileError",
    "ReferenceDataError",
    "ReleaseError",
    "UnsupportedModelError",
    "UntrustedPickleError",
    "short_error",
]

PICKLE_WARNING = (
    "unpickling runs arbitrary code from the file; "
    "pass --trust-pickle only for files you produced yourself"
)


class PackagerError(EdgepackError):
    """Base of every packager error; its message is meant for the operator."""


# --- the input's fault -------------------------------------------------------------------------


class ModelLoadError(PackagerError):
    """The model file is missing, unreadable or corrupt."""


class UntrustedPickleError(PackagerError):
    """The model is a pickle and --trust-pickle was not given; unpickling runs arbitrary code."""

    @classmethod
    def for_path(cls, path: object) -> UntrustedPickleError:
        """The standard message for refusing ``path``."""
        return cls(f"{path}: refusing to load a pickle: {PICKLE_WARNING}")


class UnsupportedModelError(PackagerError):
    """No converter handles this estimator class; the message names the class."""


class ReferenceDataError(PackagerError):
    """The reference data is unreadable or does not match the model's inputs."""


class ProfileError(PackagerError):
    """A device profile is unknown or malformed; the message names the file and the field."""


# --- the build's outcome -----------------------------------------------------------------------


class ConversionError(PackagerError):
    """Converting the model to ONNX failed."""


class OptimizationError(PackagerError):
    """Optimizing or quantizing the ONNX graph failed."""


class ParityError(PackagerError):
    """The packaged model diverges from the source model beyond the profile's tolerance."""

    def __init__(self, message: str, report: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.report: dict[str, Any] = report if report is not None else {}

    def __reduce__(self) -> tuple[Any, ...]:  # keep .report across process boundaries
        return (type(self), (str(self), self.report))


class ReleaseError(PackagerError):
    """A bundle for this name, version and profile exists with different content (no --force)."""


def short_error(error: BaseException, limit: int = 300) -> str:
    """``Type: message`` cut to its first line and ``limit`` characters.

    Converters put whole attribute dumps (thousands of lines) into their messages; an operator
    needs the first line.
    """
    root = error
    while root.__cause__ is not None or root.__context__ is not None:
        root = root.__cause__ or root.__context__  # type: ignore[assignment]
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip()
    text = text.split(" and attributes=")[0]  # skl2onnx appends every attribute value
    if root is not error:
        text += f" (caused by {type(root).__name__}: {str(root).strip().splitlines()[0]})"
    return text if len(text) <= limit else text[: limit - 1] + "…"


class BuildError(PackagerError):
    """One or more profiles failed to build; ``failures`` maps profile id to the reason."""

    def __init__(self, failures: dict[str, str]) -> None:
        lines = "\n".join(f"  {pid}: {why}" for pid, why in sorted(failures.items()))
        super().__init__(f"{len(failures)} profile(s) failed:\n{lines}")
        self.failures = dict(failures)

    def __reduce__(self) -> tuple[Any, ...]:  # keep .failures across process boundaries
        return (type(self), (self.failures,))
