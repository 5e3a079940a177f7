"""Containment for tracing's own failures: count them, log each cause at most once a minute."""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from typing import Any

logger = logging.getLogger("langfuse_mw")

LOG_EVERY = 60.0

# Re-entrant: a finalizer that reports (a response body ended at garbage collection) may run
# in this very thread while it holds the lock.
_lock = threading.RLock()


def _after_fork() -> None:
    # A fork while another thread held the lock (the export thread logging a drop) would
    # leave the child's copy locked for good: its first report or reject would hang.
    global _lock
    _lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)

_last_logged: dict[str, float] = {}
# Failures inside langfuse_mw (not the app's), by where they happened; shown by health().
internal_errors: collections.Counter[str] = collections.Counter()
# Inputs we rejected or replaced (bad headers and the like), by cause; shown by health().
rejected_inputs: collections.Counter[str] = collections.Counter()


def log_once(key: str, message: str, *args: Any, level: int = logging.WARNING) -> None:
    """Log ``message`` unless the same ``key`` was logged within the last minute."""
    now = time.monotonic()
    with _lock:
        last = _last_logged.get(key)
        if last is not None and now - last < LOG_EVERY:
            return
        _last_logged[key] = now
    logger.log(level, message, *args)


def report(where: str, exc: BaseException) -> None:
    """Record a failure of tracing code; the request it happened in carries on untouched."""
    with _lock:
        internal_errors[where] += 1
    # Only the exception type and message of our own code: never header or body content.
    log_once(
        f"internal:{where}:{type(exc).__name__}",
        "langfuse_mw: tracing error in %s (%s); the request was served normally",
        where,
        type(exc).__name__,
        level=logging.ERROR,
    )


def reject(cause: str) -> None:
    """Count an input we refused (for example an invalid x-user-id header)."""
    with _lock:
        rejected_inputs[cause] += 1
    log_once(f"reject:{cause}", "langfuse_mw: ignored invalid input (%s)", cause)


def reset() -> None:
    """Forget counters and log suppression (for tests)."""
    with _lock:
        _last_logged.clear()
        internal_errors.clear()
        rejected_inputs.clear()
