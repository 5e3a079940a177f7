"""The OTLP ingestion endpoint's contract, without HTTP: auth, decoding, validation, answers.

Mirrors Langfuse's ``processOtelIngestion`` and its auth (shared/LANGFUSE_OTEL.md §1), in the
same order of checks, so a client sees the same status and message for the same request.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from .._otlp import SpanDict, decode_protobuf, json_id, spans_from_json, spans_from_request

__all__ = ["MAX_BODY", "BodyTooLarge", "IngestResult", "check_auth", "ingest"]

MAX_INGESTION_VERSION = 4
# Largest body read or gunzipped. Far above the langfuse SDK's 64 MiB batches; it stops
# runaways and decompression bombs (a few hundred kB of gzip can expand to gigabytes).
MAX_BODY = 256 * 1024 * 1024
_LEADING_INT = re.compile(r"^\s*([+-]?\d+)")


@dataclass(frozen=True)
class IngestResult:
    """What the endpoint answers, and the spans it accepted (none unless ``status == 200``)."""

    status: int
    body: dict[str, Any]
    spans: list[SpanDict] = field(default_factory=list)


def check_auth(authorization: str | None, public_key: str, secret_key: str) -> str | None:
    """None when the Basic credentials match; otherwise Langfuse's 401 message."""
    if not authorization:
        return "No authorization header"
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "basic" or not token.strip():
        return "Invalid authorization header"
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return "Invalid authorization header"
    given_pk, sep, given_sk = decoded.partition(":")
    if not sep:
        return "Invalid authorization header"
    if (given_pk, given_sk) != (public_key, secret_key):
        return "Invalid credentials. Confirm that you've configured the correct host."
    return None


def _header(headers: Mapping[str, str], name: str) -> str | None:
    # Langfuse reads its own headers in hyphen and underscore spelling.
    return headers.get(name) or headers.get(name.replace("-", "_"))


def _error(status: int, message: str) -> IngestResult:
    return IngestResult(status, {"error": message})


class BodyTooLarge(ValueError):
    """A request body, as sent or once gunzipped, is larger than ``MAX_BODY``."""


def too_large() -> IngestResult:
    """The answer to a body over ``MAX_BODY`` (a proxy's 413: Langfuse itself has none)."""
    return _error(413, f"Request body larger than {MAX_BODY} bytes")


def _gunzip(body: bytes, limit: int) -> bytes:
    """``gzip.decompress`` (every member) that stops as soon as the output passes ``limit``."""
    out = bytearray()
    data = body
    while data:
        member = zlib.decompressobj(16 + zlib.MAX_WBITS)
        # max_length is what is left of the budget: a bomb is cut there, not expanded first.
        out += member.decompress(data, limit + 1 - len(out))
        if len(out) > limit:
            raise BodyTooLarge(f"more than {limit} bytes once gunzipped")
        if not member.eof:
            raise EOFError("truncated gzip member")
        data = member.unused_data.lstrip(b"\x00")  # zero padding between members, as gzip's
    return bytes(out)


def _refuse_constant(name: str) -> Any:
    # JSON.parse refuses NaN and Infinity; Python's json module would accept them.
    raise ValueError(f"{name} is not JSON")


def ingest(body: bytes, headers: Mapping[str, str]) -> IngestResult:
    """Decode and validate one OTLP/HTTP export; ``headers`` must have lower-case names."""
    if len(body) > MAX_BODY:
        return too_large()
    if "gzip" in (headers.get("content-encoding") or "").lower():
        try:
            body = _gunzip(body, MAX_BODY)
        except BodyTooLarge:
            return too_large()
        except (OSError, EOFError, zlib.error):
            return _error(400, "Failed to decompress request body")
    content_type = (headers.get("content-type") or "").lower()
    is_protobuf = "application/x-protobuf" in content_type
    is_json = "application/json" in content_type
    if not (is_protobuf or is_json):
        return _error(400, "Invalid content type")

    problems: _Problems
    if is_json:  # Langfuse parses JSON last, so it wins when both types are named
        try:
            payload = json.loads(
                body.decode("utf-8", errors="replace"), parse_constant=_refuse_constant
            )
        except (ValueError, RecursionError):  # RecursionError: hostile nesting
            return _error(400, "Failed to parse OTel JSON Trace")
        if payload is None:  # JSON.parse("null").resourceSpans throws
            return _error(400, "Failed to parse OTel JSON Trace")
        resource_spans = payload.get("resourceSpans") if isinstance(payload, dict) else None
        if not resource_spans:
            return IngestResult(200, {})
        problems = _validate_json(resource_spans)
        try:
            spans = spans_from_json(resource_spans)
        except ValueError:  # AnyValue nested past what the devserver reads
            return _error(400, "Failed to parse OTel JSON Trace")
    else:
        try:
            request = decode_protobuf(body)
        except Exception:  # protobuf's DecodeError, and anything else a bad body raises
            return _error(400, "Failed to parse OTel Protobuf Trace")
        if not request.resource_spans:
            return IngestResult(200, {})
        problems = _validate_protobuf(request)
        spans = spans_from_request(request)

    if problems.invalid_spans or problems.malformed_collections:
        return _error(400, problems.message())

    version = _header(headers, "x-langfuse-ingestion-version")
    if version:
        match = _LEADING_INT.match(version)  # JavaScript's parseInt
        if match is None or int(match.group(1)) > MAX_INGESTION_VERSION:
            return _error(
                400,
                f'Unsupported x-langfuse-ingestion-version: "{version}". '
                f'Maximum supported: "{MAX_INGESTION_VERSION}".',
            )
    return IngestResult(200, {}, spans)


