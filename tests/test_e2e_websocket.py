"""WebSocket close codes through a real uvicorn, with each of its WebSocket implementations.

The in-process cases are in ``test_asgi_websocket``; here a real client talks to a real server
(whose own handling of close frames, handshakes and dropped connections is what users get),
and the spans arrive at the local receiver over OTLP/HTTP.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from langfuse_mw.devserver import DevServer
from tests.servers import Server, free_port, local_receiver

pytestmark = pytest.mark.e2e

KEYS = {"LANGFUSE_PUBLIC_KEY": "pk-lf-ws", "LANGFUSE_SECRET_KEY": "sk-lf-ws"}
META = "langfuse.observation.metadata."


@pytest.fixture(scope="module")
def receiver() -> Iterator[DevServer]:
    yield from local_receiver("pk-lf-ws", "sk-lf-ws")


@pytest.fixture(scope="module", params=["websockets", "websockets-sansio", "wsproto"])
def ws_impl(request: pytest.FixtureRequest) -> str:
    """uvicorn's ``--ws`` implementation."""
    return str(request.param)


@pytest.fixture(scope="module")
def server(ws_impl: str, receiver: DevServer) -> Iterator[Server]:
    port = free_port()
    server = Server(
        ["uvicorn", "tests.e2e_ws_app:app", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning", "--ws", ws_impl],
        port,
        {**KEYS, "LANGFUSE_BASE_URL": receiver.url, "LANGFUSE_MW_FLUSH_INTERVAL": "0.1"},
    )  # fmt: skip
    try:
        server.wait_ready()
        yield server
    finally:
        server.close()


def open_ws(server: Server, path: str, request_id: str) -> ClientConnection:
    """A client connection, used as a context manager; the span is found by ``request_id``."""
    url = f"ws://127.0.0.1:{server.port}{path}"
    return connect(url, additional_headers={"x-request-id": request_id}, open_timeout=10)


def span_of(receiver: DevServer, request_id: str, timeout: float = 15.0) -> dict[str, Any]:
    """The connection's root span, found by the request id it was opened with."""
    wanted = json.dumps(request_id)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for span in receiver.received_spans():
            attributes: dict[str, Any] = span["attributes"]  # type: ignore[assignment]
            if attributes.get(META + "requestId") == wanted:
                return span
        time.sleep(0.05)
    raise AssertionError(f"no span for request {request_id}")


def metadata(span: dict[str, Any], key: str) -> Any:
    value = span["attributes"].get(META + key)
    return None if value is None else json.loads(value)


def level(span: dict[str, Any]) -> str:
    return str(span["attributes"].get("langfuse.observation.level", "DEFAULT"))


@pytest.mark.parametrize(
    ("code", "reason", "expected_level"),
    [
        (1000, None, "DEFAULT"),
        (4001, "session over", "DEFAULT"),
        (1011, "model timed out", "ERROR"),
    ],
)
def test_the_apps_close_code_reaches_the_client_and_the_span(
    server: Server, receiver: DevServer, code: int, reason: str | None, expected_level: str
) -> None:
    query = f"code={code}" + (f"&reason={reason.replace(' ', '+')}" if reason else "")
    request_id = str(uuid.uuid4())
    with open_ws(server, f"/close?{query}", request_id) as ws:
        ws.send("hi")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (code, reason or "")
    span = span_of(receiver, request_id)
    assert span["name"] == "WS /close"
    assert (metadata(span, "closeCode"), metadata(span, "closedBy")) == (code, "app")
    assert metadata(span, "closeReason") == reason
    assert metadata(span, "disconnected") is None
    assert level(span) == expected_level
    if expected_level == "ERROR":
        message = f"websocket closed with {code}: {reason}"
        assert span["attributes"]["langfuse.observation.status_message"] == message


@pytest.mark.parametrize("path", ["/echo", "/iter"])
def test_the_clients_close_is_recorded_and_not_an_error(
    server: Server, receiver: DevServer, path: str
) -> None:
    request_id = str(uuid.uuid4())
    with open_ws(server, path, request_id) as ws:
        ws.send("hi")
        assert ws.recv(timeout=10) == "hi"
        ws.close(1001, "bye")
    span = span_of(receiver, request_id)
    assert span["name"] == f"WS {path}"
    assert (metadata(span, "closeCode"), metadata(span, "closedBy")) == (1001, "client")
    assert metadata(span, "closeReason") == "bye"
    assert metadata(span, "disconnected") is None
    assert level(span) == "DEFAULT"


def test_a_dropped_connection_is_a_disconnect(
    server: Server, receiver: DevServer, ws_impl: str
) -> None:
    request_id = str(uuid.uuid4())
    with contextlib.suppress(ConnectionClosed), open_ws(server, "/echo", request_id) as ws:
        ws.send("hi")
        assert ws.recv(timeout=10) == "hi"
        ws.socket.shutdown(socket.SHUT_RDWR)  # no close frame: the server sees 1006
    span = span_of(receiver, request_id)
    if ws_impl in ("websockets-sansio", "wsproto"):
        # These uvicorn protocols report a lost connection as 1005 (a close frame without a
        # code), which cannot be told from a client that closed normally.
        assert (metadata(span, "closeCode"), metadata(span, "closedBy")) == (1005, "client")
        assert level(span) == "DEFAULT"
        return
    assert (metadata(span, "closeCode"), metadata(span, "closedBy")) == (1006, "client")
    assert metadata(span, "disconnected") is True
    assert level(span) == "WARNING"


def test_closing_before_accept_is_a_403_for_the_client(server: Server, receiver: DevServer) -> None:
    request_id = str(uuid.uuid4())
    with pytest.raises(InvalidStatus) as denied, open_ws(server, "/deny", request_id):
        pass
    assert denied.value.response.status_code == 403
    span = span_of(receiver, request_id)
    assert json.loads(span["attributes"]["langfuse.observation.output"]) == {"statusCode": 403}
    assert (metadata(span, "closeCode"), metadata(span, "closeReason")) == (1008, "no token")
    assert level(span) == "WARNING"
