"""ExportQueue and HttpSender: counting, back-off, response classes, deadlines, fork."""

from __future__ import annotations

import email.utils
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.trace import SpanContext, Status, StatusCode, TraceFlags

from langfuse_mw import export
from langfuse_mw.export import ExportQueue, HttpSender, Outcome, parse_retry_after

SENT = Outcome(ok=True)


def span(n: int = 1) -> ReadableSpan:
    context = SpanContext(n, n, False, TraceFlags(TraceFlags.SAMPLED))
    return ReadableSpan(name=f"s{n}", context=context, start_time=1, end_time=2)


class ScriptedSender:
    """Answers each send with the next scripted outcome (then SENT), recording batches."""

    def __init__(self, *script: Outcome, delay: float = 0.0) -> None:
        self.script = list(script)
        self.delay = delay
        self.batches: list[list[str]] = []
        self.times: list[float] = []
        self.release = threading.Event()
        self.release.set()

    def send(self, spans: Sequence[ReadableSpan], timeout: float) -> Outcome:
        self.release.wait()
        self.times.append(time.monotonic())
        if self.delay:
            time.sleep(self.delay)
        self.batches.append([s.name for s in spans])
        return self.script.pop(0) if self.script else SENT

    def reset(self) -> None:
        self.batches = []

    def close(self) -> None:
        return None

    @property
    def sent(self) -> int:
        return sum(len(b) for b in self.batches)


def queue(sender: Any, **options: Any) -> ExportQueue:
    options = {"flush_interval": 0.02, "backoff_base": 0.05, "backoff_cap": 0.2, **options}
    return ExportQueue(sender, **options)


def balanced(stats: dict[str, Any]) -> bool:
    return bool(
        stats["created"] == stats["exported"] + sum(stats["dropped"].values()) + stats["queued"]
    )


