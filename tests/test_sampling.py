"""Sampling: rate by trace id, per-route rules, parent-based; errors and slow requests kept."""

from __future__ import annotations

import json
import random
import re
import time
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace.sampling import Decision, TraceIdRatioBased

from langfuse_mw import health
from langfuse_mw.sampling import MAX_REGEX_PATH, Sampler, TemplateMatcher, template_regex
from langfuse_mw.testing import capture_langfuse
from tests import apps
from tests.asgi_driver import call
from tests.compare import ARRIVALS, arrival_headers, assert_kept_as_sampled
from tests.conftest import traced_app
from tests.corpus import BAD_ID_VALUES, BAD_TRACEPARENTS_BOTH_FLAGS

pytestmark = pytest.mark.anyio


def test_decisions_match_opentelemetry_so_services_agree() -> None:
    rng = random.Random(7)
    for rate in (0.0, 0.01, 0.1, 0.5, 0.9, 1.0):
        ours, theirs = Sampler(rate), TraceIdRatioBased(rate)
        for _ in range(2000):
            trace_id = rng.getrandbits(128)
            expected = theirs.should_sample(None, trace_id, "x").decision
            assert ours.keeps(trace_id, "/") is (expected is Decision.RECORD_AND_SAMPLE)


@pytest.mark.parametrize(
    ("template", "path", "matches"),
    [
        ("/items/{item_id}", "/items/42", True),
        ("/items/{item_id:int}", "/items/42/extra", False),
        ("/files/{rest:path}", "/files/a/b/c", True),
        ("/inventory/<int:item_id>", "/inventory/7", True),
        ("price/<int:item_id>", "price/7", True),
        ("/a.b", "/aXb", False),
    ],
)
def test_route_templates_of_every_framework_become_path_patterns(
    template: str, path: str, matches: bool
) -> None:
    import re

    assert (re.fullmatch(template_regex(template), path) is not None) is matches
    if "path" not in template:
        assert TemplateMatcher(template).fullmatch(path) is matches


_PIECES = st.sampled_from(["{a}", "{b:int}", "<c>", ".", "-", "x", "ab", "/", "v"])


@settings(max_examples=400, deadline=None)
@given(
    st.lists(_PIECES, min_size=1, max_size=7).map("".join),
    st.text(alphabet="./-xabv1", max_size=14),
)
def test_the_template_matcher_agrees_with_the_templates_regex(template: str, path: str) -> None:
    # Sampling rules match without the regex, which backtracks; the answers must not change.
    expected = re.fullmatch(template_regex(template), path) is not None
    assert TemplateMatcher(template).fullmatch(path) is expected


def test_sampling_rules_never_match_paths_with_a_backtracking_regex() -> None:
    # /v/{major}.{minor}.{patch} as a regex backtracks cubically on "/v/" + 3000 dots
    # (seconds per request, before routing): templates are matched by TemplateMatcher, and
    # the regex rules (re:, path parameters) are skipped for paths over MAX_REGEX_PATH.
    rule = "/v/{major:int}.{minor:int}.{patch:int}"
    sampler = Sampler(0.0, [(rule, 1.0), (r"re:/(a+)+b", 1.0), ("/f/{rest:path}.txt", 1.0)])
    matchers = [matcher for matcher, _ in sampler._rules]
    assert isinstance(matchers[0], TemplateMatcher)
    assert not isinstance(matchers[1], TemplateMatcher)
    assert sampler.keeps(1, "/v/1.2.3") and not sampler.keeps(1, "/v/" + "." * 3000 + "/")
    assert sampler.keeps(1, "/f/a/b.txt")
    assert not sampler.keeps(1, "/" + "a" * (MAX_REGEX_PATH + 1))  # never reaches the regex


async def test_rate_keeps_its_share_and_errors_are_always_kept() -> None:
    with capture_langfuse() as capture:
        app = traced_app("starlette", sample_rate=0.1)
        for _ in range(2000):
            await call(app, "/hello")
        for _ in range(20):
            await call(app, "/boom")
            await call(app, "/status/503")
        kept = capture.spans(name="GET /hello")
        assert 0.07 <= len(kept) / 2000 <= 0.13
        assert all("keptBy" not in s["metadata"] for s in kept)
        errors = capture.spans(name="GET /boom") + capture.spans(name="GET /status/{code:int}")
        assert len(errors) == 40  # every one of them, sampled or not
        for span in errors:
            assert span["level"] == "ERROR"
            assert span["metadata"].get("keptBy") in (None, "error")


