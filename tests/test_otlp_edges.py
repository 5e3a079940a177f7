"""The OTLP encoder against OpenTelemetry's, and the receiver against hostile bodies.

Encoder: our bytes decode, with OpenTelemetry's own classes, to exactly what OpenTelemetry's
encoder writes, for any span the SDK can hold. Receiver: hostile bodies get a 400/413 answer
and the server keeps serving; what Langfuse refuses, it refuses.
"""

from __future__ import annotations

import base64
import gzip
import json
import socket
import tracemalloc
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from langfuse_mw._encode import encode_request
from langfuse_mw.devserver import INGEST_PATH, DevServer
from langfuse_mw.devserver import ingest as ingest_module
from langfuse_mw.devserver import server as server_module

PK, SK = "pk-lf-review", "sk-lf-review"
AUTH = "Basic " + base64.b64encode(f"{PK}:{SK}".encode()).decode()
JSON_HEADERS = {"Authorization": AUTH, "Content-Type": "application/json"}
PARSE_ERROR = {"error": "Failed to parse OTel JSON Trace"}


# -- encoder: property-based comparison with OpenTelemetry's encoder ----------------------------


def _canonical(data: bytes) -> bytes:
    # Decoded with the official classes and written back deterministically: equal bytes mean
    # equal messages, NaN doubles included (message equality would call NaN != NaN).
    return ExportTraceServiceRequest.FromString(data).SerializeToString(deterministic=True)


_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
_scalar = st.one_of(
    st.none(),
    _text,
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(),  # NaN, infinities and -0.0 included
    st.binary(max_size=8),
)
# Mixed-type arrays and maps, nested: what an Observation's attributes may hold.
_value = st.recursive(
    _scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_text, inner, max_size=3)),
    max_leaves=6,
)
_attrs = st.dictionaries(_text, _value, max_size=5)
_trace_state = st.lists(
    st.tuples(st.from_regex(r"[a-z][a-z0-9_]{0,5}", fullmatch=True),
              st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True)),
    max_size=3,
    unique_by=lambda kv: kv[0],
)  # fmt: skip
_context = st.builds(
    lambda t, s, remote, state: SpanContext(t, s, remote, TraceFlags(1), TraceState(state)),
    st.integers(1, 2**128 - 1),
    st.integers(1, 2**64 - 1),
    st.booleans(),
    _trace_state,
)
_scope = st.one_of(
    st.none(),
    st.builds(
        InstrumentationScope,
        _text,
        st.one_of(st.none(), _text),
        st.one_of(st.none(), _text),
        st.dictionaries(_text, _text | st.integers(-3, 3), max_size=2),
    ),
)
_resource = st.builds(
    Resource, st.dictionaries(_text, _text | st.booleans(), max_size=3), st.one_of(st.none(), _text)
)


def _bounded(attrs: dict[str, Any], maxlen: int | None) -> Any:
    # BoundedAttributes gives the span a dropped-attributes count (an SDK over its limit).
    if maxlen is None:
        return attrs
    bounded = BoundedAttributes(maxlen=maxlen, immutable=False)
    for key, value in attrs.items():
        bounded[key] = value
    return bounded


@st.composite
def _spans(draw: Any) -> ReadableSpan:
    maxlen = draw(st.one_of(st.none(), st.integers(0, 2)))
    events = draw(st.lists(st.builds(Event, _text, _attrs, st.integers(0, 2**64 - 1)), max_size=3))
    max_events = draw(st.one_of(st.none(), st.integers(0, 2)))
    return ReadableSpan(
        name=draw(_text),
        context=draw(_context),
        parent=draw(st.one_of(st.none(), _context)),
        resource=draw(_resource),
        attributes=_bounded(draw(_attrs), maxlen),
        events=BoundedList.from_seq(max_events, events) if max_events is not None else events,
        links=draw(st.lists(st.builds(Link, _context, _attrs), max_size=2)),
        kind=draw(st.sampled_from(list(SpanKind))),
        instrumentation_scope=draw(_scope),
        status=Status(StatusCode.ERROR, draw(_text))
        if draw(st.booleans())
        else Status(draw(st.sampled_from([StatusCode.UNSET, StatusCode.OK]))),
        start_time=draw(st.integers(0, 2**64 - 1)),
        end_time=draw(st.integers(0, 2**64 - 1)),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(_spans(), min_size=1, max_size=3))
def test_any_sdk_span_encodes_like_opentelemetry(spans: Sequence[ReadableSpan]) -> None:
    # Nested mixed arrays and maps, bytes, None, NaN, events with dropped attributes, links,
    # trace state, every kind and status, dropped counts, resources, scopes and schema URLs.
    ours = _canonical(encode_request(spans))
    assert ours == _canonical(encode_spans(spans).SerializeToString())


