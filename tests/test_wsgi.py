"""LangfuseWSGIMiddleware on plain WSGI apps: the PEP 3333 details a framework would hide."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace as otel_trace

from langfuse_mw import get_request_context, health
from langfuse_mw.testing import LangfuseCapture
from langfuse_mw.wsgi import LangfuseWSGIMiddleware
from tests.wsgi_apps import driver
from tests.wsgi_apps.driver import FileWrapper

TEXT = [("Content-Type", "text/plain")]


class Body:
    """A response iterable with close(), recording what the server did with it."""

    def __init__(self, chunks: list[bytes], fail_at: int | None = None) -> None:
        self.chunks = chunks
        self.fail_at = fail_at
        self.closed = 0
        self.seen: list[Any] = []

    def __iter__(self) -> Iterator[bytes]:
        for n, chunk in enumerate(self.chunks):
            self.seen.append(get_request_context())
            if n == self.fail_at:
                raise ValueError("broken body")
            yield chunk

    def close(self) -> None:
        self.closed += 1


def single(capture: LangfuseCapture) -> dict[str, Any]:
    (root,) = capture.roots()
    return root


def test_plain_app_without_route_is_unmatched_and_keeps_the_raw_path_in_the_input(
    langfuse_capture: LangfuseCapture,
) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", TEXT)
        return [b"hello"]

    result = driver.call(LangfuseWSGIMiddleware(app), "/anything/123", query=b"a=1")
    assert result.body == b"hello"
    root = langfuse_capture.single(name="GET <unmatched>")
    assert root["input"] == {"method": "GET", "path": "/anything/123", "query": "a=1"}


def test_script_name_and_non_ascii_paths_are_the_full_decoded_path(
    langfuse_capture: LangfuseCapture,
) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", TEXT)
        return [b""]

    environ = driver.environ("/caf\u00e9/x")
    environ["SCRIPT_NAME"] = "/mounted"
    list(LangfuseWSGIMiddleware(app)(environ, lambda *a: None))
    assert single(langfuse_capture)["input"]["path"] == "/mounted/caf\u00e9/x"


def test_status_and_exception_from_start_response_with_exc_info(
    langfuse_capture: LangfuseCapture,
) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        try:
            raise KeyError("lost")
        except KeyError:
            start_response("503 Service Unavailable", TEXT, sys.exc_info())
        return [b"sorry"]

    seen: list[Any] = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        seen.append((status, exc_info is not None))
        return lambda data: None

    body = LangfuseWSGIMiddleware(app)(driver.environ("/x"), start_response)
    assert list(body) == [b"sorry"]
    body.close()  # type: ignore[attr-defined]
    assert seen == [("503 Service Unavailable", True)]  # exc_info passed on to the server
    root = single(langfuse_capture)
    assert root["output"] == {"statusCode": 503}
    assert root["level"] == "ERROR"
    assert root["status_message"] == "KeyError: 'lost'"


def test_exception_while_iterating_is_recorded_and_reraised_unchanged(
    langfuse_capture: LangfuseCapture,
) -> None:
    inner = Body([b"a", b"b"], fail_at=1)

    def app(environ: dict[str, Any], start_response: Any) -> Body:
        start_response("200 OK", TEXT)
        return inner

    result = driver.call(LangfuseWSGIMiddleware(app), "/x")
    assert isinstance(result.exception, ValueError) and str(result.exception) == "broken body"
    assert inner.closed == 1
    root = single(langfuse_capture)
    assert root["level"] == "ERROR"
    assert root["status_message"] == "ValueError: broken body"
    assert root["output"] == {"statusCode": 200}  # the status line was already sent
    assert "disconnected" not in root["metadata"]


def test_exception_raised_by_the_app_is_the_same_object(langfuse_capture: LangfuseCapture) -> None:
    error = RuntimeError("mine")

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        raise error

    with pytest.raises(RuntimeError) as raised:
        LangfuseWSGIMiddleware(app)(driver.environ("/x"), lambda *a: None)
    assert raised.value is error
    assert single(langfuse_capture)["output"] == {"statusCode": 500}
    assert get_request_context() is None


def test_close_is_forwarded_once_and_the_context_is_reset_between_chunks(
    langfuse_capture: LangfuseCapture,
) -> None:
    inner = Body([b"a", b"b", b"c"])

    def app(environ: dict[str, Any], start_response: Any) -> Body:
        start_response("200 OK", TEXT)
        return inner

    body = LangfuseWSGIMiddleware(app)(
        driver.environ("/x", headers=[(b"x-request-id", b"rid-1")]), lambda *a: None
    )
    outside = []
    for _ in body:
        # The server's own code between chunks runs outside the request.
        outside.append((get_request_context(), otel_trace.get_current_span()))
    body.close()  # type: ignore[attr-defined]
    assert inner.closed == 1
    assert [ctx.request_id for ctx in inner.seen] == ["rid-1"] * 3
    assert outside == [(None, otel_trace.INVALID_SPAN)] * 3
    assert single(langfuse_capture)["metadata"]["responseSize"] == 3


def test_close_failure_is_recorded_and_reraised(langfuse_capture: LangfuseCapture) -> None:
    class Failing(Body):
        def close(self) -> None:
            raise OSError("close failed")

    def app(environ: dict[str, Any], start_response: Any) -> Body:
        start_response("200 OK", TEXT)
        return Failing([b"a"])

    body = LangfuseWSGIMiddleware(app)(driver.environ("/x"), lambda *a: None)
    next(iter(body))
    with pytest.raises(OSError, match="close failed"):
        body.close()  # type: ignore[attr-defined]
    assert single(langfuse_capture)["status_message"] == "OSError: close failed"


def test_legacy_write_is_counted_and_a_failed_write_is_a_disconnect(
    langfuse_capture: LangfuseCapture,
) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        write = start_response("200 OK", TEXT)
        write(b"12345")
        write(b"67890")
        return []

    calls = 0

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        def write(data: bytes) -> None:
            nonlocal calls
            calls += 1
            if calls == 2:
                raise BrokenPipeError("client gone")

        return write

    with pytest.raises(BrokenPipeError):
        LangfuseWSGIMiddleware(app)(driver.environ("/x"), start_response)
    root = single(langfuse_capture)
    assert root["metadata"]["responseSize"] == 5  # what was written: the second write failed
    assert root["metadata"]["disconnected"] is True
    # The server's own error on a client that left is a disconnect, not the app's error.
    assert (root["level"], root["status_message"]) == (
        "WARNING", "client disconnected before the response completed",
    )  # fmt: skip


def test_body_dropped_without_close_still_ends(langfuse_capture: LangfuseCapture) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", TEXT)
        yield b"a"
        yield b"b"

    body = LangfuseWSGIMiddleware(app)(driver.environ("/x"), lambda *a: None)
    next(iter(body))
    del body
    root = single(langfuse_capture)
    assert root["metadata"]["disconnected"] is True


def test_wsgi_input_is_never_read(langfuse_capture: LangfuseCapture) -> None:
    class Untouchable:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"wsgi.input.{name} was used")

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", TEXT)
        return [b"ok"]

    environ = driver.environ("/x", method="POST")
    environ["wsgi.input"] = Untouchable()
    assert list(LangfuseWSGIMiddleware(app)(environ, lambda *a: None)) == [b"ok"]
    assert single(langfuse_capture)["input"]["method"] == "POST"


def test_file_wrapper_is_handed_back_to_the_server(langfuse_capture: LangfuseCapture) -> None:
    import io

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Length", "4")])
        return environ["wsgi.file_wrapper"](io.BytesIO(b"data"))

    body = LangfuseWSGIMiddleware(app)(driver.environ("/x"), lambda *a: None)
    assert isinstance(body, FileWrapper)
    assert langfuse_capture.spans() == []  # not sent yet
    body.close()
    root = single(langfuse_capture)
    assert root["metadata"]["responseSize"] == 4
    assert "disconnected" not in root["metadata"]


def test_route_from_failures_are_contained(langfuse_capture: LangfuseCapture) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", TEXT)
        return [b"ok"]

    def route_from(environ: dict[str, Any]) -> str:
        raise LookupError("no")

    result = driver.call(LangfuseWSGIMiddleware(app, route_from=route_from), "/x")
    assert result.body == b"ok"
    assert single(langfuse_capture)["name"] == "GET <unmatched>"
    assert health()["internal_errors"]["wsgi.route"] >= 1


def test_each_thread_has_its_own_request(langfuse_capture: LangfuseCapture) -> None:
    barrier = threading.Barrier(8)

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", TEXT)
        barrier.wait(5)  # all eight requests are in flight at once
        current = get_request_context()
        assert current is not None
        yield current.request_id.encode()

    traced = LangfuseWSGIMiddleware(app)
    bodies: dict[int, bytes] = {}

    def one(n: int) -> None:
        headers = [(b"x-request-id", f"r-{n}".encode())]
        bodies[n] = driver.call(traced, "/x", headers=headers).body

    threads = [threading.Thread(target=one, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert bodies == {n: f"r-{n}".encode() for n in range(8)}


def test_without_credentials_requests_pass_through(caplog: Any) -> None:
    from langfuse_mw import runtime

    runtime.shutdown(0.1)

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", TEXT)
        return [b"ok"]

    with caplog.at_level(logging.WARNING, logger="langfuse_mw"):
        result = driver.call(LangfuseWSGIMiddleware(app), "/x")
    assert (result.status, result.body, result.header(b"x-request-id")) == (200, b"ok", None)
    assert any("tracing is off" in r.getMessage() for r in caplog.records)
    runtime.shutdown(0.1)


@pytest.mark.parametrize(
    ("module", "extra"), [("langfuse_mw.flask", "flask"), ("langfuse_mw.django", "django")]
)
def test_a_missing_framework_names_the_extra(module: str, extra: str) -> None:
    code = (
        f"import sys; sys.modules[{extra!r}] = None\n"
        f"import langfuse_mw, langfuse_mw.wsgi\n"
        f"try:\n    import {module}\nexcept ImportError as exc:\n    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert f'pip install "langfuse-mw[{extra}]"' in out.stdout


class _SlotsFileWrapper:
    """A server's wsgi.file_wrapper that takes no attributes (a C type, in some servers)."""

    __slots__ = ("blksize", "filelike")

    def __init__(self, filelike: Any, blksize: int = 8192) -> None:
        self.filelike, self.blksize = filelike, blksize

    def __iter__(self) -> Iterator[bytes]:
        return iter(lambda: self.filelike.read(self.blksize), b"")

    def close(self) -> None:
        self.filelike.close()


