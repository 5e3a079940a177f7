"""Errors always: a dropped request that fails is kept as a sampled one, read as it arrived.

Cases beyond the shared ones (tests/test_sampling.py, tests/test_adapters_shared.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from flask import Flask
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from werkzeug.middleware.proxy_fix import ProxyFix

from langfuse_mw import LangfuseMiddleware
from langfuse_mw.flask import LangfuseFlask
from langfuse_mw.testing import LangfuseCapture
from langfuse_mw.wsgi import LangfuseWSGIMiddleware
from tests.asgi_driver import call
from tests.compare import comparable
from tests.wsgi_apps import driver

# Behind a proxy on 127.0.0.1 that says who its client was; user and session from headers.
PROXIED = [
    (b"x-forwarded-for", b"203.0.113.7"),
    (b"x-user-id", b"u-7"),
    (b"x-session-id", b"s-7"),
    (b"x-request-id", b"r-7"),
]
# The peer (the proxy) is trusted with identity headers; its own address is recorded.
PEER_OPTIONS: dict[str, Any] = {"trusted_networks": ["127.0.0.0/8"], "capture_client_ip": True}


def _assert_kept_as_sampled(capture: LangfuseCapture) -> None:
    dropped, sampled = capture.spans()
    assert dropped["metadata"]["keptBy"] == "error" and "keptBy" not in sampled["metadata"]
    assert dropped["metadata"]["clientIp"] == sampled["metadata"]["clientIp"] == "127.0.0.1"
    assert (dropped["user_id"], dropped["session_id"]) == ("u-7", "s-7")
    assert comparable(dropped) == comparable(sampled)


async def _asgi_boom(request: Request) -> Response:
    raise RuntimeError("kaboom")


@pytest.mark.anyio
async def test_asgi_kept_request_reads_the_peer_before_inner_middleware_rewrites_it(
    langfuse_capture: LangfuseCapture,
) -> None:
    # uvicorn's ProxyHeadersMiddleware, added before us (so inside us), sets scope["client"]
    # in place while the app runs: a dropped request read it only when kept, and lost its
    # user and session (the forwarded address is not a trusted peer) and its client ip.
    for rate in (0.0, 1.0):
        app = Starlette(routes=[Route("/boom", _asgi_boom)])
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts="127.0.0.1")
        app.add_middleware(LangfuseMiddleware, sample_rate=rate, **PEER_OPTIONS)
        result = await call(app, "/boom", headers=PROXIED)
        assert isinstance(result.exception, RuntimeError)
    _assert_kept_as_sampled(langfuse_capture)


def _flask_app() -> Flask:
    app = Flask("proxied")
    # The usual set-up: ProxyFix first, extensions after (so ProxyFix runs inside us).
    app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1)  # type: ignore[method-assign]

    @app.get("/boom")
    def boom() -> Any:
        raise RuntimeError("kaboom")

    return app


def _plain_boom(environ: dict[str, Any], start_response: Any) -> Any:
    raise RuntimeError("kaboom")


@pytest.mark.parametrize("framework", ["flask", "wsgi"])
def test_wsgi_kept_request_reads_the_peer_before_proxy_fix_rewrites_it(
    langfuse_capture: LangfuseCapture, framework: str
) -> None:
    # werkzeug's ProxyFix inside us sets environ["REMOTE_ADDR"] in place.
    for rate in (0.0, 1.0):
        if framework == "flask":
            app: Any = _flask_app()
            LangfuseFlask(app, sample_rate=rate, **PEER_OPTIONS)
        else:
            app = LangfuseWSGIMiddleware(
                ProxyFix(_plain_boom, x_for=1), sample_rate=rate, **PEER_OPTIONS
            )
        result = driver.call(app, "/boom", headers=PROXIED)
        assert result.status == 500 or isinstance(result.exception, RuntimeError)
    _assert_kept_as_sampled(langfuse_capture)


async def _no_answer(scope: Any, receive: Any, send: Any) -> None:
    # A bug (an inner middleware that forgot to call the app, a missing return): no response.
    await receive()


@pytest.mark.anyio
async def test_an_app_that_returns_without_a_response_is_a_server_error_and_kept(
    langfuse_capture: LangfuseCapture,
) -> None:
    # The client gets the server's 500 (uvicorn: "ASGI callable returned without starting
    # response"): an error to Langfuse, and so exported when sampling dropped the request.
    for rate in (0.0, 1.0):
        app = LangfuseMiddleware(_no_answer, sample_rate=rate)
        result = await call(app, "/quiet", headers=[(b"x-request-id", b"r-7")])
        assert result.status is None and result.exception is None
    dropped, sampled = langfuse_capture.spans()
    for root in (dropped, sampled):
        assert root["output"] == {"statusCode": 500}
        assert root["level"] == "ERROR" and root["status_message"] == "HTTP 500"
    assert dropped["metadata"]["keptBy"] == "error"
    assert comparable(dropped) == comparable(sampled)


async def _fails_after_the_client_left(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"a", "more_body": True})
    await asyncio.sleep(0.2)  # the client leaves meanwhile: the request ends there
    raise RuntimeError("the model call failed")


@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_a_stream_that_fails_after_the_client_left_is_an_error_after_the_disconnect(
    langfuse_capture: LangfuseCapture, rate: float
) -> None:
    # An ASGI 2.4 server tells the app the client left and lets it run on; what it raises
    # then was lost (the request had ended at the disconnect), and a dropped one was never
    # kept. It is a child of the request, as a failure after the response is.
    app = LangfuseMiddleware(_fails_after_the_client_left, sample_rate=rate)
    result = asyncio.run(call(app, "/", disconnect_after_chunks=1))
    assert isinstance(result.exception, RuntimeError)  # still the server's to see
    root = langfuse_capture.single(name="GET <unmatched>")
    assert root["metadata"]["disconnected"] is True
    assert root["level"] == "WARNING"
    assert root["status_message"].startswith("client disconnected")
    assert root["metadata"].get("keptBy") == ("error" if rate == 0.0 else None)
    child = langfuse_capture.single(name="after disconnect")
    assert child["parent_span_id"] == root["span_id"]
    assert (child["level"], child["status_message"]) == (
        "ERROR",
        "RuntimeError: the model call failed",
    )
