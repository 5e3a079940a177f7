"""Compare two exports of the same request, leaving out what differs from run to run; the
ways a request can arrive that the sampled-out tests run through."""

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


CALLER = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-"
# The langfuse SDK's claim that the caller exports this trace's root, and user and session.
BAGGAGE = (
    b"langfuse_user_id=u-b,langfuse_session_id=s-b,tenant=acme,"
    b"langfuse_trace_id=4bf92f3577b34da6a3ce929d0e0e4736"
)
# How the request arrives: (traceparent flags or None, baggage or None).
ARRIVALS = {
    "new-trace": (None, None),
    "caller-flags-00": ("00", None),
    "caller-flags-00-baggage": ("00", BAGGAGE),
    "baggage-only": (None, BAGGAGE),
}


def arrival_headers(flags: str | None, baggage: bytes | None) -> list[tuple[bytes, bytes]]:
    """The request's headers; with baggage, user and session come from it alone."""
    headers = [(b"x-request-id", b"r-7"), (b"user-agent", b"agent/7")]
    if baggage is None:
        headers += [(b"x-user-id", b"u-7"), (b"x-session-id", b"s-7")]
    else:
        headers.append((b"baggage", baggage))
    if flags is not None:
        headers.append((b"traceparent", (CALLER + flags).encode()))
    return headers


def assert_kept_as_sampled(
    dropped: dict[str, Any], kept: dict[str, Any], kept_by: str, arrival: str,
    window: tuple[int, int],
) -> None:  # fmt: skip
    """A sampled-out root kept for ``kept_by`` against the sampled root of the same request:
    the same export plus keptBy, the arrival's ids and trace, timed within ``window`` from
    the start of the request (not from when it was found worth keeping)."""
    flags, baggage = ARRIVALS[arrival]
    assert dropped["metadata"]["keptBy"] == kept_by and "keptBy" not in kept["metadata"]
    assert comparable(dropped) == comparable(kept)
    expected_ids = ("u-7", "s-7") if baggage is None else ("u-b", "s-b")
    assert (dropped["user_id"], dropped["session_id"]) == expected_ids
    if flags is not None:
        assert dropped["trace_id"] == kept["trace_id"] == CALLER[3:35]
        assert dropped["parent_span_id"] == CALLER[36:52]
    before, after = window
    assert before <= dropped["start_time_unix_nano"] <= dropped["end_time_unix_nano"] <= after
