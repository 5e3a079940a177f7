"""LangfuseFlask through Flask's test client: registration, config, Flask's own error handling."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from flask import Blueprint, Flask, abort

from langfuse_mw.flask import LangfuseFlask
from langfuse_mw.testing import LangfuseCapture
from tests.wsgi_apps import flask_app


def test_application_factory_with_init_app_and_per_app_config(
    langfuse_capture: LangfuseCapture,
) -> None:
    ext = LangfuseFlask(level_4xx="ERROR")
    first, second = flask_app.build(), flask_app.build()
    second.config["LANGFUSE_MW_LEVEL_4XX"] = "DEFAULT"  # app.config beats the constructor
    second.config["LANGFUSE_MW_USER_ID_HEADER"] = "x-account"
    for app in (first, second):
        ext.init_app(app)
    assert first.extensions["langfuse_mw"] is not second.extensions["langfuse_mw"]
    first.test_client().get("/status/404")
    second.test_client().get("/status/404", headers={"x-account": "acc-1"})
    levels = {(s["level"], s["user_id"]) for s in langfuse_capture.spans()}
    assert levels == {("ERROR", None), ("DEFAULT", "acc-1")}


def test_registering_twice_on_one_app_raises() -> None:
    app = flask_app.build()
    LangfuseFlask(app)
    with pytest.raises(RuntimeError, match="already registered on the app 'shared'"):
        LangfuseFlask(app)
    with pytest.raises(RuntimeError):
        LangfuseFlask().init_app(app)


def test_unknown_config_key_and_bad_values_fail_at_registration() -> None:
    app = flask_app.build()
    app.config["LANGFUSE_MW_SAMPLE_RAT"] = 0.5
    with pytest.raises(TypeError, match="LANGFUSE_MW_SAMPLE_RAT"):
        LangfuseFlask(app)
    app = flask_app.build()
    app.config["LANGFUSE_MW_SAMPLE_RATE"] = "often"
    with pytest.raises(ValueError, match="sample_rate"):
        LangfuseFlask(app)
    assert "langfuse_mw" not in app.extensions


def test_test_client_responses_are_traced_without_closing_them(
    langfuse_capture: LangfuseCapture,
) -> None:
    app = flask_app.build()
    LangfuseFlask(app)
    response = app.test_client().get("/items/7", headers={"x-user-id": "u-7"})
    assert response.status_code == 200
    # The response is still open: the body is complete all the same (its Content-Length).
    root = langfuse_capture.single(name="GET /items/<int:item_id>")
    assert root["user_id"] == "u-7"
    assert root["metadata"]["responseSize"] == len(response.data)


def test_rule_of_blueprint_and_wrong_method(langfuse_capture: LangfuseCapture) -> None:
    app = flask_app.build()
    bp = Blueprint("api", __name__, url_prefix="/api/v1")
    bp.add_url_rule("/users/<uuid:uid>", "user", lambda uid: "user")
    app.register_blueprint(bp)
    LangfuseFlask(app)
    client = app.test_client()
    assert client.get("/api/v1/users/12345678-1234-5678-1234-567812345678").status_code == 200
    assert client.get("/only-post").status_code == 405
    assert client.get("/items/not-a-number").status_code == 404
    names = sorted(s["name"] for s in langfuse_capture.spans())
    assert names == ["GET /api/v1/users/<uuid:uid>", "GET /only-post", "GET <unmatched>"]


def test_exception_turned_into_500_is_recorded(langfuse_capture: LangfuseCapture) -> None:
    app = flask_app.build()
    LangfuseFlask(app)
    response = app.test_client().get("/boom")
    assert response.status_code == 500
    root = langfuse_capture.single(name="GET /boom")
    assert (root["level"], root["status_message"]) == ("ERROR", "RuntimeError: kaboom")
    assert root["output"] == {"statusCode": 500}


def test_propagated_exception_in_testing_mode_is_recorded_and_reraised(
    langfuse_capture: LangfuseCapture,
) -> None:
    app = flask_app.build()
    app.testing = True
    LangfuseFlask(app)
    with pytest.raises(RuntimeError, match="kaboom"):
        app.test_client().get("/boom")
    root = langfuse_capture.single(name="GET /boom")  # the rule was seen before teardown
    assert root["status_message"] == "RuntimeError: kaboom"


@pytest.mark.parametrize(
    ("handler_status", "level", "message"),
    [(500, "ERROR", "LookupError: missing"), (422, "WARNING", "HTTP 422")],
)
def test_errorhandler_responses_record_the_exception_only_when_5xx(
    langfuse_capture: LangfuseCapture, handler_status: int, level: str, message: str
) -> None:
    app = flask_app.build()

    @app.get("/lookup")
    def lookup() -> Any:
        raise LookupError("missing")

    @app.errorhandler(LookupError)
    def handle(error: Exception) -> Any:
        return {"error": str(error)}, handler_status

    LangfuseFlask(app)
    assert app.test_client().get("/lookup").status_code == handler_status
    root = langfuse_capture.single(name="GET /lookup")
    assert (root["level"], root["status_message"]) == (level, message)


def test_an_errorhandler_that_raises_is_the_recorded_error(
    langfuse_capture: LangfuseCapture,
) -> None:
    # The handler's own exception made the 500; the one it handled is in its stack trace.
    app = flask_app.build()

    @app.get("/lookup")
    def lookup() -> Any:
        raise LookupError("missing")

    @app.errorhandler(LookupError)
    def handle(error: Exception) -> Any:
        raise ValueError("the handler broke")

    LangfuseFlask(app)
    assert app.test_client().get("/lookup").status_code == 500
    root = langfuse_capture.single(name="GET /lookup")
    assert (root["level"], root["status_message"]) == ("ERROR", "ValueError: the handler broke")
    [event] = root["events"]
    stack = event["attributes"]["exception.stacktrace"]
    assert "LookupError: missing" in stack
    assert "During handling of the above exception" in stack


def test_custom_500_page_keeps_the_original_exception(langfuse_capture: LangfuseCapture) -> None:
    app = flask_app.build()

    @app.errorhandler(500)
    def page(error: Exception) -> Any:
        return "we are sorry", 500

    LangfuseFlask(app)
    response = app.test_client().get("/boom")
    assert (response.status_code, response.data) == (500, b"we are sorry")
    assert langfuse_capture.single(name="GET /boom")["status_message"] == "RuntimeError: kaboom"


def test_abort_with_4xx_is_not_an_exception(langfuse_capture: LangfuseCapture) -> None:
    app = Flask("aborting")
    app.add_url_rule("/forbidden", "forbidden", lambda: abort(403))
    LangfuseFlask(app)
    assert app.test_client().get("/forbidden").status_code == 403
    root = langfuse_capture.single(name="GET /forbidden")
    assert (root["level"], root["status_message"]) == ("WARNING", "HTTP 403")
    assert root["events"] == []


def test_stream_with_context_covers_the_whole_body(langfuse_capture: LangfuseCapture) -> None:
    app = flask_app.build()
    LangfuseFlask(app)
    started = time.time_ns()
    response = app.test_client().get("/stream?delay=0.05")
    assert response.data == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    response.close()
    root = langfuse_capture.single(name="GET /stream")
    assert root["end_time_unix_nano"] - root["start_time_unix_nano"] >= 150_000_000
    assert root["start_time_unix_nano"] >= started
    response = app.test_client().get("/stream-ctx", headers={"x-request-id": "rid-9"})
    assert response.data.startswith(b"rid-9")
    response.close()
    child = langfuse_capture.single(name="llm")
    assert child["parent_span_id"] == langfuse_capture.single(name="GET /stream-ctx")["span_id"]


def test_a_teardown_that_fails_is_the_500_the_client_gets(
    langfuse_capture: LangfuseCapture,
) -> None:
    # Flask calls start_response("200 OK") before its teardown; nothing is sent yet, so the
    # server answers the teardown's exception with a 500: that is what is recorded.
    app = flask_app.build()

    @app.teardown_request
    def broken(exc: BaseException | None) -> None:
        raise ValueError("teardown broke")

    LangfuseFlask(app)
    with pytest.raises(ValueError):
        app.test_client().get("/hello")
    root = langfuse_capture.single(name="GET /hello")
    assert root["output"] == {"statusCode": 500}
    assert (root["level"], root["status_message"]) == ("ERROR", "ValueError: teardown broke")


def test_an_outer_wsgi_middleware_and_the_extension_trace_once(
    langfuse_capture: LangfuseCapture,
) -> None:
    from langfuse_mw.wsgi import LangfuseWSGIMiddleware

    app = flask_app.build()
    LangfuseFlask(app)
    app.wsgi_app = LangfuseWSGIMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    response = app.test_client().get("/items/3", headers={"x-request-id": "req-once"})
    assert response.headers.get_all("x-request-id") == ["req-once"]
    (root,) = langfuse_capture.roots()
    assert root["name"] == "GET /items/<int:item_id>"
    assert langfuse_capture.single(name="llm")["parent_span_id"] == root["span_id"]


def test_per_app_connection_options_that_cannot_apply_are_said_once(
    langfuse_capture: LangfuseCapture, caplog: pytest.LogCaptureFixture
) -> None:
    # One runtime per process: a second app's own keys or environment cannot take effect,
    # and the log says which options (never their values).
    first, second = flask_app.build(), flask_app.build()
    second.config.update(
        LANGFUSE_MW_PUBLIC_KEY="pk-lf-other", LANGFUSE_MW_SECRET_KEY="sk-lf-other-secret",
        LANGFUSE_MW_ENVIRONMENT="bee",
    )  # fmt: skip
    with caplog.at_level("WARNING", logger="langfuse_mw"):
        LangfuseFlask(first)
        LangfuseFlask(second)
        LangfuseFlask(flask_app.build(), environment="bee")
    lines = [
        r.getMessage() for r in caplog.records if "different from the runtime" in r.getMessage()
    ]
    assert len(lines) == 1
    assert "public_key, secret_key, environment" in lines[0]
    assert "sk-lf-other-secret" not in caplog.text


def test_a_request_context_taken_after_the_response_still_nests_work_in_a_thread(
    langfuse_capture: LangfuseCapture,
) -> None:
    # A close callback runs once the body was sent: the request's observation has ended and
    # let go of its context. A request context first asked for there, handed to a thread,
    # still nests that thread's work under the request.
    from flask import Response

    from langfuse_mw import get_request_context, run_with_context
    from tests.apps import llm_call

    app = Flask("late-context")

    @app.get("/late")
    def late() -> Any:
        response = Response(iter([b"o", b"k"]), mimetype="text/plain")

        @response.call_on_close
        def hand_over() -> None:
            ctx = get_request_context()
            assert ctx is not None
            worker = threading.Thread(target=run_with_context, args=(ctx, llm_call, "later"))
            worker.start()
            worker.join()

        return response

    LangfuseFlask(app)
    response = app.test_client().get("/late")
    assert response.data == b"ok"
    response.close()
    root = langfuse_capture.single(name="GET /late")
    llm = langfuse_capture.single(name="llm")
    assert (llm["trace_id"], llm["parent_span_id"]) == (root["trace_id"], root["span_id"])


def mounted(layout: str) -> Any:
    """The shared app (as ``/api/...``, or ``/v1/api/...``) behind werkzeug's dispatcher."""
    from werkzeug.exceptions import NotFound
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    from langfuse_mw.wsgi import LangfuseWSGIMiddleware

    api = flask_app.build()
    if layout.startswith("flask-docs"):
        # Flask's "Application Dispatching" recipe: the traced front app hands /api to
        # another; the name comes from the request the mounted app made.
        if layout == "flask-docs-both":
            LangfuseFlask(api)
        front = Flask("front")
        front.wsgi_app = DispatcherMiddleware(front.wsgi_app, {"/api": api})  # type: ignore[method-assign]
        LangfuseFlask(front)
        return front
    LangfuseFlask(api)
    app: Any = DispatcherMiddleware(NotFound(), {"/api": api})
    if layout == "nested":
        app = DispatcherMiddleware(NotFound(), {"/v1": app})
    if layout == "wsgi-outside":
        # One observation: the outer middleware's, named by the extension inside.
        app = LangfuseWSGIMiddleware(app)
    return app


