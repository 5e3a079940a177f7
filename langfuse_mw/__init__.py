"""Trace every HTTP request of a Python web service into Langfuse."""

from __future__ import annotations

from ._version import __version__
from .asgi import LangfuseMiddleware
from .config import ConfigError, Settings
from .context import (
    RequestContext,
    bind_context,
    get_request_context,
    run_with_context,
    submit_with_context,
)
from .core import RequestInfo
from .runtime import flush, health, init, shutdown
from .safe import safe_trace

__all__ = [
    "ConfigError",
    "LangfuseMiddleware",
    "RequestContext",
    "RequestInfo",
    "Settings",
    "__version__",
    "bind_context",
    "flush",
    "get_request_context",
    "health",
    "init",
    "run_with_context",
    "safe_trace",
    "shutdown",
    "submit_with_context",
]
