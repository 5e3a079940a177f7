"""`langfuse-mw forward`: drain the Redis stream into Langfuse; run as many as the load needs.

Each forwarder is a consumer of one consumer group, so the stream's batches are shared between
them (at-least-once: a batch is acknowledged only after Langfuse answered 2xx, and one left
pending by a dead forwarder is claimed by another once idle long enough). Duplicates carry the
same span ids, which Langfuse upserts.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import json
import logging
import os
import random
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .._failsafe import log_once
from .._otlp import split_request
from ..config import ConfigError, resolve_settings
from ..export import HttpSender, Outcome
from ._redis import connect, describe_url, drop_idle_connections, import_redis
from .producer import ENTRY_VERSION

__all__ = [
    "Forwarder",
    "ForwarderOptions",
    "main",
    "read_stats",
    "requeue_dead_letters",
]

logger = logging.getLogger("langfuse_mw.forward")

DEFAULT_GROUP = "langfuse-mw"
STILL_FAILING_EVERY = 300.0
COUNTERS = (
    "forwarded",
    "forwarded_spans",
    "retried",
    "failed_posts",
    "dead_lettered",
    "claimed",
    "trimmed",
    "redis_errors",
    "too_large_spans",
)
# Fields a dead-letter entry keeps from the original, so it can be requeued as it was.
_ENTRY_FIELDS = (b"v", b"body", b"enc", b"spans", b"pk")


def default_consumer() -> str:
    """A consumer name unique per process: host name and pid."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True, slots=True)
class ForwarderOptions:
    """How one forwarder reads the stream and treats what Langfuse answers."""

    stream: str
    group: str = DEFAULT_GROUP
    consumer: str = dataclasses.field(default_factory=default_consumer)
    dead_letter_stream: str = ""  # "" means "<stream>:dead"
    dead_letter_maxlen: int = 100_000
    read_count: int = 16
    block: float = 1.0
    claim_idle: float = 60.0
    max_rejections: int = 3
    post_timeout: float = 10.0
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    stats_interval: float = 5.0
    delete_acked: bool = True
    public_key: str | None = None  # batches produced for another project are dead-lettered

    @property
    def dead_letters(self) -> str:
        return self.dead_letter_stream or f"{self.stream}:dead"


class CredentialsRefused(Exception):
    """Langfuse answered 401/403: nothing can be forwarded until the keys are fixed."""


