"""Nasty header values every adapter's tests send (RELIABILITY.md, "Bad input")."""

from __future__ import annotations

# (name, raw bytes) pairs; bytes so values that are not UTF-8 can be sent as they are.
BAD_ID_VALUES: list[bytes] = [
    b"x" * 100_000,
    b"x" * 201,
    b"abc\r\nSet-Cookie: evil=1",
    b"abc\nx",
    b"abc\x00def",
    b"\x7f",
    b"tab\there",
    b"\xff\xfe\xfa",  # not UTF-8
    "caf\u00e9".encode(),  # non-ASCII text
    "\u202eevil".encode(),  # a bidi override
    b"",
    b"   ",
]

BAD_TRACEPARENTS: list[bytes] = [
    b"garbage",
    b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
    b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # all-zero span id
    b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",  # uppercase hex
    b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # forbidden version
    b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",  # v00 with extra
    b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01" + b"0" * 600,
    b"00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  # short trace id
    b"\xff\xfe",
]

# The same, and their twins with flags 00 (a caller that did not sample): what a service that
# may drop a request reads before deciding.
BAD_TRACEPARENTS_BOTH_FLAGS: list[bytes] = BAD_TRACEPARENTS + [
    value[:-2] + b"00" for value in BAD_TRACEPARENTS if value.endswith(b"-01")
]

VALID_TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
VALID_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
VALID_PARENT_ID = "00f067aa0ba902b7"

# (response status, observation level, options): what every adapter must record.
LEVEL_CASES = [
    (503, "ERROR", {}),
    (404, "WARNING", {}),
    (404, "DEFAULT", {"level_4xx": "DEFAULT"}),
    (422, "ERROR", {"level_4xx": "error"}),
    (201, "DEFAULT", {}),
]
