"""``LangfuseMiddleware`` for Django's ``MIDDLEWARE``: one class, sync and async."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sys
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
from ..core import RequestState
from . import conf

__all__ = ["LangfuseMiddleware"]

HttpRequest = Any
Response = Any
# Exceptions Django answers with a 4xx: the client's error, not the application's.
_CLIENT_ERRORS = (Http404, PermissionDenied, BadRequest, SuspiciousOperation, MultiPartParserError)
_OBS = "_langfuse_mw_observation"
_NOTED = "_langfuse_mw_exception"


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
        if conf.state().tracer._identity_callables and _user_not_loaded(request):
            # user_id_from / session_id_from are called here, in the event loop, where the
            # query behind a lazy request.user is refused (SynchronousOnlyOperation): load it
            # first in Django's thread for sync code, as a sync request would have.
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
        if not response.streaming:
            obs.add_body(len(response.content))
            obs.end()
            return response
        if _sendfile(response, request):
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
        # A middleware above may replace this response (ConditionalGetMiddleware's 304, an
        # error): its body is then never read. Django closes the response it finally sends
        # with request.close(): the observation ends there at the latest.
        request.close = functools.partial(_close_request, request, request.close, obs)
        return response


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


def _close_request(
    request: HttpRequest, close: Callable[[], None], obs: RequestState
) -> None:  # fmt: skip
    try:
        close()
    finally:
        obs.end()  # once: a body that was sent has ended it already
        request.__dict__.pop("close", None)  # the request and the observation let go


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
    # Sent for exceptions Django answers with a 500, anywhere below the middleware.
    _note(request, sys.exc_info()[1])


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
