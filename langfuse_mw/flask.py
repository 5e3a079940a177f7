"""``LangfuseFlask``: the Flask extension, ``LangfuseFlask(app)`` or ``ext.init_app(app)``."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

try:
    from flask import Flask, request
    from flask.signals import got_request_exception
    from werkzeug.exceptions import MethodNotAllowed
except ImportError as exc:  # pragma: no cover - exercised without Flask installed
    raise ImportError('langfuse_mw.flask needs Flask: pip install "langfuse-mw[flask]"') from exc

from ._wsgi import Environ, WSGIApp
from .config import Settings
from .wsgi import LangfuseWSGIMiddleware, note_exception

__all__ = ["LangfuseFlask"]

EXTENSION = "langfuse_mw"
CONFIG_PREFIX = "LANGFUSE_MW_"
_OPTIONS = frozenset(f.name for f in dataclasses.fields(Settings) if f.name != "sources")


class LangfuseFlask:
    """Trace every request of a Flask app into Langfuse.

    ``LangfuseFlask(app, **options)``, or ``ext = LangfuseFlask(**options)`` then
    ``ext.init_app(app)``; ``app.config["LANGFUSE_MW_*"]`` overrides these options per app.
    """

    def __init__(self, app: Flask | None = None, **options: Any) -> None:
        self.options = options  # defaults for every app; per-app state lives on the app
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Register on ``app``; a second registration on the same app raises RuntimeError."""
        if EXTENSION in app.extensions:
            raise RuntimeError(
                f"LangfuseFlask is already registered on the app {app.name!r}: "
                "call LangfuseFlask(app) or init_app(app) once per app"
            )
        options = {**self.options, **config_options(app.config)}
        middleware = _FlaskMiddleware(app.wsgi_app, app, **options)
        app.wsgi_app = middleware  # type: ignore[method-assign]
        app.extensions[EXTENSION] = middleware
        # Unhandled exceptions (Flask answers 500) and those an errorhandler turned into a
        # response: both are noted, and recorded when the response is a 5xx.
        got_request_exception.connect(_on_exception, app)
        app.handle_user_exception = _noting(app.handle_user_exception)  # type: ignore[method-assign,assignment]


def config_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """Options from ``app.config["LANGFUSE_MW_<OPTION>"]`` (``LANGFUSE_MW_ENV`` is the preset)."""
    options: dict[str, Any] = {}
    for key, value in config.items():
        if not key.startswith(CONFIG_PREFIX):
            continue
        name = key[len(CONFIG_PREFIX) :].lower()
        name = "preset" if name == "env" else name
        if name not in _OPTIONS:
            raise TypeError(f"langfuse_mw: app.config[{key!r}] is not a langfuse_mw option")
        options[name] = value
    return options


class _FlaskMiddleware(LangfuseWSGIMiddleware):
    framework = "flask"

    def __init__(self, wsgi_app: WSGIApp, app: Flask, **options: Any) -> None:
        super().__init__(wsgi_app, **options)
        self.url_map = app.url_map

    def route(self, environ: Environ) -> str | None:
        # Flask's request, alive while the app answers (Flask clears this key at teardown).
        req = environ.get("werkzeug.request")
        if req is None:
            return None
        # Any werkzeug request sets that key; only Flask's has a rule.
        rule = getattr(req, "url_rule", None)
        if rule is not None:
            # Rules are relative to where the app is mounted (SCRIPT_NAME: werkzeug's
            # DispatcherMiddleware, a server's prefix); the observation's path is not.
            # root_path is the SCRIPT_NAME this app saw, its latin-1 bytes decoded as UTF-8
            # (as request_path does), without a trailing slash.
            return f"{req.root_path}{rule.rule}"
        error = getattr(req, "routing_exception", None)
        if isinstance(error, MethodNotAllowed) and error.valid_methods:
            # The path matched a rule, the method did not: name it after that rule.
            try:
                adapter = self.url_map.bind_to_environ(environ)
                method = next(iter(error.valid_methods))
                matched, _ = adapter.match(method=method, return_rule=True)
                return f"{req.root_path}{matched.rule}"
            except Exception:
                return None
        return None


def _on_exception(sender: Flask, exception: BaseException, **extra: Any) -> None:
    note_exception(request.environ, exception)


def _noting(handle: Callable[[Exception], Any]) -> Callable[[Exception], Any]:
    @functools.wraps(handle)
    def handle_user_exception(e: Exception) -> Any:
        note_exception(request.environ, e)
        return handle(e)

    return handle_user_exception