class Forwarder:
    """One consumer of the group: reads, POSTs as is, acknowledges after a 2xx."""

    def __init__(
        self,
        client: Any,
        sender: HttpSender,
        options: ForwarderOptions,
        *,
        stop: threading.Event | None = None,
    ) -> None:
        self.redis = client
        self.sender = sender
        self.options = options
        self.stop = stop or threading.Event()
        self._errors = import_redis()
        self._lock = threading.Lock()
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.last_success_at: float | None = None
        self.lag: int | None = None
        self.pending: int | None = None
        self.started_at = time.time()
        self._failing_since: float | None = None
        self._last_still_failing = 0.0
        self._claim_cursor = "0-0"
        self._next_stats = 0.0
        # Entries of the current read not started yet: they are ours too, and must look busy
        # while we work through the ones ahead of them (else XAUTOCLAIM hands them to another
        # forwarder and both post them).
        self._behind: list[bytes] = []
        self._kept_at = 0.0

    # -- main loop ----------------------------------------------------------------------------

    def run(self, *, drain: bool = False) -> int:
        """Forward until stopped (or, with ``drain``, until the group has nothing left).

        Returns 0, or 3 when Langfuse refused the credentials.
        """
        opts = self.options
        logger.info(
            "forwarding stream %r (group %r, consumer %r) to %s",
            opts.stream,
            opts.group,
            opts.consumer,
            self.sender.endpoint,
        )
        claim_every = max(0.1, min(opts.claim_idle / 2, 10.0))
        next_claim = 0.0
        group_ready = False
        own_pending = True  # restarted under the same name: our own pending entries first
        redis_failures = 0
        code = 0
        while not self.stop.is_set():
            try:
                if not group_ready:
                    self._ensure_group()
                    group_ready = True
                now = time.monotonic()
                if now >= next_claim:
                    entries, more = self._autoclaim()
                    next_claim = now if more else now + claim_every
                    source = "claim"
                elif own_pending:
                    entries = self._read("0")
                    own_pending = bool(entries)
                    source = "own"
                else:
                    entries = self._read(">")
                    source = "new"
                if redis_failures:
                    logger.warning("Redis is back after %d failed calls", redis_failures)
                    redis_failures = 0
                self._kept_at = time.monotonic()
                for n, (entry_id, fields) in enumerate(entries):
                    if self.stop.is_set():
                        self._hand_back([eid for eid, _ in entries[n:]])
                        break
                    self._behind = [eid for eid, _ in entries[n + 1 :]]
                    if time.monotonic() - self._kept_at > opts.claim_idle / 3:
                        self._keep([entry_id, *self._behind])
                    self._process(entry_id, fields)
                self._behind = []
                self._maybe_publish_stats()
                if drain and source == "new" and not entries and self._group_drained():
                    break
            except CredentialsRefused as exc:
                logger.error(
                    "Langfuse refused the credentials (%s); check LANGFUSE_PUBLIC_KEY / "
                    "LANGFUSE_SECRET_KEY. Batches stay in the stream; stopping.",
                    exc,
                )
                code = 3
                self.stop.set()  # the other workers of this process hold the same keys
            except self._errors.RedisError as exc:
                if isinstance(exc, self._errors.ResponseError) and "NOGROUP" in str(exc):
                    # The stream or the group vanished (Redis restarted without persistence,
                    # or someone deleted the key): recreate it and carry on.
                    logger.warning("consumer group %r is gone; recreating it", opts.group)
                    group_ready = False
                    continue
                drop_idle_connections(self.redis)  # READONLY after a failover: reconnect
                group_ready = False
                own_pending = True  # entries read before the failure are still ours
                redis_failures += 1
                self._count("redis_errors")
                self._record_error(f"Redis {describe_url(self._url())}: {exc}")
                if redis_failures == 1:
                    logger.warning("Redis unavailable (%s); retrying with back-off", exc)
                self.stop.wait(self._delay(redis_failures, None))
        with contextlib.suppress(self._errors.RedisError):
            self.publish_stats()
            self._leave_group()
        logger.info("forwarder %r stopped: %s", opts.consumer, self._summary())
        return code

    def _leave_group(self) -> None:
        # A consumer stays in the group until deleted: with the default name (host and pid)
        # every restart would add one, and "consumers" in --stats would count dead forwarders.
        # Only one holding no pending entry leaves: deleting a consumer drops its pending list.
        opts = self.options
        for info in self.redis.xinfo_consumers(opts.stream, opts.group):
            name = info.get("name")
            if (name.decode() if isinstance(name, bytes) else name) == opts.consumer:
                if int(info.get("pending", 0)) == 0:
                    self.redis.xgroup_delconsumer(opts.stream, opts.group, opts.consumer)
                return

    def _url(self) -> str:
        kwargs = self.redis.connection_pool.connection_kwargs
        if "path" in kwargs:
            return f"unix://{kwargs['path']}"
        return f"redis://{kwargs.get('host')}:{kwargs.get('port')}/{kwargs.get('db', 0)}"

    # -- one entry ----------------------------------------------------------------------------

    def _process(self, entry_id: bytes, fields: dict[bytes, bytes] | None) -> None:
        opts = self.options
        if not fields:
            # Trimmed by MAXLEN (or deleted) before anyone forwarded it: nothing left to send.
            self._ack(entry_id)
            self._count("trimmed")
            return
        body = fields.get(b"body")
        if fields.get(b"v", ENTRY_VERSION) != ENTRY_VERSION:
            self._dead_letter(entry_id, fields, f"unknown entry version {fields[b'v']!r}", 0)
            return
        if not body:
            self._dead_letter(entry_id, fields, "malformed entry: no body field", 0)
            return
        producer_key = fields.get(b"pk", b"").decode("utf-8", "replace")
        if opts.public_key and producer_key and producer_key != opts.public_key:
            reason = (
                f"produced for public key {producer_key!r}, this forwarder posts as "
                f"{opts.public_key!r}"
            )
            self._dead_letter(entry_id, fields, reason, 0)
            return
        gzipped = fields.get(b"enc") == b"gzip"
        failures = rejections = 0
        while True:
            outcome, too_large = self._post(body, gzipped)
            if outcome.ok:
                self._ack(entry_id)
                self._sent(_int(fields.get(b"spans")) - too_large)
                if too_large:
                    self._count("too_large_spans", too_large)
                    self._record_error(outcome.error)
                    log_once(
                        "forward-too-large",
                        "a span too large for Langfuse on its own was dropped (%s); counted in "
                        "too_large_spans",
                        outcome.error,
                    )
                return
            self._count("failed_posts")
            self._record_error(outcome.error)
            if outcome.fatal:
                raise CredentialsRefused(outcome.error)
            if outcome.retry and outcome.drop_reason is None:
                # Langfuse unavailable (refused, timeout, 429, 502-504): wait, never give up.
                failures += 1
                delay = self._delay(failures, outcome.retry_after)
                self._note_failing(outcome)
            else:
                # Refused for this batch (400, 413, a redirect, or a plain 500 that may be the
                # batch's fault): a few attempts, then the dead-letter stream, so it never
                # blocks the batches behind it.
                rejections += 1
                if rejections >= opts.max_rejections:
                    self._dead_letter(entry_id, fields, outcome.error or "rejected", rejections)
                    return
                delay = self._delay(rejections, None)
            self._count("retried")
            if not self._hold(entry_id, delay):
                self._hand_back([entry_id])  # stopping: another forwarder takes it at once
                return

    def _post(self, body: bytes, gzipped: bool) -> tuple[Outcome, int]:
        """POST a batch; on 413 its halves in turn, as the export queue splits a live batch.

        Returns the outcome and the spans left out: single spans Langfuse still finds too
        large. Halves already taken are posted again if another half must be retried (at
        least once; Langfuse keeps one observation per span id)."""
        outcome = self.sender.post(body, self.options.post_timeout, gzipped=gzipped)
        if not outcome.split:
            return outcome, 0
        try:
            halves = split_request(gzip.decompress(body) if gzipped else body)
        except Exception:  # not OTLP: refused as it is (dead-lettered after its attempts)
            return outcome, 0
        if halves is None:  # one span, too large on its own
            return Outcome(ok=True, error=outcome.error), 1
        left_out = 0
        for half, _ in halves:
            part, dropped = self._post(gzip.compress(half, 1) if gzipped else half, gzipped)
            if not part.ok:
                return part, 0
            left_out += dropped
        return Outcome(ok=True, error=outcome.error if left_out else None), left_out

    def _ack(self, entry_id: bytes) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.xack(self.options.stream, self.options.group, entry_id)
        if self.options.delete_acked:
            # Acknowledged entries are of no further use: deleting them keeps Redis memory for
            # the backlog only, and MAXLEN then trims only when the backlog itself is too long.
            pipe.xdel(self.options.stream, entry_id)
        pipe.execute()

    def _dead_letter(
        self, entry_id: bytes, fields: dict[bytes, bytes], reason: str, attempts: int
    ) -> None:
        opts = self.options
        letter: dict[Any, Any] = {k: v for k, v in fields.items() if k in _ENTRY_FIELDS}
        letter.update(
            {
                b"reason": reason[:2000],
                b"attempts": attempts,
                b"source_id": entry_id,
                b"consumer": opts.consumer,
                b"dead_at": f"{time.time():.3f}",
            }
        )
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(opts.dead_letters, letter, maxlen=opts.dead_letter_maxlen, approximate=True)
        pipe.xack(opts.stream, opts.group, entry_id)
        if opts.delete_acked:
            pipe.xdel(opts.stream, entry_id)
        pipe.execute()
        self._count("dead_lettered")
        logger.warning(
            "moved entry %s to %r after %d attempts: %s",
            entry_id.decode(),
            opts.dead_letters,
            attempts,
            reason,
        )

    def _hold(self, entry_id: bytes, delay: float) -> bool:
        """Wait ``delay`` while keeping the entry ours; False if asked to stop meanwhile."""
        # Re-claiming resets the idle time of the entry and of those read behind it, so no
        # other forwarder takes over batches we are only waiting to retry or to start.
        deadline = time.monotonic() + delay
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            if self.stop.wait(min(left, max(0.05, self.options.claim_idle / 3))):
                return False
            self._maybe_publish_stats()
            self._keep([entry_id, *self._behind])

    def _keep(self, entry_ids: Sequence[bytes]) -> None:
        # XCLAIM to ourselves with min-idle 0 resets the entries' idle time.
        self.redis.xclaim(
            self.options.stream,
            self.options.group,
            self.options.consumer,
            0,
            list(entry_ids),
            justid=True,
        )
        self._kept_at = time.monotonic()

    def _hand_back(self, entry_ids: Sequence[bytes]) -> None:
        # Mark them idle for claim_idle already: the next XAUTOCLAIM of another forwarder
        # takes them at once instead of waiting for the timeout.
        if not entry_ids:
            return
        # On a Redis error they are claimed after the idle timeout instead.
        with contextlib.suppress(self._errors.RedisError):
            self.redis.xclaim(
                self.options.stream,
                self.options.group,
                self.options.consumer,
                0,
                list(entry_ids),
                idle=int(self.options.claim_idle * 1000) + 1,
                justid=True,
            )

    # -- reading ------------------------------------------------------------------------------

    def _ensure_group(self) -> None:
        try:
            # From "0": batches written before the first forwarder started are forwarded too.
            self.redis.xgroup_create(self.options.stream, self.options.group, id="0", mkstream=True)
        except self._errors.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _read(self, start: str) -> list[tuple[bytes, dict[bytes, bytes] | None]]:
        opts = self.options
        response = self.redis.xreadgroup(
            opts.group,
            opts.consumer,
            {opts.stream: start},
            count=opts.read_count,
            block=None if start == "0" else max(1, int(opts.block * 1000)),
        )
        if not response:
            return []
        if isinstance(response, dict):  # RESP3
            return list(next(iter(response.values()))[0])
        return list(response[0][1])

    def _autoclaim(self) -> tuple[list[tuple[bytes, dict[bytes, bytes] | None]], bool]:
        """Take over entries idle for claim_idle (a dead forwarder's); True if more remain."""
        opts = self.options
        reply = self.redis.xautoclaim(
            opts.stream,
            opts.group,
            opts.consumer,
            int(opts.claim_idle * 1000),
            start_id=self._claim_cursor,
            count=opts.read_count,
        )
        cursor = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        self._claim_cursor = cursor
        entries = [(eid, fields) for eid, fields in reply[1] if eid is not None]
        if len(reply) > 2 and reply[2]:
            # Redis dropped these from the pending list: trimmed before anyone forwarded them.
            self._count("trimmed", len(reply[2]))
        if entries:
            self._count("claimed", len(entries))
            logger.info("claimed %d idle entries of another forwarder", len(entries))
        return entries, cursor != "0-0"

    def _group_drained(self) -> bool:
        summary = self.redis.xpending(self.options.stream, self.options.group)
        return int(summary["pending"]) == 0

    # -- counters -----------------------------------------------------------------------------

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def _sent(self, spans: int) -> None:
        with self._lock:
            self.counters["forwarded"] += 1
            self.counters["forwarded_spans"] += spans
            self.last_success_at = time.time()
            failing_since, self._failing_since = self._failing_since, None
        if failing_since is not None:
            logger.warning(
                "Langfuse is back after %.0fs; forwarding resumed",
                time.monotonic() - failing_since,
            )

    def _record_error(self, error: str | None) -> None:
        with self._lock:
            self.last_error = error
            self.last_error_at = time.time()

    def _note_failing(self, outcome: Outcome) -> None:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = self._last_still_failing = now
            logger.warning("Langfuse unavailable (%s); retrying with back-off", outcome.error)
        elif now - self._last_still_failing > STILL_FAILING_EVERY:
            self._last_still_failing = now
            logger.warning("Langfuse still unavailable (%s)", outcome.error)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        opts = self.options
        delay = min(opts.backoff_cap, opts.backoff_base * 2 ** min(attempt - 1, 16))
        delay = random.uniform(delay / 2, delay)  # jitter: forwarders don't retry in step
        return delay if retry_after is None else max(delay, retry_after)

    def stats(self) -> dict[str, Any]:
        """This forwarder's counters, last error and the group's lag when last sampled."""
        with self._lock:
            return {
                "consumer": self.options.consumer,
                **self.counters,
                "lag": self.lag,
                "pending": self.pending,
                "last_error": self.last_error,
                "last_error_at": self.last_error_at,
                "last_success_at": self.last_success_at,
                "started_at": self.started_at,
                "updated_at": time.time(),
            }

    def _maybe_publish_stats(self) -> None:
        if time.monotonic() >= self._next_stats:
            self._next_stats = time.monotonic() + self.options.stats_interval
            self.publish_stats()

    def publish_stats(self) -> None:
        """Sample the group's lag and store our counters in Redis for `--stats`."""
        group = _group_info(self.redis, self.options.stream, self.options.group)
        with self._lock:
            self.lag = _lag(self.redis, self.options, group)
            self.pending = None if group is None else int(group["pending"])
        self.redis.hset(
            _stats_key(self.options.stream), self.options.consumer, json.dumps(self.stats())
        )

    def _summary(self) -> str:
        with self._lock:
            return ", ".join(f"{name}={self.counters[name]}" for name in COUNTERS)


