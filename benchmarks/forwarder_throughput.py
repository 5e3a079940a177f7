"""Forwarder throughput: batches/s and spans/s one `langfuse-mw forward` process drains.

A real redis-server holds a backlog of gzip-encoded OTLP batches (written as the producer
writes them); the forwarder drains it (`--drain`) into a sink process that answers 200, either
at once or after a simulated Langfuse latency. Each row is the median of the rounds.

    python benchmarks/forwarder_throughput.py [--rounds 3] [--batches 2000]
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace import ReadableSpan  # noqa: E402
from opentelemetry.sdk.util.instrumentation import InstrumentationScope  # noqa: E402
from opentelemetry.trace import SpanContext, TraceFlags  # noqa: E402

from langfuse_mw._encode import encode_request  # noqa: E402
from langfuse_mw.config import resolve_settings  # noqa: E402
from langfuse_mw.queue.forwarder import ForwarderOptions, _run  # noqa: E402
from langfuse_mw.queue.producer import entry_fields  # noqa: E402
from langfuse_mw.runtime import http_sender  # noqa: E402

STREAM = "bench:spans"
SINK = """
import http.server, sys, time
latency = float(sys.argv[2]) / 1000
class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        if latency:
            time.sleep(latency)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink)
server.daemon_threads = True
server.serve_forever()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def root_span(n: int) -> ReadableSpan:
    """A span shaped like a request's root observation (~20 attributes)."""
    attributes: dict[str, Any] = {
        "langfuse.observation.input": f'{{"method":"GET","path":"/items/{n}","query":""}}',
        "langfuse.observation.output": '{"statusCode":200}',
        "langfuse.trace.name": "GET /items/{item_id}",
        "langfuse.observation.level": "DEFAULT",
        "user.id": f"user-{n % 100}",
        "session.id": f"session-{n % 1000}",
        "langfuse.internal.is_app_root": True,
    }
    for key in ("requestId", "route", "method", "clientIp", "userAgent", "durationMs"):
        attributes[f"langfuse.observation.metadata.{key}"] = f'"value-{key}-{n}"'
    return ReadableSpan(
        name="GET /items/{item_id}",
        context=SpanContext(n + (1 << 64), n + 1, False, TraceFlags(TraceFlags.SAMPLED)),
        start_time=1_700_000_000_000_000_000 + n,
        end_time=1_700_000_000_020_000_000 + n,
        attributes=attributes,
        resource=Resource.create({"service.name": "bench"}),
        instrumentation_scope=InstrumentationScope("langfuse-sdk", "5.0.4", None, {}),
    )


def fill(client: redis.Redis, batches: int, per_batch: int) -> int:
    body = gzip.compress(encode_request([root_span(n) for n in range(per_batch)]), 5)
    pipe = client.pipeline(transaction=False)
    for n in range(batches):
        pipe.xadd(STREAM, entry_fields(body, per_batch, "pk-lf-bench"))  # type: ignore[arg-type]
        if n % 1000 == 999:
            pipe.execute()
    pipe.execute()
    return len(body)


def drain(redis_url: str, sink_url: str, workers: int) -> float:
    settings = resolve_settings(
        {"public_key": "pk-lf-bench", "secret_key": "sk-lf-bench", "base_url": sink_url},
        environ={},
    )
    from langfuse_mw.queue._redis import connect

    client = connect(redis_url, 10.0)
    options = ForwarderOptions(stream=STREAM, consumer="bench", block=0.05, stats_interval=60)
    started = time.perf_counter()
    code = _run(client, http_sender(settings, "pk-lf-bench", "sk-lf-bench"), options, workers,
                drain=True)  # fmt: skip
    elapsed = time.perf_counter() - started
    client.close()
    assert code == 0
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=2000)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="lfmw-bench-")
    redis_port = free_port()
    redis_proc = subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no",
         "--dir", workdir, "--logfile", os.path.join(workdir, "redis.log")],
    )  # fmt: skip
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    client = redis.Redis.from_url(redis_url)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    sinks: list[subprocess.Popen[bytes]] = []
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, redis-server "
          f"{client.info()['redis_version']}; sink, redis and forwarder on one host")  # fmt: skip
    print(f"{'latency':>8} {'spans/batch':>11} {'workers':>7} {'batch KiB':>9} "
          f"{'batches/s':>10} {'spans/s':>10}")  # fmt: skip
    try:
        for latency_ms, batches in ((0, args.batches), (20, max(200, args.batches // 10))):
            sink_port = free_port()
            sinks.append(subprocess.Popen(
                [sys.executable, "-c", SINK, str(sink_port), str(latency_ms)]
            ))  # fmt: skip
            time.sleep(0.5)
            for per_batch in (1, 64, 512):
                for workers in (1, 4, 16):
                    if latency_ms == 0 and workers == 16:
                        continue
                    rates = []
                    size = 0
                    for _ in range(args.rounds):
                        client.delete(STREAM)
                        size = fill(client, batches, per_batch)
                        rates.append(batches / drain(redis_url, f"http://127.0.0.1:{sink_port}",
                                                     workers))  # fmt: skip
                    rate = statistics.median(rates)
                    print(f"{latency_ms:>6}ms {per_batch:>11} {workers:>7} {size / 1024:>9.1f} "
                          f"{rate:>10.0f} {rate * per_batch:>10.0f}", flush=True)  # fmt: skip
    finally:
        for sink in sinks:
            sink.kill()
            sink.wait()
        client.close()
        redis_proc.kill()
        redis_proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
