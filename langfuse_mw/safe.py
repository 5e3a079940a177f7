"""``safe_trace``: trace a function as a child observation without ever changing what it does."""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from json.encoder import encode_basestring
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
    # JSON, encoded only as far as the limit: a 3-million-item list or set, a 200 MB string, a
    # pydantic model holding either, or a structure deeper than the recursion limit costs no
    # more than a short one. Objects JSON does not know are named, never repr()'d (a __repr__
    # may be slow, raise or print secrets). Never raises: what cannot be encoded is a
    # placeholder.
    parts: list[str] = []
    size = 0
    try:
        for part in _pieces(value, limit):
            parts.append(part)
            size += len(part)
            if size > limit:
                break
    except Exception:  # a container changed size while we iterated it, a hostile __iter__
        return truncate(f"<{type(value).__qualname__}>", limit)
    return truncate("".join(parts), limit)


# Containers deeper than this are named: no one reads further, and JSON decoders with a
# recursion limit (Python's json, used by the devserver and the test kit) fail on deeper input.
MAX_DEPTH = 100
_ITEM = object()  # the "key" of a list's entries (None is a dict key like any other)
# Pieces of one container being encoded: its remaining (key, value) entries (key _ITEM in a
# list), its closing bracket, its id (a cycle is named, not followed) and whether it has
# written an entry yet (for the separator).
_Entries = Iterator[tuple[Any, Any]]
_Frame = tuple[_Entries, str, int, list[bool]]


def _pieces(value: Any, limit: int) -> Iterator[str]:
    # An explicit stack, not recursion: the depth a structure can have is the budget's, not
    # the interpreter's recursion limit. Types are read with type(), never isinstance(): a
    # proxy's __class__ (Django's SimpleLazyObject) or __getattr__ (a Mock) may run code.
    stack: list[_Frame] = []
    active: set[int] = set()
    while True:
        piece, entries, closer = _open(value, limit, active, len(stack) >= MAX_DEPTH)
        yield piece
        if entries is not None:
            active.add(id(value))
            stack.append((entries, closer, id(value), [False]))
        while stack:
            entries, closer, ident, started = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                active.discard(ident)
                yield closer
                continue
            key, value = entry
            head = ", " if started[0] else ""
            started[0] = True
            yield head if key is _ITEM else f"{head}{_key(key, limit)}: "
            break
        else:
            return


def _open(
    value: Any, limit: int, active: set[int], too_deep: bool = False
) -> tuple[str, _Entries | None, str]:
    """The JSON of a scalar, or the opening bracket and entries of a container."""
    cls = type(value)
    if value is None:
        return "null", None, ""
    if cls is bool:
        return ("true" if value else "false"), None, ""
    if issubclass(cls, str):
        # Only the part that can be shown is escaped: a huge string costs its prefix.
        return encode_basestring(str.__getitem__(value, slice(limit + 1))), None, ""
    if issubclass(cls, int):
        return _number(int.__repr__, value), None, ""
    if issubclass(cls, float):
        # NaN and infinities as strings, so the capture stays valid JSON.
        if not math.isfinite(value):
            return encode_basestring(float.__repr__(value)), None, ""
        return float.__repr__(value), None, ""
    if issubclass(cls, list | tuple | dict | set | frozenset):
        if id(value) in active:
            return '"<cycle>"', None, ""
        if too_deep:
            return encode_basestring(f"<{_type_name(cls)}>"), None, ""
    if issubclass(cls, dict):
        return "{", iter(dict.items(value)), "}"
    if issubclass(cls, list | tuple | set | frozenset):
        return "[", ((_ITEM, item) for item in value), "]"
    if issubclass(cls, bytes | bytearray | memoryview):
        size = value.nbytes if cls is memoryview else len(value)
        return encode_basestring(f"<{cls.__name__}: {size} bytes>"), None, ""
    if issubclass(cls, type):
        return encode_basestring(f"<class {_type_name(value)}>"), None, ""
    fields = _pydantic_fields(cls)
    if fields is not None and not too_deep:
        # A pydantic model: its fields, read one by one as needed.
        instance = object.__getattribute__(value, "__dict__")
        return "{", ((name, instance.get(name)) for name in fields), "}"
    return encode_basestring(f"<{_type_name(cls)}>"), None, ""


def _number(to_text: Callable[[Any], str], value: Any) -> str:
    try:
        return to_text(value)
    except ValueError:  # an int over the interpreter's digit limit
        return encode_basestring(f"<{type(value).__qualname__}>")


def _key(key: Any, limit: int) -> str:
    # JSON's own key rules (str, int, float, bool, None); any other key (a tuple, an enum) is
    # named rather than failing the whole capture.
    cls = type(key)
    if issubclass(cls, str):
        return encode_basestring(str.__getitem__(key, slice(limit + 1)))
    if key is None or cls is bool or issubclass(cls, int | float):
        text, _, _ = _open(key, limit, set())
        return text if text.startswith('"') else encode_basestring(text)
    return encode_basestring(f"<{_type_name(cls)}>")


def _type_name(cls: type[Any]) -> str:
    # Read from the type itself: a metaclass could answer __qualname__ with anything.
    name = type.__getattribute__(cls, "__qualname__")
    return name if type(name) is str else "object"


def _pydantic_fields(cls: type[Any]) -> dict[str, Any] | None:
    # Looked up on the class's own namespace chain, never through the instance (whose
    # __getattr__ could run code), and never model_dump(): it dumps every field whole.
    for klass in cls.__mro__:
        fields = klass.__dict__.get("__pydantic_fields__")
        if fields is not None:
            return fields if isinstance(fields, dict) else None
    return None


def _qualname(fn: Any) -> str:
    """A function's name for the observation: never its repr (a partial's shows its args)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    name = getattr(fn, "__qualname__", None)
    return name if isinstance(name, str) else type(fn).__qualname__


def _runs(fn: Any) -> Any:
    """The code a call of ``fn`` runs: through partials, to a callable object's __call__."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.isfunction(fn) or inspect.ismethod(fn) or inspect.isbuiltin(fn):
        return fn
    # The class's own __call__, looked up statically (a metaclass __getattr__ runs no code).
    return inspect.getattr_static(type(fn), "__call__", fn)


def _is_async(fn: Any) -> bool:
    # inspect.iscoroutinefunction sees through a partial, but not to the async __call__ of the
    # object inside one: traced as sync, the observation would end before the await.
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(_runs(fn))


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
        runs = _runs(func)
        if inspect.isgeneratorfunction(runs) or inspect.isasyncgenfunction(runs):
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
