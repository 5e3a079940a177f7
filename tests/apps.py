"""The same small app on Starlette and on FastAPI, used by the ASGI tests and the e2e servers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from langfuse import get_client
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.websockets import WebSocket

from langfuse_mw import get_request_context, submit_with_context

_pool = ThreadPoolExecutor(max_workers=4)


def llm_call(prompt: str) -> str:
    """A fake LLM generation recorded with the langfuse SDK, as an app would."""
    with get_client().start_as_current_observation(
        name="llm", as_type="generation", model="fake-model", input=prompt
    ) as generation:
        answer = f"echo: {prompt}"
        generation.update(output=answer)
    return answer


async def item(request: Request) -> Response:
    answer = llm_call(f"item {request.path_params['item_id']}")
    return JSONResponse({"item": request.path_params["item_id"], "answer": answer})


async def order(request: Request) -> Response:
    return JSONResponse(dict(request.path_params))


async def boom(request: Request) -> Response:
    raise RuntimeError("kaboom")


async def status(request: Request) -> Response:
    return PlainTextResponse("status", status_code=int(request.path_params["code"]))


async def stream(request: Request) -> Response:
    delay = float(request.query_params.get("delay", "0.05"))

    async def chunks() -> AsyncIterator[bytes]:
        for n in range(3):
            await asyncio.sleep(delay)
            yield f"data: {n}\n\n".encode()

    return StreamingResponse(chunks(), media_type="text/event-stream")


async def ctx(request: Request) -> Response:
    current = get_request_context()
    assert current is not None
    return JSONResponse(
        {
            "request_id": current.request_id,
            "user_id": current.user_id,
            "session_id": current.session_id,
            "trace_id": current.trace_id,
            "observation_id": current.observation_id,
        }
    )


async def thread(request: Request) -> Response:
    answer = await asyncio.wrap_future(submit_with_context(_pool, llm_call, "from a thread"))
    return PlainTextResponse(answer)


async def own_request_id(request: Request) -> Response:
    return PlainTextResponse("mine", headers={"x-request-id": "app-chosen"})


async def health(request: Request) -> Response:
    return PlainTextResponse("ok")


async def ws(websocket: WebSocket) -> None:
    await websocket.accept()
    text = await websocket.receive_text()
    await websocket.send_text(f"echo {text}")
    await websocket.close()


async def users_index(request: Request) -> Response:
    return PlainTextResponse("users")


ROUTES: list[Any] = [
    Route("/items/{item_id}", item),
    Route("/boom", boom),
    Route("/status/{code:int}", status),
    Route("/stream", stream),
    Route("/ctx", ctx),
    Route("/thread", thread),
    Route("/own-request-id", own_request_id),
    Route("/health", health),
    Route("/hello", health),
    Route("/items-only-post", health, methods=["POST"]),
    WebSocketRoute("/ws", ws),
    Mount(
        "/api",
        routes=[
            Mount("/users/{uid}", routes=[Route("/orders/{oid}", order)]),
            Route("/users", users_index),
        ],
    ),
]


def starlette_app() -> Starlette:
    """The test app on plain Starlette."""
    return Starlette(routes=list(ROUTES))


def fastapi_app() -> Any:
    """The test app on FastAPI (same routes, FastAPI's router and APIRoute for two of them)."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/fa/items/{item_id}")
    async def fa_item(item_id: int) -> dict[str, Any]:
        return {"item": item_id, "answer": llm_call(f"item {item_id}")}

    for route in ROUTES:
        app.router.routes.append(route)
    return app


def build(framework: str) -> Any:
    """Return the test app for ``framework`` ("starlette" or "fastapi")."""
    return starlette_app() if framework == "starlette" else fastapi_app()
