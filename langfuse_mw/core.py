"""Begin and finish the root observation of a request. Knows no web framework.

An adapter turns its request into a ``RequestInfo``, calls ``RequestTracer.begin`` and reports
what happens (route, status, body bytes, exception, disconnect) to the returned ``Observation``,
then calls ``end()`` when the last byte left and ``detach()`` where ``begin`` ran. A request
that may be dropped goes through ``begin_lazy`` instead, which decides first: one the
sampler drops (or whose caller did not sample it) is a light ``SampledOut`` (same reporting
methods) that reads the request and becomes an ``Observation`` only if it fails or is slow.

The root observation is not an OpenTelemetry SDK span while the request runs: the request's
OTel context holds only its span context (so the handler's Langfuse observations nest under
it and inherit user and session), and the exported span is built once, at the end, with the
attributes the langfuse SDK would have set. That keeps the request path to a few dict writes.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from json.encoder import encode_basestring, encode_basestring_ascii
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.baggage import _BAGGAGE_KEY
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceState
from opentelemetry.trace.propagation import _SPAN_KEY

from . import _failsafe, runtime
from ._record import (
    A_ENVIRONMENT,
    A_SESSION,
    A_USER,
    SpanRecord,
    add_identity,
    error_message,
    exception_attributes,
)
from .config import Settings
from .context import RequestContext, attach_otel, detach_otel
from .context import _current as _request_var
from .headers import clean_id, compile_redactor, is_valid_request_id, new_request_id, redact_query
from .headers import truncate as _truncate
from .propagation import (
    NOTHING,
    Incoming,
    TrustPolicy,
    baggage_entries,
    plain_parent,
    read_incoming,
)
from .sampling import Sampler

__all__ = ["Observation", "RequestInfo", "RequestState", "RequestTracer", "SampledOut"]

UNMATCHED = "<unmatched>"
MAX_CUSTOM_ID = 1024

_SAMPLED = otel_trace.TraceFlags(otel_trace.TraceFlags.SAMPLED)
_NOT_SAMPLED = otel_trace.TraceFlags(otel_trace.TraceFlags.DEFAULT)
_NO_TRACE_STATE = otel_trace.DEFAULT_TRACE_STATE
_getrandbits = random.getrandbits
_time_ns = time.time_ns
_new_tuple = tuple.__new__


def _span_context(trace_id: int, span_id: int, sampled: bool, state: TraceState) -> SpanContext:
    # SpanContext(...) re-validates ids we made valid (non-zero, in range) and costs ~1 µs;
    # this builds the same tuple: (trace_id, span_id, is_remote, flags, state, is_valid).
    flags = _SAMPLED if sampled else _NOT_SAMPLED
    return _new_tuple(SpanContext, (trace_id, span_id, False, flags, state, True))


# Attribute names Langfuse reads (shared/LANGFUSE_OTEL.md §6).
A_TYPE = "langfuse.observation.type"
A_INPUT = "langfuse.observation.input"
A_OUTPUT = "langfuse.observation.output"
A_LEVEL = "langfuse.observation.level"
A_STATUS_MESSAGE = "langfuse.observation.status_message"
A_META = "langfuse.observation.metadata."
A_TRACE_NAME = "langfuse.trace.name"
A_APP_ROOT = "langfuse.internal.is_app_root"
# Context keys the langfuse SDK reads when a child observation starts (propagate_attributes).
CTX_USER = "langfuse.propagated.user_id"
CTX_SESSION = "langfuse.propagated.session_id"
BAGGAGE_TRACE_ID = "langfuse_trace_id"


@dataclass(slots=True)
class RequestInfo:
    """What the core needs to know about a request, built by an adapter.

    ``headers`` holds lower-cased names (only those in ``RequestTracer.header_names`` need be
    present; repeated headers joined with ","). ``raw`` is the framework's own request object
    (ASGI scope, WSGI environ, Flask or Django request) for ``user_id_from`` callables.
    """

    method: str
    path: str
    query: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    client_ip: str | None = None
    framework: str = "asgi"
    kind: str = "http"
    raw: Any = None


class RequestTracer:
    """Per-middleware request logic built once from Settings; adapters call ``begin``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._exclude = (
            re.compile("|".join(f"(?:{p})" for p in settings.exclude_paths))
            if settings.exclude_paths
            else None
        )
        self._exclude_methods = settings.exclude_methods
        self._redactor = compile_redactor(settings.redact_query_keys)
        self._validate_request_id = settings.request_id_validator or is_valid_request_id
        self.request_id_header = settings.request_id_header
        self.trust = TrustPolicy(settings.trust_incoming, settings.trusted_networks)
        self._continues = settings.trust_incoming == "continue"
        # Whether a caller's trace context or baggage needs the whole request (its peer
        # address, or a link) before the decision.
        self._trust_reads_peer = bool(self.trust.networks) or settings.trust_incoming == "link"
        self.sampler = Sampler(settings.sample_rate, settings.sample_rules)
        self._slow_ns = int(settings.slow_threshold * 1e9)
        self._identity_callables = (
            settings.user_id_from is not None or settings.session_id_from is not None
        )
        # Whether begin_lazy can drop a request before reading it (identity callables run
        # at begin, on the framework's request object, so they need the full path).
        self.may_sample_out = not self._identity_callables and not self.sampler.always_keeps
        names = {
            settings.request_id_header,
            "traceparent",
            "tracestate",
            "baggage",
            "user-agent",
        }
        if settings.user_id_from is None:
            names.add(settings.user_id_header)
        if settings.session_id_from is None:
            names.add(settings.session_id_header)
        self.header_names = frozenset(names)
        # Raw ASGI header name -> the key in RequestInfo.headers.
        self.header_keys = {name.encode("latin-1"): name for name in names}

    def health_json(self) -> bytes:
        """The body of the opt-in health endpoint (``health_path``): ``health()`` as JSON."""
        return json.dumps(runtime.health(), default=str, sort_keys=True).encode()

    def is_excluded(self, method: str, path: str) -> bool:
        """True when the request must not be traced at all (no span, next to no cost)."""
        if method in self._exclude_methods:
            return True
        return self._exclude is not None and self._exclude.fullmatch(path) is not None

    def begin(self, info: RequestInfo) -> Observation | None:
        """Start the root observation and make it current; None when tracing is off or failed."""
        try:
            rt = runtime._runtime or runtime.get_runtime(self.settings)
            if not rt.enabled:
                return None
            return self._begin(info, rt)
        except Exception as exc:
            _failsafe.report("begin", exc)
            return None

    def begin_lazy(
        self,
        path: str,
        request_id: str | None,
        traceparent: str | None,
        tracestate: str | None,
        baggage: str | None,
        make_info: Callable[[], RequestInfo],
    ) -> RequestState | None:
        """``begin`` deciding first, from the few headers the decision needs.

        A request the sampler drops (or whose caller did not sample it) gets a light
        ``SampledOut``: its ``RequestInfo`` is built only if it is kept or someone asks for
        its user and session. Any other request goes on to ``begin`` with ``make_info()``.
        """
        try:
            rt = runtime._runtime or runtime.get_runtime(self.settings)
            if not rt.enabled:
                return None
            if self._identity_callables or (
                self._trust_reads_peer and (traceparent is not None or baggage is not None)
            ):
                return self._begin(make_info(), rt)
            parent = None
            if traceparent is not None and self._continues:
                # Continued only from a plain version-00 header of a caller that did not
                # sample the trace.
                parent = plain_parent(traceparent, tracestate)
                # A SpanContext is a tuple: (trace_id, span_id, is_remote, flags, state, ...).
                if parent is None or parent[3] & 1:
                    return self._begin(make_info(), rt)
                trace_id, trace_state = parent[0], parent[4]
            else:
                trace_id = _getrandbits(128) or 1
                if self.sampler.keeps(trace_id, path):
                    return self._begin(make_info(), rt, trace_id)
                trace_state = _NO_TRACE_STATE
            # Dropped: the caller's baggage is kept to pass on and for user and session.
            incoming = NOTHING
            if self._continues and (parent is not None or baggage is not None):
                entries = baggage_entries(baggage) if baggage is not None else None
                if parent is not None or entries:
                    incoming = Incoming(parent=parent, baggage=entries or {})
            span_id = _getrandbits(64) or 1
            span_context = _new_tuple(
                SpanContext, (trace_id, span_id, False, _NOT_SAMPLED, trace_state, True)
            )
            out = SampledOut(
                self,
                rt,
                new_request_id() if request_id is None else self._request_id(request_id),
                span_context,
                incoming,
                make_info,
            )
            # Its handler's observations find a parent that says "not sampled", and the
            # caller's baggage (minus langfuse's own entries) travels on.
            values: dict[str, object] = {_SPAN_KEY: NonRecordingSpan(span_context)}
            if incoming.baggage:
                values[_BAGGAGE_KEY] = incoming.forwardable()
            out._make_current(values)
            return out
        except Exception as exc:
            _failsafe.report("begin", exc)
            return None

    def _begin(self, info: RequestInfo, rt: runtime.Runtime, new_trace_id: int = 0) -> Observation:
        headers = info.headers
        trust = self.trust
        peer_trusted = trust.peer_trusted(info.client_ip) if trust.networks else True
        incoming = read_incoming(headers, trust.mode if peer_trusted else "ignore")
        parent = incoming.parent
        # Continued traces follow the caller's decision, so a trace is never half-recorded;
        # a trace that starts here is sampled by its id, like OpenTelemetry's ratio sampler,
        # so every service deciding by the same rate agrees.
        if parent is not None:
            trace_id = parent.trace_id
            trace_state = parent.trace_state
            sampled = parent.trace_flags.sampled
        else:
            trace_state = _NO_TRACE_STATE
            trace_id = new_trace_id or _getrandbits(128) or 1  # begin_lazy drew one
            sampled = self.sampler.keeps(trace_id, info.path)
        span_context = _span_context(trace_id, _getrandbits(64) or 1, sampled, trace_state)
        request_id = self._request_id(headers.get(self.request_id_header))
        obs = Observation(self, rt, info, request_id, span_context, parent, sampled)
        if parent is not None:
            obs.claimed = incoming.claims(trace_id)
        if incoming.linked is not None:
            obs.linked = incoming.linked

        # The request's OTel context, built in one go (each set_value copies the mapping):
        # the span children nest under and the baggage to pass on (the caller's, minus
        # langfuse's own entries).
        values: dict[str, object] = {_SPAN_KEY: NonRecordingSpan(span_context)}
        baggage = incoming.forwardable() if incoming.baggage else None
        if sampled or self._identity_callables:
            self._resolve_identities(obs, incoming, peer_trusted)
        else:
            # Not sampled: its children are not recorded and it is exported only if it fails
            # or is slow, so user and session (from headers) are read when someone asks.
            obs.pending = (incoming, peer_trusted)
        if sampled:
            # The langfuse SDK's claim that this trace's root is exported (so children don't
            # mark themselves app root), and the user/session it copies onto every child
            # observation (propagate_attributes' context keys).
            if baggage is None:
                baggage = {}
            baggage[BAGGAGE_TRACE_ID] = f"{trace_id:032x}"
            if obs.user_id is not None:
                values[CTX_USER] = obs.user_id
            if obs.session_id is not None:
                values[CTX_SESSION] = obs.session_id
        if baggage is not None:
            values[_BAGGAGE_KEY] = baggage
        obs._make_current(values)
        return obs

    def _resolve_identities(self, obs: Observation, incoming: Incoming, trusted: bool) -> None:
        settings, info = self.settings, obs.info
        obs.user_id = self._identity(
            settings.user_id_from, settings.user_id_header, info, "user_id",
            incoming.user_id, trusted,
        )  # fmt: skip
        obs.session_id = self._identity(
            settings.session_id_from, settings.session_id_header, info, "session_id",
            incoming.session_id, trusted,
        )  # fmt: skip

    def _request_id(self, sent: str | None) -> str:
        # The caller's id if it passes the checks, else a fresh one.
        if sent is None:
            return new_request_id()
        if not self._check_request_id(sent):
            _failsafe.reject("request_id")
            return new_request_id()
        return sent

    def _check_request_id(self, value: str) -> bool:
        # Whatever a custom validator accepts, the id is echoed in a header and logged:
        # control characters (CR/LF, NUL) and non-ASCII never pass.
        if not (len(value) <= MAX_CUSTOM_ID and value.isascii() and value.isprintable()):
            return False
        if "," in value or value != value.strip() or not value:
            # Two request id headers (joined with a comma) are neither client's id; edge
            # spaces are refused by HTTP servers when the id is echoed.
            return False
        try:
            return bool(self._validate_request_id(value))
        except Exception as exc:
            _failsafe.report("request_id_validator", exc)
            return False

    def _identity(
        self,
        source: Any,
        header: str,
        info: RequestInfo,
        cause: str,
        from_baggage: str | None,
        peer_trusted: bool,
    ) -> str | None:
        # Your callable (your authentication) wins; then the header, then langfuse baggage
        # from the caller (trusted exactly as far as the header is: trust_incoming=continue
        # and, with trusted_networks, a peer inside them).
        if source is not None:
            try:
                value = source(info)
            except Exception as exc:
                _failsafe.report(f"{cause}_from", exc)
                return None
            if value is None:
                return None
            cleaned = clean_id(value) if isinstance(value, str) else None
        else:
            value = info.headers.get(header) if peer_trusted else None
            if value is None:
                value = from_baggage
            if value is None:
                return None
            cleaned = clean_id(value)
        if cleaned is None:
            _failsafe.reject(cause)
        return cleaned


