"""The process-wide runtime: langfuse client, tracer provider, export queue, shutdown."""

from __future__ import annotations

import atexit
import base64
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from . import _failsafe
from ._version import __version__
from .config import RUNTIME_OPTIONS, Settings, resolve_settings
from .export import ExportQueue, HttpSender, Item, Sender

__all__ = [
    "Runtime", "current", "flush", "get_runtime", "health", "http_sender", "init", "shutdown",
]  # fmt: skip

logger = logging.getLogger("langfuse_mw")

LANGFUSE_TRACER_NAME = "langfuse-sdk"


class _NullExporter(SpanExporter):
    # Handed to the langfuse SDK so its own BatchProcessor has nothing to do before we
    # replace it with ExportQueue (and so shutting that one down sends nothing anywhere).
    def export(self, spans: Any) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def http_sender(settings: Settings, public_key: str, secret_key: str) -> HttpSender:
    """The OTLP/HTTP sender for the Langfuse project (also used by `langfuse-mw forward`)."""
    from langfuse._version import __version__ as sdk_version

    auth = base64.b64encode(f"{public_key}:{secret_key}".encode()).decode("ascii")
    return HttpSender(
        f"{settings.base_url}/api/public/otel/v1/traces",
        {
            "Authorization": f"Basic {auth}",
            "x-langfuse-sdk-name": "python",
            "x-langfuse-sdk-version": sdk_version,
            "x-langfuse-public-key": public_key,
            "x-langfuse-ingestion-version": "4",
            "User-Agent": f"langfuse-mw/{__version__}",
        },
        compression=settings.compression,
        describe=f"{settings.base_url} (public key {public_key})",
    )


class Runtime:
    """One per process: holds what every request needs to export its observation."""

    def __init__(self, settings: Settings, *, sender: Sender | None = None) -> None:
        self.settings = settings
        self.enabled = False
        self.client: Any = None
        self.queue: ExportQueue | None = None
        self.environment = settings.environment
        self.public_key = settings.public_key or ""
        self.resource = Resource.get_empty()
        self.scope = InstrumentationScope(LANGFUSE_TRACER_NAME)
        self._owns_sdk = False
        self.disabled_reason = self._check(settings, sender)
        if self.disabled_reason is None:
            self._start(settings, sender)
            self.enabled = True

    @staticmethod
    def _check(settings: Settings, sender: Sender | None) -> str | None:
        if not settings.enabled:
            return "disabled by configuration (enabled=false)"
        # In queue mode the forwarder holds the secret key: services need the public key only.
        secret_ok = bool(settings.secret_key or settings.queue_url)
        if sender is None and not (settings.public_key and secret_ok):
            missing = [
                name
                for name, value in (
                    ("LANGFUSE_PUBLIC_KEY", settings.public_key),
                    ("LANGFUSE_SECRET_KEY", secret_ok),
                )
                if not value
            ]
            return f"{' and '.join(missing)} not set"
        keys = (("public_key", settings.public_key), ("secret_key", settings.secret_key))
        for name, value in keys:
            if value and not (value.isascii() and value.isprintable() and " " not in value):
                return f"{name} contains characters that cannot go in an HTTP header"
        return None

    def _start(self, settings: Settings, sender: Sender | None) -> None:
        from langfuse import Langfuse
        from langfuse._client.resource_manager import LangfuseResourceManager
        from langfuse._client.span_processor import LangfuseSpanProcessor
        from langfuse._version import __version__ as sdk_version

        public_key = settings.public_key or "pk-lf-local"
        secret_key = settings.secret_key or "sk-lf-local"
        resource_attributes = {
            "langfuse.environment": settings.environment,
            "langfuse.release": settings.release,
        }
        provider = settings.tracer_provider or TracerProvider(
            resource=Resource.create({k: v for k, v in resource_attributes.items() if v})
        )
        # A Langfuse client the app built first for the same key is reused, not replaced.
        self._owns_sdk = public_key not in LangfuseResourceManager._instances
        self.client = Langfuse(
            public_key=public_key,
            secret_key=secret_key,
            base_url=settings.base_url,
            environment=settings.environment,
            release=settings.release,
            tracer_provider=provider,
            span_exporter=_NullExporter(),
            timeout=max(1, int(settings.export_timeout)),
        )
        provider = self.client._resources.tracer_provider or provider
        self.public_key = public_key
        self.resource = provider.resource
        self.scope = InstrumentationScope(
            LANGFUSE_TRACER_NAME, sdk_version, None, {"public_key": public_key}
        )
        if sender is None:
            sender = http_sender(settings, public_key, secret_key)
            if settings.queue_url or settings.spool_dir:
                from .queue import durable_sender  # imports redis only when asked for

                sender = durable_sender(settings, sender)
        self.queue = ExportQueue(
            sender,
            max_queue_size=settings.max_queue_size,
            max_batch_size=settings.max_batch_size,
            flush_interval=settings.flush_interval,
            export_timeout=settings.export_timeout,
            shutdown_timeout=settings.shutdown_timeout,
            max_queue_bytes=settings.max_queue_bytes,
        )
        # Route the SDK's spans (the handler's generations, @observe) through the same queue.
        for processor in provider._active_span_processor._span_processors:
            if isinstance(processor, LangfuseSpanProcessor) and processor.public_key == public_key:
                replaced = processor._batch_processor
                processor._batch_processor = self.queue  # type: ignore[assignment]
                if not isinstance(replaced, ExportQueue):
                    replaced.shutdown(timeout_millis=100)

    def emit(self, span: Item) -> None:
        """Queue a finished span for export."""
        if self.queue is not None:
            self.queue.emit(span)

    def flush(self, timeout: float | None = None) -> bool:
        """Export what is queued, waiting at most ``timeout`` seconds (default shutdown_timeout)."""
        return self.queue.flush(timeout) if self.queue is not None else True

    def shutdown(self, timeout: float | None = None) -> int:
        """Flush within the deadline and stop; returns the number of spans not exported."""
        if self.queue is None:
            return 0
        timeout = self.settings.shutdown_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        lost = self.queue.shutdown(timeout)
        if self.client is not None:
            # The SDK's own shutdown flushes scores and media over the network and has no
            # deadline of its own: give it what is left of ours, in a thread we don't wait past.
            _call_with_deadline(self.client.shutdown, max(0.0, deadline - time.monotonic()))
            if self._owns_sdk:
                from langfuse._client.resource_manager import LangfuseResourceManager

                # So a later init() builds a live SDK instead of reusing this stopped one.
                LangfuseResourceManager._instances.pop(self.public_key, None)
        return lost

    def health(self) -> dict[str, Any]:
        """A snapshot of the export state and of what tracing refused or failed at."""
        snapshot: dict[str, Any] = {
            "enabled": self.enabled,
            "disabled_reason": self.disabled_reason,
            "environment": self.environment,
        }
        if self.queue is not None:
            snapshot.update(self.queue.stats())
            durable = getattr(self.queue.sender, "stats", None)
            if callable(durable):  # the Redis stream or the spool behind the queue
                snapshot["durable"] = durable()
        snapshot["internal_errors"] = dict(_failsafe.internal_errors)
        snapshot["rejected_inputs"] = dict(_failsafe.rejected_inputs)
        return snapshot


