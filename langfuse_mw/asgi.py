"""``LangfuseMiddleware``: pure ASGI (Starlette, FastAPI, any ASGI app)."""

from __future__ import annotations

import asyncio
import functools
import inspect
import sys
import time
from json.encoder import encode_basestring
from typing import Any

from . import runtime
from ._failsafe import logger, report
from ._routes import route_template
from ._types import ASGIApp, Message, Receive, Scope, Send
from .config import ConfigError, resolve_settings
from .core import Observation, RequestInfo, RequestState, RequestTracer
from .headers import truncate

__all__ = ["LangfuseMiddleware"]

_time_ns = time.time_ns
_exc_info = sys.exc_info


class LangfuseMiddleware:
    """Trace every HTTP request and WebSocket connection of an ASGI app into Langfuse.

    ``app.add_middleware(LangfuseMiddleware, **options)`` or ``LangfuseMiddleware(app, **options)``.
    """

    def __init__(self, app: ASGIApp, /, **options: Any) -> None:
        self.app = app
        try:
            self.settings = resolve_settings(options)
        except (ConfigError, TypeError) as exc:
            # app.add_middleware() builds us at the app's first event: under uvicorn's default
            # --lifespan auto a failure there reads "ASGI 'lifespan' protocol appears
            # unsupported", the server starts, and every request fails. Say what is wrong.
            logger.error("langfuse_mw: LangfuseMiddleware cannot start: %s", exc)
            raise
        self.tracer = RequestTracer(self.settings)
        self._rid_name = self.settings.request_id_header.encode("latin-1")
        self._echoes = self.settings.echo_request_id
        # The headers read before a sampling decision.
        self._early_headers = frozenset((self._rid_name, b"traceparent", b"tracestate", b"baggage"))
        self._health_path = self.settings.health_path
        self._is_excluded = self.tracer.is_excluded
        self._lazy = self.tracer.may_sample_out
        runtime.start_up(self.settings)  # build (or warn about) the runtime at start-up

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            path = scope["path"]
            if path == self._health_path:
                await self._health(send)
                return
            if self._is_excluded(scope["method"], path):
                await self.app(scope, receive, send)
                return
            obs = self._begin_http(scope, path) if self._lazy else self._begin(scope, kind)
        elif kind == "websocket":
            path = scope.get("path", "")
            obs = self._begin(scope, kind)
        elif kind == "lifespan":
            await self.app(scope, receive, _lifespan_send(send, self.settings.shutdown_timeout))
            return
        else:
            await self.app(scope, receive, send)
            return
        if obs is None:
            await self.app(scope, receive, send)
            return
        exchange = (_Exchange if kind == "http" else _WebSocketExchange)(
            self, obs, scope, path, receive, send
        )
        try:
            await self.app(scope, exchange.receive, exchange.send)
            if obs.status is None and kind == "http" and not obs.ended:
                # The app returned without answering (a client still there): the server
                # answers 500 (uvicorn, hypercorn), a failure like an unhandled exception.
                obs.status = 500
        except Exception as exc:
            if exc is exchange._answering:
                # An error handler inside us answered it, then it was re-raised (Starlette's
                # ServerErrorMiddleware does): an error if the answer was one.
                if (obs.status or 500) >= 500:
                    obs.record_exception(exc)
            elif exchange._completed_ns and obs.ended:
                # After the last byte: a BackgroundTask (the client has its response).
                obs.record_late_exception(exc, exchange._route)
            elif kind == "http" and obs.ended and obs.disconnected and not _left(exc):
                # The request ended when the client left (ASGI 2.4 servers let the app run
                # on), then the app failed on its own: not the client's doing, so an error.
                obs.record_late_exception(exc, exchange._route, "after disconnect")
            elif isinstance(exchange, _WebSocketExchange) and exchange.is_client_close(exc):
                pass  # the client's close surfacing in the app: recorded when it came
            else:
                if kind == "http" and not obs.first_byte_ns and not obs.ended:
                    # The start we saw never got a body: buffered by a middleware outside
                    # (GZip) or dropped by the server. The client gets the 500 answering it.
                    obs.status = None
                obs.record_exception(exc)
                if exchange.echo is not None:
                    _echo_on_server_error(self, scope, exchange.echo)
            raise
        except asyncio.CancelledError:
            obs.mark_disconnected()  # servers cancel the app when the client goes away
            raise
        finally:
            if exchange._pump is not None:
                exchange._pump.cancel()
            if not obs.ended:
                exchange.finish()
            obs.detach()

    async def _health(self, send: Send) -> None:
        # Readiness probes and dashboards: always 200 (tracing trouble must not take the app
        # out of rotation); the JSON says what is wrong.
        body = self.tracer.health_json()
        headers = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _begin(self, scope: Scope, kind: str) -> RequestState | None:
        info = self._info(
            scope, kind, scope.get("path", ""), scope.get("method", "GET"), scope.get("client"),
            scope.get("headers") or (),
        )  # fmt: skip
        return self.tracer.begin(info)

    def _begin_http(self, scope: Scope, path: str) -> RequestState | None:
        # Sampling may drop it: read the few headers the decision needs and decide first
        # (most requests at a low rate read nothing else).
        try:
            raw = scope.get("headers") or ()
            found = dict(raw) if type(raw) is list else None  # in C, when no name repeats
            if found is None or len(found) != len(raw):
                found = _joined(raw, self._early_headers)
            request_id = found.get(self._rid_name)
            traceparent = found.get(b"traceparent")
            tracestate = found.get(b"tracestate")
            baggage = found.get(b"baggage")
        except Exception as exc:  # not the (name, value) pairs ASGI promises
            report("asgi.headers", exc)
            return None
        # Read only if the request is kept, when the app has run: what the middleware inside
        # us rewrites in place by then (uvicorn's ProxyHeadersMiddleware sets scope["client"],
        # a method override scope["method"]) is taken as it was now, as a sampled request's
        # is, so that client ip and trusted_networks (user, session) do not change.
        return self.tracer.begin_lazy(
            path,
            None if request_id is None else request_id.decode("latin-1"),
            None if traceparent is None else traceparent.decode("latin-1"),
            None if tracestate is None else tracestate.decode("latin-1"),
            None if baggage is None else baggage.decode("latin-1"),
            functools.partial(
                self._info, scope, "http", path, scope.get("method", "GET"),
                scope.get("client"), raw,
            ),
        )  # fmt: skip

    def _info(
        self, scope: Scope, kind: str, path: str, method: str, client: Any, raw_headers: Any
    ) -> RequestInfo:
        """The core's view of the request: ``path``, ``method``, ``client`` and the headers as
        they were when it arrived (before routers and inner middleware rewrote them)."""
        wanted = self.tracer.header_keys
        headers: dict[str, str] = {}
        repeated: dict[str, list[str]] = {}
        # _joined's work, decoding and renaming as it goes (this runs for every traced request).
        for name, value in raw_headers:
            key = wanted.get(name)
            if key is not None:
                text = value.decode("latin-1")
                if key not in headers:
                    headers[key] = text
                else:  # joined once at the end: a header repeated 1000 times stays linear
                    repeated.setdefault(key, [headers[key]]).append(text)
        for key, parts in repeated.items():
            headers[key] = ",".join(parts)
        return RequestInfo(
            method,
            path,
            scope.get("query_string", b"").decode("latin-1"),
            headers,
            client[0] if client else None,
            "asgi",
            kind,
            scope,
        )


