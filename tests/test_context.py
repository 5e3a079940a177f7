"""The request context API: reading it, and carrying it into threads you start."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from langfuse_mw import (
    LangfuseMiddleware,
    RequestContext,
    bind_context,
    get_request_context,
    run_with_context,
)
from langfuse_mw.testing import LangfuseCapture
from tests.apps import llm_call
from tests.asgi_driver import call

pytestmark = pytest.mark.anyio


def app_with(handler: Any) -> Any:
    return LangfuseMiddleware(Starlette(routes=[Route("/work", handler)]))


async def test_run_with_context_in_a_thread_you_started(langfuse_capture: LangfuseCapture) -> None:
    seen: list[RequestContext | None] = []

    async def handler(request: Request) -> Response:
        ctx = get_request_context()
        assert ctx is not None

        def job() -> None:
            seen.append(get_request_context())
            llm_call("threaded")

        # A bare thread sees nothing of the request...
        bare = threading.Thread(target=lambda: seen.append(get_request_context()))
        bare.start()
        bare.join()
        # ...until the context is handed over explicitly.
        thread = threading.Thread(target=run_with_context, args=(ctx, job))
        thread.start()
        thread.join()
        return PlainTextResponse("ok")

    await call(app_with(handler), "/work", headers=[(b"x-user-id", b"u-run")])
    root = langfuse_capture.single(name="GET /work")
    child = langfuse_capture.single(name="llm")
    assert seen[0] is None
    assert seen[1] is not None and seen[1].user_id == "u-run"
    assert child["parent_span_id"] == root["span_id"]
    assert child["user_id"] == "u-run"


async def test_bind_context_with_a_pool_and_asyncio_to_thread(
    langfuse_capture: LangfuseCapture,
) -> None:
    async def handler(request: Request) -> Response:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(bind_context(llm_call), ["a", "b"]))
        await asyncio.to_thread(llm_call, "c")  # copies the context by itself
        return PlainTextResponse("ok")

    await call(app_with(handler), "/work", headers=[(b"x-session-id", b"s-pool")])
    root = langfuse_capture.single(name="GET /work")
    children = langfuse_capture.spans(name="llm")
    assert len(children) == 3
    assert {c["parent_span_id"] for c in children} == {root["span_id"]}
    assert {c["session_id"] for c in children} == {"s-pool"}


def test_no_context_outside_a_request() -> None:
    assert get_request_context() is None
