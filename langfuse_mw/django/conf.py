"""``settings.LANGFUSE_MW`` read lazily: a changed setting (``override_settings``) takes effect
on the next request."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from django.conf import settings  # type: ignore[import-untyped]
from django.core.exceptions import ImproperlyConfigured  # type: ignore[import-untyped]
from django.utils.module_loading import import_string  # type: ignore[import-untyped]

from .._wsgi import header_keys
from ..config import resolve_settings
from ..core import RequestTracer

__all__ = ["State", "options", "state"]

# Options that take a callable also take its dotted path, as Django settings do.
_CALLABLES = ("user_id_from", "session_id_from", "request_id_validator")


@dataclass(frozen=True, slots=True)
class State:
    """What the middleware needs per request, built once per value of the setting."""

    tracer: RequestTracer
    keys: dict[str, str]


_cache: tuple[object, State] | None = None


def options(raw: object) -> dict[str, Any]:
    """Options from the value of ``settings.LANGFUSE_MW``; ImproperlyConfigured if unusable."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ImproperlyConfigured(
            f"settings.LANGFUSE_MW must be a dict of langfuse_mw options, got {type(raw).__name__}"
        )
    out: dict[str, Any] = {}
    for name, value in raw.items():
        if name in _CALLABLES and isinstance(value, str):
            try:
                value = import_string(value)
            except ImportError as exc:
                raise ImproperlyConfigured(f"settings.LANGFUSE_MW[{name!r}]: {exc}") from None
        out[name] = value
    return out


def state() -> State:
    """The State for the current value of ``settings.LANGFUSE_MW`` (cached by identity)."""
    global _cache
    raw = getattr(settings, "LANGFUSE_MW", None)
    cached = _cache
    if cached is not None and cached[0] is raw:
        return cached[1]
    try:
        resolved = resolve_settings(options(raw))
    except (TypeError, ValueError) as exc:
        raise ImproperlyConfigured(f"settings.LANGFUSE_MW: {exc}") from None
    tracer = RequestTracer(resolved)
    built = State(tracer, header_keys(tracer))
    _cache = (raw, built)
    return built
