"""``edgepack-fleet console``: serve the live fleet console (edgepack.fleet._console) with uvicorn.

Bound to 127.0.0.1 by default. Bound to any other address it refuses to start without
``--token-file`` (a file holding one line of random text, the token every request must carry).
``--operator-key`` turns on the actions (rollback, cancel, pause/resume, approve), which sign
with that key and also need the token. Registered on :data:`edgepack.fleet._cli.cli`, whose
helpers (broker, store, clock, one-line errors) it shares.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import click

from edgepack.fleet._cli import _broker, _fail, _key, _store, cli, console

__all__ = ["is_loopback", "read_token"]


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def read_token(path: Path) -> str:
    """The token in ``path`` (its first line, stripped); at least 16 characters."""
    try:
        token = path.read_text(encoding="utf-8").strip().splitlines()[0].strip()
    except (OSError, UnicodeDecodeError, IndexError) as e:
        _fail(
            f"cannot read a token from {path}: {e or 'it is empty'}; write one line of random "
            "text into it, e.g. `python3 -c 'import secrets; print(secrets.token_urlsafe())' "
            f"> {path}`"
        )
        raise  # unreachable
    if len(token) < 16:
        _fail(f"the token in {path} is {len(token)} characters; use at least 16 of random text")
    return token


@cli.command(name="console")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A file holding the token every request must carry (required off loopback).",
)
@click.option(
    "--operator-key",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Operator signing key: enables the actions (needs --token-file too).",
)
@click.option(
    "--refresh",
    type=click.FloatRange(min=0.1),
    default=2.0,
    show_default=True,
    help="Seconds between two live updates of a page.",
)
@click.pass_context
def console_command(
    ctx: click.Context,
    host: str,
    port: int,
    token_file: Path | None,
    operator_key: Path | None,
    refresh: float,
) -> None:
    """Serve the live fleet console: devices, jobs and rollouts, drift and quality, models, audit.

    Read-only unless --operator-key is given; every request needs the token of --token-file
    when one is given (always, when bound to anything but loopback).
    """
    import uvicorn

    from edgepack.fleet._console import Actions, create_app

    if not is_loopback(host) and token_file is None:
        _fail(
            f"refusing to serve the console on {host} without a token: anyone who can reach "
            "it could read the fleet; give --token-file FILE, or bind --host 127.0.0.1",
            2,
        )
    token = None if token_file is None else read_token(token_file)
    if operator_key is not None and token is None:
        _fail(
            "--operator-key lets the console sign commands: give --token-file FILE too, so "
            "only those with the token can act",
            2,
        )
    actions = None if operator_key is None else Actions(_key(operator_key), _broker(ctx))
    app = create_app(
        _store(ctx), token=token, actions=actions, clock=ctx.obj["clock"], refresh=refresh
    )
    shown = f"[{host}]" if ":" in host else host
    mode = "read-only" if actions is None else f"actions signed by key {actions.key_id}"
    console.print(
        f"console on http://{shown}:{port}/ ({mode}"
        f"{', token required' if token else ''}); Ctrl-C to stop"
    )
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
