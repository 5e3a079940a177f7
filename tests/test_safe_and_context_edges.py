"""safe_trace with hostile values and async callables; the context helpers with async code."""

from __future__ import annotations

import asyncio
import functools
import threading
import tracemalloc
from typing import Any
from unittest import mock

import pydantic
import pytest
from django.utils.functional import SimpleLazyObject
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from langfuse_mw import (
    LangfuseMiddleware,
    RequestContext,
    bind_context,
    get_request_context,
    run_with_context,
    safe_trace,
)
from langfuse_mw.testing import LangfuseCapture
from tests.apps import llm_call
from tests.asgi_driver import call, in_request


def _in_request(fn: Any, user: bytes = b"u-review") -> Any:
    """Run ``fn()`` as the handler of a traced request from ``user``; return what it returned."""
    return in_request(fn, [(b"x-user-id", user)])


class Invoice(pydantic.BaseModel):
    number: str
    lines: list[int]


@safe_trace(name="capture", capture_input=True, capture_output=True)
def capture(*values: Any) -> Any:
    return values[0] if values else None


def test_huge_strings_sets_and_models_cost_no_more_than_a_short_capture(
    langfuse_capture: LangfuseCapture,
) -> None:
    # The docs promise a capture is encoded only up to max_chars; a 20 MB document, a set of
    # a million ids or a pydantic model holding a million lines must not be copied whole.
    document = "é" * 20_000_000
    ids = set(range(1_000_000))
    invoice = Invoice(number="A-1", lines=list(range(1_000_000)))
    peaks: list[int] = []

    def handler() -> None:
        for value in (document, ids, invoice):
            tracemalloc.start()
            try:
                assert capture(value) is value
                peaks.append(tracemalloc.get_traced_memory()[1])
            finally:
                tracemalloc.stop()

    _in_request(handler)
    assert max(peaks) < 2_000_000, peaks  # bytes allocated while tracing one call
    text, numbers, model = langfuse_capture.spans(name="capture")
    assert text["output"].startswith('"éééé') and len(text["output"]) <= 2000 + 20
    assert numbers["output"].startswith("[0, 1, 2, 3")
    assert model["output"].startswith('{"number": "A-1", "lines": [0, 1, 2')


def test_keys_cycles_classes_and_deep_nesting_keep_the_rest_of_the_capture(
    langfuse_capture: LangfuseCapture,
) -> None:
    # Before: one tuple key, one cycle, one pydantic class or a structure deeper than ~1000
    # levels (max_chars=2000) turned the whole input into "<dict>".
    tree: dict[str, Any] = {"name": "root"}
    tree["self"] = tree
    nested: list[Any] = []
    for _ in range(5_000):
        nested = [nested]
    # Deeper than anyone reads, and than a JSON decoder with a recursion limit (Python's, the
    # devserver's) can parse: past a depth, containers are named.

    _in_request(lambda: capture({(1, 2): "pair"}, tree, Invoice, 10**5000, float("nan")))
    _in_request(lambda: capture(nested))
    first, deep = langfuse_capture.spans(name="capture")
    assert first["input"] == {
        "args": [
            {"<tuple>": "pair"},
            {"name": "root", "self": "<cycle>"},
            "<class Invoice>",
            "<int>",
            "nan",
        ],
        "kwargs": {},
    }
    (inner,) = deep["input"]["args"]
    depth = 0
    while isinstance(inner, list):
        (inner,), depth = inner, depth + 1
    assert inner == "<list>" and 50 <= depth <= 200


def test_proxies_and_mocks_are_named_without_running_their_code(
    langfuse_capture: LangfuseCapture,
) -> None:
    # Django's request.user is a SimpleLazyObject: looking at it (isinstance, getattr) loads
    # the user from the database. A Mock answers every getattr with a new Mock: tracing one
    # used to take ~20 s (model_dump() -> Mock -> model_dump() ... to the recursion limit).
    loads: list[int] = []
    user = SimpleLazyObject(lambda: loads.append(1) or "bob")
    client = mock.Mock()

    returned: list[Any] = []
    _in_request(lambda: returned.append(capture(user, client)))
    assert returned[0] is user
    assert loads == []
    assert client.mock_calls == []
    span = langfuse_capture.single(name="capture")
    assert span["input"] == {"args": ["<SimpleLazyObject>", "<Mock>"], "kwargs": {}}


