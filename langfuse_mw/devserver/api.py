"""The read API: a subset of Langfuse's public ``/api/public/traces`` endpoints."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .store import Store

__all__ = ["MAX_LIMIT", "get_trace", "list_traces", "public_observation", "public_trace"]

MAX_LIMIT = 100
# Carried per observation for aggregation and the viewer; not part of Langfuse's shape.
_INTERNAL = frozenset(
    {
        "traceName",
        "userId",
        "sessionId",
        "tags",
        "public",
        "release",
        "isAppRoot",
        "startTimeUnixNano",
        "endTimeUnixNano",
    }
)

Answer = tuple[int, dict[str, Any]]


def public_observation(observation: Mapping[str, Any]) -> dict[str, Any]:
    """An observation as ``GET /api/public/observations`` shapes it."""
    return {k: v for k, v in observation.items() if k not in _INTERNAL}


def public_trace(trace: Mapping[str, Any]) -> dict[str, Any]:
    """A trace as ``GET /api/public/traces`` shapes it (plus the devserver's viewer path)."""
    out = {k: v for k, v in trace.items() if k != "startTimeUnixNano"}
    out["htmlPath"] = f"/trace/{trace['id']}"
    if "observations" in trace:
        out["observations"] = [public_observation(o) for o in trace["observations"]]
    return out


def _int_param(query: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")
    return value


def list_traces(store: Store, query: Mapping[str, str]) -> Answer:
    """``GET /api/public/traces?userId=&sessionId=&name=&page=&limit=``."""
    try:
        page = _int_param(query, "page", 1, 1, 10**9)
        limit = _int_param(query, "limit", 50, 1, MAX_LIMIT)
    except ValueError as exc:
        return 400, {"message": "Invalid request data", "error": str(exc)}
    traces, total = store.list_traces(
        user_id=query.get("userId") or None,
        session_id=query.get("sessionId") or None,
        name=query.get("name") or None,
        page=page,
        limit=limit,
    )
    meta = {
        "page": page,
        "limit": limit,
        "totalItems": total,
        "totalPages": math.ceil(total / limit),
    }
    return 200, {"data": [public_trace(t) for t in traces], "meta": meta}


def get_trace(store: Store, trace_id: str) -> Answer:
    """``GET /api/public/traces/{id}``: the trace with its observations."""
    trace = store.get_trace(trace_id)
    if trace is None:
        return 404, {"message": f"Trace {trace_id} not found within authorized project"}
    return 200, public_trace(trace)
