"""Decode OTLP/HTTP trace requests into plain dicts (used by the test kit and the devserver)."""

from __future__ import annotations

import gzip
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

__all__ = ["SpanDict", "any_value", "attributes", "decode_protobuf", "spans_from_request"]

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
