"""Outbound calls: which targets may receive ids, what to inject, the call's own observation.

Knows no HTTP client; ``langfuse_mw.httpx`` adapts it to httpx. Trace headers
(``traceparent``/``tracestate``) go to every host but Langfuse itself; what can identify a
person — user id, session id (W3C ``baggage`` in the langfuse SDK's names) and the request
id (``x-request-id``) — only to targets on the ``propagate_to`` allow-list, which by default
is the internal network.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
import socket
import time
from collections.abc import Sequence
from json.encoder import encode_basestring, encode_basestring_ascii
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from opentelemetry import baggage as otel_baggage
from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from . import _failsafe, runtime
from ._record import SpanRecord, add_identity, error_message, exception_attributes
from .config import resolve_settings
from .context import get_request_context
from .core import (
    A_INPUT,
    A_LEVEL,
    A_META,
    A_OUTPUT,
    A_STATUS_MESSAGE,
    A_TYPE,
    CTX_SESSION,
    CTX_USER,
)
from .headers import (
    REDACTED,
    compile_redactor,
    is_secret_key,
    query_pairs,
    redact_query,
    truncate,
)

__all__ = ["OutboundCall", "Policy", "Targets", "begin_call"]

INTERNAL = "internal"
INTERNAL_SUFFIXES = (".internal", ".local", ".svc.cluster.local", ".localhost")
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Secret query values shorter than this are hidden only as part of the whole query: replacing
# "1" everywhere in a stack trace would hide nothing and garble the rest.
_MIN_HIDDEN = 6
_tracecontext = TraceContextTextMapPropagator()
_baggage = W3CBaggagePropagator()
_ids = RandomIdGenerator()


class Targets:
    """The ``propagate_to`` allow-list.

    Entries: ``internal`` (loopback and private addresses, single-label host names, and
    ``*.internal``, ``*.local``, ``*.localhost``, ``*.svc.cluster.local``); a host
    (``api.example.com``, any port, http or https); a host pattern (``*.example.com``); an
    origin (``https://api.example.com:8443``: that scheme, host and port only); an IP network
    (``10.0.0.0/8``); or ``re:<regex>`` matched against the whole URL.
    """

    def __init__(self, entries: Sequence[str], langfuse_url: str | None = None) -> None:
        self.internal = False
        self.hosts: set[str] = set()
        self.patterns: list[str] = []
        self.origins: set[tuple[str, str, int]] = set()
        self.networks: list[Any] = []
        regexes = []
        for entry in entries:
            entry = entry.strip()
            if entry == INTERNAL:
                self.internal = True
            elif entry.startswith("re:"):
                regexes.append(entry[3:])
            elif "://" in entry:
                self.origins.add(_origin(entry))
            elif "/" in entry:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            elif "*" in entry:
                self.patterns.append(entry.lower())
            else:
                self.hosts.add(entry.lower().rstrip("."))
        self.regex = re.compile("|".join(f"(?:{r})" for r in regexes)) if regexes else None
        self.langfuse = _origin(langfuse_url) if langfuse_url else None

    def is_langfuse(self, scheme: str, host: str, port: int) -> bool:
        """Calls to Langfuse itself are neither traced nor given any header."""
        return self.langfuse is not None and (scheme, host, port) == self.langfuse

    def allows_ids(self, scheme: str, host: str, port: int, url: str) -> bool:
        """May this target receive the user, session and request ids?"""
        if scheme not in _DEFAULT_PORTS:
            return False
        if (scheme, host, port) in self.origins:
            return True
        if host in self.hosts:
            return True
        if any(fnmatch.fnmatchcase(host, pattern) for pattern in self.patterns):
            return True
        address = _ip(host)
        if address is not None and any(address in net for net in self.networks):
            return True
        if self.internal and _is_internal(host, address):
            return True
        return self.regex is not None and self.regex.fullmatch(url) is not None


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").rstrip(".")
    return scheme, host, parts.port or _DEFAULT_PORTS.get(scheme, 0)


def _shown_url(url: str, redact: Any) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The URL as exported, and what of the raw URL must not appear in exported errors.

    Credentials are replaced (OpenTelemetry's ``url.full`` rule), query secrets redacted, and
    the fragment left out (never sent over HTTP, and OAuth puts tokens there). The pairs
    (raw, replacement) clean error messages that quote the URL (requests' do).
    """
    parts = urlsplit(url)
    netloc = parts.netloc
    hidden: list[tuple[str, str]] = []
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        masked = "REDACTED:REDACTED" if ":" in userinfo else "REDACTED"
        hidden.append((userinfo + "@", masked + "@"))
        netloc = f"{masked}@{hostport}"
    base = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    if not parts.query:
        return base, tuple(hidden)
    query = redact_query(parts.query, redact)
    if redact is not None and query != parts.query:
        hidden.append((parts.query, query))
        for part in query_pairs(parts.query):  # the secrets alone, wherever else they show
            key, _, value = part.partition("=")
            if len(value) >= _MIN_HIDDEN and is_secret_key(key, redact):
                hidden.append((value, REDACTED))
    return f"{base}?{query}", tuple(hidden)


def _hide(text: str, hidden: tuple[tuple[str, str], ...]) -> str:
    for raw, replacement in hidden:
        text = text.replace(raw, replacement)
    return text


def _ip(host: str) -> Any:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    if host[:1].isdigit() and host.strip("0123456789abcdefxABCDEFX.") == "":
        # 134744072, 0x08080808, 8.8.2056: IPv4 written the other ways the resolver takes
        # (8.8.8.8), not single-label internal names.
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def _is_internal(host: str, address: Any) -> bool:
    if address is not None:
        return bool(address.is_private or address.is_loopback or address.is_link_local)
    return host == "localhost" or "." not in host or host.endswith(INTERNAL_SUFFIXES)


class OutboundCall(SpanRecord):
    """One outbound HTTP call, a child observation of whatever is current (a CLIENT span)."""

    KIND = SpanKind.CLIENT
    __slots__ = (
        "end_ns", "ended", "error", "error_event", "hidden", "host", "method", "parent",
        "request_id",
        "resource", "rt", "scope", "session_id", "span_context", "start_ns", "status", "url",
        "user_id",
    )  # fmt: skip

    def __init__(self, rt: runtime.Runtime, parent: SpanContext, method: str, url: str,
                 host: str, user_id: str | None, session_id: str | None,
                 request_id: str | None) -> None:  # fmt: skip
        self.rt, self.resource, self.scope = rt, rt.resource, rt.scope
        self.parent = parent if parent.is_valid else None
        trace_id = parent.trace_id if parent.is_valid else _ids.generate_trace_id()
        flags = parent.trace_flags if parent.is_valid else otel_trace.TraceFlags(1)
        self.span_context = SpanContext(
            trace_id, _ids.generate_span_id(), False, flags, parent.trace_state
        )
        self.method, self.url, self.host = method, url, host
        self.user_id, self.session_id, self.request_id = user_id, session_id, request_id
        self.status: int | None = None
        self.error: str | None = None
        self.error_event: dict[str, str] | None = None
        self.ended = False
        self.hidden: tuple[tuple[str, str], ...] = ()
        self.start_ns = time.time_ns()
        self.end_ns = 0

    def finish(self, status: int | None = None, exc: BaseException | None = None) -> None:
        """End the call with its status or its exception; once; never raises."""
        if self.ended:
            return
        self.ended = True
        try:
            self.end_ns = time.time_ns()
            self.status = status
            if exc is not None:
                # Errors may quote the URL: its secrets are taken out before they are cut.
                hidden = self.hidden
                clean = (lambda text: _hide(text, hidden)) if hidden else None
                self.error = error_message(exc, clean)
                self.error_event = exception_attributes(exc, clean)
            if self.span_context.trace_flags.sampled:  # a sampled-out request's calls are not
                self.rt.emit(self)
        except Exception as error:
            _failsafe.report("outbound.end", error)

    def fields(self) -> tuple[str, dict[str, Any], int, str | None]:
        path = urlsplit(self.url).path or "/"
        name = f"{self.method} {self.host}{truncate(path, 256)}"
        status = self.status
        attrs: dict[str, Any] = {
            A_TYPE: "span",
            A_INPUT: (
                f'{{"method":{encode_basestring_ascii(self.method)},'
                f'"url":{encode_basestring_ascii(self.url)}}}'
            ),
            A_OUTPUT: f'{{"statusCode":{"null" if status is None else status}}}',
            A_META + "host": encode_basestring(self.host),
        }
        if self.request_id is not None:
            attrs[A_META + "requestId"] = encode_basestring(self.request_id)
        add_identity(attrs, self.user_id, self.session_id, self.rt.environment)
        message = None
        if self.error is not None:
            message = self.error
        elif status is not None and status >= 500:
            message = f"HTTP {status}"
        if message is None:
            return name, attrs, StatusCode.UNSET.value, None
        attrs[A_LEVEL] = "ERROR"
        attrs[A_STATUS_MESSAGE] = message
        return name, attrs, StatusCode.ERROR.value, message


class Policy:
    """What every HTTP client adapter shares: the allow-list, the query redactor, and whether
    calls outside a request are traced."""

    def __init__(self, propagate_to: Sequence[str] | None, trace_outside_requests: bool) -> None:
        options = {} if propagate_to is None else {"propagate_to": propagate_to}
        settings = resolve_settings(options)
        rt = runtime.current()
        langfuse = (rt.settings if rt is not None else settings).base_url
        self.targets = Targets(settings.propagate_to, langfuse)
        self.redact = compile_redactor(settings.redact_query_keys)
        self.trace_outside_requests = trace_outside_requests

    def begin(
        self, method: str, url: str, present: set[str]
    ) -> tuple[OutboundCall | None, dict[str, str]]:
        """``begin_call`` with this policy: the call's observation and the headers to add."""
        return begin_call(
            method, url, present, self.targets, redact=self.redact,
            trace_outside_requests=self.trace_outside_requests,
        )  # fmt: skip


def begin_call(
    method: str,
    url: str,
    present: set[str],
    targets: Targets,
    *,
    redact: Any,
    trace_outside_requests: bool = False,
) -> tuple[OutboundCall | None, dict[str, str]]:
    """Start the observation of one call and return it with the headers to add.

    ``present`` holds the lower-cased header names the caller already set: those are never
    overwritten. Returns ``(None, {})`` when tracing is off, for calls to Langfuse itself,
    and outside a request unless ``trace_outside_requests``.
    """
    rt = runtime.current()
    if rt is None or not rt.enabled:
        return None, {}
    scheme, host, port = _origin(url)
    if targets.is_langfuse(scheme, host, port):
        return None, {}
    ctx = otel_context.get_current()
    parent = otel_trace.get_current_span(ctx).get_span_context()
    if not parent.is_valid and not trace_outside_requests:
        return None, {}
    request = get_request_context()
    # The SDK's propagated user/session (set for sampled requests, or by the handler), else
    # the request's own (a sampled-out request leaves them out of its OTel context).
    user_id = _text(otel_context.get_value(CTX_USER, ctx))
    session_id = _text(otel_context.get_value(CTX_SESSION, ctx))
    request_id = None
    if request is not None:
        request_id = request.request_id
        user_id = user_id if user_id is not None else request.user_id
        session_id = session_id if session_id is not None else request.session_id
    shown, hidden = _shown_url(url, redact)
    call = OutboundCall(rt, parent, method, shown, host, user_id, session_id, request_id)
    call.hidden = hidden

    headers: dict[str, str] = {}
    if "traceparent" not in present:
        carrier: dict[str, str] = {}
        span_ctx = otel_trace.set_span_in_context(NonRecordingSpan(call.span_context), ctx)
        _tracecontext.inject(carrier, span_ctx)
        headers.update(carrier)
    if targets.allows_ids(scheme, host, port, url):
        if "baggage" not in present:
            entries = dict(otel_baggage.get_all(ctx))
            if user_id is not None:
                entries["langfuse_user_id"] = user_id
            if session_id is not None:
                entries["langfuse_session_id"] = session_id
            carrier = {}
            bag_ctx = otel_context.Context()
            for key, value in entries.items():
                bag_ctx = otel_baggage.set_baggage(key, value, bag_ctx)
            _baggage.inject(carrier, bag_ctx)
            headers.update(carrier)
        request_id_header = rt.settings.request_id_header
        if request_id is not None and request_id_header not in present:
            headers[request_id_header] = request_id
    return call, headers


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None