def test_every_span_is_counted_under_concurrent_emitters() -> None:
    sender = ScriptedSender(delay=0.001)
    q = queue(sender, max_queue_size=500, max_batch_size=50)

    def emit_many() -> None:
        for n in range(1000):
            q.emit(span(n + 1))

    threads = [threading.Thread(target=emit_many) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert balanced(q.stats())
    assert q.flush(10)
    stats = q.stats()
    assert stats["created"] == 8000
    assert stats["queued"] == 0
    assert stats["exported"] == sender.sent
    assert stats["exported"] + stats["dropped"].get("queue_full", 0) == 8000
    assert balanced(stats)
    q.shutdown(1)


def test_full_queue_drops_new_spans_counts_and_logs_once(caplog: Any) -> None:
    sender = ScriptedSender()
    sender.release.clear()  # the backend hangs: nothing leaves the queue
    q = queue(sender, max_queue_size=10, max_batch_size=5)
    with caplog.at_level(logging.WARNING, logger="langfuse_mw"):
        for n in range(100):
            q.emit(span(n + 1))
    stats = q.stats()
    assert stats["dropped"] == {"queue_full": 100 - stats["queued"]}
    assert 10 <= stats["queued"] <= 15  # up to one batch in the sender's hands
    assert [r.getMessage() for r in caplog.records].count(
        "langfuse_mw: export queue full (10 spans or 64 MiB); dropping new spans until it drains"
    ) == 1
    sender.release.set()
    q.shutdown(1)


def test_retry_after_is_honoured_before_the_next_attempt() -> None:
    sender = ScriptedSender(Outcome(retry=True, retry_after=0.6, error="HTTP 429"))
    q = queue(sender)
    q.emit(span())
    assert q.flush(5)
    assert len(sender.times) == 2
    assert sender.times[1] - sender.times[0] >= 0.6
    assert q.stats()["exported"] == 1
    assert q.stats()["breaker"] == "closed"
    q.shutdown(1)


def test_breaker_opens_backs_off_and_closes_on_recovery(caplog: Any) -> None:
    failing = [Outcome(retry=True, error="HTTP 503") for _ in range(4)]
    sender = ScriptedSender(*failing)
    q = queue(sender, backoff_base=0.05, backoff_cap=0.4)
    with caplog.at_level(logging.WARNING, logger="langfuse_mw"):
        q.emit(span())
        time.sleep(0.05)
        assert q.stats()["breaker"] in ("open", "half-open")
        assert q.flush(5)
    gaps = [b - a for a, b in zip(sender.times, sender.times[1:], strict=False)]
    assert len(gaps) == 4
    # Exponential with jitter in [d/2, d]: 0.05, 0.1, 0.2, 0.4 (capped).
    for gap, step in zip(gaps, [0.05, 0.1, 0.2, 0.4], strict=True):
        assert gap >= step / 2 - 0.01
    stats = q.stats()
    assert (stats["exported"], stats["failed_exports"], stats["breaker"]) == (1, 4, "closed")
    assert stats["last_error"] == "HTTP 503"
    messages = [r.getMessage() for r in caplog.records]
    # One line when it opened, one when it recovered: not one per attempt.
    assert len(messages) == 2
    assert messages[0].startswith("langfuse_mw: export failing (HTTP 503)")
    assert messages[1].startswith("langfuse_mw: export recovered")
    q.shutdown(1)


def test_plain_500_is_retried_a_few_times_then_dropped() -> None:
    error = Outcome(retry=True, drop_reason="server_error", error="HTTP 500")
    sender = ScriptedSender(error, error, error)
    q = queue(sender)
    q.emit(span())
    assert q.flush(5)
    assert len(sender.times) == 3
    assert q.stats()["dropped"] == {"server_error": 1}
    q.shutdown(1)


@pytest.mark.parametrize("reason", ["rejected", "redirect"])
def test_rejected_and_redirected_batches_are_dropped_not_retried(reason: str) -> None:
    sender = ScriptedSender(Outcome(drop_reason=reason, error="HTTP 400"))
    q = queue(sender)
    q.emit(span(1))
    assert q.flush(5)
    q.emit(span(2))  # later batches still go out
    assert q.flush(5)
    assert sender.batches == [["s1"], ["s2"]]
    assert q.stats()["dropped"] == {reason: 1}
    assert q.stats()["exported"] == 1
    q.shutdown(1)


def test_bad_credentials_stop_export_and_log_one_error(caplog: Any) -> None:
    sender = ScriptedSender(Outcome(drop_reason="auth", fatal=True, error="HTTP 401 from x"))
    q = queue(sender)
    with caplog.at_level(logging.WARNING, logger="langfuse_mw"):
        q.emit(span(1))
        q.flush(5)
        for n in range(50):
            q.emit(span(n + 2))
        q.flush(0.2)
    assert len(sender.batches) == 1  # no retry storm
    stats = q.stats()
    assert stats["dropped"] == {"auth": 51}
    assert stats["breaker"] == "stopped"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "LANGFUSE_PUBLIC_KEY" in errors[0].getMessage()
    q.shutdown(1)


def test_payload_too_large_splits_the_batch_and_drops_a_lone_oversized_span() -> None:
    class SplittingSender(ScriptedSender):
        def send(self, spans: Sequence[ReadableSpan], timeout: float) -> Outcome:
            if len(spans) > 2 or any(s.name == "s7" for s in spans):
                self.batches.append([])
                return Outcome(split=True, error="HTTP 413")
            self.batches.append([s.name for s in spans])
            return SENT

    sender = SplittingSender()
    q = queue(sender, max_batch_size=8, flush_interval=5)
    for n in range(8):
        q.emit(span(n + 1))
    assert q.flush(5)
    sent = sorted(name for batch in sender.batches for name in batch)
    assert sent == ["s1", "s2", "s3", "s4", "s5", "s6", "s8"]
    assert q.stats()["dropped"] == {"too_large": 1}
    assert balanced(q.stats())
    q.shutdown(1)


def test_shutdown_never_waits_past_its_deadline_on_a_hanging_backend(caplog: Any) -> None:
    sender = ScriptedSender()
    sender.release.clear()
    q = queue(sender)
    for n in range(20):
        q.emit(span(n + 1))
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="langfuse_mw"):
        lost = q.shutdown(0.5)
    elapsed = time.monotonic() - started
    assert 0.45 <= elapsed < 0.8
    assert lost == 20
    stats = q.stats()
    assert stats["dropped"] == {"shutdown": 20}
    assert balanced(stats)
    assert any("20 spans were not exported" in r.getMessage() for r in caplog.records)
    q.emit(span(99))  # after shutdown: counted, not queued
    assert q.stats()["dropped"]["shutdown"] == 21
    sender.release.set()
    time.sleep(0.05)
    assert q.stats()["exported"] == 0  # the abandoned batch is not counted twice


