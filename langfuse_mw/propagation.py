"""Incoming W3C trace context and baggage, read through OpenTelemetry's propagators.

Parsing is the propagators' job; this module adds what the W3C specs require and they do not
enforce (a repeated ``traceparent`` is invalid; a ``tracestate`` is passed on with at most 512
characters, whole entries cut as Trace Context says; baggage over 8192 bytes or 180 members is
ignored whole rather than truncated), keeps header content out of the logs, and applies the
trust policy: ``continue``, ``link`` or ``ignore``.
"""

from __future__ import annotations

import contextvars
import ipaddress
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from opentelemetry import baggage as otel_baggage
from opentelemetry import trace as otel_trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.trace import DEFAULT_TRACE_STATE, SpanContext, TraceFlags, TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from . import _failsafe

__all__ = ["Incoming", "TrustPolicy", "baggage_entries", "plain_parent", "read_incoming"]

MAX_TRACEPARENT = 512
# W3C Trace Context, "tracestate Limits": vendors SHOULD propagate at least 512 characters of
# the combined header; to cut, whole entries go, those over 128 characters first, then from
# the end. We pass on at most that much.
MAX_TRACESTATE = 512
MAX_TRACESTATE_ENTRY = 128
MAX_TRACESTATE_MEMBERS = 32
MAX_TRACESTATE_HEADER = 8192  # OpenTelemetry's propagator ignores a longer one whole
MAX_BAGGAGE_BYTES = 8192
MAX_BAGGAGE_MEMBERS = 180
LANGFUSE_PREFIX = "langfuse_"
TRACE_ID_CLAIM = "langfuse_trace_id"

_tracecontext = TraceContextTextMapPropagator()
_baggage = W3CBaggagePropagator()
_T = TypeVar("_T")
_quiet: contextvars.ContextVar[bool] = contextvars.ContextVar("langfuse_mw_quiet", default=False)


class _QuietWhileReading(logging.Filter):
    # OpenTelemetry's baggage propagator logs rejected entries verbatim; header content from the
    # internet must not reach the logs, so its records are dropped while we parse (and only
    # then: other users of the propagator keep their warnings).
    def filter(self, record: logging.LogRecord) -> bool:
        return not _quiet.get()


# The baggage propagator, and TraceState (tracestate members it rejects).
for _name in ("opentelemetry.baggage.propagation", "opentelemetry.trace.span"):
    logging.getLogger(_name).addFilter(_QuietWhileReading())


def _quietly(fn: Callable[..., _T], *args: Any) -> _T:
    # Call OpenTelemetry's parsers with their rejection logs dropped (_QuietWhileReading).
    token = _quiet.set(True)
    try:
        return fn(*args)
    finally:
        _quiet.reset(token)


@dataclass(slots=True)
class Incoming:
    """What the caller sent that we accepted."""

    parent: SpanContext | None = None  # "continue": the remote parent span
    linked: SpanContext | None = None  # "link": the caller's span, recorded but not joined
    baggage: dict[str, str] = field(default_factory=dict)

    @property
    def user_id(self) -> str | None:
        return self.baggage.get("langfuse_user_id")

    @property
    def session_id(self) -> str | None:
        return self.baggage.get("langfuse_session_id")

    def claims(self, trace_id: int) -> bool:
        """True when the caller's langfuse SDK says it exports this trace's root."""
        claim = self.baggage.get(TRACE_ID_CLAIM)
        return claim is not None and claim.lower() == f"{trace_id:032x}"

    def forwardable(self) -> dict[str, str]:
        """Entries to pass on downstream: everything but langfuse's own, which we set."""
        return {k: v for k, v in self.baggage.items() if not k.startswith(LANGFUSE_PREFIX)}


NOTHING = Incoming()


class TrustPolicy:
    """``continue`` / ``link`` / ``ignore``, optionally only for peers in trusted networks."""

    def __init__(self, mode: str, networks: Sequence[str] = ()) -> None:
        self.mode = mode
        self.networks = tuple(ipaddress.ip_network(n, strict=False) for n in networks)

    def peer_trusted(self, client_ip: str | None) -> bool:
        """True without trusted networks, else only for peers inside one of them.

        Applies to trace context, baggage and identity headers alike: all are assertions
        a client can forge.
        """
        if not self.networks:
            return True
        try:
            address = ipaddress.ip_address(client_ip or "")
        except ValueError:
            return False
        # A dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d.
        mapped = getattr(address, "ipv4_mapped", None)
        return any(
            address in net or (mapped is not None and mapped in net) for net in self.networks
        )

    def mode_for(self, client_ip: str | None) -> str:
        """The mode for one peer: ``ignore`` for peers outside the trusted networks."""
        return self.mode if self.peer_trusted(client_ip) else "ignore"


def read_incoming(headers: Mapping[str, str], mode: str) -> Incoming:
    """Parse ``traceparent``/``tracestate``/``baggage`` under ``mode``; never raises."""
    if mode == "ignore" or ("traceparent" not in headers and "baggage" not in headers):
        return NOTHING
    parent = _parent(headers)
    entries = baggage_entries(headers.get("baggage")) if mode == "continue" else {}
    if mode == "link":
        return Incoming(linked=parent)
    return Incoming(parent=parent, baggage=entries)


def _parent(headers: Mapping[str, str]) -> SpanContext | None:
    traceparent = headers.get("traceparent")
    if traceparent is None:
        return None
    # Adapters join a repeated header with ","; W3C Trace Context makes that invalid.
    if len(traceparent) > MAX_TRACEPARENT or "," in traceparent:
        _failsafe.reject("traceparent")
        return None
    fast = plain_parent(traceparent, headers.get("tracestate"))
    return fast if fast is not None else _propagator_parent(traceparent, headers)


