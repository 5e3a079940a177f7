"""A local, size-capped spool for single hosts without Redis.

Batches Langfuse cannot take now (refused, timed out, 429/5xx) are written as files of OTLP bytes
to ``spool_dir`` and replayed oldest first by a background thread once Langfuse answers again,
also after a restart. While the spool holds anything, new batches queue behind it on disk, so the
order is kept. Several processes may share one directory: they all write, one replays at a time.
"""

from __future__ import annotations

import collections
import errno
import gzip
import itertools
import logging
import os
import random
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .._failsafe import log_once, report
from .._otlp import split_request
from ..config import ConfigError
from ..export import (
    SENT,
    SERVER_ERROR_ATTEMPTS,
    HttpSender,
    Item,
    Outcome,
    encode_or_isolate,
    with_unencodable,
)
from ._redis import GZIP_MAGIC

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: one process per spool directory
    fcntl = None  # type: ignore[assignment]

__all__ = ["SpoolSender"]

logger = logging.getLogger("langfuse_mw")

_SUFFIXES = (".otlp", ".otlp.gz")
# A temporary file older than this was left by a process killed mid-write: a write takes
# milliseconds, so no live writer still owns it.
_STALE_TMP_AGE = 600.0
# Read errors of the process, not of the file: the file is retried after a back-off.
_TRANSIENT_READ_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EINTR)


