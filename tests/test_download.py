"""Bundle downloads (edgepack.agent._download) and the bundle server
(edgepack.fleet._bundle_server), over loopback.

The honest server is a real BundleServer. The Liar is a ThreadingHTTPServer of our own that is told
its lies one request at a time (cut the body, ignore Range, answer the wrong range, stall, 503, ...)
and records the Range/If-Range headers it saw and the body bytes it sent. Each test sets up one lie
and checks the error and that no file is left behind that should not be.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgepack.agent._config import DownloadConfig
from edgepack.agent._download import HttpFetcher, partial_paths
from edgepack.agent.exceptions import BundleError, DownloadError
from edgepack.fleet._bundle_server import BundleServer

DATA = os.urandom(2 * 1024 * 1024 + 123)
HALF = len(DATA) // 2


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Liar(ThreadingHTTPServer):
    """Serves ``data`` at any path; ``lies`` are used up one per request, then it is honest.

    Lies: "cut" (half the file, then hang up), "ignore-range" (200 to a Range request),
    "wrong-range" (a 206 starting at 0), "overflow" (no Content-Length, twice the bytes),
    "huge-length" (Content-Length 10**12), "stall" (headers, then nothing), "redirect" (302 to
    the same URL), "trickle" (one byte every two seconds on :attr:`clock`, the fake monotonic clock
    the fetcher is given: the server moves it, so the test is exact and takes milliseconds), or a
    status code.
    """

    daemon_threads = True

    def __init__(self, *lies: str) -> None:
        super().__init__(("127.0.0.1", 0), _LiarHandler)
        self.data, self.etag, self.lies = DATA, '"v1"', list(lies)
        self.requests: list[dict[str, list[str]]] = []
        self.sent = 0
        self.now = 0.0
        self.lock, self.release = threading.Lock(), threading.Event()
        self.observed, self.looks = threading.Condition(), 0
        self.url = f"http://127.0.0.1:{self.server_address[1]}/b.edgepack"

    def clock(self) -> float:
        with self.observed:
            self.looks += 1
            self.observed.notify_all()
        with self.lock:
            return self.now

    def paced(self, looks: int) -> bool:
        """Wait until the fetcher has read the clock since ``looks`` (it has taken the byte in):
        time moves in step with the fetcher, not with a server thread that a loaded machine
        lets run ahead. False: the fetcher stopped reading (it cut the connection)."""
        with self.observed:
            return self.observed.wait_for(lambda: self.looks > looks, timeout=5.0)

    def replace(self, data: bytes, etag: str) -> None:
        self.data, self.etag = data, etag


class _LiarHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Liar

    def do_GET(self) -> None:
        srv = self.server
        with srv.lock:
            srv.requests.append({h: self.headers.get_all(h) or [] for h in ("Range", "If-Range")})
            lie = srv.lies.pop(0) if srv.lies else "honest"
        data, status, start = srv.data, 200, 0
        asked = self.headers.get("Range", "")
        if asked and lie != "ignore-range" and self.headers.get("If-Range") == srv.etag:
            status, start = 206, int(asked.removeprefix("bytes=").removesuffix("-"))
        if lie == "wrong-range":
            start = 0
        body = data[start:] if not lie.isdigit() else b""
        if lie == "redirect":
            status, body = 302, b""
            self.send_response(302)
            self.send_header("Location", srv.url)
        else:
            self.send_response(int(lie) if lie.isdigit() else status)
        if srv.etag:
            self.send_header("ETag", srv.etag)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        if lie == "overflow":
            body, self.close_connection = data + data, True
        else:
            self.send_header("Content-Length", str(10**12 if lie == "huge-length" else len(body)))
        self.end_headers()
        if lie == "cut":
            body, self.close_connection = body[: max(0, HALF - start)], True
        if lie == "stall":
            self.wfile.flush()
            srv.release.wait(5)
            body, self.close_connection = b"", True
        if lie == "huge-length":
            body, self.close_connection = b"x" * 65536, True
        if lie == "trickle":
            self.close_connection = True
            for index in range(len(body)):
                with srv.observed:
                    looks = srv.looks
                try:
                    self.wfile.write(body[index : index + 1])
                    self.wfile.flush()
                except OSError:
                    return  # cut off, as it should be
                if not srv.paced(looks):
                    return  # the fetcher has stopped reading: it cut the connection
                with srv.lock:
                    srv.now += 2.0
                    srv.sent += 1
            return
        try:
            self.wfile.write(body)
        except OSError:
            return  # the client hung up, as it should when told to
        with srv.lock:
            srv.sent += len(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def liar() -> Iterator[Callable[..., Liar]]:
    started: list[Liar] = []

    def start(*lies: str) -> Liar:
        server = Liar(*lies)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.release.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def fetcher(sleeps: list[float]) -> Iterator[Callable[..., HttpFetcher]]:
    made: list[HttpFetcher] = []

    def make(retries: int = 3, read_timeout: float = 5.0, **kwargs: Any) -> HttpFetcher:
        config = DownloadConfig(connect_timeout=2.0, read_timeout=read_timeout, retries=retries)
        made.append(HttpFetcher(config, **{"sleep": sleeps.append, **kwargs}))
        return made[-1]

    yield make
    for each in made:
        each.close()


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    (tmp_path / "incoming").mkdir()
    return tmp_path / "incoming" / "b.edgepack"


def nothing_left(dest: Path) -> bool:
    return not dest.exists() and not any(p.exists() for p in partial_paths(dest))


# -- downloads ---------------------------------------------------------------------------------


def test_plain_download_from_the_bundle_server(tmp_path: Path, fetcher, dest: Path) -> None:
    (tmp_path / "dist").mkdir()
    (tmp_path / "dist" / "b.edgepack").write_bytes(DATA)
    progress: list[tuple[int, int | None]] = []
    server = BundleServer(tmp_path / "dist", port=0).start()
    try:
        fetcher(on_progress=lambda done, total: progress.append((done, total))).fetch(
            f"{server.url}/b.edgepack",
            dest,
            10**9,
            expected_size=len(DATA),
            expected_sha256=sha(DATA),
        )
    finally:
        server.stop()
    assert dest.read_bytes() == DATA
    assert not any(p.exists() for p in partial_paths(dest))
    assert progress[-1] == (len(DATA), len(DATA))


def test_cut_midway_resumes_with_one_range_and_if_range(liar, fetcher, sleeps, dest: Path) -> None:
    server = liar("cut")
    fetcher().fetch(server.url, dest, 10**9, expected_sha256=sha(DATA))
    assert dest.read_bytes() == DATA
    assert server.requests == [
        {"Range": [], "If-Range": []},
        {"Range": [f"bytes={HALF}-"], "If-Range": ['"v1"']},
    ]
    assert server.sent == len(DATA)  # the first half was not sent twice
    assert len(sleeps) == 1


def test_a_server_that_ignores_range_restarts_from_zero(liar, fetcher, dest: Path) -> None:
    server = liar("cut", "ignore-range")
    fetcher().fetch(server.url, dest, 10**9, expected_sha256=sha(DATA))
    assert dest.read_bytes() == DATA
    assert server.requests[1]["Range"] == [f"bytes={HALF}-"]
    assert server.sent == HALF + len(DATA)


def test_without_a_validator_no_range_is_asked(liar, fetcher, dest: Path) -> None:
    server = liar("cut")
    server.etag = ""  # no ETag, no Last-Modified: a resumed file could be a mixture
    fetcher().fetch(server.url, dest, 10**9, expected_sha256=sha(DATA))
    assert dest.read_bytes() == DATA
    assert [r["Range"] for r in server.requests] == [[], []]


def test_a_206_for_the_wrong_range_restarts_from_zero(liar, fetcher, dest: Path) -> None:
    server = liar("cut", "wrong-range")
    fetcher().fetch(server.url, dest, 10**9, expected_sha256=sha(DATA))
    assert dest.read_bytes() == DATA
    assert [r["Range"] for r in server.requests] == [[], [f"bytes={HALF}-"], []]


def test_a_file_changed_between_attempts_is_fetched_whole(liar, fetcher, dest: Path) -> None:
    server, new = liar("cut"), os.urandom(len(DATA))
    swap = fetcher(sleep=lambda _: server.replace(new, '"v2"'))
    swap.fetch(server.url, dest, 10**9, expected_size=len(new), expected_sha256=sha(new))
    assert dest.read_bytes() == new
    assert server.requests[1] == {"Range": [f"bytes={HALF}-"], "If-Range": ['"v1"']}
    assert server.sent == HALF + len(new)  # If-Range did not match: the whole new file


@pytest.mark.parametrize(
    ("max_bytes", "expected_size"), [(len(DATA), None), (10**9, len(DATA))], ids=["max", "size"]
)
def test_a_body_past_the_cap_is_cut_off(liar, fetcher, dest, max_bytes, expected_size) -> None:
    server, progress = liar("overflow"), []
    with pytest.raises(BundleError, match=f"more than {len(DATA)} bytes"):
        fetcher(on_progress=lambda done, _: progress.append(done)).fetch(
            server.url, dest, max_bytes, expected_size=expected_size
        )
    assert max(progress) <= len(DATA)
    assert nothing_left(dest)


def test_a_content_length_above_the_cap_is_refused_before_reading(liar, fetcher, dest) -> None:
    progress: list[int] = []
    with pytest.raises(BundleError, match="above the limit"):
        fetcher(on_progress=lambda done, _: progress.append(done)).fetch(
            liar("huge-length").url, dest, 10**9
        )
    assert progress == []
    assert nothing_left(dest)


def test_redirects_are_followed_up_to_five(liar, fetcher, sleeps, dest: Path) -> None:
    server = liar("redirect", "redirect")
    fetcher().fetch(server.url, dest, 10**9, expected_sha256=sha(DATA))
    assert dest.read_bytes() == DATA
    looping = liar(*["redirect"] * 10)
    with pytest.raises(DownloadError, match="Exceeded maximum allowed redirects"):
        fetcher().fetch(looping.url, dest.with_name("loop"), 10**9)
    assert len(looping.requests) == 6  # the first and five redirects, not retried
    assert sleeps == []


def test_a_local_path_is_copied(tmp_path: Path, fetcher, dest: Path) -> None:
    (tmp_path / "b.edgepack").write_bytes(DATA)
    fetcher().fetch(str(tmp_path / "b.edgepack"), dest, 10**9)
    assert dest.read_bytes() == DATA


def test_a_wrong_sha256_keeps_nothing(liar, fetcher, dest: Path) -> None:
    with pytest.raises(BundleError, match=r"does not match .*corrupted or replaced"):
        fetcher().fetch(liar().url, dest, 10**9, expected_sha256="0" * 64)
    assert nothing_left(dest)


def test_404_fails_at_once(liar, fetcher, sleeps, dest: Path) -> None:
    server = liar("404")
    with pytest.raises(DownloadError, match=f"{server.url} answered HTTP 404"):
        fetcher().fetch(server.url, dest, 10**9)
    assert len(server.requests) == 1
    assert sleeps == []


def test_503_twice_then_success_backs_off(liar, fetcher, sleeps, dest: Path) -> None:
    server = liar("503", "503")
    fetcher().fetch(server.url, dest, 10**9, expected_sha256=sha(DATA))
    assert dest.read_bytes() == DATA
    assert len(sleeps) == 2
    assert 0.25 <= sleeps[0] <= 0.5 <= sleeps[1] <= 1.0  # 0.5 s doubling, jittered to 50-100 %


def test_a_server_that_is_down_fails_after_the_retries(fetcher, sleeps, dest: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed when the with ends: nobody listens there
    with pytest.raises(DownloadError, match="after 3 attempts: ConnectError"):
        fetcher(retries=2).fetch(f"http://127.0.0.1:{port}/b.edgepack", dest, 10**9)
    assert len(sleeps) == 2


def test_a_stalled_server_times_out_and_is_retried(liar, fetcher, dest: Path) -> None:
    server, began = liar("stall", "stall"), time.monotonic()
    with pytest.raises(DownloadError, match="after 2 attempts: ReadTimeout"):
        fetcher(retries=1, read_timeout=0.5).fetch(server.url, dest, 10**9)
    assert len(server.requests) == 2
    assert time.monotonic() - began < 4


def test_a_download_resumes_after_a_crash(liar, fetcher, dest: Path) -> None:
    server = liar("cut")
    with pytest.raises(DownloadError, match="after 1 attempt:"):
        fetcher(retries=0).fetch(server.url, dest, 10**9)
    part, sidecar = partial_paths(dest)
    assert part.stat().st_size == HALF
    assert json.loads(sidecar.read_text()) == {"url": server.url, "validator": '"v1"'}
    fetcher().fetch(server.url, dest, 10**9, expected_sha256=sha(DATA))  # after the restart
    assert dest.read_bytes() == DATA
    assert server.requests[-1] == {"Range": [f"bytes={HALF}-"], "If-Range": ['"v1"']}
    assert server.sent == len(DATA)
    assert not part.exists()
    assert not sidecar.exists()


def test_a_complete_part_is_checked_and_kept_on_416(tmp_path: Path, fetcher, dest: Path) -> None:
    (tmp_path / "dist").mkdir()
    (tmp_path / "dist" / "b.edgepack").write_bytes(DATA)
    server = BundleServer(tmp_path / "dist", port=0).start()
    url = f"{server.url}/b.edgepack"
    part, sidecar = partial_paths(dest)
    part.write_bytes(DATA)  # the power went after the last byte, before the rename
    sidecar.write_text(json.dumps({"url": url, "validator": f'"{sha(DATA)}"'}))
    progress: list[int] = []
    try:
        fetcher(on_progress=lambda done, _: progress.append(done)).fetch(
            url, dest, 10**9, expected_sha256=sha(DATA)
        )
    finally:
        server.stop()
    assert dest.read_bytes() == DATA
    assert progress == []  # the 416 carried no body: the part was checked as it was


# -- the bundle server -------------------------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[BundleServer, Path]]:
    dist = tmp_path / "dist"
    (dist / "sub").mkdir(parents=True)
    (dist / "b.edgepack").write_bytes(DATA)
    (dist / "c.edgepack").write_bytes(b"small bundle")
    (dist / "notes.txt").write_text("not a bundle")
    (dist / ".hidden.edgepack").write_bytes(b"hidden")
    (dist / "sub" / "inner.edgepack").write_bytes(b"inner")
    (tmp_path / "secret").write_text("outside")
    (dist / "link.edgepack").symlink_to(tmp_path / "secret")
    server = BundleServer(dist, port=0).start()
    yield server, dist
    server.stop()


@pytest.mark.parametrize(
    ("asked", "status", "content", "content_range"),
    [
        ("bytes=10-19", 206, DATA[10:20], f"bytes 10-19/{len(DATA)}"),
        ("bytes=100-", 206, DATA[100:], f"bytes 100-{len(DATA) - 1}/{len(DATA)}"),
        ("bytes=-100", 206, DATA[-100:], f"bytes {len(DATA) - 100}-{len(DATA) - 1}/{len(DATA)}"),
        ("bytes=5-999999999", 206, DATA[5:], f"bytes 5-{len(DATA) - 1}/{len(DATA)}"),
        (f"bytes={len(DATA)}-", 416, b"", f"bytes */{len(DATA)}"),
        ("bytes=0-1,5-6", 200, DATA, None),  # several ranges: the whole file
        ("bytes=9-3", 200, DATA, None),  # not a valid range: ignored
    ],
    ids=["a-b", "a-", "-n", "a-past-end", "unsatisfiable", "several", "invalid"],
)
def test_bundle_server_ranges(served, asked, status, content, content_range) -> None:
    server, _ = served
    answer = httpx.get(f"{server.url}/b.edgepack", headers={"Range": asked})
    assert (answer.status_code, answer.content) == (status, content)
    assert answer.headers.get("content-range") == content_range


def test_bundle_server_if_range_head_and_validators(served) -> None:
    server, _ = served
    url, etag = f"{server.url}/b.edgepack", f'"{sha(DATA)}"'
    head = httpx.head(url)
    assert (head.status_code, head.content) == (200, b"")
    assert head.headers["content-length"] == str(len(DATA))
    assert head.headers["etag"] == etag
    assert head.headers["accept-ranges"] == "bytes"
    assert head.headers["last-modified"]
    matching = httpx.get(url, headers={"Range": "bytes=7-", "If-Range": etag})
    assert (matching.status_code, matching.content) == (206, DATA[7:])
    stale = httpx.get(url, headers={"Range": "bytes=7-", "If-Range": '"old"'})
    assert (stale.status_code, stale.content) == (200, DATA)


@pytest.mark.parametrize(
    "path",
    [
        "/../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/..%2f..%2fetc%2fpasswd",
        "//etc/passwd",
        "http://127.0.0.1/etc/passwd",
        "/sub/inner.edgepack",
        "/sub",
        "/.hidden.edgepack",
        "/link.edgepack",
        "/missing.edgepack",
    ],
)
def test_bundle_server_serves_nothing_outside_its_directory(served, path: str) -> None:
    server, _ = served
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        connection.request("GET", path)  # sent as written: no client-side normalisation
        answer = connection.getresponse()
        assert (answer.status, answer.read()) == (404, b"not found\n")
    finally:
        connection.close()


def test_bundle_server_index_lists_bundles_with_their_sha256(served) -> None:
    server, _ = served
    index = httpx.get(f"{server.url}/").json()
    assert index == {
        "bundles": [
            {"name": "b.edgepack", "size": len(DATA), "sha256": sha(DATA)},
            {"name": "c.edgepack", "size": 12, "sha256": sha(b"small bundle")},
        ]
    }


# -- bounded time: the overall deadline and the minimum rate -------------------------------------


def paced(sleeps: list[float], server: Liar, **config: Any) -> HttpFetcher:
    """A fetcher on the server's fake clock, with these [download] settings."""
    settings = {"connect_timeout": 2.0, "read_timeout": 5.0, **config}
    return HttpFetcher(DownloadConfig(**settings), sleep=sleeps.append, clock=server.clock)


