"""A throwaway PostgreSQL server for tests: Debian's binaries, loopback only, trust auth.

Use it from a session-scoped fixture::

    @pytest.fixture(scope="session")
    def postgres_dsn(tmp_path_factory):
        with postgres_server(tmp_path_factory) as dsn:
            yield dsn

It finds ``initdb``/``pg_ctl`` under ``/usr/lib/postgresql/*/bin`` (or on ``PATH``); when they
are missing and we are root with ``apt-get``, it installs Debian's ``postgresql``. PostgreSQL
refuses to run as root, so as root the server runs as the ``postgres`` user (or a system user
``edgepack-pg`` it creates) through ``runuser``, with its data directory in a fresh temporary
directory that user owns; pytest's own temporary tree is private to root. The server listens
on 127.0.0.1 at a free port, keeps its unix socket in that directory, skips fsync (test data
is disposable) and is always stopped with ``pg_ctl stop -m immediate``. If no server can be
had, the tests that need one are skipped with the reason.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

SYSTEM_USER = "edgepack-pg"


def _binaries() -> Path | None:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def _install() -> str | None:
    """Install Debian's postgresql; returns why it failed, or None."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql"]
    for update_first in (False, True):
        if update_first:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
        if done.returncode == 0:
            return None
    return f"apt-get install postgresql failed: {done.stderr.strip()[-500:]}"


def _server_user() -> str | None:
    """The user to run the server as when we are root (None: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", SYSTEM_USER):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SYSTEM_USER],
        check=True,
        capture_output=True,
    )
    return SYSTEM_USER


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start a PostgreSQL server; yields ``postgresql://USER@127.0.0.1:PORT/postgres``."""
    bindir = _binaries()
    if bindir is None:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            pytest.skip(
                "PostgreSQL is not installed (apt-get install postgresql) and we are not root"
            )
        failure = _install()
        bindir = _binaries()
        if bindir is None:
            pytest.skip(f"cannot install PostgreSQL: {failure or 'no initdb after install'}")
    user = _server_user()
    if user is None:
        base = tmp_path_factory.mktemp("postgres")
        prefix: list[str] = []
        user = pwd.getpwuid(os.getuid()).pw_name
    else:
        base = Path(tempfile.mkdtemp(prefix="edgepack-pg-"))
        shutil.chown(base, user)
        prefix = ["runuser", "-u", user, "--"]
    data, log, port = base / "data", base / "server.log", _free_port()

    def run(*args: str) -> None:
        done = subprocess.run(
            [*prefix, *args], cwd=base, capture_output=True, text=True, check=False, timeout=30
        )
        if done.returncode != 0:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed: {done.stderr}{done.stdout}\n{tail}")

    options = (
        f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={base} "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=50"
    )
    try:
        run(
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            user,
            "--auth=trust",
            "--no-sync",
            "--encoding=UTF8",
            "--locale=C",
        )
        run(
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(log),
            "-o",
            options,
            "-w",
            "-t",
            "20",
            "start",
        )
        try:
            yield f"postgresql://{user}@127.0.0.1:{port}/postgres"
        finally:
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        if prefix:
            shutil.rmtree(base, ignore_errors=True)


def fresh_database(dsn: str, name: str) -> str:
    """Create (or recreate) database ``name`` on the server at ``dsn``; returns its DSN."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return dsn.rsplit("/", 1)[0] + "/" + name
