"""A local Langfuse-compatible receiver: OTLP ingestion, SQLite storage, read API, viewer."""

from __future__ import annotations

from .server import INGEST_PATH, DevServer
from .store import Store

__all__ = ["INGEST_PATH", "DevServer", "Store"]
