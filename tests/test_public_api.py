"""The names users and the docs rely on."""

from __future__ import annotations

import langfuse_mw


def test_public_names() -> None:
    assert langfuse_mw.__all__ == sorted(langfuse_mw.__all__)
    assert set(langfuse_mw.__all__) == {
        "ConfigError",
        "LangfuseMiddleware",
        "RequestContext",
        "RequestInfo",
        "Settings",
        "__version__",
        "bind_context",
        "flush",
        "get_request_context",
        "health",
        "init",
        "run_with_context",
        "safe_trace",
        "shutdown",
        "submit_with_context",
    }
    for name in langfuse_mw.__all__:
        assert getattr(langfuse_mw, name) is not None


def test_middleware_is_importable_from_its_module() -> None:
    from langfuse_mw.asgi import LangfuseMiddleware

    assert LangfuseMiddleware is langfuse_mw.LangfuseMiddleware


def test_pytest_plugin_is_registered(pytestconfig: object) -> None:
    manager = pytestconfig.pluginmanager  # type: ignore[attr-defined]
    assert manager.get_plugin("langfuse_mw") is not None
