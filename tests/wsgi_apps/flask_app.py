"""The shared test app on Flask."""

from __future__ import annotations

import io
import time
from typing import Any

from flask import Flask, Response, request, send_file, stream_with_context

from langfuse_mw import submit_with_context
from tests.apps import llm_call
from tests.wsgi_apps.plain import _pool, context_chunks, context_json, stream_chunks


def build() -> Flask:
    """A fresh Flask app with the shared routes (no extension registered)."""
    app = Flask("shared")

    @app.get("/items/<int:item_id>")
    def item(item_id: int) -> Any:
        return {"item": item_id, "answer": llm_call(f"item {item_id}")}

    @app.get("/boom")
    def boom() -> Any:
        raise RuntimeError("kaboom")

    @app.get("/status/<int:code>")
    def status(code: int) -> Any:
        return "status", code

    @app.get("/stream")
    def stream() -> Any:
        delay = float(request.args.get("delay", "0.05"))
        return Response(stream_chunks(delay), mimetype="text/event-stream")

    @app.get("/stream-ctx")
    def stream_ctx() -> Any:
        return Response(stream_with_context(context_chunks()), mimetype="text/plain")

    @app.get("/ctx")
    def ctx() -> Any:
        return Response(context_json(), mimetype="application/json")

    @app.get("/thread")
    def thread() -> Any:
        return submit_with_context(_pool, llm_call, "from a thread").result()

    @app.get("/own-request-id")
    def own() -> Any:
        return "mine", 200, {"X-Request-ID": "app-chosen"}

    @app.get("/hello")
    @app.get("/health")
    def hello() -> Any:
        return "ok"

    @app.get("/file")
    def file() -> Any:
        return send_file(io.BytesIO(b"file body " * 100), mimetype="text/plain")

    @app.get("/late")
    def late() -> Any:
        response = Response(iter([b"o", b"k"]), mimetype="text/plain")  # streamed: 2 chunks

        @response.call_on_close
        def save() -> None:  # runs once the server has sent the response
            time.sleep(0.05)
            raise RuntimeError("could not save the conversation")

        return response

    @app.post("/only-post")
    def only_post() -> Any:
        return "posted"

    return app
