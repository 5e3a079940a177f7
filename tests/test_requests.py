"""TracedSession / TracingAdapter (requests) against real HTTP servers on 127.0.0.1."""

from __future__ import annotations

import gc
import pickle
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from requests.exceptions import ChunkedEncodingError, ContentDecodingError

from langfuse_mw.requests import TracedSession, TracingAdapter
from langfuse_mw.testing import LangfuseCapture
from tests.test_httpx import GZIP_TEXT, ID_HEADERS, Target, assert_call_context, in_request


@pytest.fixture
def target() -> Iterator[Target]:
    server = Target()
    yield server
    server.close()


@pytest.fixture
def other() -> Iterator[Target]:
    server = Target()
    yield server
    server.close()


def calls(capture: LangfuseCapture) -> list[dict[str, Any]]:
    return [span for span in capture.spans() if span["kind"] == 3]  # SPAN_KIND_CLIENT


def test_a_call_carries_trace_context_and_ids_and_is_traced_whole(
    langfuse_capture: LangfuseCapture, target: Target
) -> None:
    with in_request(x_user_id="u-1", x_session_id="s-1", x_request_id="req-1"):
        with TracedSession() as session:
            response = session.get(f"{target.url}/items?token=abc&page=2")
        # The body was read before Session.get returned: the call has ended.
        (call,) = calls(langfuse_capture)
    assert response.text == "ok"
    root = langfuse_capture.single(name="GET /checkout")
    assert_call_context(target.received[0], root, call)
    assert call["name"] == "GET 127.0.0.1/items"
    assert call["input"] == {"method": "GET", "url": f"{target.url}/items?token=[REDACTED]&page=2"}
    assert call["output"] == {"statusCode": 200}
    assert (call["user_id"], call["session_id"]) == ("u-1", "s-1")
    assert call["metadata"] == {"host": "127.0.0.1", "requestId": "req-1"}


@pytest.mark.parametrize("method", ["HEAD", "GET 204", "GET 304"])
def test_bodiless_answers_end_the_call(
    langfuse_capture: LangfuseCapture, target: Target, method: str
) -> None:
    verb, _, code = method.partition(" ")
    path = f"/status/{code}" if code else "/ok"
    with in_request(), TracedSession() as session:
        response = session.request(verb, target.url + path)
        (call,) = calls(langfuse_capture)
    assert call["output"] == {"statusCode": response.status_code}


def test_a_streamed_body_ends_the_call_when_read_to_the_end(
    langfuse_capture: LangfuseCapture, target: Target
) -> None:
    with (
        in_request(),
        TracedSession() as session,
        session.get(f"{target.url}/stream", stream=True) as response,
    ):
        assert calls(langfuse_capture) == []  # headers are in, the body is not
        assert b"".join(response.iter_content(1)) == b"abc"
        (call,) = calls(langfuse_capture)
    # Timed whole: the three chunks were 0.1 s apart.
    assert call["end_time_unix_nano"] - call["start_time_unix_nano"] >= 0.2e9
    assert call["output"] == {"statusCode": 200}


def test_a_streamed_body_closed_early_ends_the_call(
    langfuse_capture: LangfuseCapture, target: Target
) -> None:
    with in_request(), TracedSession() as session:
        response = session.get(f"{target.url}/stream", stream=True)
        chunks = response.iter_content(1)
        assert next(chunks) == b"a"
        assert calls(langfuse_capture) == []
        response.close()
        (call,) = calls(langfuse_capture)
    assert call["output"] == {"statusCode": 200}
    assert call["level"] == "DEFAULT"


def test_a_redirect_is_judged_again_at_each_hop(
    langfuse_capture: LangfuseCapture, target: Target, other: Target
) -> None:
    # Only the first server is on the list: the hop to the other port loses the ids but gets
    # trace context of its own.
    with (
        in_request(x_user_id="u-1", x_request_id="req-1"),
        TracedSession(propagate_to=[target.url]) as session,
    ):
        response = session.get(f"{target.url}/redirect?to={other.url}/landing")
    assert response.status_code == 200 and response.history[0].status_code == 302
    first, second = target.received[0], other.received[0]
    assert "baggage" in first and first["x-request-id"] == "req-1"
    assert not any(name in second for name in ID_HEADERS)
    assert second["traceparent"] != first["traceparent"]
    hop1, hop2 = sorted(calls(langfuse_capture), key=lambda span: span["start_time_unix_nano"])
    assert first["traceparent"].split("-")[2] == hop1["span_id"]
    assert second["traceparent"].split("-")[2] == hop2["span_id"]
    assert (hop1["output"], hop2["output"]) == ({"statusCode": 302}, {"statusCode": 200})


def test_a_redirect_on_the_list_keeps_the_ids_with_a_fresh_traceparent(
    langfuse_capture: LangfuseCapture, target: Target
) -> None:
    with in_request(x_user_id="u-1", x_request_id="req-1"), TracedSession() as session:
        session.get(f"{target.url}/redirect?to=/ok")
    first, second = target.received
    assert first["x-request-id"] == second["x-request-id"] == "req-1"
    assert first["baggage"] == second["baggage"]
    assert first["traceparent"] != second["traceparent"]


