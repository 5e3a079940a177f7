"""`langfuse-mw forward` against a real redis-server and a real OTLP receiver.

The five scenarios of issue 8: an outage of the receiver, a forwarder killed mid-stream, two
forwarders sharing a stream, a poison batch, and Redis stopped under traffic.
"""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from langfuse_mw import runtime
from langfuse_mw.config import resolve_settings
from langfuse_mw.devserver import DevServer
from langfuse_mw.queue.forwarder import Forwarder, ForwarderOptions
from langfuse_mw.queue.producer import entry_fields
from tests.asgi_driver import call
from tests.conftest import traced_app
from tests.queue_support import (
    PUBLIC_KEY,
    SECRET_KEY,
    STREAM,
    ForwarderProcess,
    RedisServer,
    produce,
    span_ids,
    stats,
    wait_until,
)
from tests.servers import ROOT, free_port

ROOT_NAME = "GET /items/{item_id}"


@pytest.fixture
def receiver() -> Iterator[DevServer]:
    server = DevServer().start()
    yield server
    server.close()


@pytest.fixture
def forwarders() -> Iterator[list[ForwarderProcess]]:
    started: list[ForwarderProcess] = []
    yield started
    for process in started:
        process.close()


@pytest.fixture
def fresh_runtime() -> Iterator[None]:
    runtime.shutdown(0.5)
    yield
    runtime.shutdown(0.5)


def queue_runtime(redis_url: str, **options: Any) -> runtime.Runtime:
    # Queue mode needs no secret key in the service: the forwarder holds it.
    settings = resolve_settings(
        {
            "public_key": PUBLIC_KEY,
            "queue_url": redis_url,
            "flush_interval": 0.05,
            "max_batch_size": 64,
            **options,
        },
        environ={},
    )
    with runtime._lock:
        rt = runtime._install(runtime.Runtime(settings))
    assert rt.enabled, rt.disabled_reason
    assert rt.queue is not None
    rt.queue.backoff_base, rt.queue.backoff_cap = 0.02, 0.1  # fast recovery in tests
    return rt


def in_process(server: RedisServer, base_url: str, **options: Any) -> Forwarder:
    from langfuse_mw.queue._redis import connect

    settings = resolve_settings(
        {"public_key": PUBLIC_KEY, "secret_key": SECRET_KEY, "base_url": base_url}, environ={}
    )
    opts = ForwarderOptions(
        stream=STREAM,
        consumer="inproc",
        public_key=PUBLIC_KEY,
        backoff_base=0.05,
        backoff_cap=0.3,
        block=0.1,
        **options,
    )
    client = connect(server.url, 5.0)
    sender = runtime.http_sender(settings, PUBLIC_KEY, SECRET_KEY)
    server.on_close(client.close)
    server.on_close(sender.close)
    return Forwarder(client, sender, opts)


def roots(receiver: DevServer) -> set[str]:
    return {s["span_id"] for s in receiver.received_spans() if s["name"] == ROOT_NAME}


@pytest.mark.anyio
async def test_receiver_down_while_500_requests_are_traced_then_all_arrive(
    redis_server: RedisServer, forwarders: list[ForwarderProcess], fresh_runtime: None
) -> None:
    port = free_port()  # nothing listens here yet: Langfuse is down
    rt = queue_runtime(redis_server.url)
    app = traced_app("starlette")
    for n in range(500):
        assert (await call(app, f"/items/{n}")).status == 200
    assert rt.flush(10)
    health = rt.health()
    assert health["exported"] == 1000 and health["dropped"] == {}  # root + generation each
    assert health["durable"]["spans_added"] == 1000

    forwarder = ForwarderProcess(redis_server.url, f"http://127.0.0.1:{port}", "f1")
    forwarders.append(forwarder)
    wait_until(
        lambda: stats(redis_server.url)["totals"]["retried"] >= 3, 15, "the forwarder to retry"
    )
    receiver = DevServer(port=port).start()  # Langfuse is back
    try:
        wait_until(lambda: len(roots(receiver)) == 500, 20, "all 500 root observations")
        assert forwarder.terminate() == 0, forwarder.output()
        summary = stats(redis_server.url)
        assert summary["length"] == 0 and summary["pending"] == 0 and summary["lag"] == 0
        assert summary["totals"]["forwarded_spans"] == 1000
        assert summary["totals"]["dead_lettered"] == 0
    finally:
        receiver.close()