# -- validation (validateOtelSpanIds) ---------------------------------------------------------


@dataclass
class _Problems:
    total_spans: int = 0
    invalid_spans: int = 0
    malformed_collections: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    scopes: list[str] = field(default_factory=list)

    def count(self, reason: str) -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def sample_scope(self, name: Any) -> None:
        if name and str(name) not in self.scopes and len(self.scopes) < 5:
            self.scopes.append(str(name))

    def message(self) -> str:
        found = []
        if self.invalid_spans:
            found.append(f"{self.invalid_spans} of {self.total_spans} span(s) cannot be processed")
        if self.malformed_collections:
            found.append(
                f"{self.malformed_collections} resource- or scope-level field(s) are present "
                "but not arrays"
            )
        hints = []
        if any(r.endswith((":absent", ":not_an_id")) for r in self.reasons):
            hints.append(
                "traceId and spanId are required on every span, and each must be a string or "
                "a byte array."
            )
        if any(r.endswith(":not_an_array") for r in self.reasons):
            hints.append(
                "scopeSpans, spans, attributes and events must all be arrays — OTLP attributes "
                "are a list of {key, value} entries, not a JSON object."
            )
        return (
            f"Invalid OTLP trace export: {'; '.join(found)} ({', '.join(self.reasons)}). "
            f"{' '.join(hints)} The entire export was rejected and no spans were ingested. "
            f"Instrumentation scopes: {', '.join(self.scopes) or 'unknown'}. "
            "This endpoint accepts OpenTelemetry traces only — if you are exporting "
            "OpenTelemetry logs, point your log exporter elsewhere."
        )


def _validate_protobuf(request: ExportTraceServiceRequest) -> _Problems:
    # Decoded protobuf always has arrays; an empty id is an absent one.
    problems = _Problems()
    for resource_spans in request.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                problems.total_spans += 1
                reasons = [
                    f"{name}:absent"
                    for name, value in (("traceId", span.trace_id), ("spanId", span.span_id))
                    if not value
                ]
                if reasons:
                    problems.invalid_spans += 1
                    for reason in reasons:
                        problems.count(reason)
                    problems.sample_scope(scope_spans.scope.name)
    return problems


def _id_reason(value: Any) -> str | None:
    if value is None:
        return "absent"
    return None if json_id(value) is not None else "not_an_id"


def _malformed_list(value: Any) -> bool:
    return value is not None and not isinstance(value, list)


def _validate_json(resource_spans: Any) -> _Problems:
    problems = _Problems()
    if not isinstance(resource_spans, list):
        return problems  # Langfuse queues it and its worker yields nothing: accepted, no spans
    for raw_resource_span in resource_spans:
        resource_span: dict[str, Any] = (
            raw_resource_span if isinstance(raw_resource_span, dict) else {}
        )
        resource = resource_span.get("resource")
        if isinstance(resource, dict) and _malformed_list(resource.get("attributes")):
            problems.malformed_collections += 1
            problems.count("resource.attributes:not_an_array")
        scope_spans = resource_span.get("scopeSpans")
        if not isinstance(scope_spans, list):
            if scope_spans is not None:
                problems.malformed_collections += 1
                problems.count("scopeSpans:not_an_array")
            continue
        for raw_scope_span in scope_spans:
            scope_span: dict[str, Any] = raw_scope_span if isinstance(raw_scope_span, dict) else {}
            raw_scope = scope_span.get("scope")
            scope: dict[str, Any] = raw_scope if isinstance(raw_scope, dict) else {}
            if _malformed_list(scope.get("attributes")):
                problems.malformed_collections += 1
                problems.count("scope.attributes:not_an_array")
                problems.sample_scope(scope.get("name"))
            spans = scope_span.get("spans")
            if not isinstance(spans, list):
                if spans is not None:
                    problems.malformed_collections += 1
                    problems.count("spans:not_an_array")
                    problems.sample_scope(scope.get("name"))
                continue
            for raw_span in spans:
                problems.total_spans += 1
                span: dict[str, Any] = raw_span if isinstance(raw_span, dict) else {}
                reasons = []
                for name in ("traceId", "spanId"):
                    reason = _id_reason(span.get(name))
                    if reason:
                        reasons.append(f"{name}:{reason}")
                # An absent parent is a root; only a present, unconvertible one is a defect.
                if span.get("parentSpanId") and _id_reason(span["parentSpanId"]):
                    reasons.append("parentSpanId:not_an_id")
                events = span.get("events")
                if _malformed_list(span.get("attributes")):
                    reasons.append("attributes:not_an_array")
                if _malformed_list(events):
                    reasons.append("events:not_an_array")
                elif isinstance(events, list) and any(
                    isinstance(e, dict) and _malformed_list(e.get("attributes")) for e in events
                ):
                    reasons.append("event.attributes:not_an_array")
                if reasons:
                    problems.invalid_spans += 1
                    for reason in reasons:
                        problems.count(reason)
                    problems.sample_scope(scope.get("name"))
    return problems
