"""TracedClient / AsyncTracedClient and the wrapping transports, against httpx.MockTransport
and, where the body matters, a real HTTP server on 127.0.0.1 (``Target``, shared with
test_requests)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import gzip
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import zstandard

from langfuse_mw.config import resolve_settings
from langfuse_mw.core import RequestInfo, RequestState, RequestTracer, SampledOut
from langfuse_mw.httpx import (
    AsyncTracedClient,
    AsyncTracingTransport,
    TracedClient,
    TracingTransport,
)
from langfuse_mw.testing import LangfuseCapture

pytestmark = pytest.mark.anyio

ID_HEADERS = ("baggage", "x-request-id")
GZIP_TEXT = b"hello " * 100


class Recorder:
    """A MockTransport handler that records what was sent and answers as told."""

    def __init__(self, status: int = 200, redirect_to: str | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.status = status
        self.redirect_to = redirect_to

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.redirect_to and len(self.requests) == 1:
            return httpx.Response(302, headers={"location": self.redirect_to})
        return httpx.Response(self.status, text="ok")


class Target:
    """A real HTTP server that records the headers of every request it gets."""

    def __init__(self) -> None:
        self.received: list[dict[str, str]] = []
        target = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                self.do_GET()

            def do_GET(self) -> None:
                target.received.append({k.lower(): v for k, v in self.headers.items()})
                path, _, query = self.path.partition("?")
                if path == "/redirect":
                    self.answer(302, b"", [("Location", query.removeprefix("to="))])
                elif path.startswith("/status/"):
                    self.answer(int(path.rsplit("/", 1)[1]), b"status")
                elif path == "/stream":
                    self.stream([b"a", b"b", b"c"], delay=0.1)
                elif path == "/bad-gzip-trailer":
                    # Decodes to GZIP_TEXT, then the trailer's checksum is wrong: its own chunk.
                    whole = gzip.compress(GZIP_TEXT)
                    trailer = bytes([whole[-8] ^ 0xFF]) + whole[-7:]
                    self.stream([whole[:-8], trailer], [("Content-Encoding", "gzip")])
                elif path == "/short-zstd":
                    # A zstd frame cut short: every chunk decodes, the end is found missing
                    # only when httpx flushes the decoder, after the stream was closed.
                    whole = zstandard.ZstdCompressor().compress(GZIP_TEXT * 50)
                    self.stream([whole[: len(whole) // 2]], [("Content-Encoding", "zstd")])
                elif path == "/bad-gzip":
                    self.answer(200, b"not gzip at all" * 10, [("Content-Encoding", "gzip")])
                elif path == "/broken":
                    # Announces 100 bytes, sends 5 and hangs up.
                    self.send_response(200)
                    self.send_header("Content-Length", "100")
                    self.end_headers()
                    self.wfile.write(b"short")
                    self.close_connection = True
                elif path == "/broken-chunked":
                    # One chunk, and it hangs up before the last one.
                    self.send_response(200)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    self.wfile.write(b"1\r\na\r\n")
                    self.close_connection = True
                else:
                    self.answer(200, b"ok")

            def answer(self, code: int, body: bytes, headers: Any = ()) -> None:
                self.send_response(code)
                for name, value in headers:
                    self.send_header(name, value)
                if code not in (204, 304):
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD" and code not in (204, 304):
                    self.wfile.write(body)

            def stream(self, chunks: Any, headers: Any = (), delay: float = 0.0) -> None:
                self.send_response(200)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for chunk in chunks:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                    time.sleep(delay)
                self.wfile.write(b"0\r\n\r\n")

        class Quiet(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that closed a stream early: expected here

        self.server = Quiet(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def assert_call_context(sent: Any, root: dict[str, Any], call: dict[str, Any]) -> None:
    """The call is the request's child, and carries its trace, request id, user and session
    (req-1, u-1, s-1) to an internal target."""
    assert call["parent_span_id"] == root["span_id"]
    assert sent["traceparent"] == f"00-{root['trace_id']}-{call['span_id']}-01"
    assert sent["x-request-id"] == "req-1"
    entries = dict(item.split("=") for item in sent["baggage"].split(","))
    assert entries == {
        "langfuse_trace_id": root["trace_id"],
        "langfuse_user_id": "u-1",
        "langfuse_session_id": "s-1",
    }


@contextlib.contextmanager
def in_request(
    sample_rate: float = 1.0, lazy: bool = False, **headers: str
) -> Iterator[RequestState]:
    """A request being served; ``lazy``: begun as adapters begin one that may be dropped."""
    tracer = RequestTracer(resolve_settings({"sample_rate": sample_rate}))
    values = {k.replace("_", "-"): v for k, v in headers.items()}
    info = RequestInfo("GET", "/checkout", headers=values)
    if lazy:
        rid = values.get("x-request-id")
        obs = tracer.begin_lazy(
            "/checkout", rid, values.get("traceparent"), None, values.get("baggage"),
            lambda: info,
        )  # fmt: skip
    else:
        obs = tracer.begin(info)
    assert obs is not None
    obs.set_route("/checkout")
    try:
        yield obs
    finally:
        obs.set_status(200)
        obs.end()
        obs.detach()


def sync_get(url: str, recorder: Recorder, **options: Any) -> httpx.Response:
    with TracedClient(transport=httpx.MockTransport(recorder), **options) as client:
        return client.get(url)


async def async_get(url: str, recorder: Recorder, **options: Any) -> httpx.Response:
    async with AsyncTracedClient(transport=httpx.MockTransport(recorder), **options) as client:
        return await client.get(url)


@pytest.fixture(params=["sync", "async"])
def get(request: pytest.FixtureRequest) -> Any:
    async def call(url: str, recorder: Recorder, **options: Any) -> httpx.Response:
        if request.param == "sync":
            return sync_get(url, recorder, **options)
        return await async_get(url, recorder, **options)

    return call


async def test_internal_target_gets_trace_context_and_ids(
    langfuse_capture: LangfuseCapture, get: Any
) -> None:
    recorder = Recorder()
    with in_request(x_user_id="u-1", x_session_id="s-1", x_request_id="req-1"):
        await get("http://inventory:8000/stock/7?token=abc&page=2", recorder)
    sent = recorder.requests[0].headers
    call = langfuse_capture.single(name="GET inventory/stock/7")
    root = langfuse_capture.single(name="GET /checkout")
    assert_call_context(sent, root, call)
    assert call["user_id"] == "u-1" and call["session_id"] == "s-1"
    assert call["output"] == {"statusCode": 200}
    assert call["input"] == {
        "method": "GET",
        "url": "http://inventory:8000/stock/7?token=[REDACTED]&page=2",
    }
    assert call["metadata"] == {"host": "inventory", "requestId": "req-1"}
    assert call["kind"] == 3  # SPAN_KIND_CLIENT


@pytest.mark.parametrize("lazy", [False, True], ids=["begin", "begin_lazy"])
async def test_a_sampled_out_request_passes_its_decision_and_ids_on(
    langfuse_capture: LangfuseCapture, get: Any, lazy: bool
) -> None:
    recorder = Recorder()
    ids = {"x_user_id": "u-1", "x_session_id": "s-1", "x_request_id": "r-1"}
    with in_request(sample_rate=0.0, lazy=lazy, **ids) as obs:
        assert isinstance(obs, SampledOut) is lazy
        await get("http://inventory:8000/stock/7", recorder)
    sent = recorder.requests[0].headers
    assert sent["traceparent"].endswith("-00")  # the callee follows the decision
    entries = dict(item.split("=") for item in sent["baggage"].split(","))
    # If the callee fails it is exported anyway, with the caller's user and session.
    assert entries == {"langfuse_user_id": "u-1", "langfuse_session_id": "s-1"}
    assert sent["x-request-id"] == "r-1"
    assert langfuse_capture.spans() == []


@pytest.mark.parametrize("lazy", [False, True], ids=["begin", "begin_lazy"])
async def test_a_sampled_out_continued_request_passes_the_callers_baggage_on(
    langfuse_capture: LangfuseCapture, get: Any, lazy: bool
) -> None:
    recorder = Recorder()
    caller = {
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        "baggage": "tenant=acme,langfuse_user_id=u-b,langfuse_session_id=s-b",
    }
    with in_request(sample_rate=0.5, lazy=lazy, **caller) as obs:
        assert isinstance(obs, SampledOut) is lazy
        await get("http://inventory:8000/stock/7", recorder)
    sent = recorder.requests[0].headers
    assert sent["traceparent"].startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-")
    assert sent["traceparent"].endswith("-00")
    entries = dict(item.split("=") for item in sent["baggage"].split(","))
    assert entries == {"tenant": "acme", "langfuse_user_id": "u-b", "langfuse_session_id": "s-b"}
    assert langfuse_capture.spans() == []


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:9000/x", "http://10.2.3.4/x", "http://orders.svc.cluster.local/x",
     "http://billing.internal/x", "http://localhost:8080/x", "http://[::1]:81/x"],
)  # fmt: skip
async def test_the_default_allow_list_is_the_internal_network(
    langfuse_capture: LangfuseCapture, url: str
) -> None:
    recorder = Recorder()
    with in_request(x_user_id="u-1"):
        sync_get(url, recorder)
    assert "langfuse_user_id=u-1" in recorder.requests[0].headers["baggage"]


@pytest.mark.parametrize(
    "url",
    [
        "https://api.openai.com/v1/chat", "http://8.8.8.8/x", "http://billing.internal.evil.com/x",
        # 8.8.8.8 in the forms the resolver also takes: not single-label internal names.
        "http://134744072/x", "http://0x08080808/x", "http://8.8.2056/x",
    ],
)  # fmt: skip
async def test_public_targets_get_trace_headers_only(
    langfuse_capture: LangfuseCapture, get: Any, url: str
) -> None:
    recorder = Recorder()
    with in_request(x_user_id="u-1", x_request_id="req-1"):
        await get(url, recorder)
    sent = recorder.requests[0].headers
    assert "traceparent" in sent
    assert not any(name in sent for name in ID_HEADERS)


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://api.internal/v1", True),
        ("https://api.internal.evil.com/v1", False),
        ("https://evil.com/?u=api.internal", False),
        ("https://api.internal@evil.com/", False),
        ("https://user@evil.com/", False),
        ("https://api.internal:8443/v1", False),
        ("http://api.internal/v1", False),
    ],
)
async def test_allow_list_origins_are_matched_exactly(
    langfuse_capture: LangfuseCapture, get: Any, url: str, allowed: bool
) -> None:
    recorder = Recorder()
    with in_request(x_user_id="u-1", x_request_id="req-1"):
        await get(url, recorder, propagate_to=["https://api.internal"])
    sent = recorder.requests[0].headers
    assert ("baggage" in sent) is allowed
    assert ("x-request-id" in sent) is allowed


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://alice:s3cret@inventory:8000/x?token=s3cret&page=2#frag-s3cret",
         "http://REDACTED:REDACTED@inventory:8000/x?token=[REDACTED]&page=2"),
        ("https://s3cret@inventory/x", "https://REDACTED@inventory/x"),
        ("http://inventory/plain", "http://inventory/plain"),
    ],
)  # fmt: skip
async def test_credentials_and_fragments_of_a_url_are_never_exported(
    langfuse_capture: LangfuseCapture, get: Any, url: str, shown: str
) -> None:
    # OpenTelemetry's url.full rule: user and password become REDACTED; a fragment is never
    # sent over HTTP (an OAuth redirect may carry a token there), so it is not shown either.
    recorder = Recorder()
    with in_request():
        await get(url, recorder)
    (call,) = [s for s in langfuse_capture.spans() if s["name"].startswith("GET inventory/")]
    assert call["input"]["url"] == shown
    assert b"s3cret" not in b"".join(langfuse_capture.sender.requests)


async def test_a_redirect_off_the_list_loses_the_ids(
    langfuse_capture: LangfuseCapture, get: Any
) -> None:
    recorder = Recorder(redirect_to="https://evil.com/landing")
    transport = httpx.MockTransport(recorder)
    with (
        in_request(x_user_id="u-1", x_request_id="req-1"),
        TracedClient(transport=transport, follow_redirects=True) as client,
    ):
        client.get("http://inventory/start")
    first, second = (r.headers for r in recorder.requests)
    assert "baggage" in first and "x-request-id" in first
    assert "traceparent" in second
    assert not any(name in second for name in ID_HEADERS)
    assert first["traceparent"] != second["traceparent"]  # each hop is its own observation
    assert len(langfuse_capture.spans(name="GET inventory/start")) == 1
    assert len(langfuse_capture.spans(name="GET evil.com/landing")) == 1


async def test_host_patterns_networks_and_regexes(langfuse_capture: LangfuseCapture) -> None:
    options = {"propagate_to": ["*.corp.example", "192.168.0.0/16", r"re:https://x\.io/api/.*"]}
    cases = {
        "https://a.corp.example/": True,
        "https://corp.example.evil/": False,
        "http://192.168.4.4/": True,
        "https://x.io/api/v1": True,
        "https://x.io/other": False,
        "http://inventory/": False,  # an explicit list replaces the internal default
    }
    for url, allowed in cases.items():
        recorder = Recorder()
        with in_request(x_user_id="u-1"):
            sync_get(url, recorder, **options)
        assert ("baggage" in recorder.requests[0].headers) is allowed, url


async def test_headers_the_caller_set_are_never_overwritten(
    langfuse_capture: LangfuseCapture, get: Any
) -> None:
    recorder = Recorder()
    preset = {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01", "baggage": "mine=1",
              "x-request-id": "caller"}  # fmt: skip
    transport = httpx.MockTransport(recorder)
    with (
        in_request(x_user_id="u-1", x_request_id="req-1"),
        TracedClient(transport=transport, headers=preset) as client,
    ):
        client.get("http://inventory/x")
    sent = recorder.requests[0].headers
    assert {k: sent[k] for k in preset} == preset


async def test_calls_to_langfuse_itself_are_left_alone(
    langfuse_capture: LangfuseCapture, get: Any
) -> None:
    recorder = Recorder()
    with in_request(x_user_id="u-1"):
        # The capture runtime's base_url is http://127.0.0.1:9.
        await get("http://127.0.0.1:9/api/public/traces", recorder)
    sent = recorder.requests[0].headers
    assert not any(name in sent for name in ("traceparent", *ID_HEADERS))
    assert langfuse_capture.spans(name="GET 127.0.0.1/api/public/traces") == []


async def test_errors_are_recorded_and_reraised_unchanged(
    langfuse_capture: LangfuseCapture, get: Any
) -> None:
    failure = httpx.ConnectError("connection refused")

    def refuse(request: httpx.Request) -> httpx.Response:
        raise failure

    transport = httpx.MockTransport(refuse)
    with (
        in_request(),
        pytest.raises(httpx.ConnectError) as info,
        TracedClient(transport=transport) as client,
    ):
        client.get("http://inventory/x")
    assert info.value is failure
    call = langfuse_capture.single(name="GET inventory/x")
    assert call["level"] == "ERROR"
    assert call["status_message"] == "ConnectError: connection refused"
    assert call["output"] == {"statusCode": None}

    with in_request():
        await get("http://inventory/y", Recorder(status=503))
    failed = langfuse_capture.single(name="GET inventory/y")
    assert (failed["level"], failed["status_message"]) == ("ERROR", "HTTP 503")


async def test_an_error_that_quotes_the_url_is_exported_without_its_secrets(
    langfuse_capture: LangfuseCapture,
) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"cannot reach {request.url}")

    transport = httpx.MockTransport(refuse)
    with (
        in_request(),
        TracedClient(transport=transport) as client,
        pytest.raises(httpx.ConnectError),
    ):
        client.get("http://bob:pa55word@inventory/x?api_key=k-SECRET-9&code=7&page=2")
    call = langfuse_capture.single(name="GET inventory/x")
    assert call["status_message"] == (
        "ConnectError: cannot reach "
        "http://REDACTED:REDACTED@inventory/x?api_key=[REDACTED]&code=[REDACTED]&page=2"
    )
    exported = b"".join(langfuse_capture.sender.requests)
    assert b"k-SECRET-9" not in exported and b"pa55word" not in exported


async def test_outside_a_request_nothing_is_started_unless_asked(
    langfuse_capture: LangfuseCapture, get: Any
) -> None:
    recorder = Recorder()
    await get("http://inventory/job", recorder)
    assert "traceparent" not in recorder.requests[0].headers
    assert langfuse_capture.spans() == []
    await get("http://inventory/job", recorder, trace_outside_requests=True)
    call = langfuse_capture.single(name="GET inventory/job")
    assert call["parent_span_id"] is None
    assert recorder.requests[1].headers["traceparent"].split("-")[1] == call["trace_id"]


async def test_streamed_bodies_end_the_call_when_closed(langfuse_capture: LangfuseCapture) -> None:
    def stream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=iter([b"a", b"b", b"c"]))

    transport = httpx.MockTransport(stream)
    with (
        in_request(),
        TracedClient(transport=transport) as client,
        client.stream("GET", "http://llm.internal/v1/stream") as response,
    ):
        assert langfuse_capture.spans(name="GET llm.internal/v1/stream") == []
        assert b"".join(response.iter_bytes()) == b"abc"
    assert langfuse_capture.single(name="GET llm.internal/v1/stream")["output"] == {
        "statusCode": 200
    }


async def test_wrapping_an_existing_clients_transport(langfuse_capture: LangfuseCapture) -> None:
    recorder = Recorder()
    transport = AsyncTracingTransport(httpx.MockTransport(recorder))
    with in_request(x_user_id="u-2"):
        async with httpx.AsyncClient(transport=transport) as client:
            await client.get("http://inventory/z")
    assert "langfuse_user_id=u-2" in recorder.requests[0].headers["baggage"]
    assert langfuse_capture.single(name="GET inventory/z")["user_id"] == "u-2"


async def test_mounted_transports_are_traced_too(langfuse_capture: LangfuseCapture) -> None:
    default, mounted = Recorder(), Recorder()
    mounts = {"http://special": httpx.MockTransport(mounted)}
    with in_request(), TracedClient(transport=httpx.MockTransport(default), mounts=mounts) as c:
        c.get("http://special/a")
        c.get("http://other/b")
    assert "traceparent" in mounted.requests[0].headers
    assert "traceparent" in default.requests[0].headers
    assert {s["name"] for s in langfuse_capture.spans()} >= {"GET special/a", "GET other/b"}


async def test_the_apps_request_is_left_as_it_was(
    langfuse_capture: LangfuseCapture, get: Any
) -> None:
    # The headers go on a copy: response.request and the redirect httpx prepares from it
    # carry nothing of ours, whoever sends them next.
    recorder = Recorder(redirect_to="https://evil.com/landing")
    with in_request(x_user_id="u-1", x_request_id="req-1"):
        response = await get("http://inventory/start", recorder)
    assert "baggage" in recorder.requests[0].headers
    for headers in (response.request.headers, response.next_request.headers):
        assert not any(name in headers for name in ("traceparent", *ID_HEADERS))


async def test_an_auth_flows_own_request_id_on_its_retry_is_kept(
    langfuse_capture: LangfuseCapture,
) -> None:
    class Challenge(httpx.Auth):
        def auth_flow(self, request: httpx.Request) -> Any:
            response = yield request
            if response.status_code == 401:
                request.headers["x-request-id"] = "app-chosen"
                yield request

    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(401 if len(sent) == 1 else 200)

    transport = httpx.MockTransport(answer)
    with in_request(x_request_id="req-1"), TracedClient(transport=transport, auth=Challenge()) as c:
        c.get("http://inventory/x")
    assert [r.headers["x-request-id"] for r in sent] == ["req-1", "app-chosen"]
    assert sent[0].headers["traceparent"] != sent[1].headers["traceparent"]


async def test_a_response_never_closed_is_recorded_when_freed(
    langfuse_capture: LangfuseCapture,
) -> None:
    def stream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=iter([b"a", b"b"]))

    with in_request(), TracedClient(transport=httpx.MockTransport(stream)) as client:
        response = client.send(client.build_request("GET", "http://llm.internal/s"), stream=True)
        del response
        gc.collect()
        call = langfuse_capture.single(name="GET llm.internal/s")
    assert call["output"] == {"statusCode": 200}


async def test_a_call_cancelled_mid_body_is_recorded_as_failed(
    langfuse_capture: LangfuseCapture,
) -> None:
    class Slow(httpx.AsyncByteStream):
        async def __aiter__(self) -> Any:
            yield b"a"
            await asyncio.sleep(10)
            yield b"b"  # pragma: no cover

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Slow())

    transport = httpx.MockTransport(answer)
    with in_request():
        async with AsyncTracedClient(transport=transport) as client:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.get("http://llm.internal/slow"), 0.1)
    call = langfuse_capture.single(name="GET llm.internal/slow")
    assert (call["level"], call["status_message"]) == ("ERROR", "CancelledError")


async def test_a_transport_that_already_traces_is_not_wrapped_again(
    langfuse_capture: LangfuseCapture,
) -> None:
    recorder = Recorder()
    inner = TracingTransport(httpx.MockTransport(recorder))
    with in_request(), TracedClient(transport=inner, mounts={"http://x": inner}) as client:
        client.get("http://inventory/once")
        client.get("http://x/once")
    assert len(langfuse_capture.spans(name="GET inventory/once")) == 1
    assert len(langfuse_capture.spans(name="GET x/once")) == 1


@pytest.fixture
def target() -> Iterator[Target]:
    server = Target()
    yield server
    server.close()


async def read_body(client_kind: str, url: str, stream: bool) -> tuple[bytes, BaseException]:
    """GET ``url`` and read its body, which must fail: (the bytes the app got, the error)."""
    got = bytearray()
    try:
        if client_kind == "sync":
            with TracedClient() as client:
                if not stream:
                    client.get(url)
                with client.stream("GET", url) as response:
                    for chunk in response.iter_bytes():
                        got += chunk
        else:
            async with AsyncTracedClient() as client:
                if not stream:
                    await client.get(url)
                async with client.stream("GET", url) as response:
                    async for chunk in response.aiter_bytes():
                        got += chunk
    except httpx.HTTPError as exc:
        return bytes(got), exc
    raise AssertionError("the body was read without an error")


@pytest.mark.parametrize("client_kind", ["sync", "async"])
@pytest.mark.parametrize("stream", [False, True], ids=["read", "stream"])
@pytest.mark.parametrize(
    ("path", "streamed", "error_type"),
    [
        pytest.param("/bad-gzip", b"", httpx.DecodingError, id="bad-gzip"),
        pytest.param("/bad-gzip-trailer", GZIP_TEXT, httpx.DecodingError, id="bad-gzip-trailer"),
        pytest.param("/short-zstd", None, httpx.DecodingError, id="short-zstd"),
        pytest.param("/broken-chunked", b"a", httpx.RemoteProtocolError, id="broken-chunked"),
    ],
)
async def test_a_body_that_breaks_off_or_does_not_decode_fails_the_call(
    langfuse_capture: LangfuseCapture,
    target: Target,
    client_kind: str,
    stream: bool,
    path: str,
    streamed: bytes | None,
    error_type: type[httpx.HTTPError],
) -> None:
    # httpx undoes Content-Encoding in the Response, above the transport: there the raw bytes
    # arrived whole, and the call failed all the same, as when the body breaks off.
    with in_request():
        got, error = await read_body(client_kind, target.url + path, stream)
    assert type(error) is error_type  # the app's exception, unchanged
    if streamed is not None:  # what arrived before the failure, handed on
        assert got == (streamed if stream else b"")
    call = langfuse_capture.single(name=f"GET 127.0.0.1{path}")  # ended once
    assert call["output"] == {"statusCode": 200}
    assert call["level"] == "ERROR"
    assert call["status_message"] == f"{error_type.__name__}: {error}"
    (event,) = call["events"]
    assert event["attributes"]["exception.type"] == f"httpx.{error_type.__name__}"
    assert event["attributes"]["exception.message"] == str(error)
