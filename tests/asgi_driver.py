"""Drive an ASGI app with hand-built scopes: raw header bytes, disconnects, exact responses."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from langfuse_mw import LangfuseMiddleware


@dataclass
class Result:
    status: int | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    exception: BaseException | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)

    def header(self, name: bytes) -> bytes | None:
        values = [v for k, v in self.headers if k == name]
        return values[0] if values else None


async def call(
    app: Any,
    path: str = "/",
    *,
    method: str = "GET",
    query: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    disconnect_after_chunks: int | None = None,
    client: tuple[str, int] = ("127.0.0.1", 50000),
) -> Result:
    """Send one HTTP request to ``app``; optionally disconnect after N body chunks."""
    result = Result()
    chunks = 0
    disconnected = asyncio.Event()
    request_sent = False
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query,
        "headers": [(b"host", b"testserver"), *(headers or [])],
        "client": client,
        "server": ("testserver", 80),
        "state": {},
    }

    async def receive() -> dict[str, Any]:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal chunks
        result.messages.append(message)
        if disconnected.is_set():
            raise OSError("client went away")
        if message["type"] == "http.response.start":
            result.status = message["status"]
            result.headers = list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            result.body += message.get("body", b"")
            chunks += 1
            if disconnect_after_chunks is not None and chunks >= disconnect_after_chunks:
                disconnected.set()

    try:
        await app(scope, receive, send)
    except BaseException as exc:
        result.exception = exc
    return result


def in_request(fn: Callable[[], Any], headers: list[tuple[bytes, bytes]] | None = None) -> Any:
    """Run ``fn()`` as the handler of a traced Starlette request; return what it returned
    (awaited, when that is a coroutine)."""
    box: dict[str, Any] = {}

    async def handler(request: Request) -> Response:
        box["value"] = fn()
        if asyncio.iscoroutine(box["value"]):
            box["value"] = await box["value"]
        return Response("ok")

    app = LangfuseMiddleware(Starlette(routes=[Route("/", handler)]))
    asyncio.run(call(app, "/", headers=headers))
    return box["value"]


async def websocket(
    app: Any, path: str, *, headers: list[tuple[bytes, bytes]] | None = None, text: str = "hi"
) -> list[dict[str, Any]]:
    """Connect, send one text frame, then let the app close; returns what the app sent."""
    sent: list[dict[str, Any]] = []
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for message in (
        {"type": "websocket.connect"},
        {"type": "websocket.receive", "text": text},
    ):
        inbox.put_nowait(message)
    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"testserver"), *(headers or [])],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "subprotocols": [],
        "state": {},
    }

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "websocket.close":
            inbox.put_nowait({"type": "websocket.disconnect", "code": 1000})

    await app(scope, inbox.get, send)
    return sent


async def lifespan(app: Any, between: Any = None) -> list[str]:
    """Run startup, then ``await between()``, then shutdown; returns the app's replies."""
    replies: list[str] = []
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    inbox.put_nowait({"type": "lifespan.startup"})
    started = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        replies.append(message["type"])
        if message["type"] == "lifespan.startup.complete":
            started.set()

    task = asyncio.ensure_future(
        app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, send)
    )
    await started.wait()
    if between is not None:
        await between()
    inbox.put_nowait({"type": "lifespan.shutdown"})
    await task
    return replies