def test_a_file_wrapper_that_takes_no_attributes_still_sends_the_file(
    langfuse_capture: LangfuseCapture,
) -> None:
    import io

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Length", "4")])
        return environ["wsgi.file_wrapper"](io.BytesIO(b"data"))

    env = driver.environ("/file")
    env["wsgi.file_wrapper"] = _SlotsFileWrapper
    body = LangfuseWSGIMiddleware(app)(env, lambda *args: None)
    assert b"".join(body) == b"data"
    body.close()  # type: ignore[attr-defined]
    root = single(langfuse_capture)
    assert root["metadata"]["responseSize"] == 4 and "disconnected" not in root["metadata"]


def test_an_exception_after_start_response_is_answered_with_a_500(
    langfuse_capture: LangfuseCapture,
) -> None:
    # Nothing went out yet: the server answers the exception with a 500, whatever status the
    # app gave start_response (a Flask teardown failing after the view is this shape).
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", TEXT)
        raise ValueError("teardown broke")

    with pytest.raises(ValueError):
        LangfuseWSGIMiddleware(app)(driver.environ("/x"), lambda *args: None)
    root = single(langfuse_capture)
    assert root["output"] == {"statusCode": 500}
    assert (root["level"], root["status_message"]) == ("ERROR", "ValueError: teardown broke")