class _Exchange:
    """Per-request state between the server and the app (never on the middleware)."""

    # Class-level defaults: most requests never stream, so never set the pump's state.
    _completed_ns = 0
    _reading = 0
    _inbox: asyncio.Queue[Message] | None = None
    _pump: asyncio.Task[None] | None = None
    _disconnect: Message | None = None
    _sending_last = False
    # The exception being handled when the response started: the response answers it.
    _answering: BaseException | None = None

    def __init__(self, mw: LangfuseMiddleware, obs: RequestState, scope: Scope, path: str,
                 receive: Receive, send: Send) -> None:  # fmt: skip
        self.obs, self.scope, self._receive, self._send = obs, scope, receive, send
        # Routers and mounted apps rewrite the path on the way in: keep the original (and the
        # app, which, wrapped around the app rather than added to it, is ours to search).
        self.where = (scope.get("app") or mw.app, path, scope.get("root_path", ""))
        # Request ids are printable ASCII by construction (core._check_request_id).
        self.echo = (mw._rid_name, obs.request_id.encode("ascii")) if mw._echoes else None

    def finish(self) -> None:
        obs = self.obs
        if not obs.ended:
            obs.end(self._completed_ns, self._route)

    def _route(self) -> str | None:
        return route_template(self.scope, *self.where)

    def disconnected(self) -> None:
        # After the last byte a client that leaves is done, not gone early; so is one the
        # server reports while the last body is still being sent (hypercorn, Connection:
        # close). A write that fails there raises, and says so itself.
        if not self.obs.ended and not self._completed_ns and not self._sending_last:
            self.obs.mark_disconnected()
            self.finish()

    async def send(self, message: Message) -> None:
        obs = self.obs
        last = False
        try:
            kind = message["type"]
            # The state is written here, not through RequestState's setters: this runs for
            # every message, and a call per write is most of a dropped request's cost.
            if kind == "http.response.body":
                if not obs.ended:
                    if not obs.first_byte_ns:
                        obs.first_byte_ns = _time_ns()
                    obs.bytes_sent += len(message.get("body", b""))
                last = not message.get("more_body", False)
                if not last and self._pump is None:
                    self._start_pump()
            elif kind == "http.response.start":
                if not obs.ended:
                    obs.status = message["status"]
                answering = _exc_info()[1]  # sent from an except block: an error handler's
                if answering is not None:
                    self._answering = answering
                if self.echo is not None:
                    message = _with_header(message, self.echo)
            elif kind == "http.response.pathsend":
                last = True
        except Exception as exc:
            report("asgi.send", exc)
        if last:
            self._sending_last = True
        try:
            await self._send(message)
        except OSError:
            # The server could not write: the client is gone (ASGI 2.4 servers raise here).
            self._sending_last = False
            self.disconnected()
            raise
        if last:
            self._completed_ns = _time_ns()
            # An error handler's answer is followed by its exception (Starlette re-raises
            # it): end when the app returns, with this time, so that it is recorded too.
            if self._answering is None and not obs.ended:
                obs.end(self._completed_ns, self._route)  # finish(), without its call

    async def receive(self) -> Message:
        if self._disconnect is not None:
            return self._disconnect
        inbox = self._inbox
        if inbox is not None and (inbox.qsize() or not (self._pump and self._pump.done())):
            message = await inbox.get()
        else:
            self._reading += 1
            try:
                message = await self._receive()
            finally:
                self._reading -= 1
        if message["type"] == "http.disconnect":
            self._disconnect = message
            self.disconnected()
        return message

    def _start_pump(self) -> None:
        # A streaming response: watch for the client leaving while the app writes, so the
        # observation ends at the disconnect and not at the next write (which can be minutes
        # away on a quiet SSE stream). From here on we are the only reader of the server's
        # receive and hand its messages to the app in order. Not while the app is itself
        # waiting in receive (two readers could split messages), and only on asyncio.
        if self._reading or self.obs.ended:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        # One message ahead at most: a client uploading while the app streams back is held
        # back by the server (its flow control), as without us, not buffered here.
        inbox: asyncio.Queue[Message] = asyncio.Queue(maxsize=1)

        async def pump() -> None:
            while True:
                message = await self._receive()
                if message["type"] == "http.disconnect":
                    self.disconnected()  # now, even if the app has not read what came before
                    await inbox.put(message)
                    return
                await inbox.put(message)

        self._inbox = inbox
        self._pump = loop.create_task(pump())
        self._pump.add_done_callback(_consume)


