"""Decode OTLP/HTTP trace requests into plain dicts (used by the test kit and the devserver),
and split one in two (the spool's answer to a 413)."""

from __future__ import annotations

import base64
import gzip
import json
from collections.abc import Mapping
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

__all__ = [
    "SpanDict",
    "any_value",
    "attributes",
    "decode_json",
    "decode_protobuf",
    "json_any_value",
    "json_attributes",
    "json_id",
    "spans_from_json",
    "spans_from_request",
    "split_request",
]

SpanDict = dict[str, Any]


def any_value(value: AnyValue) -> Any:
    """Return the Python value held by an OTLP ``AnyValue``."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    return getattr(value, kind)


def attributes(pairs: Any) -> dict[str, Any]:
    """Return OTLP key/value pairs as a dict."""
    return {kv.key: any_value(kv.value) for kv in pairs}


def decode_protobuf(body: bytes, *, gzipped: bool = False) -> ExportTraceServiceRequest:
    """Parse a (possibly gzip-compressed) protobuf ``ExportTraceServiceRequest``."""
    if gzipped:
        body = gzip.decompress(body)
    request: ExportTraceServiceRequest = ExportTraceServiceRequest.FromString(body)
    return request


def split_request(body: bytes) -> tuple[tuple[bytes, int], tuple[bytes, int]] | None:
    """An encoded ``ExportTraceServiceRequest`` as two, the first half of its spans and the
    rest, each with its span count and its spans' resource and scope; None for one span."""
    request = ExportTraceServiceRequest.FromString(body)
    total = sum(len(scope.spans) for rs in request.resource_spans for scope in rs.scope_spans)
    if total < 2:
        return None
    first = total // 2
    halves = (ExportTraceServiceRequest(), ExportTraceServiceRequest())
    seen = 0
    for rs in request.resource_spans:
        resources: dict[int, Any] = {}  # half -> this resource's entry in it
        for scope in rs.scope_spans:
            scopes: dict[int, Any] = {}
            for span in scope.spans:
                half = 0 if seen < first else 1
                seen += 1
                if half not in scopes:
                    if half not in resources:
                        resources[half] = halves[half].resource_spans.add(
                            resource=rs.resource, schema_url=rs.schema_url
                        )
                    scopes[half] = resources[half].scope_spans.add(
                        scope=scope.scope, schema_url=scope.schema_url
                    )
                scopes[half].spans.append(span)
    return (halves[0].SerializeToString(), first), (halves[1].SerializeToString(), total - first)


def spans_from_request(request: ExportTraceServiceRequest) -> list[SpanDict]:
    """Flatten a decoded request into one plain dict per span, ids as lower-case hex."""
    out: list[SpanDict] = []
    for resource_spans in request.resource_spans:
        resource = attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            scope = {
                "name": scope_spans.scope.name,
                "version": scope_spans.scope.version,
                "attributes": attributes(scope_spans.scope.attributes),
            }
            for span in scope_spans.spans:
                out.append(
                    {
                        "name": span.name,
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex() or None,
                        "kind": span.kind,
                        "start_time_unix_nano": span.start_time_unix_nano,
                        "end_time_unix_nano": span.end_time_unix_nano,
                        "attributes": attributes(span.attributes),
                        "status": {"code": span.status.code, "message": span.status.message},
                        "events": [
                            {
                                "name": event.name,
                                "time_unix_nano": event.time_unix_nano,
                                "attributes": attributes(event.attributes),
                            }
                            for event in span.events
                        ],
                        "resource": resource,
                        "scope": scope,
                    }
                )
    return out


# -- OTLP/JSON ------------------------------------------------------------------------------
# protobuf's json_format would read trace and span ids as base64, but OTLP/JSON carries them
# as hex strings, and Langfuse keeps a string id exactly as sent; so the JSON form is walked
# by hand into the same SpanDict shape as the protobuf one.


def json_id(value: Any) -> str | None:
    """A trace/span id from OTLP/JSON as Langfuse reads it: strings as given, byte arrays as hex.

    Returns None for anything Langfuse cannot convert (absent, a number, an object).
    """
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # Buffer.from(array): each element taken modulo 256
        return bytes(b & 0xFF if isinstance(b, int) and not isinstance(b, bool) else 0
                     for b in value).hex()  # fmt: skip
    if (
        isinstance(value, Mapping)
        and value.get("type") == "Buffer"
        and isinstance(value.get("data"), list)
    ):
        return json_id(value["data"])
    return None


# AnyValue nesting a JSON body may have: about what protobuf's decoder allows (it refuses a
# protobuf body nested deeper), and far from the recursion limit of the code that reads it.
MAX_JSON_DEPTH = 100