def test_opentelemetry_force_flush_has_a_real_deadline() -> None:
    sender = ScriptedSender()
    sender.release.clear()
    q = queue(sender)
    q.emit(span())
    started = time.monotonic()
    assert q.force_flush(timeout_millis=300) is False
    assert time.monotonic() - started < 0.5
    sender.release.set()
    assert q.force_flush() is True
    q.shutdown(1)


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_fork_child_exports_its_own_spans_only() -> None:
    sender = ScriptedSender()
    sender.release.clear()  # parent's spans stay queued across the fork
    q = queue(sender, flush_interval=0.02)
    for n in range(5):
        q.emit(span(n + 1))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(read)
            sender.release.set()
            for n in range(3):
                q.emit(span(100 + n))
            ok = q.flush(5)
            report = f"{ok} {sorted(n for b in sender.batches for n in b)} {q.stats()['created']}"
            os.write(write, report.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        report = pipe.read()
    os.waitpid(pid, 0)
    assert report == "True ['s100', 's101', 's102'] 3"
    sender.release.set()
    assert q.flush(5)
    assert sorted(n for b in sender.batches for n in b) == ["s1", "s2", "s3", "s4", "s5"]
    q.shutdown(1)


def test_parse_retry_after() -> None:
    assert parse_retry_after("30") == 30.0
    assert parse_retry_after("100000") == 300.0  # capped
    soon = email.utils.formatdate(time.time() + 20, usegmt=True)
    assert 18 <= (parse_retry_after(soon) or 0) <= 20
    assert parse_retry_after(email.utils.formatdate(time.time() - 60, usegmt=True)) == 0.0
    for garbage in ("soon", "-5", "1.5e3", "", None, "Wed, 99 Foo 2026"):
        assert parse_retry_after(garbage) is None


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (200, Outcome(ok=True)),
        (204, Outcome(ok=True)),
        (301, "redirect"),
        (308, "redirect"),
        (400, "rejected"),
        (404, "rejected"),
        (401, "auth"),
        (403, "auth"),
        (413, "split"),
        (429, "retry"),
        (502, "retry"),
        (503, "retry"),
        (504, "retry"),
        (500, "server_error"),
    ],
)
def test_http_status_classes(status: int, expected: Any) -> None:
    sender = HttpSender("http://127.0.0.1:9/x", {}, describe="host")
    got = sender.classify(status, "7", "body")
    if isinstance(expected, Outcome):
        assert got == expected
    elif expected == "split":
        assert got.split
    elif expected == "retry":
        assert got.retry and got.drop_reason is None
        assert got.retry_after == 7.0
    elif expected == "server_error":
        assert got.retry and got.drop_reason == "server_error"
    else:
        assert got.drop_reason == expected and not got.retry
        assert got.fatal is (expected == "auth")


def error_span(n: int) -> ReadableSpan:
    context = SpanContext(n, n, False, TraceFlags(TraceFlags.SAMPLED))
    return ReadableSpan(
        name=f"e{n}", context=context, start_time=1, end_time=2,
        status=Status(StatusCode.ERROR, "boom"),
    )  # fmt: skip


def test_a_burst_of_ten_times_the_queue_keeps_errors_first_and_counts_exactly() -> None:
    sender = ScriptedSender()
    sender.release.clear()  # nothing leaves while the burst arrives
    q = queue(sender, max_queue_size=100, max_batch_size=10, flush_interval=5)
    for n in range(1000):
        q.emit(error_span(n + 1) if n % 10 == 0 else span(n + 1))
    stats = q.stats()
    assert stats["created"] == 1000
    assert balanced(stats)
    sender.release.set()
    assert q.flush(5)
    sent = [name for batch in sender.batches for name in batch]
    # All 100 error spans survived the overflow; ordinary spans made room for them.
    assert sum(name.startswith("e") for name in sent) == 100
    assert q.stats()["dropped"] == {"queue_full": 1000 - len(sent)}
    assert balanced(q.stats())
    q.shutdown(1)