@pytest.mark.parametrize("size", [127, 128, 16_383, 16_384, 2_097_152])
def test_long_non_bmp_strings_have_multi_byte_lengths_written_right(size: int) -> None:
    text = "\U0001f600" * (size // 4) + "x" * (size % 4)  # 4 UTF-8 bytes per emoji
    span = ReadableSpan(
        name=text,
        context=SpanContext(1, 2, False, TraceFlags(1), TraceState([("k", "v")])),
        attributes={"k": text, "list": [text, 1, text], "map": {"x": text}},
        events=(Event(text, {text: text}, 1),),
        status=Status(StatusCode.ERROR, text),
        resource=Resource({"r": text}),
        instrumentation_scope=InstrumentationScope("s", text, None, {"a": text}),
        start_time=1,
        end_time=2,
    )
    assert _canonical(encode_request([span])) == _canonical(
        encode_spans([span]).SerializeToString()
    )


# -- receiver: hostile bodies -------------------------------------------------------------------


@pytest.fixture
def srv() -> Iterator[DevServer]:
    with DevServer(port=0, db=":memory:", public_key=PK, secret_key=SK) as server:
        yield server


def _post(srv: DevServer, content: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(srv.url + INGEST_PATH, content=content,
                      headers=JSON_HEADERS if headers is None else headers, timeout=10)  # fmt: skip


def _batch(*spans: dict[str, Any]) -> bytes:
    scope_spans = [{"scope": {"name": "hand-rolled"}, "spans": list(spans)}]
    return json.dumps({"resourceSpans": [{"scopeSpans": scope_spans}]}).encode()


def _span(span_id: int, trace: str = "a" * 32, **fields: Any) -> dict[str, Any]:
    return {"traceId": trace, "spanId": f"{span_id:016x}", "name": f"s{span_id}",
            "startTimeUnixNano": str(10**18 + span_id * 1000),
            "endTimeUnixNano": str(10**18 + span_id * 1000 + 500), **fields}  # fmt: skip


def _still_serving(srv: DevServer) -> None:
    response = _post(srv, _batch(_span(1, trace="f" * 32)))
    assert (response.status_code, response.json()) == (200, {})


def _raw(srv: DevServer, head: str, tail: bytes = b"") -> bytes:
    """Send a hand-written request; return what the server answers before closing."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(head.encode() + tail)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    return received


def test_json_nested_past_the_recursion_limit_is_a_400_not_a_dropped_connection(
    srv: DevServer,
) -> None:
    response = _post(srv, b"[" * 100_000 + b"]" * 100_000)
    assert (response.status_code, response.json()) == (400, PARSE_ERROR)
    _still_serving(srv)


def test_a_deeply_nested_json_attribute_value_is_a_400_not_a_dropped_connection(
    srv: DevServer,
) -> None:
    def nested(depth: int) -> str:
        return '{"arrayValue": {"values": [' * depth + '{"stringValue": "x"}' + "]}}" * depth

    def batch(depth: int) -> bytes:
        span = (
            json.dumps(_span(1)).rstrip("}")
            + f', "attributes": [{{"key": "k", "value": {nested(depth)}}}]}}'
        )
        return f'{{"resourceSpans": [{{"scopeSpans": [{{"spans": [{span}]}}]}}]}}'.encode()

    response = _post(srv, batch(600))
    assert (response.status_code, response.json()) == (400, PARSE_ERROR)
    assert srv.store.trace_ids() == []
    # Ordinary nesting is read as before.
    assert _post(srv, batch(5)).status_code == 200
    [span] = srv.received_spans()
    value = span["attributes"]["k"]
    for _ in range(5):
        [value] = value
    assert value == "x"


@pytest.mark.parametrize(
    "value", [{"arrayValue": ["x"]}, {"kvlistValue": "x"}, {"arrayValue": None}]
)
def test_a_malformed_array_or_kvlist_value_does_not_drop_the_connection(
    srv: DevServer, value: dict[str, Any]
) -> None:
    # Langfuse only checks ids and the arrays of the span itself before answering 200.
    response = _post(srv, _batch(_span(1, attributes=[{"key": "k", "value": value}])))
    assert (response.status_code, response.json()) == (200, {})
    [span] = srv.received_spans()
    assert span["attributes"]["k"] in ([], {})
    _still_serving(srv)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_json_with_nan_or_infinity_literals_is_refused_as_json_parse_does(
    srv: DevServer, constant: str
) -> None:
    # Python's json.dumps writes these by default; Langfuse's JSON.parse refuses the batch.
    body = _batch(_span(1, attributes=[{"key": "k", "value": {"doubleValue": 0.5}}]))
    response = _post(srv, body.replace(b"0.5", constant.encode()))
    assert (response.status_code, response.json()) == (400, PARSE_ERROR)
    assert srv.store.trace_ids() == []


def test_a_gzip_bomb_is_a_413_without_expanding_it(
    srv: DevServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit = 4 * 1024 * 1024
    monkeypatch.setattr(ingest_module, "MAX_BODY", limit, raising=False)
    monkeypatch.setattr(server_module, "MAX_BODY", limit, raising=False)
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    megabyte = b" " * (1024 * 1024)
    bomb = b"".join(compressor.compress(megabyte) for _ in range(64)) + compressor.flush()
    assert len(bomb) < 100_000  # 64 MiB once gunzipped
    tracemalloc.start()
    try:
        response = _post(srv, bomb, {**JSON_HEADERS, "Content-Encoding": "gzip"})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response.status_code == 413
    assert peak < 4 * limit  # the bomb was cut at the limit, not expanded first
    # Multi-member gzip within the limit is still read whole.
    two = gzip.compress(_batch(_span(1))[:20]) + gzip.compress(_batch(_span(1))[20:])
    response = _post(srv, two, {**JSON_HEADERS, "Content-Encoding": "gzip"})
    assert (response.status_code, response.json()) == (200, {})


def test_a_content_length_over_the_limit_is_a_413(srv: DevServer) -> None:
    head = (
        f"POST {INGEST_PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {2**40}\r\n\r\n"
    )
    answer = _raw(srv, head)
    assert answer.startswith(b"HTTP/1.1 413")
    _still_serving(srv)


@pytest.mark.parametrize(("size", "status"), [("FFFFFFFFFFFF", b"413"), ("-1", b"400")])
def test_a_hostile_chunk_size_is_answered_not_allocated_or_waited_for(
    srv: DevServer, size: str, status: bytes
) -> None:
    # A chunk size of 256 TiB made the handler allocate it (MemoryError, no answer); -1 made
    # it read until the client closed.
    answer = _raw(
        srv,
        f"POST {INGEST_PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        f"{size}\r\n",
        b"abc",
    )
    assert answer.startswith(b"HTTP/1.1 " + status)
    _still_serving(srv)


def test_a_deeply_nested_json_string_input_is_stored_as_text(srv: DevServer) -> None:
    # A valid batch Langfuse accepts (it stores the raw string): it was a 500 here, and the
    # exporter retried it.
    deep = "[" * 5000 + "]" * 5000
    attributes = [{"key": "langfuse.observation.input", "value": {"stringValue": deep}}]
    response = _post(srv, _batch(_span(1, attributes=attributes)))
    assert (response.status_code, response.json()) == (200, {})
    trace = httpx.get(f"{srv.url}/api/public/traces/{'a' * 32}", auth=(PK, SK), timeout=10)
    assert trace.status_code == 200
    [observation] = trace.json()["observations"]
    assert observation["input"] == deep
    assert httpx.get(f"{srv.url}/trace/{'a' * 32}", timeout=10).status_code == 200


def test_the_viewer_shows_a_chain_of_observations_thousands_deep(srv: DevServer) -> None:
    chain = [_span(i, parentSpanId=f"{i - 1:016x}" if i > 1 else "") for i in range(1, 1501)]
    assert _post(srv, _batch(*chain)).status_code == 200
    page = httpx.get(f"{srv.url}/trace/{'a' * 32}", timeout=10)
    assert page.status_code == 200
    assert page.text.count('class="obs"') == 1500
    assert f'data-observation-id="{1500:016x}" data-depth="1499"' in page.text


def test_integral_doubles_read_as_javascript_numbers(srv: DevServer) -> None:
    # Langfuse reads attributes as JavaScript numbers: a double 42.0 is the user "42", and
    # a foreign span's metadata attribute 2.0 is "2" (the devserver said "42.0" and "2.0").
    attributes = [
        {"key": "user.id", "value": {"doubleValue": 42.0}},
        {"key": "http.duration", "value": {"doubleValue": 2.0}},
        {"key": "ratio", "value": {"doubleValue": 0.25}},
        {"key": "list", "value": {"arrayValue": {"values": [{"doubleValue": 1.0}]}}},
    ]
    assert _post(srv, _batch(_span(1, attributes=attributes))).status_code == 200
    trace = httpx.get(f"{srv.url}/api/public/traces/{'a' * 32}", auth=(PK, SK), timeout=10)
    body = trace.json()
    assert body["userId"] == "42"
    [observation] = body["observations"]
    foreign = observation["metadata"]["attributes"]
    assert (foreign["http.duration"], foreign["ratio"], foreign["list"]) == ("2", "0.25", "[1]")
