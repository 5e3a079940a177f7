"""The devserver maps spans to observations and traces by Langfuse's rules (LANGFUSE_OTEL.md)."""

from __future__ import annotations

from typing import Any

import pytest

from langfuse_mw._otlp import SpanDict
from langfuse_mw.devserver.mapping import (
    aggregate_trace,
    extract_environment,
    extract_level,
    extract_observation_type,
    normalize_environment,
    observation_from_span,
)

TRACE = "0af7651916cd43dd8448eb211c80319c"
SDK_SCOPE = {"name": "langfuse-sdk", "version": "5.0.4", "attributes": {"public_key": "pk"}}


def span(
    span_id: str = "b7ad6b7169203331",
    parent: str | None = None,
    name: str = "op",
    start: int = 1_700_000_000_000_000_000,
    end: int | None = None,
    status_code: int = 0,
    status_message: str = "",
    resource: dict[str, Any] | None = None,
    scope: dict[str, Any] | None = None,
) -> SpanDict:
    """A decoded span as ``_otlp`` produces it, without attributes."""
    return {
        "name": name,
        "trace_id": TRACE,
        "span_id": span_id,
        "parent_span_id": parent,
        "kind": 1,
        "start_time_unix_nano": start,
        "end_time_unix_nano": end if end is not None else start + 5_000_000,
        "attributes": {},
        "status": {"code": status_code, "message": status_message},
        "events": [],
        "resource": resource or {"service.name": "svc"},
        "scope": scope or SDK_SCOPE,
    }


