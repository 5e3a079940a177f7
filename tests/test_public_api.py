"""The names users and the docs rely on."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

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


USER_CODE = """
import subprocess
import sys
from typing import Any

from fastapi import FastAPI
from flask import Flask
from starlette.applications import Starlette

from langfuse_mw import LangfuseMiddleware, RequestInfo, get_request_context
from langfuse_mw.flask import LangfuseFlask
from langfuse_mw.httpx import AsyncTracedClient
from langfuse_mw.wsgi import LangfuseWSGIMiddleware


def user_from(info: RequestInfo) -> str | None:
    return info.headers.get("x-user-id")


starlette_app = Starlette()
starlette_app.add_middleware(LangfuseMiddleware, user_id_from=user_from)
fastapi_app = FastAPI()
fastapi_app.add_middleware(LangfuseMiddleware, sample_rate=0.1)
wrapped = LangfuseMiddleware(fastapi_app)
flask_app = Flask(__name__)
LangfuseFlask(flask_app)
ext = LangfuseFlask(exclude_paths=["/health"])
ext.init_app(Flask("other"))
wsgi_app = LangfuseWSGIMiddleware(flask_app.wsgi_app)
client = AsyncTracedClient(base_url="http://inventory:8000")
ctx = get_request_context()
request_id: str | None = ctx.request_id if ctx is not None else None
"""


CAPTURE_WITHOUT_PYTEST = """
import sys
sys.modules["pytest"] = None  # as where pytest is not installed
from langfuse import get_client
from langfuse_mw.testing import capture_langfuse
with capture_langfuse() as capture:
    with get_client().start_as_current_observation(name="work"):
        pass
    print([span["name"] for span in capture.spans()])
"""


def test_capture_langfuse_works_without_pytest() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CAPTURE_WITHOUT_PYTEST], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['work']"


def test_the_one_line_setups_type_check_under_mypy_strict(tmp_path: Any) -> None:
    # Users run mypy on their app: app.add_middleware(LangfuseMiddleware) must type-check
    # against Starlette's middleware protocol (which needs a positional-only app).
    import subprocess
    import sys

    user = tmp_path / "user_app.py"
    user.write_text(USER_CODE)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(user)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
