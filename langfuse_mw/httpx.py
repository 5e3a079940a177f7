"""Outbound tracing for httpx: ``TracedClient``, ``AsyncTracedClient`` and wrapping transports."""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Protocol

try:
    import httpx
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    raise ImportError('langfuse_mw.httpx needs httpx: pip install "langfuse-mw[httpx]"') from exc

from ._failsafe import report
from .outbound import OutboundCall, Policy

__all__ = ["AsyncTracedClient", "AsyncTracingTransport", "TracedClient", "TracingTransport"]


def _prepare(policy: Policy, request: httpx.Request) -> tuple[httpx.Request, OutboundCall | None]:
    # The request as sent: a copy with the call's headers. The app's own request is left as
    # it was, so a redirect's next request, an auth flow's retry or the same request sent
    # again start without ours and are judged afresh (the client hands the app a response
    # whose .request is its own).
    try:
        present = {name.lower() for name in request.headers}
        call, added = policy.begin(request.method, str(request.url), present)
        if call is None:
            return request, None
        headers = request.headers.copy()
        headers.update(added)
        sent = httpx.Request(
            request.method, request.url, headers=headers, stream=request.stream,
            extensions=request.extensions,
        )  # fmt: skip
        return sent, call
    except Exception as exc:
        report("httpx.request", exc)
        return request, None


class TracingTransport(httpx.BaseTransport):
    """Wrap any httpx transport: inject trace context and record each call as an observation."""

    def __init__(
        self,
        transport: httpx.BaseTransport | None = None,
        *,
        propagate_to: Sequence[str] | None = None,
        trace_outside_requests: bool = False,
    ) -> None:
        self._transport = transport or httpx.HTTPTransport()
        self._policy = Policy(propagate_to, trace_outside_requests)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` with the call's headers; its observation ends with the body."""
        sent, call = _prepare(self._policy, request)
        if call is None:
            return self._transport.handle_request(request)
        try:
            response = self._transport.handle_request(sent)
        except BaseException as exc:
            call.finish(exc=exc)
            raise
        if response.is_closed:  # a body already read in full (mock or cached responses)
            call.finish(response.status_code)
        else:
            response.stream = _SyncStream(response.stream, call, response.status_code)
            _watch_decoding(response, call)
        return response

    def close(self) -> None:
        self._transport.close()


class AsyncTracingTransport(httpx.AsyncBaseTransport):
    """The async twin of ``TracingTransport``."""

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        propagate_to: Sequence[str] | None = None,
        trace_outside_requests: bool = False,
    ) -> None:
        self._transport = transport or httpx.AsyncHTTPTransport()
        self._policy = Policy(propagate_to, trace_outside_requests)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` with the call's headers; its observation ends with the body."""
        sent, call = _prepare(self._policy, request)
        if call is None:
            return await self._transport.handle_async_request(request)
        try:
            response = await self._transport.handle_async_request(sent)
        except BaseException as exc:
            call.finish(exc=exc)  # a cancelled call (a timeout around it) failed too
            raise
        if response.is_closed:
            call.finish(response.status_code)
        else:
            response.stream = _AsyncStream(response.stream, call, response.status_code)
            _watch_decoding(response, call)
        return response

    async def aclose(self) -> None:
        await self._transport.aclose()


class _SyncStream(httpx.SyncByteStream):
    # The call ends when its body was read and closed (streamed LLM answers included), or
    # when a body nobody closed is freed. A body httpx decodes (Content-Encoding) ends at the
    # decoder's flush, which httpx calls after closing the stream: the end can fail there.
    decoded = exhausted = False

    def __init__(self, stream: Any, call: OutboundCall, status: int) -> None:
        self._stream, self._call, self._status = stream, call, status
        weakref.finalize(self, call.finish, status).atexit = False

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._stream
        except GeneratorExit:  # the reader stopped early: not a failure
            raise
        except BaseException as exc:
            self._call.finish(self._status, exc)
            raise
        self.exhausted = True

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            if not (self.exhausted and self.decoded):  # else the decoder's flush ends it
                self._call.finish(self._status)