def with_attrs(attributes: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    s = span(**kwargs)
    s["attributes"] = attributes
    return observation_from_span(s)


# -- observations -----------------------------------------------------------------------------


def test_identity_and_times() -> None:
    o = with_attrs({}, span_id="00f067aa0ba902b7", parent="53995c3f42cd8ad8",
                   start=1_700_000_000_123_456_789, end=1_700_000_001_000_000_000)  # fmt: skip
    assert (o["id"], o["traceId"], o["parentObservationId"]) == (
        "00f067aa0ba902b7",
        TRACE,
        "53995c3f42cd8ad8",
    )
    assert o["startTime"] == "2023-11-14T22:13:20.123Z"
    assert o["endTime"] == "2023-11-14T22:13:21.000Z"


def test_a_missing_end_time_copies_the_start() -> None:
    o = with_attrs({}, start=1_700_000_000_000_000_000, end=0)
    assert o["endTime"] == o["startTime"]


@pytest.mark.parametrize(
    ("attributes", "expected"),
    [
        ({}, "op"),
        ({"gen_ai.tool.name": "search", "logfire.msg": "m"}, "search"),
        ({"logfire.msg": "running agent"}, "running agent"),
        ({"ai.operationId": "ai.generateText", "ai.telemetry.functionId": "fn"},
         "fn:ai.generateText"),
        ({"http.route": "/items/{id}"}, "op"),  # HTTP conventions are not read
    ],
)  # fmt: skip
def test_name_follows_extract_name(attributes: dict[str, Any], expected: str) -> None:
    assert with_attrs(attributes)["name"] == expected


@pytest.mark.parametrize(
    ("attributes", "expected"),
    [
        ({}, "SPAN"),
        ({"langfuse.observation.type": "generation"}, "GENERATION"),
        ({"langfuse.observation.type": "tool"}, "TOOL"),
        ({"langfuse.observation.type": "bogus", "model": "m"}, "GENERATION"),  # falls through
        ({"openinference.span.kind": "LLM"}, "GENERATION"),
        ({"gen_ai.operation.name": "embeddings"}, "EMBEDDING"),
        ({"gen_ai.operation.name": "execute_tool"}, "TOOL"),
        ({"gen_ai.tool.name": "search"}, "TOOL"),
        ({"model": "anything"}, "GENERATION"),  # the foreign-span gotcha
        ({"langfuse.observation.type": "agent", "model": "m"}, "AGENT"),
    ],
)
def test_observation_type_priority(attributes: dict[str, Any], expected: str) -> None:
    assert extract_observation_type(attributes, {}, SDK_SCOPE, "op") == expected


@pytest.mark.parametrize(
    ("level", "status", "expected"),
    [
        (None, 0, "DEFAULT"),
        (None, 2, "ERROR"),
        ("warn", 0, "WARNING"),
        (" Trace ", 0, "DEBUG"),
        ("INFO", 2, "DEFAULT"),  # an explicit level beats the ERROR status
        ("ok", 2, "DEFAULT"),
        ("fatal", 0, "ERROR"),
        ("CRITICAL", 0, "ERROR"),
        ("nonsense", 2, "ERROR"),  # an unknown alias falls back to the status
        ("nonsense", 0, "DEFAULT"),
    ],
)
def test_level_aliases_and_explicit_level_beats_status(
    level: str | None, status: int, expected: str
) -> None:
    attributes = {} if level is None else {"langfuse.observation.level": level}
    assert extract_level(attributes, status) == expected
    assert with_attrs(attributes, status_code=status)["level"] == expected


def test_status_message_prefers_the_langfuse_attribute() -> None:
    assert with_attrs({}, status_code=2, status_message="boom")["statusMessage"] == "boom"
    explicit = {"langfuse.observation.status_message": "mine"}
    assert with_attrs(explicit, status_code=2, status_message="boom")["statusMessage"] == "mine"


def test_input_output_are_json_decoded_when_possible() -> None:
    o = with_attrs({"langfuse.observation.input": '{"a": [1, 2]}',
                    "langfuse.observation.output": "plain text"})  # fmt: skip
    assert o["input"] == {"a": [1, 2]}
    assert o["output"] == "plain text"


def test_foreign_input_keys_become_input_output() -> None:
    o = with_attrs({"input.value": '"q"', "output.value": "a"}, scope={"name": "x"})
    assert (o["input"], o["output"]) == ("q", "a")


def test_metadata_for_a_langfuse_sdk_span() -> None:
    o = with_attrs(
        {
            "langfuse.observation.metadata.requestId": '"req-1"',
            "langfuse.observation.metadata.count": "3",
            "langfuse.trace.metadata.tenant": '{"id": 7}',
            "langfuse.observation.metadata": '{"whole": true}',
            "langfuse.observation.input": "{}",
            "user.id": "u",
        }
    )
    meta = o["metadata"]
    assert "attributes" not in meta  # langfuse-sdk scope: no raw attributes
    assert meta["requestId"] == "req-1"  # JSON-encoded values are decoded on read
    assert meta["count"] == 3
    assert meta["tenant"] == {"id": 7}
    assert meta["whole"] is True
    assert meta["resourceAttributes"] == {"service.name": "svc"}
    assert meta["scope"] == SDK_SCOPE


def test_metadata_of_a_foreign_span_keeps_its_attributes_as_strings() -> None:
    o = with_attrs(
        {"http.method": "GET", "http.status_code": 200, "input": "x", "flags": [1, 2]},
        scope={"name": "opentelemetry.instrumentation.asgi", "version": "0.1", "attributes": {}},
    )
    assert o["metadata"]["attributes"] == {
        "http.method": "GET",
        "http.status_code": "200",
        "flags": "[1,2]",
    }  # `input` was used as input, so it is not repeated
    assert o["input"] == "x"


def test_non_object_metadata_is_dropped() -> None:
    o = with_attrs({"langfuse.observation.metadata": '"just a string"'})
    assert set(o["metadata"]) == {"resourceAttributes", "scope"}


@pytest.mark.parametrize(
    ("attributes", "user", "session"),
    [
        ({"user.id": "u1", "session.id": "s1"}, "u1", "s1"),
        ({"langfuse.user.id": "lu", "user.id": "u1"}, "lu", None),
        ({"langfuse.session.id": "ls", "session.id": "s1"}, None, "ls"),
        ({"gen_ai.conversation.id": "conv"}, None, "conv"),
        ({"langfuse.observation.metadata.langfuse_user_id": "mu",
          "langfuse.trace.metadata.langfuse_session_id": "ms"}, "mu", "ms"),
        ({"ai.telemetry.metadata.userId": "ai-u", "ai.telemetry.metadata.sessionId": "ai-s"},
         "ai-u", "ai-s"),
        ({"user.id": 42}, "42", None),  # non-strings are JSON-stringified
        ({"user.id": "", "langfuse.trace.metadata.langfuse_user_id": "fallback"},
         "fallback", None),  # the first truthy wins
    ],
)  # fmt: skip
def test_user_and_session_fallbacks(
    attributes: dict[str, Any], user: str | None, session: str | None
) -> None:
    o = with_attrs(attributes)
    assert (o["userId"], o["sessionId"]) == (user, session)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (["a", "b"], ["a", "b"]),
        ('["x", 1]', ["x", "1"]),
        ("a, b,c", ["a", "b", "c"]),
        ("solo", ["solo"]),
    ],
)
def test_tags(value: Any, expected: list[str]) -> None:
    assert with_attrs({"langfuse.trace.tags": value})["tags"] == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Production", "production"),
        ("langfuse-prod", "prod"),
        ("langfuselangfuse_x", "x"),
        ("has space", "default"),
        ("langfuse", "default"),
        ("a" * 50, "a" * 40),  # truncated, not rejected
        (7, "default"),
    ],
)
def test_environment_normalisation(value: Any, expected: str) -> None:
    assert normalize_environment(value) == expected


def test_environment_span_then_resource_per_key() -> None:
    assert extract_environment({}, {"langfuse.environment": "staging"}) == "staging"
    assert extract_environment({"langfuse.environment": "dev"},
                               {"langfuse.environment": "staging"}) == "dev"  # fmt: skip
    # The resource's langfuse.environment beats the span's deployment.environment.
    assert extract_environment({"deployment.environment": "qa"},
                               {"langfuse.environment": "staging"}) == "staging"  # fmt: skip
    assert extract_environment({}, {"deployment.environment.name": "Prod"}) == "prod"
    assert extract_environment({}, {}) == "default"


