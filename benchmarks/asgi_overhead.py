"""Per-request overhead of tracing Starlette and FastAPI apps, in-process, against the peers.

Variants, alternated round by round:
  bare                        the app alone
  langfuse_mw                 LangfuseMiddleware, 100 % traced, user/session/request id
  langfuse_mw (not sampled)   sample_rate=0: a request the sampler drops (kept only if it fails)
  langfuse_mw (caller did not sample)
                              sample_rate=0.1 and a traceparent with flags 00: the caller's
                              decision is followed (the usual request behind a sampling edge)
  langfuse_mw (excluded path) a request LangfuseMiddleware skips (exclude_paths)
  floor (dropped-request minimum)
                              benchmarks/floor.py: the least any middleware that keeps errors
                              and echoes the request id can do for a request it drops
  otel asgi (1 span)          opentelemetry-instrumentation-asgi, exclude_spans=receive/send
  otel asgi (not sampled)     the same with ParentBased(TraceIdRatioBased(0)): OpenTelemetry's
                              cost for a request its sampler drops
  naive langfuse (docs)       the @app.middleware("http") example from the Langfuse docs
                              (BaseHTTPMiddleware + start_as_current_observation)
  sentry asgi (traced)        sentry-sdk's SentryAsgiMiddleware, traces_sample_rate=1.0, no
                              integrations (benchmarks/_peers.py): a transaction per request
  sentry asgi (not sampled)   a second client, traces_sample_rate=0.0
  logfire asgi (traced)       logfire.instrument_asgi (OpenTelemetry's ASGI middleware on a
                              local Logfire configuration), sampling head=1.0
  logfire asgi (not sampled)  the same with head=0.0

Every tracing variant exports through a sink that encodes and gzips OTLP protobuf, Sentry
through its own transport, which prepares and gzips each envelope (only the network is left
out). Printed: the request path (wall µs/request on the request's thread, every exporter
holding the round and exporting between rounds), and total CPU µs/request with the export
included; medians of alternating rounds, min-max and ratios.

Each framework is a separate run of alternating rounds (FastAPI's own telemetry stays off: the
runtime's tracer provider is private, and Logfire's configurations are local).

    python benchmarks/asgi_overhead.py [--rounds 7] [--requests 3000]
                                       [--frameworks starlette,fastapi]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from langfuse import Langfuse
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from starlette.applications import Starlette
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from benchmarks._common import (
    NOT_SAMPLED_PARENT,
    ROUND_CAPACITY,
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

HEADERS = [
    (b"host", b"bench"),
    (b"user-agent", b"bench/1.0"),
    (b"x-user-id", b"user-123"),
    (b"x-session-id", b"session-456"),
    (b"accept", b"*/*"),
]


async def hello(request: Request) -> Response:
    return PlainTextResponse("hello")


def make_app(framework: str = "starlette") -> Any:
    if framework == "fastapi":
        from fastapi import FastAPI

        app = FastAPI()

        @app.get("/items/{item_id}")
        async def item(item_id: int) -> Response:
            return PlainTextResponse("hello")

        @app.get("/health")
        async def health() -> Response:
            return PlainTextResponse("hello")

        return app
    return Starlette(routes=[Route("/items/{item_id}", hello), Route("/health", hello)])


def driver(
    app: Any, path: str, extra: list[tuple[bytes, bytes]] | None = None
) -> Callable[[int], float]:
    """Return run(n) -> seconds for n sequential requests through the ASGI callable."""
    scope_template = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"page=2",
        "headers": HEADERS + (extra or []),
        "client": ("127.0.0.1", 50000),
        "server": ("bench", 80),
    }
    request = {"type": "http.request", "body": b"", "more_body": False}

    async def receive() -> dict[str, Any]:
        return request

    async def send(message: dict[str, Any]) -> None:
        return None

    async def many(n: int) -> float:
        started = time.perf_counter()
        for _ in range(n):
            await app(dict(scope_template), receive, send)
        return time.perf_counter() - started

    loop = asyncio.new_event_loop()

    def run(n: int) -> float:
        return loop.run_until_complete(many(n))

    return run


def langfuse_mw_app(sink: EncodingSink, framework: str, **options: Any) -> Any:
    from langfuse_mw import LangfuseMiddleware

    install_runtime(sink)
    app = make_app(framework)
    app.add_middleware(LangfuseMiddleware, **options)
    return app


def floor_app(framework: str) -> Any:
    from benchmarks.floor import FloorASGI

    app = make_app(framework)
    app.add_middleware(FloorASGI)
    return app


def otel_app(provider: TracerProvider, framework: str) -> Any:
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    app = make_app(framework)
    app.add_middleware(
        OpenTelemetryMiddleware, tracer_provider=provider, exclude_spans=["receive", "send"]
    )
    return app


def sentry_app(framework: str) -> Any:
    from sentry_sdk.integrations.asgi import SentryAsgiMiddleware

    app = make_app(framework)
    app.add_middleware(SentryAsgiMiddleware)
    return app


def logfire_app(peer: LogfirePeer, framework: str) -> Any:
    app = make_app(framework)
    app.add_middleware(peer.logfire.instrument_asgi)
    return app


def naive_app(client: Any, framework: str) -> Any:
    from langfuse import propagate_attributes

    app = make_app(framework)

    async def langfuse_middleware(request: Request, call_next: Any) -> Response:
        with (
            client.start_as_current_observation(
                as_type="span", name=f"{request.method} {request.url.path}"
            ) as span,
            propagate_attributes(
                user_id=request.headers.get("x-user-id"),
                session_id=request.headers.get("x-session-id"),
            ),
        ):
            response: Response = await call_next(request)
            span.update(output={"status_code": response.status_code})
        return response

    # What @app.middleware("http") does (the decorator is gone from Starlette 1.x).
    app.add_middleware(BaseHTTPMiddleware, dispatch=langfuse_middleware)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--frameworks", default="starlette,fastapi")
    args = parser.parse_args()

    header(
        "ASGI overhead, in-process (Starlette and FastAPI hello world)",
        ["langfuse-mw", "langfuse", "starlette", "fastapi", "opentelemetry-sdk",
         "opentelemetry-instrumentation-asgi", "sentry-sdk", "logfire"],
    )  # fmt: skip
    from benchmarks._common import HAVE_LOGFIRE, NO_LOGFIRE
    from benchmarks._peers import LogfirePeer, SentryPeer, print_counts

    sink = EncodingSink()
    otel_exporter, naive_exporter = EncodingExporter(), EncodingExporter()
    otel_provider = TracerProvider()
    otel_provider.add_span_processor(deferred_processor(otel_exporter))
    otel_dropping = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.0)))
    otel_dropping.add_span_processor(deferred_processor(otel_exporter))
    naive_client = Langfuse(
        public_key="pk-lf-naive",
        secret_key="sk-lf-naive",
        base_url="http://127.0.0.1:9",
        tracer_provider=TracerProvider(),
        span_exporter=naive_exporter,
        flush_at=ROUND_CAPACITY,
        flush_interval=3600,
    )
    sentry, sentry_dropping = SentryPeer(1.0), SentryPeer(0.0)
    flushes: dict[str, Callable[[], Any]] = {
        "langfuse_mw": lambda: runtime.flush(30),
        "otel asgi (1 span)": otel_provider.force_flush,
        "naive langfuse (docs)": naive_client.flush,
        "sentry asgi (traced)": sentry.flush,
    }
    logfire = logfire_dropping = None
    if HAVE_LOGFIRE:
        logfire, logfire_dropping = LogfirePeer(1.0), LogfirePeer(0.0)
        flushes["logfire asgi (traced)"] = logfire.flush
    else:
        print(NO_LOGFIRE)

    for framework in args.frameworks.split(","):
        variants = {
            "bare": driver(make_app(framework), "/items/1"),
            "langfuse_mw": driver(langfuse_mw_app(sink, framework), "/items/1"),
            "langfuse_mw (not sampled)": driver(
                langfuse_mw_app(sink, framework, sample_rate=0.0), "/items/1"
            ),
            "langfuse_mw (caller did not sample)": driver(
                langfuse_mw_app(sink, framework, sample_rate=0.1),
                "/items/1",
                [(b"traceparent", NOT_SAMPLED_PARENT.encode())],
            ),
            # The same route, excluded: only the middleware's own work differs from bare.
            "langfuse_mw (excluded path)": driver(
                langfuse_mw_app(sink, framework, exclude_paths=["/items/.*"]), "/items/1"
            ),
            # The least any middleware that keeps errors and echoes the id does when it drops.
            "floor (dropped-request minimum)": driver(floor_app(framework), "/items/1"),
            "otel asgi (1 span)": driver(otel_app(otel_provider, framework), "/items/1"),
            "otel asgi (not sampled)": driver(otel_app(otel_dropping, framework), "/items/1"),
            "naive langfuse (docs)": driver(naive_app(naive_client, framework), "/items/1"),
            # Each Sentry client is the process's client only while its own requests run.
            "sentry asgi (traced)": sentry.bound(driver(sentry_app(framework), "/items/1")),
            "sentry asgi (not sampled)": sentry_dropping.bound(
                driver(sentry_app(framework), "/items/1")
            ),
        }
        pairs = [
            ("langfuse_mw", "sentry asgi (traced)"),
            ("langfuse_mw (not sampled)", "otel asgi (not sampled)"),
            ("langfuse_mw (not sampled)", "sentry asgi (not sampled)"),
            ("langfuse_mw (not sampled)", "floor (dropped-request minimum)"),
        ]
        if logfire is not None and logfire_dropping is not None:
            variants["logfire asgi (traced)"] = driver(logfire_app(logfire, framework), "/items/1")
            variants["logfire asgi (not sampled)"] = driver(
                logfire_app(logfire_dropping, framework), "/items/1"
            )
            pairs[1:1] = [("langfuse_mw", "logfire asgi (traced)")]
            pairs.insert(4, ("langfuse_mw (not sampled)", "logfire asgi (not sampled)"))
        measure(
            f"{framework}: ", variants, flushes, rounds=args.rounds, requests=args.requests,
            peers=["otel asgi (1 span)", "naive langfuse (docs)"],
            pairs=pairs,
        )  # fmt: skip
    sentry_dropping.flush()
    health = runtime.health()
    print(
        f"langfuse_mw export: created={health['created']} exported={health['exported']} "
        f"dropped={health['dropped']} (sink saw {sink.spans}); spans exported by otel "
        f"{otel_exporter.spans}, by the naive middleware {naive_exporter.spans}"
    )
    print_counts((sentry, sentry_dropping), (logfire, logfire_dropping))


if __name__ == "__main__":
    main()
