"""What every WSGI-family adapter must do alike: plain WSGI, Flask, Django (WSGI and ASGI).

Each test runs against each adapter, with the same app behind it (tests/wsgi_apps,
tests/django_project), driven as a server would drive it (raw header bytes, close()).
"""

from __future__ import annotations

import gc
import json
import logging
import threading
import time
from typing import Any

import pytest
from opentelemetry import trace as otel_trace

from langfuse_mw import get_request_context, health
from langfuse_mw.core import RequestState
from langfuse_mw.testing import LangfuseCapture
from tests.compare import ARRIVALS, arrival_headers, assert_kept_as_sampled
from tests.corpus import (
    BAD_ID_VALUES,
    BAD_TRACEPARENTS,
    BAD_TRACEPARENTS_BOTH_FLAGS,
    LEVEL_CASES,
    VALID_PARENT_ID,
    VALID_TRACE_ID,
    VALID_TRACEPARENT,
)
from tests.wsgi_apps.adapters import ADAPTERS, Adapter, pin

pytestmark = pytest.mark.parametrize("adapter", ADAPTERS, ids=str)


def traced(adapter: Adapter, **options: Any) -> Any:
    return adapter.build(True, options)


def bare(adapter: Adapter) -> Any:
    return adapter.build(False, {})


@pytest.mark.parametrize(
    ("path", "route"),
    [
        ("/items/42", "/items/<int:item_id>"),
        ("/status/204", "/status/<int:code>"),
        ("/hello", "/hello"),
        ("/no/such/route", None),
    ],
)
def test_observation_and_trace_are_named_after_the_route_template(
    langfuse_capture: LangfuseCapture, adapter: Adapter, path: str, route: str | None
) -> None:
    traced(adapter)(path)
    template = adapter.template(route) if route else "<unmatched>"
    root = langfuse_capture.single(name=f"GET {template}")
    assert root["trace_name"] == f"GET {template}"
    assert root["metadata"]["route"] == template
    assert root["metadata"]["framework"] == adapter.framework
    assert root["scope"]["name"] == "langfuse-sdk"
    assert root["parent_span_id"] is None
    assert root["attributes"]["langfuse.internal.is_app_root"] is True


def test_user_session_and_request_id_reach_root_and_child_observations(
    langfuse_capture: LangfuseCapture, adapter: Adapter
) -> None:
    result = traced(adapter)(
        "/items/3",
        headers=[(b"x-user-id", b"user-1"), (b"x-session-id", b"sess-1"),
                 (b"x-request-id", b"req-abc"), (b"user-agent", b"agent/1.0")],
    )  # fmt: skip
    assert result.status == 200
    assert result.header(b"x-request-id") == b"req-abc"
    root = langfuse_capture.single(name=f"GET {adapter.template('/items/<int:item_id>')}")
    child = langfuse_capture.single(name="llm")
    assert child["parent_span_id"] == root["span_id"]
    assert child["trace_id"] == root["trace_id"]
    for span in (root, child):
        assert (span["user_id"], span["session_id"]) == ("user-1", "sess-1")
    assert root["metadata"]["requestId"] == "req-abc"
    assert root["metadata"]["userId"] == "user-1"
    assert root["metadata"]["sessionId"] == "sess-1"
    assert root["input"] == {"method": "GET", "path": "/items/3", "query": ""}
    assert root["output"] == {"statusCode": 200}
    assert root["metadata"]["responseSize"] == len(result.body)
    assert root["metadata"]["userAgent"] == "agent/1.0"
    assert "clientIp" not in root["metadata"]
    assert "langfuse.internal.is_app_root" not in child["attributes"]


def test_identity_callables_replace_headers(
    langfuse_capture: LangfuseCapture, adapter: Adapter
) -> None:
    seen: list[Any] = []

    def user_from(info: Any) -> str:
        seen.append(info.raw)
        return "from-auth"

    call = traced(adapter, user_id_from=user_from, session_id_from=lambda info: "s-auth")
    call("/hello", headers=[(b"x-user-id", b"spoofed"), (b"x-session-id", b"spoofed")])
    root = langfuse_capture.single(name=f"GET {adapter.template('/hello')}")
    assert (root["user_id"], root["session_id"]) == ("from-auth", "s-auth")
    assert "spoofed" not in json.dumps(langfuse_capture.spans())
    assert seen and seen[0] is not None  # the framework's request (environ or HttpRequest)


