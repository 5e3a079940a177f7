"""LangfuseMiddleware in Django through its test clients, sync and async; settings and checks."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from langfuse_mw.testing import LangfuseCapture
from tests.django_project import setup

setup()

from asgiref.sync import iscoroutinefunction  # noqa: E402
from django.core import checks  # noqa: E402
from django.core.exceptions import ImproperlyConfigured  # noqa: E402
from django.core.handlers.asgi import ASGIHandler  # noqa: E402
from django.core.handlers.wsgi import WSGIHandler  # noqa: E402
from django.core.signals import request_finished  # noqa: E402
from django.http import FileResponse, Http404, HttpResponse, StreamingHttpResponse  # noqa: E402
from django.test import AsyncClient, Client, override_settings  # noqa: E402
from django.urls import path  # noqa: E402
from django.utils.asyncio import async_unsafe  # noqa: E402
from django.utils.decorators import async_only_middleware  # noqa: E402
from django.utils.deprecation import MiddlewareMixin  # noqa: E402
from django.utils.functional import SimpleLazyObject  # noqa: E402

from langfuse_mw.django import LangfuseMiddleware  # noqa: E402
from tests import asgi_driver  # noqa: E402
from tests.wsgi_apps import driver  # noqa: E402

OURS = "langfuse_mw.django.LangfuseMiddleware"
ASYNC_URLS = "tests.django_project.urls_async"


def user_from_header(info: Any) -> str | None:
    """Used as a dotted path in LANGFUSE_MW."""
    return f"auth-{info.raw.headers.get('x-account', 'none')}"


def user_from_request_user(info: Any) -> str | None:
    """What the docs advise: the user AuthenticationMiddleware set (dotted path in LANGFUSE_MW)."""
    user = info.raw.user
    return str(user.username) if user.is_authenticated else None


class Swallow:
    """A middleware that turns a view's exception into a friendly 200."""

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        return self.get_response(request)

    def process_exception(self, request: Any, exception: Exception) -> Any:
        return HttpResponse("handled", status=200)


class Exploding:
    """A middleware that fails itself (below LangfuseMiddleware)."""

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        if request.path == "/hello":
            raise ZeroDivisionError("middleware bug")
        return self.get_response(request)


class NotFound:
    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        raise Http404("nothing here")


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.mark.parametrize(
    ("client_kind", "urlconf"),
    [("sync", None), ("sync", ASYNC_URLS), ("async", None), ("async", ASYNC_URLS)],
    ids=["sync-client-sync-views", "sync-client-async-views", "async-client-sync-views",
         "async-client-async-views"],
)  # fmt: skip
def test_sync_and_async_clients_and_views(
    langfuse_capture: LangfuseCapture, client_kind: str, urlconf: str | None
) -> None:
    headers = {"x-user-id": "u-1", "x-request-id": "rid-1"}
    with override_settings(**({"ROOT_URLCONF": urlconf} if urlconf else {})):
        if client_kind == "sync":
            response = Client().get("/items/5", headers=headers)
        else:
            response = run(AsyncClient().get("/items/5", headers=headers))
    assert response.status_code == 200
    assert response["x-request-id"] == "rid-1"
    root = langfuse_capture.single(name="GET items/<int:item_id>")
    child = langfuse_capture.single(name="llm")
    assert child["parent_span_id"] == root["span_id"]
    assert (root["user_id"], child["user_id"]) == ("u-1", "u-1")
    assert root["metadata"]["framework"] == "django"


def test_middleware_is_one_class_for_sync_and_async() -> None:
    def sync_view(request: Any) -> Any:
        return HttpResponse()

    async def async_view(request: Any) -> Any:
        return HttpResponse()

    assert LangfuseMiddleware.sync_capable and LangfuseMiddleware.async_capable
    assert not iscoroutinefunction(LangfuseMiddleware(sync_view))
    assert iscoroutinefunction(LangfuseMiddleware(async_view))


def test_override_settings_takes_effect_on_the_next_request(
    langfuse_capture: LangfuseCapture,
) -> None:
    client = Client()
    options = {"user_id_from": "tests.test_django.user_from_header", "exclude_paths": ["/hello"]}
    with override_settings(LANGFUSE_MW=options):
        client.get("/ctx", headers={"x-account": "a1"})
        client.get("/hello")
    client.get("/hello")
    names = [(s["name"], s["user_id"]) for s in langfuse_capture.spans()]
    assert names == [("GET ctx", "auth-a1"), ("GET hello", None)]


