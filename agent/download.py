"""Bundle downloads over HTTP(S): streamed to disk, capped, hash-checked and resumable.

The lifecycle's FETCHING state (agent.lifecycle) calls ``fetcher.fetch(source, dest, max_bytes)``;
:class:`HttpFetcher` is that fetcher for ``http://`` and ``https://`` sources and hands plain paths
to :class:`~agent.lifecycle.LocalFetcher`.

A download streams into ``<dest>.part``, never into ``dest``. Beside it, ``<dest>.part.json``
records the URL and the server's validator (a strong ETag, else Last-Modified). When the network or
the power goes, the next attempt (in the same call, or after a restart when the lifecycle re-runs
FETCHING with the same ``dest``) asks for the rest with exactly one ``Range: bytes=<offset>-`` and
an ``If-Range: <validator>``. The resumed bytes are kept only if the answer is a 206 whose
``Content-Range`` starts at that offset; a 200 means the file changed or the server ignores ranges,
so the part is truncated and the download starts again from zero. Without a validator there is no
way to know the file did not change: no Range is sent at all.

Nothing is written past the cap, ``min(max_bytes, expected_size)``: a ``Content-Length`` above it is
refused before reading, a body that runs past it is cut off. When the body is complete its size and
sha256 (the resumed prefix re-hashed from disk) go to :func:`check_download`, which does no I/O;
only then is the part fsynced and renamed to ``dest``.

Transient failures (connection errors, timeouts, bodies cut short, 5xx, 408, 429) are retried with
exponential backoff and jitter, resuming each time; any other 4xx fails at once. Callers see one
family: DownloadError (transport), BundleError (wrong bytes), StorageError (the local disk).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

import httpx

from agent.durable import fsync_dir, storage_error, write_json_atomic
from agent.exceptions import BundleError, DownloadError

__all__ = ["DownloadConfig", "HttpFetcher", "check_download", "partial_paths"]

log = logging.getLogger("edgepack.agent")

_CHUNK = 256 * 1024
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes \*/(\d+)")


@dataclass(frozen=True)
class DownloadConfig:
    """Timeouts, retries and backoff for bundle downloads (seconds)."""

    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    retries: int = 5  # attempts after the first
    backoff_initial: float = 0.5
    backoff_max: float = 30.0


def check_download(
    size: int, sha256: str, expected_size: int | None, expected_sha256: str | None
) -> None:
    """Decide whether finished bytes are the bundle the job named. Does no I/O.

    Raises:
        BundleError: the size or the sha256 is not the expected one.
    """
    if expected_size is not None and size != expected_size:
        raise BundleError(
            f"the download is {size} bytes, expected {expected_size}; "
            "the bundle was corrupted or replaced"
        )
    if expected_sha256 is not None and sha256 != expected_sha256.lower():
        raise BundleError(
            f"sha256 {sha256} does not match the expected {expected_sha256}; "
            "the bundle was corrupted or replaced"
        )


def partial_paths(dest: Path) -> tuple[Path, Path]:
    """The partial download of ``dest`` and its sidecar (remove both to forget a download)."""
    return dest.with_name(dest.name + ".part"), dest.with_name(dest.name + ".part.json")


@dataclass(frozen=True)
class _Target:
    """One download: where from, where to, and how much may be written."""

    url: str
    dest: Path
    cap: int
    expected_size: int | None

    @property
    def part(self) -> Path:
        return partial_paths(self.dest)[0]

    @property
    def sidecar(self) -> Path:
        return partial_paths(self.dest)[1]


class _RetryableError(Exception):
    """One attempt failed in a way a later one may fix; the part file is kept for resuming."""

    def __init__(self, message: str, after: float | None = None) -> None:
        super().__init__(message)
        self.after = after  # the server's Retry-After, in seconds


class _RestartError(_RetryableError):
    """The partial download cannot be continued; the next attempt starts from zero."""


class HttpFetcher:
    """Implements agent.lifecycle.Fetcher for http(s) URLs; falls back to LocalFetcher for paths.

    Args:
        config: timeouts, retries and backoff.
        client: the httpx.Client to use (proxies, TLS, tests); one is made and owned otherwise.
        on_progress: called with (bytes so far, total bytes or None) as the body arrives.
        sleep: waits between attempts (tests inject a recorder).
    """

    def __init__(
        self,
        config: DownloadConfig | None = None,
        *,
        client: httpx.Client | None = None,
        on_progress: Callable[[int, int | None], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config or DownloadConfig()
        self._owns_client = client is None
        self._client = client or httpx.Client(follow_redirects=True, max_redirects=5)
        self._timeout = httpx.Timeout(self.config.read_timeout, connect=self.config.connect_timeout)
        self._on_progress = on_progress
        self._sleep = sleep

    def close(self) -> None:
        """Close the HTTP client if this fetcher made it."""
        if self._owns_client:
            self._client.close()

    def fetch(
        self,
        source: str,
        dest: Path,
        max_bytes: int,
        *,
        expected_size: int | None = None,
        expected_sha256: str | None = None,
    ) -> None:
        """Bring the bundle at ``source`` to ``dest``, resuming a partial download of it.

        Raises:
            DownloadError: unsupported URL, a 4xx, or still failing after the retries.
            BundleError: larger than the cap, or not the expected size or sha256 (nothing kept).
            StorageError: ``dest``'s directory cannot be written.
        """
        scheme = urlsplit(source).scheme.lower()
        if scheme not in ("http", "https"):
            if scheme:
                raise DownloadError(f"cannot download {source}: only http(s) URLs are supported")
            self._fetch_local(source, dest, max_bytes, expected_size, expected_sha256)
            return
        cap = max_bytes if expected_size is None else min(max_bytes, expected_size)
        target = _Target(source, dest, cap, expected_size)
        attempts = self.config.retries + 1
        last: _RetryableError | None = None
        for attempt in range(attempts):
            if last is not None:
                self._sleep(self._backoff(attempt, last))
            try:
                size, sha256 = self._attempt(target)
                check_download(size, sha256, expected_size, expected_sha256)
            except _RetryableError as e:
                last = e
                log.warning("download of %s, attempt %d/%d: %s", source, attempt + 1, attempts, e)
                continue
            except BundleError:
                _discard(dest)
                raise
            _commit(dest)
            return
        raise DownloadError(f"could not download {source} after {attempts} attempts: {last}")

    def _fetch_local(
        self, source: str, dest: Path, max_bytes: int, size: int | None, sha256: str | None
    ) -> None:
        from agent.lifecycle import LocalFetcher  # agent.lifecycle may import this module

        LocalFetcher().fetch(source, dest, max_bytes)
        try:
            check_download(*_hash_file(dest), size, sha256)
        except BundleError:
            dest.unlink(missing_ok=True)
            raise

    def _backoff(self, attempt: int, error: _RetryableError) -> float:
        delay = min(self.config.backoff_max, self.config.backoff_initial * 2 ** (attempt - 1))
        delay *= 0.5 + random.random() / 2  # devices that lost the network together spread out
        if error.after is not None:
            delay = max(delay, min(error.after, self.config.backoff_max))
        return delay

    def _attempt(self, url: str, dest: Path, cap: int, expected_size: int | None) -> tuple[int, str]:
        """One GET; returns the size and sha256 of the complete part file."""
        part, sidecar = partial_paths(dest)
        offset, validator = _resume_point(url, part, sidecar, cap)
        headers = {"Accept-Encoding": "identity"}  # Range offsets count the bytes as stored
        if validator is not None:
            log.info("resuming %s at byte %d", url, offset)
            headers["Range"] = f"bytes={offset}-"
            headers["If-Range"] = validator
        try:
            with self._client.stream(
                "GET", url, headers=headers, timeout=self._timeout, follow_redirects=True
            ) as response:
                start = _start_of(response, url, offset, cap, expected_size)
                if start is None:
                    return _hash_file(part)  # 416: the part already holds the whole file
                return self._receive(response, url, part, sidecar, start, cap, expected_size)
        except _RestartError:
            _discard(dest)
            raise
        except httpx.UnsupportedProtocol as e:
            raise DownloadError(f"cannot download {url}: {e}") from e
        except httpx.TransportError as e:  # connect/read errors, timeouts, bodies cut short
            raise _RetryableError(f"{type(e).__name__}: {e}") from e
        except httpx.HTTPError as e:  # too many redirects and the like: retrying will not help
            raise DownloadError(f"cannot download {url}: {e}") from e

    def _receive(
        self,
        response: httpx.Response,
        url: str,
        part: Path,
        sidecar: Path,
        start: int,
        cap: int,
        expected_size: int | None,
    ) -> tuple[int, str]:
        sha = hashlib.sha256()
        declared = _declared_total(response, start)
        total = expected_size if expected_size is not None else declared
        handle: BinaryIO
        try:
            if start == 0:
                # A new inode and a new sidecar, made durable together by the directory fsync
                # in write_json_atomic: an old part is never resumed with a new validator.
                part.unlink(missing_ok=True)
                handle = open(part, "wb")  # noqa: SIM115 - closed by the with below
                write_json_atomic(sidecar, {"url": url, "validator": _validator(response)})
            else:
                handle = open(part, "r+b")  # noqa: SIM115
                _hash_into(sha, handle, start)
                handle.truncate(start)
                handle.seek(start)
        except OSError as e:
            raise storage_error("write the download", part, e) from e
        done = start
        with handle:
            for chunk in response.iter_raw(_CHUNK):
                if done + len(chunk) > cap:
                    raise BundleError(f"{url} sent more than {cap} bytes, the most allowed")
                try:
                    handle.write(chunk)
                except OSError as e:
                    raise storage_error("write the download", part, e) from e
                sha.update(chunk)
                done += len(chunk)
                if self._on_progress is not None:
                    self._on_progress(done, total)
        if total is not None and done < total:
            raise _RetryableError(f"the body ended after {done} of {total} bytes")
        return done, sha.hexdigest()


def _start_of(
    response: httpx.Response, url: str, offset: int, cap: int, expected_size: int | None
) -> int | None:
    """Where this answer's body goes in the part file; ``None``: the part is already complete."""
    status = response.status_code
    if status in (408, 429) or status >= 500:
        retry_after = response.headers.get("retry-after", "")
        after = float(retry_after) if retry_after.isdigit() else None
        raise _RetryableError(f"HTTP {status} {response.reason_phrase}", after)
    if status == 416 and offset:
        unsatisfied = _UNSATISFIED_RANGE.fullmatch(response.headers.get("content-range", ""))
        total = int(unsatisfied[1]) if unsatisfied else expected_size
        if total == offset:
            return None
        raise _RestartError(f"HTTP 416 for bytes {offset}- (the file is {total} bytes)")
    if status not in (200, 206):
        raise DownloadError(f"{url} answered HTTP {status} {response.reason_phrase}")
    encoding = response.headers.get("content-encoding", "identity").lower()
    if encoding != "identity":
        raise DownloadError(f"{url} came {encoding}-encoded although identity was asked for")
    start = 0
    if status == 206:
        got = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", ""))
        if (
            not offset
            or got is None
            or int(got[1]) != offset
            or (expected_size is not None and got[3] != str(expected_size))
        ):
            shown = response.headers.get("content-range")
            raise _RestartError(f"asked for bytes {offset}-, got a 206 for {shown!r}")
        start = offset
    length = response.headers.get("content-length", "")
    if length.isdigit():
        if start + int(length) > cap:
            raise BundleError(f"{url} is {start + int(length)} bytes, above the limit of {cap}")
        if status == 200 and expected_size is not None and int(length) != expected_size:
            raise BundleError(
                f"{url} is {length} bytes, expected {expected_size}; "
                "the bundle was corrupted or replaced"
            )
    return start