@pytest.mark.parametrize(
    "layout", ["extension", "nested", "wsgi-outside", "flask-docs", "flask-docs-both"]
)
def test_an_app_mounted_by_the_dispatcher_is_named_with_its_mount_point(
    langfuse_capture: LangfuseCapture, layout: str
) -> None:
    from werkzeug.test import Client

    prefix = "/v1/api" if layout == "nested" else "/api"
    client = Client(mounted(layout))
    assert client.get(f"{prefix}/items/7").status_code == 200
    assert client.get(f"{prefix}/only-post").status_code == 405
    assert client.get(f"{prefix}/nowhere/7").status_code == 404
    roots = {s["input"]["path"]: s for s in langfuse_capture.roots()}
    assert len(langfuse_capture.roots()) == 3  # one observation per request
    expected = {
        f"{prefix}/items/7": (f"GET {prefix}/items/<int:item_id>", f"{prefix}/items/<int:item_id>"),
        f"{prefix}/only-post": (f"GET {prefix}/only-post", f"{prefix}/only-post"),
        f"{prefix}/nowhere/7": ("GET <unmatched>", "<unmatched>"),
    }
    if layout == "flask-docs":
        # A 405 is named from the traced app's own url_map, which lacks the mounted app's
        # rules (docs/flask.md, Limitations: register the extension on the mounted app too).
        expected[f"{prefix}/only-post"] = ("GET <unmatched>", "<unmatched>")
    assert {path: (s["name"], s["metadata"]["route"]) for path, s in roots.items()} == expected
    assert roots[f"{prefix}/items/7"]["trace_name"] == f"GET {prefix}/items/<int:item_id>"


