"""Sync views (urls_async.py serves the same routes with async views)."""

from __future__ import annotations

from typing import Any

from django.urls import path

from tests.django_project import views

# (route, view name); the async twin of a view is "a" + its name, where there is one.
ROUTES = [
    ("items/<int:item_id>", "item"),
    ("boom", "boom"),
    ("status/<int:code>", "status"),
    ("stream", "stream"),
    ("stream-ctx", "stream_ctx"),
    ("ctx", "ctx"),
    ("thread", "thread"),
    ("own-request-id", "own"),
    ("hello", "hello"),
    ("health", "hello"),
    ("slashed/", "hello"),  # APPEND_SLASH redirects /slashed here
    ("file", "file"),
]


def patterns(asynchronous: bool) -> list[Any]:
    """The URL patterns with the sync views or their async twins."""

    def view(name: str) -> Any:
        return getattr(views, "a" + name, None) if asynchronous else None

    return [path(route, view(name) or getattr(views, name)) for route, name in ROUTES]


urlpatterns = patterns(asynchronous=False)