# Version 00, as nearly every caller sends it; the propagator (regex, context, span object)
# costs ~7 µs where this costs ~1. It accepts only what the propagator accepts identically
# and leaves everything else (other versions, whitespace, zero ids) to it.
_PLAIN_TRACEPARENT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_FLAGS = tuple(TraceFlags(flags) for flags in range(256))


def plain_parent(traceparent: str, tracestate: str | None) -> SpanContext | None:
    """The caller's span from a plain version-00 ``traceparent``; None for anything else."""
    match = _PLAIN_TRACEPARENT.fullmatch(traceparent)
    if match is None:
        return None
    trace_id, span_id = int(traceparent[3:35], 16), int(traceparent[36:52], 16)
    if not (trace_id and span_id):
        return None
    state = DEFAULT_TRACE_STATE if tracestate is None else _trace_state(tracestate)
    # SpanContext(...) would check again what the pattern checked; this is the same tuple:
    # (trace_id, span_id, is_remote, flags, state, is_valid).
    values = (trace_id, span_id, True, _FLAGS[int(traceparent[53:], 16)], state, True)
    return tuple.__new__(SpanContext, values)


def _trace_state(tracestate: str) -> TraceState:
    if len(tracestate) <= MAX_TRACESTATE:  # nearly every header: fits as it came
        return _quietly(TraceState.from_header, [tracestate])
    return _long_trace_state(tracestate)


# A list member: from its first character that is not whitespace up to the next comma.
_TRACESTATE_MEMBER = re.compile(r"[^, \t][^,]*")


def _long_trace_state(tracestate: str) -> TraceState:
    if len(tracestate) > MAX_TRACESTATE_HEADER:
        return DEFAULT_TRACE_STATE
    # OpenTelemetry's parser runs Python code for every comma-separated piece, empty or not
    # (~1 ms for 8 kB of short members); one scan in C finds the members, and a 33rd makes
    # the list invalid (as OpenTelemetry rules) before any of them is parsed.
    members: list[str] = []
    for match in _TRACESTATE_MEMBER.finditer(tracestate):
        if len(members) == MAX_TRACESTATE_MEMBERS:
            return DEFAULT_TRACE_STATE
        members.append(match[0])
    state = _quietly(TraceState.from_header, [",".join(members)])
    pairs = list(state.items())
    sizes = [len(key) + 1 + len(value) for key, value in pairs]
    excess = sum(sizes) + len(sizes) - 1 - MAX_TRACESTATE  # with the commas between
    if excess <= 0:
        return state  # the header's own whitespace and empty members made it long
    kept = [True] * len(pairs)
    for large_only in (True, False):  # entries over 128 characters first, then any
        for index in reversed(range(len(pairs))):  # each time from the end
            if excess <= 0:
                break
            if kept[index] and (sizes[index] > MAX_TRACESTATE_ENTRY or not large_only):
                kept[index] = False
                excess -= sizes[index] + 1
    return TraceState([pair for pair, keep in zip(pairs, kept, strict=True) if keep])


def _propagator_parent(traceparent: str, headers: Mapping[str, str]) -> SpanContext | None:
    carrier = {"traceparent": traceparent}
    parent = otel_trace.get_current_span(_quietly(_tracecontext.extract, carrier, Context()))
    span_context = parent.get_span_context()
    if not span_context.is_valid:
        _failsafe.reject("traceparent")
        return None
    tracestate = headers.get("tracestate")
    if tracestate is None:
        return span_context
    # The tracestate is read as with a plain traceparent (the propagator's own reading is
    # the same up to 512 characters, and does not cut a longer one).
    return SpanContext(
        span_context.trace_id, span_context.span_id, True, span_context.trace_flags,
        _trace_state(tracestate),
    )  # fmt: skip


def baggage_entries(raw: str | None) -> dict[str, str]:
    """The entries of a ``baggage`` header; {} when absent or over the W3C limits."""
    if not raw:
        return {}
    if len(raw.encode("latin-1", "replace")) > MAX_BAGGAGE_BYTES or raw.count(",") >= (
        MAX_BAGGAGE_MEMBERS
    ):
        _failsafe.reject("baggage")
        return {}
    plain = _plain_baggage(raw)
    return plain if plain is not None else _propagator_baggage(raw)


# Members of plain key=value form (no properties, no percent-encoding, no "+", no spaces
# around "="): what the propagator would decode to themselves. ~1 µs where the propagator
# costs ~15; any other member sends the whole header to the propagator.
_MEMBER_SPLIT = re.compile(r"[ \t]*,[ \t]*")
_PLAIN_MEMBER = re.compile(
    r"([\x21\x23\x24\x26\x27\x2a\x2d\x2e\x30-\x39\x41-\x5a\x5e-\x7a\x7c\x7e]+)"
    r"=([\x21\x23\x24\x26-\x2a\x2d-\x3a\x3c-\x5b\x5d-\x7e]*)"
)
MAX_BAGGAGE_MEMBER = 4096


def _plain_baggage(raw: str) -> dict[str, str] | None:
    entries: dict[str, str] = {}
    for member in _MEMBER_SPLIT.split(raw.strip(" \t")):
        match = _PLAIN_MEMBER.fullmatch(member) if len(member) <= MAX_BAGGAGE_MEMBER else None
        if match is None:
            return None
        entries[match[1]] = match[2]
    return entries


def _propagator_baggage(raw: str) -> dict[str, str]:
    entries = otel_baggage.get_all(_quietly(_baggage.extract, {"baggage": raw}, Context()))
    return {str(k): str(v) for k, v in entries.items()}
