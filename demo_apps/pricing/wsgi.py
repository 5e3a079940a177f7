"""Service C's WSGI entry point (gunicorn demo_apps.pricing.wsgi)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo_apps.pricing.settings")
application = get_wsgi_application()