def test_view_exception_is_recorded_and_the_test_client_still_raises(
    langfuse_capture: LangfuseCapture,
) -> None:
    with pytest.raises(RuntimeError, match="kaboom"):
        Client().get("/boom")
    response = Client(raise_request_exception=False).get("/boom")
    assert response.status_code == 500
    assert response["x-request-id"]
    for root in langfuse_capture.spans(name="GET boom"):
        assert (root["level"], root["status_message"]) == ("ERROR", "RuntimeError: kaboom")
        assert root["events"][0]["attributes"]["exception.type"] == "builtins.RuntimeError"
    assert len(langfuse_capture.spans(name="GET boom")) == 2


def test_async_view_exception_is_recorded(langfuse_capture: LangfuseCapture) -> None:
    with override_settings(ROOT_URLCONF=ASYNC_URLS):
        response = run(AsyncClient(raise_request_exception=False).get("/boom"))
    assert response.status_code == 500
    root = langfuse_capture.single(name="GET boom")
    assert root["status_message"] == "RuntimeError: kaboom"


def test_exception_in_a_middleware_below_is_recorded(langfuse_capture: LangfuseCapture) -> None:
    with override_settings(MIDDLEWARE=[OURS, "tests.test_django.Exploding"]):
        response = Client(raise_request_exception=False).get("/hello")
    assert response.status_code == 500
    root = langfuse_capture.single(name="GET <unmatched>")  # failed before URL resolution
    assert root["status_message"] == "ZeroDivisionError: middleware bug"


def test_exceptions_answered_with_4xx_or_handled_into_2xx_are_not_errors(
    langfuse_capture: LangfuseCapture,
) -> None:
    with override_settings(MIDDLEWARE=[OURS, "tests.test_django.NotFound"]):
        assert Client().get("/hello").status_code == 404
    with override_settings(MIDDLEWARE=[OURS, "tests.test_django.Swallow"]):
        assert Client().get("/boom").content == b"handled"
    levels = [
        (s["output"]["statusCode"], s["level"], s["events"]) for s in langfuse_capture.spans()
    ]
    assert levels == [(404, "WARNING", []), (200, "DEFAULT", [])]


def test_debug_propagate_exceptions_reraises_through_the_middleware(
    langfuse_capture: LangfuseCapture,
) -> None:
    with override_settings(DEBUG_PROPAGATE_EXCEPTIONS=True), pytest.raises(RuntimeError):
        Client().get("/boom")
    assert langfuse_capture.single(name="GET boom")["status_message"] == "RuntimeError: kaboom"


@pytest.mark.parametrize("urlconf", [None, ASYNC_URLS], ids=["sync-iterator", "async-iterator"])
def test_streaming_response_ends_after_the_last_chunk(
    langfuse_capture: LangfuseCapture, urlconf: str | None
) -> None:
    with override_settings(**({"ROOT_URLCONF": urlconf} if urlconf else {})):
        if urlconf:

            async def consume() -> bytes:
                response = await AsyncClient().get("/stream", {"delay": "0.1"})
                return b"".join([chunk async for chunk in response.streaming_content])

            body = run(consume())
        else:
            response = Client().get("/stream", {"delay": "0.1"})
            body = b"".join(response.streaming_content)
    assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    root = langfuse_capture.single(name="GET stream")
    assert root["end_time_unix_nano"] - root["start_time_unix_nano"] >= 300_000_000
    assert root["metadata"]["responseSize"] == len(body)
    assert "disconnected" not in root["metadata"]


def test_streaming_response_closed_early_is_a_disconnect(langfuse_capture: LangfuseCapture) -> None:
    response = Client().get("/stream", {"delay": "0.01"})
    next(iter(response.streaming_content))
    response.close()
    root = langfuse_capture.single(name="GET stream")
    assert root["metadata"]["disconnected"] is True


def test_a_bad_setting_fails_at_start_up() -> None:
    with (
        override_settings(LANGFUSE_MW={"sample_rat": 1}),
        pytest.raises(ImproperlyConfigured, match="did you mean 'sample_rate'"),
    ):
        LangfuseMiddleware(lambda request: HttpResponse())