def test_release_and_version_span_then_resource() -> None:
    o = with_attrs({}, resource={"langfuse.release": "r1", "service.version": "1.2"})
    assert (o["release"], o["version"]) == ("r1", "1.2")
    o = with_attrs({"langfuse.release": "r2", "langfuse.version": "v9"},
                   resource={"langfuse.release": "r1", "service.version": "1.2"})  # fmt: skip
    assert (o["release"], o["version"]) == ("r2", "v9")


def test_model_and_usage() -> None:
    o = with_attrs({"gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 10,
                    "gen_ai.usage.output_tokens": 5})  # fmt: skip
    assert o["type"] == "GENERATION" and o["model"] == "gpt-4o"
    assert o["usageDetails"] == {"input": 10, "output": 5}
    o = with_attrs({"langfuse.observation.model.name": "m",
                    "langfuse.observation.usage_details": '{"input": 1}'})  # fmt: skip
    assert o["usageDetails"] == {"input": 1}


# -- traces -----------------------------------------------------------------------------------


def trace_of(*spans: SpanDict) -> dict[str, Any]:
    return aggregate_trace(TRACE, [observation_from_span(s) for s in spans])


def root_and_child(root_attrs: dict[str, Any], child_attrs: dict[str, Any],
                   root_parent: str | None = None) -> tuple[SpanDict, SpanDict]:  # fmt: skip
    root = span("1111111111111111", parent=root_parent, name="root")
    root["attributes"] = root_attrs
    child = span("2222222222222222", parent="1111111111111111", name="child")
    child["attributes"] = child_attrs
    return root, child


def test_trace_name_is_the_latest_non_empty_trace_name() -> None:
    root, child = root_and_child({"langfuse.trace.name": "first"},
                                 {"langfuse.trace.name": "second"})  # fmt: skip
    assert trace_of(root, child)["name"] == "second"
    assert trace_of(child, root)["name"] == "first"  # "latest" is the last ingested
    root, child = root_and_child({"langfuse.trace.name": "named"}, {"langfuse.trace.name": ""})
    assert trace_of(root, child)["name"] == "named"


def test_trace_name_falls_back_to_the_root_observation() -> None:
    root, child = root_and_child({}, {})
    assert trace_of(root, child)["name"] == "root"
    assert trace_of(child)["name"] is None  # no root received: no name


def test_app_root_names_the_trace_but_gives_no_input() -> None:
    # A root whose parent lives in another service (remote traceparent), marked app root.
    root, child = root_and_child(
        {"langfuse.internal.is_app_root": True, "langfuse.observation.input": '{"a": 1}'},
        {},
        root_parent="9999999999999999",
    )
    trace = trace_of(root, child)
    assert trace["name"] == "root"
    assert trace["input"] is None and trace["metadata"] is None  # parentless only
    root["attributes"]["langfuse.internal.is_app_root"] = "false"
    assert trace_of(root, child)["name"] is None


def test_trace_input_output_metadata_come_from_the_parentless_observation() -> None:
    root, child = root_and_child(
        {"langfuse.observation.input": '{"q": 1}', "langfuse.observation.output": '"done"',
         "langfuse.observation.metadata.requestId": '"r-1"'},
        {"langfuse.observation.input": '"child input"',
         "langfuse.observation.metadata.other": '"x"'},
    )  # fmt: skip
    trace = trace_of(child, root)
    assert trace["input"] == {"q": 1} and trace["output"] == "done"
    assert trace["metadata"]["requestId"] == "r-1" and "other" not in trace["metadata"]


def test_trace_attributes_latest_non_empty_and_public_max() -> None:
    root, child = root_and_child(
        {"user.id": "u1", "session.id": "s1", "langfuse.trace.tags": ["t1"],
         "langfuse.trace.public": True, "langfuse.release": "r1"},
        {"user.id": "u2", "langfuse.trace.public": "false", "langfuse.environment": "prod"},
    )  # fmt: skip
    trace = trace_of(root, child)
    assert trace["userId"] == "u2"
    assert trace["sessionId"] == "s1"
    assert trace["tags"] == ["t1"]
    assert trace["public"] is True
    assert trace["release"] == "r1"
    assert trace["environment"] == "prod"


def test_trace_level_summary_and_latency() -> None:
    root = span("1111111111111111", start=1_000_000_000, end=3_000_000_000)
    child = span("2222222222222222", parent="1111111111111111", start=1_500_000_000,
                 end=2_000_000_000, status_code=2)  # fmt: skip
    trace = trace_of(root, child)
    assert trace["level"] == "ERROR" and trace["errorCount"] == 1
    assert trace["latency"] == 2.0
    assert trace["timestamp"] == "1970-01-01T00:00:01.000Z"
