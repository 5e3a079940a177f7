"""Test kit: capture what Langfuse would receive from your app (a pytest plugin).

    def test_checkout(langfuse_capture, client):
        client.get("/checkout", headers={"x-user-id": "u-1"})
        root = langfuse_capture.single(name="GET /checkout")
        assert root["user_id"] == "u-1"

The runtime is the real one (the langfuse SDK, the export queue, the OTLP encoder); only the
HTTP call to Langfuse is replaced by decoding the encoded batch back into plain dicts.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

try:
    import pytest
except ImportError:  # capture_langfuse() works without pytest; the fixture needs it
    pytest = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from .export import Item, Outcome
    from .runtime import Runtime

__all__ = ["CaptureSender", "LangfuseCapture", "capture_langfuse", "langfuse_capture"]

CAPTURE_PUBLIC_KEY = "pk-lf-capture"
CAPTURE_SECRET_KEY = "sk-lf-capture"
_META = "langfuse.observation.metadata."


def view(span: dict[str, Any]) -> dict[str, Any]:
    """Add the fields Langfuse derives from a span's attributes (input, metadata, level...)."""
    # Imported here: the pytest plugin loads this module in every test run.
    from ._otlp import decode_json

    attrs = span["attributes"]
    return {
        **span,
        "input": decode_json(attrs.get("langfuse.observation.input")),
        "output": decode_json(attrs.get("langfuse.observation.output")),
        "metadata": {
            key[len(_META) :]: decode_json(value)
            for key, value in attrs.items()
            if key.startswith(_META)
        },
        "level": attrs.get("langfuse.observation.level", "DEFAULT"),
        "status_message": attrs.get("langfuse.observation.status_message"),
        "user_id": attrs.get("user.id"),
        "session_id": attrs.get("session.id"),
        "trace_name": attrs.get("langfuse.trace.name"),
    }


class CaptureSender:
    """A Sender that encodes each batch exactly as for Langfuse, then decodes it into dicts.

    Decoding uses the official protobuf classes, so every test also checks the encoder.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: list[bytes] = []
        self.spans: list[dict[str, Any]] = []

    def send(self, spans: Sequence[Item], timeout: float) -> Outcome:
        from ._otlp import decode_protobuf, spans_from_request
        from .export import SENT, HttpSender, encode_or_isolate, with_unencodable

        # As the real senders do: a span that cannot be encoded is left out, alone.
        body, bad, error = encode_or_isolate(HttpSender("", {}, compression="none"), spans)
        if body is None:
            return Outcome(drop_reason="encoding", error=error)
        decoded = [view(span) for span in spans_from_request(decode_protobuf(body))]
        with self._lock:
            self.requests.append(body)
            self.spans.extend(decoded)
        return with_unencodable(SENT, bad, error)

    def reset(self) -> None:
        return None

    def close(self) -> None:
        return None


class LangfuseCapture:
    """The spans the app exported, as plain dicts; reading them flushes the queue first."""

    def __init__(self, runtime: Runtime, sender: CaptureSender) -> None:
        self.runtime = runtime
        self.sender = sender

    def spans(self, **filters: Any) -> list[dict[str, Any]]:
        """All exported spans (optionally only those whose fields equal ``filters``)."""
        self.runtime.flush(5.0)
        with self.sender._lock:
            spans = list(self.sender.spans)
        return [s for s in spans if all(s.get(k) == v for k, v in filters.items())]

    def single(self, **filters: Any) -> dict[str, Any]:
        """The one exported span matching ``filters``; fails the test otherwise."""
        found = self.spans(**filters)
        names = ", ".join(s["name"] for s in self.spans())
        assert len(found) == 1, f"expected one span matching {filters}, got {len(found)}: {names}"
        return found[0]

    def roots(self) -> list[dict[str, Any]]:
        """Spans that start a trace or continue a remote one (the requests' observations)."""
        spans = self.spans()
        ids = {s["span_id"] for s in spans}
        return [s for s in spans if s["parent_span_id"] not in ids]

    def clear(self) -> None:
        """Forget what was captured so far."""
        self.runtime.flush(5.0)
        with self.sender._lock:
            self.sender.spans.clear()
            self.sender.requests.clear()


@contextlib.contextmanager
def capture_langfuse(**options: Any) -> Iterator[LangfuseCapture]:
    """Install a capturing runtime for the block.

    ``options`` shape the runtime (export, redaction, environment, release); per-request
    options such as ``sample_rate`` belong to the middleware, which decides each request.
    """
    from . import _failsafe, runtime
    from .config import resolve_settings

    runtime.shutdown(1.0)
    _failsafe.reset()
    sender = CaptureSender()
    settings = resolve_settings(
        {
            "public_key": CAPTURE_PUBLIC_KEY,
            "secret_key": CAPTURE_SECRET_KEY,
            "base_url": "http://127.0.0.1:9",
            "flush_interval": 0.05,
            **options,
        }
    )
    saved = {k: os.environ.get(k) for k in ("LANGFUSE_PUBLIC_KEY", "LANGFUSE_SECRET_KEY")}
    # So langfuse.get_client() inside handlers resolves to the capturing client.
    os.environ["LANGFUSE_PUBLIC_KEY"] = settings.public_key or CAPTURE_PUBLIC_KEY
    os.environ["LANGFUSE_SECRET_KEY"] = settings.secret_key or CAPTURE_SECRET_KEY
    with runtime._lock:
        rt = runtime._install(runtime.Runtime(settings, sender=sender))
    try:
        yield LangfuseCapture(rt, sender)
    finally:
        runtime.shutdown(2.0)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


if pytest is not None:

    @pytest.fixture
    def langfuse_capture() -> Iterator[LangfuseCapture]:
        """Route langfuse_mw's export to memory for one test and return the captured spans."""
        with capture_langfuse() as capture:
            yield capture