class RequestState:
    """What an adapter reports about a request, sampled or not (``Observation``, ``SampledOut``).

    Plain attributes with class-level defaults rather than slots: a request sets only the
    handful it needs, the rest are read from the class. Reports after ``end`` are ignored (the
    export thread may be reading).
    """

    tracer: RequestTracer
    request_id: str
    span_context: SpanContext
    start_ns: int
    sampled = False
    route: str | None = None
    status: int | None = None
    exception: BaseException | None = None
    error: str | None = None
    bytes_sent = 0
    first_byte_ns = 0
    end_ns = 0
    disconnected = False
    ended = False
    otel_context: otel_context.Context | None = None
    _otel_token: Any = None
    _request_token: Any = None

    def set_route(self, template: str | None) -> None:
        """Record the matched route template (e.g. ``/items/{item_id}``)."""
        if not self.ended:
            self.route = template

    def set_status(self, status: int) -> None:
        """Record the response status code."""
        if not self.ended:
            self.status = status

    def add_body(self, size: int) -> None:
        """Count response body bytes; the first call marks time to first byte."""
        if self.ended:
            return
        if not self.first_byte_ns:
            self.first_byte_ns = time.time_ns()
        self.bytes_sent += size

    def record_exception(self, exc: BaseException) -> None:
        """Remember the application's exception (the adapter re-raises it untouched)."""
        if self.exception is None and not self.ended:
            self.exception = exc

    def mark_disconnected(self) -> None:
        """The client went away before the response was complete."""
        if not self.ended:
            self.disconnected = True

    def end(self, end_ns: int | None = None, route: Callable[[], str | None] | None = None) -> None:
        """End the request (once; never raises): ``end_ns`` is when its last byte left."""
        raise NotImplementedError

    def record_late_exception(
        self,
        exc: BaseException,
        route: Callable[[], str | None] | None = None,
        name: str = "after response",
    ) -> None:
        """The app failed after its response was complete (a BackgroundTask, a close callback).

        Exported as an ERROR child observation, ``name``, of the request's; the request's own
        is exported too if sampling had dropped it. Never raises.
        """
        try:
            root = self._exported_root(route)
            queue = root.rt.queue if root is not None else None
            if root is not None and queue is not None:
                record = AfterResponse(root, exc, name)
                queue.emit(record, record.approx_size(), True)
        except Exception as error:
            _failsafe.report("late_exception", error)

    def _exported_root(self, route: Callable[[], str | None] | None) -> Observation | None:
        # The request's ended observation, exported (now, if it had been dropped); None while
        # the request is still on (its exception is then the request's own).
        raise NotImplementedError

    def request_context(self) -> RequestContext:
        """The public view of this request's ids (built on first use)."""
        raise NotImplementedError

    def _kept_by(self, end_ns: int) -> str | None:
        # Why a request the sampler dropped is exported anyway: it failed, or it was slow.
        if self.error is not None or self.exception is not None:
            return "error"
        if self.status is not None and self.status >= 500:
            return "error"
        slow = self.tracer._slow_ns
        if slow and end_ns - self.start_ns >= slow:
            return "slow"
        return None

    def _make_current(self, values: dict[str, object]) -> None:
        # The request's OTel context (built in one go) and the request itself become current.
        ctx = self.otel_context = otel_context.Context(values)
        self._otel_token = attach_otel(ctx)
        self._request_token = _request_var.set(self)

    def detach(self) -> None:
        """Restore the context that was current before ``begin`` (call where begin ran)."""
        try:
            if self._request_token is not None:
                _request_var.reset(self._request_token)
            if self._otel_token is not None:
                detach_otel(self._otel_token)
        except Exception as exc:  # a token from another context: nothing left to restore
            _failsafe.report("detach", exc)
        self._request_token = self._otel_token = None
        if self.ended:
            self.otel_context = None  # ended and detached: see Observation._release


