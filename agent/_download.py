"""Bundle downloads over HTTP(S): streamed to disk, capped, hash-checked and resumable.

:class:`HttpFetcher` is the lifecycle's Fetcher (edgepack.agent._lifecycle, FETCHING) for http(s)
sources; paths go to LocalFetcher. Bytes stream into ``<dest>.part``; ``<dest>.part.json`` keeps the
URL and the validator (strong ETag, else Last-Modified). After a lost connection or a power cut
(FETCHING is re-run with the same ``dest``) the next attempt sends one ``Range: bytes=<offset>-``
with ``If-Range: <validator>`` and keeps its bytes only if the answer is a 206 whose
``Content-Range`` starts at that offset; a 200 (file changed, ranges ignored) or no validator
restarts from zero.

Nothing is written past the cap, ``min(max_bytes, expected_size)``; a larger ``Content-Length`` is
refused before reading. The file's size and sha256 (a resumed prefix re-hashed from disk) go to
:func:`check_download`, which does no I/O; then the part is fsynced and renamed to ``dest``.
Connection errors, timeouts, short bodies, 5xx, 408 and 429 are retried with jittered exponential
backoff, resuming; other 4xx fail at once. Errors: DownloadError (transport), BundleError (wrong
bytes), StorageError (the local disk). Timeouts, retries and backoff are the ``[download]`` table
of ``agent.toml`` (:class:`~edgepack.agent._config.DownloadConfig`).

Time is bounded twice (:class:`_Pace`), because a per-read timeout alone lets a server that
trickles one byte every two seconds hold a job forever: the whole fetch, retries and backoff
included, must end within ``deadline`` seconds (every timeout and backoff is cut to what is left),
and an attempt whose rate over a ``min_rate_window`` falls below ``min_rate`` bytes/s is cut off
and retried (resuming). Time comes from an injected monotonic clock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from edgepack._digest import Sha256, sha256
from edgepack._files import fsync_dir, sha256_stream, storage_error, write_json_atomic
from edgepack.agent._config import DownloadConfig
from edgepack.agent.exceptions import BundleError, DownloadError

__all__ = ["HttpFetcher", "check_download", "partial_paths"]

log = logging.getLogger("edgepack.agent")

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes \*/(\d+)")


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
    """One download: the URL, how much may be written, the part file and its sidecar."""

    url: str
    cap: int
    expected_size: int | None
    part: Path
    sidecar: Path


class _RetryableError(Exception):
    """One attempt failed in a way a later one may fix; the part file is kept for resuming."""


class _RestartError(_RetryableError):
    """The partial download cannot be continued; the next attempt starts from zero."""


class HttpFetcher:
    """Implements edgepack.agent._lifecycle.Fetcher for http(s) URLs; falls back to LocalFetcher for
    paths.

    Args:
        config: timeouts, retries and backoff (``AgentConfig.download``; defaults otherwise).
        client: the httpx.Client to use (proxies, TLS, tests); one is made and owned otherwise.
        on_progress: called with (bytes so far, total bytes or None) as the body arrives.
        sleep: waits between attempts (tests inject a recorder).
        clock: monotonic seconds for the deadline and the minimum rate (tests inject one).
    """

    def __init__(
        self,
        config: DownloadConfig | None = None,
        *,
        client: httpx.Client | None = None,
        on_progress: Callable[[int, int | None], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or DownloadConfig()
        self._owns_client = client is None
        self._client = client or httpx.Client(follow_redirects=True, max_redirects=5)
        self._clock = clock
        self._on_progress = on_progress or (lambda done, total: None)
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
        scheme = source.partition("://")[0].lower() if "://" in source else ""
        if scheme not in ("http", "https"):
            if scheme:
                raise DownloadError(f"cannot download {source}: only http(s) URLs are supported")
            from edgepack.agent._fetch import LocalFetcher

            LocalFetcher().fetch(source, dest, max_bytes)  # the lifecycle verifies what it copied
            return
        cap = max_bytes if expected_size is None else min(max_bytes, expected_size)
        target = _Target(source, cap, expected_size, *partial_paths(dest))
        config, attempts = self.config, self.config.retries + 1
        pace = _Pace(config, self._clock, source)
        last: _RetryableError | None = None
        for attempt in range(attempts):
            if last is not None:  # jittered, so that devices cut off together come back apart
                delay = min(config.backoff_max, config.backoff_initial * 2 ** (attempt - 1))
                self._sleep(min(delay * (0.5 + random.random() / 2), pace.left(last)))
            try:
                size, sha256 = self._attempt(target, pace)
                check_download(size, sha256, expected_size, expected_sha256)
            except _RetryableError as e:
                last = e
                log.warning("download of %s, attempt %d/%d: %s", source, attempt + 1, attempts, e)
                continue
            except BundleError:
                _discard(target)
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
        tries = f"{attempts} attempts" if attempts > 1 else "1 attempt"
        raise DownloadError(f"could not download {source} after {tries}: {last}")

    def _attempt(self, t: _Target, pace: _Pace) -> tuple[int, str]:
        """One GET; returns the size and sha256 of the complete part file."""
        left = pace.left(None)
        timeout = httpx.Timeout(
            min(self.config.read_timeout, left), connect=min(self.config.connect_timeout, left)
        )
        offset, validator = _resume_point(t)
        headers = {"Accept-Encoding": "identity"}  # Range offsets count the bytes as stored
        if validator is not None:
            log.info("resuming %s at byte %d", t.url, offset)
            headers.update({"Range": f"bytes={offset}-", "If-Range": validator})
        try:
            with self._client.stream(
                "GET", t.url, headers=headers, timeout=timeout, follow_redirects=True
            ) as response:
                where = _start_of(response, t, offset)
                if where is None:
                    return offset, _hash_prefix(t.part).hexdigest()  # 416: the part is complete
                return self._receive(response, t, pace, *where)
        except _RestartError:
            _discard(t)
            raise
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as e:
            raise DownloadError(f"cannot download {t.url}: {e}") from e
        except httpx.TransportError as e:  # connect/read errors, timeouts, bodies cut short
            raise _RetryableError(f"{type(e).__name__}: {e}") from e
        except httpx.HTTPError as e:  # too many redirects and the like: retrying will not help
            raise DownloadError(f"cannot download {t.url}: {e}") from e

    def _receive(
        self, response: httpx.Response, t: _Target, pace: _Pace, start: int, total: int | None
    ) -> tuple[int, str]:
        sha = _hash_prefix(t.part) if start else sha256()  # the kept prefix, from disk
        etag = response.headers.get("etag", "")  # a weak (W/) one does not promise the same bytes
        validator = etag if etag[:2] not in ("", "W/") else response.headers.get("last-modified")
        try:
            if start == 0:
                # The old part goes before the new sidecar is written (write_json_atomic fsyncs
                # the directory): an old part is never resumed with a new validator.
                t.part.unlink(missing_ok=True)
                write_json_atomic(t.sidecar, {"url": t.url, "validator": validator})
                handle = open(t.part, "wb")  # noqa: SIM115 - closed by the with below
            else:
                handle = open(t.part, "ab")  # noqa: SIM115 - _resume_point: its size is start
        except OSError as e:
            raise storage_error("write the download", t.part, e) from e
        done = start
        pace.begin()
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
                self._on_progress(done, total)
                pace.received(len(chunk))
        if total is not None and done < total:
            raise _RetryableError(f"the body ended after {done} of {total} bytes")
        return done, sha.hexdigest()


class _Pace:
    """The fetch's overall deadline and an attempt's minimum rate, on one monotonic clock."""

    def __init__(self, config: DownloadConfig, clock: Callable[[], float], url: str) -> None:
        self.config, self.clock, self.url = config, clock, url
        self.ends = clock() + config.deadline
        self.since, self.got = self.ends, 0

    def left(self, last: Exception | None) -> float:
        """Seconds left before the deadline.

        Raises:
            DownloadError: none are (``last``: why the previous attempt failed, if it did).
        """
        left = self.ends - self.clock()
        if left <= 0:
            why = f" (last attempt: {last})" if last is not None else ""
            raise DownloadError(
                f"could not download {self.url} within {self.config.deadline:g} s, the "
                f"[download] deadline{why}; the server or the link is too slow (raise the "
                "deadline if this device's link is only slow)"
            )
        return left

    def begin(self) -> None:
        """The body starts arriving: open the first rate window."""
        self.since, self.got = self.clock(), 0

    def received(self, size: int) -> None:
        """``size`` more bytes arrived.

        Raises:
            DownloadError: past the deadline.
            _RetryableError: the last window's rate was below ``min_rate``.
        """
        self.left(None)
        self.got += size
        now, config = self.clock(), self.config
        elapsed = now - self.since
        if config.min_rate <= 0 or elapsed < config.min_rate_window:
            return
        rate = self.got / elapsed
        if rate < config.min_rate:
            raise _RetryableError(
                f"the server sent {rate:.3g} bytes/s over {elapsed:.3g} s, below the [download] "
                f"min_rate of {config.min_rate:g} bytes/s"
            )
        self.since, self.got = now, 0


def _start_of(response: httpx.Response, t: _Target, offset: int) -> tuple[int, int | None] | None:
    """(where the body goes in the file, the file's size if told); ``None``: a 416, complete."""
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
            raise _RestartError(f"206 for {headers.get('content-range')!r}, not bytes {offset}-")
        start = offset
        total = int(got[3]) if got[3] != "*" else None
    if length.isdigit() and start + int(length) > t.cap:
        raise BundleError(f"{t.url} is {start + int(length)} bytes, above the limit of {t.cap}")
    if status == 200 and total is not None:
        check_download(total, "", t.expected_size, None)  # the wrong size: refused now
    return start, t.expected_size if t.expected_size is not None else total


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
    ok = isinstance(validator, str) and meta.get("url") == t.url and 0 < size <= t.cap
    return (size, validator) if ok else (0, None)


def _hash_prefix(path: Path) -> Sha256:
    """The running sha256 of what a partial download kept, to continue with the rest."""
    try:
        with open(path, "rb") as handle:
            return sha256_stream(handle)
    except OSError as e:
        raise storage_error("read", path, e) from e


def _discard(t: _Target) -> None:
    for path in (t.part, t.sidecar):
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