def test_client_ip_only_when_enabled(langfuse_capture: LangfuseCapture, adapter: Adapter) -> None:
    traced(adapter, capture_client_ip=True)("/hello")
    traced(adapter)("/hello")
    first, second = langfuse_capture.spans()
    assert first["metadata"]["clientIp"] == "127.0.0.1"
    assert "clientIp" not in second["metadata"]


def test_query_secrets_and_sensitive_headers_never_leave_the_process(
    langfuse_capture: LangfuseCapture, adapter: Adapter
) -> None:
    traced(adapter)(
        "/hello",
        query=b"token=SECRET-A&access_token=SECRET-B&code=SECRET-C&sig=SECRET-D&page=2",
        headers=[(b"authorization", b"Bearer SECRET-E"), (b"cookie", b"sid=SECRET-F"),
                 (b"x-api-key", b"SECRET-G")],
    )  # fmt: skip
    root = langfuse_capture.single(name=f"GET {adapter.template('/hello')}")
    assert root["input"]["query"] == (
        "token=[REDACTED]&access_token=[REDACTED]&code=[REDACTED]&sig=[REDACTED]&page=2"
    )
    exported = b"".join(langfuse_capture.sender.requests)
    assert b"SECRET" not in exported
    assert b"page=2" in exported


def test_unhandled_exception_is_recorded_as_error_and_the_response_is_the_frameworks(
    langfuse_capture: LangfuseCapture, adapter: Adapter
) -> None:
    result = traced(adapter)("/boom")
    if adapter.raises:
        assert isinstance(result.exception, RuntimeError)  # re-raised untouched
    else:
        assert result.exception is None
        assert result.status == 500
        assert result.header(b"x-request-id")
    root = langfuse_capture.single(name=f"GET {adapter.template('/boom')}")
    assert root["level"] == "ERROR"
    assert root["status_message"] == "RuntimeError: kaboom"
    assert root["status"] == {"code": 2, "message": "RuntimeError: kaboom"}
    assert root["output"] == {"statusCode": 500}
    (event,) = root["events"]
    assert event["attributes"]["exception.type"] == "builtins.RuntimeError"
    assert "kaboom" in event["attributes"]["exception.stacktrace"]


@pytest.mark.parametrize(("code", "level", "options"), LEVEL_CASES)
def test_level_follows_the_status_code(
    langfuse_capture: LangfuseCapture, adapter: Adapter, code: int, level: str,
    options: dict[str, Any],
) -> None:  # fmt: skip
    assert traced(adapter, **options)(f"/status/{code}").status == code
    root = langfuse_capture.single(name=f"GET {adapter.template('/status/<int:code>')}")
    assert root["output"] == {"statusCode": code}
    assert root["level"] == level
    if code >= 400:
        assert root["status_message"] == f"HTTP {code}"
    assert root["status"]["code"] == (2 if level == "ERROR" else 0)


def test_request_id_is_echoed_generated_or_left_to_the_app(
    langfuse_capture: LangfuseCapture, adapter: Adapter
) -> None:
    call = traced(adapter)
    generated = call("/hello").header(b"x-request-id")
    assert generated is not None and len(generated) == 36 and generated[14:15] == b"4"
    own = call("/own-request-id", headers=[(b"x-request-id", b"incoming")])
    assert [v for k, v in own.headers if k.lower() == b"x-request-id"] == [b"app-chosen"]
    not_found = call("/nowhere", headers=[(b"x-request-id", b"kept-1")])
    assert not_found.header(b"x-request-id") == b"kept-1"
    ids = {s["metadata"]["requestId"] for s in langfuse_capture.spans()}
    assert ids == {generated.decode(), "incoming", "kept-1"}


@pytest.mark.parametrize("validator", [None, "accepts anything"])
def test_two_request_ids_or_edge_spaces_are_replaced(
    langfuse_capture: LangfuseCapture, adapter: Adapter, validator: str | None
) -> None:
    # Two x-request-id headers arrive joined ("a,b"): neither client's id, and a comma means
    # a list downstream. Edge spaces break the echo (servers refuse them). Even a validator
    # that accepts anything cannot let these through.
    options = {} if validator is None else {"request_id_validator": lambda value: True}
    call = traced(adapter, **options)
    sent = [
        [(b"x-request-id", b"req-a"), (b"x-request-id", b"req-b")],
        [(b"x-request-id", b"req-a,req-b")],
    ]
    for headers in sent:
        echoed = call("/hello", headers=headers).header(b"x-request-id")
        assert echoed is not None and b"req-" not in echoed and len(echoed) == 36
    assert all("," not in s["metadata"]["requestId"] for s in langfuse_capture.spans())
    assert health()["rejected_inputs"].get("request_id") == len(sent)


