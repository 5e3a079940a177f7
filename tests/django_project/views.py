"""The shared test app's views, sync and async."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from typing import Any

from asgiref.sync import sync_to_async
from django.http import FileResponse, HttpResponse, JsonResponse, StreamingHttpResponse

from langfuse_mw import get_request_context, submit_with_context
from tests.apps import llm_call
from tests.wsgi_apps.plain import _pool, context_chunks, context_json, stream_chunks


def item(request: Any, item_id: int) -> Any:
    return JsonResponse({"item": item_id, "answer": llm_call(f"item {item_id}")})


def boom(request: Any) -> Any:
    raise RuntimeError("kaboom")


def status(request: Any, code: int) -> Any:
    return HttpResponse("status", status=code, content_type="text/plain")


def stream(request: Any) -> Any:
    delay = float(request.GET.get("delay", "0.05"))
    return StreamingHttpResponse(stream_chunks(delay), content_type="text/event-stream")


def stream_ctx(request: Any) -> Any:
    return StreamingHttpResponse(context_chunks(), content_type="text/plain")


def ctx(request: Any) -> Any:
    return HttpResponse(context_json(), content_type="application/json")


def thread(request: Any) -> Any:
    answer = submit_with_context(_pool, llm_call, "from a thread").result()
    return HttpResponse(answer, content_type="text/plain")


def own(request: Any) -> Any:
    return HttpResponse("mine", content_type="text/plain", headers={"X-Request-ID": "app-chosen"})


def hello(request: Any) -> Any:
    return HttpResponse("ok", content_type="text/plain")


def file(request: Any) -> Any:
    return FileResponse(io.BytesIO(b"file body " * 100), content_type="text/plain")


async def aitem(request: Any, item_id: int) -> Any:
    answer = await sync_to_async(llm_call)(f"item {item_id}")
    return JsonResponse({"item": item_id, "answer": answer})


async def aboom(request: Any) -> Any:
    raise RuntimeError("kaboom")


async def astatus(request: Any, code: int) -> Any:
    return status(request, code)


async def _achunks(delay: float) -> AsyncIterator[bytes]:
    for n in range(3):
        await asyncio.sleep(delay)
        yield f"data: {n}\n\n".encode()


async def astream(request: Any) -> Any:
    delay = float(request.GET.get("delay", "0.05"))
    return StreamingHttpResponse(_achunks(delay), content_type="text/event-stream")


async def _acontext_chunks() -> AsyncIterator[bytes]:
    current = get_request_context()
    assert current is not None
    yield current.request_id.encode()
    yield llm_call("inside the stream").encode()


async def astream_ctx(request: Any) -> Any:
    return StreamingHttpResponse(_acontext_chunks(), content_type="text/plain")


async def actx(request: Any) -> Any:
    return ctx(request)


async def athread(request: Any) -> Any:
    answer = await asyncio.wrap_future(submit_with_context(_pool, llm_call, "from a thread"))
    return HttpResponse(answer, content_type="text/plain")


async def aown(request: Any) -> Any:
    return own(request)


async def ahello(request: Any) -> Any:
    return hello(request)
