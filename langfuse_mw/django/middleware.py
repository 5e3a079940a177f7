"""``LangfuseMiddleware`` for Django's ``MIDDLEWARE``: one class, sync and async."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async

# Django ships no type hints: its objects are Any here.
from django.core.exceptions import (  # type: ignore[import-untyped]
    BadRequest,
    PermissionDenied,
    SuspiciousOperation,
)
from django.core.signals import got_request_exception  # type: ignore[import-untyped]
from django.http import Http404, HttpResponse  # type: ignore[import-untyped]
from django.http.multipartparser import MultiPartParserError  # type: ignore[import-untyped]
from django.utils.functional import LazyObject, empty  # type: ignore[import-untyped]

from .. import runtime
from .._wsgi import ResponseBody, begin, content_length
from ..core import RequestState, RequestTracer
from . import conf

__all__ = ["LangfuseMiddleware"]

HttpRequest = Any
Response = Any
# Exceptions Django answers with a 4xx: the client's error, not the application's.
_CLIENT_ERRORS = (Http404, PermissionDenied, BadRequest, SuspiciousOperation, MultiPartParserError)
_OBS = "_langfuse_mw_observation"
_NOTED = "_langfuse_mw_exception"
_time_ns = time.time_ns


class LangfuseMiddleware:
    """Trace every request of a Django project into Langfuse (WSGI and ASGI, sync and async views).

    Options come from ``settings.LANGFUSE_MW`` (a dict), read lazily.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)
        # A bad LANGFUSE_MW fails here, at start-up; the runtime is built (or warns) now too.
        runtime.start_up(conf.state().tracer.settings)
        got_request_exception.connect(_on_exception, dispatch_uid="langfuse_mw.django")

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self.__acall__(request)
        obs = self._begin(request)
        if not isinstance(obs, RequestState):
            return obs if obs is not None else self.get_response(request)
        try:
            return self._respond(request, self.get_response(request), obs)
        except BaseException as exc:
            _fail(request, obs, exc)
            raise
        finally:
            _done(request, obs)

    async def __acall__(self, request: HttpRequest) -> Response:
        tracer = conf.state().tracer
        if tracer._identity_callables and _user_not_loaded(request) and _traced(tracer, request):
            # user_id_from / session_id_from are called here, in the event loop, where the
            # query behind a lazy request.user is refused (SynchronousOnlyOperation): load it
            # first in Django's thread for sync code, as a sync request would have. Only for a
            # request they are called for: an excluded one (probes, static files) or the
            # health endpoint would pay a query and a turn of that one thread for nothing.
            await sync_to_async(_load_user, thread_sensitive=True)(request)
        obs = self._begin(request)
        if not isinstance(obs, RequestState):
            return obs if obs is not None else await self.get_response(request)
        try:
            get_response: Callable[[HttpRequest], Awaitable[Response]] = self.get_response
            return self._respond(request, await get_response(request), obs)
        except asyncio.CancelledError as exc:
            obs.mark_disconnected()  # Django cancels the view when the client goes away
            _fail(request, obs, exc)
            raise
        except BaseException as exc:
            _fail(request, obs, exc)
            raise
        finally:
            _done(request, obs)

    def process_exception(self, request: HttpRequest, exception: Exception) -> None:
        """Note the view's exception; recorded if the response it leads to is a 5xx."""
        _note(request, exception)

    def _begin(self, request: HttpRequest) -> RequestState | Response | None:
        state = conf.state()
        tracer = state.tracer
        path, method = request.path, request.method or "GET"
        if path == tracer.settings.health_path:
            # Readiness probes: always 200, the JSON says what is wrong.
            body = tracer.health_json()
            return HttpResponse(body, content_type="application/json",
                                headers={"Cache-Control": "no-store"})  # fmt: skip
        if tracer.is_excluded(method, path):
            return None
        obs = begin(tracer, request.META, state.keys, method, path, "django", request)
        if obs is not None:
            setattr(request, _OBS, obs)
        return obs

    def _respond(self, request: HttpRequest, response: Response, obs: RequestState) -> Response:
        _set_route(request, obs)
        status = response.status_code
        obs.set_status(status)
        noted = request.__dict__.pop(_NOTED, None)
        if noted is not None and status >= 500:
            obs.record_exception(noted)
        settings = obs.tracer.settings
        echo = settings.request_id_header
        if settings.echo_request_id and echo not in response:
            response[echo] = obs.request_id
        end_ns = 0
        if not response.streaming:
            obs.add_body(len(response.content))
            end_ns = _time_ns()  # complete: its end, reported once the outcome is known
        elif _sendfile(response, request):
            # A FileResponse under a WSGI server, which may sendfile() it past any iterator of
            # ours: the end is the response's close(), called once the file is sent. (Under
            # ASGI it is streamed like any other body, so a read that fails is recorded.)
            obs.add_body(max(0, content_length(response.get("Content-Length"))))
            response._resource_closers.append(obs.end)
        elif response.is_async:
            response.streaming_content = _astream(response.streaming_content, obs)
        else:
            length = content_length(response.get("Content-Length"))
            response.streaming_content = ResponseBody(obs, response.streaming_content, length)
        # A middleware above may still fail, and Django answer with a 500 (_on_exception ends
        # the observation then), or replace this response (ConditionalGetMiddleware's 304):
        # its body is then never read. Django closes the response it finally sends, which
        # calls request.close(): the observation ends there at the latest.
        request.close = functools.partial(
            _close_request, request, request.close, _Pending(obs, end_ns), response
        )
        # That close() ends by sending request_finished, whose receivers may raise to the
        # server once the client has its response.
        response.close = _ResponseClose(_close_response, response, obs)
        return response


