"""DevServer: a local Langfuse-compatible OTLP receiver with a read API, a viewer and faults."""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import threading
import urllib.parse
from collections.abc import Iterable
from types import TracebackType
from typing import Any

from .._otlp import SpanDict
from . import api, views
from .ingest import MAX_BODY, BodyTooLarge, check_auth, ingest, too_large
from .store import Store

__all__ = ["INGEST_PATH", "DevServer"]

INGEST_PATH = "/api/public/otel/v1/traces"
_TRACES_PATH = "/api/public/traces"
_HEALTH_PATH = "/api/public/health"
_METHOD_NOT_ALLOWED = {"message": "Method not allowed", "error": "MethodNotAllowedError"}


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the OTLP exporters expect
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms stalls
    server: _HTTPServer

    def do_POST(self) -> None:
        self.server.owner._dispatch(self, "POST")

    def do_GET(self) -> None:
        self.server.owner._dispatch(self, "GET")

    def do_PUT(self) -> None:
        self.server.owner._dispatch(self, "PUT")

    def do_DELETE(self) -> None:
        self.server.owner._dispatch(self, "DELETE")

    def do_PATCH(self) -> None:
        self.server.owner._dispatch(self, "PATCH")

    def log_message(self, format: str, *args: Any) -> None:
        return None  # one line per export would drown the app's own output

    def read_body(self) -> bytes:
        """The request body; ``BodyTooLarge`` past ``MAX_BODY``, ``ValueError`` if malformed.

        Sizes are checked before reading: a hostile chunk size or Content-Length must not
        make the server allocate it, nor wait (``read(-1)``) for a client that never closes.
        """
        if "chunked" in (self.headers.get("transfer-encoding") or "").lower():
            chunks: list[bytes] = []
            total = 0
            while True:
                size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"0", 16)
                if size < 0:
                    raise ValueError(f"chunk size {size}")
                total += size
                if total > MAX_BODY:
                    raise BodyTooLarge(f"body of more than {MAX_BODY} bytes")
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline(1024)
        length = int(self.headers.get("content-length") or 0)
        if length < 0:
            raise ValueError(f"Content-Length {length}")
        if length > MAX_BODY:
            raise BodyTooLarge(f"body of {length} bytes")
        return self.rfile.read(length) if length > 0 else b""

    def reply(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json; charset=utf-8",
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            self.close_connection = True  # the client gave up (its timeout): nothing to do

    def reply_json(
        self, status: int, payload: Any, headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        self.reply(status, json.dumps(payload).encode(), headers=headers)


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() must not wait for a hanging request
    allow_reuse_address = True  # a new DevServer can rebind the port of a stopped one
    owner: DevServer

    def __init__(self, address: tuple[str, int]) -> None:
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        # Idle keep-alive connections would otherwise go on being served after stop().
        with self.connections_lock:
            connections = list(self.connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class DevServer:
    """A local stand-in for Langfuse's OTLP endpoint, public read API and trace view.

    ``start()`` serves on a background thread; ``url`` is then the base URL to give an app as
    ``LANGFUSE_BASE_URL``. ``set_fault`` makes ingestion fail on purpose for reliability tests.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        db: str = ":memory:",
        public_key: str = "pk-lf-dev",
        secret_key: str = "sk-lf-dev",
        *,
        max_traces: int | None = None,
        max_age_seconds: float | None = None,
        record_spans: bool = True,
    ) -> None:
        self.host, self.port = host, port
        self.public_key, self.secret_key = public_key, secret_key
        self.store = Store(db, max_traces=max_traces, max_age_seconds=max_age_seconds)
        self.record_spans = record_spans
        self.request_count = 0
        self._lock = threading.Lock()
        self._spans: list[SpanDict] = []
        self._fault: dict[str, Any] | None = None
        self._release = threading.Event()
        self._stopped = threading.Event()
        self._server: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://host:port`` (the bound port once started)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> DevServer:
        """Bind and serve on a daemon thread; returns at once."""
        if self._server is not None:
            raise RuntimeError("DevServer already started")
        server = _HTTPServer((self.host, self.port))
        server.owner = self
        self.port = int(server.server_address[1])
        self._stopped.clear()
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"langfuse-mw-devserver:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and drop open connections, hanging requests included; idempotent."""
        self._stopped.set()
        self._release.set()
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.close_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def close(self) -> None:
        """Stop and close the database."""
        self.stop()
        self.store.close()

    def __enter__(self) -> DevServer:
        return self.start() if self._server is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- test hooks -----------------------------------------------------------------------------

    def received_spans(self) -> list[SpanDict]:
        """Every span of every accepted batch, in arrival order, as ``_otlp`` decodes them."""
        with self._lock:
            return list(self._spans)

    def set_fault(
        self,
        status: int | None = None,
        retry_after: str | None = None,
        *,
        delay: float | None = None,
        hang: bool = False,
    ) -> None:
        """Misbehave on every ingestion POST until ``clear_fault()``.

        ``delay``: wait that long, then answer as usual (or with ``status``). ``status``:
        answer it (with ``Retry-After`` if given) instead of accepting. ``hang``: never answer;
        the request is dropped, connection closed, when the fault is cleared or on ``stop()``.
        """
        self._release.clear()
        self._fault = {"status": status, "retry_after": retry_after, "delay": delay, "hang": hang}

    def clear_fault(self) -> None:
        """Answer normally again and let hanging requests go."""
        self._fault = None
        self._release.set()

    # -- requests -------------------------------------------------------------------------------

    def _dispatch(self, handler: _Handler, method: str) -> None:
        parsed = urllib.parse.urlsplit(handler.path)
        path = parsed.path.rstrip("/") or "/"
        try:
            body = handler.read_body()
        except BodyTooLarge:
            handler.close_connection = True  # the body was not read: the stream is unusable
            handler.reply_json(413, too_large().body)
            return
        except (ValueError, OSError):
            handler.close_connection = True
            handler.reply_json(400, {"message": "Unreadable request body"})
            return
        if path == INGEST_PATH:
            if method != "POST":
                handler.reply_json(405, _METHOD_NOT_ALLOWED)
                return
            self._post_traces(handler, body)
            return
        if method != "GET":
            handler.reply_json(405, _METHOD_NOT_ALLOWED)
            return
        query = dict(urllib.parse.parse_qsl(parsed.query))
        if path == _HEALTH_PATH:
            handler.reply_json(200, {"status": "OK", "version": "langfuse-mw-devserver"})
        elif path == _TRACES_PATH or path.startswith(_TRACES_PATH + "/"):
            message = check_auth(handler.headers.get("authorization"), self.public_key,
                                 self.secret_key)  # fmt: skip
            if message is not None:
                handler.reply_json(401, {"message": message})
            elif path == _TRACES_PATH:
                handler.reply_json(*api.list_traces(self.store, query))
            else:
                trace_id = urllib.parse.unquote(path[len(_TRACES_PATH) + 1 :])
                handler.reply_json(*api.get_trace(self.store, trace_id))
        elif path.startswith("/api/"):
            handler.reply_json(404, {"message": "Not found"})
        else:
            status, page = views.render(self.store, path, query)
            handler.reply(status, page.encode(), content_type="text/html; charset=utf-8")

    def _post_traces(self, handler: _Handler, body: bytes) -> None:
        with self._lock:
            self.request_count += 1
        fault = self._fault
        if fault is not None:
            if fault["hang"]:
                self._release.wait()
                handler.close_connection = True  # dropped: the client sees the connection go
                return
            if fault["delay"] and self._stopped.wait(fault["delay"]):
                handler.close_connection = True
                return
            if fault["status"]:
                headers = [("Retry-After", fault["retry_after"])] if fault["retry_after"] else []
                payload = {"message": f"devserver fault: HTTP {fault['status']}"}
                handler.reply_json(fault["status"], payload, headers)
                return
        message = check_auth(handler.headers.get("authorization"), self.public_key,
                             self.secret_key)  # fmt: skip
        if message is not None:
            handler.reply_json(401, {"message": message})
            return
        lowered = {name.lower(): value for name, value in handler.headers.items()}
        result = ingest(body, lowered)
        if result.status == 200 and result.spans:
            try:
                self.store.add_spans(result.spans)
            except Exception as exc:  # as Langfuse does when its queue fails
                handler.reply_json(500, {"message": "Internal Server Error", "error": str(exc)})
                return
            if self.record_spans:
                with self._lock:
                    self._spans.extend(result.spans)
        handler.reply_json(result.status, result.body)