def test_an_error_page_refused_after_the_headers_went_out_keeps_their_status(
    langfuse_capture: LangfuseCapture,
) -> None:
    # PEP 3333: start_response(..., exc_info) raises once headers were sent; the client has
    # the first status, and the first Content-Length no longer holds.
    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [*TEXT, ("Content-Length", "5")])
        yield b"first"
        try:
            raise RuntimeError("late failure")
        except RuntimeError:
            start_response("500 Oops", TEXT, sys.exc_info())
        yield b"never"  # pragma: no cover

    sent = False

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        if exc_info is not None and sent:
            raise exc_info[1].with_traceback(exc_info[2])
        return lambda data: None

    body = LangfuseWSGIMiddleware(app)(driver.environ("/x"), start_response)
    chunks = iter(body)
    assert next(chunks) == b"first"
    sent = True
    with pytest.raises(RuntimeError, match="late failure"):
        next(chunks)
    body.close()  # type: ignore[attr-defined]
    root = single(langfuse_capture)
    assert root["output"] == {"statusCode": 200}


def test_close_reaches_the_app_once_and_always(langfuse_capture: LangfuseCapture) -> None:
    class Unstartable:
        closed = 0

        def __iter__(self) -> Iterator[bytes]:
            raise OSError("cannot open the body")

        def close(self) -> None:
            Unstartable.closed += 1

    body = Body([b"a"])
    result = LangfuseWSGIMiddleware(lambda env, sr: (sr("200 OK", TEXT), body)[1])(
        driver.environ("/x"), lambda *args: None
    )
    list(result)
    result.close()  # type: ignore[attr-defined]
    result.close()  # type: ignore[attr-defined]
    assert body.closed == 1
    unstartable = LangfuseWSGIMiddleware(lambda env, sr: (sr("200 OK", TEXT), Unstartable())[1])
    with pytest.raises(OSError):
        unstartable(driver.environ("/y"), lambda *args: None)
    assert Unstartable.closed == 1  # as a server would have done


def test_a_sendfile_the_client_broke_off_is_a_disconnect(langfuse_capture: LangfuseCapture) -> None:
    # Servers call the file wrapper's close() in a finally: with the write's OSError in flight
    # the file was not all sent.
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Length", "100000")])
        return environ["wsgi.file_wrapper"](__import__("io").BytesIO(b"x" * 100000))

    result = LangfuseWSGIMiddleware(app)(driver.environ("/big"), lambda *args: None)
    try:
        raise BrokenPipeError("client gone during sendfile")
    except BrokenPipeError:
        result.close()  # type: ignore[attr-defined]
    root = single(langfuse_capture)
    assert root["metadata"]["disconnected"] is True
