"""The ``edgepack`` command: keygen, profiles, build, verify, inspect.

A thin layer over :mod:`edgepack.packager._build` and :mod:`edgepack.formats.bundle`: it parses
arguments, shows progress and tables with rich, and turns every
:class:`~edgepack.agent.exceptions.EdgepackError` into one red line and a non-zero exit code (1 for
a failed build or verification, 2 for bad usage). ``build`` writes its log (library warnings
included) to ``OUT/NAME-VERSION.build.log`` rather than the terminal; ``build --explain`` and
``inspect`` show the precision candidates that were measured, as a table.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgepack.formats.bundle import MANIFEST_FILE, ArchiveLimits, read_archive, verify_bundle_file
from edgepack.formats.exceptions import EdgepackError, KeyFormatError
from edgepack.formats.keys import (
    generate_private_key,
    load_public_key,
    private_key_pem,
    public_key_pem,
)
from edgepack.formats.manifest import parse_manifest

__all__ = ["main"]

# Without a terminal rich assumes 80 columns; tables read better wider in logs and CI.
_WIDTH = None if sys.stdout.isatty() else 160
console = Console(highlight=False, width=_WIDTH)
err = Console(stderr=True, highlight=False, width=_WIDTH)


def _fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    sys.exit(code)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


_SHORT = {
    "label_agreement": "labels",
    "p99_probability_error": "p99 Δp",
    "max_probability_error": "max Δp",
    "p99_relative_error": "p99 Δ",
    "max_relative_error": "max Δ",
}


def _ms(value: Any) -> str:
    return "-" if value is None else f"{float(value):.3f}"


def candidates_table(candidates: Sequence[Mapping[str, Any]], title: str = "") -> Table:
    """The precision candidates of one profile: size, latency, speed-up, parity, verdict."""
    table = Table(
        "candidate", "size", "b1 ms", "b64 ms", "vs fp32 b1/b64", "parity", "verdict",
        title=title or None, title_justify="left",
    )  # fmt: skip
    for c in candidates:
        latency, speedup = c.get("latency_ms") or {}, c.get("speedup") or {}
        parity = c.get("parity") or {}
        figures = [
            f"{_SHORT[k]} {v:.2%}" if k == "label_agreement" else f"{_SHORT[k]} {v:.1e}"
            for k, v in parity.items()
            if k in _SHORT and isinstance(v, (int, float))
        ]
        status = "[green]pass[/]" if parity.get("passed") else "[red]fail[/]"
        status = status if parity else "-"
        table.add_row(
            ("[bold]" if c.get("chosen") else "") + str(c.get("name")),
            _size(c.get("model_bytes")),
            _ms(latency.get("1")),
            _ms(latency.get("64")),
            "/".join(f"{float(speedup[b]):.2f}x" for b in ("1", "64") if b in speedup) or "-",
            f"{status} {escape(', '.join(figures))}".strip(),
            escape(str(c.get("error") or c.get("verdict") or "")),
        )
    return table


class _Records(logging.Handler):
    """Keeps formatted log records in memory until the build knows where its log goes."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@contextmanager
def _build_log(path: Path) -> Iterator[None]:
    """Everything logged while building (library warnings too) goes to ``path``, not stderr.

    The file is written only if the build wrote into its directory: a refused build leaves
    nothing behind.
    """
    handler = _Records()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        if path.parent.is_dir() and any(path.parent.iterdir()):
            path.write_text("".join(f"{line}\n" for line in handler.lines), encoding="utf-8")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgepack")
def cli() -> None:
    """Package trained models into signed bundles for edge devices."""


@cli.command()
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=Path("keys"),
    show_default=True,
    help="Directory for signing.key and signing.pub.",
)
@click.option("--name", default="signing", show_default=True, help="File stem of the key pair.")
@click.option("--force", is_flag=True, help="Overwrite an existing key pair.")
def keygen(out_dir: Path, name: str, force: bool) -> None:
    """Create an ECDSA P-256 signing key (mode 0600) and its public key."""
    private, public = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    if private.exists() and not force:
        _fail(
            f"{private} already exists; pass --force to replace it (bundles signed with the old "
            "key will then no longer verify against the new public key)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    key = generate_private_key()
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_key_pem(key))
    os.chmod(private, 0o600)
    public.write_bytes(public_key_pem(key))
    console.print(f"signing key  {private}  (keep it secret; mode 0600)")
    console.print(f"public key   {public}  (give it to devices and verifiers)")