def _int(raw: bytes | None) -> int:
    try:
        return int(raw or 0)
    except ValueError:
        return 0


def _stats_key(stream: str) -> str:
    return f"{stream}:forwarders"


def _group_info(client: Any, stream: str, group: str) -> dict[str, Any] | None:
    try:
        groups = client.xinfo_groups(stream)
    except import_redis().ResponseError:  # no such stream yet
        return None
    for info in groups:
        name = info.get("name")
        if (name.decode() if isinstance(name, bytes) else name) == group:
            return dict(info)
    return None


def _lag(client: Any, options: ForwarderOptions, group: dict[str, Any] | None) -> int | None:
    if group is None:
        return None
    if group.get("lag") is not None:
        return int(group["lag"])
    # Redis cannot tell the lag once entries were deleted (our acknowledged ones): with
    # delete_acked the stream holds only what waits or is in flight.
    if options.delete_acked:
        return max(0, int(client.xlen(options.stream)) - int(group["pending"]))
    return None


def read_stats(client: Any, options: ForwarderOptions) -> dict[str, Any]:
    """The stream's backlog, the group's lag and pending count, and every forwarder's counters."""
    group = _group_info(client, options.stream, options.group)
    forwarders = {
        (name.decode() if isinstance(name, bytes) else name): json.loads(value)
        for name, value in client.hgetall(_stats_key(options.stream)).items()
    }
    return {
        "stream": options.stream,
        "group": options.group,
        "length": int(client.xlen(options.stream)),
        "pending": None if group is None else int(group["pending"]),
        "lag": _lag(client, options, group),
        "consumers": None if group is None else int(group["consumers"]),
        "dead_letter_stream": options.dead_letters,
        "dead_letters": int(client.xlen(options.dead_letters)),
        "totals": {
            name: sum(int(f.get(name, 0)) for f in forwarders.values()) for name in COUNTERS
        },
        "forwarders": dict(sorted(forwarders.items())),
    }