def _call_with_deadline(fn: Callable[[], Any], timeout: float) -> None:
    def run() -> None:
        try:
            fn()
        except Exception as exc:
            _failsafe.report("sdk_shutdown", exc)

    thread = threading.Thread(target=run, name="langfuse-mw-sdk-shutdown", daemon=True)
    thread.start()
    thread.join(timeout)


_lock = threading.Lock()
_runtime: Runtime | None = None


def _after_fork() -> None:
    # The lock may have been held by another thread at the fork (a runtime being built).
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
_atexit_registered = False


def current() -> Runtime | None:
    """Return the process runtime if it was built."""
    return _runtime


def _install(runtime: Runtime) -> Runtime:
    global _runtime, _atexit_registered
    _runtime = runtime
    settings = runtime.settings
    if logger.level == logging.NOTSET:  # the preset's verbosity, unless you set one
        logger.setLevel(settings.log_level)
    if runtime.disabled_reason is not None:
        logger.warning(
            "langfuse_mw: tracing is off (%s); requests are served untouched",
            runtime.disabled_reason,
        )
    else:
        logger.info(
            "langfuse_mw: tracing to %s (preset %s, environment %s, sample rate %s)",
            f"Redis stream {settings.queue_stream!r}" if settings.queue_url else settings.base_url,
            settings.preset,
            settings.environment or "default",
            settings.sample_rate,
        )
        _install_sigterm_handler()
    if not _atexit_registered:
        atexit.register(_shutdown_at_exit)
        _atexit_registered = True
    return runtime


_sigterm_installed = False
# The SIGTERM handler ours chains to: the default action, or the app's or server's own.
_previous_sigterm: Any = signal.SIG_DFL
# The flush at SIGTERM ran out of time (Langfuse hangs): the shutdown at exit does not wait
# again, so the process exits within one deadline of the signal.
_stalled_at_sigterm = False


def _install_sigterm_handler() -> None:
    # A process that dies on SIGTERM (the default action, or a handler of the app's that
    # re-raises it) never runs atexit: nothing queued would be exported. Ours flushes within
    # the deadline, then hands the signal to the handler that was there before, so uvicorn's,
    # gunicorn's or the app's behaviour is kept. SIG_IGN, or a handler set outside Python,
    # is left alone.
    global _sigterm_installed, _previous_sigterm
    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    try:
        previous = signal.getsignal(signal.SIGTERM)
        if previous is signal.SIG_IGN or previous is None:
            return
        signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):  # not the main interpreter, or no signals here
        return
    _previous_sigterm = previous
    _sigterm_installed = True


