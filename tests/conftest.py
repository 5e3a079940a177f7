from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

from langfuse_mw import LangfuseMiddleware
from tests import apps
from tests.queue_support import RedisServer

# No test may reach a real Langfuse: clear what a developer's shell might have set. Export
# honours HTTP(S)_PROXY, and a proxy set in that shell must not stand between the tests and
# their receivers on 127.0.0.1 (the proxy tests set their own).
for _name in list(os.environ):
    if _name.startswith(("LANGFUSE_", "OTEL_")) or _name.lower() in (
        "http_proxy", "https_proxy", "all_proxy", "no_proxy"
    ):  # fmt: skip
        del os.environ[_name]

FRAMEWORKS = ["starlette", "fastapi"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server of its own, for the durable-export tests."""
    server = RedisServer().start()
    yield server
    server.close()


def traced_app(framework: str, placement: str = "add_middleware", **options: Any) -> Any:
    """The test app with LangfuseMiddleware added the usual way or wrapped around it."""
    app = apps.build(framework)
    if placement == "wrap":
        return LangfuseMiddleware(app, **options)
    app.add_middleware(LangfuseMiddleware, **options)
    return app


ClientFactory = Callable[..., httpx.AsyncClient]


@pytest.fixture
async def make_client() -> AsyncIterator[ClientFactory]:
    clients: list[httpx.AsyncClient] = []

    def factory(app: Any, raise_app_exceptions: bool = False) -> httpx.AsyncClient:
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app, raise_app_exceptions=raise_app_exceptions),
            base_url="http://testserver",
        )
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.aclose()


@pytest.fixture(autouse=True)
def _fresh_log_suppression() -> None:
    # log_once() remembers causes for a minute; each test starts with a clean slate.
    from langfuse_mw import _failsafe

    _failsafe.reset()
