"""The e2e FastAPI app for tests/test_reliability_cases.py, with two test hooks.

``RELIABILITY_BACKOFF="base,cap"`` shortens the export back-off (not an option: only tests
need it), and ``GET /_export_thread`` answers the export thread's native id so the test can
read that one thread's CPU time from ``/proc/<pid>/task/<tid>/stat``.
"""

from __future__ import annotations

import os
import threading

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import langfuse_mw
from langfuse_mw import LangfuseMiddleware
from tests.apps import fastapi_app

_runtime = langfuse_mw.init()  # from the LANGFUSE_* environment, as the middleware would
if _runtime.queue is not None and os.environ.get("RELIABILITY_BACKOFF"):
    base, cap = (float(part) for part in os.environ["RELIABILITY_BACKOFF"].split(","))
    _runtime.queue.backoff_base, _runtime.queue.backoff_cap = base, cap


async def export_thread(request: Request) -> JSONResponse:
    ids = [t.native_id for t in threading.enumerate() if t.name == "langfuse-mw-export"]
    return JSONResponse({"pid": os.getpid(), "native_ids": ids})


app = fastapi_app()
app.router.routes.append(Route("/_export_thread", export_thread))
app.add_middleware(LangfuseMiddleware)
