"""System checks: ``settings.LANGFUSE_MW`` and the middleware's place in ``MIDDLEWARE``."""

from __future__ import annotations

from typing import Any

from django.conf import settings  # type: ignore[import-untyped]
from django.core import checks  # type: ignore[import-untyped]
from django.core.exceptions import ImproperlyConfigured  # type: ignore[import-untyped]
from django.utils.module_loading import import_string  # type: ignore[import-untyped]

from ..config import resolve_settings
from . import conf

__all__ = ["check_middleware", "check_settings"]

MIDDLEWARE_PATHS = (
    "langfuse_mw.django.LangfuseMiddleware",
    "langfuse_mw.django.middleware.LangfuseMiddleware",
)
AUTHENTICATION = "django.contrib.auth.middleware.AuthenticationMiddleware"
# Django's middleware that change the response's status or body after the view.
RESPONSE_CHANGING = (
    "django.middleware.gzip.GZipMiddleware",
    "django.middleware.http.ConditionalGetMiddleware",
)
# Django's middleware that replace a 404 after the view: CommonMiddleware with APPEND_SLASH (a
# redirect to the path with a slash), LocaleMiddleware (to the language's prefix), the
# redirects and flatpages fallbacks (a redirect, a page).
REPLACING_404 = (
    "django.middleware.common.CommonMiddleware",
    "django.middleware.locale.LocaleMiddleware",
    "django.contrib.redirects.middleware.RedirectFallbackMiddleware",
    "django.contrib.flatpages.middleware.FlatpageFallbackMiddleware",
)
_DOCS = "See docs/django.md in langfuse-mw."


def check_settings(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    """E001: LANGFUSE_MW is not a dict; E002: an unknown option or an invalid value."""
    raw = getattr(settings, "LANGFUSE_MW", None)
    try:
        options = conf.options(raw)
    except ImproperlyConfigured as exc:
        code = "E001" if raw is not None and not isinstance(raw, dict) else "E002"
        return [checks.Error(str(exc), hint=_DOCS, id=f"langfuse_mw.{code}")]
    try:
        resolve_settings(options)
    except (TypeError, ValueError) as exc:
        return [checks.Error(f"settings.LANGFUSE_MW: {exc}", hint=_DOCS, id="langfuse_mw.E002")]
    return []


def check_middleware(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    """E003: listed twice; W001: not listed; W002-W005: placed where it misses things."""
    middleware = [str(path) for path in getattr(settings, "MIDDLEWARE", None) or ()]
    found = [i for i, path in enumerate(middleware) if path in MIDDLEWARE_PATHS]
    if not found:
        return [
            checks.Warning(
                "langfuse_mw.django is installed but its LangfuseMiddleware is not in "
                "MIDDLEWARE: no request is traced.",
                hint=f'Add "{MIDDLEWARE_PATHS[0]}" to MIDDLEWARE. {_DOCS}',
                id="langfuse_mw.W001",
            )
        ]
    if len(found) > 1:
        return [
            checks.Error(
                "LangfuseMiddleware is listed more than once in MIDDLEWARE: every request "
                "would be traced twice.",
                hint="Keep one entry.",
                id="langfuse_mw.E003",
            )
        ]
    position = found[0]
    messages = []
    # Django offers a view's exception to process_exception() from the bottom of MIDDLEWARE
    # up: one below us that returns a response hides the exception from us.
    hiding = [path for path in middleware[position + 1 :] if _handles_exceptions(path)]
    if hiding:
        messages.append(
            checks.Warning(
                f"{', '.join(hiding)} below LangfuseMiddleware in MIDDLEWARE can turn view "
                "exceptions into responses in process_exception(); LangfuseMiddleware then "
                "never sees those exceptions (no type or message on the observation).",
                hint="Move LangfuseMiddleware below them in MIDDLEWARE. " + _DOCS,
                id="langfuse_mw.W002",
            )
        )
    raw = getattr(settings, "LANGFUSE_MW", None)
    reads_user = isinstance(raw, dict) and raw.get("user_id_from") is not None
    if reads_user and AUTHENTICATION in middleware[position + 1 :]:
        messages.append(
            checks.Warning(
                "LANGFUSE_MW['user_id_from'] is set but LangfuseMiddleware comes before "
                "AuthenticationMiddleware: request.user is not set yet when it is called.",
                hint="Move LangfuseMiddleware below AuthenticationMiddleware. " + _DOCS,
                id="langfuse_mw.W003",
            )
        )
    changing = [path for path in middleware[:position] if path in RESPONSE_CHANGING]
    if changing:
        messages.append(
            checks.Warning(
                f"{', '.join(changing)} above LangfuseMiddleware in MIDDLEWARE change the "
                "response after it: the observation records the view's status and size, not "
                "the 304 or the compressed body the client gets.",
                hint="Move LangfuseMiddleware above them in MIDDLEWARE. " + _DOCS,
                id="langfuse_mw.W004",
            )
        )
    replacing = [
        path
        for path in middleware[:position]
        if path in REPLACING_404 and (path != REPLACING_404[0] or settings.APPEND_SLASH)
    ]
    if replacing:
        messages.append(
            checks.Warning(
                f"{', '.join(replacing)} above LangfuseMiddleware in MIDDLEWARE replace a 404 "
                "after it (an APPEND_SLASH or language redirect, a fallback redirect or page): "
                "the observation records a 404 the client never got.",
                hint="Move LangfuseMiddleware above them in MIDDLEWARE, below "
                "AuthenticationMiddleware (which may come before CommonMiddleware). " + _DOCS,
                id="langfuse_mw.W005",
            )
        )
    return messages


def _handles_exceptions(path: str) -> bool:
    try:
        return callable(getattr(import_string(path), "process_exception", None))
    except Exception:  # Django reports a middleware that cannot be imported; a check never fails
        return False
