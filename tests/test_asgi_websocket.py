"""WebSocket connections through LangfuseMiddleware: how they close, and who closed them."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.websockets import WebSocketDisconnect

from langfuse_mw import LangfuseMiddleware
from langfuse_mw.testing import LangfuseCapture
from tests.conftest import FRAMEWORKS
from tests.ws_apps import ROUTES

pytestmark = pytest.mark.anyio

Message = dict[str, Any]


# -- the app ----------------------------------------------------------------------------------


def traced(framework: str, placement: str = "add_middleware", **options: Any) -> Any:
    if framework == "starlette":
        app: Any = Starlette(routes=list(ROUTES))
    else:
        from fastapi import FastAPI

        app = FastAPI()
        app.router.routes.extend(ROUTES)
    if placement == "wrap":
        return LangfuseMiddleware(app, **options)
    app.add_middleware(LangfuseMiddleware, **options)
    return app


async def raw_close_without_code(scope: Any, receive: Any, send: Any) -> None:
    # A plain ASGI app: websocket.close with no code means 1000 (ASGI spec).
    assert (await receive())["type"] == "websocket.connect"
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.close"})


async def raw_read_until_disconnect(scope: Any, receive: Any, send: Any) -> None:
    assert (await receive())["type"] == "websocket.connect"
    await send({"type": "websocket.accept"})
    while (await receive())["type"] != "websocket.disconnect":
        pass


async def raw_read_past_disconnect(scope: Any, receive: Any, send: Any) -> None:
    # Reads once more after the client's close: the server's receive raises.
    await raw_read_until_disconnect(scope, receive, send)
    await receive()


async def raw_denial_response(scope: Any, receive: Any, send: Any) -> None:
    # The WebSocket Denial Response extension: an HTTP answer instead of the handshake.
    assert (await receive())["type"] == "websocket.connect"
    await send({"type": "websocket.http.response.start", "status": 401, "headers": []})
    await send({"type": "websocket.http.response.body", "body": b"no token"})


# -- the client -------------------------------------------------------------------------------


async def connect(
    app: Any,
    path: str,
    *,
    query: str = "",
    frames: Iterable[Message] = ({"type": "websocket.receive", "text": "hi"},),
    send_fails: bool = False,
) -> tuple[list[Message], BaseException | None]:
    """One connection: connect, then ``frames`` from the client (a ``websocket.disconnect``
    among them is the client closing). When the app closes first the client answers with
    1000. ``send_fails``: the client is gone, every frame sent after accept raises OSError
    (ASGI 2.4 servers). A receive after the client's close raises, as a server's may.
    Returns what the app sent and the exception that escaped it."""
    sent: list[Message] = []
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    for message in ({"type": "websocket.connect"}, *frames):
        inbox.put_nowait(message)
    closed = False
    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "scheme": "ws",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query.encode(),
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "subprotocols": [],
        "state": {},
    }

    async def receive() -> Message:
        nonlocal closed
        if closed:
            raise RuntimeError("the connection is closed")
        message = await inbox.get()
        closed = message["type"] == "websocket.disconnect"
        return message

    async def send(message: Message) -> None:
        sent.append(message)
        if send_fails and message["type"] == "websocket.send":
            raise OSError("connection reset by peer")
        if message["type"] == "websocket.close":
            inbox.put_nowait({"type": "websocket.disconnect", "code": 1000})

    try:
        await app(scope, receive, send)
    except Exception as exc:
        return sent, exc
    return sent, None


def disconnect(code: int, reason: str | None = None) -> Message:
    message: Message = {"type": "websocket.disconnect", "code": code}
    if reason is not None:
        message["reason"] = reason
    return message


def assert_no_error(root: dict[str, Any]) -> None:
    assert root["level"] != "ERROR"
    assert root["status"]["code"] == 0
    assert root["events"] == []


framework = pytest.mark.parametrize("framework", FRAMEWORKS)


# -- the app closes ---------------------------------------------------------------------------


@framework
@pytest.mark.parametrize(
    ("query", "code", "reason", "level", "message"),
    [
        ("code=1000", 1000, None, "DEFAULT", None),
        ("code=1001&reason=restarting", 1001, "restarting", "DEFAULT", None),
        ("code=4001&reason=session+over", 4001, "session over", "DEFAULT", None),
        ("code=1011", 1011, None, "ERROR", "websocket closed with 1011"),
        (
            "code=1011&reason=model+timed+out",
            1011,
            "model timed out",
            "ERROR",
            "websocket closed with 1011: model timed out",
        ),
        ("code=1014", 1014, None, "ERROR", "websocket closed with 1014"),
    ],
)
async def test_the_code_the_app_closes_with_is_recorded(
    langfuse_capture: LangfuseCapture,
    framework: str,
    query: str,
    code: int,
    reason: str | None,
    level: str,
    message: str | None,
) -> None:
    sent, exc = await connect(traced(framework), "/close", query=query)
    assert exc is None
    assert sent[-1] == {"type": "websocket.close", "code": code, "reason": reason or ""}
    root = langfuse_capture.single(name="WS /close")
    assert root["output"] == {"statusCode": 101}
    assert root["metadata"]["closeCode"] == code
    assert root["metadata"]["closedBy"] == "app"
    assert root["metadata"].get("closeReason") == reason
    assert "disconnected" not in root["metadata"]
    assert (root["level"], root["status_message"]) == (level, message)
    # 1011 (internal error) and 1014 (bad gateway) are the server failing, as a 5xx is.
    assert root["status"] == {"code": 2 if level == "ERROR" else 0, "message": message or ""}


async def test_a_close_without_a_code_is_1000(langfuse_capture: LangfuseCapture) -> None:
    await connect(LangfuseMiddleware(raw_close_without_code), "/raw", frames=())
    root = langfuse_capture.single()
    assert (root["metadata"]["closeCode"], root["metadata"]["closedBy"]) == (1000, "app")
    assert root["level"] == "DEFAULT"


async def test_a_long_close_reason_is_capped(langfuse_capture: LangfuseCapture) -> None:
    await connect(traced("starlette"), "/close", query="code=1000&reason=" + "x" * 5000)
    reason = langfuse_capture.single()["metadata"]["closeReason"]
    assert reason.startswith("x" * 123)
    assert len(reason) < 200


async def test_closing_before_accept_is_a_denial_with_its_code(
    langfuse_capture: LangfuseCapture,
) -> None:
    sent, _ = await connect(traced("starlette"), "/deny", frames=())
    assert [m["type"] for m in sent] == ["websocket.close"]
    root = langfuse_capture.single(name="WS /deny")
    assert root["output"] == {"statusCode": 403}
    assert root["metadata"]["closeCode"] == 1008
    assert root["metadata"]["closeReason"] == "no token"
    assert (root["level"], root["status_message"]) == ("WARNING", "HTTP 403")


async def test_the_first_close_is_the_connections(langfuse_capture: LangfuseCapture) -> None:
    # The app closed with 1001; the client's reply (here 1000) only completes the handshake.
    _, exc = await connect(traced("starlette"), "/close-then-read", frames=())
    assert exc is None
    root = langfuse_capture.single()
    assert (root["metadata"]["closeCode"], root["metadata"]["closedBy"]) == (1001, "app")
    assert "disconnected" not in root["metadata"]


async def test_a_denial_response_is_the_connections_status(
    langfuse_capture: LangfuseCapture,
) -> None:
    sent, exc = await connect(LangfuseMiddleware(raw_denial_response), "/raw", frames=())
    assert exc is None
    assert sent[0]["status"] == 401
    assert dict(sent[0]["headers"])[b"x-request-id"]  # echoed, as on every answer
    root = langfuse_capture.single()
    assert root["output"] == {"statusCode": 401}
    assert "closeCode" not in root["metadata"]  # never a WebSocket, so never closed


# -- the client closes ------------------------------------------------------------------------

NORMAL_CLIENT_CODES = [1000, 1001, 1005, 4000]
# 1006: the connection dropped without a close frame; 1002, 1009: the client gave up on us.
ABNORMAL_CLIENT_CODES = [1006, 1002, 1009]


@framework
@pytest.mark.parametrize("placement", ["add_middleware", "wrap"])
@pytest.mark.parametrize("path", ["/echo", "/iter"])
@pytest.mark.parametrize("code", NORMAL_CLIENT_CODES + ABNORMAL_CLIENT_CODES)
async def test_the_clients_close_is_recorded_and_never_an_app_error(
    langfuse_capture: LangfuseCapture, framework: str, placement: str, path: str, code: int
) -> None:
    # /echo lets Starlette's WebSocketDisconnect escape, as most handlers do; /iter ends quietly.
    frames = [{"type": "websocket.receive", "text": "hi"}, disconnect(code, "bye")]
    sent, exc = await connect(traced(framework, placement), path, frames=frames)
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send"]
    if path == "/echo":
        assert isinstance(exc, WebSocketDisconnect)  # still reaches the server, untouched
        assert exc.code == code
    else:
        assert exc is None
    root = langfuse_capture.single(name=f"WS {path}")
    assert root["output"] == {"statusCode": 101}
    assert root["metadata"]["closeCode"] == code
    assert root["metadata"]["closedBy"] == "client"
    assert root["metadata"]["closeReason"] == "bye"
    assert_no_error(root)
    if code in NORMAL_CLIENT_CODES:
        assert root["level"] == "DEFAULT"
        assert root["status_message"] is None
        assert "disconnected" not in root["metadata"]
    else:  # as an HTTP client that leaves early
        assert root["level"] == "WARNING"
        assert root["metadata"]["disconnected"] is True


@pytest.mark.parametrize(
    "close",
    [
        {"type": "websocket.disconnect"},
        {"type": "websocket.disconnect", "reason": None},  # as Starlette's TestClient sends it
        {"type": "websocket.disconnect", "reason": ""},
    ],
)
async def test_a_client_close_without_a_code_is_1005(
    langfuse_capture: LangfuseCapture, close: Message
) -> None:
    frames = [{"type": "websocket.receive", "text": "hi"}, close]
    await connect(LangfuseMiddleware(raw_read_until_disconnect), "/raw", frames=frames)
    root = langfuse_capture.single()
    assert (root["metadata"]["closeCode"], root["metadata"]["closedBy"]) == (1005, "client")
    assert "closeReason" not in root["metadata"]
    assert root["level"] == "DEFAULT"


async def test_a_client_gone_without_a_close_frame_is_1006(
    langfuse_capture: LangfuseCapture,
) -> None:
    # The server cannot write (OSError); Starlette raises WebSocketDisconnect(1006) from send.
    sent, exc = await connect(traced("starlette"), "/echo", send_fails=True)
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send"]
    assert isinstance(exc, WebSocketDisconnect)
    root = langfuse_capture.single(name="WS /echo")
    assert (root["metadata"]["closeCode"], root["metadata"]["closedBy"]) == (1006, "client")
    assert root["metadata"]["disconnected"] is True
    assert root["level"] == "WARNING"
    assert_no_error(root)


async def test_the_servers_receive_failing_after_the_clients_close_is_no_app_error(
    langfuse_capture: LangfuseCapture,
) -> None:
    frames = [disconnect(1001)]
    _, exc = await connect(LangfuseMiddleware(raw_read_past_disconnect), "/raw", frames=frames)
    assert isinstance(exc, RuntimeError)  # reaches the server, untouched
    root = langfuse_capture.single()
    assert (root["metadata"]["closeCode"], root["metadata"]["closedBy"]) == (1001, "client")
    assert_no_error(root)
    assert root["level"] == "DEFAULT"


@pytest.mark.parametrize(
    ("path", "frames", "error"),
    [
        # A failure after the client closed is the app's own.
        (
            "/cleanup-fails",
            [disconnect(1000)],
            "RuntimeError: could not save the conversation",
        ),
        # WebSocketDisconnect raised while the client is still connected is the app's too.
        ("/raises-disconnect", [], "WebSocketDisconnect: 1000"),
    ],
)
async def test_app_errors_around_a_close_stay_errors(
    langfuse_capture: LangfuseCapture, path: str, frames: list[Message], error: str
) -> None:
    _, exc = await connect(traced("starlette"), path, frames=frames)
    assert exc is not None
    root = langfuse_capture.single(name=f"WS {path}")
    assert root["level"] == "ERROR"
    assert root["status_message"] == error
    assert root["events"][0]["name"] == "exception"


# -- sampling ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "kept"), [(1011, True), (1000, False)])
async def test_a_sampled_out_connection_closed_with_1011_is_kept(
    langfuse_capture: LangfuseCapture, code: int, kept: bool
) -> None:
    await connect(traced("starlette", sample_rate=0.0), "/close", query=f"code={code}")
    spans = langfuse_capture.spans(name="WS /close")
    assert len(spans) == (1 if kept else 0)
    if kept:
        assert spans[0]["metadata"]["keptBy"] == "error"
        assert spans[0]["metadata"]["closeCode"] == 1011
