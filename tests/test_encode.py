"""Our OTLP encoder writes exactly what OpenTelemetry's encoder writes (decoded and compared)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from langfuse_mw import _failsafe, runtime
from langfuse_mw._encode import encode_request
from langfuse_mw.config import resolve_settings
from langfuse_mw.core import Observation
from langfuse_mw.export import SENT, Outcome
from langfuse_mw.testing import LangfuseCapture
from tests.asgi_driver import call
from tests.conftest import traced_app

pytestmark = pytest.mark.anyio


def ours(items: Sequence[Any]) -> ExportTraceServiceRequest:
    return ExportTraceServiceRequest.FromString(encode_request(items))


def theirs(spans: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
    return ExportTraceServiceRequest.FromString(encode_spans(spans).SerializeToString())


RESOURCE = Resource.create({"service.name": "svc", "langfuse.environment": "prod"})
SCOPE = InstrumentationScope("langfuse-sdk", "5.0.4", None, {"public_key": "pk"})


def make_span(attrs: dict[str, Any], **overrides: Any) -> ReadableSpan:
    fields: dict[str, Any] = {
        "name": "span",
        "context": SpanContext(0xABC, 0xDEF, False, TraceFlags(1), TraceState([("v", "1")])),
        "parent": SpanContext(0xABC, 0x123, True, TraceFlags(1)),
        "resource": RESOURCE,
        "attributes": attrs,
        "events": (Event("e", {"k": 1, "f": 1.5}, 5),),
        "links": (Link(SpanContext(0x1, 0x2, True, TraceFlags(1)), {"l": "x"}),),
        "kind": SpanKind.CLIENT,
        "instrumentation_scope": SCOPE,
        "status": Status(StatusCode.ERROR, "bad"),
        "start_time": 10,
        "end_time": 20,
    }
    fields.update(overrides)
    return ReadableSpan(**fields)


def test_sdk_spans_encode_identically() -> None:
    other_scope = InstrumentationScope("openinference.x", "1")
    spans = [
        make_span(
            {"a": "x", "n": -5, "big": 2**63 - 1, "ok": True, "pi": 3.14, "tags": ["a", "b"]}
        ),
        make_span({}, parent=None, events=(), links=(), status=Status(StatusCode.UNSET)),
        make_span({"u": "caf\u00e9 \u2603"}, instrumentation_scope=other_scope),
        make_span({"b": [True, False], "i": [1, 2], "f": [0.5]}, resource=Resource.get_empty()),
        make_span({"x": "y"}, instrumentation_scope=None, name="", start_time=0),
    ]
    assert ours(spans) == theirs(spans)


scalar = st.one_of(
    st.text(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
)
value = st.one_of(scalar, st.lists(st.text(), max_size=3), st.lists(st.integers(0, 10), max_size=3))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=20), value, max_size=8), st.text(max_size=30))
def test_any_attributes_encode_identically(attrs: dict[str, Any], name: str) -> None:
    spans = [make_span(attrs, name=name)]
    assert ours(spans) == theirs(spans)


class Keep:
    """A Sender that keeps the exported items themselves."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    def send(self, spans: Sequence[Any], timeout: float) -> Outcome:
        self.items.extend(spans)
        return SENT

    def reset(self) -> None:
        return None

    def close(self) -> None:
        return None


