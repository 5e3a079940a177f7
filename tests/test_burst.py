"""A back-to-back burst with a healthy backend loses nothing (the naive middleware lost 85 %)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import pytest

from langfuse_mw import runtime
from langfuse_mw.config import resolve_settings
from langfuse_mw.export import SENT, HttpSender, Outcome
from tests.asgi_driver import call
from tests.conftest import traced_app

pytestmark = pytest.mark.anyio


class EncodingCounter:
    """A healthy backend: encodes and compresses each batch as for Langfuse, then counts it."""

    def __init__(self) -> None:
        self.spans = 0
        self._http = HttpSender("http://127.0.0.1:9", {})
        self._lock = threading.Lock()

    def send(self, spans: Sequence[Any], timeout: float) -> Outcome:
        self._http.encode(spans)
        with self._lock:
            self.spans += len(spans)
        return SENT

    def reset(self) -> None:
        return None

    def close(self) -> None:
        return None


async def test_twenty_thousand_requests_back_to_back_lose_no_span() -> None:
    runtime.shutdown(0.5)
    sender = EncodingCounter()
    settings = resolve_settings({"public_key": "pk-burst", "secret_key": "sk-burst"}, environ={})
    with runtime._lock:
        rt = runtime._install(runtime.Runtime(settings, sender=sender))
    try:
        app = traced_app("starlette")
        for n in range(20_000):
            await call(app, "/items/1", headers=[(b"x-user-id", b"u-%d" % (n % 50))])
        assert rt.flush(30)
        stats = rt.health()
    finally:
        runtime.shutdown(1)
    # Each request: its root observation and the handler's generation.
    assert stats["created"] == 40_000
    assert stats["dropped"] == {}
    assert stats["exported"] == sender.spans == 40_000