def _declared_total(response: httpx.Response, start: int) -> int | None:
    got = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", ""))
    if response.status_code == 206 and got is not None and got[3] != "*":
        return int(got[3])
    length = response.headers.get("content-length", "")
    return start + int(length) if length.isdigit() else None


def _validator(response: httpx.Response) -> str | None:
    etag = response.headers.get("etag")
    if etag and not etag.startswith("W/"):  # a weak ETag does not promise the same bytes
        return etag
    return response.headers.get("last-modified")


def _resume_point(url: str, part: Path, sidecar: Path, cap: int) -> tuple[int, str | None]:
    """(offset, validator) to resume from, or (0, None) to start from zero."""
    try:
        size = part.stat().st_size
        meta = json.loads(sidecar.read_bytes())
    except FileNotFoundError:
        return 0, None
    except ValueError:
        return 0, None  # a torn or foreign sidecar: start again
    except OSError as e:
        raise storage_error("read the partial download", part, e) from e
    if not isinstance(meta, dict) or meta.get("url") != url:
        return 0, None
    validator = meta.get("validator")
    if not isinstance(validator, str) or not 0 < size <= cap:
        return 0, None
    return size, validator


def _hash_into(sha: hashlib._Hash, handle: BinaryIO, size: int) -> None:
    remaining = size
    while remaining:
        chunk = handle.read(min(_CHUNK, remaining))
        if not chunk:
            raise OSError(f"the file ended {remaining} bytes early")
        sha.update(chunk)
        remaining -= len(chunk)


def _hash_file(path: Path) -> tuple[int, str]:
    sha = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(_CHUNK), b""):
                sha.update(chunk)
            return handle.tell(), sha.hexdigest()
    except OSError as e:
        raise storage_error("read", path, e) from e


def _commit(dest: Path) -> None:
    part, sidecar = partial_paths(dest)
    try:
        with open(part, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(part, dest)
        fsync_dir(dest.parent)
        sidecar.unlink(missing_ok=True)
    except OSError as e:
        raise storage_error("save the download as", dest, e) from e


def _discard(dest: Path) -> None:
    for path in partial_paths(dest):
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