def test_the_queue_is_bounded_by_bytes_too() -> None:
    sender = ScriptedSender()
    sender.release.clear()
    q = queue(sender, max_queue_size=10_000, max_queue_bytes=10 * 1024 * 1024, flush_interval=5)
    big = "x" * (1024 * 1024)
    for n in range(40):
        context = SpanContext(n + 1, n + 1, False, TraceFlags(TraceFlags.SAMPLED))
        q.emit(ReadableSpan(name="big", context=context, attributes={"input": big}))
    stats = q.stats()
    assert stats["queued"] <= 11  # ~10 MiB held, one more batch in the sender's hands
    assert stats["queued_bytes"] <= 10 * 1024 * 1024
    assert stats["dropped"]["queue_full"] >= 29
    assert balanced(stats)
    sender.release.set()
    q.shutdown(1)


def test_retry_after_http_dates_are_gmt_whatever_the_local_zone() -> None:
    # RFC 9110 5.6.7: three forms, all GMT. The asctime form names no zone: it must not be
    # read as local time (9 h off in Tokyo, 5 h the other way in New York).
    saved = os.environ.get("TZ")
    try:
        for zone in ("Asia/Tokyo", "America/New_York"):
            os.environ["TZ"] = zone
            time.tzset()
            soon = time.time() + 20
            when = time.gmtime(soon)
            forms = [
                email.utils.formatdate(soon, usegmt=True),  # IMF-fixdate
                time.strftime("%A, %d-%b-%y %H:%M:%S GMT", when),  # RFC 850
                time.strftime("%a %b ", when) + f"{when.tm_mday:2d}"
                + time.strftime(" %H:%M:%S %Y", when),  # asctime
            ]  # fmt: skip
            for form in forms:
                assert 17 <= (parse_retry_after(form) or 0) <= 20, (zone, form)
    finally:
        if saved is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = saved
        time.tzset()


def test_retry_after_digits_beyond_ascii_are_garbage() -> None:
    for garbage in ("\u00b2", "\u0661\u0662", "3\u00b2"):
        assert parse_retry_after(garbage) is None


def test_plain_back_off_waits_at_most_8_s_so_recovery_is_seen_within_10_s() -> None:
    q = ExportQueue(ScriptedSender(), flush_interval=5)  # the default back-off
    try:
        waits = [q._backoff(failures, None) for failures in range(1, 40) for _ in range(50)]
        assert max(waits) <= 8.0
        assert min(q._backoff(40, None) for _ in range(50)) >= 4.0  # the cap, jittered
        # A longer Retry-After is still honoured, up to its own cap.
        assert q._backoff(40, 120.0) == 120.0
        assert parse_retry_after("100000") == 300.0
    finally:
        q.shutdown(1)


def test_the_byte_bound_counts_events_and_lists_of_strings() -> None:
    # RELIABILITY case 15: an exception event with a 200 kB message, or a list of strings,
    # must weigh what it holds, or the byte bound lets the queue hold many times its size.
    sender = ScriptedSender()
    sender.release.clear()
    bound = 2 * 1024 * 1024
    q = queue(sender, max_queue_size=10_000, max_queue_bytes=bound, flush_interval=5)
    payload = "p" * 200_000
    for n in range(1, 61):
        context = SpanContext(n, n, False, TraceFlags(TraceFlags.SAMPLED))
        if n % 3 == 0:
            item = ReadableSpan(
                name="exc", context=context,
                events=[Event("exception", {"exception.message": payload}, 1)],
            )  # fmt: skip
        elif n % 3 == 1:
            item = ReadableSpan(name="tags", context=context, attributes={"tags": (payload,)})
        else:  # a long list of short strings: measured from a sample, not item by item
            item = ReadableSpan(
                name="list", context=context, attributes={"ids": ("i" * 100,) * 2000}
            )
        q.emit(item)
    stats = q.stats()
    held = 0  # characters the queued spans hold (nothing left the queue: the sender hangs)
    for item, _ in q._queue:
        assert isinstance(item, ReadableSpan)
        held += sum(len(v) for value in (item.attributes or {}).values() for v in value)
        held += sum(len(str(v)) for e in item.events for v in (e.attributes or {}).values())
    assert held <= bound, (held, stats)
    assert stats["queued_bytes"] <= bound and stats["dropped"]["queue_full"] > 0, stats
    assert balanced(stats)
    sender.release.set()
    q.shutdown(1)