async def test_request_observations_encode_like_the_equivalent_sdk_span() -> None:
    runtime.shutdown(0.5)
    keep = Keep()
    settings = resolve_settings(
        {"public_key": "pk-enc", "secret_key": "sk-enc", "environment": "staging"}, environ={}
    )
    with runtime._lock:
        runtime._install(runtime.Runtime(settings, sender=keep))
    try:
        app = traced_app("starlette")
        await call(app, "/items/1", query=b"token=x", headers=[(b"x-user-id", b"u")])
        await call(app, "/boom")
        await call(
            app,
            "/stream",
            headers=[(b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")],
        )
        runtime.flush(5)
    finally:
        runtime.shutdown(1)
    observations = [i for i in keep.items if isinstance(i, Observation)]
    sdk_spans = [i for i in keep.items if isinstance(i, ReadableSpan)]
    assert len(observations) == 3 and len(sdk_spans) == 1
    as_sdk = [i.to_readable_span() if isinstance(i, Observation) else i for i in keep.items]
    assert ours(keep.items) == theirs(as_sdk)


def test_lone_surrogates_become_replacement_characters_not_invalid_utf8() -> None:
    # os.fsdecode of an undecodable file name, in an exception message: encoded as it is, it
    # makes invalid UTF-8 and the collector rejects the whole batch it is in.
    bad = os.fsdecode(b"report-\xff.csv")  # 'report-\udcff.csv'
    long_bad = bad * 40  # past the attribute cache's length limit: the other code path
    pair = "\ud83d\ude00"  # a pair written as two code points: one character
    span = make_span(
        {bad: bad, "long": long_bad, "pair": pair, "list": [bad]},
        name=f"GET {bad}",
        events=(Event(f"ev {bad}", {"m": bad}, 5),),
        status=Status(StatusCode.ERROR, f"RuntimeError: {bad}"),
        instrumentation_scope=InstrumentationScope(f"scope {bad}", "1"),
    )
    good = make_span({"a": "x"})
    # Protobuf's strict decoder refuses invalid UTF-8 in string fields, as the collector does.
    request = ours([good, span])
    decoded = request.resource_spans[0].scope_spans
    [first], [second] = (s.spans for s in decoded)
    assert first.attributes[0].value.string_value == "x"
    fixed = "report-\ufffd.csv"
    assert second.name == f"GET {fixed}"
    values = {kv.key: kv.value for kv in second.attributes}
    assert values[fixed].string_value == fixed
    assert values["long"].string_value == fixed * 40
    assert values["pair"].string_value == "\U0001f600"
    assert values["list"].array_value.values[0].string_value == fixed
    assert second.events[0].name == f"ev {fixed}"
    assert second.events[0].attributes[0].value.string_value == fixed
    assert second.status.message == f"RuntimeError: {fixed}"
    assert decoded[1].scope.name == f"scope {fixed}"
    assert _failsafe.rejected_inputs["unencodable_text"] >= 8


def test_integers_beyond_int64_are_text_not_wrapped() -> None:
    span = make_span({"huge": 2**64 + 5, "low": -(2**63) - 1, "edge": 2**63 - 1, "vast": 10**5000})
    values = {
        kv.key: kv.value for kv in ours([span]).resource_spans[0].scope_spans[0].spans[0].attributes
    }
    assert values["huge"].string_value == str(2**64 + 5)
    assert values["low"].string_value == str(-(2**63) - 1)
    assert values["edge"].int_value == 2**63 - 1
    # str() refuses ints past ~4 300 digits: described, not lost with its batch.
    assert values["vast"].string_value == f"<int of {(10**5000).bit_length()} bits>"
    assert _failsafe.rejected_inputs["int_out_of_range"] == 3


async def test_a_failed_request_weighs_its_exception_in_the_queue() -> None:
    # The queue's byte bound (RELIABILITY case 15) sees each record's approx_size(): a flood of
    # 500s, each with a stack trace of up to 8 kB, must weigh what it holds.
    runtime.shutdown(0.5)
    keep = Keep()
    settings = resolve_settings({"public_key": "pk-enc", "secret_key": "sk-enc"}, environ={})
    with runtime._lock:
        runtime._install(runtime.Runtime(settings, sender=keep))
    try:
        await call(traced_app("starlette"), "/boom")
        runtime.flush(5)
    finally:
        runtime.shutdown(1)
    [obs] = [i for i in keep.items if isinstance(i, Observation)]
    assert obs.error_event is not None
    stack = obs.error_event["exception.stacktrace"]
    assert len(stack) > 500
    assert obs.approx_size() >= 900 + len(stack)


def test_the_test_kit_leaves_out_an_unencodable_span_alone(
    langfuse_capture: LangfuseCapture,
) -> None:
    # As in production: the other spans of the batch still arrive.
    rt = runtime.current()
    assert rt is not None and rt.queue is not None
    rt.queue.emit(make_span({"odd": {"a set"}}, name="odd"))
    rt.queue.emit(make_span({"a": "x"}, name="fine"))
    assert [s["name"] for s in langfuse_capture.spans()] == ["fine"]
    assert rt.health()["dropped"] == {"encoding": 1}
