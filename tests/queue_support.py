"""Real processes for the durable-export tests: redis-server and forwarders."""

from __future__ import annotations

import contextlib
import gzip
import http.server
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, TraceFlags

from langfuse_mw._encode import encode_request
from langfuse_mw.devserver import DevServer
from langfuse_mw.queue.producer import entry_fields
from tests.servers import ROOT, free_port

PUBLIC_KEY = "pk-lf-dev"
SECRET_KEY = "sk-lf-dev"
STREAM = "langfuse-mw:spans"


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` every 20 ms; fail the test with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


class RedisServer:
    """A throw-away redis-server on 127.0.0.1 (no persistence) that can be stopped and restarted."""

    def __init__(self) -> None:
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="lfmw-redis-")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        self._closers: list[Callable[[], Any]] = []

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            [
                "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", self.dir, "--save", "", "--appendonly", "no",
                "--loglevel", "warning", "--logfile", os.path.join(self.dir, "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = self.client()
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"redis-server did not start on {self.port}") from None
                time.sleep(0.02)
        client.close()
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self.process = None

    def client(self) -> redis.Redis:
        client = redis.Redis.from_url(self.url, socket_timeout=5)
        self.on_close(client.close)
        return client

    def on_close(self, closer: Callable[[], Any]) -> None:
        """Call ``closer`` at teardown (clients must not leak sockets: warnings are errors)."""
        self._closers.append(closer)

    def close(self) -> None:
        for closer in self._closers:
            closer()
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def span(n: int) -> ReadableSpan:
    """A finished span whose span id is ``n`` (so tests can tell exactly which ones arrived)."""
    context = SpanContext(n + (1 << 64), n, False, TraceFlags(TraceFlags.SAMPLED))
    return ReadableSpan(
        name=f"s{n}",
        context=context,
        start_time=1,
        end_time=2,
        resource=Resource.create({"service.name": "queue-test"}),
        instrumentation_scope=InstrumentationScope("langfuse-sdk", "5", None, {}),
    )


def produce(client: redis.Redis, batches: int, per_batch: int = 1, first: int = 1) -> set[str]:
    """XADD ``batches`` gzip-encoded batches as the producer would; return their span ids."""
    ids: set[str] = set()
    pipe = client.pipeline(transaction=False)
    for b in range(batches):
        spans = [span(first + b * per_batch + k) for k in range(per_batch)]
        ids.update(f"{s.context.span_id:016x}" for s in spans)
        body = gzip.compress(encode_request(spans), compresslevel=1)
        pipe.xadd(STREAM, entry_fields(body, len(spans), PUBLIC_KEY))
        if b % 500 == 499:
            pipe.execute()
    pipe.execute()
    return ids


def unencodable(n: int) -> ReadableSpan:
    """``span(n)`` with an attribute no OTLP value can hold (a set): the encoder refuses it."""
    good = span(n)
    return ReadableSpan(
        name=good.name, context=good.context, start_time=1, end_time=2,
        resource=good.resource, attributes={"odd": {"a set"}},
    )  # fmt: skip


def span_ids(receiver: DevServer) -> list[str]:
    return [s["span_id"] for s in receiver.received_spans()]


class ForwarderProcess:
    """`python -m langfuse_mw.queue.forwarder` as a real process (fast back-off for tests)."""

    def __init__(self, redis_url: str, base_url: str, consumer: str, *args: str) -> None:
        self.log = Path(tempfile.mkstemp(prefix=f"lfmw-forward-{consumer}-", suffix=".log")[1])
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "LANGFUSE_PUBLIC_KEY": PUBLIC_KEY,
            "LANGFUSE_SECRET_KEY": SECRET_KEY,
            "LANGFUSE_BASE_URL": base_url,
            "LANGFUSE_MW_QUEUE_URL": redis_url,
        }
        command = [
            sys.executable, "-m", "langfuse_mw.queue.forwarder", "--consumer", consumer,
            "--backoff-base", "0.05", "--backoff-cap", "0.3", "--stats-interval", "0.2", *args,
        ]  # fmt: skip
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def terminate(self, timeout: float = 10.0) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self.log.unlink(missing_ok=True)


def stats(redis_url: str, *args: str) -> dict[str, Any]:
    """`forward --stats` through the real command line."""
    import json

    out = subprocess.run(
        [sys.executable, "-m", "langfuse_mw.queue.forwarder", "--stats", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "LANGFUSE_MW_QUEUE_URL": redis_url},
        capture_output=True,
        check=True,
        timeout=30,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


@contextlib.contextmanager
def size_limited_receiver(limit: int) -> Iterator[tuple[str, list[int]]]:
    """An endpoint that answers 413 to a body over ``limit`` bytes (a proxy's cap in front of
    Langfuse) and 200 otherwise: its URL, and the span ids it took, in arrival order."""
    received: list[int] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            if self.headers.get("content-encoding") == "gzip":
                body = gzip.decompress(body)
            if len(body) > limit:
                self.send_response(413)
            else:
                request = ExportTraceServiceRequest.FromString(body)
                for resource in request.resource_spans:
                    for scope in resource.scope_spans:
                        received.extend(int.from_bytes(s.span_id) for s in scope.spans)
                self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()
