"""The WSGI-family adapters under one interface, for tests shared by all of them."""

from __future__ import annotations

import asyncio
import gc
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from tests import asgi_driver
from tests.asgi_driver import Result
from tests.django_project import setup
from tests.wsgi_apps import driver, flask_app, plain

setup()

import django  # noqa: E402
from django.core.handlers.asgi import ASGIHandler  # noqa: E402
from django.core.handlers.wsgi import WSGIHandler  # noqa: E402
from django.test import override_settings  # noqa: E402

from langfuse_mw.flask import LangfuseFlask  # noqa: E402
from langfuse_mw.wsgi import LangfuseWSGIMiddleware  # noqa: E402

Call = Callable[..., Result]
MIDDLEWARE = ["langfuse_mw.django.LangfuseMiddleware"]
ASYNC_URLS = "tests.django_project.urls_async"


@dataclass(frozen=True)
class Adapter:
    name: str
    framework: str  # metadata.framework
    build: Callable[[bool, dict[str, Any]], Call]  # (traced, options) -> call(path, **kw)
    raises: bool = False  # an unhandled exception reaches the server (no framework 500 page)

    def template(self, route: str) -> str:
        """The route template this framework reports for a route written Flask's way."""
        if self.name == "wsgi":
            return route.replace("<int:", "{").replace(">", "}")
        if self.framework == "django":
            return route.lstrip("/")
        return route

    def __str__(self) -> str:
        return self.name


def _wsgi(traced: bool, options: dict[str, Any]) -> Call:
    app: Any = plain.app
    if traced:
        app = LangfuseWSGIMiddleware(app, route_from=plain.route_from, **options)
    return lambda path="/", **kw: driver.call(app, path, **kw)


def _flask(traced: bool, options: dict[str, Any]) -> Call:
    app = flask_app.build()
    if traced:
        LangfuseFlask(app, **options)
    return lambda path="/", **kw: driver.call(app, path, **kw)


_pinned: list[bool] = []


@contextmanager
def _django_settings(options: dict[str, Any], urlconf: str | None) -> Iterator[None]:
    if _pinned:  # settings applied once around concurrent calls (see pin)
        yield
        return
    extra = {"ROOT_URLCONF": urlconf} if urlconf else {}
    with override_settings(LANGFUSE_MW=dict(options), **extra):
        yield


@contextmanager
def pin(adapter: Adapter) -> Iterator[None]:
    """Apply the Django settings once for calls made from several threads at a time
    (override_settings is not thread-safe: interleaved, it can leave a value behind)."""
    urlconf = ASYNC_URLS if adapter.name == "django-async" else None
    with _django_settings({}, urlconf):
        _pinned.append(True)
        try:
            yield
        finally:
            _pinned.pop()


def _django(traced: bool, options: dict[str, Any]) -> Call:
    with override_settings(MIDDLEWARE=MIDDLEWARE if traced else []):
        handler = WSGIHandler()

    def call(path: str = "/", **kw: Any) -> Result:
        with _django_settings(options, None):
            return driver.call(handler, path, **kw)

    return call


def _django_async(traced: bool, options: dict[str, Any]) -> Call:
    with override_settings(MIDDLEWARE=MIDDLEWARE if traced else []):
        handler = ASGIHandler()

    def call(path: str = "/", **kw: Any) -> Result:
        with _django_settings(options, ASYNC_URLS):
            result = asyncio.run(asgi_driver.call(handler, path, **kw))
        if django.VERSION < (5,):
            # Django 4.2's ASGIHandler leaves the request body's temporary file to the garbage
            # collector (ResourceWarning); collect it here rather than in a later test.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ResourceWarning)
                gc.collect()
        return result

    return call


ADAPTERS = [
    Adapter("wsgi", "wsgi", _wsgi, raises=True),
    Adapter("flask", "flask", _flask),
    Adapter("django", "django", _django),
    Adapter("django-async", "django", _django_async),
]
