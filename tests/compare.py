"""Compare two exports of the same request, leaving out what differs from run to run."""

from __future__ import annotations

from typing import Any

_META = "langfuse.observation.metadata."
_VOLATILE = {"trace_id", "span_id", "start_time_unix_nano", "end_time_unix_nano", "resource"}


def comparable(span: dict[str, Any]) -> dict[str, Any]:
    """A captured span without ids, times, time to first byte and why it was kept."""
    attrs = {
        key: value
        for key, value in span["attributes"].items()
        if key not in (_META + "keptBy", _META + "timeToFirstByteMs")
    }
    events = [(e["name"], e["attributes"].get("exception.message")) for e in span["events"]]
    kept = {key: value for key, value in span.items() if key not in _VOLATILE}
    return {**kept, "attributes": attrs, "events": events, "metadata": None}
