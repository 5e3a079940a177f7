"""The shared test app as a plain WSGI callable with a tiny router (no framework)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qs

from langfuse_mw import get_request_context, submit_with_context
from tests.apps import llm_call

_pool = ThreadPoolExecutor(max_workers=4)
Handler = Callable[[dict[str, Any], dict[str, str]], tuple[int, list[tuple[str, str]], Any]]
TEXT = [("Content-Type", "text/plain")]


def context_json() -> bytes:
    current = get_request_context()
    assert current is not None
    fields = ("request_id", "user_id", "session_id", "trace_id", "observation_id")
    return json.dumps({name: getattr(current, name) for name in fields}).encode()


def stream_chunks(delay: float) -> Iterator[bytes]:
    for n in range(3):
        time.sleep(delay)
        yield f"data: {n}\n\n".encode()


def context_chunks() -> Iterator[bytes]:
    # Runs after the view returned: the request's context must be there again.
    current = get_request_context()
    assert current is not None
    yield current.request_id.encode()
    yield llm_call("inside the stream").encode()


def _item(env: dict[str, Any], args: dict[str, str]) -> Any:
    body = json.dumps({"item": int(args["item_id"]), "answer": llm_call(f"item {args['item_id']}")})
    return 200, [("Content-Type", "application/json")], [body.encode()]


def _boom(env: dict[str, Any], args: dict[str, str]) -> Any:
    raise RuntimeError("kaboom")


def _status(env: dict[str, Any], args: dict[str, str]) -> Any:
    return int(args["code"]), TEXT, [b"status"]


def _stream(env: dict[str, Any], args: dict[str, str]) -> Any:
    delay = float(parse_qs(env.get("QUERY_STRING", "")).get("delay", ["0.05"])[0])
    return 200, [("Content-Type", "text/event-stream")], stream_chunks(delay)


def _stream_ctx(env: dict[str, Any], args: dict[str, str]) -> Any:
    return 200, TEXT, context_chunks()


def _ctx(env: dict[str, Any], args: dict[str, str]) -> Any:
    return 200, [("Content-Type", "application/json")], [context_json()]


def _thread(env: dict[str, Any], args: dict[str, str]) -> Any:
    return 200, TEXT, [submit_with_context(_pool, llm_call, "from a thread").result().encode()]


def _own(env: dict[str, Any], args: dict[str, str]) -> Any:
    return 200, [*TEXT, ("X-Request-ID", "app-chosen")], [b"mine"]


def _hello(env: dict[str, Any], args: dict[str, str]) -> Any:
    return 200, TEXT, [b"ok"]


def _file(env: dict[str, Any], args: dict[str, str]) -> Any:
    import io

    data = b"file body " * 100
    wrapper = env["wsgi.file_wrapper"]
    return 200, [*TEXT, ("Content-Length", str(len(data)))], wrapper(io.BytesIO(data))


class _SavedAfterwards(list[bytes]):
    """A body whose close() does more work once the server has sent it, and fails."""

    def close(self) -> None:
        time.sleep(0.05)
        raise RuntimeError("could not save the conversation")


def _late(env: dict[str, Any], args: dict[str, str]) -> Any:
    return 200, TEXT, _SavedAfterwards([b"o", b"k"])  # two chunks, no Content-Length


ROUTES: list[tuple[str, str, Handler]] = [
    (r"/items/(?P<item_id>\d+)", "/items/{item_id}", _item),
    (r"/boom", "/boom", _boom),
    (r"/status/(?P<code>\d+)", "/status/{code}", _status),
    (r"/stream", "/stream", _stream),
    (r"/stream-ctx", "/stream-ctx", _stream_ctx),
    (r"/ctx", "/ctx", _ctx),
    (r"/thread", "/thread", _thread),
    (r"/own-request-id", "/own-request-id", _own),
    (r"/hello", "/hello", _hello),
    (r"/health", "/health", _hello),
    (r"/file", "/file", _file),
    (r"/late", "/late", _late),
]
_COMPILED = [(re.compile(pattern), template, handler) for pattern, template, handler in ROUTES]


def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    """Route, call the handler, answer; unknown paths get 404, exceptions propagate."""
    path = environ.get("PATH_INFO", "")
    for pattern, template, handler in _COMPILED:
        match = pattern.fullmatch(path)
        if match is not None:
            environ["app.route"] = template
            status, headers, body = handler(environ, match.groupdict())
            start_response(f"{status} X", headers)
            return body  # type: ignore[no-any-return]
    start_response("404 Not Found", TEXT)
    return [b"not found"]


def route_from(environ: dict[str, Any]) -> str | None:
    """The template the router matched (LangfuseWSGIMiddleware's ``route_from``)."""
    return environ.get("app.route")
