"""SQLite storage for the devserver: observations upserted by span id, traces aggregated."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .._otlp import SpanDict
from .mapping import Observation, aggregate_trace, observation_from_span

__all__ = ["Store"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS observations (
    trace_id TEXT NOT NULL,
    id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    start_ns INTEGER NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (trace_id, id)
);
CREATE TABLE IF NOT EXISTS traces (
    id TEXT PRIMARY KEY,
    name TEXT,
    user_id TEXT,
    session_id TEXT,
    start_ns INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    received_at REAL NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS traces_start ON traces (start_ns DESC);
CREATE INDEX IF NOT EXISTS traces_user ON traces (user_id);
CREATE INDEX IF NOT EXISTS traces_session ON traces (session_id);
CREATE INDEX IF NOT EXISTS traces_last_seq ON traces (last_seq);
"""


class Store:
    """Traces and observations in SQLite (a file, or ``":memory:"``), safe across threads.

    One connection guarded by a lock: an in-memory database exists only on its connection,
    and a development receiver never needs parallel writes.
    """

    def __init__(
        self,
        path: str = ":memory:",
        *,
        max_traces: int | None = None,
        max_age_seconds: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_traces is not None and max_traces < 1:
            raise ValueError(f"max_traces must be >= 1, got {max_traces}")
        if max_age_seconds is not None and max_age_seconds <= 0:
            raise ValueError(f"max_age_seconds must be > 0, got {max_age_seconds}")
        self.max_traces = max_traces
        self.max_age_seconds = max_age_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        if path != ":memory:":
            # Lets another process (a second viewer, sqlite3 CLI) read while we write.
            self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM observations").fetchone()
        self._seq = int(row[0])

    def close(self) -> None:
        """Close the database; the store cannot be used afterwards."""
        with self._lock:
            self._db.close()

    # -- writes -------------------------------------------------------------------------------

    def add_spans(self, spans: Sequence[SpanDict]) -> int:
        """Map and store one accepted batch; a span id seen before replaces its observation."""
        return self.add_observations([observation_from_span(span) for span in spans])

    def add_observations(self, observations: Iterable[Observation]) -> int:
        """Upsert observations and re-aggregate their traces, in one transaction."""
        observations = list(observations)
        if not observations:
            return 0
        with self._lock:
            now = self._clock()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                touched: set[str] = set()
                for obs in observations:
                    self._seq += 1
                    self._db.execute(
                        "INSERT INTO observations (trace_id, id, seq, start_ns, data) "
                        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (trace_id, id) DO UPDATE SET "
                        "seq = excluded.seq, start_ns = excluded.start_ns, data = excluded.data",
                        (obs["traceId"], obs["id"], self._seq, obs["startTimeUnixNano"],
                         json.dumps(obs)),
                    )  # fmt: skip
                    touched.add(obs["traceId"])
                for trace_id in touched:
                    self._refresh_trace(trace_id, now)
                self._apply_retention(now)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return len(observations)

    def _refresh_trace(self, trace_id: str, now: float) -> None:
        rows = self._db.execute(
            "SELECT data, seq FROM observations WHERE trace_id = ? ORDER BY seq", (trace_id,)
        ).fetchall()
        trace = aggregate_trace(trace_id, [json.loads(r[0]) for r in rows])
        self._db.execute(
            "INSERT OR REPLACE INTO traces "
            "(id, name, user_id, session_id, start_ns, last_seq, received_at, data) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (trace_id, trace["name"], trace["userId"], trace["sessionId"],
             trace["startTimeUnixNano"], rows[-1][1], now, json.dumps(trace)),
        )  # fmt: skip

    def _apply_retention(self, now: float) -> None:
        if self.max_age_seconds is not None:
            self._delete_where("received_at < ?", (now - self.max_age_seconds,))
        if self.max_traces is not None:
            # Keep the traces that received data most recently.
            self._delete_where(
                "id NOT IN (SELECT id FROM traces ORDER BY last_seq DESC LIMIT ?)",
                (self.max_traces,),
            )

    def _delete_where(self, condition: str, params: tuple[Any, ...]) -> None:
        ids = [r[0] for r in self._db.execute(f"SELECT id FROM traces WHERE {condition}", params)]
        for trace_id in ids:
            self._db.execute("DELETE FROM observations WHERE trace_id = ?", (trace_id,))
            self._db.execute("DELETE FROM traces WHERE id = ?", (trace_id,))

    def prune(self) -> None:
        """Apply the age limit now (it is otherwise applied on every write)."""
        with self._lock:
            self._apply_retention(self._clock())

    # -- reads --------------------------------------------------------------------------------

    def list_traces(
        self,
        *,
        user_id: str | None = None,
        session_id: str | None = None,
        name: str | None = None,
        page: int = 1,
        limit: int = 50,
    ) -> tuple[list[dict[str, Any]], int]:
        """One page of traces, newest first, and the number of traces that match."""
        clauses, params = [], []
        for column, value in (("user_id", user_id), ("session_id", session_id), ("name", name)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._lock:
            total = int(self._db.execute(f"SELECT COUNT(*) FROM traces {where}", params)
                        .fetchone()[0])  # fmt: skip
            rows = self._db.execute(
                f"SELECT data FROM traces {where} ORDER BY start_ns DESC, id LIMIT ? OFFSET ?",
                [*params, limit, (page - 1) * limit],
            ).fetchall()
        return [json.loads(r[0]) for r in rows], total

    def get_trace(self, trace_id: str) -> dict[str, Any] | None:
        """The trace with its observations in start order, or None."""
        with self._lock:
            row = self._db.execute("SELECT data FROM traces WHERE id = ?", (trace_id,)).fetchone()
            if row is None:
                return None
            observations = self._db.execute(
                "SELECT data FROM observations WHERE trace_id = ? ORDER BY start_ns, seq",
                (trace_id,),
            ).fetchall()
        trace: dict[str, Any] = json.loads(row[0])
        trace["observations"] = [json.loads(r[0]) for r in observations]
        return trace

    def trace_ids(self) -> list[str]:
        """Every stored trace id, newest first."""
        with self._lock:
            rows = self._db.execute("SELECT id FROM traces ORDER BY start_ns DESC, id").fetchall()
        return [r[0] for r in rows]

    def observation_count(self) -> int:
        """How many observations are stored."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM observations").fetchone()[0])