async def test_sampled_out_requests_export_nothing_of_their_children() -> None:
    with capture_langfuse() as capture:
        app = traced_app("starlette", sample_rate=0.0)
        result = await call(app, "/items/1", headers=[(b"x-user-id", b"u")])
        assert result.status == 200 and result.header(b"x-request-id")
        assert capture.spans() == []


@pytest.mark.parametrize("framework", ["starlette", "fastapi"])
async def test_sampled_out_requests_keep_their_ids_and_failures_keep_their_user(
    framework: str,
) -> None:
    ids = [(b"x-user-id", b"u-out"), (b"x-session-id", b"s-out"), (b"x-request-id", b"r-out")]
    with capture_langfuse() as capture:
        app = traced_app(framework, sample_rate=0.0)
        seen = json.loads((await call(app, "/ctx", headers=ids)).body)
        assert (seen["request_id"], seen["user_id"], seen["session_id"]) == (
            "r-out", "u-out", "s-out",
        )  # fmt: skip
        assert capture.spans() == []
        await call(app, "/boom", headers=ids)
        root = capture.single(name="GET /boom")
        assert (root["user_id"], root["session_id"]) == ("u-out", "s-out")
        assert root["metadata"]["requestId"] == "r-out"
        assert root["metadata"]["route"] == "/boom"
        assert root["metadata"]["keptBy"] == "error"


async def test_per_route_rules_and_slow_requests() -> None:
    with capture_langfuse() as capture:
        app = traced_app(
            "starlette",
            sample_rate=0.0,
            sample_rules={"/items/{item_id}": 1.0},
            slow_threshold=0.1,
        )
        await call(app, "/items/5")
        await call(app, "/hello")
        await call(app, "/stream", query=b"delay=0.05")  # three chunks: ~150 ms
        assert [s["name"] for s in capture.spans(name="GET /items/{item_id}")] == [
            "GET /items/{item_id}"
        ]
        assert capture.spans(name="GET /hello") == []
        assert capture.single(name="GET /stream")["metadata"]["keptBy"] == "slow"


@pytest.mark.parametrize(("flags", "kept"), [(b"01", True), (b"00", False)])
async def test_continued_traces_follow_the_callers_decision(flags: bytes, kept: bool) -> None:
    traceparent = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-" + flags
    with capture_langfuse() as capture:
        # The rate would say the opposite: the caller's flag wins.
        app = traced_app("starlette", sample_rate=0.0 if kept else 1.0)
        await call(app, "/items/1", headers=[(b"traceparent", traceparent)])
        await call(app, "/boom", headers=[(b"traceparent", traceparent)])
        assert (len(capture.spans(name="GET /items/{item_id}")) == 1) is kept
        # A flag 00 from a caller cannot hide a failing request.
        assert len(capture.spans(name="GET /boom")) == 1


async def test_a_public_edge_ignores_crafted_trace_ids_and_flags() -> None:
    crafted = [
        (b"traceparent", b"00-00000000000000000000000000000001-00f067aa0ba902b7-01"),
    ]
    with capture_langfuse() as capture:
        app = traced_app("starlette", trust_incoming="ignore", sample_rate=0.2)
        for n in range(5000):
            flags = b"01" if n % 2 else b"00"
            headers = [(crafted[0][0], crafted[0][1][:-2] + flags)]
            await call(app, "/hello", headers=headers)
        kept = capture.spans(name="GET /hello")
        assert 0.18 <= len(kept) / 5000 <= 0.22
        assert len({s["trace_id"] for s in kept}) == len(kept)
        assert all(s["parent_span_id"] is None for s in kept)


# A request the sampler drops that brought no trace context takes a lighter path (its request
# is read only if it is kept): what it exports, echoes and shows the handler must not change.
IDS = [(b"x-user-id", b"u-7"), (b"x-session-id", b"s-7"), (b"x-request-id", b"r-7"),
       (b"user-agent", b"agent/7")]  # fmt: skip


