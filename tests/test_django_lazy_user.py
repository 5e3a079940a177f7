"""Under ASGI, request.user is loaded for identity callables only when the request is traced."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from langfuse_mw.testing import LangfuseCapture
from tests.django_project import setup

setup()

from django.core.handlers.asgi import ASGIHandler  # noqa: E402
from django.core.handlers.wsgi import WSGIHandler  # noqa: E402
from django.test import override_settings  # noqa: E402
from django.utils.deprecation import MiddlewareMixin  # noqa: E402
from django.utils.functional import SimpleLazyObject  # noqa: E402

from tests import asgi_driver  # noqa: E402
from tests.wsgi_apps import driver  # noqa: E402

OURS = "langfuse_mw.django.LangfuseMiddleware"
# The paths whose request.user was loaded (each load is a session and a user query).
USER_LOADS: list[str] = []


def user_from_request_user(info: Any) -> str | None:
    """What docs/django.md advises for user_id_from (a dotted path in LANGFUSE_MW)."""
    user = info.raw.user
    return str(user.username) if user.is_authenticated else None


class CountingLazyUser(MiddlewareMixin):  # type: ignore[misc]
    """AuthenticationMiddleware's shape: request.user is loaded (queried) on first use."""

    def process_request(self, request: Any) -> None:
        def load() -> Any:
            USER_LOADS.append(request.path)
            return SimpleNamespace(username="alice", is_authenticated=True)

        request.user = SimpleLazyObject(load)


def _drive(server: str, path: str) -> Any:
    if server == "wsgi":
        return driver.call(WSGIHandler(), path)
    return asyncio.run(asgi_driver.call(ASGIHandler(), path))


@pytest.mark.parametrize("server", ["wsgi", "asgi"])
def test_excluded_and_health_requests_do_not_load_request_user(
    langfuse_capture: LangfuseCapture, server: str
) -> None:
    # Under ASGI the middleware loads a lazy request.user in Django's sync thread before
    # calling user_id_from. It did so for every request, also those it never traces: each
    # readiness probe or static file paid the session and user queries (and a turn of that one
    # thread) that the same request without the middleware, or under WSGI, does not make.
    USER_LOADS.clear()
    options = {
        "user_id_from": "tests.test_django_lazy_user.user_from_request_user",
        "exclude_paths": ["/health"],
        "health_path": "/_langfuse/health",
    }
    middleware = ["tests.test_django_lazy_user.CountingLazyUser", OURS]
    with override_settings(MIDDLEWARE=middleware, LANGFUSE_MW=options):
        probes = [_drive(server, path) for path in ("/health", "/_langfuse/health")]
        traced = _drive(server, "/hello")
    assert [r.status for r in (*probes, traced)] == [200, 200, 200]
    assert USER_LOADS == ["/hello"]  # only the request user_id_from was called for
    assert langfuse_capture.single(name="GET hello")["user_id"] == "alice"
    assert [root["name"] for root in langfuse_capture.roots()] == ["GET hello"]