# Close codes (RFC 6455 and the IANA registry). A client closing with one of these, or with
# an application-defined code, leaves normally; any other client code (1006: the connection
# dropped without a close frame) is a disconnect. The app closing with 1011 (internal error)
# or 1014 (bad gateway) failed, as with a 5xx.
_NORMAL_CLOSE = frozenset((1000, 1001, 1005))
_APP_DEFINED_CLOSE = range(3000, 5000)
_SERVER_ERROR_CLOSE = frozenset((1011, 1014))
_MAX_CLOSE_REASON = 123  # what fits in a close frame


class _WebSocketExchange(_Exchange):
    """A WebSocket connection: its handshake's status, and how it closed and who closed it."""

    _closed_by: str | None = None
    # The client has left: its websocket.disconnect came, or the server could not write.
    _client_left = False
    _receive_error: BaseException | None = None

    async def send(self, message: Message) -> None:
        obs = self.obs
        try:
            kind = message["type"]
            if kind == "websocket.send":
                pass
            elif kind == "websocket.accept":
                obs.set_status(101)
                if self.echo is not None:
                    message = _with_header(message, self.echo)
            elif kind == "websocket.close":
                if obs.status is None:
                    obs.set_status(403)  # closing before accept is a denial (ASGI spec)
                code = message.get("code")
                self._closed("app", 1000 if code is None else code, message.get("reason"))
            elif kind == "websocket.http.response.start":  # a denial response (ASGI extension)
                obs.set_status(message["status"])
                answering = _exc_info()[1]
                if answering is not None:
                    self._answering = answering
                if self.echo is not None:
                    message = _with_header(message, self.echo)
        except Exception as exc:
            report("asgi.send", exc)
        try:
            await self._send(message)
        except OSError:
            # The server could not write: the client is gone without a close frame, what
            # RFC 6455 calls 1006 (and Starlette raises as WebSocketDisconnect(1006)).
            self._client_left = True
            self._closed("client", 1006, None)
            self.disconnected()
            raise

    async def receive(self) -> Message:
        try:
            message = await self._receive()
        except Exception as exc:
            if self._client_left:  # the server saying again that the client is gone
                self._receive_error = exc
            raise
        try:
            if message["type"] == "websocket.disconnect":
                self._client_left = True
                code = message.get("code")
                self._closed("client", 1005 if code is None else code, message.get("reason"))
        except Exception as exc:
            report("asgi.receive", exc)
        return message

    def _closed(self, by: str, code: Any, reason: Any) -> None:
        # The first close is the connection's: the other side's only answers it.
        if self._closed_by is not None:
            return
        self._closed_by = by
        obs = self.obs
        # WebSockets begin with tracer.begin: an Observation, sampled or not.
        if obs.ended or not isinstance(obs, Observation) or not isinstance(code, int):
            return
        meta = obs.extra_metadata = {"closeCode": str(code), "closedBy": f'"{by}"'}
        detail = ""
        if isinstance(reason, str) and reason:
            reason = truncate(reason, _MAX_CLOSE_REASON)
            meta["closeReason"] = encode_basestring(reason)
            detail = f": {reason}"
        if by == "app":
            if code in _SERVER_ERROR_CLOSE:
                obs.error = f"websocket closed with {code}{detail}"
        elif code not in _NORMAL_CLOSE and code not in _APP_DEFINED_CLOSE:
            obs.mark_disconnected()

    def is_client_close(self, exc: BaseException) -> bool:
        """Whether ``exc`` is the client's close surfacing in the app, not the app's error.

        Frameworks raise it from receive as ``WebSocketDisconnect`` (Starlette and FastAPI,
        Litestar), matched by name so that none is imported.
        """
        if not self._client_left:
            return False
        if exc is self._receive_error:
            return True
        return any(cls.__name__ == "WebSocketDisconnect" for cls in type(exc).__mro__)


