"""Outbound tracing for requests: ``TracedSession`` and ``TracingAdapter``."""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from typing import Any

try:
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.exceptions import HTTPError as _Urllib3Error
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    raise ImportError(
        'langfuse_mw.requests needs requests: pip install "langfuse-mw[requests]"'
    ) from exc

from ._failsafe import report
from .outbound import OutboundCall, Policy

__all__ = ["TracedSession", "TracingAdapter"]

# The headers this thread added to its last call. requests follows a redirect by copying the
# previous hop's request, headers included: a request that carries all of them unchanged (a
# fresh traceparent among them) is that copy, and they are taken back so the next hop's target
# is judged afresh and gets its own traceparent.
_last_sent = threading.local()


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
        call = self._prepare(request)
        if call is None:
            return super().send(request, stream, timeout, verify, cert, proxies)
        try:
            response = super().send(request, stream, timeout, verify, cert, proxies)
        except BaseException as exc:
            call.finish(exc=exc if isinstance(exc, Exception) else None)
            raise
        _end_with_body(response, call)
        return response

    def _prepare(self, request: requests.PreparedRequest) -> OutboundCall | None:
        try:
            headers = request.headers
            last: dict[str, str] = getattr(_last_sent, "headers", {})
            if last and all(headers.get(name) == value for name, value in last.items()):
                for name in last:  # a copy of our last request: the next hop of a redirect
                    del headers[name]
            present = {name.lower() for name in headers}
            call, added = self._policy.begin(request.method or "GET", request.url or "", present)
            headers.update(added)
            _last_sent.headers = added
            return call
        except Exception as exc:
            report("requests.request", exc)
            return None


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
    # The call ends when its body is done: urllib3 gives the connection back once the body is
    # read to the end (Session.send reads it unless stream=True) or when it is closed. A read
    # that fails releases the connection while its error is on its way out: recorded.
    status = response.status_code
    raw = response.raw
    release, close = getattr(raw, "release_conn", None), getattr(raw, "close", None)
    if release is None or close is None:
        call.finish(status)
        return

    def release_conn() -> None:
        try:
            release()
        finally:
            failure = sys.exc_info()[1]
            broken = isinstance(failure, _Urllib3Error | OSError)
            call.finish(status, failure if broken else None)

    def close_raw() -> None:
        try:
            close()
        finally:
            call.finish(status)

    try:
        raw.release_conn, raw.close = release_conn, close_raw
    except AttributeError:  # a raw object that does not take attributes
        call.finish(status)