class SampledOut(RequestState):
    """A request that is not sampled, from begin to end (``RequestTracer.begin_lazy``).

    It holds only what decides whether it is exported anyway (status, exception, duration)
    and becomes an ``Observation`` if it is; its ``RequestInfo`` is built only then, or when
    the handler asks for its user and session (``current_request()``).
    """

    _observation: Observation | None = None

    def __init__(
        self,
        tracer: RequestTracer,
        rt: runtime.Runtime,
        request_id: str,
        span_context: SpanContext,
        incoming: Incoming,
        make_info: Callable[[], RequestInfo],
    ) -> None:
        self.tracer = tracer
        self.rt = rt
        self.request_id = request_id
        self.span_context = span_context
        self.incoming = incoming
        self.make_info = make_info
        self.start_ns = _time_ns()

    def request_context(self) -> RequestContext:
        """The public view of this request's ids (built on first use)."""
        return self._promoted().request_context()

    def end(self, end_ns: int | None = None, route: Callable[[], str | None] | None = None) -> None:
        """Export it as an Observation if it failed or was slow; otherwise drop it."""
        if self.ended:
            return
        self.ended = True
        try:
            end_ns = self.end_ns = end_ns or _time_ns()
            if self.exception is None and (self.status or 500) < 500:
                # Most requests: neither failed nor (unless slow) kept.
                slow = self.tracer._slow_ns
                if not slow or end_ns - self.start_ns < slow:
                    return
            elif self._kept_by(end_ns) is None:
                self.exception = None  # let go of the traceback
                return
            obs = self._promoted()
            obs.route, obs.status, obs.exception = self.route, self.status, self.exception
            obs.bytes_sent, obs.first_byte_ns = self.bytes_sent, self.first_byte_ns
            obs.disconnected = self.disconnected
            self.exception = None
            obs.end(end_ns, route)  # decides again (the same answer): one way out for exports
        except Exception as exc:
            _failsafe.report("end", exc)

    def _exported_root(self, route: Callable[[], str | None] | None) -> Observation | None:
        if not self.ended:
            return None
        obs = self._promoted()
        if not obs.ended:  # dropped at its end: it becomes the observation it would have been
            obs.route, obs.status = self.route, self.status
            obs.bytes_sent, obs.first_byte_ns = self.bytes_sent, self.first_byte_ns
            obs.disconnected, obs.end_ns, obs.ended = self.disconnected, self.end_ns, True
        return obs._exported_root(route)

    def _promoted(self) -> Observation:
        obs = self._observation
        if obs is None:
            info = self.make_info()
            tracer = self.tracer
            incoming, span = self.incoming, self.span_context
            obs = Observation(tracer, self.rt, info, self.request_id, span, incoming.parent, False)
            obs.start_ns = self.start_ns
            obs.otel_context = self.otel_context
            if incoming.parent is not None:
                obs.claimed = incoming.claims(span.trace_id)
            trusted = tracer.trust.peer_trusted(info.client_ip)
            obs.pending = (incoming, trusted)  # user and session, when asked
            self._observation = obs
        return obs


