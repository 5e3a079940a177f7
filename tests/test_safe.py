"""safe_trace: a child observation that never changes the function's result or exception."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from langfuse_mw import LangfuseMiddleware, health, safe_trace
from langfuse_mw.testing import LangfuseCapture
from tests.asgi_driver import call

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

    with caplog.at_level(logging.ERROR, logger="langfuse_mw"):
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
