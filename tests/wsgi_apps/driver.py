"""Drive a WSGI app as a server would: raw header bytes, iteration, close(), disconnects."""

from __future__ import annotations

import io
from typing import Any

from tests.asgi_driver import Result


class FileWrapper:
    """A server's ``wsgi.file_wrapper`` (the server would sendfile() it when handed back)."""

    def __init__(self, filelike: Any, blksize: int = 8192) -> None:
        self.filelike = filelike
        self.blksize = blksize
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def __iter__(self) -> Any:
        return iter(lambda: self.filelike.read(self.blksize), b"")


def environ(
    path: str, method: str = "GET", query: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """A PEP 3333 environ; header values are bytes as latin-1 text, as servers give them."""
    env: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path.encode().decode("latin-1"),
        "QUERY_STRING": query.decode("latin-1"),
        "SERVER_NAME": "testserver",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_HOST": "testserver",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": io.StringIO(),
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "wsgi.file_wrapper": FileWrapper,
    }
    for name, value in headers or ():
        key = "HTTP_" + name.decode("latin-1").upper().replace("-", "_")
        text = value.decode("latin-1")
        env[key] = f"{env[key]},{text}" if key in env else text
    return env


def call(
    app: Any, path: str = "/", *, method: str = "GET", query: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None, disconnect_after_chunks: int | None = None,
) -> Result:  # fmt: skip
    """One request; with ``disconnect_after_chunks`` the "write" of the next chunk fails."""
    result = Result()
    env = environ(path, method, query, headers)

    def start_response(
        status: str, response_headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Any:
        result.status = int(status[:3])
        result.headers = [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in response_headers
        ]
        return lambda data: None

    body = None
    try:
        body = app(env, start_response)
        if isinstance(body, FileWrapper):
            result.messages.append({"type": "sendfile"})
        for sent, chunk in enumerate(body):
            if disconnect_after_chunks is not None and sent >= disconnect_after_chunks:
                break  # the server's write failed: it stops iterating and closes
            result.body += chunk
    except BaseException as exc:
        result.exception = exc
    finally:
        if body is not None and hasattr(body, "close"):
            try:
                body.close()
            except BaseException as exc:
                result.exception = result.exception or exc
    return result
