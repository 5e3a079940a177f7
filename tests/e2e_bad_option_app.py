"""A Starlette app given a bad option through ``add_middleware`` (built at its first event)."""

from __future__ import annotations

from starlette.applications import Starlette

from langfuse_mw import LangfuseMiddleware

app = Starlette()
app.add_middleware(LangfuseMiddleware, sample_rate=2)
