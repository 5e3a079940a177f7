"""Service C: the Django pricing service's settings."""

SECRET_KEY = "demo-only"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "demo_apps.pricing.urls"
INSTALLED_APPS = ["langfuse_mw.django"]
MIDDLEWARE = ["langfuse_mw.django.LangfuseMiddleware"]
DATABASES: dict[str, object] = {}
USE_TZ = True