def test_headers_the_caller_set_are_never_overwritten(
    langfuse_capture: LangfuseCapture, target: Target
) -> None:
    preset = {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01", "baggage": "mine=1",
              "x-request-id": "caller"}  # fmt: skip
    with in_request(x_user_id="u-1", x_request_id="req-1"), TracedSession() as session:
        session.headers.update(preset)
        session.get(f"{target.url}/redirect?to=/ok")
    for sent in target.received:  # on both hops
        assert {name: sent[name] for name in preset} == preset


def test_an_id_the_caller_sets_on_the_next_call_is_kept(
    langfuse_capture: LangfuseCapture, target: Target, other: Target
) -> None:
    # After a traced call, a call to a target off the list that sets the request id itself
    # (the same value we sent before) is not mistaken for a redirect's copy.
    with in_request(x_request_id="req-1"), TracedSession(propagate_to=[target.url]) as session:
        session.get(f"{target.url}/ok")
        session.get(f"{other.url}/ok", headers={"x-request-id": "req-1"})
    assert target.received[0]["x-request-id"] == other.received[0]["x-request-id"] == "req-1"


def test_errors_are_recorded_and_reraised_unchanged(
    langfuse_capture: LangfuseCapture, target: Target
) -> None:
    closed = Target()
    closed.close()  # a port nobody listens on
    with in_request(), TracedSession() as session:
        with pytest.raises(requests.ConnectionError):
            session.get(f"{closed.url}/refused")
        assert session.get(f"{target.url}/status/503").status_code == 503
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            session.get(f"{target.url}/broken")
    by_path = {span["name"].split("/", 1)[1]: span for span in calls(langfuse_capture)}
    refused, failed, broken = by_path["refused"], by_path["status/503"], by_path["broken"]
    assert refused["level"] == "ERROR" and refused["status_message"].startswith("ConnectionError")
    assert refused["output"] == {"statusCode": None}
    assert (failed["level"], failed["status_message"]) == ("ERROR", "HTTP 503")
    # The body broke off after the headers: the status arrived, the call still failed.
    assert broken["output"] == {"statusCode": 200}
    assert broken["level"] == "ERROR" and "IncompleteRead" in broken["status_message"]


def test_a_failed_calls_error_never_carries_the_urls_secrets(
    langfuse_capture: LangfuseCapture,
) -> None:
    # requests names the URL in its errors ("Max retries exceeded with url: /x?token=...").
    closed = Target()
    closed.close()
    url = closed.url.replace("http://", "http://alice:pa55word@")
    with in_request(), TracedSession() as session, pytest.raises(requests.ConnectionError) as info:
        session.get(f"{url}/x?token=tok-SECRET-123&page=2")
    assert "tok-SECRET-123" in str(info.value)  # the application's exception is untouched
    (call,) = calls(langfuse_capture)
    assert "token=[REDACTED]&page=2" in call["status_message"]
    (event,) = call["events"]
    assert "token=[REDACTED]&page=2" in event["attributes"]["exception.stacktrace"]
    exported = b"".join(langfuse_capture.sender.requests)
    assert b"tok-SECRET-123" not in exported and b"pa55word" not in exported


def test_calls_to_langfuse_itself_are_left_alone(langfuse_capture: LangfuseCapture) -> None:
    # The capture runtime's base_url is http://127.0.0.1:9 (nothing listens there).
    with (
        in_request(x_user_id="u-1"),
        TracedSession() as session,
        pytest.raises(requests.ConnectionError) as info,
    ):
        session.get("http://127.0.0.1:9/api/public/otel/v1/traces")
    sent = info.value.request.headers
    assert not any(name in sent for name in ("traceparent", *ID_HEADERS))
    assert calls(langfuse_capture) == []


def test_outside_a_request_nothing_is_started_unless_asked(
    langfuse_capture: LangfuseCapture, target: Target
) -> None:
    with TracedSession() as session:
        session.get(f"{target.url}/job")
    assert "traceparent" not in target.received[0]
    assert langfuse_capture.spans() == []
    with TracedSession(trace_outside_requests=True) as session:
        session.get(f"{target.url}/job")
    (call,) = calls(langfuse_capture)
    assert call["parent_span_id"] is None
    assert target.received[1]["traceparent"].split("-")[1] == call["trace_id"]


def test_a_sampled_out_request_passes_its_decision_on(
    langfuse_capture: LangfuseCapture, target: Target
) -> None:
    with in_request(sample_rate=0.0, lazy=True, x_request_id="req-9"), TracedSession() as s:
        s.get(f"{target.url}/ok")
    sent = target.received[0]
    assert sent["traceparent"].endswith("-00") and sent["x-request-id"] == "req-9"
    assert langfuse_capture.spans() == []