def _ids(**overrides: Any) -> list[str]:
    with override_settings(**overrides):
        return sorted(m.id for m in checks.run_checks(tags=["langfuse_mw"]))


def test_system_checks() -> None:
    assert _ids() == []
    assert _ids(LANGFUSE_MW=["not", "a", "dict"]) == ["langfuse_mw.E001"]
    assert _ids(LANGFUSE_MW={"sample_rate": 7}) == ["langfuse_mw.E002"]
    assert _ids(LANGFUSE_MW={"nope": 1}) == ["langfuse_mw.E002"]
    assert _ids(LANGFUSE_MW={"user_id_from": "tests.nowhere.fn"}) == ["langfuse_mw.E002"]
    assert _ids(MIDDLEWARE=[OURS, OURS]) == ["langfuse_mw.E003"]
    assert _ids(MIDDLEWARE=[]) == ["langfuse_mw.W001"]
    assert _ids(MIDDLEWARE=[OURS, "tests.test_django.Swallow"]) == ["langfuse_mw.W002"]
    assert _ids(MIDDLEWARE=["tests.test_django.Swallow", OURS]) == []
    auth = "django.contrib.auth.middleware.AuthenticationMiddleware"
    with_user = {"user_id_from": "tests.test_django.user_from_header"}
    assert _ids(MIDDLEWARE=[OURS, auth], LANGFUSE_MW=with_user) == ["langfuse_mw.W003"]
    assert _ids(MIDDLEWARE=[auth, OURS], LANGFUSE_MW=with_user) == []
    gzip, conditional = (
        "django.middleware.gzip.GZipMiddleware",
        "django.middleware.http.ConditionalGetMiddleware",
    )
    assert _ids(MIDDLEWARE=[gzip, conditional, OURS]) == ["langfuse_mw.W004"]
    assert _ids(MIDDLEWARE=[OURS, gzip, conditional]) == []


@pytest.mark.parametrize(
    "above",
    [
        "django.middleware.common.CommonMiddleware",
        "django.middleware.locale.LocaleMiddleware",
        "django.contrib.redirects.middleware.RedirectFallbackMiddleware",
        "django.contrib.flatpages.middleware.FlatpageFallbackMiddleware",
    ],
)
def test_a_middleware_above_that_replaces_404s_is_a_warning(above: str) -> None:
    # Below CommonMiddleware an APPEND_SLASH redirect was recorded as the view's 404.
    assert _ids(MIDDLEWARE=[above, OURS]) == ["langfuse_mw.W005"]
    assert _ids(MIDDLEWARE=[OURS, above]) == []
    common = above.endswith("CommonMiddleware")
    assert _ids(MIDDLEWARE=[above, OURS], APPEND_SLASH=False) == (
        [] if common else ["langfuse_mw.W005"]
    )


def test_above_common_middleware_an_append_slash_redirect_is_recorded_as_sent(
    langfuse_capture: LangfuseCapture,
) -> None:
    middleware = [OURS, "django.middleware.common.CommonMiddleware"]
    with override_settings(MIDDLEWARE=middleware, APPEND_SLASH=True):
        response = Client().get("/slashed")
    assert response.status_code == 301 and response["Location"] == "/slashed/"
    root = langfuse_capture.single()
    assert root["output"] == {"statusCode": 301}


def test_get_request_context_inside_views(langfuse_capture: LangfuseCapture) -> None:
    body = Client().get("/ctx", headers={"x-session-id": "s-1"}).json()
    root = langfuse_capture.single(name="GET ctx")
    assert body["session_id"] == "s-1"
    assert body["observation_id"] == root["span_id"]


class _BadFile(io.RawIOBase):
    """A file whose second read fails (a disk or network file system going away)."""

    def __init__(self) -> None:
        self.reads = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self.reads += 1
        if self.reads > 1:
            raise OSError("disk gone")
        buffer[:10] = b"x" * 10
        return 10


def _bad_file(request: Any) -> Any:
    return FileResponse(_BadFile())


