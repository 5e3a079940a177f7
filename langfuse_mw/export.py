"""Exporting finished spans without ever blocking a request or growing without bound.

``ExportQueue`` replaces the OpenTelemetry ``BatchProcessor`` inside the langfuse SDK's span
processor (same ``emit`` / ``force_flush`` / ``shutdown`` surface) because that one drops the
oldest span silently when full, ignores its flush timeout and can block exit for 30 s. Here
every span is counted (``created == exported + dropped + queued``), waits have deadlines, and
a failing backend is backed off instead of hammered.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import logging
import os
import queue
import random
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import httpx
from opentelemetry import context as otel_context
from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import StatusCode

from ._encode import Exportable, encode_request
from ._failsafe import log_once, report

__all__ = ["ExportQueue", "HttpSender", "Item", "Outcome", "Sender"]

# A finished span: an OpenTelemetry SDK span (the handler's observations) or a request's root
# observation (core.Observation), which is encoded without becoming an SDK span.
Item = ReadableSpan | Exportable

logger = logging.getLogger("langfuse_mw")

BACKOFF_BASE = 1.0
# With jitter the wait is in [cap/2, cap]: a recovered Langfuse gets its next probe within 8 s,
# so export resumes within 10 s of a recovery (RELIABILITY.md case 1). Retry-After can ask for
# longer (up to RETRY_AFTER_CAP).
BACKOFF_CAP = 8.0
RETRY_AFTER_CAP = 300.0
STILL_FAILING_EVERY = 300.0
SERVER_ERROR_ATTEMPTS = 3
# Bytes of a response body read at most: enough for an error's detail (a 2xx needs none); a
# proxy's 200 MiB error page is never held in memory.
BODY_CAP = 4096
# An attempt still running this long after its deadline has its connection closed under it
# (the body read stops at the deadline itself; this is for headers and uploads that trickle).
WATCHDOG_GRACE = 0.25


@dataclass(frozen=True, slots=True)
class Outcome:
    """Result of one export attempt: sent, dropped for a reason, or to be retried."""

    ok: bool = False
    retry: bool = False
    retry_after: float | None = None
    drop_reason: str | None = None
    split: bool = False
    error: str | None = None
    fatal: bool = False  # stop exporting until restart (bad credentials)
    # Positions in the batch of spans that could not be encoded: dropped (``encoding``) before
    # the POST; the rest of the outcome is about the other spans.
    unencodable: tuple[int, ...] = ()
    unencodable_error: str | None = None


SENT = Outcome(ok=True)


class Sender(Protocol):
    """Ships one batch of spans; never raises."""

    def send(self, spans: Sequence[Item], timeout: float) -> Outcome: ...

    def reset(self) -> None: ...

    def close(self) -> None: ...


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date); None if unusable."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return min(float(value), RETRY_AFTER_CAP)
    try:
        parsed = parsedate_to_datetime(value)
        # Every HTTP-date is GMT (RFC 9110 5.6.7); the asctime form carries no zone and
        # parses naive, which timestamp() would read as local time.
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        when = parsed.timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return min(max(0.0, when - (time.time() if now is None else now)), RETRY_AFTER_CAP)


class HttpSender:
    """OTLP/HTTP protobuf sender for the Langfuse endpoint, classifying responses strictly."""

    def __init__(
        self,
        endpoint: str,
        headers: dict[str, str],
        *,
        compression: str = "gzip",
        describe: str = "",
    ) -> None:
        self.endpoint = endpoint
        # identity: an error's detail is read raw, never decompressed (a small gzip body can
        # expand a thousandfold).
        self._headers = {
            **headers,
            "Content-Type": "application/x-protobuf",
            "Accept-Encoding": "identity",
        }
        if compression == "gzip":
            self._headers["Content-Encoding"] = "gzip"
        self._gzip = compression == "gzip"
        self._describe = describe or endpoint
        # One client (connection pool) per thread: the forwarder's workers and the spool's
        # replay thread share a sender, and the watchdog of one attempt closes its own
        # thread's connections only.
        self._local = threading.local()
        self._clients: list[httpx.Client] = []  # every thread's, for close()
        self._clients_lock = threading.Lock()

    def _http(self) -> httpx.Client:
        client: httpx.Client | None = getattr(self._local, "client", None)
        if client is None:
            # trust_env: HTTP(S)_PROXY / NO_PROXY and SSL_CERT_FILE / SSL_CERT_DIR apply, as
            # they do to the langfuse SDK's own exporter (egress proxies, private CAs). A no-op
            # auth keeps our Authorization header as it is: neither a netrc file nor
            # credentials in the URL replace it. No redirects: a 3xx must count as a failure,
            # never as a delivered batch.
            client = httpx.Client(auth=httpx.Auth(), follow_redirects=False, trust_env=True)
            self._local.client = client
            with self._clients_lock:
                self._clients.append(client)
        return client

    def encode(self, spans: Sequence[Item]) -> bytes:
        """Encode spans as an OTLP ``ExportTraceServiceRequest`` (optionally gzip-compressed)."""
        body = encode_request(spans)
        # Level 1: a third of level 5's CPU on the export thread for ~7 % more bytes (OTLP spans
        # repeat their keys, which any level catches).
        return gzip.compress(body, compresslevel=1) if self._gzip else body

    def encode_each(self, spans: Sequence[Item]) -> tuple[bytes | None, tuple[int, ...], str]:
        """After ``encode`` failed: the encodable spans' body (None if there are none), the
        positions of the spans that cannot be encoded, and the first such error."""
        bad: list[int] = []
        error = ""
        for n, item in enumerate(spans):
            try:
                encode_request([item])
            except Exception as exc:
                bad.append(n)
                error = error or f"encoding failed: {exc!r}"
        if not bad or len(bad) == len(spans):
            return None, tuple(bad), error  # nothing to send (or no span to blame alone)
        skip = set(bad)
        try:
            body = self.encode([item for n, item in enumerate(spans) if n not in skip])
        except Exception as exc:  # fails only together: no span is to blame alone
            return None, tuple(range(len(spans))), f"encoding failed: {exc!r}"
        return body, tuple(bad), error

    def send(self, spans: Sequence[Item], timeout: float) -> Outcome:
        # One bad span must not cost the batch: only the spans that fail alone are left out.
        body, bad, error = encode_or_isolate(self, spans)
        if body is None:  # no span could be encoded: drop, not retry
            return Outcome(drop_reason="encoding", error=error)
        return with_unencodable(self.post(body, timeout), bad, error)

    def post(self, body: bytes, timeout: float, *, gzipped: bool | None = None) -> Outcome:
        """POST already-encoded OTLP bytes as they are (``gzipped``: None = as configured).

        ``timeout`` bounds connecting, sending and each wait for the answer; the status line
        decides, and the body (an error's detail) is read only until ``timeout`` after the
        attempt began, BODY_CAP bytes at most.
        """
        deadline = time.monotonic() + timeout
        headers = self._headers
        if gzipped is not None and gzipped != self._gzip:
            headers = {k: v for k, v in headers.items() if k != "Content-Encoding"}
            if gzipped:
                headers["Content-Encoding"] = "gzip"
        client = self._http()
        # httpx's timeouts are per read and per write: a server (or proxy) that trickles its
        # headers, or reads the upload byte by byte, would hold the attempt as long as it
        # likes. Past the deadline a watchdog closes the client under the request, which then
        # fails at its next read or write.
        expired = threading.Event()
        watchdog = threading.Timer(timeout + WATCHDOG_GRACE, _expire, (client, expired))
        watchdog.daemon = True
        watchdog.start()
        try:
            with client.stream(
                "POST", self.endpoint, content=body, headers=headers, timeout=timeout
            ) as response:
                return self._answer(response, deadline)
        # Errors name the endpoint (and public key), as HTTP answers do: health() and the
        # logs say where the export failed, not only how.
        except httpx.TimeoutException:
            return Outcome(retry=True, error=f"timeout after {timeout:.1f}s: {self._describe}")
        except Exception as exc:
            if expired.is_set():
                error = f"no complete answer within {timeout:.1f}s: {self._describe}"
                return Outcome(retry=True, error=error)
            if isinstance(exc, httpx.HTTPError):
                return Outcome(retry=True, error=f"{type(exc).__name__}: {exc}: {self._describe}")
            raise
        finally:
            watchdog.cancel()
            if expired.is_set():  # closed by the watchdog: a new one for the next attempt
                self._local.client = None
                with self._clients_lock:
                    if client in self._clients:
                        self._clients.remove(client)

    def _answer(self, response: httpx.Response, deadline: float) -> Outcome:
        # The status line decides; the body is only an error's detail. A small 2xx body is
        # still read (within the deadline) so that the connection can be reused: one left
        # unread is closed with the response.
        status = response.status_code
        if 200 <= status < 300:
            length = response.headers.get("content-length", "")
            small = len(length) < 6 and length.isascii() and length.isdigit()
            if small and int(length) <= BODY_CAP:
                _read_capped(response, deadline)
            return SENT
        text = _read_capped(response, deadline).decode("utf-8", "replace")
        return self.classify(status, response.headers.get("retry-after"), text)

    def classify(self, status: int, retry_after: str | None, text: str) -> Outcome:
        """Map an HTTP status to an outcome (the table is in docs/export.md)."""
        if 200 <= status < 300:
            return SENT
        detail = f"HTTP {status} from {self._describe}: {text[:200]!r}"
        if status in (401, 403):
            return Outcome(drop_reason="auth", error=detail, fatal=True)
        if status == 413:
            return Outcome(split=True, error=detail)
        if status in (429, 502, 503, 504):
            return Outcome(retry=True, retry_after=parse_retry_after(retry_after), error=detail)
        if status >= 500:
            return Outcome(retry=True, error=detail, drop_reason="server_error")
        if 300 <= status < 400:
            return Outcome(drop_reason="redirect", error=detail)
        return Outcome(drop_reason="rejected", error=detail)

    def reset(self) -> None:
        # After fork the parent's connection pools must not be reused.
        self._local = threading.local()
        self._clients = []
        self._clients_lock = threading.Lock()

    def close(self) -> None:
        with self._clients_lock:
            clients, self._clients = self._clients, []
        self._local = threading.local()
        for client in clients:
            client.close()


def encode_or_isolate(
    sender: HttpSender, spans: Sequence[Item]
) -> tuple[bytes | None, tuple[int, ...], str]:
    """``sender.encode(spans)``; if it fails, the body of the spans that encode alone.

    Returns (body or None when nothing can be sent, positions of the spans left out, error).
    """
    try:
        return sender.encode(spans), (), ""
    except Exception as exc:  # an attribute the encoder cannot take: only its span is lost
        good, bad, error = sender.encode_each(spans)
        return good, bad, error or f"encoding failed: {exc!r}"


def with_unencodable(outcome: Outcome, bad: tuple[int, ...], error: str) -> Outcome:
    """``outcome``, telling ExportQueue which spans of the batch were left out unencoded."""
    if not bad:
        return outcome
    return dataclasses.replace(outcome, unencodable=bad, unencodable_error=error)


def _expire(client: httpx.Client, expired: threading.Event) -> None:
    # The watchdog of HttpSender.post: the attempt is past its deadline.
    expired.set()
    try:
        client.close()
    except Exception as exc:
        report("export.watchdog", exc)


def _read_capped(response: httpx.Response, deadline: float) -> bytes:
    """Up to BODY_CAP bytes of the body, as many as arrive before the deadline."""
    data = b""
    try:
        for chunk in response.iter_raw():
            data += chunk[: BODY_CAP - len(data)]
            if len(data) >= BODY_CAP or time.monotonic() >= deadline:
                break  # a trickling or endless body: what we have is the detail
    except httpx.HTTPError:
        pass  # the status is known already; a body cut off changes nothing
    return data


class ExportQueue:
    """Bounded span queue with one background export thread, counters and deadlines."""

    def __init__(
        self,
        sender: Sender,
        *,
        max_queue_size: int = 8192,
        max_batch_size: int = 512,
        flush_interval: float = 1.0,
        export_timeout: float = 5.0,
        shutdown_timeout: float = 2.0,
        max_queue_bytes: int = 64 * 1024 * 1024,
        backoff_base: float = BACKOFF_BASE,
        backoff_cap: float = BACKOFF_CAP,
    ) -> None:
        self.sender = sender
        self.max_queue_size = max_queue_size
        self.max_queue_bytes = max_queue_bytes
        self.max_batch_size = max_batch_size
        self.flush_interval = flush_interval
        self.export_timeout = export_timeout
        self.shutdown_timeout = shutdown_timeout
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self._init_state()
        self.created = 0
        self.exported = 0
        self.dropped: collections.Counter[str] = collections.Counter()
        # Drops already summed up in a log line ("lost N spans"), so each is reported once.
        self._reported: collections.Counter[str] = collections.Counter()
        self.failed_exports = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.last_success_at: float | None = None
        self.breaker = "closed"
        self._fatal = False
        self._closed = False
        self._start()
        if hasattr(os, "register_at_fork"):
            weak = weakref.WeakMethod(self._after_fork)
            os.register_at_fork(after_in_child=lambda: (m := weak()) and m())

    def _init_state(self) -> None:
        # (span, approximate bytes). Failed requests' spans wait in their own queue: they are
        # exported first and, when the queue is full, evict ordinary spans instead of being
        # dropped themselves.
        self._queue: collections.deque[tuple[Item, int]] = collections.deque()
        self._errors: collections.deque[tuple[Item, int]] = collections.deque()
        self._bytes = 0
        # Re-entrant: a response body ended by the garbage collector emits its span, and a
        # collection can start in a thread inside emit(), holding this lock.
        self._lock = threading.RLock()
        # Wakes the export thread. A SimpleQueue, not an Event: its put() is re-entrant, so
        # an emit from a finalizer may interrupt it (an Event's set() holds a plain lock).
        self._wake: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._idle = threading.Condition(threading.Lock())
        self._in_flight = 0
        self._in_flight_bytes = 0  # the batch in the sender's hands, for health()
        self._stop = False
        self._abandoned = False
        self._sender_closed = False
        self._deadline = float("inf")

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="langfuse-mw-export", daemon=True)
        self._thread.start()

    def _after_fork(self) -> None:
        # The child starts empty: spans queued before the fork belong to the parent, which
        # exports them itself (exporting them here too would duplicate them).
        self._init_state()
        self.sender.reset()
        self.created = self.exported = self.failed_exports = 0
        self.dropped.clear()
        self._reported.clear()
        if not self._closed:
            self._start()

    # -- request path ---------------------------------------------------------------------

    def emit(self, span: Item, size: int = 0, error: bool = False) -> None:
        # Also called by the langfuse SDK's span processor when a handler's observation ends:
        # an exception here would surface in application code, so none may escape.
        try:
            self._emit(span, size, error)
        except Exception as exc:
            report("export.emit", exc)

    def _emit(self, span: Item, size: int, error: bool) -> None:
        """Queue a finished span; never blocks beyond a short lock, never raises.

        ``size`` and ``error`` may be given by a caller that knows them (else measured).
        """
        if self._closed or self._fatal:
            self._drop("shutdown" if self._closed else "auth")
            return
        if not size:
            size, error = _measure(span)
        with self._lock:
            self.created += 1
            while self._full(size) and error and self._queue:
                self._bytes -= self._queue.popleft()[1]  # evict the oldest ordinary span
                self.dropped["queue_full"] += 1
            full = self._full(size)
            if full:
                self.dropped["queue_full"] += 1
            else:
                (self._errors if error else self._queue).append((span, size))
                self._bytes += size
                queued = len(self._queue) + len(self._errors)
        if full:
            log_once(
                "queue_full",
                "langfuse_mw: export queue full (%d spans or %d MiB); dropping new spans until "
                "it drains",
                self.max_queue_size,
                self.max_queue_bytes // (1024 * 1024),
            )
        elif queued == self.max_batch_size:
            self._wake.put(None)  # once, when a batch is complete: the thread drains the rest

    def _full(self, size: int) -> bool:
        return (
            len(self._queue) + len(self._errors) >= self.max_queue_size
            or self._bytes + size > self.max_queue_bytes
        )

    def _take(self, n: int) -> list[tuple[Item, int]]:
        # Under the lock: up to n entries, failed requests' spans first.
        taken: list[tuple[Item, int]] = []
        for source in (self._errors, self._queue):
            while source and len(taken) < n:
                entry = source.popleft()
                self._bytes -= entry[1]
                taken.append(entry)
        return taken

    @property
    def _queued(self) -> int:
        return len(self._queue) + len(self._errors)

    def _drop(self, reason: str) -> None:
        with self._lock:
            self.created += 1
            self.dropped[reason] += 1

    # -- background thread ----------------------------------------------------------------

    def _run(self) -> None:
        # Our own HTTP calls must not be traced by any instrumentation the app installed.
        otel_context.attach(otel_context.set_value(_SUPPRESS_INSTRUMENTATION_KEY, True))
        failures = 0
        retry_at = 0.0
        server_error_attempts = 0
        opened_at = 0.0
        last_still_failing = 0.0
        batch: list[tuple[Item, int]] = []
        while True:
            if not batch:
                # A full batch goes out at once (a burst drains without pauses); otherwise
                # wait for the interval, a full batch, or a flush.
                if self._queued < self.max_batch_size and not self._stop:
                    self._sleep(self.flush_interval)
                if self._stop and not self._queued:
                    break
                with self._lock:
                    batch = self._take(self.max_batch_size)
                    self._in_flight = len(batch)
                    self._in_flight_bytes = sum(size for _, size in batch)
                if not batch:
                    self._notify_idle()
                    continue
            now = time.monotonic()
            if self._stop and now >= self._deadline:
                break
            if now < retry_at:
                if self._stop:
                    break
                self._sleep(min(retry_at - now, 1.0))
                continue
            if failures:
                self.breaker = "half-open"  # this attempt is the probe
            outcome = self._send(batch)
            if self._abandoned:
                self._close_sender()  # shutdown could not: this thread was still sending
                return  # shutdown gave up on this thread and counted its batch as lost
            if outcome.unencodable:
                batch = self._drop_unencodable(batch, outcome)
                if not batch:
                    continue
            give_up = False
            if outcome.retry and outcome.drop_reason:
                # A plain 5xx may be caused by the batch itself: retry it a few times only.
                server_error_attempts += 1
                give_up = server_error_attempts >= SERVER_ERROR_ATTEMPTS
            if outcome.ok:
                self._count_sent(len(batch))
                if failures:
                    logger.warning(
                        "langfuse_mw: export recovered after %.0fs of failures; %s (%s)",
                        time.monotonic() - opened_at,
                        _lost_text(self._lost_since_reported()),
                        self._summary(),
                    )
                failures = server_error_attempts = 0
                self.breaker = "closed"
                batch = []
            elif outcome.split and len(batch) > 1:
                half = len(batch) // 2
                with self._lock:
                    self._queue.extendleft(reversed(batch[half:]))
                    self._bytes += sum(size for _, size in batch[half:])
                    self._in_flight = half
                    self._in_flight_bytes = sum(size for _, size in batch[:half])
                batch = batch[:half]
            elif outcome.retry:
                # Langfuse is failing (or unreachable): back off, whether this batch is kept
                # for another try or given up after its plain 5xx attempts. The next attempt,
                # with this batch or the next one, is the only probe of this back-off step.
                failures += 1
                self._record_error(outcome.error)
                self.breaker = "open"
                retry_at = time.monotonic() + self._backoff(failures, outcome.retry_after)
                if failures == 1:
                    opened_at = last_still_failing = time.monotonic()
                    logger.warning(
                        "langfuse_mw: export failing (%s); backing off, spans stay queued "
                        "(bounded at %d)",
                        outcome.error,
                        self.max_queue_size,
                    )
                elif time.monotonic() - last_still_failing > STILL_FAILING_EVERY:
                    last_still_failing = time.monotonic()
                    logger.warning("langfuse_mw: export still failing (%s)", self._summary())
                if give_up:
                    self._give_up(batch, outcome.drop_reason or "server_error", outcome.error)
                    server_error_attempts = 0
                    batch = []
            else:
                reason = outcome.drop_reason or ("too_large" if outcome.split else "rejected")
                self._record_error(outcome.error)
                if outcome.fatal:
                    self._drop_batch(reason, len(batch))
                    self._fatal = True
                    logger.error(
                        "langfuse_mw: Langfuse refused the credentials (%s); check "
                        "LANGFUSE_PUBLIC_KEY / LANGFUSE_SECRET_KEY. Export stops until restart.",
                        outcome.error,
                    )
                    with self._lock:
                        rest = self._clear()
                    self._drop_batch("auth", rest)
                else:
                    self._give_up(batch, reason, outcome.error)
                server_error_attempts = 0
                batch = []
        # Leftovers at exit: counted, and reported by shutdown().
        self._drop_batch("shutdown", len(batch))
        self._notify_idle()
        if self._closed:
            self._close_sender()  # shutdown's deadline passed before this thread ended

    def _give_up(self, batch: list[tuple[Item, int]], reason: str, error: str | None) -> None:
        # A batch dropped for good: counted, and said once a minute per reason.
        self._drop_batch(reason, len(batch))
        log_once(
            f"drop:{reason}",
            "langfuse_mw: dropped a batch of %d spans (%s): %s",
            len(batch),
            reason,
            error,
        )

    def _close_sender(self) -> None:
        # Once, by shutdown() or by the thread ending after it (its connections released).
        with self._lock:
            if self._sender_closed:
                return
            self._sender_closed = True
        try:
            self.sender.close()
        except Exception as exc:
            report("export.close", exc)

    def _backoff(self, failures: int, retry_after: float | None) -> float:
        delay = min(self.backoff_cap, self.backoff_base * 2 ** min(failures - 1, 10))
        delay = random.uniform(delay / 2, delay)  # jitter: workers don't retry in step
        # Retry-After may ask for longer than the cap (it has its own, RETRY_AFTER_CAP).
        return delay if retry_after is None else max(delay, retry_after)

    def _drop_unencodable(
        self, batch: list[tuple[Item, int]], outcome: Outcome
    ) -> list[tuple[Item, int]]:
        # The spans the sender could not encode leave the batch, counted; whatever happens to
        # the rest (sent, retried, split) is about the rest only.
        bad = set(outcome.unencodable)
        kept = [entry for n, entry in enumerate(batch) if n not in bad]
        lost = len(batch) - len(kept)
        with self._lock:
            if not self._abandoned:
                self.dropped["encoding"] += lost
                self._in_flight -= lost
                self._in_flight_bytes = sum(size for _, size in kept)
        log_once(
            "drop:encoding",
            "langfuse_mw: dropped %d of %d spans that could not be encoded: %s",
            lost,
            len(batch),
            outcome.unencodable_error,
        )
        return kept

    def _clear(self) -> int:
        # Under the lock: empty both queues, returning how many spans they held.
        n = self._queued
        self._queue.clear()
        self._errors.clear()
        self._bytes = 0
        return n

    def _send(self, batch: list[tuple[Item, int]]) -> Outcome:
        timeout = self.export_timeout
        if self._stop:
            timeout = max(0.05, min(timeout, self._deadline - time.monotonic()))
        try:
            return self.sender.send([item for item, _ in batch], timeout)
        except Exception as exc:  # a Sender must not raise; contain one that does
            return Outcome(drop_reason="sender_error", error=repr(exc))

    def _count_sent(self, n: int) -> None:
        with self._lock:
            if self._abandoned:  # shutdown already counted this batch as lost
                return
            self.exported += n
            self.last_success_at = time.time()
            self._in_flight = self._in_flight_bytes = 0

    def _drop_batch(self, reason: str, n: int) -> None:
        with self._lock:
            if self._abandoned:
                return
            if n:
                self.dropped[reason] += n
            self._in_flight = self._in_flight_bytes = 0

    def _record_error(self, error: str | None) -> None:
        with self._lock:
            self.failed_exports += 1
            self.last_error = error
            self.last_error_at = time.time()

    def _notify_idle(self) -> None:
        with self._idle:
            self._idle.notify_all()

    def _lost_since_reported(self) -> collections.Counter[str]:
        # The drops no log line has summed up yet, marked as summed up now.
        with self._lock:
            lost = self.dropped - self._reported
            self._reported = collections.Counter(self.dropped)
        return lost

    def _summary(self) -> str:
        stats = self.stats()
        return (
            f"exported={stats['exported']} queued={stats['queued']} "
            f"dropped={dict(stats['dropped'])}"
        )

    # -- flush and shutdown ---------------------------------------------------------------

    def _sleep(self, timeout: float) -> None:
        # Until woken or the timeout passes; wake-ups given meanwhile count as one.
        wake = self._wake
        try:
            wake.get(timeout=timeout)
        except queue.Empty:
            return
        while not wake.empty():
            wake.get_nowait()

    @property
    def pending(self) -> int:
        """Spans queued or being sent."""
        with self._lock:
            return self._queued + self._in_flight

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far was handled, or the deadline passes.

        "So far": as many spans as were created before the call are exported or dropped.
        Spans that other threads keep emitting meanwhile do not hold it up.
        """
        deadline = time.monotonic() + (self.shutdown_timeout if timeout is None else timeout)
        with self._lock:
            target = self.created
        while self._handled() < target and self.pending and self._thread.is_alive():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._wake.put(None)
            with self._idle:
                self._idle.wait(min(remaining, 0.05))
        return self._handled() >= target or self.pending == 0

    def _handled(self) -> int:
        with self._lock:
            return self.exported + sum(self.dropped.values())

    def shutdown(self, timeout: float | None = None) -> int:
        """Flush within the deadline, stop the thread, and return the number of spans lost."""
        if self._closed:
            return 0
        timeout = self.shutdown_timeout if timeout is None else timeout
        self._deadline = time.monotonic() + timeout
        self.flush(timeout)
        self._closed = True
        self._stop = True
        self._wake.put(None)
        self._thread.join(max(0.0, self._deadline - time.monotonic()))
        with self._lock:
            left = self._clear() + self._in_flight
            if left:
                self.dropped["shutdown"] += left
            self._in_flight = self._in_flight_bytes = 0
            self._abandoned = True
        if left:
            # No deadline of its own when an earlier flush (at SIGTERM) used it up waiting.
            waited = f"by the shutdown deadline ({timeout:.1f}s)" if timeout > 0 else "at exit"
            lost = self._lost_since_reported()
            # Other drops since the last report are summed up too; these alone are said once.
            summary = "" if lost == {"shutdown": left} else f"; {_lost_text(lost)}"
            logger.warning("langfuse_mw: %d spans were not exported %s%s", left, waited, summary)
        elif self.dropped != self._reported:
            logger.warning("langfuse_mw: shutdown; %s", _lost_text(self._lost_since_reported()))
        if not self._thread.is_alive():
            self._close_sender()
        return left

    # The langfuse SDK's span processor calls these names (OpenTelemetry's BatchProcessor API).
    def force_flush(self, timeout_millis: float | None = None) -> bool:
        """OpenTelemetry-compatible flush with a real deadline."""
        return self.flush(None if timeout_millis is None else timeout_millis / 1000)

    def stats(self) -> dict[str, Any]:
        """Counters for health(): created == exported + sum(dropped) + queued."""
        with self._lock:
            return {
                "created": self.created,
                "exported": self.exported,
                "dropped": dict(self.dropped),
                "queued": self._queued + self._in_flight,
                "queued_bytes": self._bytes + self._in_flight_bytes,
                "failed_exports": self.failed_exports,
                "last_error": self.last_error,
                "last_error_at": self.last_error_at,
                "last_success_at": self.last_success_at,
                "breaker": "stopped" if self._fatal else self.breaker,
            }


def _lost_text(lost: collections.Counter[str]) -> str:
    return f"lost {sum(lost.values())} spans since the last report ({dict(lost)})"


# Items of a sequence attribute measured; the rest are estimated from them, so measuring stays
# O(attributes) however long a list is.
_MEASURED_ITEMS = 16


def _measure(span: Item) -> tuple[int, bool]:
    """Approximate encoded size (for the byte bound) and whether it records a failure.

    Runs on the request path for the SDK's spans: strings count their length, everything else
    a small constant, except sequences (their strings) and events (their attributes: an
    exception's message and stack trace).
    """
    if isinstance(span, ReadableSpan):
        attributes = span.attributes or {}
        size = 256 + _measure_attributes(attributes)
        for event in span.events:
            size += 64 + len(event.name) + _measure_attributes(event.attributes or {})
        level = attributes.get("langfuse.observation.level")
        return size, level == "ERROR" or span.status.status_code is StatusCode.ERROR
    return span.approx_size(), span.is_error()


def _measure_attributes(attributes: Any) -> int:
    size = 0
    for key, value in attributes.items():
        size += len(key)
        if isinstance(value, str):
            size += len(value)
        elif isinstance(value, (tuple, list)):
            size += _measure_sequence(value)
        else:
            size += 16
    return size


def _measure_sequence(values: tuple[Any, ...] | list[Any]) -> int:
    n = len(values)
    if n > _MEASURED_ITEMS:
        return _measure_sequence(values[:_MEASURED_ITEMS]) * n // _MEASURED_ITEMS
    size = 2
    for value in values:
        size += len(value) + 4 if isinstance(value, str) else 10
    return size
