"""``safe_trace``: trace a function as a child observation without ever changing what it does."""

from __future__ import annotations

import functools
import inspect
import json
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar, overload

from . import _failsafe, runtime
from .headers import truncate

__all__ = ["safe_trace"]

F = TypeVar("F", bound=Callable[..., Any])

FAILURES_TO_OPEN = 5
COOLDOWN = 30.0


class _Breaker:
    """Stops tracing one function for a while after repeated tracing failures."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.failures = 0
        self.open_until = 0.0
        self._lock = threading.Lock()

    def allow(self) -> bool:
        return self.open_until == 0.0 or time.monotonic() >= self.open_until

    def success(self) -> None:
        if self.failures:
            with self._lock:
                self.failures, self.open_until = 0, 0.0

    def failure(self, exc: BaseException) -> None:
        _failsafe.report(self.where, exc)
        with self._lock:
            self.failures += 1
            if self.failures >= FAILURES_TO_OPEN:
                self.open_until = time.monotonic() + COOLDOWN
                self.failures = 0


def _preview(value: Any, limit: int) -> str:
    try:
        text = json.dumps(value, default=repr, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return truncate(text, limit)


class _Tracer:
    def __init__(self, fn: Callable[..., Any], name: str | None, as_type: str,
                 capture_input: bool, capture_output: bool, max_chars: int) -> None:  # fmt: skip
        self.name = name or getattr(fn, "__qualname__", repr(fn))
        self.as_type = as_type
        self.capture_input, self.capture_output = capture_input, capture_output
        self.max_chars = max_chars
        self.breaker = _Breaker(f"safe_trace:{self.name}")

    def start(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any] | None:
        if not self.breaker.allow():
            return None
        rt = runtime.current()
        if rt is None or not rt.enabled or rt.client is None:
            return None
        try:
            payload = {"args": args, "kwargs": kwargs}
            started = rt.client.start_as_current_observation(
                name=self.name,
                as_type=self.as_type,
                input=_preview(payload, self.max_chars) if self.capture_input else None,
            )
            return started, started.__enter__()
        except Exception as exc:
            self.breaker.failure(exc)
            return None

    def stop(
        self, handle: tuple[Any, Any], result: Any = None, exc: BaseException | None = None
    ) -> None:
        manager, observation = handle
        try:
            if exc is not None:
                observation.update(
                    level="ERROR", status_message=truncate(f"{type(exc).__name__}: {exc}", 1024)
                )
            elif self.capture_output:
                observation.update(output=_preview(result, self.max_chars))
            manager.__exit__(None, None, None)
            self.breaker.success()
        except Exception as error:
            self.breaker.failure(error)


@overload
def safe_trace(fn: F, /) -> F: ...


@overload
def safe_trace(
    *,
    name: str | None = None,
    as_type: str = "span",
    capture_input: bool = False,
    capture_output: bool = False,
    max_chars: int = 2000,
) -> Callable[[F], F]: ...


def safe_trace(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    as_type: str = "span",
    capture_input: bool = False,
    capture_output: bool = False,
    max_chars: int = 2000,
) -> Any:
    """Trace a sync or async function as a child observation of the current request.

    Its result and exceptions are never changed by tracing: a tracing failure is counted
    and logged once, and after repeated failures the function runs untraced for 30 s.
    Input/output capture is off by default and capped at ``max_chars``.
    """

    def decorate(func: F) -> F:
        if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
            raise TypeError(
                f"safe_trace cannot trace generator function {func.__qualname__}: the "
                "observation would end before the generator runs"
            )
        tracer = _Tracer(func, name, as_type, capture_input, capture_output, max_chars)
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def traced_async(*args: Any, **kwargs: Any) -> Any:
                handle = tracer.start(args, kwargs)
                if handle is None:
                    return await func(*args, **kwargs)
                try:
                    result = await func(*args, **kwargs)
                except BaseException as exc:
                    tracer.stop(handle, exc=exc)
                    raise
                tracer.stop(handle, result)
                return result

            return traced_async  # type: ignore[return-value]

        @functools.wraps(func)
        def traced(*args: Any, **kwargs: Any) -> Any:
            handle = tracer.start(args, kwargs)
            if handle is None:
                return func(*args, **kwargs)
            try:
                result = func(*args, **kwargs)
            except BaseException as exc:
                tracer.stop(handle, exc=exc)
                raise
            tracer.stop(handle, result)
            return result

        return traced  # type: ignore[return-value]

    return decorate(fn) if fn is not None else decorate