class Observation(RequestState, SpanRecord):
    """The root observation of one request, from ``begin`` to ``end``.

    Exported as an OpenTelemetry SERVER span.

    Once ended it is the export record itself: the export thread turns it into OTLP bytes
    (``encode_span``), so attribute formatting and JSON encoding stay off the request path.
    """

    KIND = SpanKind.SERVER
    error_event: dict[str, str] | None = None
    user_id: str | None = None
    session_id: str | None = None
    linked: SpanContext | None = None
    kept_by: str | None = None
    claimed = False
    # (incoming context, peer trusted) while user and session are still to be read.
    pending: tuple[Incoming, bool] | None = None
    # Metadata an adapter adds (a WebSocket's close code): key -> JSON-encoded value.
    extra_metadata: dict[str, str] | None = None
    _request_context: RequestContext | None = None

    def __init__(
        self,
        tracer: RequestTracer,
        rt: runtime.Runtime,
        info: RequestInfo,
        request_id: str,
        span_context: SpanContext,
        parent: SpanContext | None,
        sampled: bool,
    ) -> None:
        self.tracer = tracer
        self.rt = rt
        self.info = info
        self.request_id = request_id
        self.span_context = span_context
        self.parent = parent
        self.sampled = sampled
        self.start_ns = _time_ns()

    def _identities(self) -> None:
        pending = self.pending
        if pending is not None:
            self.pending = None
            self.tracer._resolve_identities(self, *pending)

    def request_context(self) -> RequestContext:
        """The public view of this request's ids (built on first use)."""
        ctx = self._request_context
        if ctx is None:
            self._identities()
            span = self.span_context
            otel = self.otel_context
            if otel is None:
                # Asked for after the request let go of its context (a late close callback):
                # work run with it still nests under the request's observation.
                otel = otel_context.Context({_SPAN_KEY: NonRecordingSpan(span)})
            ctx = self._request_context = RequestContext(
                self.request_id,
                self.user_id,
                self.session_id,
                f"{span.trace_id:032x}",
                f"{span.span_id:016x}",
                otel,
            )
        return ctx

    # -- ending -------------------------------------------------------------------------------

    def end(self, end_ns: int | None = None, route: Callable[[], str | None] | None = None) -> None:
        """Queue the observation for export, once; never raises.

        ``end_ns`` lets an adapter end the observation later than the last byte left (to
        learn about an exception still on its way) while keeping the last byte's time.
        ``route`` names the route, called only if the observation is exported.
        """
        if self.ended:
            return
        self.ended = True
        try:
            end_ns = self.end_ns = end_ns or _time_ns()
            if not self.sampled:
                # Not sampled: exported anyway when it failed or was slow (its children were
                # not recorded, but the request itself is never invisible).
                kept_by = self._kept_by(end_ns)
                if kept_by is None:
                    self.exception = None
                    return
                self.kept_by = kept_by
                self._identities()
            if route is not None:
                self._name_route(route)
            exc = self.exception
            if exc is not None:
                # Format now and let go of the traceback: it keeps the request's frames alive.
                self.error = error_message(exc)
                self.error_event = exception_attributes(exc)
                self.exception = None
            self._release()
            rt = self.rt
            self.resource, self.scope = rt.resource, rt.scope
            queue = rt.queue
            if queue is not None:
                status = self.status
                error = self.error is not None or (status is not None and status >= 500)
                queue.emit(self, self.approx_size(), error)
        except Exception as exc:
            _failsafe.report("end", exc)

    def _exported_root(self, route: Callable[[], str | None] | None) -> Observation | None:
        if not self.ended:
            return None
        if self.sampled or self.kept_by is not None:
            return self  # exported when it ended
        # Dropped when it ended: exported now, for the failure that came after its response.
        self.kept_by = "error"
        self._identities()
        if route is not None and self.route is None:
            self._name_route(route)
        self._release()
        rt = self.rt
        self.resource, self.scope = rt.resource, rt.scope
        if rt.queue is not None:
            rt.queue.emit(self, self.approx_size(), True)
        return self

    def _name_route(self, route: Callable[[], str | None]) -> None:
        try:
            self.route = route()
        except Exception as exc:  # an app shape the route lookup does not know
            _failsafe.report("route", exc)

    def _release(self) -> None:
        # Only what the export needs stays referenced while the span waits in the queue
        # (fewer live objects for the garbage collector to walk).
        self.info.raw = None
        if self._request_token is None:
            # Detached: nobody reaches the request any more. Until then (a BackgroundTask
            # after the last byte) its context stays, for a request context asked for there.
            self.otel_context = None
        if self._request_context is not None:
            self._request_context = None

    def approx_size(self) -> int:
        info = self.info
        size = 900 + len(info.path) + len(info.query) + len(info.headers.get("user-agent", ""))
        event = self.error_event
        if event is not None:  # the exception's message and stack trace (up to ~9 kB)
            size += sum(len(value) for value in event.values())
        return size

    # -- export (runs on the export thread) ---------------------------------------------------

    def fields(self) -> tuple[str, dict[str, Any], int, str | None]:
        """Name, attributes, OTel status code and message of the exported span."""
        info = self.info
        settings = self.tracer.settings
        route = self.route or UNMATCHED
        name = f"{'WS' if info.kind == 'websocket' else info.method} {route}"
        status = self.status
        if status is None and self.error is not None:
            status = 500  # what the framework or server answers for an unhandled exception
        query = redact_query(info.query, self.tracer._redactor)
        attrs: dict[str, Any] = {
            A_TYPE: "span",
            A_INPUT: (
                f'{{"method":{encode_basestring_ascii(info.method)},'
                f'"path":{encode_basestring_ascii(_truncate(info.path))},'
                f'"query":{encode_basestring_ascii(query)}}}'
            ),
            A_OUTPUT: f'{{"statusCode":{"null" if status is None else status}}}',
            A_META + "requestId": encode_basestring(self.request_id),
            A_META + "route": encode_basestring(route),
            A_META + "framework": encode_basestring(info.framework),
            # A HEAD response's body (frameworks may produce the GET body) never leaves.
            A_META + "responseSize": "0" if info.method == "HEAD" else str(self.bytes_sent),
        }
        if self.first_byte_ns:
            ttfb = (self.first_byte_ns - self.start_ns) / 1e6
            attrs[A_META + "timeToFirstByteMs"] = f"{ttfb:.3f}"
        user_agent = info.headers.get("user-agent")
        if user_agent:
            attrs[A_META + "userAgent"] = encode_basestring(_truncate(user_agent, 512))
        if settings.capture_client_ip and info.client_ip:
            attrs[A_META + "clientIp"] = encode_basestring(info.client_ip)
        if self.user_id is not None:
            attrs[A_USER] = self.user_id
            attrs[A_META + "userId"] = encode_basestring(self.user_id)
        if self.session_id is not None:
            attrs[A_SESSION] = self.session_id
            attrs[A_META + "sessionId"] = encode_basestring(self.session_id)
        if self.rt.environment:
            attrs[A_ENVIRONMENT] = self.rt.environment
        if self.parent is None:
            # Only the service that starts the trace names it: Langfuse keeps the latest
            # non-empty trace name, so a downstream service would otherwise rename it.
            attrs[A_TRACE_NAME] = name
            attrs[A_APP_ROOT] = True
        elif not self.claimed:
            attrs[A_APP_ROOT] = True
        if self.linked is not None:
            # trust_incoming="link": a new trace that says where the request came from.
            attrs[A_META + "linkedTraceId"] = f'"{self.linked.trace_id:032x}"'
            attrs[A_META + "linkedObservationId"] = f'"{self.linked.span_id:016x}"'

        level = message = None
        if self.error is not None:
            level, message = "ERROR", self.error
        elif status is not None and status >= 500:
            level, message = "ERROR", f"HTTP {status}"
        elif status is not None and status >= 400:
            level, message = settings.level_4xx, f"HTTP {status}"
        elif self.disconnected:
            level, message = "WARNING", "client disconnected before the response completed"
        if self.disconnected:
            attrs[A_META + "disconnected"] = "true"
        if self.kept_by is not None:
            # Sampled out, exported because it failed or was slow.
            attrs[A_META + "keptBy"] = f'"{self.kept_by}"'
        if self.extra_metadata is not None:
            for key, value in self.extra_metadata.items():
                attrs[A_META + key] = value
        if level is not None and level != "DEFAULT":
            attrs[A_LEVEL] = level
        if message is not None:
            attrs[A_STATUS_MESSAGE] = message
        if level == "ERROR":
            return name, attrs, StatusCode.ERROR.value, message
        return name, attrs, StatusCode.UNSET.value, None