def _tagged_stream(request: Any) -> Any:
    async def chunks() -> Any:
        yield b"never read"

    if request.GET.get("plain"):
        return HttpResponse("body", headers={"ETag": '"v1"'})
    response = StreamingHttpResponse(chunks() if request.GET.get("async") else iter([b"body"]))
    response["ETag"] = '"v1"'
    return response


async def _slow(request: Any) -> Any:
    await asyncio.sleep(5)
    return HttpResponse("late")  # pragma: no cover


async def _quick(request: Any) -> Any:
    return HttpResponse("ok")


urlpatterns = [
    path("quick", _quick),
    path("bad-file", _bad_file),
    path("tagged", _tagged_stream),
    path("slow", _slow),
]


@pytest.mark.filterwarnings("ignore:StreamingHttpResponse must consume synchronous iterators")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # as below
def test_a_file_that_fails_while_it_is_read_under_asgi_is_the_requests_error(
    langfuse_capture: LangfuseCapture,
) -> None:
    # Under ASGI (no sendfile) the file is streamed through the body like any other, so a
    # read that fails is recorded; before, the observation was never ended at all. (Under
    # WSGI the server reads it through its wsgi.file_wrapper: the error is the server's.)
    with override_settings(ROOT_URLCONF="tests.test_django"):
        result = _drive("asgi", "/bad-file")
    gc.collect()  # Django leaves its request body file to the collector when sending fails
    assert isinstance(result.exception, OSError)
    root = langfuse_capture.single(name="GET bad-file")
    assert (root["level"], root["status_message"]) == ("ERROR", "OSError: disk gone")


@pytest.mark.parametrize("server", ["wsgi", "asgi"])
@pytest.mark.parametrize("kind", ["sync", "async", "plain"])
def test_a_stream_replaced_by_a_304_above_still_ends(
    langfuse_capture: LangfuseCapture, server: str, kind: str
) -> None:
    # ConditionalGetMiddleware above ours answers 304: the view's body is never read. The
    # observation ends when Django closes the response it sent, not at garbage collection.
    # (So does that of a plain response, which waits there for a failure above.)
    conditional = "django.middleware.http.ConditionalGetMiddleware"
    with override_settings(ROOT_URLCONF="tests.test_django", MIDDLEWARE=[conditional, OURS]):
        query = {"sync": b"", "async": b"async=1", "plain": b"plain=1"}[kind]
        result = _drive(server, "/tagged", query=query, headers=[(b"if-none-match", b'"v1"')])
    assert result.status == 304
    root = langfuse_capture.single(name="GET tagged")
    assert "disconnected" not in root["metadata"]


# Django leaves the request body's SpooledTemporaryFile to the garbage collector when it
# cancels a view (with or without this middleware): its warning is Django's.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_asgi_client_that_leaves_while_the_view_runs_is_a_disconnect(
    langfuse_capture: LangfuseCapture,
) -> None:
    async def leave_early() -> None:
        sent: list[dict[str, Any]] = []
        messages = iter([{"type": "http.request", "body": b""}, {"type": "http.disconnect"}])

        async def receive() -> dict[str, Any]:
            message = next(messages)
            if message["type"] == "http.disconnect":
                await asyncio.sleep(0.1)  # the client leaves while the view sleeps
            return message

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": "/slow", "query_string": b"",
                 "headers": [], "asgi": {"version": "3.0"}}  # fmt: skip
        await ASGIHandler()(scope, receive, send)
        assert sent == []  # no response: the view was cancelled

    with override_settings(ROOT_URLCONF="tests.test_django"):
        asyncio.run(leave_early())
    gc.collect()  # here, not in a later test
    root = langfuse_capture.single(name="GET slow")
    assert root["metadata"]["disconnected"] is True
    assert root["level"] == "WARNING"


def _drive(server: str, path: str, **kwargs: Any) -> Any:
    if server == "wsgi":
        return driver.call(WSGIHandler(), path, **kwargs)
    return asyncio.run(asgi_driver.call(ASGIHandler(), path, **kwargs))


@async_unsafe
def _load_from_the_database() -> Any:
    # What AuthenticationMiddleware's lazy request.user does: a query, refused in async code.
    return SimpleNamespace(username="alice", is_authenticated=True)


