"""The hello-world app the server benchmark runs under uvicorn; BENCH_VARIANT picks the tracing."""

from __future__ import annotations

import os
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route


async def hello(request: Request) -> Response:
    return PlainTextResponse("hello")


def build() -> Any:
    variant = os.environ.get("BENCH_VARIANT", "bare")
    app = Starlette(routes=[Route("/items/{item_id}", hello)])
    if variant.startswith("langfuse_mw"):
        from langfuse_mw import LangfuseMiddleware

        rate = 0.1 if variant.endswith("10%") else 1.0
        app.add_middleware(LangfuseMiddleware, sample_rate=rate)
    elif variant == "otel":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider()
        endpoint = os.environ["LANGFUSE_BASE_URL"] + "/v1/traces"
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        app.add_middleware(
            OpenTelemetryMiddleware, tracer_provider=provider, exclude_spans=["receive", "send"]
        )
    return app


app = build()