def _traced(tracer: RequestTracer, request: HttpRequest) -> bool:
    # What _begin (and begin, for tracing that is off) decides before calling user_id_from /
    # session_id_from.
    rt = runtime._runtime
    if rt is not None and not rt.enabled:
        return False
    path = request.path
    if path == tracer.settings.health_path:
        return False
    return not tracer.is_excluded(request.method or "GET", path)


def _user_not_loaded(request: HttpRequest) -> bool:
    user = request.__dict__.get("user")
    return isinstance(user, LazyObject) and user._wrapped is empty


def _load_user(request: HttpRequest) -> None:
    with contextlib.suppress(Exception):  # left to whoever reads it next, as without us
        request.user._setup()


def _sendfile(response: Response, request: HttpRequest) -> bool:
    # A FileResponse under WSGI goes to the server's wsgi.file_wrapper, past our iterator.
    return (
        getattr(response, "file_to_stream", None) is not None
        and request.META.get("wsgi.file_wrapper") is not None
    )


class _Pending:
    """The observation of a request whose response Django has yet to close.

    Django closes the response it sends, and ``request.close()`` ends the observation. A
    request it never closes (the client left under ASGI while a middleware above ran, a
    BaseException above) is ended when it is freed, with what the middleware saw.
    """

    __slots__ = ("end_ns", "obs")

    def __init__(self, obs: RequestState, end_ns: int) -> None:
        self.obs, self.end_ns = obs, end_ns

    def __del__(self) -> None:
        if not self.obs.ended:
            self.obs.end(self.end_ns or None)  # never raises


def _close_request(
    request: HttpRequest, close: Callable[[], None], pending: _Pending, response: Response
) -> None:
    try:
        close()
    finally:
        # Once: a body that was sent, or a failure above, has ended it already.
        pending.obs.end(pending.end_ns or None)
        # The request, the response the middleware returned (never closed if it was replaced)
        # and the observation let go of each other.
        request.__dict__.pop("close", None)
        response.__dict__.pop("close", None)


class _ResponseClose(functools.partial[None]):
    """``response.close`` of the response the middleware returned: ``_close_response``."""

    def __reduce__(self) -> tuple[Any, ...]:
        # UpdateCacheMiddleware (above) pickles the response, and this with it: the cached
        # copy gets a close of its own that records nothing.
        return (_ResponseClose, (_close_response, self.args[0], None))


def _close_response(response: Response, obs: RequestState | None) -> None:
    response.__dict__.pop("close", None)
    try:
        response.close()
    except Exception as exc:
        # Django swallows its closers' errors: this is a request_finished receiver, run after
        # the response was sent (the observation ended in request.close()).
        if obs is not None:
            obs.record_late_exception(exc)
        raise


def _done(request: HttpRequest, obs: RequestState) -> None:
    # The middleware returns: the request's hooks no longer need the observation, and the
    # observation (which can read the request) and the request would keep each other alive.
    request.__dict__.pop(_OBS, None)
    obs.detach()


def _set_route(request: HttpRequest, obs: RequestState) -> None:
    match = getattr(request, "resolver_match", None)
    obs.set_route(match.route if match is not None else None)


def _fail(request: HttpRequest, obs: RequestState, exc: BaseException) -> None:
    # Only with DEBUG_PROPAGATE_EXCEPTIONS (or a failure of ours): Django turns the rest
    # into responses.
    _set_route(request, obs)
    if isinstance(exc, Exception):
        obs.record_exception(exc)
    obs.end()


def _note(request: Any, exc: BaseException | None) -> None:
    if exc is None or isinstance(exc, _CLIENT_ERRORS):
        return
    if getattr(request, _OBS, None) is not None and not hasattr(request, _NOTED):
        setattr(request, _NOTED, exc)


def _on_exception(sender: Any, request: Any = None, **kwargs: Any) -> None:
    # Sent for the exceptions Django answers with a 500: below the middleware while it runs,
    # or above it once it returned its response, which the client then never gets.
    exc = sys.exc_info()[1]
    if getattr(request, _OBS, None) is not None:
        _note(request, exc)
        return
    close = getattr(request, "close", None)
    if type(close) is not functools.partial or close.func is not _close_request:
        return  # not traced, or Django already closed its response
    if exc is None or isinstance(exc, _CLIENT_ERRORS):
        return
    _, _, pending, response = close.args
    obs = pending.obs
    # Ended now, not when Django closes its 500 (with DEBUG_PROPAGATE_EXCEPTIONS there is none).
    obs.set_status(500)
    obs.record_exception(exc)
    obs.end()
    request.__dict__.pop("close", None)  # let go, as in _close_request
    response.__dict__.pop("close", None)


async def _astream(content: AsyncIterator[bytes], obs: RequestState) -> AsyncIterator[bytes]:
    # Django iterates after the middleware returned and reset the context: each step of the
    # view's iterator runs with the request current again (an async twin of ResponseBody).
    body = ResponseBody(obs, ())
    done = False
    try:
        iterator = aiter(content)
        while True:
            tokens = body.attach()
            try:
                chunk = await anext(iterator)
            except StopAsyncIteration:
                break
            finally:
                body.release(tokens)
            obs.add_body(len(chunk))
            yield chunk
        done = True
    except Exception as exc:
        done = True
        obs.record_exception(exc)
        raise
    finally:
        if not done:
            obs.mark_disconnected()  # closed or cancelled before the end: the client left
        obs.end()
