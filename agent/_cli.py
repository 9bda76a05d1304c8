"""``edgepack-agent``: install, serve and inspect models on this device.

Needs only the agent's dependencies (standard-library argparse, no rich/click), so it runs on a
device that installed ``edgepack[agent]``. Every command reads the same ``agent.toml``
(``--config``, or ``$EDGEPACK_AGENT_CONFIG``, or ``/etc/edgepack/agent.toml``), all of it, so a
mistake in any table is reported by whichever command runs first. Errors print one line starting
with ``error:`` and exit 1 (2 for bad usage or configuration). A failure of the device's own
storage (full disk, permissions) says so, apart from a bundle that was refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgepack.agent.exceptions import ConfigError, EdgepackError, StorageError

__all__ = ["main"]

DEFAULT_CONFIG = Path("/etc/edgepack/agent.toml")


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers, *[[("-" if c is None else str(c)) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _agent(args: argparse.Namespace) -> Any:
    from edgepack.agent._config import load_config
    from edgepack.agent._daemon import Agent

    overrides = {"state_dir": Path(args.state_dir).resolve()} if args.state_dir else {}
    config = load_config(Path(args.config), **overrides)
    if config.mqtt is None:
        return Agent(config)  # an offline device copies local files: no HTTP stack in memory
    from edgepack.agent._download import HttpFetcher

    return Agent(config, fetcher=HttpFetcher(config.download))  # fleet jobs name URLs


def _print_outcome(outcome: Any) -> int:
    what = f"{outcome.model} v{outcome.version}" if outcome.model else "bundle"
    if outcome.ok:
        before = (
            f" (was v{outcome.from_version})"
            if outcome.from_version not in (None, outcome.version)
            else ""
        )
        print(f"{outcome.result}: {what}{before}")
        return 0
    result = outcome.result
    if isinstance(outcome.error, StorageError) and result == "rejected":
        result = f"{outcome.op} failed on this device's storage"  # the bundle was not refused
    print(f"error: {result}: {what}: {outcome.reason}", file=sys.stderr)
    return 1


def _recover(agent: Any) -> None:
    """Finish an interrupted operation first, and say so."""
    outcome = agent.lifecycle.recover()
    if outcome is not None:
        print(f"recovered an interrupted {outcome.op}: ", end="")
        _print_outcome(outcome)


def cmd_install(args: argparse.Namespace) -> int:
    agent = _agent(args)
    _recover(agent)
    return _print_outcome(
        agent.lifecycle.install(str(Path(args.bundle).resolve()), expected_sha256=args.sha256)
    )


def cmd_rollback(args: argparse.Namespace) -> int:
    agent = _agent(args)
    _recover(agent)
    return _print_outcome(agent.lifecycle.rollback(args.model))


def cmd_retire(args: argparse.Namespace) -> int:
    agent = _agent(args)
    _recover(agent)
    return _print_outcome(agent.lifecycle.retire(args.model))


def cmd_recover(args: argparse.Namespace) -> int:
    outcome = _agent(args).lifecycle.recover()
    if outcome is None:
        print("nothing to recover")
        return 0
    return _print_outcome(outcome)


def cmd_status(args: argparse.Namespace) -> int:
    agent = _agent(args)
    status = agent.status()
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"device {status['device_id']} (profile {status['profile']})")
    rows = [
        [name, m["active"], m["previous"], m["highest"], m["installed_at"]]
        for name, m in status["models"].items()
    ]
    print(
        _table(["model", "active", "previous", "highest", "active since"], rows)
        if rows
        else "no models installed"
    )
    if status["pending"]:
        p = status["pending"]
        print(
            f"pending: {p['op']} of {p['model'] or '?'} interrupted in {p['state']} "
            "(the daemon recovers it on start; or run `edgepack-agent recover`)"
        )
    if status["history"]:
        print("\nrecent events:")
        print(
            _table(
                ["time", "model", "action", "version", "result", "reason"],
                [
                    [
                        h.get("time"),
                        h.get("model"),
                        h.get("action"),
                        h.get("version"),
                        h.get("result"),
                        (h.get("reason") or "")[:80],
                    ]
                    for h in status["history"]
                ],
            )
        )
    return 0


def http_probe(url: str, timeout: float = 5.0) -> Callable[[], str | None]:
    """A watchdog probe: our own server must answer ``/v2/health/live`` within ``timeout``."""

    where = urllib.parse.urlsplit(url)

    def probe() -> str | None:
        # A raw socket, not http.client: that would load email and ssl (6 MiB) into the daemon.
        host, port = where.hostname or "127.0.0.1", where.port or 80
        try:
            with socket.create_connection((host, port), timeout) as sock:
                sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: agent\r\n"
                             b"Connection: close\r\n\r\n")  # fmt: skip
                head = sock.recv(64)
        except OSError as e:  # refused, reset, timed out
            return f"http: no answer from {url} within {timeout:g} s ({e})"
        parts = head.split(b" ", 2)
        status = parts[1].decode("ascii", "replace") if len(parts) > 1 else repr(head[:20])
        return None if status == "200" else f"http: /v2/health/live answered {status}"

    return probe


def cmd_run(args: argparse.Namespace) -> int:
    from edgepack.agent._supervise import Watchdog
    from edgepack.agent._systemd import Notifier, watchdog_interval

    agent = _agent(args)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    agent.start()
    link = None
    if agent.config.mqtt is not None:
        from edgepack.agent._fleet_link import DeviceLink

        link = DeviceLink(agent, agent.config.mqtt).start()
    served = ", ".join(f"{m.name} v{m.version}" for m in agent.runtime.models()) or "no models"
    where = agent.server.url if agent.server else "no HTTP server"
    logging.getLogger("edgepack.agent").info(
        "agent %s ready: %s; %s", agent.config.device_id, served, where
    )
    notifier = Notifier()
    notifier.ready(f"serving {served}; {where}")  # systemd (Type=notify): started only now
    interval = watchdog_interval()
    watchdog = None
    if interval is not None:
        probes = (http_probe(agent.server.url),) if agent.server else ()
        watchdog = Watchdog(notifier, agent.heartbeats, interval, probes).start()
    try:
        stop.wait()
    finally:
        notifier.stopping()
        if watchdog is not None:
            watchdog.stop()
        if link is not None:
            link.stop()
        agent.stop()
    return 0


def cmd_export_samples(args: argparse.Namespace) -> int:
    from edgepack.agent._capture import SampleStore
    from edgepack.agent._config import load_config

    config = load_config(Path(args.config))
    path = config.state_dir / "samples.db"
    if not path.exists():
        print(
            "error: no samples captured ([capture] enabled = true turns capture on)",
            file=sys.stderr,
        )
        return 1
    store = SampleStore(path, config.capture)
    rows = store.export(args.model, Path(args.out))
    print(f"wrote {rows} captured rows of {args.model} to {args.out}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgepack-agent", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config",
        default=os.environ.get("EDGEPACK_AGENT_CONFIG", str(DEFAULT_CONFIG)),
        help="agent.toml (default: $EDGEPACK_AGENT_CONFIG or %(default)s)",
    )
    parser.add_argument("--state-dir", help="override state_dir from the config")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every state")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("install", help="install a bundle file (offline / air-gapped)")
    p.add_argument("bundle")
    p.add_argument("--sha256", help="refuse the bundle unless its sha256 matches")
    p.set_defaults(func=cmd_install)
    p = sub.add_parser("run", help="run the daemon: serve models, pick up installs")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("status", help="installed models, pending operation, recent events")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("rollback", help="go back to the retained previous version")
    p.add_argument("model")
    p.set_defaults(func=cmd_rollback)
    p = sub.add_parser("retire", help="uninstall a model")
    p.add_argument("model")
    p.set_defaults(func=cmd_retire)
    p = sub.add_parser("recover", help="finish or undo an operation a crash interrupted")
    p.set_defaults(func=cmd_recover)
    p = sub.add_parser("export-samples", help="write captured inputs/outputs (CSV or Parquet)")
    p.add_argument("model")
    p.add_argument("--out", required=True, help="a .csv or .parquet file")
    p.set_defaults(func=cmd_export_samples)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    args = _parser().parse_args(argv)
    # One-shot commands print their outcome; the log is for -v and the daemon.
    logging.basicConfig(
        level=logging.INFO if args.verbose or args.command == "run" else logging.ERROR,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        sys.exit(args.func(args))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except EdgepackError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
