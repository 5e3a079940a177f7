"""The WebSocket handlers of ``tests.ws_apps`` behind LangfuseMiddleware, as uvicorn serves them."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from langfuse_mw import LangfuseMiddleware
from tests.ws_apps import ROUTES


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")  # the readiness probe


app = Starlette(routes=[Route("/hello", hello), *ROUTES])
app.add_middleware(LangfuseMiddleware)