class _AsyncStream(httpx.AsyncByteStream):
    decoded = exhausted = False  # as in _SyncStream

    def __init__(self, stream: Any, call: OutboundCall, status: int) -> None:
        self._stream, self._call, self._status = stream, call, status
        weakref.finalize(self, call.finish, status).atexit = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._stream:
                yield chunk
        except GeneratorExit:
            raise
        except BaseException as exc:  # a read error, or cancelled mid-body
            self._call.finish(self._status, exc)
            raise
        self.exhausted = True

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            if not (self.exhausted and self.decoded):
                self._call.finish(self._status)


class _ContentDecoder(Protocol):
    def decode(self, data: bytes) -> bytes: ...
    def flush(self) -> bytes: ...


def _watch_decoding(response: httpx.Response, call: OutboundCall) -> None:
    # httpx undoes Content-Encoding in the Response, above the transport: a body that does not
    # decode fails there, after our stream handed on its bytes, and the response is then
    # closed as if all went well. The response's own decoder is wrapped to see the failure.
    if "content-encoding" not in response.headers:
        return  # nothing to decode: the identity decoder never fails
    try:
        get_decoder = getattr(response, "_get_content_decoder", None)
        if get_decoder is not None:  # httpx's own (private) hook; without it, unrecorded
            decoder = _Decoder(get_decoder(), call, response.status_code)
            response._decoder = decoder  # type: ignore[assignment]
            stream = response.stream
            if isinstance(stream, _SyncStream | _AsyncStream):
                stream.decoded = True  # its end is the decoder's flush
    except Exception as exc:
        report("httpx.decoder", exc)


class _Decoder:
    """Stands in for a response's content decoder: a failure to decode fails the call."""

    __slots__ = ("_call", "_decoder", "_status")

    def __init__(self, decoder: _ContentDecoder, call: OutboundCall, status: int) -> None:
        self._decoder, self._call, self._status = decoder, call, status

    def decode(self, data: bytes) -> bytes:
        try:
            return self._decoder.decode(data)
        except BaseException as exc:  # httpx.DecodingError, raised to the app unchanged
            self._call.finish(self._status, exc)
            raise

    def flush(self) -> bytes:
        # After the whole body was read and its stream closed: the call ends here.
        try:
            data = self._decoder.flush()
        except BaseException as exc:  # a zstd or brotli stream cut short
            self._call.finish(self._status, exc)
            raise
        self._call.finish(self._status)
        return data


class TracedClient(httpx.Client):
    """``httpx.Client`` whose calls carry trace context and are traced (all arguments accepted).

    Extra keyword arguments: ``propagate_to`` (the ids allow-list, default ``["internal"]``)
    and ``trace_outside_requests`` (trace calls made outside any request; default False).
    """

    def __init__(
        self,
        *args: Any,
        propagate_to: Sequence[str] | None = None,
        trace_outside_requests: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        _wrap_transports(self, TracingTransport, propagate_to, trace_outside_requests)


class AsyncTracedClient(httpx.AsyncClient):
    """``httpx.AsyncClient`` counterpart of ``TracedClient``."""

    def __init__(
        self,
        *args: Any,
        propagate_to: Sequence[str] | None = None,
        trace_outside_requests: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        _wrap_transports(self, AsyncTracingTransport, propagate_to, trace_outside_requests)


def _wrap_transports(
    client: Any, wrapper: Any, propagate_to: Sequence[str] | None, outside: bool
) -> None:
    # Every transport the client may pick (default, mounts, proxies) gets wrapped, once: a
    # transport that already traces would record every call twice.
    def wrap(transport: Any) -> Any:
        if isinstance(transport, TracingTransport | AsyncTracingTransport):
            return transport
        return wrapper(transport, propagate_to=propagate_to, trace_outside_requests=outside)

    client._transport = wrap(client._transport)
    client._mounts = {p: None if t is None else wrap(t) for p, t in client._mounts.items()}
