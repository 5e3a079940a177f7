"""``LangfuseWSGIMiddleware``: any WSGI application; also the WSGI half of the Flask extension."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from . import runtime
from ._failsafe import report
from ._wsgi import (
    ENVIRON_KEY,
    HEALTH_HEADERS,
    Environ,
    ExcInfo,
    ResponseBody,
    StartResponse,
    WSGIApp,
    begin,
    content_length,
    header_keys,
    request_path,
)
from .config import resolve_settings
from .core import RequestState, RequestTracer

__all__ = ["LangfuseWSGIMiddleware", "note_exception"]


class LangfuseWSGIMiddleware:
    """Trace every request of a WSGI app into Langfuse: ``LangfuseWSGIMiddleware(app, **options)``.

    ``route_from(environ)`` may return the matched route template (the name's second half).
    """

    framework = "wsgi"

    def __init__(
        self,
        app: WSGIApp,
        *,
        route_from: Callable[[Environ], str | None] | None = None,
        **options: Any,
    ) -> None:
        self.app = app
        self.route_from = route_from
        self.settings = resolve_settings(options)
        self.tracer = RequestTracer(self.settings)
        self.keys = header_keys(self.tracer)
        self.echo = self.settings.request_id_header if self.settings.echo_request_id else None
        runtime.start_up(self.settings)  # build (or warn about) the runtime at start-up

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = request_path(environ)
        tracer = self.tracer
        if path == self.settings.health_path:
            start_response("200 OK", list(HEALTH_HEADERS))
            return [tracer.health_json()]
        if tracer.is_excluded(method, path):
            return self.app(environ, start_response)
        outer = environ.get(ENVIRON_KEY)
        if isinstance(outer, _Exchange):
            # Another of ours (a LangfuseWSGIMiddleware around a LangfuseFlask app) traces this
            # request already: one observation, named by whichever of us knows the route.
            outer.routers = (*outer.routers, self)
            return self.app(environ, start_response)
        obs = begin(tracer, environ, self.keys, method, path, self.framework, environ)
        if obs is None:
            return self.app(environ, start_response)
        exchange = _Exchange(self, obs, environ, start_response)
        environ[ENVIRON_KEY] = exchange
        try:
            return exchange.respond(self.app(environ, exchange.start_response))
        except Exception as exc:
            if not exchange.wrote and not obs.ended:
                # Nothing went out (a Flask teardown failing after start_response): the
                # server answers the exception with a 500, not with the status it was given.
                obs.status = None
            if isinstance(exc, OSError) and obs.disconnected:
                exchange.finish()  # the server's write failed: the client left, no app error
            else:
                exchange.fail(exc)
            raise
        except BaseException:
            exchange.finish()
            raise
        finally:
            # Framework hooks run while the app runs; dropping the key now avoids a reference
            # cycle, so the body is freed (and ended) as soon as the server lets go of it.
            environ.pop(ENVIRON_KEY, None)
            obs.detach()

    def route(self, environ: Environ) -> str | None:
        """The matched route template; called while the app answers (at ``start_response``)."""
        return self.route_from(environ) if self.route_from is not None else None


class _Exchange:
    """Per-request state between the server and the app (never on the middleware).

    Not the body itself: generator apps keep ``start_response`` in their frame, and the body
    holds the generator, so that would be a reference cycle that outlives the request."""

    __slots__ = (
        "environ", "length", "mw", "noted", "obs", "routers", "server_start", "server_write",
        "wrote",
    )  # fmt: skip

    def __init__(
        self, mw: LangfuseWSGIMiddleware, obs: RequestState, environ: Environ,
        start_response: StartResponse,
    ) -> None:  # fmt: skip
        self.obs, self.mw, self.environ = obs, mw, environ
        self.server_start = start_response
        self.server_write: Callable[[bytes], object] | None = None
        self.noted: BaseException | None = None
        self.length = -1
        self.wrote = False
        # Inner middleware of ours that passed this request through, to ask for its route.
        self.routers: tuple[LangfuseWSGIMiddleware, ...] = ()

    def respond(self, result: Iterable[bytes]) -> Iterable[bytes]:
        wrapper = self.environ.get("wsgi.file_wrapper")
        if isinstance(wrapper, type) and isinstance(result, wrapper):
            # The server sends its own file wrapper with sendfile(): hand it back and hear about
            # the end from its close(), which servers call once the file is sent.
            body = ResponseBody(self.obs, (), self.length, self.finish)
            body.inner_close = getattr(result, "close", None)
            try:
                result.close = body.close  # type: ignore[attr-defined]
            except AttributeError:
                # A wrapper that takes no attributes (a C type): iterate it ourselves, with
                # the same body (a second one would close the file when the first is freed).
                body.iterator = iter(result)
                return body
            body.sendfile = True
            if self.length > 0:
                self.obs.add_body(self.length)
            return result
        return ResponseBody(self.obs, result, self.length, self.finish)

    def fail(self, exc: BaseException) -> None:
        self.obs.record_exception(exc)
        self.finish()

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
    ) -> Callable[[bytes], object]:
        obs = self.obs
        length = -1
        try:
            if exc_info is not None:
                self.note(exc_info[1])  # an error page replacing the response
            self.capture_route()
            echo, has_echo = self.mw.echo, False
            for name, value in headers:
                lower = name.lower()
                if lower == echo:
                    has_echo = True  # the application set its own: it wins
                elif lower == "content-length":
                    length = content_length(value)
            if echo is not None and not has_echo:
                # A new list: the application may reuse its own.
                headers = [*headers, (echo, obs.request_id)]
        except Exception as exc:
            report("wsgi.start_response", exc)
        if exc_info is None:
            self.server_write = self.server_start(status, headers)
        else:
            # Raises (PEP 3333) when the headers were sent already: they stay what they were.
            self.server_write = self.server_start(status, headers, exc_info)
        try:
            obs.set_status(int(status[:3]))
            self.length = length
        except Exception as exc:
            report("wsgi.start_response", exc)
        return self.write

    def write(self, data: bytes) -> object:
        # The legacy write() callable of PEP 3333.
        assert self.server_write is not None
        self.wrote = True
        try:
            result = self.server_write(data)
        except OSError:
            self.obs.mark_disconnected()
            raise
        self.obs.add_body(len(data))
        return result

    def capture_route(self) -> None:
        try:
            route = self.mw.route(self.environ)
            for inner in self.routers:  # innermost knows best (a Flask app's rule)
                route = inner.route(self.environ) or route
            self.obs.set_route(route)
        except Exception as exc:
            report("wsgi.route", exc)

    def note(self, exc: BaseException) -> None:
        """An exception the framework handled; recorded if its response is a 5xx.

        The last one wins: an error handler that raises is what made the 500 (the exception
        it was handling is its ``__context__``, in the recorded stack trace)."""
        self.noted = exc
        if self.obs.route is None:
            self.capture_route()

    def finish(self) -> None:
        obs = self.obs
        if obs.ended:
            return
        if obs.route is None:
            self.capture_route()
        if self.noted is not None and (obs.status or 500) >= 500:
            obs.record_exception(self.noted)
        self.noted = None
        obs.end()


def note_exception(environ: Mapping[str, Any], exc: BaseException) -> None:
    """Tell the request's observation about an exception the framework turned into a response."""
    exchange = environ.get(ENVIRON_KEY)
    if isinstance(exchange, _Exchange):
        exchange.note(exc)
