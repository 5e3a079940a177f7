"""The Django app ``"langfuse_mw.django"``: registers the system checks."""

from __future__ import annotations

from django.apps import AppConfig  # type: ignore[import-untyped]


class LangfuseMwConfig(AppConfig):  # type: ignore[misc]
    """Add ``"langfuse_mw.django"`` to ``INSTALLED_APPS`` to get the ``langfuse_mw.*`` checks."""

    name = "langfuse_mw.django"
    label = "langfuse_mw"
    verbose_name = "Langfuse tracing"

    def ready(self) -> None:
        from django.core import checks  # type: ignore[import-untyped]

        from .checks import check_middleware, check_settings

        # Tagged so `manage.py check --tag langfuse_mw` runs just these; untagged runs include them.
        checks.register(check_settings, "langfuse_mw")
        checks.register(check_middleware, "langfuse_mw")
