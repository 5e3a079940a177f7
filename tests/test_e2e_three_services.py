"""FastAPI (uvicorn) → Flask (gunicorn) → Django (gunicorn), real processes on 127.0.0.1,
exporting real OTLP to the local receiver: one trace, correctly linked, one user and request id."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from demo_apps.run import KEYS, start_services, stop_services
from langfuse_mw.devserver import DevServer

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def services() -> Iterator[tuple[DevServer, str]]:
    receiver = DevServer(host="127.0.0.1", port=0, db=":memory:",
                         public_key=KEYS["LANGFUSE_PUBLIC_KEY"],
                         secret_key=KEYS["LANGFUSE_SECRET_KEY"])  # fmt: skip
    receiver.start()
    try:
        gateway, processes = start_services(receiver.url)
        try:
            yield receiver, gateway
        finally:
            stop_services(processes)
    finally:
        receiver.stop()


def trace_spans(receiver: DevServer, trace_id: str, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        spans = [s for s in receiver.received_spans() if s["trace_id"] == trace_id]
        if len(spans) >= count:
            return spans
        time.sleep(0.1)
    raise AssertionError(f"only {len(spans)} spans of trace {trace_id} arrived")


def test_one_trace_across_three_services(services: tuple[DevServer, str]) -> None:
    receiver, gateway = services
    response = httpx.get(
        f"{gateway}/checkout/4",
        headers={"x-user-id": "user-42", "x-session-id": "sess-9"},
        timeout=10,
    )
    assert response.status_code == 200
    request_id = response.headers["x-request-id"]
    roots = [s for s in receiver.received_spans() if s["name"] == "GET /checkout/{item_id}"]
    deadline = time.monotonic() + 15
    while not roots and time.monotonic() < deadline:
        time.sleep(0.1)
        roots = [s for s in receiver.received_spans() if s["name"] == "GET /checkout/{item_id}"]
    (root,) = [r for r in roots if f'"{request_id}"' in r["attributes"].values()]
    spans = trace_spans(receiver, root["trace_id"], 6)
    by_name = {s["name"]: s for s in spans}
    assert set(by_name) == {
        "GET /checkout/{item_id}",  # gateway (FastAPI)
        "GET 127.0.0.1/inventory/4",  # its outbound call
        "GET /inventory/<int:item_id>",  # inventory (Flask)
        "GET 127.0.0.1/price/4",  # its outbound call
        "GET price/<int:item_id>",  # pricing (Django)
        "summarise-order",  # the gateway's LLM generation
    }
    parent = {name: span["parent_span_id"] for name, span in by_name.items()}
    span_id = {name: span["span_id"] for name, span in by_name.items()}
    assert parent["GET /checkout/{item_id}"] is None  # the single root
    assert parent["GET 127.0.0.1/inventory/4"] == span_id["GET /checkout/{item_id}"]
    assert parent["GET /inventory/<int:item_id>"] == span_id["GET 127.0.0.1/inventory/4"]
    assert parent["GET 127.0.0.1/price/4"] == span_id["GET /inventory/<int:item_id>"]
    assert parent["GET price/<int:item_id>"] == span_id["GET 127.0.0.1/price/4"]
    assert parent["summarise-order"] == span_id["GET /checkout/{item_id}"]
    for span in spans:
        assert span["attributes"]["user.id"] == "user-42", span["name"]
        assert span["attributes"]["session.id"] == "sess-9", span["name"]
    for name in ("GET /checkout/{item_id}", "GET /inventory/<int:item_id>",
                 "GET price/<int:item_id>"):  # fmt: skip
        attrs = by_name[name]["attributes"]
        assert attrs["langfuse.observation.metadata.requestId"] == f'"{request_id}"'
    # Only the first service names the trace; the others are not app roots (claimed upstream).
    names = [s["attributes"].get("langfuse.trace.name") for s in spans]
    assert [n for n in names if n] == ["GET /checkout/{item_id}"]
    # What Langfuse would show: one trace named after the gateway's route, with all six.
    auth = (KEYS["LANGFUSE_PUBLIC_KEY"], KEYS["LANGFUSE_SECRET_KEY"])
    trace = httpx.get(f"{receiver.url}/api/public/traces/{root['trace_id']}", auth=auth).json()
    assert trace["name"] == "GET /checkout/{item_id}"
    assert trace["userId"] == "user-42" and trace["sessionId"] == "sess-9"
    assert len(trace["observations"]) == 6


def test_a_failure_deep_down_is_an_error_in_every_service(
    services: tuple[DevServer, str],
) -> None:
    receiver, gateway = services
    response = httpx.get(f"{gateway}/checkout/0", headers={"x-user-id": "u-f"}, timeout=10)
    assert response.status_code == 502
    request_id = response.headers["x-request-id"]
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        mine = [s for s in receiver.received_spans()
                if s["attributes"].get("langfuse.observation.metadata.requestId")
                == f'"{request_id}"']  # fmt: skip
        if len(mine) == 5:
            break
        time.sleep(0.1)
    levels = {s["name"]: s["attributes"].get("langfuse.observation.level") for s in mine}
    # Every request and every call on the way: the request id followed them all.
    assert levels == {
        "GET /checkout/{item_id}": "ERROR",
        "GET 127.0.0.1/inventory/0": "ERROR",
        "GET /inventory/<int:item_id>": "ERROR",
        "GET 127.0.0.1/price/0": "ERROR",
        "GET price/<int:item_id>": "ERROR",
    }
    pricing = next(s for s in mine if s["name"] == "GET price/<int:item_id>")
    assert "ZeroDivisionError" in pricing["attributes"]["langfuse.observation.status_message"]
