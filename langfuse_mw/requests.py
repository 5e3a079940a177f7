"""Outbound tracing for requests: ``TracedSession`` and ``TracingAdapter``."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

try:
    import requests
    from requests.adapters import HTTPAdapter
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    raise ImportError(
        'langfuse_mw.requests needs requests: pip install "langfuse-mw[requests]"'
    ) from exc

from ._failsafe import report
from .outbound import OutboundCall, Policy

__all__ = ["TracedSession", "TracingAdapter"]


class TracingAdapter(HTTPAdapter):
    """An ``HTTPAdapter`` that injects trace context and records each call as an observation.

    Mount it on any ``requests.Session``; ``propagate_to`` and ``trace_outside_requests`` are
    as for ``TracedSession``, every other argument is ``HTTPAdapter``'s.
    """

    # What pickling keeps (HTTPAdapter's own list, then ours).
    __attrs__: list[str] = [  # noqa: RUF012 - HTTPAdapter declares it this way
        *HTTPAdapter.__attrs__, "_propagate_to", "_trace_outside_requests",
    ]  # fmt: skip

    def __init__(
        self,
        *args: Any,
        propagate_to: Sequence[str] | None = None,
        trace_outside_requests: bool = False,
        **kwargs: Any,
    ) -> None:
        self._propagate_to = None if propagate_to is None else tuple(propagate_to)
        self._trace_outside_requests = trace_outside_requests
        self._policy = Policy(self._propagate_to, trace_outside_requests)
        super().__init__(*args, **kwargs)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # an unpickled adapter (a pickled Session) re-checks its list
        self._policy = Policy(self._propagate_to, self._trace_outside_requests)

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: bool | str = True,
        cert: Any = None,
        proxies: dict[str, str] | None = None,
    ) -> requests.Response:
        """Send ``request`` with the call's headers; its observation ends with the body."""
        sent, call = self._prepare(request)
        if call is None:
            return super().send(request, stream, timeout, verify, cert, proxies)
        try:
            response = super().send(sent, stream, timeout, verify, cert, proxies)
        except BaseException as exc:
            call.finish(exc=exc)
            if isinstance(exc, requests.RequestException) and exc.request is sent:
                exc.request = request
            raise
        # What the session sees is its own request: redirects and auth retries copy it, and
        # each copy is judged afresh when it is sent (our headers never travel with it).
        response.request = request
        _end_with_body(response, call)
        return response

    def _prepare(
        self, request: requests.PreparedRequest
    ) -> tuple[requests.PreparedRequest, OutboundCall | None]:
        # The request as sent: a copy with the call's headers (the app's is left as it was).
        try:
            present = {name.lower() for name in request.headers}
            call, added = self._policy.begin(request.method or "GET", request.url or "", present)
            if call is None:
                return request, None
            sent = request.copy()
            sent.headers.update(added)
            return sent, call
        except Exception as exc:
            report("requests.request", exc)
            return request, None


class TracedSession(requests.Session):
    """``requests.Session`` whose http and https calls carry trace context and are traced.

    ``propagate_to``: the ids allow-list (default ``["internal"]``); ``trace_outside_requests``:
    also trace calls made outside any request (default False).
    """

    def __init__(
        self, *, propagate_to: Sequence[str] | None = None, trace_outside_requests: bool = False
    ) -> None:
        super().__init__()
        for prefix in ("https://", "http://"):
            self.mount(
                prefix,
                TracingAdapter(
                    propagate_to=propagate_to, trace_outside_requests=trace_outside_requests
                ),
            )


def _end_with_body(response: requests.Response, call: OutboundCall) -> None:
    # The call ends when urllib3 gives the connection back: the body was read to the end
    # (Session.send reads it unless stream=True) or closed. A body dropped unread ends it
    # when it is freed.
    raw = response.raw
    kind = type(raw)
    if not all(hasattr(kind, name) for name in ("read", "release_conn", "close")):
        call.finish(response.status_code)
        return
    watch = _BodyWatch(call, response.status_code, raw)
    try:
        raw.read, raw.release_conn, raw.close = watch.read, watch.release_conn, watch.close
        if hasattr(kind, "read_chunked"):  # what urllib3 reads a chunked body with
            raw.read_chunked = watch.read_chunked
        weakref.finalize(raw, call.finish, response.status_code).atexit = False
    except (AttributeError, TypeError):  # a raw body that takes no attributes or weakrefs
        call.finish(response.status_code)


class _BodyWatch:
    """Stands in for the urllib3 response's ``read``, ``read_chunked``, ``release_conn`` and
    ``close``.

    urllib3 gives the connection back from inside ``read`` (or ``read_chunked``, for a chunked
    body) when the body ends, and also when reading it failed, before the error reaches the
    caller: inside a read, the end waits for the read's outcome. Holds the response weakly: no
    cycle keeps an unread body alive.
    """

    __slots__ = ("call", "raw", "reading", "released", "status")

    def __init__(self, call: OutboundCall, status: int, raw: Any) -> None:
        self.call, self.status, self.raw = call, status, weakref.ref(raw)
        self.reading = 0
        self.released = False

    def read(self, *args: Any, **kwargs: Any) -> Any:
        raw: Any = self.raw()
        self.reading += 1
        try:
            return type(raw).read(raw, *args, **kwargs)
        except BaseException as exc:
            self.call.finish(self.status, exc)  # the body failed (a timeout, a reset, gzip)
            raise
        finally:
            self._read_done()

    def read_chunked(self, *args: Any, **kwargs: Any) -> Iterator[bytes]:
        raw: Any = self.raw()
        chunks = type(raw).read_chunked(raw, *args, **kwargs)
        # Reading is each step, not the pause between two: a reader that stops after a chunk
        # and closes the response ends the call there.
        with contextlib.closing(chunks):
            while True:
                self.reading += 1
                try:
                    chunk = next(chunks, None)
                except BaseException as exc:
                    self.call.finish(self.status, exc)
                    raise
                finally:
                    self._read_done()
                if chunk is None:
                    return
                yield chunk

    def release_conn(self) -> None:
        raw: Any = self.raw()
        try:
            type(raw).release_conn(raw)
        finally:
            self._released()

    def close(self) -> None:
        # urllib3 also closes the response from inside a read that then fails (a chunk
        # length that never came).
        raw: Any = self.raw()
        try:
            type(raw).close(raw)
        finally:
            self._released()

    def _read_done(self) -> None:
        self.reading -= 1
        if self.released and not self.reading:
            self.call.finish(self.status)

    def _released(self) -> None:
        self.released = True
        if not self.reading:
            self.call.finish(self.status)
