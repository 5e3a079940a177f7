"""Route templates from an ASGI scope (Starlette, FastAPI and their mounts), by duck typing.

Three sources, cheapest first: FastAPI's effective route (full path of included routers),
``scope["route"]`` located under the app's Mounts, and, when a router matched without saying
which route (FastAPI 0.16x with plain Starlette routes or mounted ASGI apps), a re-match of the
request against the routes with their own ``matches()``. A 404 costs none of these.
"""

from __future__ import annotations

from typing import Any

from ._types import Scope

__all__ = ["route_template"]

_CACHE_LIMIT = 4096
_MAX_DEPTH = 8
# id(route) -> (route, template). The route is kept so its id cannot be reused while cached;
# Starlette routes compare by value, so they cannot be dict keys themselves.
_cache: dict[int, tuple[Any, str]] = {}
# id(endpoint) -> (endpoint, number of top-level routes when looked up, template or None when
# the endpoint serves several routes or sits in a Mount, where only a re-match can tell).
_by_endpoint: dict[int, tuple[Any, int, str | None]] = {}


def route_template(scope: Scope, top_app: Any, path: str, root_path: str) -> str | None:
    """Return the matched route's template with Mount prefixes, or None if nothing matched.

    ``path`` and ``root_path`` are the scope's values before the app ran (routers rewrite them).
    """
    effective = (scope.get("fastapi") or {}).get("effective_route_context")
    path_format = getattr(effective, "path_format", None)
    if isinstance(path_format, str) and path_format:
        return path_format
    route = scope.get("route")
    if route is not None:
        return _located(route, top_app)
    endpoint = scope.get("endpoint")
    if endpoint is None:
        return None  # no router matched: a 404 costs nothing more
    routes = getattr(top_app, "routes", None)
    if routes is None:
        return None
    template = _unique_route(endpoint, routes)
    if template is not None:
        return template
    scratch = {
        "type": scope.get("type", "http"),
        "path": path,
        "root_path": root_path,
        "method": scope.get("method", "GET"),
        "headers": scope.get("headers", []),
    }
    return _rematch(routes, scratch, "", 0)


def _unique_route(endpoint: Any, routes: Any) -> str | None:
    # Starlette 1.x says which endpoint matched, not which route: an endpoint that serves
    # exactly one plain route names it without re-matching the request (~4 µs saved).
    try:
        count = len(routes)
    except TypeError:
        return None
    hit = _by_endpoint.get(id(endpoint))
    if hit is not None and hit[0] is endpoint and hit[1] == count:
        return hit[2]
    found: list[str] = []
    _serving(routes, endpoint, "", 0, found)
    template = found[0] if len(found) == 1 and found[0] else None
    if len(_by_endpoint) < _CACHE_LIMIT:
        _by_endpoint[id(endpoint)] = (endpoint, count, template)
    return template


def _serving(routes: Any, endpoint: Any, prefix: str, depth: int, found: list[str]) -> None:
    # Every route under ``routes`` whose endpoint is ``endpoint``; "" marks a Mount serving it.
    if depth > _MAX_DEPTH:
        found.append("")
        return
    for candidate in routes:
        path = getattr(candidate, "path", None)
        if not isinstance(path, str):
            if hasattr(candidate, "routes"):
                found.append("")  # a Host router: leave it to the re-match
            continue
        if _is_mount(candidate):
            if getattr(candidate, "app", None) is endpoint:
                found.append("")
            try:
                children = candidate.routes
            except Exception:
                continue
            _serving(children, endpoint, prefix + path, depth + 1, found)
        elif getattr(candidate, "endpoint", None) is endpoint:
            found.append(prefix + path or "/")


def _located(route: Any, top_app: Any) -> str | None:
    cached = _cache.get(id(route))
    if cached is not None and cached[0] is route:
        return cached[1]
    path = getattr(route, "path", None)
    if not isinstance(path, str):
        return None
    routes = getattr(top_app, "routes", None)
    template = _find(routes, route, "", 0) if routes is not None else None
    if template is None:
        template = path or "/"
    if _is_mount(route):
        # A Mount that is itself the match (StaticFiles, a plain ASGI app): the rest is free.
        template = f"{template.rstrip('/')}/{{path}}"
    if len(_cache) < _CACHE_LIMIT:
        _cache[id(route)] = (route, template)
    return template


def _is_mount(route: Any) -> bool:
    return hasattr(route, "app") and hasattr(route, "routes") and not hasattr(route, "endpoint")


def _find(routes: Any, target: Any, prefix: str, depth: int) -> str | None:
    if depth > _MAX_DEPTH:
        return None
    for candidate in routes:
        path = getattr(candidate, "path", None)
        if not isinstance(path, str):
            continue
        if candidate is target:
            return prefix + path or "/"
        if _is_mount(candidate):
            try:
                children = candidate.routes
            except Exception:  # a mounted app without a router
                continue
            found = _find(children, target, prefix + path, depth + 1)
            if found is not None:
                return found
    return None


def _rematch(routes: Any, scratch: dict[str, Any], prefix: str, depth: int) -> str | None:
    if depth > _MAX_DEPTH:
        return None
    partial: str | None = None
    for candidate in routes:
        path = getattr(candidate, "path", None)
        matches = getattr(candidate, "matches", None)
        if not isinstance(path, str) or matches is None:
            continue
        try:
            match, child = matches(scratch)
        except Exception:
            continue
        level = getattr(match, "value", match)  # starlette Match: NONE=0, PARTIAL=1, FULL=2
        if level == 2:
            if _is_mount(candidate):
                inner = _rematch(candidate.routes, {**scratch, **child}, prefix + path, depth + 1)
                return inner or f"{prefix}{path.rstrip('/')}/{{path}}"
            return prefix + path or "/"
        if level == 1 and partial is None:
            partial = prefix + path or "/"
    return partial