def requeue_dead_letters(client: Any, options: ForwarderOptions, maxlen: int) -> int:
    """Move every dead-lettered batch back to the stream (after fixing what rejected it)."""
    moved = 0
    while True:
        letters = client.xrange(options.dead_letters, count=100)
        if not letters:
            return moved
        pipe = client.pipeline(transaction=True)
        for letter_id, fields in letters:
            entry = {k: v for k, v in fields.items() if k in _ENTRY_FIELDS}
            pipe.xadd(options.stream, entry, maxlen=maxlen, approximate=True)
            pipe.xdel(options.dead_letters, letter_id)
        pipe.execute()
        moved += len(letters)


# -- command line ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The options of `langfuse-mw forward` (the CLI's subcommand uses the same parser)."""
    parser = argparse.ArgumentParser(
        prog="langfuse-mw forward",
        description="Forward OTLP batches from a Redis stream to Langfuse (docs/enterprise.md). "
        "Credentials and endpoint come from LANGFUSE_PUBLIC_KEY, LANGFUSE_SECRET_KEY and "
        "LANGFUSE_BASE_URL.",
    )
    add = parser.add_argument
    add("--queue-url", help="Redis URL (default $LANGFUSE_MW_QUEUE_URL)")
    add("--stream", help="stream name (default $LANGFUSE_MW_QUEUE_STREAM or langfuse-mw:spans)")
    add("--base-url", help="Langfuse URL (default $LANGFUSE_BASE_URL)")
    add("--group", default=DEFAULT_GROUP, help="consumer group (default %(default)s)")
    add("--consumer", default=None, help="consumer name (default <hostname>-<pid>)")
    add("--workers", type=_positive_int, default=1, help="forwarding threads (default 1)")
    add("--read-count", type=_positive_int, default=16, help="entries per read (default 16)")
    add("--claim-idle", type=_positive_float, default=60.0, help="seconds before a pending "
        "batch of a silent forwarder is taken over (default 60)")  # fmt: skip
    add("--max-rejections", type=_positive_int, default=3, help="attempts before a batch "
        "Langfuse rejects (400, 413, 500) goes to the dead-letter stream (default 3)")  # fmt: skip
    add("--dead-letter-stream", default="", help="default <stream>:dead")
    add("--post-timeout", type=_positive_float, default=10.0, help="seconds (default 10)")
    add("--backoff-base", type=_positive_float, default=1.0, help="seconds (default 1)")
    add("--backoff-cap", type=_positive_float, default=60.0, help="seconds (default 60)")
    add("--stats-interval", type=_positive_float, default=5.0, help="seconds between "
        "publishing counters to Redis (default 5)")  # fmt: skip
    add("--keep-acked", action="store_true", help="do not XDEL acknowledged entries")
    add("--drain", action="store_true", help="exit once the group has nothing left")
    add("--stats", action="store_true", help="print the stream's and forwarders' counters "
        "as JSON and exit")  # fmt: skip
    add("--requeue-dead-letters", action="store_true", help="move dead-lettered batches back "
        "to the stream and exit")  # fmt: skip
    add("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return parser


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {raw!r}")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {raw!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Run `langfuse-mw forward` with ``argv``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    overrides = {"queue_url": args.queue_url, "queue_stream": args.stream}
    overrides["base_url"] = args.base_url
    try:
        settings = resolve_settings({k: v for k, v in overrides.items() if v is not None})
    except ConfigError as exc:
        print(f"langfuse-mw forward: {exc}", file=sys.stderr)
        return 2
    if not settings.queue_url:
        print("langfuse-mw forward: set LANGFUSE_MW_QUEUE_URL or --queue-url", file=sys.stderr)
        return 2
    try:
        import_redis()
    except ImportError:  # one line naming the extra, not a traceback
        print(
            'langfuse-mw forward: needs redis-py: pip install "langfuse-mw[redis]"', file=sys.stderr
        )
        return 2
    options = ForwarderOptions(
        stream=settings.queue_stream,
        group=args.group,
        consumer=args.consumer or default_consumer(),
        dead_letter_stream=args.dead_letter_stream,
        read_count=args.read_count,
        claim_idle=args.claim_idle,
        max_rejections=args.max_rejections,
        post_timeout=args.post_timeout,
        backoff_base=args.backoff_base,
        backoff_cap=args.backoff_cap,
        stats_interval=args.stats_interval,
        delete_acked=not args.keep_acked,
        public_key=settings.public_key,
    )
    try:
        # The socket timeout must outlast XREADGROUP's BLOCK.
        client = connect(settings.queue_url, timeout=options.block + 5.0)
        if args.stats:
            print(json.dumps(read_stats(client, options), indent=2, sort_keys=True))
            return 0
        if args.requeue_dead_letters:
            moved = requeue_dead_letters(client, options, settings.queue_maxlen)
            print(f"requeued {moved} dead-lettered batches to {options.stream!r}")
            return 0
    except import_redis().RedisError as exc:
        print(
            f"langfuse-mw forward: Redis {describe_url(settings.queue_url)}: {exc}", file=sys.stderr
        )
        return 1
    missing = [
        name
        for name, value in (
            ("LANGFUSE_PUBLIC_KEY", settings.public_key),
            ("LANGFUSE_SECRET_KEY", settings.secret_key),
        )
        if not value
    ]
    if missing:
        print(f"langfuse-mw forward: {' and '.join(missing)} not set", file=sys.stderr)
        return 2
    from ..runtime import http_sender

    sender = http_sender(settings, settings.public_key or "", settings.secret_key or "")
    return _run(client, sender, options, args.workers, drain=args.drain)


def _run(
    client: Any, sender: HttpSender, options: ForwarderOptions, workers: int, *, drain: bool
) -> int:
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        # Finish the batch in hand, hand back the ones read but not started, then exit.
        logger.info("signal %d: finishing the batch in hand", signum)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    names = [options.consumer] if workers == 1 else [
        f"{options.consumer}-{n}" for n in range(workers)
    ]  # fmt: skip
    forwarders = [
        Forwarder(client, sender, dataclasses.replace(options, consumer=name), stop=stop)
        for name in names
    ]
    codes = [0] * workers

    def work(n: int) -> None:
        codes[n] = forwarders[n].run(drain=drain)

    threads = [
        threading.Thread(target=work, args=(n,), name=f"forward-{n}") for n in range(1, workers)
    ]
    for thread in threads:
        thread.start()
    work(0)
    if drain:
        stop.set()
    for thread in threads:
        while thread.is_alive():  # short joins: signals still reach the main thread
            thread.join(0.2)
    sender.close()
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