def test_forwarder_killed_mid_stream_is_taken_over_without_loss(
    redis_server: RedisServer, receiver: DevServer, forwarders: list[ForwarderProcess]
) -> None:
    client = redis_server.client()
    expected = produce(client, 400, per_batch=2)
    first = ForwarderProcess(redis_server.url, receiver.url, "a", "--read-count", "8")
    forwarders.append(first)
    wait_until(lambda: receiver.request_count >= 50, 15, "the first forwarder to start")
    receiver.set_fault(hang=True)  # its next POST hangs: it holds delivered, unacked batches
    wait_until(lambda: client.xpending(STREAM, "langfuse-mw")["pending"] > 0, 5, "a batch in hand")
    time.sleep(0.2)
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(5)
    held = client.xpending(STREAM, "langfuse-mw")["pending"]
    assert held > 0
    receiver.clear_fault()

    second = ForwarderProcess(
        redis_server.url, receiver.url, "b", "--claim-idle", "1", "--read-count", "8"
    )
    forwarders.append(second)
    wait_until(lambda: expected <= set(span_ids(receiver)), 20, "every span")
    assert set(span_ids(receiver)) == expected  # duplicates, if any, carry the same ids
    assert second.terminate() == 0, second.output()
    summary = stats(redis_server.url)
    assert summary["forwarders"]["b"]["claimed"] >= held
    assert summary["pending"] == 0 and summary["length"] == 0


def test_two_forwarders_share_a_stream_of_5000_batches(
    redis_server: RedisServer, receiver: DevServer, forwarders: list[ForwarderProcess]
) -> None:
    expected = produce(redis_server.client(), 5000)
    forwarders.extend(
        ForwarderProcess(redis_server.url, receiver.url, name) for name in ("left", "right")
    )
    wait_until(lambda: receiver.request_count >= 5000, 40, "5 000 batches")
    # The receiver counts a POST when it arrives and stores its spans just after.
    wait_until(lambda: expected <= set(span_ids(receiver)), 10, "the last batch stored")
    assert set(span_ids(receiver)) == expected
    for process in forwarders:
        assert process.terminate() == 0, process.output()  # SIGTERM: a clean exit
    summary = stats(redis_server.url)
    shares = {name: f["forwarded"] for name, f in summary["forwarders"].items()}
    assert sum(shares.values()) == 5000, shares
    assert min(shares.values()) >= 500, shares  # each did a real share of the work
    assert summary["length"] == 0 and summary["lag"] == 0


def test_poison_batch_goes_to_the_dead_letter_stream_without_blocking(
    redis_server: RedisServer, receiver: DevServer
) -> None:
    client = redis_server.client()
    expected = produce(client, 20)
    poison_id = client.xadd(STREAM, entry_fields(b"\xff\xff not protobuf", 3, PUBLIC_KEY))
    expected |= produce(client, 20, first=1000)
    forwarder = in_process(redis_server, receiver.url, max_rejections=2)
    thread = threading.Thread(target=forwarder.run, kwargs={"drain": True})
    thread.start()
    thread.join(20)
    assert not thread.is_alive()
    assert set(span_ids(receiver)) == expected
    [(_, letter)] = client.xrange(f"{STREAM}:dead")
    assert letter[b"source_id"] == poison_id
    assert letter[b"attempts"] == b"2"
    assert b"HTTP 400" in letter[b"reason"] and b"Failed to parse" in letter[b"reason"]
    assert letter[b"body"] == b"\xff\xff not protobuf"
    counters = forwarder.stats()
    assert counters["forwarded"] == 40 and counters["dead_lettered"] == 1
    assert client.xlen(STREAM) == 0


def test_retry_after_is_honoured_and_nothing_is_acked_before_a_2xx(
    redis_server: RedisServer, receiver: DevServer
) -> None:
    client = redis_server.client()
    expected = produce(client, 3)
    receiver.set_fault(status=429, retry_after="1")
    forwarder = in_process(redis_server, receiver.url)
    thread = threading.Thread(target=forwarder.run)
    started = time.monotonic()
    thread.start()
    wait_until(lambda: receiver.request_count >= 1, 5, "the first POST")
    time.sleep(0.5)
    assert receiver.request_count == 1  # waiting out Retry-After, not back-off's 0.05 s
    assert client.xpending(STREAM, "langfuse-mw")["pending"] == 3  # read, none acked
    receiver.clear_fault()
    wait_until(lambda: set(span_ids(receiver)) == expected, 10, "the batches")
    assert time.monotonic() - started >= 1.0
    forwarder.stop.set()
    thread.join(5)
    assert forwarder.stats()["retried"] >= 1
    assert client.xlen(STREAM) == 0


def test_sigterm_finishes_the_batch_in_hand(
    redis_server: RedisServer, receiver: DevServer, forwarders: list[ForwarderProcess]
) -> None:
    client = redis_server.client()
    produce(client, 50)
    receiver.set_fault(delay=1.0)  # a slow Langfuse: the POST in hand takes a second
    process = ForwarderProcess(redis_server.url, receiver.url, "t", "--read-count", "10")
    forwarders.append(process)
    wait_until(lambda: receiver.request_count == 1, 10, "a POST in flight")
    process.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert process.process.poll() is None  # still finishing its batch
    assert process.process.wait(10) == 0, process.output()
    # The batch in hand was delivered and acknowledged; the 9 read but not started are handed
    # back (pending, marked idle) for another forwarder, not lost.
    assert len(receiver.received_spans()) == 1 and receiver.request_count == 1
    assert client.xlen(STREAM) == 49
    assert client.xpending(STREAM, "langfuse-mw")["pending"] == 9
    assert stats(redis_server.url)["forwarders"]["t"]["forwarded"] == 1


