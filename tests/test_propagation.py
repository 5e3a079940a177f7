"""The plain traceparent and baggage readers agree with OpenTelemetry's propagators.

The readers handle the common forms themselves (several times faster) and hand everything
else to the propagators; on every input where they answer, their answer must be the
propagator's.
"""

from __future__ import annotations

import logging
import random

import pytest

from langfuse_mw.propagation import (
    _parent,
    _plain_baggage,
    _propagator_baggage,
    _propagator_parent,
    baggage_entries,
    plain_parent,
)
from tests.corpus import BAD_TRACEPARENTS, VALID_TRACEPARENT

TRACESTATES = [None, "congo=t61rcWkgMzE", "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE", "===",
               "a=1,a=2", "x" * 300, ""]  # fmt: skip


def traceparents() -> list[str]:
    rng = random.Random(11)
    out = [raw.decode("latin-1") for raw in [VALID_TRACEPARENT, *BAD_TRACEPARENTS]]
    for _ in range(1500):
        trace_id = f"{rng.getrandbits(128) if rng.random() > 0.05 else 0:032x}"
        span_id = f"{rng.getrandbits(64) if rng.random() > 0.05 else 0:016x}"
        version = rng.choice(["00", "00", "00", "01", "cc", "ff", "0", "000", "AA"])
        flags = rng.choice([f"{rng.getrandbits(8):02x}", "01", "00", "1", "0G"])
        value = f"{version}-{trace_id}-{span_id}-{flags}"
        mutation = rng.randrange(8)
        if mutation == 1:
            value = value.upper()
        elif mutation == 2:
            value = f" \t{value}\t "
        elif mutation == 3:
            value += "-" + rng.choice(["", "extra", "00"])
        elif mutation == 5:  # one character upper-cased
            cut = rng.randrange(len(value))
            value = value[:cut] + value[cut].upper() + value[cut + 1 :]
        elif mutation == 4:
            cut = rng.randrange(len(value))
            value = value[:cut] + rng.choice("g-_ Z\u00e9") + value[cut + 1 :]
        out.append(value)
    return out


@pytest.mark.parametrize("tracestate", TRACESTATES)
def test_traceparent_reader_answers_what_the_propagator_answers(tracestate: str | None) -> None:
    plain_answers = 0
    for value in traceparents():
        headers = {"traceparent": value}
        if tracestate is not None:
            headers["tracestate"] = tracestate
        expected = _propagator_parent(value, headers)
        assert _parent(headers) == expected, value
        plain = plain_parent(value, tracestate)
        if plain is not None:
            plain_answers += 1
            assert plain == expected and plain.is_valid and plain.is_remote, value
    assert plain_answers > 100  # the common form is read without the propagator


BAGGAGE = [
    "langfuse_user_id=u-1,langfuse_session_id=s-1",
    "a=1, b=2 ,c=3",
    " a=1 ",
    "a = 1",
    "a=1;prop=x",
    "a=%20x",
    "a=b+c",
    "k=",
    "=v",
    "a=1,,b=2",
    'a="q"',
    "a=1,a=2,b=3,a=4",
    "caf\u00e9=1",
    "a=caf\u00e9",
    "a=\\x",
    "a",
    ",",
    "k=" + "v" * 5000,
    ",".join(f"k{n}=v{n}" for n in range(179)),
    "user=alice%40example.com,tenant=acme",
]


def random_baggage(rng: random.Random) -> str:
    alphabet = "ab=,;% +\t\"\\-_.~!*'()0123456789\u00e9"
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 30)))


def test_baggage_reader_answers_what_the_propagator_answers() -> None:
    rng = random.Random(5)
    cases = BAGGAGE + [random_baggage(rng) for _ in range(5000)]
    plain_answers = 0
    for raw in cases:
        expected = _propagator_baggage(raw)
        plain = _plain_baggage(raw)
        if plain is not None:
            plain_answers += 1
            assert plain == expected, raw
            assert list(plain) == list(expected), raw  # and in the same order
        if len(raw) <= 8192 and raw.count(",") < 180:
            assert baggage_entries(raw) == expected, raw
    assert _plain_baggage(BAGGAGE[0]) == {"langfuse_user_id": "u-1", "langfuse_session_id": "s-1"}
    assert plain_answers > 40


@pytest.mark.parametrize("padding", ["", " "], ids=["plain", "propagator"])
def test_rejected_tracestate_members_never_reach_the_logs(
    caplog: pytest.LogCaptureFixture, padding: str
) -> None:
    # OpenTelemetry's TraceState logs a member it rejects verbatim; header content from the
    # internet must not reach the logs (the plain reader and the propagator alike).
    caplog.set_level(logging.DEBUG)
    traceparent = padding + VALID_TRACEPARENT.decode()
    headers = {"traceparent": traceparent, "tracestate": "=== secret-token-xyz,ok=1"}
    parent = _parent(headers)
    assert parent is not None and dict(parent.trace_state) == {}  # an invalid list is dropped
    assert "secret-token-xyz" not in caplog.text
    # Only while we read: other users of TraceState keep their warnings.
    from opentelemetry.trace import TraceState

    TraceState.from_header(["=== other-user"])
    assert "other-user" in caplog.text