def test_emit_from_a_finalizer_inside_a_wake_up_does_not_deadlock() -> None:
    # A response body freed by the garbage collector emits its span from wherever the
    # collection started: possibly while this thread is waking the export thread (flush()
    # does, and so does the thread's own wait). A nested emit runs here at every Python line
    # of flush() and of the threading code it calls, each finding one span short of a batch,
    # so each wakes the export thread again: a wake-up that holds a plain lock would hang.
    sender = ScriptedSender()
    sender.release.clear()
    q = queue(sender, max_batch_size=2, flush_interval=5)
    q.emit(span(1))
    q.emit(span(2))  # a full batch: the export thread takes it, and the sender holds it
    deadline = time.monotonic() + 5
    while q._in_flight != 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    q.emit(span(3))  # one span short of the next batch
    spare = [span(n) for n in range(10_000, 14_000)]  # built ahead: the SDK has locks too
    held: list[Any] = []
    busy = False
    watched = (os.path.dirname(export.__file__), os.path.dirname(threading.__file__))

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        nonlocal busy
        if event == "line" and not busy and frame.f_code.co_filename.startswith(watched):
            busy = True  # one level deep, as a finalizer that emits would be
            try:
                q.emit(spare[len(held)])
                with q._lock:  # taken back (emitted again below): one short of a batch again
                    item, size = q._queue.pop()
                    q._bytes -= size
                    q.created -= 1
                held.append(item)
            finally:
                busy = False
        return tracer

    def flusher() -> None:
        sys.settrace(tracer)
        try:
            q.flush(0.3)  # cannot finish: the sender still holds the first batch
        finally:
            sys.settrace(None)

    thread = threading.Thread(target=flusher, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "an emit inside a wake-up deadlocked"
    assert len(held) > 10
    sender.release.set()
    for item in held:
        q.emit(item)
    assert q.flush(5)
    assert sender.sent == 3 + len(held) and balanced(q.stats())
    q.shutdown(1)


def test_a_transport_error_names_the_endpoint_it_could_not_reach() -> None:
    # health()["last_error"] and the log line say where the export failed, not only how.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends: nothing listens there
    sender = HttpSender(f"http://127.0.0.1:{port}/api/public/otel/v1/traces", {})
    outcome = sender.post(b"", 2.0)
    sender.close()
    assert outcome.retry and not outcome.ok
    assert outcome.error is not None
    assert outcome.error.startswith("ConnectError: ")
    assert f"http://127.0.0.1:{port}" in outcome.error


def test_health_counts_the_bytes_of_the_batch_in_the_senders_hands() -> None:
    # "queued" counts the batch being sent (or waiting to be retried); so must "queued_bytes",
    # or a backed-off exporter reads as holding spans of no size.
    sender = ScriptedSender()
    sender.release.clear()
    q = queue(sender, max_batch_size=5, flush_interval=5)
    for n in range(1, 8):
        q.emit(span(n))
    deadline = time.monotonic() + 5
    while q.stats()["queued"] != 7 or q._in_flight != 5:
        assert time.monotonic() < deadline, q.stats()
        time.sleep(0.01)
    stats = q.stats()
    per_span = stats["queued_bytes"] / 7
    assert per_span > 0 and stats["queued_bytes"] == 7 * round(per_span)
    sender.release.set()
    assert q.flush(5)
    assert q.stats()["queued_bytes"] == 0
    q.shutdown(1)
