"""WebSocket handlers that close in each way there is (in-process and e2e tests share them)."""

from __future__ import annotations

from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect


async def close_with(websocket: WebSocket) -> None:
    # Accept, read one frame, close with the code (and reason) the query asks for.
    code = int(websocket.query_params["code"])
    await websocket.accept()
    await websocket.receive_text()
    await websocket.close(code, websocket.query_params.get("reason"))


async def deny(websocket: WebSocket) -> None:
    await websocket.close(1008, "no token")


async def echo_until_gone(websocket: WebSocket) -> None:
    # The common handler: never catches the client's close (WebSocketDisconnect escapes).
    await websocket.accept()
    while True:
        await websocket.send_text(await websocket.receive_text())


async def echo_iter(websocket: WebSocket) -> None:
    # iter_text() ends quietly on the client's close.
    await websocket.accept()
    async for text in websocket.iter_text():
        await websocket.send_text(text)


async def cleanup_fails(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        await websocket.receive_text()
    except WebSocketDisconnect:
        raise RuntimeError("could not save the conversation") from None


async def raises_disconnect_itself(websocket: WebSocket) -> None:
    # The client is still there: the app's own exception, whatever its name.
    await websocket.accept()
    raise WebSocketDisconnect(1000)


async def close_then_read(websocket: WebSocket) -> None:
    # Closes first, then reads the client's side of the closing handshake.
    await websocket.accept()
    await websocket.close(1001)
    assert (await websocket.receive())["type"] == "websocket.disconnect"


ROUTES = [
    WebSocketRoute("/close", close_with),
    WebSocketRoute("/deny", deny),
    WebSocketRoute("/echo", echo_until_gone),
    WebSocketRoute("/iter", echo_iter),
    WebSocketRoute("/cleanup-fails", cleanup_fails),
    WebSocketRoute("/raises-disconnect", raises_disconnect_itself),
    WebSocketRoute("/close-then-read", close_then_read),
]