def test_header_names_are_configurable(langfuse_capture: LangfuseCapture, adapter: Adapter) -> None:
    call = traced(
        adapter, request_id_header="X-Correlation-ID", user_id_header="x-auth-user",
        session_id_header="x-conversation", echo_request_id=True,
    )  # fmt: skip
    result = call(
        "/hello",
        headers=[(b"x-correlation-id", b"corr-1"), (b"x-auth-user", b"u9"),
                 (b"x-conversation", b"c9")],
    )  # fmt: skip
    assert result.header(b"x-correlation-id") == b"corr-1"
    assert result.header(b"x-request-id") is None
    root = langfuse_capture.single(name=f"GET {adapter.template('/hello')}")
    assert (root["metadata"]["requestId"], root["user_id"], root["session_id"]) == (
        "corr-1", "u9", "c9",
    )  # fmt: skip
    traced(adapter, echo_request_id=False)("/hello")
    assert traced(adapter, echo_request_id=False)("/hello").header(b"x-request-id") is None


def test_custom_request_id_validator(langfuse_capture: LangfuseCapture, adapter: Adapter) -> None:
    call = traced(adapter, request_id_validator=lambda value: value.startswith("req-"))
    assert call("/hello", headers=[(b"x-request-id", b"req-1")]).header(b"x-request-id") == b"req-1"
    assert call("/hello", headers=[(b"x-request-id", b"other")]).header(b"x-request-id") != b"other"


@pytest.mark.parametrize("value", BAD_ID_VALUES, ids=range(len(BAD_ID_VALUES)))
def test_bad_header_values_never_change_the_response_or_reach_a_span(
    langfuse_capture: LangfuseCapture, adapter: Adapter, value: bytes
) -> None:
    headers = [(b"x-request-id", value), (b"x-user-id", value), (b"x-session-id", value)]
    expected = bare(adapter)("/status/200", headers=headers)
    langfuse_capture.clear()
    got = traced(adapter)("/status/200", headers=headers)
    assert got.exception is None
    assert (got.status, got.body) == (expected.status, expected.body)
    assert [h for h in got.headers if h[0] != b"x-request-id"] == expected.headers
    echoed = got.header(b"x-request-id")
    assert echoed is not None and echoed != value
    assert echoed.isascii() and b"\r" not in echoed and b"\n" not in echoed
    (root,) = langfuse_capture.spans()
    assert root["user_id"] is None and root["session_id"] is None
    assert "userId" not in root["metadata"]
    if len(value.strip()) >= 4:  # shorter byte strings occur by chance in binary protobuf
        assert value not in b"".join(langfuse_capture.sender.requests)
    assert health()["rejected_inputs"]


@pytest.mark.parametrize("value", BAD_TRACEPARENTS, ids=range(len(BAD_TRACEPARENTS)))
def test_invalid_traceparent_starts_a_new_trace(
    langfuse_capture: LangfuseCapture, adapter: Adapter, value: bytes
) -> None:
    expected = bare(adapter)("/hello", headers=[(b"traceparent", value)])
    got = traced(adapter)("/hello", headers=[(b"traceparent", value)])
    assert (got.status, got.body) == (expected.status, expected.body)
    root = langfuse_capture.single(name=f"GET {adapter.template('/hello')}")
    assert root["parent_span_id"] is None
    assert root["trace_id"] not in ("0" * 32, VALID_TRACE_ID)