def test_a_byte_every_two_seconds_is_cut_off_by_the_minimum_rate(liar, sleeps, dest) -> None:
    server = liar("trickle", "trickle", "trickle")
    fetcher = paced(sleeps, server, retries=2, min_rate=100.0, min_rate_window=10.0)
    with pytest.raises(DownloadError) as caught:
        fetcher.fetch(server.url, dest, len(DATA), expected_sha256=sha(DATA))
    fetcher.close()
    message = str(caught.value)
    assert message.startswith(f"could not download {server.url} after 3 attempts: the server ")
    assert "below the [download] min_rate of 100 bytes/s" in message
    assert len(server.requests) == 3
    # three windows of 10 s; the server's clock may run on a byte or two after each cut
    assert 30.0 <= server.clock() <= 30.0 + 3 * 6.0
    assert server.requests[1]["Range"][0].startswith("bytes=")  # each retry resumes


def test_a_trickle_above_the_minimum_rate_still_ends_at_the_deadline(liar, sleeps, dest) -> None:
    server = liar("trickle")
    fetcher = paced(sleeps, server, retries=5, min_rate=0.0, deadline=60.0)
    with pytest.raises(DownloadError) as caught:
        fetcher.fetch(server.url, dest, len(DATA))
    fetcher.close()
    assert str(caught.value).startswith(
        f"could not download {server.url} within 60 s, the [download] deadline"
    )
    assert len(server.requests) == 1  # the deadline is final: no retry after it
    assert 60.0 <= server.clock() <= 66.0
    assert sleeps == []


def test_backoff_and_retries_stop_at_the_deadline(liar, sleeps, dest) -> None:
    """Retrying a slow server never outlives the deadline: the backoff is cut to what is left."""
    server = liar("trickle", "trickle", "trickle", "trickle")
    fetcher = paced(sleeps, server, retries=10, min_rate=100.0, min_rate_window=10.0, deadline=25.0)
    with pytest.raises(DownloadError, match="within 25 s, the \\[download\\] deadline"):
        fetcher.fetch(server.url, dest, len(DATA))
    fetcher.close()
    assert 2 <= len(server.requests) <= 3  # 10 s windows, then the deadline, not 11 attempts
    assert all(delay <= 25.0 for delay in sleeps)
