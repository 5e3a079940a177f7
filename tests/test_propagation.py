"""The plain traceparent and baggage readers agree with OpenTelemetry's propagators.

The readers handle the common forms themselves (several times faster) and hand everything
else to the propagators; on every input where they answer, their answer must be the
propagator's.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import propagate
from opentelemetry.trace import TraceState

from langfuse_mw.httpx import TracedClient
from langfuse_mw.propagation import (
    _parent,
    _plain_baggage,
    _propagator_baggage,
    _propagator_parent,
    baggage_entries,
    plain_parent,
)
from langfuse_mw.testing import LangfuseCapture
from langfuse_mw.wsgi import LangfuseWSGIMiddleware
from tests.corpus import BAD_TRACEPARENTS, VALID_TRACEPARENT
from tests.wsgi_apps import driver

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


# W3C Trace Context, "tracestate Limits": propagate at least 512 characters of the combined
# header; to make it fit, remove whole entries, those over 128 characters first, then from
# the end (right).
TRACEPARENTS = {
    "plain": VALID_TRACEPARENT.decode(),  # version 00: our own reader
    "propagator": "01" + VALID_TRACEPARENT.decode()[2:],  # a later version: OpenTelemetry's
}
Pair = tuple[str, str]


def entry(index: int, size: int) -> Pair:
    """A valid entry of ``size`` characters (key, ``=``, value), within the W3C maximums."""
    key = f"k{index}" if index % 3 else f"t{index}@vendor"  # plain and multi-tenant keys
    length = max(1, min(256, size - len(key) - 1))
    return key, (" ab~!c-d" * 40)[: length - 1] + "e"  # leading and inner spaces allowed


# Up to the 32 members allowed, entry sizes on both sides of 128, so headers over 512
# characters are common.
_SIZES = st.one_of(st.integers(4, 40), st.integers(100, 262))
_PAIRS = (
    st.integers(0, 32)
    .flatmap(lambda n: st.lists(_SIZES, min_size=n, max_size=n))
    .map(lambda sizes: [entry(index, size) for index, size in enumerate(sizes)])
)
# Optional whitespace and empty members are allowed between entries, and count as characters.
_SEPARATORS = st.lists(st.sampled_from([",", ", ", " ,\t", ",,", ", , "]), max_size=31)


def combined(pairs: list[Pair]) -> str:
    return ",".join(f"{key}={value}" for key, value in pairs)


def is_large(pair: Pair) -> bool:
    return len(pair[0]) + 1 + len(pair[1]) > 128


@settings(max_examples=300, deadline=None)
@given(_PAIRS, _SEPARATORS)
def test_forwarded_tracestate_keeps_to_the_w3c_size_rule(
    pairs: list[Pair], separators: list[str]
) -> None:
    header = combined(pairs[:1])
    for index, pair in enumerate(pairs[1:]):
        header += (separators[index] if index < len(separators) else ",") + combined([pair])
    assert list(TraceState.from_header([header]).items()) == pairs  # a valid header
    for traceparent in TRACEPARENTS.values():
        parent = _parent({"traceparent": traceparent, "tracestate": header})
        assert parent is not None
        kept = list(parent.trace_state.items())
        assert len(combined(kept)) <= 512
        if len(combined(pairs)) <= 512:
            assert kept == pairs  # whatever the header's own whitespace, all of it goes on
            continue
        rest = iter(pairs)
        assert all(pair in rest for pair in kept)  # whole entries, in their order
        dropped = [pair for pair in pairs if pair not in kept]
        small_dropped = [pair for pair in dropped if not is_large(pair)]
        if small_dropped:
            assert not any(is_large(pair) for pair in kept)  # large entries went first
        for size in (is_large, lambda pair: not is_large(pair)):
            members = [pair for pair in pairs if size(pair)]
            kept_here = [pair for pair in members if pair in kept]
            assert members[: len(kept_here)] == kept_here  # then from the end
        # No more than needed: the entry removed last would not fit back.
        last = (small_dropped or dropped)[0]
        assert len(combined([pair for pair in pairs if pair in kept or pair == last])) > 512


def entries(count: int, size: int, prefix: str = "k") -> list[str]:
    """``count`` valid entries of exactly ``size`` characters."""
    return [f"{prefix}{n:02d}=" + "v" * (size - len(prefix) - 3) for n in range(count)]


LONG = ",".join(["congo=t61rcWkgMzE", "big=" + "x" * 200, *entries(20, 20)])  # 643 characters
LONG_KEPT = ",".join(["congo=t61rcWkgMzE", *entries(20, 20)])  # 437: the large entry went


@pytest.mark.parametrize(
    ("header", "forwarded"),
    [
        (LONG, LONG_KEPT),
        (",".join(entries(30, 20)), ",".join(entries(24, 20))),  # 629: cut from the right
        (",".join(entries(3, 200)), ",".join(entries(2, 200))),  # all large: from the right
        # OpenTelemetry's rules stand: an invalid member, a repeated key or more than 32
        # members make the whole list invalid, however long.
        (",".join([*entries(30, 20), "==="]), ""),
        (",".join([*entries(30, 20), "k00=again"]), ""),
        (",".join(entries(33, 20)), ""),
        (",".join(entries(33, 20)) + "," * 9000, ""),
        ("a=1" + ", \t" * 300 + "b=2", "a=1,b=2"),  # long with whitespace alone: all kept
        ("," * 8000 + "a=1", "a=1"),
        (" \t," * 2500 + LONG, LONG_KEPT),
        # Over 8192 characters: ignored whole, as OpenTelemetry's propagator ignores it.
        (",".join(entries(32, 258)), ""),
        ("," * 16_000 + "a=1", ""),
    ],
    ids=["large-first", "from-the-end", "all-large", "invalid", "repeated", "33-members",
         "33-members-and-commas", "whitespace", "8k-commas", "8k-whitespace", "over-8192",
         "16k-commas"],
)  # fmt: skip
@pytest.mark.parametrize("path", list(TRACEPARENTS))
def test_a_long_tracestate_is_cut_by_whole_entries(header: str, forwarded: str, path: str) -> None:
    parent = _parent({"traceparent": TRACEPARENTS[path], "tracestate": header})
    assert parent is not None
    assert parent.trace_state.to_header() == forwarded


def test_a_pathological_tracestate_never_reaches_the_member_parser_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # OpenTelemetry's parser runs Python code for every comma-separated piece (~1.3 ms for
    # 16 kB of short members): it never gets more than 32 members or 8192 characters. (No
    # timing here: the bound is what keeps the cost down.)
    parsed: list[str] = []
    original = TraceState.from_header

    def spy(cls: Any, headers: list[str]) -> TraceState:
        parsed.extend(headers)
        return original(headers)

    monkeypatch.setattr(TraceState, "from_header", classmethod(spy))
    members = ",".join(f"k{n}=v" for n in range(4000))
    for header in [members[:8192], members[:16_384], "," * 8192, "," * 16_384, " \t" * 4000]:
        for traceparent in TRACEPARENTS.values():
            parent = _parent({"traceparent": traceparent, "tracestate": header})
            assert parent is not None and dict(parent.trace_state) == {}
    assert all(len(text) <= 8192 and text.count(",") < 32 for text in parsed)
    parsed.clear()
    plain_parent(TRACEPARENTS["plain"], "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")
    assert parsed == ["rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"]  # short ones as they came


@pytest.mark.parametrize(
    ("traceparent", "options"),
    [
        (TRACEPARENTS["plain"], {}),
        (TRACEPARENTS["plain"][:-2] + "00", {"sample_rate": 0.5}),  # dropped, decided early
        (TRACEPARENTS["propagator"], {}),
    ],
    ids=["sampled", "sampled-out", "propagator"],
)
def test_every_outgoing_tracestate_of_a_request_is_cut(
    langfuse_capture: LangfuseCapture, traceparent: str, options: dict[str, Any]
) -> None:
    sent: list[httpx.Request] = []
    carriers: list[dict[str, str]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200)

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        with TracedClient(transport=httpx.MockTransport(answer)) as client:
            client.get("http://inventory:8000/stock/7")
        carrier: dict[str, str] = {}
        propagate.inject(carrier)  # any OpenTelemetry instrumentation of another client
        carriers.append(carrier)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    headers = [(b"traceparent", traceparent.encode()), (b"tracestate", LONG.encode())]
    result = driver.call(LangfuseWSGIMiddleware(app, **options), "/checkout", headers=headers)
    assert result.status == 200
    assert sent[0].headers["tracestate"] == carriers[0]["tracestate"] == LONG_KEPT