@pytest.mark.anyio
async def test_redis_stopped_during_traffic(
    redis_server: RedisServer, receiver: DevServer, fresh_runtime: None
) -> None:
    rt = queue_runtime(redis_server.url, max_queue_size=1000)
    forwarder = in_process(redis_server, receiver.url)
    thread = threading.Thread(target=forwarder.run)
    thread.start()
    app = traced_app("starlette")

    async def traffic(first: int, n: int) -> float:
        started = time.perf_counter()
        for k in range(first, first + n):
            assert (await call(app, f"/items/{k}")).status == 200
        return (time.perf_counter() - started) / n

    try:
        healthy = await traffic(0, 100)
        wait_until(lambda: len(roots(receiver)) == 100, 10, "the healthy phase")

        redis_server.stop()
        down = await traffic(1000, 700)  # 1 400 spans: more than the queue holds
        rt.flush(0.5)
        health = rt.health()
        assert health["failed_exports"] >= 1
        assert health["dropped"]["queue_full"] > 0  # counted, not silent
        assert down < healthy * 2 + 0.001  # the request path never waits on Redis

        redis_server.start()  # empty: the stream and the group are recreated
        assert rt.flush(10)  # what the bounded queue kept goes out first
        await traffic(2000, 100)
        assert rt.flush(10)
        wait_until(
            lambda: {f"/items/{k}" for k in range(2000, 2100)} <= paths(receiver),
            15,
            "export to resume",
        )
        health = rt.health()
        assert health["created"] == (
            health["exported"] + sum(health["dropped"].values()) + health["queued"]
        )
    finally:
        forwarder.stop.set()
        thread.join(5)
    assert forwarder.stats()["redis_errors"] >= 1


def paths(receiver: DevServer) -> set[str]:
    import json

    out = set()
    for s in receiver.received_spans():
        raw = s["attributes"].get("langfuse.observation.input")
        if s["name"] == ROOT_NAME and raw:
            out.add(json.loads(raw)["path"])
    return out


def test_gzip_and_identity_bodies_are_posted_as_they_are(
    redis_server: RedisServer, receiver: DevServer
) -> None:
    from langfuse_mw._encode import encode_request
    from tests.queue_support import span

    client = redis_server.client()
    client.xadd(STREAM, entry_fields(encode_request([span(7)]), 1, PUBLIC_KEY))
    client.xadd(STREAM, entry_fields(gzip.compress(encode_request([span(8)])), 1, PUBLIC_KEY))
    client.xadd(STREAM, entry_fields(encode_request([span(9)]), 1, "pk-lf-other-project"))
    forwarder = in_process(redis_server, receiver.url)
    forwarder.run(drain=True)
    assert sorted(span_ids(receiver)) == [f"{7:016x}", f"{8:016x}"]
    [(_, letter)] = client.xrange(f"{STREAM}:dead")
    assert b"pk-lf-other-project" in letter[b"reason"]


@pytest.mark.parametrize("gzipped", [False, True])
def test_a_batch_too_large_for_langfuse_is_split_until_it_is_taken(
    redis_server: RedisServer, gzipped: bool
) -> None:
    # A 413 splits the batch, as the export queue does, rather than dead-lettering it: halves
    # are posted in turn, and a single span still too large is dropped and counted.
    from langfuse_mw._encode import encode_request
    from tests.queue_support import size_limited_receiver, span

    spans = [span(n) for n in range(1, 9)]
    huge = span(9)
    huge._attributes = {"langfuse.observation.input": "x" * 20_000}  # type: ignore[attr-defined]
    body = encode_request([*spans[:4], huge, *spans[4:]])
    client = redis_server.client()
    client.xadd(STREAM, entry_fields(gzip.compress(body) if gzipped else body, 9, PUBLIC_KEY))
    with size_limited_receiver(len(encode_request(spans))) as (url, received):
        forwarder = in_process(redis_server, url)
        forwarder.run(drain=True)
    assert received == list(range(1, 9))  # in order, the huge span left out
    counters = forwarder.counters
    assert (counters["forwarded"], counters["forwarded_spans"]) == (1, 8)
    assert counters["too_large_spans"] == 1
    assert counters["dead_lettered"] == 0
    assert client.xpending(STREAM, "langfuse-mw")["pending"] == 0


FORWARD_WITHOUT_REDIS = """
import sys
sys.modules["redis"] = None  # as where the redis extra is not installed
from langfuse_mw.cli import main
sys.exit(main(["forward"]))
"""


def test_forward_without_the_redis_extra_says_what_to_install_in_one_line() -> None:
    env = {**os.environ, "LANGFUSE_MW_QUEUE_URL": "redis://127.0.0.1:9/0"}
    done = subprocess.run(
        [sys.executable, "-c", FORWARD_WITHOUT_REDIS],
        capture_output=True, text=True, timeout=60, env=env, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 2
    message = 'langfuse-mw forward: needs redis-py: pip install "langfuse-mw[redis]"'
    assert done.stderr.strip().splitlines() == [message]