class LazyUser(MiddlewareMixin):  # type: ignore[misc]
    """AuthenticationMiddleware's shape: sync and async, request.user loaded on first use."""

    def process_request(self, request: Any) -> None:
        request.user = SimpleLazyObject(_load_from_the_database)


@pytest.mark.parametrize("client", ["sync", "async"])
def test_user_id_from_reading_request_user_works_under_asgi_too(
    langfuse_capture: LangfuseCapture, client: str
) -> None:
    options = {"user_id_from": "tests.test_django.user_from_request_user"}
    middleware = ["tests.test_django.LazyUser", OURS]
    with override_settings(MIDDLEWARE=middleware, LANGFUSE_MW=options):
        if client == "sync":
            Client().get("/hello")
        else:
            run(AsyncClient().get("/hello"))
    assert langfuse_capture.single(name="GET hello")["user_id"] == "alice"


class FailsAbove(MiddlewareMixin):  # type: ignore[misc]
    """Listed above LangfuseMiddleware: its process_response fails (a session store that is
    down), after LangfuseMiddleware returned the view's response. Django answers with a 500."""

    def process_response(self, request: Any, response: Any) -> Any:
        raise ZeroDivisionError("session store down")


def _fail_to_finish(sender: Any, **kwargs: Any) -> None:
    raise RuntimeError("could not flush the audit log")


@contextlib.contextmanager
def _failing_request_finished() -> Iterator[None]:
    request_finished.connect(_fail_to_finish, dispatch_uid="tests.fail_to_finish")
    try:
        yield
    finally:
        request_finished.disconnect(dispatch_uid="tests.fail_to_finish")


def _urls_for(server: str) -> str:
    # Sync views under WSGI, async ones under ASGI (a sync iterator would be consumed in a
    # thread there, with Django's warning).
    return ASYNC_URLS if server == "asgi" else "tests.django_project.urls"


@pytest.mark.parametrize("server", ["wsgi", "asgi"])
@pytest.mark.parametrize(("path", "size"), [("/hello", 2), ("/stream", 27)])
@pytest.mark.parametrize("sample_rate", [1.0, 0.0])
def test_a_request_finished_receiver_that_fails_is_an_error_after_the_response(
    langfuse_capture: LangfuseCapture, server: str, path: str, size: int, sample_rate: float
) -> None:
    # Django sends request_finished with send(), not send_robust(), at the end of the close()
    # of the response it sent: the exception leaves close() for the server. The client has
    # its response, so the request keeps its status; the failure is its child.
    options = {"sample_rate": sample_rate}
    with (
        override_settings(ROOT_URLCONF=_urls_for(server), LANGFUSE_MW=options),
        _failing_request_finished(),
    ):
        result = _drive(server, path, query=b"delay=0", headers=[(b"x-request-id", b"req-fin")])
    assert (result.status, len(result.body)) == (200, size)
    assert isinstance(result.exception, RuntimeError)  # the server still hears of it
    root = langfuse_capture.single(name=f"GET {path[1:]}")
    late = langfuse_capture.single(name="after response")
    assert (root["output"], root["level"]) == ({"statusCode": 200}, "DEFAULT")
    assert root["metadata"].get("keptBy") == (None if sample_rate else "error")
    assert (late["parent_span_id"], late["trace_id"]) == (root["span_id"], root["trace_id"])
    assert (late["level"], late["metadata"]) == ("ERROR", {"requestId": "req-fin"})
    assert late["status_message"] == "RuntimeError: could not flush the audit log"
    assert late["start_time_unix_nano"] == root["end_time_unix_nano"]


@pytest.mark.parametrize("server", ["wsgi", "asgi"])
@pytest.mark.parametrize("path", ["/hello", "/stream"])
@pytest.mark.parametrize("sample_rate", [1.0, 0.0])
def test_a_middleware_above_that_fails_is_the_500_the_client_gets(
    langfuse_capture: LangfuseCapture, server: str, path: str, sample_rate: float
) -> None:
    # The view answered 200 and LangfuseMiddleware returned it; then a middleware above failed
    # and Django answered with a 500 (got_request_exception): that is what the client got.
    middleware = ["tests.test_django.FailsAbove", OURS]
    options = {"sample_rate": sample_rate}
    with override_settings(
        ROOT_URLCONF=_urls_for(server), MIDDLEWARE=middleware, LANGFUSE_MW=options
    ):
        result = _drive(server, path, query=b"delay=0")
    assert (result.status, result.exception) == (500, None)
    root = langfuse_capture.single(name=f"GET {path[1:]}")
    assert root["output"] == {"statusCode": 500}
    assert (root["level"], root["status_message"]) == (
        "ERROR", "ZeroDivisionError: session store down",
    )  # fmt: skip
    assert root["events"][0]["attributes"]["exception.type"] == "builtins.ZeroDivisionError"
    assert root["metadata"].get("keptBy") == (None if sample_rate else "error")
    assert langfuse_capture.spans(name="after response") == []


