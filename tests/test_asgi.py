"""LangfuseMiddleware on Starlette and FastAPI: what Langfuse receives for each kind of request."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import threading
import time
import weakref
from typing import Any

import httpx
import pytest
from opentelemetry import trace as otel_trace

import langfuse_mw
from langfuse_mw import LangfuseMiddleware, get_request_context, health, run_with_context
from langfuse_mw.context import _current as current_request
from langfuse_mw.testing import LangfuseCapture
from tests import apps
from tests.asgi_driver import call, lifespan, websocket
from tests.conftest import FRAMEWORKS, ClientFactory, traced_app
from tests.corpus import (
    BAD_ID_VALUES,
    BAD_TRACEPARENTS,
    LEVEL_CASES,
    VALID_PARENT_ID,
    VALID_TRACE_ID,
    VALID_TRACEPARENT,
)

pytestmark = pytest.mark.anyio

framework = pytest.mark.parametrize("framework", FRAMEWORKS)
placement = pytest.mark.parametrize("placement", ["add_middleware", "wrap"])


@framework
@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/items/42", "GET /items/{item_id}"),
        ("/status/204", "GET /status/{code:int}"),
        ("/api/users/7/orders/9", "GET /api/users/{uid}/orders/{oid}"),
        ("/api/users", "GET /api/users"),
        ("/no/such/route", "GET <unmatched>"),
    ],
)
async def test_observation_and_trace_are_named_after_the_route_template(
    langfuse_capture: LangfuseCapture,
    make_client: ClientFactory,
    framework: str,
    path: str,
    name: str,
) -> None:
    client = make_client(traced_app(framework))
    await client.get(path)
    root = langfuse_capture.single(name=name)
    assert root["trace_name"] == name
    assert root["metadata"]["route"] == name.split(" ", 1)[1]
    assert root["scope"]["name"] == "langfuse-sdk"
    assert root["parent_span_id"] is None
    assert root["attributes"]["langfuse.internal.is_app_root"] is True


async def test_fastapi_route_and_wrong_method_use_the_template(
    langfuse_capture: LangfuseCapture, make_client: ClientFactory
) -> None:
    client = make_client(traced_app("fastapi"))
    assert (await client.get("/fa/items/5")).status_code == 200
    assert (await client.get("/items-only-post")).status_code == 405
    assert langfuse_capture.single(name="GET /fa/items/{item_id}")["output"] == {"statusCode": 200}
    assert langfuse_capture.single(name="GET /items-only-post")["output"] == {"statusCode": 405}


@framework
async def test_user_session_and_request_id_reach_root_and_child_observations(
    langfuse_capture: LangfuseCapture, make_client: ClientFactory, framework: str
) -> None:
    client = make_client(traced_app(framework))
    response = await client.get(
        "/items/3",
        headers={"x-user-id": "user-1", "x-session-id": "sess-1", "x-request-id": "req-abc"},
    )
    assert response.headers["x-request-id"] == "req-abc"
    root = langfuse_capture.single(name="GET /items/{item_id}")
    child = langfuse_capture.single(name="llm")
    assert child["parent_span_id"] == root["span_id"]
    assert child["trace_id"] == root["trace_id"]
    for span in (root, child):
        assert span["user_id"] == "user-1"
        assert span["session_id"] == "sess-1"
    assert root["metadata"]["requestId"] == "req-abc"
    assert root["metadata"]["userId"] == "user-1"
    assert root["metadata"]["sessionId"] == "sess-1"
    assert root["input"] == {"method": "GET", "path": "/items/3", "query": ""}
    assert root["output"] == {"statusCode": 200}
    assert root["metadata"]["responseSize"] == len(response.content)
    assert root["metadata"]["userAgent"].startswith("python-httpx/")
    assert "clientIp" not in root["metadata"]
    # The generation is not marked app root: the request's root claims the trace.
    assert "langfuse.internal.is_app_root" not in child["attributes"]


async def test_identity_callables_replace_headers(
    langfuse_capture: LangfuseCapture, make_client: ClientFactory
) -> None:
    def user_from(info: Any) -> str | None:
        return "from-auth" if info.raw["path"].startswith("/items") else None

    client = make_client(
        traced_app("starlette", user_id_from=user_from, session_id_from=lambda info: "s-auth")
    )
    await client.get("/items/1", headers={"x-user-id": "spoofed", "x-session-id": "spoofed"})
    root = langfuse_capture.single(name="GET /items/{item_id}")
    assert (root["user_id"], root["session_id"]) == ("from-auth", "s-auth")
    assert "spoofed" not in json.dumps(langfuse_capture.spans())


async def test_client_ip_only_when_enabled(
    langfuse_capture: LangfuseCapture, make_client: ClientFactory
) -> None:
    await make_client(traced_app("starlette", capture_client_ip=True)).get("/hello")
    assert langfuse_capture.single(name="GET /hello")["metadata"]["clientIp"] == "127.0.0.1"


async def test_query_secrets_and_sensitive_headers_never_leave_the_process(
    langfuse_capture: LangfuseCapture, make_client: ClientFactory
) -> None:
    client = make_client(traced_app("starlette"))
    await client.get(
        "/hello?token=SECRET-A&access_token=SECRET-B&code=SECRET-C&sig=SECRET-D&page=2",
        headers={
            "authorization": "Bearer SECRET-E",
            "cookie": "sid=SECRET-F",
            "x-api-key": "SECRET-G",
        },
    )
    root = langfuse_capture.single(name="GET /hello")
    assert root["input"]["query"] == (
        "token=[REDACTED]&access_token=[REDACTED]&code=[REDACTED]&sig=[REDACTED]&page=2"
    )
    exported = b"".join(langfuse_capture.sender.requests)
    assert b"SECRET" not in exported
    assert b"page=2" in exported


@framework
async def test_a_head_response_has_no_body_to_count(
    langfuse_capture: LangfuseCapture, make_client: ClientFactory, framework: str
) -> None:
    # Starlette sends the GET body for HEAD; the server sends none of it.
    response = await make_client(traced_app(framework)).head("/hello")
    assert response.status_code == 200 and response.content == b""
    root = langfuse_capture.single(name="HEAD /hello")
    assert root["metadata"]["responseSize"] == 0


@framework
@placement
async def test_unhandled_exception_is_recorded_and_reraised_untouched(
    langfuse_capture: LangfuseCapture, make_client: ClientFactory, framework: str, placement: str
) -> None:
    app = traced_app(framework, placement)
    with pytest.raises(RuntimeError, match="kaboom"):
        await make_client(app, raise_app_exceptions=True).get("/boom")
    response = await make_client(app).get("/boom")
    # Starlette's own 500, with the request id whether the middleware is inside
    # ServerErrorMiddleware (add_middleware) or outside it (wrap).
    assert (response.status_code, response.text) == (500, "Internal Server Error")
    roots = langfuse_capture.spans(name="GET /boom")
    assert response.headers["x-request-id"] == roots[1]["metadata"]["requestId"]
    assert len(roots) == 2
    for root in roots:
        assert root["level"] == "ERROR"
        assert root["status_message"] == "RuntimeError: kaboom"
        assert root["status"] == {"code": 2, "message": "RuntimeError: kaboom"}
        assert root["output"] == {"statusCode": 500}
        (event,) = root["events"]
        assert event["name"] == "exception"
        assert event["attributes"]["exception.type"] == "builtins.RuntimeError"
        assert "kaboom" in event["attributes"]["exception.stacktrace"]


def _error_handler(kind: str) -> Any:
    from starlette.responses import PlainTextResponse

    shared = PlainTextResponse("shared oops", status_code=500)

    async def async_handler(request: Any, exc: Exception) -> Any:
        return PlainTextResponse(f"async oops: {exc}", status_code=500)

    def sync_handler(request: Any, exc: Exception) -> Any:
        try:  # still run in the threadpool, as Starlette runs a plain function
            asyncio.get_running_loop()
            where = "on the event loop"
        except RuntimeError:
            where = "sync oops"
        return PlainTextResponse(f"{where}: {exc}", status_code=500)

    async def own_id(request: Any, exc: Exception) -> Any:
        return PlainTextResponse("own", status_code=500, headers={"x-request-id": "app-500"})

    async def shared_response(request: Any, exc: Exception) -> Any:
        return shared  # one object for every error: must not be changed by us

    return {"async": async_handler, "sync": sync_handler, "own id": own_id,
            "shared": shared_response}[kind]  # fmt: skip


@framework
@pytest.mark.parametrize(
    ("handler", "body"),
    [
        (None, "Internal Server Error"),
        ("debug", None),
        ("async", "async oops: kaboom"),
        ("sync", "sync oops: kaboom"),
        ("own id", "own"),
        ("shared", "shared oops"),
    ],
)
async def test_starlettes_500_for_an_unhandled_exception_echoes_the_request_id(
    langfuse_capture: LangfuseCapture, make_client: ClientFactory, framework: str,
    handler: str | None, body: str | None,
) -> None:  # fmt: skip
    # add_middleware puts us inside ServerErrorMiddleware, which answers the 500 itself:
    # its answer (default, debug page or the app's handler) is unchanged but for the header.
    app = apps.build(framework)
    if handler == "debug":
        app.debug = True
    elif handler is not None:
        app.add_exception_handler(Exception, _error_handler(handler))
    app.add_middleware(LangfuseMiddleware)
    client = make_client(app)
    responses = [await client.get("/boom", headers={"x-request-id": f"req-{i}"}) for i in (1, 2)]
    for i, response in enumerate(responses, 1):
        assert response.status_code == 500
        if body is not None:
            assert response.text == body
        else:
            assert "RuntimeError" in response.text and "kaboom" in response.text
        expected = ["app-500"] if handler == "own id" else [f"req-{i}"]
        assert response.headers.get_list("x-request-id") == expected
    roots = langfuse_capture.spans(name="GET /boom")
    assert [root["metadata"]["requestId"] for root in roots] == ["req-1", "req-2"]
    assert all(root["level"] == "ERROR" for root in roots)


@framework
@pytest.mark.parametrize("case", ["excluded", "no echo", "sampled out", "started"])
async def test_starlettes_500_echo_follows_the_request(
    langfuse_capture: LangfuseCapture, make_client: ClientFactory, framework: str, case: str
) -> None:
    # Only a request we answer for gets the header: not an excluded one, not with the echo
    # off; a request that was not sampled still does (it is exported because it failed).
    options: dict[str, Any] = {
        "excluded": {"exclude_paths": ["/boom"]},
        "no echo": {"echo_request_id": False},
        "sampled out": {"sample_rate": 0.0},
        "started": {},
    }[case]
    app = traced_app(framework, **options)
    path = "/stream-boom" if case == "started" else "/boom"
    if case == "started":
        from starlette.responses import StreamingResponse

        async def chunks() -> Any:
            yield b"part"
            raise RuntimeError("kaboom")

        async def stream_boom(request: Any) -> Any:
            return StreamingResponse(chunks())

        app.router.routes.insert(0, apps.Route("/stream-boom", stream_boom))
    response = await make_client(app).get(path)
    # A body that fails after the start: that start (with its header) is the answer.
    assert (response.status_code, response.content) == (
        (200, b"part") if case == "started" else (500, b"Internal Server Error")
    )
    echoed = response.headers.get_list("x-request-id")
    if case in ("excluded", "no echo"):
        assert echoed == []
    else:
        root = langfuse_capture.single(name=f"GET {path}")
        assert echoed == [root["metadata"]["requestId"]]
        assert root["level"] == "ERROR"


async def test_a_request_context_taken_in_a_background_task_still_nests_work_in_a_thread(
    langfuse_capture: LangfuseCapture, make_client: ClientFactory
) -> None:
    # The response is complete (the request's observation has ended) when a BackgroundTask
    # first asks for the request context and hands work to a thread with it: that work is
    # still the request's, not a trace of its own.
    from starlette.background import BackgroundTask
    from starlette.responses import PlainTextResponse

    def after() -> None:
        ctx = get_request_context()
        assert ctx is not None
        worker = threading.Thread(target=run_with_context, args=(ctx, apps.llm_call, "later"))
        worker.start()
        worker.join()

    async def handler(request: Any) -> Any:
        return PlainTextResponse("ok", background=BackgroundTask(after))

    app = apps.build("starlette")
    app.router.routes.insert(0, apps.Route("/bg", handler))
    app.add_middleware(LangfuseMiddleware)
    response = await make_client(app).get("/bg", headers={"x-user-id": "user-1"})
    assert response.status_code == 200
    root = langfuse_capture.single(name="GET /bg")
    llm = langfuse_capture.single(name="llm")
    assert (llm["trace_id"], llm["parent_span_id"]) == (root["trace_id"], root["span_id"])
    assert llm["user_id"] == root["user_id"] == "user-1"  # the request's whole context


@framework
@pytest.mark.parametrize("sample_rate", [1.0, 0.0])
async def test_a_background_task_that_fails_is_an_error_after_the_response(
    langfuse_capture: LangfuseCapture, make_client: ClientFactory, framework: str,
    sample_rate: float,
) -> None:  # fmt: skip
    # The client got its 200; the task that ran after it failed. The request's observation
    # stays what the client saw, the failure is its child (and a request sampling dropped is
    # exported for it: errors are always kept).
    from starlette.background import BackgroundTask
    from starlette.responses import PlainTextResponse

    async def after() -> None:
        await asyncio.sleep(0.05)
        apps.llm_call("summary")  # still nests under the request
        raise RuntimeError("could not save the conversation")

    async def handler(request: Any) -> Any:
        return PlainTextResponse("ok", background=BackgroundTask(after))

    app = apps.build(framework)
    app.router.routes.insert(0, apps.Route("/bg", handler))
    app.add_middleware(LangfuseMiddleware, sample_rate=sample_rate)
    response = await make_client(app).get("/bg", headers={"x-request-id": "req-bg"})
    assert (response.status_code, response.text) == (200, "ok")
    root = langfuse_capture.single(name="GET /bg")
    late = langfuse_capture.single(name="after response")
    assert root["output"] == {"statusCode": 200}
    assert root.get("level", "DEFAULT") == "DEFAULT"
    assert root["metadata"].get("keptBy") == (None if sample_rate else "error")
    assert (late["parent_span_id"], late["trace_id"]) == (root["span_id"], root["trace_id"])
    assert late["level"] == "ERROR"
    assert late["status_message"] == "RuntimeError: could not save the conversation"
    assert late["metadata"] == {"requestId": "req-bg"}
    (event,) = late["events"]
    assert event["attributes"]["exception.type"] == "builtins.RuntimeError"
    # From the response's last byte to the failure: the task's 50 ms, not the request's.
    assert late["start_time_unix_nano"] == root["end_time_unix_nano"]
    assert late["end_time_unix_nano"] - late["start_time_unix_nano"] >= 50_000_000
    if sample_rate:
        assert langfuse_capture.single(name="llm")["parent_span_id"] == root["span_id"]


async def test_a_500_handler_starlette_treats_as_async_is_still_awaited(
    langfuse_capture: LangfuseCapture,
) -> None:
    # Before Python 3.13 Starlette also takes asyncio's coroutine marker (asgiref's
    # markcoroutinefunction, Cython): wrapping must keep the handler awaited, not threaded.
    from asgiref.sync import markcoroutinefunction
    from starlette.responses import JSONResponse

    async def answer(request: Any, exc: Exception) -> Any:
        return JSONResponse({"error": "custom"}, status_code=500)

    def handler(request: Any, exc: Exception) -> Any:
        return answer(request, exc)

    markcoroutinefunction(handler)
    results = []
    for traced in (False, True):
        app = apps.starlette_app()
        app.add_exception_handler(Exception, handler)
        if traced:
            app.add_middleware(LangfuseMiddleware)
        results.append(await call(app, "/boom", headers=[(b"x-request-id", b"req-m")]))
    plain, traced_result = results
    assert (traced_result.status, traced_result.body) == (plain.status, plain.body)
    assert (plain.status, plain.body) == (500, b'{"error":"custom"}')
    assert traced_result.header(b"x-request-id") == b"req-m"
    assert type(traced_result.exception) is type(plain.exception) is RuntimeError


@pytest.mark.parametrize("shape", ["wrap", "mounted app"])
@pytest.mark.parametrize("status", [400, 503])
async def test_an_exception_an_inner_handler_answered_belongs_to_the_request(
    langfuse_capture: LangfuseCapture, shape: str, status: int
) -> None:
    # A ServerErrorMiddleware inside ours (we wrap the app, or the app is mounted) answers
    # and then re-raises: the exception is the request's, never "after response"; an error
    # only if the answer is one (as when a Flask error handler answers).
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Mount

    async def answer(request: Any, exc: Exception) -> Any:
        return JSONResponse({"error": str(exc)}, status_code=status)

    inner = Starlette(routes=list(apps.ROUTES), exception_handlers={Exception: answer})
    if shape == "wrap":
        app: Any = LangfuseMiddleware(inner)
        path = "/boom"
    else:
        app = Starlette(routes=[Mount("/sub", app=inner)])
        app.add_middleware(LangfuseMiddleware)
        path = "/sub/boom"
    result = await call(app, path)
    assert (result.status, result.body) == (status, b'{"error":"kaboom"}')
    assert langfuse_capture.spans(name="after response") == []
    (root,) = langfuse_capture.spans()
    assert root["output"] == {"statusCode": status}
    if status >= 500:
        assert (root["level"], root["status_message"]) == ("ERROR", "RuntimeError: kaboom")
    else:
        assert (root["level"], root["status_message"]) == ("WARNING", "HTTP 400")


@pytest.mark.parametrize("streamed", [False, True])
async def test_a_5xx_answer_then_a_failing_background_task(
    langfuse_capture: LangfuseCapture, streamed: bool
) -> None:
    # The 5xx is the app's answer, not an exception's: the request ends at its last byte and
    # the task's failure comes after it (a client leaving after the last byte is no disconnect).
    from starlette.background import BackgroundTask
    from starlette.responses import PlainTextResponse, StreamingResponse

    async def fail() -> None:
        raise RuntimeError("bg failed")

    async def chunks() -> Any:
        yield b"unavailable"

    async def handler(request: Any) -> Any:
        task = BackgroundTask(fail)
        if streamed:
            return StreamingResponse(chunks(), status_code=502, background=task)
        return PlainTextResponse("unavailable", status_code=502, background=task)

    app = apps.starlette_app()
    app.router.routes.insert(0, apps.Route("/down", handler))
    app.add_middleware(LangfuseMiddleware)
    result = await call(app, "/down")
    assert (result.status, result.body) == (502, b"unavailable")
    root = langfuse_capture.single(name="GET /down")
    late = langfuse_capture.single(name="after response")
    assert (root["level"], root["status_message"]) == ("ERROR", "HTTP 502")
    assert "disconnected" not in root["metadata"]
    assert late["parent_span_id"] == root["span_id"]
    assert late["status_message"] == "RuntimeError: bg failed"


async def test_a_stream_failing_before_its_first_chunk_behind_gzip(
    langfuse_capture: LangfuseCapture,
) -> None:
    # GZipMiddleware (outside ours) holds the start until the first chunk, which never comes:
    # Starlette's 500 is what the client gets, so that is what is recorded, with the id.
    from starlette.middleware.gzip import GZipMiddleware
    from starlette.responses import StreamingResponse

    async def chunks() -> Any:
        raise RuntimeError("upstream failed")
        yield b""  # pragma: no cover

    async def handler(request: Any) -> Any:
        return StreamingResponse(chunks())

    app = apps.starlette_app()
    app.router.routes.insert(0, apps.Route("/early", handler))
    app.add_middleware(LangfuseMiddleware)
    app.add_middleware(GZipMiddleware)
    headers = [(b"x-request-id", b"req-gz"), (b"accept-encoding", b"gzip")]
    result = await call(app, "/early", headers=headers)
    assert (result.status, result.body) == (500, b"Internal Server Error")
    assert result.header(b"x-request-id") == b"req-gz"
    root = langfuse_capture.single(name="GET /early")
    assert root["output"] == {"statusCode": 500}
    assert (root["level"], root["status_message"]) == ("ERROR", "RuntimeError: upstream failed")


@pytest.mark.parametrize(("code", "level", "options"), LEVEL_CASES)
async def test_level_follows_the_status_code(
    langfuse_capture: LangfuseCapture,
    make_client: ClientFactory,
    code: int,
    level: str,
    options: dict[str, Any],
) -> None:
    await make_client(traced_app("starlette", **options)).get(f"/status/{code}")
    root = langfuse_capture.single(name="GET /status/{code:int}")
    assert root["output"] == {"statusCode": code}
    assert root["level"] == level
    if code >= 400:
        assert root["status_message"] == f"HTTP {code}"
    assert root["status"]["code"] == (2 if level == "ERROR" else 0)


@framework
async def test_request_id_is_echoed_generated_or_left_to_the_app(
    langfuse_capture: LangfuseCapture, make_client: ClientFactory, framework: str
) -> None:
    client = make_client(traced_app(framework))
    generated = (await client.get("/hello")).headers["x-request-id"]
    assert len(generated) == 36 and generated[14] == "4"
    own = await client.get("/own-request-id", headers={"x-request-id": "incoming"})
    assert own.headers.get_list("x-request-id") == ["app-chosen"]
    not_found = await client.get("/nowhere", headers={"x-request-id": "kept-1"})
    assert not_found.headers["x-request-id"] == "kept-1"
    ids = {s["metadata"]["requestId"] for s in langfuse_capture.spans()}
    assert ids == {generated, "incoming", "kept-1"}


async def test_request_id_header_names_are_configurable(
    langfuse_capture: LangfuseCapture, make_client: ClientFactory
) -> None:
    app = traced_app(
        "starlette",
        request_id_header="X-Correlation-ID",
        user_id_header="x-auth-user",
        session_id_header="x-conversation",
    )
    response = await make_client(app).get(
        "/hello",
        headers={"x-correlation-id": "corr-1", "x-auth-user": "u9", "x-conversation": "c9"},
    )
    assert response.headers["x-correlation-id"] == "corr-1"
    assert "x-request-id" not in response.headers
    root = langfuse_capture.single(name="GET /hello")
    assert (root["metadata"]["requestId"], root["user_id"], root["session_id"]) == (
        "corr-1",
        "u9",
        "c9",
    )


async def test_custom_request_id_validator(
    langfuse_capture: LangfuseCapture, make_client: ClientFactory
) -> None:
    app = traced_app("starlette", request_id_validator=lambda value: value.startswith("req-"))
    client = make_client(app)
    assert (await client.get("/hello", headers={"x-request-id": "req-1"})).headers[
        "x-request-id"
    ] == "req-1"
    replaced = (await client.get("/hello", headers={"x-request-id": "other"})).headers
    assert replaced["x-request-id"] != "other"


@pytest.mark.parametrize("value", BAD_ID_VALUES, ids=range(len(BAD_ID_VALUES)))
async def test_bad_header_values_never_change_the_response_or_reach_a_span(
    langfuse_capture: LangfuseCapture, value: bytes
) -> None:
    bare = apps.starlette_app()
    traced = traced_app("starlette")
    headers = [(b"x-request-id", value), (b"x-user-id", value), (b"x-session-id", value)]
    expected = await call(bare, "/items/1", headers=headers)
    got = await call(traced, "/items/1", headers=headers)
    assert got.exception is None
    assert (got.status, got.body) == (expected.status, expected.body)
    assert [h for h in got.headers if h[0] != b"x-request-id"] == expected.headers
    echoed = got.header(b"x-request-id")
    assert echoed is not None and echoed != value
    assert echoed.isascii() and b"\r" not in echoed and b"\n" not in echoed
    for span in langfuse_capture.spans():
        assert span["user_id"] is None and span["session_id"] is None
        assert "userId" not in span["metadata"]
    if len(value.strip()) >= 4:  # shorter byte strings occur by chance in binary protobuf
        assert value not in b"".join(langfuse_capture.sender.requests)
    assert health()["rejected_inputs"]


@pytest.mark.parametrize("rate", [1.0, 0.0], ids=["read whole", "decided first"])
async def test_duplicated_headers_are_joined_not_trusted(
    langfuse_capture: LangfuseCapture, rate: float
) -> None:
    # Both ways in: a request read whole, and one decided from its first few headers (a
    # low rate), where a repeated header must be joined just the same.
    traced = traced_app("starlette", sample_rate=rate)
    not_sampled = VALID_TRACEPARENT[:-2] + b"00"  # the lazy path continues these itself
    result = await call(
        traced,
        "/status/500",
        headers=[
            (b"traceparent", not_sampled),
            (b"x-request-id", b"req-a"),
            (b"traceparent", not_sampled),
            (b"x-request-id", b"req-b"),
        ],
    )
    root = langfuse_capture.single(name="GET /status/{code:int}")
    # W3C: a repeated traceparent is invalid, so the request starts its own trace (and at
    # rate 0 it is exported only because it failed, not because a caller sampled it).
    assert root["trace_id"] != VALID_TRACE_ID
    assert root["parent_span_id"] is None
    assert root["metadata"].get("keptBy") == (None if rate else "error")
    # Two request ids are neither client's: a fresh one is echoed and recorded.
    echoed = result.header(b"x-request-id")
    assert echoed is not None and b"req-" not in echoed
    assert root["metadata"]["requestId"] == echoed.decode()


async def test_a_dropped_request_leaves_nothing_to_the_garbage_collector(
    langfuse_capture: LangfuseCapture,
) -> None:
    # Once a dropped request is over nothing may keep its state (a cycle would wait for the
    # collector, and a dropped request must cost next to nothing).
    seen: list[Any] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(weakref.ref(current_request.get()))  # type: ignore[arg-type]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    traced = LangfuseMiddleware(app, sample_rate=0.0)
    gc.collect()
    gc.disable()
    try:
        result = await call(traced, "/hello")
        assert result.status == 200
        assert seen and seen[0]() is None
    finally:
        gc.enable()
    assert langfuse_capture.spans() == []


@framework
async def test_valid_traceparent_is_continued(
    langfuse_capture: LangfuseCapture, make_client: ClientFactory, framework: str
) -> None:
    client = make_client(traced_app(framework))
    await client.get(
        "/items/1",
        headers={"traceparent": VALID_TRACEPARENT.decode(), "tracestate": "vendor=abc"},
    )
    root = langfuse_capture.single(name="GET /items/{item_id}")
    child = langfuse_capture.single(name="llm")
    assert root["trace_id"] == child["trace_id"] == VALID_TRACE_ID
    assert root["parent_span_id"] == VALID_PARENT_ID
    # A continued trace keeps the upstream's name: only the first service names it.
    assert root["trace_name"] is None
    assert root["attributes"]["langfuse.internal.is_app_root"] is True


async def test_upstream_langfuse_claim_in_baggage_keeps_app_root_upstream(
    langfuse_capture: LangfuseCapture, make_client: ClientFactory
) -> None:
    client = make_client(traced_app("starlette"))
    await client.get(
        "/hello",
        headers={
            "traceparent": VALID_TRACEPARENT.decode(),
            "baggage": f"langfuse_trace_id={VALID_TRACE_ID},langfuse_user_id=admin",
        },
    )
    root = langfuse_capture.single(name="GET /hello")
    assert "langfuse.internal.is_app_root" not in root["attributes"]
    # trust_incoming="continue" (the default): baggage counts as much as x-user-id.
    assert root["user_id"] == "admin"


@pytest.mark.parametrize("value", BAD_TRACEPARENTS, ids=range(len(BAD_TRACEPARENTS)))
async def test_invalid_traceparent_starts_a_new_trace(
    langfuse_capture: LangfuseCapture, value: bytes
) -> None:
    bare = await call(apps.starlette_app(), "/hello", headers=[(b"traceparent", value)])
    got = await call(traced_app("starlette"), "/hello", headers=[(b"traceparent", value)])
    assert (got.status, got.body) == (bare.status, bare.body)
    root = langfuse_capture.single(name="GET /hello")
    assert root["parent_span_id"] is None
    assert root["trace_id"] not in ("0" * 32, VALID_TRACE_ID)
    assert root["trace_name"] == "GET /hello"


@pytest.mark.parametrize(
    ("options", "path", "method", "traced"),
    [
        ({"exclude_paths": ["/hello"]}, "/hello", "GET", False),
        ({"exclude_paths": ["/hello"]}, "/hello/deep", "GET", True),
        ({}, "/health", "GET", False),  # the presets' default exclusions
        ({}, "/metrics", "GET", False),
        ({}, "/static/app.css", "GET", False),
        ({"exclude_paths": []}, "/health", "GET", True),
        ({"exclude_paths": ["/api/.*"]}, "/api/users", "GET", False),
        ({}, "/hello", "OPTIONS", False),
        ({"exclude_methods": []}, "/hello", "OPTIONS", True),
        ({"exclude_methods": ["get"]}, "/hello", "GET", False),
    ],
)
async def test_excluded_requests_create_no_span_and_pass_through(
    langfuse_capture: LangfuseCapture,
    options: dict[str, Any],
    path: str,
    method: str,
    traced: bool,
) -> None:
    bare = await call(apps.starlette_app(), path, method=method)
    got = await call(traced_app("starlette", **options), path, method=method)
    assert (got.status, got.body) == (bare.status, bare.body)
    assert (got.header(b"x-request-id") is not None) is traced
    assert len(langfuse_capture.spans()) == (1 if traced else 0)


@framework
async def test_streaming_response_ends_after_the_last_byte(
    langfuse_capture: LangfuseCapture, make_client: ClientFactory, framework: str
) -> None:
    client = make_client(traced_app(framework))
    started = time.time_ns()
    response = await client.get("/stream?delay=0.1")
    finished = time.time_ns()
    assert response.text == "data: 0\n\ndata: 1\n\ndata: 2\n\n"
    root = langfuse_capture.single(name="GET /stream")
    duration = root["end_time_unix_nano"] - root["start_time_unix_nano"]
    # Three 100 ms chunks: the observation covers the body, not just the handler's return.
    assert duration >= 300_000_000
    assert started <= root["start_time_unix_nano"] <= root["end_time_unix_nano"] <= finished
    assert root["metadata"]["responseSize"] == len(response.content)
    assert 90 <= root["metadata"]["timeToFirstByteMs"] < duration / 1e6
    assert "disconnected" not in root["metadata"]


async def test_client_disconnect_mid_stream_ends_the_observation(
    langfuse_capture: LangfuseCapture,
) -> None:
    result = await call(
        traced_app("starlette"), "/stream", query=b"delay=0.2", disconnect_after_chunks=1
    )
    assert result.body == b"data: 0\n\n"
    root = langfuse_capture.single(name="GET /stream")
    assert root["metadata"]["disconnected"] is True
    assert root["level"] == "WARNING"
    assert root["status_message"] == "client disconnected before the response completed"
    # Ended at the disconnect, well before the two remaining 200 ms chunks would have run.
    assert root["end_time_unix_nano"] - root["start_time_unix_nano"] < 400_000_000


@framework
async def test_request_context_is_set_for_the_handler_and_reset_after(
    langfuse_capture: LangfuseCapture, make_client: ClientFactory, framework: str
) -> None:
    client = make_client(traced_app(framework))
    body = (
        await client.get("/ctx", headers={"x-user-id": "u-ctx", "x-request-id": "rid-ctx"})
    ).json()
    root = langfuse_capture.single(name="GET /ctx")
    assert body == {
        "request_id": "rid-ctx",
        "user_id": "u-ctx",
        "session_id": None,
        "trace_id": root["trace_id"],
        "observation_id": root["span_id"],
    }
    assert get_request_context() is None
    assert otel_trace.get_current_span() is otel_trace.INVALID_SPAN


@framework
async def test_work_submitted_to_a_thread_pool_nests_under_the_request(
    langfuse_capture: LangfuseCapture, make_client: ClientFactory, framework: str
) -> None:
    await make_client(traced_app(framework)).get("/thread", headers={"x-user-id": "u-thr"})
    root = langfuse_capture.single(name="GET /thread")
    child = langfuse_capture.single(name="llm")
    assert child["parent_span_id"] == root["span_id"]
    assert child["user_id"] == "u-thr"


async def test_concurrent_requests_never_mix_users(
    langfuse_capture: LangfuseCapture, make_client: ClientFactory
) -> None:
    client = make_client(traced_app("fastapi"))
    users = [f"user-{n}" for n in range(200)]
    await asyncio.gather(
        *(
            client.get(f"/items/{n}", headers={"x-user-id": user, "x-request-id": f"r-{n}"})
            for n, user in enumerate(users)
        )
    )
    spans = langfuse_capture.spans()
    roots = {s["span_id"]: s for s in spans if s["name"] == "GET /items/{item_id}"}
    assert len(roots) == 200
    for root in roots.values():
        assert root["metadata"]["requestId"] == f"r-{root['user_id'].split('-')[1]}"
        assert root["input"]["path"] == f"/items/{root['user_id'].split('-')[1]}"
    for child in (s for s in spans if s["name"] == "llm"):
        assert child["user_id"] == roots[child["parent_span_id"]]["user_id"]


@framework
async def test_websocket_connection_is_one_observation(
    langfuse_capture: LangfuseCapture, framework: str
) -> None:
    sent = await websocket(traced_app(framework), "/ws", headers=[(b"x-user-id", b"ws-user")])
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert sent[1]["text"] == "echo hi"
    assert dict(sent[0]["headers"])[b"x-request-id"]
    root = langfuse_capture.single(name="WS /ws")
    assert root["output"] == {"statusCode": 101}
    assert root["user_id"] == "ws-user"


@framework
async def test_lifespan_shutdown_exports_the_queue_and_stops(framework: str) -> None:
    from langfuse_mw.testing import capture_langfuse

    # A 60 s export interval: only the lifespan flush can have shipped the span in time.
    with capture_langfuse(flush_interval=60) as capture:
        app = traced_app(framework)

        async def one_request() -> None:
            await call(app, "/hello")
            assert capture.sender.spans == []

        replies = await lifespan(app, one_request)
        assert replies == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
        assert [s["name"] for s in capture.sender.spans] == ["GET /hello"]
        assert langfuse_mw.runtime.current() is None  # nothing left for the exit hook


async def test_fastapi_builtin_telemetry_stays_off(
    langfuse_capture: LangfuseCapture, make_client: ClientFactory
) -> None:
    await make_client(traced_app("fastapi")).get("/fa/items/1")
    assert sorted(s["name"] for s in langfuse_capture.spans()) == [
        "GET /fa/items/{item_id}",
        "llm",
    ]
    # The runtime's tracer provider is private: nothing became the global provider.
    assert isinstance(otel_trace.get_tracer_provider(), otel_trace.ProxyTracerProvider)


async def test_tracing_failures_never_reach_the_request(
    langfuse_capture: LangfuseCapture, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    def broken(*args: Any) -> None:
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(langfuse_capture.runtime.queue, "_full", broken)
    traced = traced_app("starlette", user_id_from=lambda info: 1 / 0)
    bare = await call(apps.starlette_app(), "/items/1")
    with caplog.at_level(logging.ERROR, logger="langfuse_mw"):
        results = [await call(traced, "/items/1") for _ in range(3)]
    for result in results:
        assert result.exception is None
        assert (result.status, result.body) == (bare.status, bare.body)
    # 3 roots, and 4 generations (the SDK path, the bare app's too) failing the same way.
    assert health()["internal_errors"] == {"export.emit": 7, "user_id_from": 3}
    # Logged once per cause, not once per request; and without any request content.
    assert len([r for r in caplog.records if "tracing error" in r.getMessage()]) == 2


async def test_other_scope_types_pass_through(langfuse_capture: LangfuseCapture) -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    await LangfuseMiddleware(app)({"type": "custom"}, None, None)  # type: ignore[arg-type]
    assert seen == ["custom"]
    assert langfuse_capture.spans() == []


async def test_without_credentials_the_middleware_passes_through(
    make_client: ClientFactory, caplog: Any
) -> None:
    from langfuse_mw import runtime

    runtime.shutdown(0.1)
    with caplog.at_level(logging.WARNING, logger="langfuse_mw"):
        app = traced_app("starlette")
        client = make_client(app)
        responses = [await client.get("/items/1") for _ in range(3)]
        bare = await make_client(apps.starlette_app()).get("/items/1")
    assert all(r.status_code == 200 and r.content == bare.content for r in responses)
    assert all("x-request-id" not in r.headers for r in responses)
    warnings = [r.getMessage() for r in caplog.records if r.name == "langfuse_mw"]
    assert warnings == [
        "langfuse_mw: tracing is off (LANGFUSE_PUBLIC_KEY and LANGFUSE_SECRET_KEY not set); "
        "requests are served untouched"
    ]
    assert health()["enabled"] is False
    runtime.shutdown(0.1)


async def test_wrapped_plain_asgi_app(langfuse_capture: LangfuseCapture) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"hello"})

    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(LangfuseMiddleware(app)), base_url="http://t"
    )
    async with client:
        response = await client.get("/anything/123")
    assert response.text == "hello"
    # No router, no template: never the raw path.
    assert langfuse_capture.single(name="GET <unmatched>")["input"]["path"] == "/anything/123"


async def test_opt_in_health_endpoint(langfuse_capture: LangfuseCapture) -> None:
    app = traced_app("starlette", health_path="/_langfuse/health")
    await call(app, "/hello")
    result = await call(app, "/_langfuse/health")
    assert result.status == 200
    body = json.loads(result.body)
    assert body["enabled"] is True
    assert body["created"] == body["exported"] + body["queued"] + sum(body["dropped"].values())
    assert body["breaker"] == "closed"
    langfuse_capture.spans()  # flush
    assert [s["name"] for s in langfuse_capture.spans()] == ["GET /hello"]  # not traced itself
    assert (await call(traced_app("starlette"), "/_langfuse/health")).status == 404


async def test_one_endpoint_behind_several_routes_is_named_after_the_one_that_matched(
    langfuse_capture: LangfuseCapture,
) -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Mount, Route

    from langfuse_mw import LangfuseMiddleware

    async def shared(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def single(request: Request) -> Response:
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[
            Route("/a/{x}", shared),
            Mount("/v2", routes=[Route("/b/{y}", shared), Route("/c", single)]),
        ]
    )
    app.add_middleware(LangfuseMiddleware)
    for path in ("/a/1", "/v2/b/2", "/v2/c", "/a/3", "/v2/b/4"):
        assert (await call(app, path)).status == 200
    names = [span["name"] for span in langfuse_capture.spans()]
    assert names == ["GET /a/{x}", "GET /v2/b/{y}", "GET /v2/c", "GET /a/{x}", "GET /v2/b/{y}"]


def _http_scope() -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "method": "POST",
            "path": "/up", "raw_path": b"/up", "root_path": "", "query_string": b"",
            "headers": [], "client": ("127.0.0.1", 5000), "server": ("t", 80), "scheme": "http",
            "http_version": "1.1"}  # fmt: skip


async def _streaming_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    for _ in range(5):
        await send({"type": "http.response.body", "body": b"tick", "more_body": True})
        await asyncio.sleep(0.01)
    await send({"type": "http.response.body", "body": b""})


async def test_the_disconnect_watch_never_reads_ahead_of_the_app(
    langfuse_capture: LangfuseCapture,
) -> None:
    # A client uploading while the app streams back (and does not read): the server's flow
    # control must hold it back, as without us. Reading ahead buffered 700 MiB in 2.5 s.
    reads = 0

    async def receive() -> dict[str, Any]:
        nonlocal reads
        reads += 1
        await asyncio.sleep(0)  # a fast client: the next chunk is always there
        return {"type": "http.request", "body": b"x" * 1024, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        pass

    await LangfuseMiddleware(_streaming_app)(_http_scope(), receive, send)
    assert reads <= 3


async def test_a_disconnect_reported_while_the_last_body_is_sent_is_not_one(
    langfuse_capture: LangfuseCapture,
) -> None:
    # hypercorn with Connection: close queues http.disconnect while still inside the send of
    # the last body: the response was complete.
    closing = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await closing.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body"):
            closing.set()
            await asyncio.sleep(0.02)  # the watch sees the disconnect before send returns

    await LangfuseMiddleware(_streaming_app)(_http_scope(), receive, send)
    root = langfuse_capture.single(name="POST <unmatched>")
    assert "disconnected" not in root["metadata"]


async def test_receive_after_the_watch_ended_asks_the_server_again(
    langfuse_capture: LangfuseCapture,
) -> None:
    # A task the app left behind (polling for the disconnect to cancel LLM work) keeps its
    # receive: once the watch has stopped, it must get the server's answer, not wait forever.
    kept: list[Any] = []
    messages = [{"type": "http.request", "body": b"", "more_body": False}]
    left = asyncio.Event()  # the client leaves after the response

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        pass

    async def app(scope: Any, receive: Any, send: Any) -> None:
        kept.append(receive)
        await _streaming_app(scope, receive, send)

    await LangfuseMiddleware(app)(_http_scope(), receive, send)
    left.set()
    messages_seen = [await asyncio.wait_for(kept[0](), 1) for _ in range(2)]
    assert [m["type"] for m in messages_seen] == ["http.request", "http.disconnect"]


async def test_response_headers_given_as_any_iterable_are_all_sent(
    langfuse_capture: LangfuseCapture,
) -> None:
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        pairs = [(b"content-type", b"text/plain"), (b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 200, "headers": iter(pairs)})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await LangfuseMiddleware(app)(_http_scope(), receive, send)
    names = [name for name, _ in sent[0]["headers"]]
    assert names == [b"content-type", b"content-length", b"x-request-id"]


async def test_an_exception_whose_str_fails_is_still_recorded(
    langfuse_capture: LangfuseCapture,
) -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no message")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise Unprintable()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        pass

    with pytest.raises(Unprintable):
        await LangfuseMiddleware(app)(_http_scope(), receive, send)
    root = langfuse_capture.single(name="POST <unmatched>")
    assert (root["level"], root["status_message"]) == ("ERROR", "Unprintable")
