"""``safe_trace``: trace a function as a child observation without ever changing what it does."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar, overload

from opentelemetry import trace as otel_trace

from . import _failsafe, runtime
from ._record import error_message
from .config import DEFAULT_REDACT_QUERY_KEYS
from .headers import REDACTED, compile_redactor, truncate

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
        _BREAKERS.add(self)

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


# Every breaker, to give each a fresh lock in a forked child (a fork while another thread
# held one would leave the child's copy locked for good).
_BREAKERS: weakref.WeakSet[_Breaker] = weakref.WeakSet()


def _after_fork() -> None:
    for breaker in list(_BREAKERS):
        breaker._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def _preview(value: Any, limit: int) -> str:
    # JSON, encoded only as far as the limit (a 3-million-item list costs no more than a short
    # one); objects JSON does not know are named, not repr()'d (a __repr__ may be slow, raise
    # or print secrets). Never raises: what cannot be encoded is a placeholder.
    parts: list[str] = []
    size = 0
    try:
        for part in _ENCODER.iterencode(value):
            parts.append(part)
            size += len(part)
            if size > limit:
                break
    except Exception:  # RecursionError from a deep structure, ValueError from a cycle
        return truncate(f"<{type(value).__qualname__}>", limit)
    return truncate("".join(parts), limit)


def _json_default(value: Any) -> Any:
    if isinstance(value, set | frozenset):
        return list(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{type(value).__name__}: {len(value)} bytes>"
    dump = getattr(value, "model_dump", None)  # pydantic models: their fields
    if callable(dump):
        return dump(mode="json")
    return f"<{type(value).__qualname__}>"


_ENCODER = json.JSONEncoder(default=_json_default, ensure_ascii=False, check_circular=True)


def _qualname(fn: Any) -> str:
    """A function's name for the observation: never its repr (a partial's shows its args)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    name = getattr(fn, "__qualname__", None)
    return name if isinstance(name, str) else type(fn).__qualname__


def _is_async(fn: Any) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    # An object whose class has an async def __call__.
    return not inspect.isfunction(fn) and inspect.iscoroutinefunction(type(fn).__call__)


class _Tracer:
    def __init__(self, fn: Callable[..., Any], name: str | None, as_type: str,
                 capture_input: bool, capture_output: bool, max_chars: int) -> None:  # fmt: skip
        self.name = name or _qualname(fn)
        self.as_type = as_type
        self.capture_input, self.capture_output = capture_input, capture_output
        self.max_chars = max_chars
        self.breaker = _Breaker(f"safe_trace:{self.name}")
        self.secret = compile_redactor(DEFAULT_REDACT_QUERY_KEYS)
        self.positional: list[str] = []
        if capture_input:
            with contextlib.suppress(TypeError, ValueError):  # no signature (a builtin)
                # Parameter names, to redact secrets passed by position too.
                self.positional = [
                    p.name
                    for p in inspect.signature(fn).parameters.values()
                    if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                ]

    def _input(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        def hidden(name: str | None) -> bool:
            return name is not None and self.secret is not None and bool(self.secret.search(name))

        names = self.positional
        shown_args = [
            REDACTED if hidden(names[i] if i < len(names) else None) else arg
            for i, arg in enumerate(args)
        ]
        shown_kwargs = {k: REDACTED if hidden(k) else v for k, v in kwargs.items()}
        return _preview({"args": shown_args, "kwargs": shown_kwargs}, self.max_chars)

    def start(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any] | None:
        if not self.breaker.allow():
            return None
        rt = runtime.current()
        if rt is None or not rt.enabled or rt.client is None:
            return None
        if not otel_trace.get_current_span().get_span_context().is_valid:
            return None  # outside a request (and any observation): the function just runs
        try:
            started = rt.client.start_as_current_observation(
                name=self.name,
                as_type=self.as_type,
                input=self._input(args, kwargs) if self.capture_input else None,
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
            try:
                if exc is not None:
                    observation.update(level="ERROR", status_message=error_message(exc))
                elif self.capture_output:
                    observation.update(output=_preview(result, self.max_chars))
            finally:
                # Always: the caller's context is restored whatever failed above.
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
        if isinstance(func, classmethod | staticmethod):
            # Decorated above @classmethod/@staticmethod: trace the function inside.
            return type(func)(decorate(func.__func__))
        if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
            raise TypeError(
                f"safe_trace cannot trace generator function {_qualname(func)}: the "
                "observation would end before the generator runs"
            )
        tracer = _Tracer(func, name, as_type, capture_input, capture_output, max_chars)
        if _is_async(func):

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

    if fn is not None and not (callable(fn) or isinstance(fn, classmethod | staticmethod)):
        raise TypeError(
            f"safe_trace takes the function to trace, got {type(fn).__name__}: name the "
            "observation with safe_trace(name=...)"
        )
    return decorate(fn) if fn is not None else decorate