@cli.command()
@click.option(
    "--profile-dir",
    "profile_dirs",
    multiple=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Extra directory of profile TOML files (overrides built-ins with the same id).",
)
def profiles(profile_dirs: tuple[Path, ...]) -> None:
    """List the device profiles edgepack knows."""
    from edgepack.packager._profiles import load_profiles

    try:
        known = load_profiles(profile_dirs)
    except EdgepackError as e:
        _fail(str(e), 2)
    table = Table("id", "arch", "providers", "tree/linear/neural", "opset", "description")
    for profile in sorted(known.values(), key=lambda p: p.id):
        table.add_row(
            profile.id,
            "/".join(profile.arch),
            ", ".join(p.removesuffix("ExecutionProvider") for p in profile.providers),
            "/".join(profile.precision_for(f) for f in ("tree", "linear", "neural")),
            str(profile.max_opset),
            profile.description,
        )
    console.print(table)


@cli.command()
@click.argument("model")
@click.option("--name", required=True, help="Model name (letters, digits, '.', '_', '-').")
@click.option(
    "--version",
    "version",
    required=True,
    type=int,
    help="Release counter: an integer that only grows.",
)
@click.option(
    "--profile",
    "profile_ids",
    multiple=True,
    required=True,
    help="Device profile id; repeat for several (see `edgepack profiles`).",
)
@click.option(
    "--reference",
    required=True,
    type=click.Path(path_type=Path),
    help="Reference rows matching the model's inputs (.csv, .parquet or .npy).",
)
@click.option(
    "--key",
    required=True,
    type=click.Path(path_type=Path),
    help="ECDSA signing key (from `edgepack keygen`).",
)
@click.option(
    "--out", "out_dir", type=click.Path(path_type=Path), default=Path("dist"), show_default=True
)
@click.option(
    "--trust-pickle",
    is_flag=True,
    help="Allow loading .joblib/.pkl models. Unpickling runs code: only for your files.",
)
@click.option(
    "--profile-dir", "profile_dirs", multiple=True, type=click.Path(path_type=Path, file_okay=False)
)
@click.option(
    "--columns",
    default=None,
    help="The model's input columns in order, comma-separated (for a model trained without "
    "feature names, or a .npy reference).",
)
@click.option(
    "--target",
    default=None,
    help="The reference column with the ground truth (true label or value): the bundle then "
    "carries the model's held-out quality (quality.json) for the device to compare with.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace an existing bundle of this name, version and profile with different content.",
)
@click.option("--explain", is_flag=True, help="Show every precision candidate measured.")
def build(
    model: str,
    name: str,
    version: int,
    profile_ids: tuple[str, ...],
    reference: Path,
    key: Path,
    out_dir: Path,
    trust_pickle: bool,
    profile_dirs: tuple[Path, ...],
    columns: str | None,
    target: str | None,
    force: bool,
    explain: bool,
) -> None:
    """Build one signed bundle per device profile from MODEL.

    MODEL is an .onnx or joblib file, or an MLflow model: models:/NAME/VERSION or
    runs:/RUN_ID/PATH (needs the mlflow extra; MLFLOW_TRACKING_URI says where).
    """
    from edgepack.packager._build import BuildRequest
    from edgepack.packager._build import build as run_build

    source: Path | str = model if model.startswith(("models:/", "runs:/")) else Path(model)
    request = BuildRequest(
        model=source,
        name=name,
        version=version,
        profiles=profile_ids,
        reference=reference,
        key=key,
        out_dir=out_dir,
        trust_pickle=trust_pickle,
        profile_dirs=profile_dirs,
        columns=[c.strip() for c in columns.split(",") if c.strip()] if columns else None,
        force=force,
        target=target,
    )
    log_path = out_dir / f"{name}-{version}.build.log"
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description:<18}"),
        BarColumn(),
        TextColumn("{task.fields[step]}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )
    steps = ("converting", "optimizing", "checking parity", "signing", "done")
    tasks: dict[str, TaskID] = {}

    def on_step(profile_id: str, step: str) -> None:
        done = next((i for i, s in enumerate(steps) if step.startswith(s)), 0)
        progress.update(tasks[profile_id], completed=done, step=step)

    started = time.perf_counter()
    try:
        with progress, _build_log(log_path):
            for pid in dict.fromkeys(profile_ids):
                tasks[pid] = progress.add_task(pid, total=len(steps) - 1, step="waiting")
            results = run_build(request, on_step)
    except EdgepackError as e:
        _fail(str(e))
    except ValueError as e:
        _fail(str(e), 2)
    total = time.perf_counter() - started

    shared = results[0].shared_seconds if results else 0.0
    table = Table(
        "profile", "precision", "size", "parity", "on target", "time", "bundle",
        caption=f"whole build {total:.1f}s: shared {shared:.1f}s (model, reference rows, drift "
        f"calibration) + profiles; log {log_path}",
        caption_justify="left",
    )  # fmt: skip
    for r in results:
        if r.ok:
            table.add_row(
                r.profile,
                f"{r.precision} ({r.chosen})" if r.chosen else r.precision,
                _size(r.bundle_bytes),
                f"[green]ok[/] {r.parity.summary() if r.parity else ''}",
                "yes" if r.target_verified else "[yellow]not verified[/]",
                f"{r.seconds:.1f}s",
                (r.bundle.name if r.bundle else "-") + (" (unchanged)" if r.unchanged else ""),
            )
        else:
            table.add_row(
                r.profile, r.precision or "-", "-", "[red]FAILED[/]", "-", f"{r.seconds:.1f}s", "-"
            )
    console.print(table)
    if explain:
        for r in results:
            if r.candidates:
                console.print(candidates_table(r.candidates, f"{r.profile}: candidates measured"))
            if r.ok and r.fixed_batch is not None:
                console.print(
                    f"{r.profile}: the model takes exactly {r.fixed_batch} row(s) per run; the "
                    "candidates were measured, and the agent serves it, in chunks of that size"
                )
    for r in results:
        for note in r.notes:
            err.print(f"[yellow]{r.profile}:[/] {escape(note)}")
    failed = [r for r in results if not r.ok]
    for r in failed:
        err.print(f"[bold red]{r.profile} failed:[/] {escape(str(r.error))}")
        if r.report:
            err.print(f"  rows where it diverged: {escape(str(r.report))}")
    if failed:
        sys.exit(1)


def _public_keys(paths: tuple[Path, ...]) -> list:
    keys = []
    for path in paths:
        try:
            keys.append(load_public_key(path.read_bytes(), source=str(path)))
        except OSError as e:
            raise KeyFormatError(f"cannot read public key {path}: {e.strerror or e}") from e
    return keys


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option(
    "--pub",
    "pubs",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path),
    help="Trusted public key; repeat to trust several.",
)
def verify(bundle: Path, pubs: tuple[Path, ...]) -> None:
    """Check BUNDLE's signature against trusted public keys."""
    try:
        verified = verify_bundle_file(bundle, _public_keys(pubs))
    except EdgepackError as e:
        _fail(f"{bundle}: {e}")
    m = verified.manifest
    console.print(
        f"[green]OK[/] {bundle}: {m.name} v{m.version} for {m.profile}, "
        f"{len(verified.signature.files)} files signed by key "
        f"{verified.signature.key_id[:16]}…"
    )


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the raw manifest.")
def inspect(bundle: Path, as_json: bool) -> None:
    """Show what BUNDLE holds (the signature is not checked: use `verify`)."""
    try:
        _, files = read_archive(bundle.read_bytes(), ArchiveLimits())
        manifest = parse_manifest(files.get(MANIFEST_FILE, b""))
    except OSError as e:
        _fail(f"cannot read {bundle}: {e.strerror or e}")
    except EdgepackError as e:
        _fail(f"{bundle}: {e}")
    if as_json:
        console.print_json(files[MANIFEST_FILE].decode())
        return
    m = manifest
    table = Table(show_header=False, box=None)
    parity = m.parity
    rows = [
        ("model", f"{m.name} v{m.version} ({m.task}, {m.family})"),
        ("profile", m.profile),
        ("precision", m.precision + (f"  {json.dumps(m.quantization)}" if m.quantization else "")),
        ("inputs", "; ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in m.inputs)),
        ("outputs", "; ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in m.outputs)),
        (
            "batch",
            "any (dynamic)"
            if m.fixed_batch is None
            else f"fixed at {m.fixed_batch} row{'s' if m.fixed_batch != 1 else ''} per run "
            "(the agent splits and pads requests)",
        ),
        (
            "parity",
            ("passed " if parity.get("passed") else "FAILED ")
            + json.dumps({k: v for k, v in parity.get("metrics", {}).items() if v is not None}),
        ),
        (
            "verified on",
            "target hardware"
            if parity.get("target_verified")
            else parity.get("note", "not verified on target hardware"),
        ),
        ("source", f"{m.source.get('model')} sha256:{str(m.source.get('sha256'))[:16]}…"),
        ("created", f"{m.created} by edgepack {m.packager_version}"),
        ("files", ", ".join(f"{n} ({_size(len(b))})" for n, b in sorted(files.items()))),
        ("signature", "present (not checked; run `edgepack verify`)"),
    ]
    for key, value in rows:
        table.add_row(f"[bold]{key}[/]", value)
    console.print(table)
    if m.candidates:
        console.print(candidates_table(m.candidates, "candidates measured at build time"))


def main() -> None:
    """Console-script entry point."""
    cli()


if __name__ == "__main__":
    main()