def _joined(headers: Any, names: frozenset[bytes]) -> dict[bytes, bytes]:
    # The named headers, a repeated one joined with "," (as HTTP reads a repeated header).
    found: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        if name in names:
            found.setdefault(name, []).append(value)
    return {name: b",".join(values) for name, values in found.items()}


_SEQUENCES = (list, tuple)


def _with_header(message: Message, header: tuple[bytes, bytes]) -> Message:
    # The echoed request id, unless the application set its own (it wins). A new message
    # and list: frameworks reuse their header lists (Starlette's Response).
    raw = message.get("headers") or ()
    headers = raw if isinstance(raw, _SEQUENCES) else list(raw)  # any iterable: read once
    for key, _ in headers:
        if key.lower() == header[0]:
            return message if headers is raw else {**message, "headers": headers}
    return {**message, "headers": [*headers, header]}


def _left(exc: BaseException) -> bool:
    # The client's leaving, surfacing in the app: a write that failed (OSError, as ASGI 2.4
    # servers raise), or a read past the disconnect (Starlette's ClientDisconnect).
    return isinstance(exc, OSError) or type(exc).__name__ == "ClientDisconnect"


# An unhandled exception's request id, for the 500 that ServerErrorMiddleware answers.
_ERROR_ECHO_KEY = "langfuse_mw.error_echo"


def _echo_on_server_error(mw: LangfuseMiddleware, scope: Scope, echo: tuple[bytes, bytes]) -> None:
    # add_middleware places us inside Starlette's ServerErrorMiddleware, which answers an
    # unhandled exception with its own 500 (default, debug page or the app's handler) through
    # the server's send, never ours. Have that answer echo the request id like every other:
    # its response builders are wrapped (once, on the first exception: nothing on the request
    # path) to read the id from the scope, where we leave it as the exception goes out.
    try:
        server_error = _enclosing_server_error(mw, scope.get("app"))
        if server_error is not None:
            scope[_ERROR_ECHO_KEY] = echo
            if not getattr(server_error, "_langfuse_mw_echo", False):
                _wrap_error_responses(server_error)
    except Exception as exc:
        report("asgi.error_echo", exc)