def test_valid_traceparent_is_continued_and_a_repeated_one_is_not(
    langfuse_capture: LangfuseCapture, adapter: Adapter
) -> None:
    call = traced(adapter)
    call("/items/1", headers=[(b"traceparent", VALID_TRACEPARENT), (b"tracestate", b"v=abc")])
    root = langfuse_capture.single(name=f"GET {adapter.template('/items/<int:item_id>')}")
    child = langfuse_capture.single(name="llm")
    assert root["trace_id"] == child["trace_id"] == VALID_TRACE_ID
    assert root["parent_span_id"] == VALID_PARENT_ID
    assert root["trace_name"] is None  # the upstream service names the trace
    langfuse_capture.clear()
    call("/hello", headers=[(b"traceparent", VALID_TRACEPARENT)] * 2)
    assert langfuse_capture.single()["parent_span_id"] is None


@pytest.mark.parametrize(
    ("options", "path", "method", "is_traced"),
    [
        ({"exclude_paths": ["/hello"]}, "/hello", "GET", False),
        ({}, "/health", "GET", False),  # the presets' default exclusions
        ({"exclude_paths": []}, "/health", "GET", True),
        ({"exclude_paths": ["/status/.*"]}, "/status/200", "GET", False),
        ({}, "/hello", "OPTIONS", False),
        ({"exclude_methods": ["get"]}, "/hello", "GET", False),
    ],
)
def test_excluded_requests_create_no_span_and_pass_through(
    langfuse_capture: LangfuseCapture, adapter: Adapter, options: dict[str, Any], path: str,
    method: str, is_traced: bool,
) -> None:  # fmt: skip
    expected = bare(adapter)(path, method=method)
    langfuse_capture.clear()
    got = traced(adapter, **options)(path, method=method)
    assert (got.status, got.body) == (expected.status, expected.body)
    assert (got.header(b"x-request-id") is not None) is is_traced
    assert len(langfuse_capture.roots()) == (1 if is_traced else 0)


def test_streaming_response_ends_after_the_last_byte(
    langfuse_capture: LangfuseCapture, adapter: Adapter
) -> None:
    started = time.time_ns()
    result = traced(adapter)("/stream", query=b"delay=0.1")
    finished = time.time_ns()
    assert result.body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    root = langfuse_capture.single(name=f"GET {adapter.template('/stream')}")
    duration = root["end_time_unix_nano"] - root["start_time_unix_nano"]
    assert duration >= 300_000_000  # three 100 ms chunks, not just the view's return
    assert started <= root["start_time_unix_nano"] <= root["end_time_unix_nano"] <= finished
    assert root["metadata"]["responseSize"] == len(result.body)
    assert 90 <= root["metadata"]["timeToFirstByteMs"] < duration / 1e6
    assert "disconnected" not in root["metadata"]
    assert root["level"] == "DEFAULT"


def test_client_disconnect_mid_stream_is_recorded(
    langfuse_capture: LangfuseCapture, adapter: Adapter
) -> None:
    result = traced(adapter)("/stream", query=b"delay=0.2", disconnect_after_chunks=1)
    assert result.body == b"data: 0\n\n"
    root = langfuse_capture.single(name=f"GET {adapter.template('/stream')}")
    assert root["metadata"]["disconnected"] is True
    assert root["level"] == "WARNING"
    assert root["status_message"] == "client disconnected before the response completed"
    assert root["end_time_unix_nano"] - root["start_time_unix_nano"] < 550_000_000


def test_request_context_is_set_for_the_view_and_reset_after(
    langfuse_capture: LangfuseCapture, adapter: Adapter
) -> None:
    result = traced(adapter)("/ctx", headers=[(b"x-user-id", b"u-ctx"), (b"x-request-id", b"r1")])
    root = langfuse_capture.single(name=f"GET {adapter.template('/ctx')}")
    assert json.loads(result.body) == {
        "request_id": "r1",
        "user_id": "u-ctx",
        "session_id": None,
        "trace_id": root["trace_id"],
        "observation_id": root["span_id"],
    }
    assert get_request_context() is None
    assert otel_trace.get_current_span() is otel_trace.INVALID_SPAN


def test_sampled_out_requests_keep_their_ids_and_failures_keep_their_user(
    langfuse_capture: LangfuseCapture, adapter: Adapter
) -> None:
    call = traced(adapter, sample_rate=0.0)
    ids = [(b"x-user-id", b"u-out"), (b"x-session-id", b"s-out"), (b"x-request-id", b"r-out")]
    result = call("/ctx", headers=ids)
    seen = json.loads(result.body)
    assert (seen["request_id"], seen["user_id"], seen["session_id"]) == ("r-out", "u-out", "s-out")
    assert langfuse_capture.spans() == []
    call("/boom", headers=ids)
    root = langfuse_capture.single(name=f"GET {adapter.template('/boom')}")
    assert (root["user_id"], root["session_id"]) == ("u-out", "s-out")
    assert root["metadata"]["requestId"] == "r-out"
    assert root["metadata"]["keptBy"] == "error"
    assert root["level"] == "ERROR"