@pytest.mark.parametrize(
    ("script_name", "prefix"),
    [
        ("/shop", "/shop"),
        ("/shop/", "/shop"),  # werkzeug's root_path: no trailing slash
        ("/caf\u00e9".encode().decode("latin-1"), "/caf\u00e9"),  # PEP 3333: latin-1 bytes
        ("", ""),
    ],
)
def test_a_script_name_from_the_server_is_part_of_the_name(
    langfuse_capture: LangfuseCapture, script_name: str, prefix: str
) -> None:
    # gunicorn (SCRIPT_NAME in its environment, or from a trusted proxy) and mod_wsgi hand
    # the app a SCRIPT_NAME; the rule is relative to it, the observation's path is not.
    from tests.wsgi_apps import driver

    app = flask_app.build()
    LangfuseFlask(app)
    environ = driver.environ("/items/7")
    environ["SCRIPT_NAME"] = script_name
    result: list[str] = []
    body = app(environ, lambda status, headers, exc_info=None: result.append(status))
    b"".join(body)
    body.close()  # type: ignore[attr-defined]
    assert result == ["200 OK"]
    root = langfuse_capture.single(name=f"GET {prefix}/items/<int:item_id>")
    assert root["metadata"]["route"] == f"{prefix}/items/<int:item_id>"
    langfuse_capture.clear()
    # Flask's test client sets it from base_url.
    response = app.test_client().get("/items/8", base_url="http://localhost/shop")
    assert response.status_code == 200
    root = langfuse_capture.single(name="GET /shop/items/<int:item_id>")
    assert root["input"]["path"] == "/shop/items/8"
