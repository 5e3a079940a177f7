"""HttpSender and ExportQueue against real misbehaving servers on 127.0.0.1.

Trickling and endless response bodies, a persistent 500, spans the encoder refuses, an egress
proxy and a private CA taken from the environment, credentials that must not replace ours.
"""

from __future__ import annotations

import base64
import http.client
import http.server
import itertools
import logging
import shutil
import socket
import ssl
import subprocess
import threading
import time
import tracemalloc
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanContext, TraceFlags

from langfuse_mw._encode import encode_request
from langfuse_mw.devserver import DevServer
from langfuse_mw.export import ExportQueue, HttpSender, Outcome
from tests.servers import local_receiver

PK, SK = "pk-lf-export-faults", "sk-lf-export-faults"
INGEST_PATH = "/api/public/otel/v1/traces"
AUTH = {
    "Authorization": "Basic " + base64.b64encode(f"{PK}:{SK}".encode()).decode(),
    "x-langfuse-ingestion-version": "4",
}

# A handler answers one request on the connection; returning True closes the connection.
Handler = Callable[[socket.socket, int], bool | None]


class RawServer:
    """An HTTP/1.1 server on a raw socket, for answers no well-behaved server would give.

    ``posts`` holds the monotonic time at which each request arrived.
    """

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None = None) -> None:
        self._handler = handler
        self._tls = tls
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self._sock.getsockname()[1]}"
        self.posts: list[float] = []
        self._lock = threading.Lock()
        self._connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        try:
            if self._tls is not None:
                connection = self._tls.wrap_socket(connection, server_side=True)
            self._connections.append(connection)
            reader = connection.makefile("rb")
            while reader.readline():  # the request line
                length = 0
                while (line := reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                reader.read(length)
                with self._lock:
                    self.posts.append(time.monotonic())
                    n = len(self.posts)
                if self._handler(connection, n):
                    break
        except (OSError, ssl.SSLError):
            pass  # the client hung up: what several of these tests want
        finally:
            connection.close()

    def close(self) -> None:
        self._sock.close()
        for connection in self._connections:
            connection.close()


def answer(status: int, body: bytes = b"{}", headers: str = "") -> Handler:
    head = f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode()

    def handle(connection: socket.socket, n: int) -> None:
        connection.sendall(head + body)

    return handle


def trickle(status: int, declared: int) -> Handler:
    """Headers at once, then one byte of the body every 0.1 s, never all of it."""

    def handle(connection: socket.socket, n: int) -> bool:
        connection.sendall(f"HTTP/1.1 {status} X\r\nContent-Length: {declared}\r\n\r\n".encode())
        for _ in range(declared - 1):
            connection.sendall(b"x")
            time.sleep(0.1)
        return True

    return handle


def trickle_headers(n_slow: int) -> Handler:
    """Request ``n_slow`` and earlier: the status line, then a header one byte every 0.1 s,
    never ending (a proxy gone wrong). Later requests: a plain 200."""

    def handle(connection: socket.socket, n: int) -> bool:
        if n > n_slow:
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            return False
        connection.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        for _ in range(600):
            connection.sendall(b"x")
            time.sleep(0.1)
        return True

    return handle


@pytest.fixture
def servers() -> Iterator[list[RawServer]]:
    started: list[RawServer] = []
    yield started
    for server in started:
        server.close()


def serve(servers: list[RawServer], handler: Handler, tls: ssl.SSLContext | None = None) -> str:
    server = RawServer(handler, tls)
    servers.append(server)
    return server.url


@pytest.fixture
def receiver() -> Iterator[DevServer]:
    yield from local_receiver(PK, SK)


def span(n: int, **attributes: Any) -> ReadableSpan:
    context = SpanContext(n, n, False, TraceFlags(TraceFlags.SAMPLED))
    return ReadableSpan(
        name=f"s{n}", context=context, start_time=1, end_time=2, attributes=attributes
    )


def balanced(stats: dict[str, Any]) -> bool:
    return bool(
        stats["created"] == stats["exported"] + sum(stats["dropped"].values()) + stats["queued"]
    )


def wait_until(condition: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def post_in_thread(sender: HttpSender, timeout: float) -> tuple[threading.Thread, list[Outcome]]:
    outcomes: list[Outcome] = []
    thread = threading.Thread(target=lambda: outcomes.append(sender.post(b"", timeout)))
    thread.daemon = True
    thread.start()
    return thread, outcomes


# -- a total deadline per attempt; the body read capped --------------------------------------


@pytest.mark.parametrize(
    ("status", "declared", "expected"),
    [
        (200, 100, "sent"),  # a small 2xx body is read for keep-alive, within the deadline
        (200, 100_000, "sent"),  # a large one is not read at all
        (400, 100_000, "rejected"),  # the status decides: dropped, not retried forever
        (503, 100_000, "retry"),
    ],
)
def test_a_trickling_body_cannot_hold_an_attempt_past_its_deadline(
    servers: list[RawServer], status: int, declared: int, expected: str
) -> None:
    sender = HttpSender(serve(servers, trickle(status, declared)) + INGEST_PATH, {})
    timeout = 1.0
    thread, outcomes = post_in_thread(sender, timeout)
    # The requirement's own bound: the attempt is over at its deadline (plus slack for a
    # loaded machine), not when the server finishes (it never does).
    thread.join(timeout + 2.0)
    assert not thread.is_alive()
    [outcome] = outcomes
    if expected == "sent":
        assert outcome.ok
    elif expected == "rejected":
        assert outcome.drop_reason == "rejected" and not outcome.retry
        assert outcome.error is not None and "'xxx" in outcome.error  # what arrived in time
    else:
        assert outcome.retry and outcome.error is not None
        assert outcome.error.startswith("HTTP 503")
    sender.close()


def test_trickling_headers_cannot_hold_an_attempt_past_its_deadline(
    servers: list[RawServer],
) -> None:
    # httpx's timeouts are per read: headers that trickle in byte by byte would hold the
    # attempt as long as they last. A watchdog closes the connection at the deadline.
    sender = HttpSender(serve(servers, trickle_headers(1)) + INGEST_PATH, {})
    timeout = 1.0
    thread, outcomes = post_in_thread(sender, timeout)
    thread.join(timeout + 2.0)  # the requirement's bound, with slack for a loaded machine
    assert not thread.is_alive()
    [outcome] = outcomes
    assert outcome.retry and not outcome.ok
    assert outcome.error is not None
    assert outcome.error.startswith("no complete answer within 1.0s: http://127.0.0.1:")
    assert sender.post(b"", timeout).ok  # the next attempt has connections of its own
    sender.close()


def test_a_trickling_langfuse_opens_the_breaker_instead_of_stalling_export(
    servers: list[RawServer],
) -> None:
    url = serve(servers, trickle(503, 100_000))
    q = ExportQueue(
        HttpSender(url + INGEST_PATH, {}), flush_interval=0.02, export_timeout=0.5,
        backoff_base=0.05, backoff_cap=0.2,
    )  # fmt: skip
    try:
        for n in range(5):
            q.emit(span(n + 1))
        # Each attempt ends at its deadline and counts as a failure: the breaker opens and
        # health says why, instead of one attempt holding the thread for good.
        assert wait_until(lambda: q.stats()["failed_exports"] >= 2), q.stats()
        stats = q.stats()
        assert stats["breaker"] in ("open", "half-open"), stats
        assert stats["last_error"].startswith("HTTP 503"), stats
        assert balanced(stats) and stats["queued"] == 5, stats
    finally:
        q.shutdown(0.2)


def test_a_huge_error_body_is_never_read_into_memory(servers: list[RawServer]) -> None:
    size = 32 * 1024 * 1024
    chunk = b"<html>" + b"x" * (1024 * 1024 - 6)
    sent = []

    def huge(connection: socket.socket, n: int) -> bool:
        connection.sendall(f"HTTP/1.1 502 Bad Gateway\r\nContent-Length: {size}\r\n\r\n".encode())
        for _ in range(size // len(chunk)):
            connection.sendall(chunk)
            sent.append(len(chunk))
        return True

    sender = HttpSender(serve(servers, huge) + INGEST_PATH, {})
    tracemalloc.start()
    try:
        outcome = sender.post(b"", 10.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert outcome.retry and outcome.error is not None
    assert outcome.error.startswith("HTTP 502") and "'<html>xxx" in outcome.error
    # Only the first few KiB were kept: far less memory than the body (the kernel's socket
    # buffers aside, the server could not even send most of it before the client hung up).
    assert peak < size // 8, peak
    sender.close()


# -- one span the encoder refuses costs that span only -----------------------------------------


def unencodable(n: int) -> ReadableSpan:
    bad = span(n, odd={"a set"})  # a set is no OTLP value: the encoder refuses it
    with pytest.raises(TypeError):
        encode_request([bad])
    return bad


def test_one_unencodable_span_is_dropped_alone(receiver: DevServer, caplog: Any) -> None:
    # One batch of five: it goes out when complete, not at a flush interval halfway through.
    q = ExportQueue(
        HttpSender(receiver.url + INGEST_PATH, AUTH), max_batch_size=5, flush_interval=10
    )
    with caplog.at_level(logging.WARNING, logger="langfuse_mw"):
        for n in range(1, 6):
            q.emit(unencodable(n) if n == 3 else span(n))
        assert q.flush(10)
    stats = q.stats()
    assert sorted(s["name"] for s in receiver.received_spans()) == ["s1", "s2", "s4", "s5"]
    assert stats["exported"] == 4 and stats["dropped"] == {"encoding": 1}, stats
    assert balanced(stats) and stats["queued"] == 0, stats
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "dropped 1 of 5 spans that could not be encoded" in messages[0]
    assert "TypeError" in messages[0]
    q.shutdown(1)


def test_unencodable_spans_are_counted_once_while_the_rest_is_retried(
    receiver: DevServer,
) -> None:
    receiver.set_fault(status=503)
    # One batch of six: it goes out when complete, not at a flush interval halfway through.
    q = ExportQueue(
        HttpSender(receiver.url + INGEST_PATH, AUTH),
        max_batch_size=6,
        flush_interval=10,
        backoff_base=0.05,
        backoff_cap=0.1,
    )  # fmt: skip
    for n in range(1, 7):
        q.emit(unencodable(n) if n % 3 == 0 else span(n))
    assert wait_until(lambda: receiver.request_count >= 3)  # the rest, retried
    stats = q.stats()
    assert stats["dropped"] == {"encoding": 2} and stats["queued"] == 4, stats
    assert balanced(stats), stats
    receiver.clear_fault()
    assert q.flush(10)
    stats = q.stats()
    assert stats["exported"] == 4 and stats["dropped"] == {"encoding": 2}, stats
    assert balanced(stats), stats
    assert sorted(s["name"] for s in receiver.received_spans()) == ["s1", "s2", "s4", "s5"]
    q.shutdown(1)


def test_a_batch_of_unencodable_spans_is_dropped_without_a_post(receiver: DevServer) -> None:
    q = ExportQueue(HttpSender(receiver.url + INGEST_PATH, AUTH), flush_interval=0.02)
    for n in range(1, 4):
        q.emit(unencodable(n))
    assert q.flush(10)
    stats = q.stats()
    assert stats["dropped"] == {"encoding": 3} and balanced(stats), stats
    assert receiver.request_count == 0
    q.shutdown(1)


# -- a persistent 500: one probe per back-off step --------------------------------------------


def test_a_persistent_500_gets_one_probe_per_back_off_step(servers: list[RawServer]) -> None:
    server = RawServer(answer(500, b'{"message":"Internal Server Error"}'))
    servers.append(server)
    base, cap = 0.1, 0.4
    q = ExportQueue(
        HttpSender(server.url + INGEST_PATH, {}), max_batch_size=5, flush_interval=0.02,
        backoff_base=base, backoff_cap=cap,
    )  # fmt: skip
    try:
        for n in range(50):
            q.emit(span(n + 1))
        # Nine POSTs: three batches given up after their three attempts each.
        assert wait_until(lambda: len(server.posts) >= 9)
        stats = q.stats()
    finally:
        q.shutdown(0.2)
    posts = server.posts[:9]
    assert stats["dropped"].get("server_error", 0) >= 10, stats  # batches of 5 given up
    # Every POST, including the first one after a batch was given up, waited at least the
    # shortest jittered delay of its back-off step (d/2 of d = min(cap, base * 2^(k-1))).
    gaps = [b - a for a, b in itertools.pairwise(posts)]
    for step, gap in enumerate(gaps, start=1):
        least = min(cap, base * 2 ** (step - 1)) / 2
        assert gap >= least - 0.02, (step, gap, least, gaps)


# -- proxies, CAs and credentials from the environment ----------------------------------------

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te"}


class ForwardProxy:
    """An HTTP forward proxy: takes absolute-URI requests and forwards them, counting them.

    Host names are resolved through ``hosts`` only: a name it does not know is a 502.
    """

    def __init__(self, hosts: dict[str, str]) -> None:
        self.seen: list[str] = []
        proxy = self

        class ProxyHandler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                target = urllib.parse.urlsplit(self.path)  # absolute-form: http://host:port/p
                proxy.seen.append(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                address = hosts.get(target.hostname or "")
                if target.scheme != "http" or address is None:
                    self._reply(502, [], b"unknown host")
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                upstream = http.client.HTTPConnection(address, target.port or 80, timeout=10)
                try:
                    path = target.path + (f"?{target.query}" if target.query else "")
                    upstream.request("POST", path, body, headers)
                    response = upstream.getresponse()
                    data = response.read()
                    kept = [
                        (k, v) for k, v in response.getheaders()
                        if k.lower() not in HOP_BY_HOP | {"content-length"}
                    ]  # fmt: skip
                    self._reply(response.status, kept, data)
                finally:
                    upstream.close()

            def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ProxyHandler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def clear_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


def test_export_goes_through_the_proxy_named_by_the_environment(
    receiver: DevServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = int(receiver.url.rsplit(":", 1)[1])
    # Reachable only through the proxy: the name resolves nowhere else.
    proxy = ForwardProxy({"langfuse.egress-only.invalid": "127.0.0.1"})
    clear_proxy_env(monkeypatch)
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("http_proxy", proxy.url)
    try:
        url = f"http://langfuse.egress-only.invalid:{port}{INGEST_PATH}"
        q = ExportQueue(HttpSender(url, AUTH), flush_interval=0.02)
        for n in range(1, 4):
            q.emit(span(n))
        assert q.flush(10), q.stats()
        stats = q.stats()
        assert stats["exported"] == 3 and stats["dropped"] == {}, stats
        assert sorted(s["name"] for s in receiver.received_spans()) == ["s1", "s2", "s3"]
        assert len(proxy.seen) == receiver.request_count >= 1
        assert all(seen.startswith(url) for seen in proxy.seen), proxy.seen
        q.shutdown(1)

        # NO_PROXY is honoured as well: this host is reached directly.
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        q = ExportQueue(HttpSender(receiver.url + INGEST_PATH, AUTH), flush_interval=0.02)
        q.emit(span(4))
        assert q.flush(10) and q.stats()["exported"] == 1, q.stats()
        assert len(proxy.seen) == receiver.request_count - 1
        q.shutdown(1)
    finally:
        proxy.close()


def test_neither_netrc_nor_url_credentials_replace_our_authorization(
    receiver: DevServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    clear_proxy_env(monkeypatch)
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine 127.0.0.1 login pk-lf-netrc password sk-lf-netrc\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(netrc))
    url = receiver.url.replace("http://", "http://pk-lf-url:sk-lf-url@") + INGEST_PATH
    q = ExportQueue(HttpSender(url, AUTH), flush_interval=0.02)
    q.emit(span(1))
    assert q.flush(10)
    stats = q.stats()
    # The receiver checks the credentials: only ours are right.
    assert stats["exported"] == 1 and stats["dropped"] == {}, stats
    q.shutdown(1)


def test_a_redirect_is_not_followed(servers: list[RawServer]) -> None:
    target = RawServer(answer(200))
    servers.append(target)
    location = f"Location: {target.url}{INGEST_PATH}\r\n"
    sender = HttpSender(serve(servers, answer(307, b"", location)) + INGEST_PATH, {})
    outcome = sender.post(b"", 5.0)
    assert outcome.drop_reason == "redirect" and not outcome.ok, outcome
    assert target.posts == []
    sender.close()


def make_ca_and_server_cert(directory: Path) -> tuple[Path, Path, Path]:
    """A private CA and a certificate it signed for 127.0.0.1 (with the openssl command)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make a private CA")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=directory, check=True, capture_output=True)

    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=langfuse_mw test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (directory / "ext.cnf").write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
    )
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")  # fmt: skip
    return directory / "ca.pem", directory / "server.pem", directory / "server.key"


def test_a_private_ca_named_by_ssl_cert_file_is_trusted(
    servers: list[RawServer], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ca, cert, key = make_ca_and_server_cert(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    url = serve(servers, answer(200), tls)
    clear_proxy_env(monkeypatch)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    sender = HttpSender(url + INGEST_PATH, {})
    outcome = sender.post(b"", 5.0)
    assert outcome.ok, outcome
    sender.close()
