"""The optional redis-py dependency, imported only when a queue is configured."""

from __future__ import annotations

from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

__all__ = ["GZIP_MAGIC", "connect", "describe_url", "drop_idle_connections", "import_redis"]

GZIP_MAGIC = b"\x1f\x8b"


def import_redis() -> ModuleType:
    """Return the redis module, or raise an ImportError that names the extra to install."""
    try:
        import redis
    except ImportError as exc:
        raise ImportError(
            'langfuse_mw: queue_url needs redis-py: pip install "langfuse-mw[redis]"'
        ) from exc
    return redis


def connect(url: str, timeout: float) -> Any:
    """A client that fails fast: our callers have their own back-off, redis-py's would stack."""
    redis = import_redis()
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        # One immediate retry reconnects after Redis restarted under a pooled connection.
        retry=Retry(NoBackoff(), 1),
        health_check_interval=0,
    )


def drop_idle_connections(client: Any) -> None:
    """After a Redis error: the next command opens a new connection (resolving the host again).

    redis-py keeps a connection that answered with an error. After a failover of a managed
    Redis the endpoint's name points to the new primary, but a pooled connection to the old
    one, now a replica, answers every write with READONLY for as long as it stays open.
    """
    try:
        client.connection_pool.disconnect(inuse_connections=False)
    except Exception:  # a broken connection that cannot even close: it is dropped anyway
        return


def describe_url(url: str) -> str:
    """The URL without its password, for logs and errors."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix://{parts.path}"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}{parts.path}"
