"""Work a WSGI app does after its response was sent, that fails (plain WSGI, Flask).

The ASGI twin (a Starlette BackgroundTask) is in test_asgi.py; Django's (a
``request_finished`` receiver that raises, the only failure its close() lets through) is in
test_django.py.
"""

from __future__ import annotations

import pytest

from langfuse_mw.testing import LangfuseCapture
from tests.wsgi_apps.adapters import ADAPTERS, Adapter

WSGI_ADAPTERS = [adapter for adapter in ADAPTERS if adapter.name in ("wsgi", "flask")]


@pytest.mark.parametrize("adapter", WSGI_ADAPTERS, ids=str)
@pytest.mark.parametrize("sample_rate", [1.0, 0.0])
def test_a_close_callback_that_fails_is_an_error_after_the_response(
    langfuse_capture: LangfuseCapture, adapter: Adapter, sample_rate: float
) -> None:
    call = adapter.build(True, {"sample_rate": sample_rate})
    result = call("/late", headers=[(b"x-request-id", b"req-late")])
    assert (result.status, result.body) == (200, b"ok")
    assert isinstance(result.exception, RuntimeError)  # the server still hears of it
    root = langfuse_capture.single(name="GET /late")
    late = langfuse_capture.single(name="after response")
    assert root["output"] == {"statusCode": 200}
    assert root.get("level", "DEFAULT") == "DEFAULT"
    assert root["metadata"].get("keptBy") == (None if sample_rate else "error")
    assert (late["parent_span_id"], late["trace_id"]) == (root["span_id"], root["trace_id"])
    assert (late["level"], late["metadata"]) == ("ERROR", {"requestId": "req-late"})
    assert late["status_message"] == "RuntimeError: could not save the conversation"
    assert late["start_time_unix_nano"] == root["end_time_unix_nano"]
    assert late["end_time_unix_nano"] - late["start_time_unix_nano"] >= 50_000_000


@pytest.mark.parametrize("adapter", WSGI_ADAPTERS, ids=str)
def test_a_close_that_fails_after_a_disconnect_is_the_requests_error(
    langfuse_capture: LangfuseCapture, adapter: Adapter
) -> None:
    # The server stopped after one chunk (the client left): the failing close belongs to a
    # request that never completed, so it is that request's error, and still a disconnect.
    result = adapter.build(True, {})("/late", disconnect_after_chunks=1)
    assert isinstance(result.exception, RuntimeError)
    root = langfuse_capture.single(name="GET /late")
    assert langfuse_capture.spans(name="after response") == []
    assert root["metadata"]["disconnected"] is True
    assert (root["level"], root["status_message"]) == (
        "ERROR", "RuntimeError: could not save the conversation",
    )  # fmt: skip
