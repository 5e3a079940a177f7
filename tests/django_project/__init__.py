"""A small Django project: the shared test app, sync views (urls) and async ones (urls_async)."""

from __future__ import annotations

import os


def setup() -> None:
    """Configure Django once for the test session (settings module of this package)."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.django_project.settings")
    import django
    from django.apps import apps

    if not apps.ready:
        django.setup()