def json_any_value(value: Any, _depth: int = 0) -> Any:
    """Return the Python value held by an OTLP/JSON ``AnyValue`` object.

    A malformed ``arrayValue``/``kvlistValue`` (not an object) holds nothing; nesting deeper
    than ``MAX_JSON_DEPTH`` raises ``ValueError`` (the body is refused, not half-read).
    """
    if not isinstance(value, Mapping):
        return None
    if "stringValue" in value:
        return value["stringValue"]
    if "boolValue" in value:
        return value["boolValue"]
    if "intValue" in value:
        raw = value["intValue"]
        try:
            return int(raw)  # int64 travels as a decimal string in OTLP/JSON
        except (TypeError, ValueError):
            return raw
    if "doubleValue" in value:
        raw = value["doubleValue"]
        try:
            return float(raw)  # "NaN" and "Infinity" travel as strings
        except (TypeError, ValueError):
            return raw
    if "arrayValue" in value or "kvlistValue" in value:
        if _depth >= MAX_JSON_DEPTH:
            raise ValueError(f"AnyValue nested deeper than {MAX_JSON_DEPTH} levels")
        if "arrayValue" in value:
            values = _list(_dict(value["arrayValue"]).get("values"))
            return [json_any_value(v, _depth + 1) for v in values]
        return json_attributes(_dict(value["kvlistValue"]).get("values"), _depth + 1)
    if "bytesValue" in value:
        try:
            return base64.b64decode(value["bytesValue"])
        except (TypeError, ValueError):
            return value["bytesValue"]
    return None


def json_attributes(pairs: Any, _depth: int = 0) -> dict[str, Any]:
    """Return an OTLP/JSON ``[{"key", "value"}]`` list as a dict."""
    return {
        str(kv["key"]): json_any_value(kv.get("value"), _depth)
        for kv in _list(pairs)
        if isinstance(kv, Mapping) and "key" in kv
    }


def spans_from_json(resource_spans: Any) -> list[SpanDict]:
    """Flatten OTLP/JSON ``resourceSpans`` into the same dicts as :func:`spans_from_request`.

    Ids that are strings are kept as sent (not lower-cased), as Langfuse does; byte arrays
    become lower-case hex; an unconvertible id becomes ``""``. Validate first if that matters.
    """
    out: list[SpanDict] = []
    for resource_span in _list(resource_spans):
        if not isinstance(resource_span, Mapping):
            continue
        resource = json_attributes(_dict(resource_span.get("resource")).get("attributes"))
        for scope_span in _list(resource_span.get("scopeSpans")):
            raw_scope = _dict(_dict(scope_span).get("scope"))
            scope = {
                "name": str(raw_scope.get("name") or ""),
                "version": str(raw_scope.get("version") or ""),
                "attributes": json_attributes(raw_scope.get("attributes")),
            }
            for span in _list(_dict(scope_span).get("spans")):
                if not isinstance(span, Mapping):
                    continue
                status = _dict(span.get("status"))
                code = status.get("code")
                out.append(
                    {
                        "name": str(span.get("name") or ""),
                        "trace_id": json_id(span.get("traceId")) or "",
                        "span_id": json_id(span.get("spanId")) or "",
                        "parent_span_id": json_id(span.get("parentSpanId")) or None,
                        "kind": span.get("kind") if isinstance(span.get("kind"), int) else 0,
                        "start_time_unix_nano": _nanos(span.get("startTimeUnixNano")),
                        "end_time_unix_nano": _nanos(span.get("endTimeUnixNano")),
                        "attributes": json_attributes(span.get("attributes")),
                        "status": {
                            "code": code if isinstance(code, int) else 0,
                            "message": str(status.get("message") or ""),
                        },
                        "events": [
                            {
                                "name": str(_dict(event).get("name") or ""),
                                "time_unix_nano": _nanos(_dict(event).get("timeUnixNano")),
                                "attributes": json_attributes(_dict(event).get("attributes")),
                            }
                            for event in _list(span.get("events"))
                        ],
                        "resource": resource,
                        "scope": scope,
                    }
                )
    return out


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _dict(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _nanos(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


# JSON strings nested deeper than this are kept as text: stored and shown as they came,
# instead of failing the batch in the recursive code that writes them back out.
_MAX_DECODED_DEPTH = 200


def decode_json(value: Any) -> Any:
    """Langfuse stores raw strings and JSON-decodes them on read; other values pass through.

    A string nested deeper than the devserver can write back out is returned as it is.
    """
    if not isinstance(value, str):
        return value
    try:
        decoded = json.loads(value)
    except (ValueError, RecursionError):
        return value
    # Counting brackets is cheap and rules out deep nesting for nearly every value.
    if value.count("[") + value.count("{") > _MAX_DECODED_DEPTH and _deeper_than(
        decoded, _MAX_DECODED_DEPTH
    ):
        return value
    return decoded


def _deeper_than(value: Any, limit: int) -> bool:
    # Iterative: the point is to avoid recursion on hostile nesting.
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, list | dict):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False
