"""Settings of the test project; servers select the URLconf with DJANGO_URLCONF."""

from __future__ import annotations

import os

SECRET_KEY = "langfuse-mw-tests"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
ROOT_URLCONF = os.environ.get("DJANGO_URLCONF", "tests.django_project.urls")
INSTALLED_APPS = ["langfuse_mw.django"]
MIDDLEWARE = ["langfuse_mw.django.LangfuseMiddleware"]
DATABASES: dict[str, object] = {}
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "loggers": {"django.request": {"level": "CRITICAL"}},  # expected 500s, not test noise
}
