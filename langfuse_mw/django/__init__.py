"""Django: ``"langfuse_mw.django.LangfuseMiddleware"`` in ``MIDDLEWARE``, options in
``settings.LANGFUSE_MW``; add ``"langfuse_mw.django"`` to ``INSTALLED_APPS`` for the checks."""

from __future__ import annotations

try:
    import django  # type: ignore[import-untyped]  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised without Django installed
    raise ImportError('langfuse_mw.django needs Django: pip install "langfuse-mw[django]"') from exc

from .middleware import LangfuseMiddleware

__all__ = ["LangfuseMiddleware"]