def _enclosing_server_error(mw: LangfuseMiddleware, app: Any) -> Any:
    """The innermost ServerErrorMiddleware of ``app``'s stack that has ``mw`` inside, or None."""
    try:
        from starlette.middleware.errors import ServerErrorMiddleware
    except ImportError:
        return None
    node, found = getattr(app, "middleware_stack", None), None
    for _ in range(100):  # a stack is a chain of ``.app``; never loop on a cyclic one
        if node is None or node is mw:
            return found if node is mw else None
        if isinstance(node, ServerErrorMiddleware):
            found = node
        node = getattr(node, "app", None)
    return None


def _wrap_error_responses(server_error: Any) -> None:
    # Instance attributes shadow the class's methods; the app's handler keeps its kind
    # (awaited, or run in the threadpool), which Starlette tells by the callable itself.
    server_error.error_response = _echoing_sync(server_error.error_response)
    server_error.debug_response = _echoing_sync(server_error.debug_response)
    handler = server_error.handler
    if handler is not None:
        server_error.handler = (
            _echoing_async(handler) if _is_async_callable(handler) else _echoing_sync(handler)
        )
    server_error._langfuse_mw_echo = True


def _echoing_sync(build: Any) -> Any:
    def echoing(request: Any, exc: Exception) -> Any:
        return _EchoingResponse.around(request, build(request, exc))

    return echoing


def _echoing_async(build: Any) -> Any:
    async def echoing(request: Any, exc: Exception) -> Any:
        return _EchoingResponse.around(request, await build(request, exc))

    return echoing


def _is_async_callable(obj: Any) -> bool:
    # Starlette's own test, so the handler is awaited or run in the threadpool exactly as
    # Starlette would (before Python 3.13 it also honours asyncio's coroutine marker).
    try:
        from starlette._utils import is_async_callable
    except ImportError:  # a Starlette that moved it: the same test, as documented
        while isinstance(obj, functools.partial):
            obj = obj.func
        check = inspect.iscoroutinefunction
        return check(obj) or (callable(obj) and check(obj.__call__))
    return bool(is_async_callable(obj))


class _EchoingResponse:
    """The error response as built, sent with the request id added to its start message.

    A wrapper, not a change to the response: a handler may return the same object every time.
    """

    def __init__(self, response: ASGIApp, header: tuple[bytes, bytes]) -> None:
        self.response, self.header = response, header

    @classmethod
    def around(cls, request: Any, response: Any) -> Any:
        try:
            header = request.scope.get(_ERROR_ECHO_KEY)
        except Exception:
            return response
        return response if header is None or not callable(response) else cls(response, header)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        header = self.header

        async def echoing_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = _with_header(message, header)
            await send(message)

        await self.response(scope, receive, echoing_send)

    def __getattr__(self, name: str) -> Any:
        # status_code, headers, body: the response's (not before __init__ set it: copy()).
        if name in ("response", "header"):
            raise AttributeError(name)
        return getattr(self.response, name)


def _consume(task: asyncio.Task[None]) -> None:
    # A receive that failed in the pump (the server tore down the connection) is not ours
    # to report; retrieving it keeps asyncio from logging "exception never retrieved".
    if not task.cancelled():
        task.exception()


def _lifespan_send(send: Send, timeout: float) -> Send:
    async def lifespan_send(message: Message) -> None:
        if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
            await _shutdown_off_loop(timeout)
        await send(message)

    return lifespan_send


async def _shutdown_off_loop(timeout: float) -> None:
    # The server has drained its requests and is about to exit: export what is queued and
    # stop, within the one deadline (a flush here and another at exit could take twice as
    # long). A later request would build a new runtime. Keep the event loop free meanwhile.
    timeout = runtime.exit_timeout(timeout)  # none left if the flush at SIGTERM ran out
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # not asyncio (trio): a bounded wait at shutdown is acceptable
        runtime.shutdown(timeout)
        return
    try:
        await loop.run_in_executor(None, runtime.shutdown, timeout)
    except Exception as exc:
        report("lifespan.shutdown", exc)
