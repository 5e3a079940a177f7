"""The FastAPI test app with LangfuseMiddleware, as uvicorn serves it in the e2e tests."""

from __future__ import annotations

from langfuse_mw import LangfuseMiddleware
from tests.apps import fastapi_app

app = fastapi_app()
app.add_middleware(LangfuseMiddleware)
