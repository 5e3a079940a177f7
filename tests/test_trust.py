"""The trust policy for incoming trace context, baggage and identity, with forged headers."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from langfuse_mw import health
from langfuse_mw.testing import LangfuseCapture, capture_langfuse
from tests.asgi_driver import call
from tests.conftest import traced_app
from tests.corpus import VALID_PARENT_ID, VALID_TRACE_ID, VALID_TRACEPARENT

pytestmark = pytest.mark.anyio

FORGED = [
    (b"traceparent", VALID_TRACEPARENT),
    (
        b"baggage",
        b"langfuse_user_id=admin,langfuse_session_id=forged-session,"
        b"langfuse_environment=production,langfuse_trace_name=renamed,vendor=kept",
    ),
]


async def test_continue_joins_the_trace_and_takes_identity_from_baggage() -> None:
    with capture_langfuse(environment="staging") as capture:
        await call(traced_app("starlette"), "/items/1", headers=FORGED)
        root = capture.single(name="GET /items/{item_id}")
        child = capture.single(name="llm")
    assert root["trace_id"] == VALID_TRACE_ID
    assert root["parent_span_id"] == VALID_PARENT_ID
    assert (root["user_id"], root["session_id"]) == ("admin", "forged-session")
    # The service's own environment and name are never taken from outside.
    for span in (root, child):
        assert span["attributes"]["langfuse.environment"] == "staging"
        assert "langfuse.trace.name" not in span["attributes"]
    assert child["user_id"] == "admin"


async def test_a_header_beats_baggage(langfuse_capture: LangfuseCapture) -> None:
    headers = [*FORGED, (b"x-user-id", b"from-header")]
    await call(traced_app("starlette"), "/items/1", headers=headers)
    assert langfuse_capture.single(name="GET /items/{item_id}")["user_id"] == "from-header"


async def test_ignore_starts_a_new_trace_and_ignores_baggage() -> None:
    with capture_langfuse(environment="edge") as capture:
        app = traced_app("starlette", trust_incoming="ignore")
        for _ in range(20):
            await call(app, "/items/1", headers=FORGED)
        roots = capture.spans(name="GET /items/{item_id}")
        children = capture.spans(name="llm")
    assert len({r["trace_id"] for r in roots}) == 20  # a fresh trace every time
    for root in roots:
        assert root["trace_id"] != VALID_TRACE_ID
        assert root["parent_span_id"] is None
        assert root["user_id"] is None and root["session_id"] is None
        assert root["trace_name"] == "GET /items/{item_id}"
        assert root["attributes"]["langfuse.environment"] == "edge"
        assert "linkedTraceId" not in root["metadata"]
    assert len(children) == 20
    for child in children:
        assert child["user_id"] is None
        assert child["attributes"]["langfuse.environment"] == "edge"


async def test_ignore_still_uses_your_own_identity_source(
    langfuse_capture: LangfuseCapture,
) -> None:
    app = traced_app("starlette", trust_incoming="ignore", user_id_from=lambda info: "authed")
    await call(app, "/items/1", headers=FORGED)
    assert langfuse_capture.single(name="GET /items/{item_id}")["user_id"] == "authed"


async def test_link_starts_a_new_trace_that_records_the_incoming_one(
    langfuse_capture: LangfuseCapture,
) -> None:
    await call(traced_app("starlette", trust_incoming="link"), "/items/1", headers=FORGED)
    root = langfuse_capture.single(name="GET /items/{item_id}")
    assert root["trace_id"] != VALID_TRACE_ID
    assert root["parent_span_id"] is None
    assert root["metadata"]["linkedTraceId"] == VALID_TRACE_ID
    assert root["metadata"]["linkedObservationId"] == VALID_PARENT_ID
    assert root["user_id"] is None  # baggage is not identity in link mode


@pytest.mark.parametrize(
    ("client", "trusted"), [("10.1.2.3", True), ("203.0.113.9", False), ("not-an-ip", False)]
)
async def test_trusted_networks_decide_who_may_assert_context_and_identity(
    langfuse_capture: LangfuseCapture, client: str, trusted: bool, monkeypatch: Any
) -> None:
    app = traced_app("starlette", trusted_networks=["10.0.0.0/8", "fd00::/8"])
    headers = [*FORGED, (b"x-user-id", b"header-user")]

    async def as_client(scope: Any, receive: Any, send: Any) -> None:
        scope["client"] = (client, 1234)
        await app(scope, receive, send)

    await call(as_client, "/items/1", headers=headers)
    root = langfuse_capture.single(name="GET /items/{item_id}")
    assert (root["trace_id"] == VALID_TRACE_ID) is trusted
    assert root["user_id"] == ("header-user" if trusted else None)


async def test_oversized_or_overfull_baggage_is_ignored_quietly(
    langfuse_capture: LangfuseCapture, caplog: Any
) -> None:
    huge = b"langfuse_user_id=admin," + b"k=" + b"v" * 9000
    many = b",".join(b"k%d=v" % i for i in range(181)) + b",langfuse_user_id=admin"
    bad_entries = b"langfuse_user_id=admin,\xff=\xfe,=novalue,lone"
    with caplog.at_level(logging.DEBUG):
        for value in (huge, many):
            await call(traced_app("starlette"), "/hello", headers=[(b"baggage", value)])
        await call(traced_app("starlette"), "/hello", headers=[(b"baggage", bad_entries)])
    roots = langfuse_capture.spans(name="GET /hello")
    assert [r["user_id"] for r in roots] == [None, None, "admin"]
    assert health()["rejected_inputs"]["baggage"] == 2
    # No header content in any log line, and one line per cause at most.
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "vvvv" not in logged and "novalue" not in logged and "k180" not in logged
    assert logged.count("ignored invalid input (baggage)") == 1


async def test_oversized_headers_from_case_24_are_ignored(
    langfuse_capture: LangfuseCapture, caplog: Any
) -> None:
    headers = [
        (b"baggage", b"a=" + b"b" * 9 * 1024),
        (b"traceparent", VALID_TRACEPARENT + b"-" + b"f" * 600),
        (b"x-user-id", b"u" * 4096),
    ]
    with caplog.at_level(logging.WARNING, logger="langfuse_mw"):
        for _ in range(5):
            await call(traced_app("starlette"), "/hello", headers=headers)
    for root in langfuse_capture.spans(name="GET /hello"):
        assert root["parent_span_id"] is None and root["user_id"] is None
    messages = [r.getMessage() for r in caplog.records]
    assert sorted(messages) == sorted(
        f"langfuse_mw: ignored invalid input ({cause})"
        for cause in ("baggage", "traceparent", "user_id")
    )


def test_ipv4_peers_of_a_dual_stack_listener_are_matched_as_ipv4() -> None:
    from langfuse_mw.propagation import TrustPolicy

    policy = TrustPolicy("continue", ("10.0.0.0/8",))
    assert policy.peer_trusted("::ffff:10.0.0.1") and policy.peer_trusted("10.1.2.3")
    assert not policy.peer_trusted("::ffff:8.8.8.8") and not policy.peer_trusted("::1")