@pytest.mark.parametrize("framework", ["starlette", "fastapi"])
@pytest.mark.parametrize(
    ("path", "kept_by"), [("/boom", "error"), ("/status/503", "error"), ("/items/3", "slow")]
)
@pytest.mark.parametrize("arrival", list(ARRIVALS))
async def test_a_kept_sampled_out_request_is_exported_as_a_sampled_one(
    framework: str, path: str, kept_by: str, arrival: str
) -> None:
    # slow_threshold of a nanosecond: every request is slow, so /items/3 is kept for that.
    # Continued: the caller's flag decides (00 drops it, 01 keeps it), whatever the rate.
    flags, baggage = ARRIVALS[arrival]
    options: dict[str, Any] = {"slow_threshold": 1e-9, "sample_rate": 0.0}
    with capture_langfuse() as capture:
        before = time.time_ns()
        headers = arrival_headers(flags, baggage)
        out = await call(traced_app(framework, **options), path, headers=headers)
        after = time.time_ns()
        if flags is None:
            options["sample_rate"] = 1.0
        headers = arrival_headers(None if flags is None else "01", baggage)
        sampled = await call(traced_app(framework, **options), path, headers=headers)
        dropped, kept = [s for s in capture.spans() if s["kind"] == 2]  # SERVER: the roots
    assert (out.status, out.body, out.headers) == (sampled.status, sampled.body, sampled.headers)
    if path != "/boom":  # Starlette's own 500 is sent from outside add_middleware's reach
        assert out.header(b"x-request-id") == b"r-7"
    assert_kept_as_sampled(dropped, kept, kept_by, arrival, (before, after))


async def test_the_handler_sees_the_ids_a_kept_sampled_out_request_is_exported_with() -> None:
    with capture_langfuse() as capture:
        app = traced_app("starlette", sample_rate=0.0, slow_threshold=1e-9)
        seen = json.loads((await call(app, "/ctx", headers=IDS)).body)
        root = capture.single(name="GET /ctx")
    assert seen == {
        "request_id": "r-7", "user_id": "u-7", "session_id": "s-7",
        "trace_id": root["trace_id"], "observation_id": root["span_id"],
    }  # fmt: skip
    assert (root["user_id"], root["session_id"]) == ("u-7", "s-7")


@pytest.mark.parametrize("value", BAD_ID_VALUES)
async def test_a_sampled_out_request_replaces_a_bad_request_id(value: bytes) -> None:
    with capture_langfuse() as capture:
        app = traced_app("starlette", sample_rate=0.0)
        result = await call(app, "/status/503", headers=[(b"x-request-id", value)])
        root = capture.single(name="GET /status/{code:int}")
    echoed = result.header(b"x-request-id")
    assert echoed is not None and echoed != value
    assert result.status == 503
    assert str(uuid.UUID(echoed.decode())) == echoed.decode()
    assert root["metadata"]["requestId"] == echoed.decode()


async def test_identity_headers_of_an_untrusted_peer_are_ignored_when_sampled_out() -> None:
    with capture_langfuse() as capture:
        app = traced_app("starlette", sample_rate=0.0, trusted_networks=["10.0.0.0/8"])
        await call(app, "/boom", headers=IDS, client=("203.0.113.9", 4000))
        await call(app, "/boom", headers=IDS, client=("10.1.2.3", 4000))
        outside, inside = capture.spans(name="GET /boom")
    assert (outside["user_id"], outside["session_id"]) == (None, None)
    assert (inside["user_id"], inside["session_id"]) == ("u-7", "s-7")


@pytest.mark.parametrize("value", BAD_TRACEPARENTS_BOTH_FLAGS)
async def test_a_bad_traceparent_on_a_request_that_may_be_dropped_starts_a_new_trace(
    value: bytes,
) -> None:
    headers = [(b"traceparent", value), (b"x-request-id", b"r-9")]
    bare = await call(apps.starlette_app(), "/status/503", headers=headers)
    with capture_langfuse() as capture:
        got = await call(traced_app("starlette", sample_rate=0.0), "/status/503", headers=headers)
        root = capture.single(name="GET /status/{code:int}")
        assert health()["internal_errors"] == {}
    assert (got.status, got.body, got.exception) == (bare.status, bare.body, bare.exception)
    assert got.header(b"x-request-id") == b"r-9"
    assert root["parent_span_id"] is None
    assert root["trace_id"] not in ("0" * 32, "4bf92f3577b34da6a3ce929d0e0e4736")
    assert root["metadata"]["keptBy"] == "error"
