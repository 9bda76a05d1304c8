"""Bundle downloads over HTTP(S): streamed to disk, capped, hash-checked and resumable.

:class:`HttpFetcher` is the lifecycle's Fetcher (agent.lifecycle, state FETCHING) for http(s)
sources; plain paths go to LocalFetcher. Bytes stream into ``<dest>.part``; the sidecar
``<dest>.part.json`` keeps the URL and the server's validator (strong ETag, else Last-Modified).
After a lost connection, or a power cut after which the lifecycle re-runs FETCHING with the same
``dest``, the next attempt sends exactly one ``Range: bytes=<offset>-`` with ``If-Range:
<validator>`` and keeps its bytes only if the answer is a 206 whose ``Content-Range`` starts at
that offset; a 200 (the file changed, or ranges are ignored) or no validator restarts from zero.

Nothing is written past the cap, ``min(max_bytes, expected_size)``; a ``Content-Length`` above it is
refused before reading. The complete file's size and sha256 (a resumed prefix is re-hashed from
disk) go to :func:`check_download`, which does no I/O; then the part is fsynced and renamed to
``dest``. Connection errors, timeouts, short bodies, 5xx, 408 and 429 are retried with exponential
backoff and jitter, resuming each time; other 4xx fail at once. Callers see one family:
DownloadError (transport), BundleError (wrong bytes), StorageError (the local disk).
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
        problem = f"size {size} does not match the expected {expected_size}"
    elif expected_sha256 is not None and sha256 != expected_sha256.lower():
        problem = f"sha256 {sha256} does not match the expected {expected_sha256}"
    else:
        return
    raise BundleError(f"{problem}; the bundle was corrupted or replaced")


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
    part: Path
    sidecar: Path


class _RetryableError(Exception):
    """One attempt failed in a way a later one may fix; the part file is kept for resuming."""


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
            from agent.lifecycle import LocalFetcher  # agent.lifecycle may import this module

            LocalFetcher().fetch(source, dest, max_bytes)  # the lifecycle verifies what it copied
            return
        cap = max_bytes if expected_size is None else min(max_bytes, expected_size)
        target = _Target(source, dest, cap, expected_size, *partial_paths(dest))
        attempts = self.config.retries + 1
        last: _RetryableError | None = None
        for attempt in range(attempts):
            if last is not None:
                self._sleep(self._backoff(attempt))
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
            try:
                with open(target.part, "rb") as handle:
                    os.fsync(handle.fileno())
                os.replace(target.part, dest)
                fsync_dir(dest.parent)
                target.sidecar.unlink(missing_ok=True)
            except OSError as e:
                raise storage_error("save the download as", dest, e) from e
            return
        raise DownloadError(f"could not download {source} after {attempts} attempts: {last}")

    def _backoff(self, attempt: int) -> float:
        delay = min(self.config.backoff_max, self.config.backoff_initial * 2 ** (attempt - 1))
        return delay * (0.5 + random.random() / 2)  # devices cut off together come back apart

    def _attempt(self, t: _Target) -> tuple[int, str]:
        """One GET; returns the size and sha256 of the complete part file."""
        offset, validator = _resume_point(t)
        headers = {"Accept-Encoding": "identity"}  # Range offsets count the bytes as stored
        if validator is not None:
            log.info("resuming %s at byte %d", t.url, offset)
            headers["Range"] = f"bytes={offset}-"
            headers["If-Range"] = validator
        try:
            with self._client.stream(
                "GET", t.url, headers=headers, timeout=self._timeout, follow_redirects=True
            ) as response:
                where = _start_of(response, t, offset)
                if where is None:
                    return offset, _hash_file(t.part).hexdigest()  # 416: the part is complete
                return self._receive(response, t, *where)
        except _RestartError:
            _discard(t.dest)
            raise
        except httpx.UnsupportedProtocol as e:
            raise DownloadError(f"cannot download {t.url}: {e}") from e
        except httpx.TransportError as e:  # connect/read errors, timeouts, bodies cut short
            raise _RetryableError(f"{type(e).__name__}: {e}") from e
        except httpx.HTTPError as e:  # too many redirects and the like: retrying will not help
            raise DownloadError(f"cannot download {t.url}: {e}") from e

    def _receive(
        self, response: httpx.Response, t: _Target, start: int, declared: int | None
    ) -> tuple[int, str]:
        total = t.expected_size if t.expected_size is not None else declared
        sha = _hash_file(t.part) if start else hashlib.sha256()  # the kept prefix, from disk
        etag = response.headers.get("etag", "")
        strong = etag and not etag.startswith("W/")  # a weak ETag does not promise the same bytes
        validator = etag if strong else response.headers.get("last-modified")
        handle: BinaryIO
        try:
            if start == 0:
                # A new inode and a new sidecar, made durable together by the directory fsync
                # in write_json_atomic: an old part is never resumed with a new validator.
                t.part.unlink(missing_ok=True)
                handle = open(t.part, "wb")  # noqa: SIM115 - closed by the with below
                write_json_atomic(t.sidecar, {"url": t.url, "validator": validator})
            else:
                handle = open(t.part, "ab")  # noqa: SIM115 - _resume_point: its size is start
        except OSError as e:
            raise storage_error("write the download", t.part, e) from e
        done = start
        with handle:
            for chunk in response.iter_raw():  # as received: a cut loses nothing we got
                if done + len(chunk) > t.cap:
                    raise BundleError(f"{t.url} sent more than {t.cap} bytes, the most allowed")
                try:
                    handle.write(chunk)
                except OSError as e:
                    raise storage_error("write the download", t.part, e) from e
                sha.update(chunk)
                done += len(chunk)
                if self._on_progress is not None:
                    self._on_progress(done, total)
        if total is not None and done < total:
            raise _RetryableError(f"the body ended after {done} of {total} bytes")
        return done, sha.hexdigest()


def _start_of(response: httpx.Response, t: _Target, offset: int) -> tuple[int, int | None] | None:
    """Where this answer's body starts in the file, and the file's size if the server says it.

    ``None``: the part file is already complete (a 416 for a range starting at its end).
    """
    status, headers = response.status_code, response.headers
    if status in (408, 429) or status >= 500:
        raise _RetryableError(f"HTTP {status} {response.reason_phrase}")
    if status == 416 and offset:
        unsatisfied = _UNSATISFIED_RANGE.fullmatch(headers.get("content-range", ""))
        total = int(unsatisfied[1]) if unsatisfied else t.expected_size
        if total == offset:
            return None
        raise _RestartError(f"HTTP 416 for bytes {offset}- (the file is {total} bytes)")
    if status not in (200, 206):
        raise DownloadError(f"{t.url} answered HTTP {status} {response.reason_phrase}")
    length = headers.get("content-length", "")
    start, total = 0, int(length) if length.isdigit() else None
    if status == 206:
        got = _CONTENT_RANGE.fullmatch(headers.get("content-range", ""))
        size = str(t.expected_size) if t.expected_size is not None else None
        if not offset or got is None or int(got[1]) != offset or size not in (None, got[3]):
            shown = headers.get("content-range")
            raise _RestartError(f"asked for bytes {offset}-, got a 206 for {shown!r}")
        start = offset
        total = int(got[3]) if got[3] != "*" else None
    if length.isdigit() and start + int(length) > t.cap:
        raise BundleError(f"{t.url} is {start + int(length)} bytes, above the limit of {t.cap}")
    if status == 200 and total is not None:
        check_download(total, "", t.expected_size, None)  # the wrong size: refused now
    return start, total


def _resume_point(t: _Target) -> tuple[int, str | None]:
    """(offset, validator) to resume from, or (0, None) to start from zero."""
    try:
        size = t.part.stat().st_size
        meta = json.loads(t.sidecar.read_bytes())
    except (FileNotFoundError, ValueError):
        return 0, None  # nothing kept, or a torn sidecar: start from zero
    except OSError as e:
        raise storage_error("read the partial download", t.part, e) from e
    validator = meta.get("validator") if isinstance(meta, dict) else None
    if not isinstance(validator, str) or meta.get("url") != t.url or not 0 < size <= t.cap:
        return 0, None
    return size, validator


def _hash_file(path: Path) -> hashlib._Hash:
    sha = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(_CHUNK), b""):
                sha.update(chunk)
    except OSError as e:
        raise storage_error("read", path, e) from e
    return sha


def _discard(dest: Path) -> None:
    for path in partial_paths(dest):
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
