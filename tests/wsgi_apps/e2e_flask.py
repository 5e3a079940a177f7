"""The shared Flask app with LangfuseFlask, as gunicorn serves it in the e2e tests."""

from __future__ import annotations

from langfuse_mw.flask import LangfuseFlask
from tests.wsgi_apps.flask_app import build

app = build()
LangfuseFlask(app)
