"""safe_trace: a child observation that never changes the function's result or exception."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from opentelemetry import trace as otel_trace
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from langfuse_mw import LangfuseMiddleware, health, safe_trace
from langfuse_mw.testing import LangfuseCapture
from tests.asgi_driver import call, in_request

pytestmark = pytest.mark.anyio


@safe_trace(capture_input=True, capture_output=True, max_chars=40)
def summarise(text: str, *, words: int = 3) -> str:
    return " ".join(text.split()[:words])


@safe_trace(name="fetch-answer")
async def answer(question: str) -> str:
    await asyncio.sleep(0)
    if question == "fail":
        raise LookupError("no answer")
    return "42"


async def handler(request: Request) -> Response:
    short = summarise("the quick brown fox jumps over the lazy dog", words=2)
    first = await answer("life")
    try:
        await answer("fail")
    except LookupError as exc:
        failure = str(exc)
    return JSONResponse({"short": short, "answer": first, "failure": failure})


app = LangfuseMiddleware(Starlette(routes=[Route("/ask", handler)]))


async def test_functions_become_children_and_keep_their_behaviour(
    langfuse_capture: LangfuseCapture,
) -> None:
    result = await call(app, "/ask", headers=[(b"x-user-id", b"u-safe")])
    assert result.body == b'{"short":"the quick","answer":"42","failure":"no answer"}'
    root = langfuse_capture.single(name="GET /ask")
    child = langfuse_capture.single(name="summarise")
    assert child["parent_span_id"] == root["span_id"]
    assert child["user_id"] == "u-safe"
    assert child["input"].startswith('{"args": ["the quick brown fox jumps')
    assert child["input"].endswith("...[truncated]")
    assert child["output"] == "the quick"
    ok, failed = sorted(langfuse_capture.spans(name="fetch-answer"), key=lambda s: s["level"])
    assert ok["level"] == "DEFAULT" and ok["input"] is None and ok["output"] is None
    assert (failed["level"], failed["status_message"]) == ("ERROR", "LookupError: no answer")


def test_without_a_runtime_the_function_just_runs() -> None:
    from langfuse_mw import runtime

    runtime.shutdown(0.1)
    assert summarise("a b c d") == "a b c"
    assert asyncio.run(answer("x")) == "42"


def test_tracing_failures_never_reach_the_caller_and_open_the_breaker(
    langfuse_capture: LangfuseCapture, monkeypatch: Any, caplog: Any
) -> None:
    calls = 0

    def broken(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        raise RuntimeError("sdk down")

    monkeypatch.setattr(langfuse_capture.runtime.client, "start_as_current_observation", broken)

    @safe_trace
    def add(a: int, b: int) -> int:
        return a + b

    request = otel_trace.NonRecordingSpan(
        otel_trace.SpanContext(1, 1, False, otel_trace.TraceFlags(1))
    )  # inside a request (outside one nothing is attempted)
    with caplog.at_level(logging.ERROR, logger="langfuse_mw"), otel_trace.use_span(request):
        assert [add(n, 1) for n in range(20)] == list(range(1, 21))
    assert calls == 5  # then the breaker stops trying for 30 s
    (where,) = health()["internal_errors"]
    assert where.endswith("<locals>.add") and health()["internal_errors"][where] == 5
    assert len([r for r in caplog.records if "tracing error" in r.getMessage()]) == 1


def test_generators_are_refused_at_decoration() -> None:
    with pytest.raises(TypeError, match="generator"):

        @safe_trace
        def numbers() -> Any:
            yield 1


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no message")


def test_a_failure_while_recording_never_leaves_the_observation_current(
    langfuse_capture: LangfuseCapture,
) -> None:
    @safe_trace
    def failing() -> None:
        raise _Unprintable()

    def handler() -> Any:
        request_span = otel_trace.get_current_span()
        with pytest.raises(_Unprintable):
            failing()
        return otel_trace.get_current_span() is request_span

    assert in_request(handler) is True
    child = langfuse_capture.single(
        name="test_a_failure_while_recording_never_leaves_the_observation_current.<locals>.failing"
    )
    assert (child["level"], child["status_message"]) == ("ERROR", "_Unprintable")


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), TimeoutError(), LookupError("")])
def test_an_exception_without_a_message_is_named_by_its_type_alone(
    langfuse_capture: LangfuseCapture, exc: BaseException
) -> None:
    @safe_trace(name="step")
    def step() -> None:
        raise exc

    def handler() -> bool:
        with pytest.raises(type(exc)):
            step()
        return True

    assert in_request(handler) is True
    child = langfuse_capture.single(name="step")
    assert (child["level"], child["status_message"]) == ("ERROR", type(exc).__name__)


def test_outside_a_request_the_function_just_runs(langfuse_capture: LangfuseCapture) -> None:
    @safe_trace
    def step(n: int) -> int:
        return n

    assert [step(n) for n in range(5)] == list(range(5))
    assert langfuse_capture.spans() == []


class _Slow:
    def __repr__(self) -> str:  # pragma: no cover - must not be called
        raise AssertionError("repr called")


def test_captured_values_are_bounded_named_and_never_fail_the_observation(
    langfuse_capture: LangfuseCapture,
) -> None:
    @safe_trace(capture_input=True, capture_output=True, max_chars=60)
    def work(items: Any, blob: bytes, other: Any) -> Any:
        return items

    nested: list[Any] = []
    for _ in range(100_000):  # deeper than the interpreter's recursion limit
        nested = [nested]
    big = list(range(3_000_000))
    assert in_request(lambda: work(big, b"\0" * 10, _Slow())) is big
    assert in_request(lambda: work(nested, b"", None)) is nested
    first, deep = sorted(
        langfuse_capture.spans(
            name="test_captured_values_are_bounded_named_and_never_fail_the_observation.<locals>.work"
        ),
        key=lambda span: span["start_time_unix_nano"],
    )
    cut = 60 + len("...[truncated]")
    assert len(first["input"]) <= cut and first["input"].startswith('{"args": [[0, 1, 2')
    assert len(first["output"]) <= cut
    # Encoded only as deep as the limit: the interpreter's recursion limit is never reached.
    assert deep["input"].startswith('{"args": [[[[[') and len(deep["input"]) <= cut
    assert deep["output"].startswith("[[[[[") and len(deep["output"]) <= cut
    # Objects JSON does not know are named, never repr()'d (a __repr__ may be slow or raise).
    assert in_request(lambda: work([1], b"ab", _Slow())) == [1]
    small = [span for span in langfuse_capture.spans() if span["name"].endswith(".work")][-1]
    assert small["input"] == {"args": [[1], "<bytes: 2 bytes>", "<_Slow>"], "kwargs": {}}


def test_secrets_stay_out_of_names_and_captured_input(langfuse_capture: LangfuseCapture) -> None:
    import functools

    def login(user: str, password: str, *, api_key: str = "") -> str:
        return user

    traced = safe_trace(functools.partial(login, password="hunter2"))
    captured = safe_trace(capture_input=True)(login)
    assert in_request(lambda: traced("bob")) == "bob"
    assert in_request(lambda: captured("bob", "pa55word", api_key="k-123456")) == "bob"
    names = {span["name"] for span in langfuse_capture.spans()}
    assert names >= {"test_secrets_stay_out_of_names_and_captured_input.<locals>.login"}
    exported = b"".join(langfuse_capture.sender.requests)
    for secret in (b"hunter2", b"pa55word", b"k-123456", b"functools.partial", b"0x7"):
        assert secret not in exported


def test_methods_classmethods_staticmethods_and_async_callables(
    langfuse_capture: LangfuseCapture,
) -> None:
    class Service:
        @safe_trace
        @classmethod
        def make(cls, x: int) -> int:
            return x + 1

        @safe_trace
        @staticmethod
        def double(x: int) -> int:
            return 2 * x

    class Remote:
        async def __call__(self, x: int) -> int:
            await asyncio.sleep(0.05)
            raise LookupError(f"no {x}")

    remote = safe_trace(name="remote")(Remote())

    async def handler() -> Any:
        with pytest.raises(LookupError):
            await remote(1)
        return Service.make(1) + Service().double(2)

    assert in_request(handler) == 6
    call_span = langfuse_capture.single(name="remote")
    # Timed over the await, with the exception raised there.
    assert call_span["end_time_unix_nano"] - call_span["start_time_unix_nano"] >= 50_000_000
    assert call_span["status_message"] == "LookupError: no 1"
    assert len(langfuse_capture.spans()) == 4  # the request, remote, make, double


def test_a_name_passed_where_the_function_goes_is_refused() -> None:
    with pytest.raises(TypeError, match=r"safe_trace\(name=\.\.\.\)"):
        safe_trace("retrieve")  # type: ignore[call-overload]