class SpoolSender:
    """A Sender that posts to Langfuse and spools to disk what Langfuse cannot take yet."""

    def __init__(
        self,
        http: HttpSender,
        directory: str | os.PathLike[str],
        *,
        max_bytes: int,
        timeout: float = 5.0,
        backoff_base: float = 1.0,
        backoff_cap: float = 30.0,
    ) -> None:
        self.http = http
        self.dir = Path(directory)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"spool_dir: cannot create {str(self.dir)!r}: {exc}") from None
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self._seq = itertools.count()
        self._init_state()
        self._start_if_needed()

    def _init_state(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._stopped_reason: str | None = None  # credentials refused: replay until restart
        self._retry_at = 0.0
        self._failures = 0
        self._thread: threading.Thread | None = None
        self._server_errors: dict[str, int] = {}  # file name -> plain 500s so far
        # Files that cannot be read: left in place for an operator, out of the replay order.
        self._unreadable: set[str] = set()
        self._remove_stale_tmp()
        files = self._files()
        self._files_count = len(files)
        self._bytes = sum(_size(f) for f in files)
        self.spooled = 0
        self.replayed = 0
        self.dropped: collections.Counter[str] = collections.Counter()
        self.last_error: str | None = None

    # -- the export thread's side ---------------------------------------------------------

    def send(self, spans: Sequence[Item], timeout: float) -> Outcome:
        body, bad, error = encode_or_isolate(self.http, spans)
        if body is None:  # no span could be encoded: drop, not retry
            return Outcome(drop_reason="encoding", error=error)
        outcome = self._deliver(body, len(spans) - len(bad), timeout)
        return with_unencodable(outcome, bad, error)

    def _deliver(self, body: bytes, spans: int, timeout: float) -> Outcome:
        with self._lock:
            direct = self._files_count == 0 and time.monotonic() >= self._retry_at
        if direct:
            outcome = self.http.post(body, timeout)
            if outcome.ok or not (outcome.retry and outcome.drop_reason is None):
                # Sent, or refused for a reason waiting will not fix (400, 401, 413, 500):
                # ExportQueue counts, splits or stops exactly as without a spool.
                return outcome
            self._back_off(outcome)
        return self._write(body, spans)

    def _write(self, body: bytes, spans: int) -> Outcome:
        with self._lock:
            if self._bytes + len(body) > self.max_bytes:
                return Outcome(
                    drop_reason="spool_full",
                    error=f"spool {str(self.dir)!r} is full ({self.max_bytes} bytes)",
                )
        # Names sort by time: the replay order. The span count rides along for the counters.
        name = f"{time.time_ns():019d}-{os.getpid()}-{next(self._seq):06d}-{spans}"
        name += ".otlp.gz" if body[:2] == GZIP_MAGIC else ".otlp"
        error = self._store(self.dir / name, body)
        if error is not None:
            return Outcome(drop_reason="spool_error", error=f"spool write failed: {error}")
        with self._lock:
            self.spooled += 1
        self._start_if_needed()
        self._wake.set()
        return SENT

    def _store(self, path: Path, data: bytes) -> OSError | None:
        """Write a batch file atomically and count it; the error if it could not be written."""
        tmp = path.with_name(f".tmp-{path.name}")
        try:
            with open(tmp, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)  # atomic: a replayer never sees half a batch
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            return exc
        with self._lock:
            self._files_count += 1
            self._bytes += len(data)
        return None

    def _back_off(self, outcome: Outcome) -> None:
        with self._lock:
            self._failures += 1
            self.last_error = outcome.error
            delay = min(self.backoff_cap, self.backoff_base * 2 ** min(self._failures - 1, 10))
            delay = random.uniform(delay / 2, delay)
            if outcome.retry_after is not None:
                delay = max(delay, outcome.retry_after)
            self._retry_at = time.monotonic() + delay
            first = self._failures == 1
        if first:
            logger.warning(
                "langfuse_mw: export failing (%s); spooling batches to %s", outcome.error, self.dir
            )

    # -- the replay thread -----------------------------------------------------------------

    def _start_if_needed(self) -> None:
        with self._lock:
            if self._thread is not None or self._closed or not self._files_count:
                return
            self._thread = threading.Thread(
                target=self._replay_loop, name="langfuse-mw-spool", daemon=True
            )
            self._thread.start()

    def _replay_loop(self) -> None:
        from opentelemetry import context as otel_context
        from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY

        # Our own HTTP calls must not be traced by any instrumentation the app installed.
        otel_context.attach(otel_context.set_value(_SUPPRESS_INSTRUMENTATION_KEY, True))
        while not self._closed:
            wait = self._retry_at - time.monotonic()
            if wait > 0 or self._stopped_reason:
                self._wake.wait(min(max(wait, 0.05), 1.0))
                self._wake.clear()
                continue
            try:
                with self._replay_lock() as mine:
                    if not mine:  # another process replays this directory
                        self._wake.wait(1.0)
                        self._wake.clear()
                        continue
                    self._replay_once()
            except Exception as exc:  # never let the thread die: the spool would stall
                report("spool.replay", exc)
                self._wake.wait(1.0)
            with self._lock:
                idle = self._files_count == 0
            if idle:
                self._wake.wait(5.0)
                self._wake.clear()

    @contextmanager
    def _replay_lock(self) -> Iterator[bool]:
        if fcntl is None:
            yield True
            return
        with open(self.dir / ".replay.lock", "a+b") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _replay_once(self) -> None:
        files = self._files()
        with self._lock:  # resynchronise with what other processes wrote or replayed
            self._files_count = len(files)
            self._bytes = sum(_size(f) for f in files)
        for path in files:
            if self._closed:
                return
            try:
                body = path.read_bytes()
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno in _TRANSIENT_READ_ERRORS:
                    raise
                # Another user's file, a directory, a bad sector: retrying it would block
                # every batch behind it for good.
                self._skip_unreadable(path, exc)
                continue
            outcome = self.http.post(body, self.timeout, gzipped=path.name.endswith(".gz"))
            if outcome.ok:
                self._remove(path, len(body))
                with self._lock:
                    self.replayed += 1
                    recovered, self._failures = self._failures, 0
                if recovered:
                    logger.warning("langfuse_mw: export recovered; replaying the spool")
                continue
            if outcome.fatal:
                self._stopped_reason = outcome.error
                logger.error(
                    "langfuse_mw: Langfuse refused the credentials (%s); the spool in %s is "
                    "kept and replayed after a restart",
                    outcome.error,
                    self.dir,
                )
                return
            if outcome.retry and outcome.drop_reason is None:
                self._back_off(outcome)
                return
            if outcome.retry:
                # A plain 500 may be caused by this very batch: a few tries, then drop it.
                tries = self._server_errors[path.name] = self._server_errors.get(path.name, 0) + 1
                if tries < SERVER_ERROR_ATTEMPTS:
                    self._back_off(outcome)
                    return
            if outcome.split and self._split(path, body):
                return  # its halves replay next, in its place in the order
            # Refused for good (400, redirect, repeated 500, 413 for one span): drop it so the
            # rest flows.
            reason = outcome.drop_reason or ("too_large" if outcome.split else "rejected")
            self._remove(path, len(body))
            with self._lock:
                self.dropped[reason] += _span_count(path)
                self.last_error = outcome.error
            log_once(
                f"spool-drop:{reason}",
                "langfuse_mw: dropped a spooled batch (%s): %s",
                reason,
                outcome.error,
            )

    def _split(self, path: Path, body: bytes) -> bool:
        """Replace a batch Langfuse found too large (413) by its two halves, as the export
        queue does with a live batch; False if it holds one span or cannot be read."""
        gzipped = path.name.endswith(".gz")
        try:
            halves = split_request(gzip.decompress(body) if gzipped else body)
        except Exception:  # not OTLP (a damaged file): dropped by the caller
            return False
        if halves is None:
            return False
        # "<ns>-<pid>-<seq>-<spans>": the halves take the seq with "a" and "b" appended, so
        # they sort where the batch was (and split again the same way if still too large).
        stem, _, _ = path.name.partition(".")
        head = stem.rsplit("-", 1)[0]
        suffix = path.name[len(stem) :]
        for letter, (half, spans) in zip("ab", halves, strict=True):
            data = gzip.compress(half, compresslevel=1) if gzipped else half
            if self._store(self.dir / f"{head}{letter}-{spans}{suffix}", data) is not None:
                return False  # the batch stays; a half already written is sent twice at worst
        self._remove(path, len(body))
        return True

    def _skip_unreadable(self, path: Path, exc: OSError) -> None:
        error = f"cannot read spooled batch {str(path)!r}: {exc}"
        with self._lock:
            self._unreadable.add(path.name)
            self._files_count = max(0, self._files_count - 1)
            self._bytes = max(0, self._bytes - _size(path))
            self.dropped["spool_error"] += _span_count(path)
            self.last_error = error
        log_once("spool-drop:spool_error", "langfuse_mw: skipped a spooled batch: %s", error)

    def _remove_stale_tmp(self) -> None:
        # A process killed between creating its .tmp- file and renaming it leaves it behind:
        # never replayed (it may be partial) and outside spool_max_bytes, it would stay forever.
        cutoff = time.time() - _STALE_TMP_AGE
        try:
            entries = [e for e in os.scandir(self.dir) if e.name.startswith(".tmp-")]
        except OSError:
            return
        for entry in entries:
            try:
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
            except OSError:
                continue

    def _remove(self, path: Path, size: int) -> None:
        self._server_errors.pop(path.name, None)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        with self._lock:
            self._files_count = max(0, self._files_count - 1)
            self._bytes = max(0, self._bytes - size)

    def _files(self) -> list[Path]:
        try:
            names = sorted(
                entry.name
                for entry in os.scandir(self.dir)
                if not entry.name.startswith(".")
                and entry.name.endswith(_SUFFIXES)
                and entry.name not in self._unreadable
            )
        except OSError:
            return []
        return [self.dir / name for name in names]

    # -- Sender surface --------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters for health(): what waits on disk, what was replayed or dropped."""
        with self._lock:
            return {
                "mode": "spool",
                "target": str(self.dir),
                "spool_files": self._files_count,
                "spool_bytes": self._bytes,
                "spool_max_bytes": self.max_bytes,
                "spooled_batches": self.spooled,
                "replayed_batches": self.replayed,
                "dropped": dict(self.dropped),
                "last_error": self.last_error,
                "replay": "stopped" if self._stopped_reason else "running",
            }

    def reset(self) -> None:
        # After fork the replay thread is gone: the child starts its own if files wait.
        self.http.reset()
        self._init_state()
        self._start_if_needed()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(1.0)
        self.http.close()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _span_count(path: Path) -> int:
    # <ns>-<pid>-<seq>-<spans>.otlp[.gz]
    try:
        return int(path.name.split(".", 1)[0].rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return 1