def test_streamed_body_runs_in_the_request_context(
    langfuse_capture: LangfuseCapture, adapter: Adapter
) -> None:
    result = traced(adapter)("/stream-ctx", headers=[(b"x-request-id", b"rid-stream")])
    assert result.body.startswith(b"rid-stream")
    root = langfuse_capture.single(name=f"GET {adapter.template('/stream-ctx')}")
    child = langfuse_capture.single(name="llm")
    # A generation made while the body streams nests under the request.
    assert child["parent_span_id"] == root["span_id"]
    assert child["end_time_unix_nano"] <= root["end_time_unix_nano"]
    assert get_request_context() is None


def test_work_submitted_to_a_thread_pool_nests_under_the_request(
    langfuse_capture: LangfuseCapture, adapter: Adapter
) -> None:
    traced(adapter)("/thread", headers=[(b"x-user-id", b"u-thr")])
    root = langfuse_capture.single(name=f"GET {adapter.template('/thread')}")
    child = langfuse_capture.single(name="llm")
    assert child["parent_span_id"] == root["span_id"]
    assert child["user_id"] == "u-thr"


def test_concurrent_requests_in_threads_never_mix_users(
    langfuse_capture: LangfuseCapture, adapter: Adapter
) -> None:
    call = traced(adapter)

    def one(n: int) -> None:
        headers = [(b"x-user-id", f"user-{n}".encode()), (b"x-request-id", f"r-{n}".encode())]
        assert call(f"/items/{n}", headers=headers).status == 200

    threads = [threading.Thread(target=one, args=(n,)) for n in range(40)]
    with pin(adapter):
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    spans = langfuse_capture.spans()
    roots = {s["span_id"]: s for s in spans if s["name"] != "llm"}
    assert len(roots) == 40
    for root in roots.values():
        n = root["user_id"].split("-")[1]
        assert (root["metadata"]["requestId"], root["input"]["path"]) == (f"r-{n}", f"/items/{n}")
    for child in (s for s in spans if s["name"] == "llm"):
        assert child["user_id"] == roots[child["parent_span_id"]]["user_id"]


def test_a_head_response_has_no_body_to_count(
    langfuse_capture: LangfuseCapture, adapter: Adapter
) -> None:
    # Some frameworks produce the GET body for HEAD; the server sends none of it.
    traced(adapter)("/hello", method="HEAD")
    root = langfuse_capture.single(name=f"HEAD {adapter.template('/hello')}")
    assert root["output"] == {"statusCode": 200}
    assert root["metadata"]["responseSize"] == 0


# Django under ASGI warns that it reads a file synchronously: its own remark, not ours.
@pytest.mark.filterwarnings("ignore:StreamingHttpResponse must consume synchronous iterators")
def test_file_responses_end_when_closed(
    langfuse_capture: LangfuseCapture, adapter: Adapter
) -> None:
    result = traced(adapter)("/file")
    assert result.body == b"file body " * 100
    if adapter.name != "django-async":
        # The server got its own wsgi.file_wrapper back: it can still sendfile() it.
        assert result.messages == [{"type": "sendfile"}]
    root = langfuse_capture.single(name=f"GET {adapter.template('/file')}")
    assert root["metadata"]["responseSize"] == 1000
    assert "disconnected" not in root["metadata"]


def test_opt_in_health_endpoint(langfuse_capture: LangfuseCapture, adapter: Adapter) -> None:
    call = traced(adapter, health_path="/_langfuse/health")
    call("/hello")
    result = call("/_langfuse/health")
    assert result.status == 200
    body = json.loads(result.body)
    assert body["enabled"] is True and body["breaker"] == "closed"
    assert [s["name"] for s in langfuse_capture.spans()] == [f"GET {adapter.template('/hello')}"]
    assert traced(adapter)("/_langfuse/health").status == 404


