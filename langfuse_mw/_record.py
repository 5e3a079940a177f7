"""What the request's observation and outbound calls share: being exported as OTLP spans."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any, ClassVar

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode

from . import _encode
from .headers import truncate

__all__ = ["SpanRecord", "add_identity", "error_message", "exception_attributes"]

# Attribute names Langfuse reads for every observation (shared/LANGFUSE_OTEL.md).
A_USER = "user.id"
A_SESSION = "session.id"
A_ENVIRONMENT = "langfuse.environment"

MAX_MESSAGE = 1024
MAX_STACKTRACE = 8192


class SpanRecord:
    """A finished observation that the export thread encodes without an SDK span.

    Subclasses set the slots below and implement ``fields()`` (name, attributes, OTel status
    code and message); attribute building then happens on the export thread, not the
    request's.
    """

    __slots__ = ()
    KIND: ClassVar[SpanKind] = SpanKind.INTERNAL

    span_context: SpanContext
    parent: SpanContext | None
    start_ns: int
    end_ns: int
    error_event: dict[str, str] | None
    resource: Resource
    scope: InstrumentationScope

    def fields(self) -> tuple[str, dict[str, Any], int, str | None]:
        raise NotImplementedError

    def approx_size(self) -> int:
        """Roughly the encoded size, for the export queue's byte bound."""
        event = getattr(self, "error_event", None)
        return 1024 + (sum(len(value) for value in event.values()) if event is not None else 0)

    def is_error(self) -> bool:
        """Whether this records a failure (the queue keeps those first)."""
        status = getattr(self, "status", None)
        return getattr(self, "error", None) is not None or (status is not None and status >= 500)

    def encode_span(self) -> bytes:
        """This record as an OTLP ``Span`` message body."""
        name, attrs, code, message = self.fields()
        ctx, parent = self.span_context, self.parent
        head, flags = _encode.span_header(
            ctx.trace_id,
            ctx.span_id,
            ",".join(f"{k}={v}" for k, v in ctx.trace_state.items()),
            parent.span_id if parent is not None else None,
            parent is not None and parent.is_remote,
            name,
            self.KIND.value,
            self.start_ns,
            self.end_ns,
        )
        body = [head, _encode.attributes(b"\x4a", attrs.items())]
        if self.error_event is not None:
            event = _encode.event("exception", self.end_ns, self.error_event)
            body.append(_encode.field(b"\x5a", event))
        body.append(_encode.status(code, message))
        body.append(flags)
        return b"".join(body)

    def to_readable_span(self) -> ReadableSpan:
        """This record as an OpenTelemetry SDK span (what the langfuse SDK would export)."""
        name, attrs, code, message = self.fields()
        events: tuple[Event, ...] = ()
        if self.error_event is not None:
            events = (Event("exception", self.error_event, self.end_ns),)
        return ReadableSpan(
            name=name,
            context=self.span_context,
            parent=self.parent,
            resource=self.resource,
            attributes=attrs,
            events=events,
            kind=self.KIND,
            instrumentation_scope=self.scope,
            status=Status(StatusCode(code), message),
            start_time=self.start_ns,
            end_time=self.end_ns,
        )


def add_identity(
    attrs: dict[str, Any], user_id: str | None, session_id: str | None, environment: str | None
) -> None:
    """Add the user, session and environment attributes Langfuse reads, those that are set."""
    if user_id is not None:
        attrs[A_USER] = user_id
    if session_id is not None:
        attrs[A_SESSION] = session_id
    if environment:
        attrs[A_ENVIRONMENT] = environment


def error_message(exc: BaseException, clean: Callable[[str], str] | None = None) -> str:
    """``Type: message`` for the observation's status, cut to size; never raises (an
    exception without a message, or whose ``str()`` fails, gives its type alone)."""
    try:
        text = str(exc)
        message = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    except Exception:
        message = type(exc).__name__
    return truncate(clean(message) if clean is not None else message, MAX_MESSAGE)


def exception_attributes(
    exc: BaseException, clean: Callable[[str], str] | None = None
) -> dict[str, str]:
    """The OTel ``exception`` event's attributes (Langfuse ignores it; other consumers read it).

    ``clean`` rewrites the message and the stack trace before they are cut to size.
    """
    try:
        message = str(exc)
    except Exception:  # an exception whose __str__ fails
        message = ""
    stack = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if clean is not None:
        message, stack = clean(message), clean(stack)
    return {
        "exception.type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "exception.message": truncate(message, MAX_MESSAGE),
        "exception.stacktrace": truncate(stack, MAX_STACKTRACE),
        "exception.escaped": "True",
    }
