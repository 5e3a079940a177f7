"""Durable export: a Redis stream drained by `langfuse-mw forward`, or a local spool directory.

Importing this package needs no redis; the producer and the forwarder import it when built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Settings
    from ..export import HttpSender, Sender

__all__ = ["durable_sender"]


def durable_sender(settings: Settings, http: HttpSender) -> Sender:
    """The Sender for ``queue_url`` (a Redis stream) or ``spool_dir`` (a spool) around ``http``."""
    if settings.queue_url:
        from .producer import RedisSender

        return RedisSender(
            settings.queue_url,
            settings.queue_stream,
            maxlen=settings.queue_maxlen,
            encoder=http,
            public_key=settings.public_key or "",
            timeout=min(settings.export_timeout, 2.0),
        )
    if settings.spool_dir:
        from .spool import SpoolSender

        return SpoolSender(http, settings.spool_dir, max_bytes=settings.spool_max_bytes)
    raise ValueError("durable_sender: neither queue_url nor spool_dir is set")