def test_tracing_failures_never_reach_the_request(
    langfuse_capture: LangfuseCapture, adapter: Adapter, caplog: Any
) -> None:
    expected = bare(adapter)("/hello")
    call = traced(adapter, user_id_from=lambda info: 1 / 0)
    with caplog.at_level(logging.ERROR, logger="langfuse_mw"):
        results = [call("/hello") for _ in range(3)]
    for result in results:
        assert result.exception is None
        assert (result.status, result.body) == (expected.status, expected.body)
    assert health()["internal_errors"] == {"user_id_from": 3}
    assert len([r for r in caplog.records if "tracing error" in r.getMessage()]) == 1


@pytest.mark.parametrize(
    ("path", "kept_by"),
    [("/boom", "error"), ("/status/503", "error"), ("/items/3", "slow"), ("/stream", "slow")],
)
@pytest.mark.parametrize("arrival", list(ARRIVALS))
def test_a_kept_sampled_out_request_is_exported_as_a_sampled_one(
    langfuse_capture: LangfuseCapture, adapter: Adapter, path: str, kept_by: str, arrival: str
) -> None:
    # A request that is not sampled takes a lighter path (the request is read only if it is
    # kept): what it exports and answers must not change. Continued: the caller's flag
    # decides (00 drops it, 01 keeps it), whatever the rate.
    flags, baggage = ARRIVALS[arrival]
    options: dict[str, Any] = {"slow_threshold": 1e-9, "sample_rate": 0.0}
    before = time.time_ns()
    out = traced(adapter, **options)(path, headers=arrival_headers(flags, baggage))
    after = time.time_ns()
    if flags is None:
        options["sample_rate"] = 1.0
    headers = arrival_headers(None if flags is None else "01", baggage)
    sampled = traced(adapter, **options)(path, headers=headers)
    dropped, kept = [s for s in langfuse_capture.spans() if s["kind"] == 2]  # SERVER: roots
    assert (out.status, out.body) == (sampled.status, sampled.body)
    assert repr(out.exception) == repr(sampled.exception)  # plain WSGI: /boom raises
    assert out.header(b"x-request-id") == sampled.header(b"x-request-id")
    assert out.status is None or out.header(b"x-request-id") == b"r-7"
    assert_kept_as_sampled(dropped, kept, kept_by, arrival, (before, after))


@pytest.mark.parametrize("value", BAD_TRACEPARENTS_BOTH_FLAGS)
def test_a_bad_traceparent_on_a_request_that_may_be_dropped_starts_a_new_trace(
    langfuse_capture: LangfuseCapture, adapter: Adapter, value: bytes
) -> None:
    headers = [(b"traceparent", value), (b"x-request-id", b"r-9")]
    expected = bare(adapter)("/status/503", headers=headers)
    langfuse_capture.clear()
    got = traced(adapter, sample_rate=0.0)("/status/503", headers=headers)
    assert (got.status, got.body, repr(got.exception)) == (
        expected.status, expected.body, repr(expected.exception),
    )  # fmt: skip
    assert got.header(b"x-request-id") == b"r-9"
    root = langfuse_capture.single(name=f"GET {adapter.template('/status/<int:code>')}")
    assert root["parent_span_id"] is None
    assert root["trace_id"] not in ("0" * 32, VALID_TRACE_ID)
    assert root["metadata"]["keptBy"] == "error"
    assert health()["internal_errors"] == {}


def test_a_dropped_request_leaves_nothing_to_the_garbage_collector(
    langfuse_capture: LangfuseCapture, adapter: Adapter
) -> None:
    # Once a dropped request is over nothing may keep its state alive (a cycle waits for the
    # collector, and a dropped request must cost next to nothing): not the framework's
    # request, which the state can read, nor a request context the handler asked for.
    call = traced(adapter, sample_rate=0.0)
    assert call("/hello").status == 200  # the framework's own first-request set-up
    gc.collect()
    gc.disable()
    try:
        # Asked for its request context (built on demand), and streamed after the view
        # returned. Django's streaming responses hold themselves in a cycle (their iterator
        # maps over a bound method), and so whatever they stream: not ours to break.
        paths = ["/hello", "/ctx"]
        if adapter.framework != "django":
            paths.append("/stream-ctx")
        for path in paths:
            assert call(path).status == 200
        left = [o for o in gc.get_objects() if issubclass(type(o), RequestState)]
    finally:
        gc.enable()
    assert left == []
    assert langfuse_capture.spans() == []