def test_an_adapter_mounted_on_a_plain_session_and_a_pickled_session(
    langfuse_capture: LangfuseCapture, target: Target
) -> None:
    session = requests.Session()
    session.mount(target.url, TracingAdapter(propagate_to=[target.url], max_retries=2))
    copy = pickle.loads(pickle.dumps(session))
    adapter = copy.get_adapter(target.url)
    assert isinstance(adapter, TracingAdapter) and adapter.max_retries.total == 2
    with in_request(x_user_id="u-3"):
        session.get(f"{target.url}/a")
        copy.get(f"{target.url}/b")
    for sent in target.received:
        assert "langfuse_user_id=u-3" in sent["baggage"]
    assert {span["name"] for span in calls(langfuse_capture)} == {
        "GET 127.0.0.1/a", "GET 127.0.0.1/b",
    }  # fmt: skip


def test_the_apps_request_is_left_as_it_was(
    langfuse_capture: LangfuseCapture, target: Target, other: Target
) -> None:
    # The headers go on a copy: response.request is the session's own (as without tracing),
    # so nothing of ours travels with a request the app sends again, redirects by hand, or
    # hands to an adapter that is not ours.
    with (
        in_request(x_request_id="req-1", x_user_id="u-1"),
        TracedSession(propagate_to=[target.url]) as session,
    ):
        first = session.get(f"{target.url}/redirect?to={other.url}/landing", allow_redirects=False)
        assert "traceparent" not in first.request.headers
        session.get(f"{target.url}/ok")  # another call in between
        session.send(first.next, allow_redirects=False)
    landing = other.received[0]
    assert "traceparent" in landing and not any(name in landing for name in ID_HEADERS)
    assert len({sent["traceparent"] for sent in (*target.received, landing)}) == 3


def test_a_redirect_to_a_host_served_by_a_plain_adapter_gets_nothing(
    langfuse_capture: LangfuseCapture, target: Target, other: Target
) -> None:
    session = requests.Session()
    session.mount(target.url, TracingAdapter(propagate_to=[target.url]))
    with in_request(x_request_id="req-1", x_user_id="u-1"):
        session.get(f"{target.url}/redirect?to={other.url}/landing")
    assert "x-request-id" in target.received[0]
    assert not any(name in other.received[0] for name in ("traceparent", *ID_HEADERS))


def test_a_call_made_while_the_app_handles_an_exception_is_not_an_error(
    langfuse_capture: LangfuseCapture, target: Target
) -> None:
    # The usual fallback: the first service failed, the second one answers.
    with in_request(), TracedSession() as session:
        try:
            raise requests.ConnectionError("primary down")
        except requests.ConnectionError:
            assert session.get(f"{target.url}/ok").status_code == 200
    (call,) = calls(langfuse_capture)
    assert call["level"] == "DEFAULT" and call["status_message"] is None and not call["events"]


@pytest.mark.parametrize("stream", [False, True], ids=["read", "stream"])
@pytest.mark.parametrize(
    ("path", "streamed", "error_type", "cause"),
    [
        ("/bad-gzip", b"", ContentDecodingError, "DecodeError"),
        ("/bad-gzip-trailer", GZIP_TEXT, ContentDecodingError, "DecodeError"),
        ("/broken-chunked", b"a", ChunkedEncodingError, "ProtocolError"),
    ],
    ids=["bad-gzip", "bad-gzip-trailer", "broken-chunked"],
)
def test_a_body_that_breaks_off_or_does_not_decode_fails_the_call(
    langfuse_capture: LangfuseCapture,
    target: Target,
    stream: bool,
    path: str,
    streamed: bytes,
    error_type: type[requests.RequestException],
    cause: str,
) -> None:
    # urllib3 reads a chunked body through read_chunked and gives the connection back before
    # the error reaches the caller, as read does.
    got = bytearray()
    with (
        in_request(),
        TracedSession() as session,
        pytest.raises(error_type),
        session.get(target.url + path, stream=stream) as response,
    ):
        for chunk in response.iter_content(None):
            got += chunk
    assert got == (streamed if stream else b"")
    (call,) = calls(langfuse_capture)
    assert call["output"] == {"statusCode": 200}
    assert call["level"] == "ERROR" and call["status_message"].startswith(f"{cause}: ")
    (event,) = call["events"]
    assert event["attributes"]["exception.type"] == f"urllib3.exceptions.{cause}"


def test_a_body_never_read_is_recorded_and_freed_as_without_tracing(
    langfuse_capture: LangfuseCapture, target: Target
) -> None:
    # raise_for_status in a response hook raises before Session.send reads the body; a
    # streamed response may be dropped unread. The call is recorded once the body is freed,
    # and the body is freed as soon as it would be without tracing (no cycle, no warning).
    with in_request(), TracedSession() as session:
        session.hooks["response"].append(lambda r, *args, **kwargs: r.raise_for_status())
        with pytest.raises(requests.HTTPError):
            session.get(f"{target.url}/status/503")
        response = session.get(f"{target.url}/stream", stream=True)
        body = weakref.ref(response.raw)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            del response
            assert body() is None  # freed by reference counting, not by the collector
            gc.collect()
        assert [str(w.message) for w in caught] == []
        by_name = {call["name"]: call for call in calls(langfuse_capture)}
    assert by_name["GET 127.0.0.1/status/503"]["output"] == {"statusCode": 503}
    assert by_name["GET 127.0.0.1/stream"]["output"] == {"statusCode": 200}
