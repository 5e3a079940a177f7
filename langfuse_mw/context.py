"""The request context: ids of the current request, readable anywhere the request's code runs."""

from __future__ import annotations

import contextvars
import functools
import inspect
from collections.abc import Callable, Coroutine, Generator
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any, ParamSpec, Protocol, TypeVar, cast

from opentelemetry import context as otel_context

__all__ = [
    "RequestContext",
    "bind_context",
    "get_request_context",
    "run_with_context",
    "submit_with_context",
]

P = ParamSpec("P")
R = TypeVar("R")


def _otel_context_var() -> contextvars.ContextVar[otel_context.Context] | None:
    # OpenTelemetry keeps the current context in one ContextVar (its default runtime context);
    # setting it directly skips three Python frames per attach and per detach, which the
    # request path does once and a streamed WSGI body once per chunk.
    from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext

    runtime_context = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    if isinstance(runtime_context, ContextVarsRuntimeContext):
        var = getattr(runtime_context, "_current_context", None)
        if isinstance(var, contextvars.ContextVar):
            return var
    return None


_OTEL_VAR = _otel_context_var()
# attach_otel(ctx) -> token and detach_otel(token): OpenTelemetry's attach/detach, without the
# frames when its runtime context is the default one (else its own functions).
attach_otel: Callable[[otel_context.Context], Any] = (
    _OTEL_VAR.set if _OTEL_VAR is not None else otel_context.attach
)
detach_otel: Callable[[Any], None] = (
    _OTEL_VAR.reset if _OTEL_VAR is not None else otel_context.detach
)


@dataclass(frozen=True, slots=True)
class RequestContext:
    """Ids of the request being served; ``trace_id``/``observation_id`` are lower-case hex."""

    request_id: str
    user_id: str | None
    session_id: str | None
    trace_id: str
    observation_id: str
    # The OpenTelemetry context of the request (parent span, propagated user/session), so
    # run_with_context() can nest work done elsewhere under the request's observation.
    otel_context: otel_context.Context | None = field(default=None, repr=False, compare=False)


class _Source(Protocol):
    # The request's observation: it builds its RequestContext only if someone asks.
    def request_context(self) -> RequestContext: ...


_current: contextvars.ContextVar[RequestContext | _Source | None] = contextvars.ContextVar(
    "langfuse_mw_request", default=None
)


def get_request_context() -> RequestContext | None:
    """Return the context of the request being served, or None outside a traced request."""
    value = _current.get()
    if value is None or type(value) is RequestContext:
        return value
    return value.request_context()  # type: ignore[union-attr]


def run_with_context(
    ctx: RequestContext, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs
) -> R:
    """Call ``fn`` with ``ctx`` as the current request (for example in a thread you started).

    For an async function, the coroutine returned runs with ``ctx`` as the current request
    whenever and wherever it is awaited (``asyncio.run(run_with_context(ctx, main))``).
    """
    token = _current.set(ctx)
    otel_token = attach_otel(ctx.otel_context) if ctx.otel_context is not None else None
    try:
        result = fn(*args, **kwargs)
        if inspect.iscoroutine(result):
            # Its body runs when awaited, after the reset below: it keeps a copy of this
            # context, with the request set, for itself.
            return cast(R, _run_in(contextvars.copy_context(), result))
        return result
    finally:
        if otel_token is not None:
            detach_otel(otel_token)
        _current.reset(token)


def bind_context(fn: Callable[P, R]) -> Callable[P, R]:
    """Return ``fn`` bound to a copy of the caller's context, to run later in any thread.

    An async function stays async, and its body (not only the creation of its coroutine)
    runs in the copy, whichever task or event loop awaits it.
    """
    snapshot = contextvars.copy_context()

    if inspect.iscoroutinefunction(fn):
        # An async def, so that frameworks checking for one (Starlette's BackgroundTask) await
        # it instead of calling it in a thread and dropping the coroutine.
        @functools.wraps(fn)
        async def bound_async(*args: P.args, **kwargs: P.kwargs) -> Any:
            context = snapshot.copy()
            return await _RunIn(context, context.run(fn, *args, **kwargs))

        return cast(Callable[P, R], bound_async)

    @functools.wraps(fn)
    def bound(*args: P.args, **kwargs: P.kwargs) -> R:
        # A Context can be entered by one thread at a time; copy again so the bound
        # function can run concurrently (e.g. mapped over a pool).
        context = snapshot.copy()
        result = context.run(fn, *args, **kwargs)
        if inspect.iscoroutine(result):  # a function returning a coroutine (a lambda)
            return cast(R, _run_in(context, result))
        return result

    return bound


async def _run_in(context: contextvars.Context, coro: Coroutine[Any, Any, R]) -> R:
    result: R = await _RunIn(context, coro)
    return result


class _RunIn:
    """Awaits a coroutine, running each of its steps in ``context`` (not the awaiting task's).

    A coroutine runs in the context of whoever drives it, so creating it in a context is not
    enough; stepping it inside ``context.run`` is, with any event loop (asyncio, trio).
    """

    __slots__ = ("_context", "_coro")

    def __init__(self, context: contextvars.Context, coro: Coroutine[Any, Any, Any]) -> None:
        self._context, self._coro = context, coro

    def __await__(self) -> Generator[Any, Any, Any]:
        run, coro = self._context.run, self._coro
        step: Callable[[Any], Any] = coro.send
        arg: Any = None
        while True:
            try:
                yielded = run(step, arg)
            except StopIteration as stop:
                return stop.value
            try:
                arg, step = (yield yielded), coro.send
            except BaseException as exc:  # cancellation, close(): delivered to the coroutine
                arg, step = exc, coro.throw


def submit_with_context(
    executor: Executor, fn: Callable[..., R], /, *args: Any, **kwargs: Any
) -> Future[R]:
    """``executor.submit`` that carries the request context (and its observation) into the task."""
    return executor.submit(bind_context(fn), *args, **kwargs)
