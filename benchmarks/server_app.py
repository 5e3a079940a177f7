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

        options: dict[str, Any] = {"sample_rate": 1.0}
        if variant.endswith("10%"):
            options["sample_rate"] = 0.1
        elif variant.endswith("not sampled"):
            options["sample_rate"] = 0.0  # every request dropped (none fails or is slow here)
        elif variant.endswith("not sampled (no echo)"):
            options.update(sample_rate=0.0, echo_request_id=False)
        elif variant.endswith("excluded"):
            options["exclude_paths"] = ["/items/.*"]
        app.add_middleware(LangfuseMiddleware, **options)
    elif variant.startswith("otel"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        rate = 0.0 if variant.endswith("not sampled") else 1.0
        provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(rate)))
        endpoint = os.environ["LANGFUSE_BASE_URL"] + "/v1/traces"
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        app.add_middleware(
            OpenTelemetryMiddleware, tracer_provider=provider, exclude_spans=["receive", "send"]
        )
    return app


app = build()