def test_a_partial_of_an_async_callable_is_timed_over_its_await(
    langfuse_capture: LangfuseCapture,
) -> None:
    class Remote:
        async def __call__(self, x: int) -> int:
            await asyncio.sleep(0.05)
            raise LookupError(f"no {x}")

    remote = safe_trace(name="remote")(functools.partial(Remote(), 1))
    assert asyncio.iscoroutinefunction(remote)

    async def handler() -> None:
        with pytest.raises(LookupError):
            await remote()

    _in_request(handler)
    span = langfuse_capture.single(name="remote")
    assert span["end_time_unix_nano"] - span["start_time_unix_nano"] >= 50_000_000
    assert (span["level"], span["status_message"]) == ("ERROR", "LookupError: no 1")


def test_a_callable_object_with_a_generator_call_is_refused() -> None:
    class Stream:
        def __call__(self) -> Any:
            yield 1

    with pytest.raises(TypeError, match="generator"):
        safe_trace(Stream())


def test_bind_context_carries_the_request_into_an_async_function(
    langfuse_capture: LangfuseCapture,
) -> None:
    seen: list[RequestContext | None] = []

    async def job(prompt: str) -> str:
        await asyncio.sleep(0)
        seen.append(get_request_context())
        return llm_call(prompt)

    bound = _in_request(lambda: bind_context(job), user=b"u-bound")
    assert asyncio.iscoroutinefunction(bound)
    # Awaited later, in another event loop and another thread: still the request's.
    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(asyncio.run(bound("later"))))
    thread.start()
    thread.join()
    assert result == ["echo: later"]
    root = langfuse_capture.single(name="GET /")
    child = langfuse_capture.single(name="llm")
    assert seen[0] is not None and seen[0].user_id == "u-bound"
    assert (child["parent_span_id"], child["user_id"]) == (root["span_id"], "u-bound")
    assert get_request_context() is None  # nothing leaked into the caller


async def test_a_background_task_bound_to_the_request_runs(
    langfuse_capture: LangfuseCapture,
) -> None:
    # Starlette awaits an async callable and runs anything else in a thread: a bound async
    # function that stopped looking async was called there, and its coroutine never ran.
    done = asyncio.Event()

    async def notify() -> None:
        llm_call("notify")
        done.set()

    async def handler(request: Request) -> Response:
        return PlainTextResponse("ok", background=BackgroundTask(bind_context(notify)))

    app = LangfuseMiddleware(Starlette(routes=[Route("/", handler)]))
    await call(app, "/", headers=[(b"x-user-id", b"u-bg")])
    await asyncio.wait_for(done.wait(), 2)
    child = langfuse_capture.single(name="llm")
    assert child["parent_span_id"] == langfuse_capture.single(name="GET /")["span_id"]
    assert child["user_id"] == "u-bg"


def test_run_with_context_carries_the_request_into_an_async_function(
    langfuse_capture: LangfuseCapture,
) -> None:
    async def job() -> RequestContext | None:
        await asyncio.sleep(0)
        llm_call("threaded")
        return get_request_context()

    ctx = _in_request(get_request_context, user=b"u-run")
    seen: list[RequestContext | None] = []
    # The documented use: a thread you started, here running an event loop of its own.
    thread = threading.Thread(target=lambda: seen.append(asyncio.run(run_with_context(ctx, job))))
    thread.start()
    thread.join()
    assert seen == [ctx]
    child = langfuse_capture.single(name="llm")
    assert (child["parent_span_id"], child["user_id"]) == (ctx.observation_id, "u-run")
    assert get_request_context() is None


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


pytestmark = pytest.mark.anyio