# Django's ASGI handler leaves the request body's SpooledTemporaryFile to the garbage
# collector when the exception leaves it (with or without this middleware): its warning is Django's.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("server", ["wsgi", "asgi"])
def test_a_middleware_above_that_fails_with_debug_propagate_exceptions_ends_the_observation(
    langfuse_capture: LangfuseCapture, server: str
) -> None:
    # The exception goes to the server: Django sends no response, so closes none.
    middleware = ["tests.test_django.FailsAbove", OURS]
    with override_settings(
        ROOT_URLCONF=_urls_for(server), MIDDLEWARE=middleware, DEBUG_PROPAGATE_EXCEPTIONS=True
    ):
        result = _drive(server, "/hello")
    assert isinstance(result.exception, ZeroDivisionError)
    result.exception.__traceback__ = None  # Django's frames, which hold that file
    gc.collect()  # here, not in a later test
    root = langfuse_capture.single(name="GET hello")
    assert root["output"] == {"statusCode": 500}
    assert root["status_message"] == "ZeroDivisionError: session store down"


def test_the_site_cache_above_still_pickles_the_response(langfuse_capture: LangfuseCapture) -> None:
    # UpdateCacheMiddleware (first in MIDDLEWARE) pickles the response LangfuseMiddleware
    # returned: nothing of the observation may ride on it.
    middleware = [
        "django.middleware.cache.UpdateCacheMiddleware",
        OURS,
        "django.middleware.cache.FetchFromCacheMiddleware",
    ]
    with override_settings(MIDDLEWARE=middleware), _failing_request_finished():
        first, cached = (_drive("wsgi", "/hello") for _ in range(2))
    for result in (first, cached):
        assert (result.status, result.body) == (200, b"ok")
        assert isinstance(result.exception, RuntimeError)  # the cached response closes as one
    # The second from the cache (FetchFromCacheMiddleware answers before URL resolution).
    assert [root["name"] for root in langfuse_capture.roots()] == ["GET hello", "GET <unmatched>"]
    assert len(langfuse_capture.spans(name="after response")) == 2


@async_only_middleware
def slow_above(get_response: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A middleware above LangfuseMiddleware still at work after it returned the response."""

    async def middleware(request: Any) -> Any:
        response = await get_response(request)
        await asyncio.sleep(0.3)
        return response

    return middleware


def test_a_response_django_never_closes_still_ends_the_observation(
    langfuse_capture: LangfuseCapture,
) -> None:
    # The observation ends when Django closes the response it sent. Here the client leaves
    # while a middleware above is still at work: Django cancels it, and no response is ever
    # sent or closed. The observation ends when the request is freed, with what the
    # middleware saw.
    async def leave_while_above_runs() -> None:
        sent: list[dict[str, Any]] = []
        messages = iter([{"type": "http.request", "body": b""}, {"type": "http.disconnect"}])

        async def receive() -> dict[str, Any]:
            message = next(messages)
            if message["type"] == "http.disconnect":
                await asyncio.sleep(0.1)  # while slow_above sleeps
            return message

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": "/quick", "query_string": b"",
                 "headers": [], "asgi": {"version": "3.0"}}  # fmt: skip
        await ASGIHandler()(scope, receive, send)
        assert sent == []  # cancelled above: nothing was sent

    middleware = ["tests.test_django.slow_above", OURS]
    with override_settings(ROOT_URLCONF="tests.test_django", MIDDLEWARE=middleware):
        asyncio.run(leave_while_above_runs())
    gc.collect()
    root = langfuse_capture.single(name="GET quick")
    assert root["output"] == {"statusCode": 200}