class AfterResponse(SpanRecord):
    """Work the app did after its response was complete (or its client left), that failed: a
    child of the request's observation named ``after response`` (``after disconnect``), ERROR,
    with the exception (``record_late_exception``).
    """

    __slots__ = (
        "end_ns", "error", "error_event", "name", "parent", "resource", "root", "scope",
        "span_context", "start_ns",
    )  # fmt: skip

    def __init__(self, root: Observation, exc: BaseException, name: str = "after response") -> None:
        self.root, self.resource, self.scope, self.name = root, root.resource, root.scope, name
        self.parent = span = root.span_context
        self.span_context = _span_context(
            span.trace_id, _getrandbits(64) or 1, span.trace_flags.sampled, span.trace_state
        )
        self.start_ns = root.end_ns or root.start_ns  # the response's last byte
        self.end_ns = _time_ns()
        self.error = error_message(exc)
        self.error_event = exception_attributes(exc)

    def fields(self) -> tuple[str, dict[str, Any], int, str | None]:
        """Name, attributes, OTel status code and message of the exported span."""
        root = self.root
        attrs: dict[str, Any] = {
            A_TYPE: "span",
            A_LEVEL: "ERROR",
            A_STATUS_MESSAGE: self.error,
            A_META + "requestId": encode_basestring(root.request_id),
        }
        add_identity(attrs, root.user_id, root.session_id, root.rt.environment)
        return self.name, attrs, StatusCode.ERROR.value, self.error