def _on_sigterm(signum: int, frame: Any) -> None:
    previous = _previous_sigterm
    runtime = _runtime
    if runtime is not None:
        timeout = exit_timeout(runtime.settings.shutdown_timeout)
        # With the default action the process ends here: shut down. A handler may carry on
        # (a graceful server finishes its requests): flush, and atexit shuts down later.
        # In a thread: the signal may have interrupted this very thread inside one of our
        # locks, and a flush waiting on it here would never return. The join is bounded.
        worker = threading.Thread(
            target=_flush_at_sigterm, args=(timeout, previous is signal.SIG_DFL), daemon=True
        )
        worker.start()
        worker.join(timeout + 0.5)
    if callable(previous):
        previous(signum, frame)
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _flush_at_sigterm(timeout: float, dying: bool) -> None:
    global _stalled_at_sigterm
    queue = _runtime.queue if _runtime is not None else None
    exported = queue.exported if queue is not None else 0
    started = time.monotonic()
    done = shutdown(timeout) == 0 if dying else flush(timeout)
    # Stalled: the deadline passed with nothing exported (Langfuse hangs or is down). A
    # flush that exported while other threads kept emitting was not stalled.
    if not done and time.monotonic() - started >= timeout:
        _stalled_at_sigterm = queue is None or queue.exported == exported
        if _stalled_at_sigterm and not dying:
            logger.warning(
                "langfuse_mw: at SIGTERM, Langfuse took no span within %.1fs; the exit will not "
                "wait for it again",
                timeout,
            )


def exit_timeout(timeout: float) -> float:
    """The deadline for a flush on the way out: none left if the one at SIGTERM ran out."""
    return 0.0 if _stalled_at_sigterm else timeout


def get_runtime(settings: Settings) -> Runtime:
    """Return the process runtime, building it from ``settings`` on first use (thread-safe)."""
    runtime = _runtime
    if runtime is not None:
        return runtime
    with _lock:
        if _runtime is not None:
            return _runtime
        return _install(Runtime(settings))


def start_up(settings: Settings) -> Runtime:
    """``get_runtime`` for a middleware starting: says once if options it was given explicitly
    cannot apply, because the process runtime (one per process) was built with others."""
    runtime = get_runtime(settings)
    built = runtime.settings
    if built is not settings:
        ignored = [
            name
            for name in RUNTIME_OPTIONS
            if settings.sources.get(name) == "argument"
            and getattr(settings, name) != getattr(built, name)
        ]
        if ignored:
            _failsafe.log_once(
                "runtime-options",
                "langfuse_mw: a middleware was given "
                + ", ".join(ignored)
                + " different from the runtime this process already runs; one runtime serves "
                "the process and keeps the options it was built with (see "
                "docs/configuration.md)",
            )
    return runtime


def init(**options: Any) -> Runtime:
    """Build the process-wide runtime once and return it (later calls return the same one).

    Options are those of ``LangfuseMiddleware``; invalid values raise ``ConfigError``.
    """
    settings = resolve_settings(options)
    with _lock:
        if _runtime is not None:
            if _runtime.settings.runtime_key() != settings.runtime_key():
                _failsafe.log_once(
                    "init-twice",
                    "langfuse_mw: init() called again with different connection options; "
                    "keeping the runtime built first (call shutdown() before re-initialising)",
                )
            return _runtime
        return _install(Runtime(settings))


def flush(timeout: float | None = None) -> bool:
    """Export what is queued, waiting at most ``timeout`` seconds."""
    runtime = _runtime
    return runtime.flush(timeout) if runtime is not None else True


def shutdown(timeout: float | None = None) -> int:
    """Flush and stop the runtime within ``timeout`` (default: its ``shutdown_timeout``);
    returns the number of spans not exported.

    Never blocks past the deadline, even when Langfuse hangs. A later request or ``init()``
    builds a new runtime.
    """
    global _runtime
    with _lock:
        runtime, _runtime = _runtime, None
    return runtime.shutdown(timeout) if runtime is not None else 0


def health() -> dict[str, Any]:
    """Return a snapshot of the runtime: queued, exported, dropped by reason, breaker, errors."""
    runtime = _runtime
    if runtime is None:
        return {
            "enabled": False,
            "disabled_reason": "not initialised",
            "internal_errors": dict(_failsafe.internal_errors),
            "rejected_inputs": dict(_failsafe.rejected_inputs),
        }
    return runtime.health()


def _shutdown_at_exit() -> None:
    try:
        runtime = _runtime
        if runtime is not None:
            shutdown(exit_timeout(runtime.settings.shutdown_timeout))
    except Exception as exc:  # never turn a clean exit into a traceback
        _failsafe.report("atexit", exc)
