"""Per-request overhead of tracing a Flask app, in-process through the WSGI callable, one run.

Variants, alternated round by round:
  bare                        the Flask app alone
  langfuse_mw                 LangfuseFlask, 100 % traced, user/session/request id
  langfuse_mw (not sampled)   sample_rate=0: a request the sampler drops (kept only if it fails)
  langfuse_mw (caller did not sample)
                              sample_rate=0.1 and a traceparent with flags 00: the caller's
                              decision is followed (the usual request behind a sampling edge)
  langfuse_mw (excluded path) a request LangfuseFlask skips (exclude_paths)
  floor (dropped-request minimum)
                              benchmarks/floor.py: the least any middleware that keeps errors
                              and echoes the request id can do for a request it drops
  otel wsgi (1 span)          opentelemetry-instrumentation-wsgi's OpenTelemetryMiddleware
                              on app.wsgi_app, with a batch processor
  otel wsgi (not sampled)     the same with ParentBased(TraceIdRatioBased(0)): OpenTelemetry's
                              cost for a request its sampler drops
  sentry wsgi (traced)        sentry-sdk's SentryWsgiMiddleware on app.wsgi_app,
                              traces_sample_rate=1.0, no integrations (benchmarks/_peers.py)
  sentry wsgi (not sampled)   a second client, traces_sample_rate=0.0
  logfire wsgi (traced)       logfire.instrument_wsgi on app.wsgi_app (OpenTelemetry's WSGI
                              middleware on a local Logfire configuration), sampling head=1.0
  logfire wsgi (not sampled)  the same with head=0.0

Every tracing variant exports through a sink that encodes and gzips OTLP protobuf, Sentry
through its own transport, which prepares and gzips each envelope (only the network is left
out). Printed: the request path (wall µs/request, every exporter holding the
round and exporting between rounds) and total CPU µs/request with the export included. The
WSGI callable is called directly, the body iterated and closed as a server does (Flask's test
client would cost more than what is measured).

    python benchmarks/wsgi_overhead.py [--rounds 7] [--requests 3000]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flask import Flask
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from benchmarks._common import (
    NOT_SAMPLED_PARENT,
    EncodingExporter,
    EncodingSink,
    deferred_processor,
    header,
    install_runtime,
    measure,
)
from langfuse_mw import runtime

if TYPE_CHECKING:
    from benchmarks._peers import LogfirePeer

HEADERS = {
    "HTTP_HOST": "bench",
    "HTTP_USER_AGENT": "bench/1.0",
    "HTTP_X_USER_ID": "user-123",
    "HTTP_X_SESSION_ID": "session-456",
    "HTTP_ACCEPT": "*/*",
}


def make_app() -> Flask:
    app = Flask("bench")
    app.add_url_rule("/items/<int:item_id>", "item", lambda item_id: "hello")
    app.add_url_rule("/health", "health", lambda: "hello")
    return app


def driver(app: Any, path: str, extra: dict[str, str] | None = None) -> Callable[[int], float]:
    """Return run(n) -> seconds for n sequential requests through the WSGI callable."""
    template = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": "page=2",
        "SERVER_NAME": "bench",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        **HEADERS,
        **(extra or {}),
    }

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        return None

    def run(n: int) -> float:
        started = time.perf_counter()
        for _ in range(n):
            environ = dict(template)
            environ["wsgi.input"] = io.BytesIO(b"")
            body = app(environ, start_response)
            for _chunk in body:
                pass
            close = getattr(body, "close", None)
            if close is not None:
                close()
        return time.perf_counter() - started

    return run


def langfuse_mw_app(sink: EncodingSink, **options: Any) -> Any:
    from langfuse_mw.flask import LangfuseFlask

    install_runtime(sink)
    app = make_app()
    LangfuseFlask(app, **options)
    return app


def floor_app() -> Any:
    from benchmarks.floor import FloorWSGI

    app = make_app()
    app.wsgi_app = FloorWSGI(app.wsgi_app)  # type: ignore[method-assign]
    return app


def otel_app(provider: TracerProvider) -> Any:
    from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware

    app = make_app()
    app.wsgi_app = OpenTelemetryMiddleware(app.wsgi_app, tracer_provider=provider)  # type: ignore[method-assign]
    return app


def sentry_app() -> Any:
    from sentry_sdk.integrations.wsgi import SentryWsgiMiddleware

    app = make_app()
    app.wsgi_app = SentryWsgiMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    return app


def logfire_app(peer: LogfirePeer) -> Any:
    app = make_app()
    wsgi_app: Any = peer.logfire.instrument_wsgi(app.wsgi_app)
    app.wsgi_app = wsgi_app  # type: ignore[method-assign]
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()

    header(
        "WSGI overhead, in-process (Flask hello world)",
        ["langfuse-mw", "langfuse", "flask", "werkzeug", "opentelemetry-sdk",
         "opentelemetry-instrumentation-wsgi", "sentry-sdk", "logfire"],
    )  # fmt: skip
    from benchmarks._common import HAVE_LOGFIRE, NO_LOGFIRE
    from benchmarks._peers import LogfirePeer, SentryPeer, print_counts

    sink = EncodingSink()
    otel_exporter = EncodingExporter()
    otel_provider = TracerProvider()
    otel_provider.add_span_processor(deferred_processor(otel_exporter))
    otel_dropping = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.0)))
    otel_dropping.add_span_processor(deferred_processor(otel_exporter))
    sentry, sentry_dropping = SentryPeer(1.0), SentryPeer(0.0)
    variants = {
        "bare": driver(make_app(), "/items/1"),
        "langfuse_mw": driver(langfuse_mw_app(sink), "/items/1"),
        "langfuse_mw (not sampled)": driver(langfuse_mw_app(sink, sample_rate=0.0), "/items/1"),
        "langfuse_mw (caller did not sample)": driver(
            langfuse_mw_app(sink, sample_rate=0.1),
            "/items/1",
            {"HTTP_TRACEPARENT": NOT_SAMPLED_PARENT},
        ),
        # The same route, excluded: only the middleware's own work differs from bare.
        "langfuse_mw (excluded path)": driver(
            langfuse_mw_app(sink, exclude_paths=["/items/.*"]), "/items/1"
        ),
        # The least any middleware that keeps errors and echoes the id does when it drops.
        "floor (dropped-request minimum)": driver(floor_app(), "/items/1"),
        "otel wsgi (1 span)": driver(otel_app(otel_provider), "/items/1"),
        "otel wsgi (not sampled)": driver(otel_app(otel_dropping), "/items/1"),
        # Each Sentry client is the process's client only while its own requests run.
        "sentry wsgi (traced)": sentry.bound(driver(sentry_app(), "/items/1")),
        "sentry wsgi (not sampled)": sentry_dropping.bound(driver(sentry_app(), "/items/1")),
    }
    flushes: dict[str, Callable[[], Any]] = {
        "langfuse_mw": lambda: runtime.flush(30),
        "otel wsgi (1 span)": otel_provider.force_flush,
        "sentry wsgi (traced)": sentry.flush,
    }
    pairs = [
        ("langfuse_mw", "sentry wsgi (traced)"),
        ("langfuse_mw (not sampled)", "otel wsgi (not sampled)"),
        ("langfuse_mw (not sampled)", "sentry wsgi (not sampled)"),
        ("langfuse_mw (not sampled)", "floor (dropped-request minimum)"),
    ]
    logfire = logfire_dropping = None
    if HAVE_LOGFIRE:
        logfire, logfire_dropping = LogfirePeer(1.0), LogfirePeer(0.0)
        variants["logfire wsgi (traced)"] = driver(logfire_app(logfire), "/items/1")
        variants["logfire wsgi (not sampled)"] = driver(logfire_app(logfire_dropping), "/items/1")
        flushes["logfire wsgi (traced)"] = logfire.flush
        pairs[1:1] = [("langfuse_mw", "logfire wsgi (traced)")]
        pairs.insert(4, ("langfuse_mw (not sampled)", "logfire wsgi (not sampled)"))
    else:
        print(NO_LOGFIRE)

    measure(
        "", variants, flushes, rounds=args.rounds, requests=args.requests,
        peers=["otel wsgi (1 span)"],
        pairs=pairs,
    )  # fmt: skip
    sentry_dropping.flush()
    health = runtime.health()
    print(
        f"langfuse_mw export: created={health['created']} exported={health['exported']} "
        f"dropped={health['dropped']} (sink saw {sink.spans}); otel exported {otel_exporter.spans}"
    )
    print_counts((sentry, sentry_dropping), (logfire, logfire_dropping))


if __name__ == "__main__":
    main()
