"""The producer side: each encoded OTLP batch goes to a Redis stream with ``XADD ... MAXLEN ~``.

``RedisSender`` sits behind ``ExportQueue``, so the request path never touches Redis; when Redis
is down the batch is retried with the queue's back-off and, once the bounded queue is full, new
spans are dropped and counted (the degradation rules of docs/export.md).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from ..export import SENT, HttpSender, Item, Outcome, encode_or_isolate, with_unencodable
from ._redis import GZIP_MAGIC, connect, describe_url, drop_idle_connections, import_redis

__all__ = ["ENTRY_VERSION", "RedisSender", "entry_fields"]

# Bumped if the entry layout changes, so a forwarder can refuse what it does not understand.
ENTRY_VERSION = b"1"


def entry_fields(body: bytes, spans: int, public_key: str) -> dict[str, Any]:
    """The fields of one stream entry: the OTLP request bytes exactly as they will be POSTed."""
    return {
        "v": ENTRY_VERSION,
        "body": body,
        "enc": "gzip" if body[:2] == GZIP_MAGIC else "identity",
        "spans": spans,
        "pk": public_key,
    }


class RedisSender:
    """A Sender that appends each batch to a Redis stream for `langfuse-mw forward`."""

    def __init__(
        self,
        url: str,
        stream: str,
        *,
        maxlen: int,
        encoder: HttpSender,
        public_key: str,
        timeout: float = 2.0,
    ) -> None:
        self._redis = import_redis()  # fail at start-up, naming the extra, when it is missing
        self.url = url
        self.stream = stream
        self.maxlen = maxlen
        self.public_key = public_key
        self._encoder = encoder
        self._timeout = timeout
        self._describe = f"Redis {describe_url(url)} stream {stream!r}"
        self._client: Any = None
        self._lock = threading.Lock()
        self.batches_added = 0
        self.spans_added = 0
        self.failed_writes = 0
        self.last_error: str | None = None
        self.last_write_at: float | None = None

    def _conn(self) -> Any:
        if self._client is None:
            self._client = connect(self.url, self._timeout)
        return self._client

    def send(self, spans: Sequence[Item], timeout: float) -> Outcome:
        body, bad, error = encode_or_isolate(self._encoder, spans)
        if body is None:  # no span could be encoded: drop, not retry
            return Outcome(drop_reason="encoding", error=error)
        return with_unencodable(self._add(body, len(spans) - len(bad)), bad, error)

    def _add(self, body: bytes, spans: int) -> Outcome:
        fields = entry_fields(body, spans, self.public_key)
        try:
            # MAXLEN ~ lets Redis trim whole radix-tree nodes: cheap, and memory stays bounded.
            self._conn().xadd(self.stream, fields, maxlen=self.maxlen, approximate=True)
        except self._redis.RedisError as exc:
            error = f"{self._describe}: {type(exc).__name__}: {exc}"
            drop_idle_connections(self._client)  # READONLY after a failover: reconnect
            with self._lock:
                self.failed_writes += 1
                self.last_error = error
            # Retried with ExportQueue's back-off; the spans stay in its bounded queue meanwhile.
            return Outcome(retry=True, error=error)
        with self._lock:
            self.batches_added += 1
            self.spans_added += spans
            self.last_write_at = time.time()
        return SENT

    def stats(self) -> dict[str, Any]:
        """Counters for health(): what reached the stream and what Redis refused."""
        with self._lock:
            return {
                "mode": "redis",
                "target": self._describe,
                "batches_added": self.batches_added,
                "spans_added": self.spans_added,
                "failed_writes": self.failed_writes,
                "last_error": self.last_error,
                "last_write_at": self.last_write_at,
            }

    def reset(self) -> None:
        # After fork: the parent's sockets must not be shared (redis-py also checks the pid).
        self._client = None
        self._lock = threading.Lock()
        self.batches_added = self.spans_added = self.failed_writes = 0

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
