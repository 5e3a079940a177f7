"""The devserver over real HTTP: Langfuse's endpoint contract, the read API, faults, the CLI."""

from __future__ import annotations

import base64
import gzip
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from langfuse_mw.devserver import INGEST_PATH, DevServer, Store
from tests.servers import ROOT, free_port

pytestmark = pytest.mark.e2e

PK, SK = "pk-lf-test", "sk-lf-test"
AUTH = "Basic " + base64.b64encode(f"{PK}:{SK}".encode()).decode()
PROTOBUF = {"Authorization": AUTH, "Content-Type": "application/x-protobuf",
            "x-langfuse-ingestion-version": "4"}  # fmt: skip
JSON_HEADERS = {**PROTOBUF, "Content-Type": "application/json"}
START = 1_700_000_000_000_000_000


@pytest.fixture
def srv() -> Iterator[DevServer]:
    with DevServer(host="127.0.0.1", port=0, db=":memory:", public_key=PK, secret_key=SK) as s:
        yield s


def kv(key: str, value: Any) -> KeyValue:
    if isinstance(value, bool):
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=str(value)))


def pb_span(trace: int, span: int, parent: int | None = None, name: str = "op",
            **attributes: Any) -> Span:  # fmt: skip
    return Span(
        trace_id=trace.to_bytes(16, "big"),
        span_id=span.to_bytes(8, "big"),
        parent_span_id=parent.to_bytes(8, "big") if parent else b"",
        name=name,
        start_time_unix_nano=START + span * 1_000_000,
        end_time_unix_nano=START + span * 1_000_000 + 500_000,
        attributes=[kv(k, v) for k, v in attributes.items()],
    )


def body(*spans: Span, scope: str = "langfuse-sdk") -> bytes:
    request = ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(
                resource={"attributes": [kv("service.name", "test-svc")]},
                scope_spans=[
                    ScopeSpans(scope={"name": scope, "version": "5.0.4"}, spans=list(spans))
                ],
            )
        ]
    )
    return request.SerializeToString()


def post(srv: DevServer, content: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(srv.url + INGEST_PATH, content=content,
                      headers=PROTOBUF if headers is None else headers, timeout=10)  # fmt: skip


def api(srv: DevServer, path: str, **params: Any) -> Any:
    response = httpx.get(srv.url + path, params=params, auth=(PK, SK), timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


# -- the endpoint contract --------------------------------------------------------------------


def test_protobuf_batch_is_accepted_stored_and_recorded(srv: DevServer) -> None:
    response = post(srv, body(pb_span(1, 1, name="root", **{"user.id": "u1"}),
                              pb_span(1, 2, parent=1, name="child")))  # fmt: skip
    assert (response.status_code, response.json()) == (200, {})
    assert response.headers["content-type"].startswith("application/json")
    assert [s["name"] for s in srv.received_spans()] == ["root", "child"]
    assert srv.request_count == 1
    trace = api(srv, f"/api/public/traces/{1:032x}")
    assert trace["name"] == "root" and trace["userId"] == "u1"
    assert {o["id"]: o["parentObservationId"] for o in trace["observations"]} == {
        f"{1:016x}": None,
        f"{2:016x}": f"{1:016x}",
    }


def test_gzip_and_case_insensitive_content_type(srv: DevServer) -> None:
    headers = {**PROTOBUF, "Content-Type": "Application/X-Protobuf; charset=binary",
               "Content-Encoding": "gzip"}  # fmt: skip
    assert post(srv, gzip.compress(body(pb_span(1, 1))), headers).status_code == 200
    assert len(srv.received_spans()) == 1
    bad = post(srv, b"not gzip", headers)
    assert (bad.status_code, bad.json()) == (400, {"error": "Failed to decompress request body"})


def test_json_body_keeps_ids_as_sent(srv: DevServer) -> None:
    payload = {
        "resourceSpans": [{
            "resource": {"attributes": [{"key": "service.name",
                                         "value": {"stringValue": "js"}}]},
            "scopeSpans": [{
                "scope": {"name": "my-lib"},
                "spans": [{
                    "traceId": "ABCDEF0123456789ABCDEF0123456789",
                    "spanId": "00F067AA0BA902B7",
                    "name": "json-span",
                    "startTimeUnixNano": str(START),
                    "endTimeUnixNano": str(START + 1000),
                    "attributes": [{"key": "session.id", "value": {"stringValue": "s-9"}},
                                   {"key": "n", "value": {"intValue": "7"}}],
                    "status": {"code": 2, "message": "bad"},
                }],
            }],
        }]
    }  # fmt: skip
    response = post(srv, json.dumps(payload).encode(), JSON_HEADERS)
    assert (response.status_code, response.json()) == (200, {})
    trace = api(srv, "/api/public/traces/ABCDEF0123456789ABCDEF0123456789")
    (observation,) = trace["observations"]
    assert observation["id"] == "00F067AA0BA902B7"  # not lower-cased, not base64
    assert observation["level"] == "ERROR" and observation["statusMessage"] == "bad"
    assert observation["metadata"]["attributes"] == {"session.id": "s-9", "n": "7"}
    assert trace["sessionId"] == "s-9"


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "No authorization header"),
        ({"Authorization": "Bearer pk-lf-test"}, "Invalid authorization header"),
        ({"Authorization": "Basic !!!"}, "Invalid authorization header"),
        ({"Authorization": "Basic " + base64.b64encode(b"pk-lf-test:nope").decode()},
         "Invalid credentials. Confirm that you've configured the correct host."),
    ],
)  # fmt: skip
def test_wrong_credentials_401(srv: DevServer, headers: dict[str, str], message: str) -> None:
    base = {k: v for k, v in PROTOBUF.items() if k != "Authorization"}
    response = post(srv, body(pb_span(1, 1)), {**base, **headers})
    assert (response.status_code, response.json()) == (401, {"message": message})
    assert srv.received_spans() == []
    read = httpx.get(srv.url + "/api/public/traces", headers=headers)
    assert read.status_code == 401


@pytest.mark.parametrize(
    ("content", "content_type", "error"),
    [
        (b"\xff\xff\xff", "application/x-protobuf", "Failed to parse OTel Protobuf Trace"),
        (b"{nope", "application/json", "Failed to parse OTel JSON Trace"),
        (b"null", "application/json", "Failed to parse OTel JSON Trace"),
        (b"{}", "text/plain", "Invalid content type"),
    ],
)
def test_malformed_bodies_400(
    srv: DevServer, content: bytes, content_type: str, error: str
) -> None:
    response = post(srv, content, {**PROTOBUF, "Content-Type": content_type})
    assert (response.status_code, response.json()) == (400, {"error": error})


@pytest.mark.parametrize("content", [b"", b'{"resourceSpans": []}', b"{}"])
def test_empty_batches_200(srv: DevServer, content: bytes) -> None:
    content_type = "application/x-protobuf" if not content else "application/json"
    response = post(srv, content, {**PROTOBUF, "Content-Type": content_type})
    assert (response.status_code, response.json()) == (200, {})


def test_one_bad_span_id_rejects_the_whole_batch(srv: DevServer) -> None:
    good = {"traceId": "a" * 32, "spanId": "b" * 16, "name": "good"}
    payload = {"resourceSpans": [{"scopeSpans": [{
        "scope": {"name": "hand-rolled"},
        "spans": [good, {"spanId": "c" * 16, "name": "no trace id"}],
    }]}]}  # fmt: skip
    response = post(srv, json.dumps(payload).encode(), JSON_HEADERS)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error.startswith("Invalid OTLP trace export: 1 of 2 span(s) cannot be processed "
                            "(traceId:absent).")  # fmt: skip
    assert "The entire export was rejected" in error and "hand-rolled" in error
    assert srv.received_spans() == [] and srv.store.trace_ids() == []


def test_protobuf_span_without_span_id_rejects_the_batch(srv: DevServer) -> None:
    broken = pb_span(1, 2)
    broken.span_id = b""
    response = post(srv, body(pb_span(1, 1), broken))
    assert response.status_code == 400
    assert "(spanId:absent)" in response.json()["error"]
    assert srv.store.trace_ids() == []


def test_attributes_as_an_object_are_rejected(srv: DevServer) -> None:
    span = {"traceId": "a" * 32, "spanId": "b" * 16, "attributes": {"k": "v"}}
    payload = {"resourceSpans": [{"scopeSpans": [{"spans": [span]}]}]}
    response = post(srv, json.dumps(payload).encode(), JSON_HEADERS)
    assert response.status_code == 400
    assert "attributes:not_an_array" in response.json()["error"]


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_other_methods_405(srv: DevServer, method: str) -> None:
    response = httpx.request(method, srv.url + INGEST_PATH, headers={"Authorization": AUTH})
    assert response.status_code == 405
    assert response.json() == {"message": "Method not allowed", "error": "MethodNotAllowedError"}


@pytest.mark.parametrize("version", ["5", "abc"])
def test_unsupported_ingestion_version_400(srv: DevServer, version: str) -> None:
    response = post(srv, body(pb_span(1, 1)),
                    {**PROTOBUF, "x-langfuse-ingestion-version": version})  # fmt: skip
    assert response.status_code == 400
    assert response.json() == {
        "error": f'Unsupported x-langfuse-ingestion-version: "{version}". Maximum supported: "4".'
    }
    assert srv.received_spans() == []


def test_duplicate_span_ids_are_upserted(srv: DevServer) -> None:
    post(srv, body(pb_span(1, 1, name="first")))
    post(srv, body(pb_span(1, 1, name="second")))
    trace = api(srv, f"/api/public/traces/{1:032x}")
    assert [o["name"] for o in trace["observations"]] == ["second"]
    assert len(srv.received_spans()) == 2  # the raw record keeps both


def test_concurrent_writers_lose_nothing(srv: DevServer) -> None:
    errors: list[BaseException] = []

    def writer(worker: int) -> None:
        try:
            with httpx.Client(timeout=30) as client:
                for batch in range(25):
                    trace = worker * 1000 + batch + 1
                    content = body(pb_span(trace, 1, name=f"w{worker}"),
                                   pb_span(trace, 2, parent=1))  # fmt: skip
                    response = client.post(srv.url + INGEST_PATH, content=content,
                                           headers=PROTOBUF)  # fmt: skip
                    assert response.status_code == 200
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert srv.request_count == 200
    assert len(srv.received_spans()) == 400
    assert len(srv.store.trace_ids()) == 200
    assert srv.store.observation_count() == 400


# -- the real langfuse SDK --------------------------------------------------------------------


def test_real_langfuse_sdk_export_reads_back_as_langfuse_would_show_it() -> None:
    from langfuse import Langfuse, propagate_attributes
    from langfuse._client.resource_manager import LangfuseResourceManager
    from opentelemetry.sdk.trace import TracerProvider

    pk, sk = "pk-lf-sdk-devserver", "sk-lf-sdk-devserver"
    with DevServer(public_key=pk, secret_key=sk) as srv:
        client = Langfuse(public_key=pk, secret_key=sk, base_url=srv.url,
                          tracer_provider=TracerProvider())  # fmt: skip
        try:
            propagated = propagate_attributes(
                user_id="user-7",
                session_id="sess-3",
                trace_name="GET /items/{id}",
                metadata={"tenant": "acme"},
            )
            with client.start_as_current_observation(name="handle", input={"q": 1}) as root:
                with (
                    propagated,
                    client.start_as_current_observation(
                        name="llm", as_type="generation", model="gpt-x"
                    ) as generation,
                ):
                    generation.update(output="hello", level="WARNING")
                root.update(output={"statusCode": 200})
            client.flush()
        finally:
            client.shutdown()
            LangfuseResourceManager._instances.pop(pk, None)

        listing = httpx.get(srv.url + "/api/public/traces", params={"userId": "user-7"},
                            auth=(pk, sk)).json()  # fmt: skip
        (summary,) = listing["data"]
        assert summary["name"] == "GET /items/{id}"
        assert (summary["userId"], summary["sessionId"]) == ("user-7", "sess-3")
        assert summary["input"] == {"q": 1} and summary["output"] == {"statusCode": 200}
        assert summary["metadata"]["tenant"] == "acme"
        assert summary["level"] == "WARNING"
        trace = httpx.get(srv.url + f"/api/public/traces/{summary['id']}", auth=(pk, sk)).json()
        by_name = {o["name"]: o for o in trace["observations"]}
        assert by_name["llm"]["parentObservationId"] == by_name["handle"]["id"]
        assert by_name["llm"]["type"] == "GENERATION" and by_name["llm"]["model"] == "gpt-x"
        assert by_name["llm"]["output"] == "hello" and by_name["llm"]["level"] == "WARNING"
        assert by_name["handle"]["type"] == "SPAN"
        assert "attributes" not in by_name["handle"]["metadata"]  # a langfuse-sdk span


def test_otlp_exporter_with_the_sdk_headers() -> None:
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    with DevServer(public_key=PK, secret_key=SK) as srv:
        exporter = OTLPSpanExporter(
            endpoint=srv.url + INGEST_PATH,
            headers={"Authorization": AUTH, "x-langfuse-ingestion-version": "4",
                     "x-langfuse-sdk-name": "python", "x-langfuse-sdk-version": "5.0.4"},
            compression=Compression.Gzip,
        )  # fmt: skip
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        with provider.get_tracer("opentelemetry.instrumentation.asgi").start_as_current_span(
            "GET /health", attributes={"http.route": "/health", "user.id": "u"}
        ):
            pass
        provider.shutdown()
        (observation,) = srv.store.get_trace(srv.store.trace_ids()[0])["observations"]  # type: ignore[index]
        assert observation["name"] == "GET /health"  # HTTP conventions are not read
        assert observation["metadata"]["attributes"]["http.route"] == "/health"
        assert observation["userId"] == "u"


# -- the read API -----------------------------------------------------------------------------


def test_read_api_filters_and_pagination(srv: DevServer) -> None:
    for n in range(1, 8):
        attributes = {"user.id": f"u{n % 2}", "session.id": f"s{n % 3}",
                      "langfuse.trace.name": "even" if n % 2 == 0 else "odd"}  # fmt: skip
        assert post(srv, body(pb_span(n, n, **attributes))).status_code == 200
    everything = api(srv, "/api/public/traces")
    assert everything["meta"] == {"page": 1, "limit": 50, "totalItems": 7, "totalPages": 1}
    assert [t["id"] for t in everything["data"]] == [f"{n:032x}" for n in range(7, 0, -1)]
    assert {t["id"] for t in api(srv, "/api/public/traces", userId="u0")["data"]} == {
        f"{n:032x}" for n in (2, 4, 6)
    }
    assert api(srv, "/api/public/traces", sessionId="s1", userId="u1")["meta"]["totalItems"] == 2
    assert api(srv, "/api/public/traces", name="even")["meta"]["totalItems"] == 3
    page = api(srv, "/api/public/traces", limit=3, page=3)
    assert page["meta"] == {"page": 3, "limit": 3, "totalItems": 7, "totalPages": 3}
    assert [t["id"] for t in page["data"]] == [f"{1:032x}"]
    first = everything["data"][0]
    for field in ("id", "name", "timestamp", "userId", "sessionId", "tags", "environment",
                  "input", "output", "metadata", "latency", "level"):  # fmt: skip
        assert field in first
    bad = httpx.get(srv.url + "/api/public/traces", params={"limit": 0}, auth=(PK, SK))
    assert bad.status_code == 400
    missing = httpx.get(srv.url + "/api/public/traces/nope", auth=(PK, SK))
    assert missing.status_code == 404
    assert httpx.get(srv.url + "/api/public/health").status_code == 200


# -- storage ----------------------------------------------------------------------------------


def test_retention_by_count_and_age() -> None:
    now = [1000.0]
    store = Store(":memory:", max_traces=3, max_age_seconds=60, clock=lambda: now[0])
    from langfuse_mw.devserver.mapping import observation_from_span

    def add(n: int) -> None:
        span = {"name": f"t{n}", "trace_id": f"{n:032x}", "span_id": f"{n:016x}",
                "parent_span_id": None, "start_time_unix_nano": START + n,
                "end_time_unix_nano": START + n, "attributes": {},
                "status": {"code": 0, "message": ""}, "resource": {}, "scope": {}}  # fmt: skip
        store.add_observations([observation_from_span(span)])

    for n in range(1, 6):
        add(n)
    assert store.trace_ids() == [f"{n:032x}" for n in (5, 4, 3)]
    now[0] += 61
    add(6)
    assert store.trace_ids() == [f"{6:032x}"]
    assert store.observation_count() == 1
    store.close()


def test_file_database_survives_a_restart(tmp_path: Any) -> None:
    db = str(tmp_path / "dev.db")
    with DevServer(db=db, public_key=PK, secret_key=SK) as srv:
        post(srv, body(pb_span(1, 1)))
    with DevServer(db=db, public_key=PK, secret_key=SK) as srv:
        assert api(srv, "/api/public/traces")["meta"]["totalItems"] == 1
        post(srv, body(pb_span(1, 2, parent=1)))
        assert len(api(srv, f"/api/public/traces/{1:032x}")["observations"]) == 2


# -- fault injection --------------------------------------------------------------------------


def test_fault_status_with_retry_after_then_clear(srv: DevServer) -> None:
    srv.set_fault(status=503, retry_after="30")
    response = post(srv, body(pb_span(1, 1)))
    assert response.status_code == 503 and response.headers["retry-after"] == "30"
    assert srv.received_spans() == [] and srv.request_count == 1
    srv.clear_fault()
    assert post(srv, body(pb_span(1, 1))).status_code == 200
    assert srv.request_count == 2 and len(srv.received_spans()) == 1


def test_fault_delay(srv: DevServer) -> None:
    srv.set_fault(delay=0.5)
    started = time.monotonic()
    assert post(srv, body(pb_span(1, 1))).status_code == 200
    assert time.monotonic() - started >= 0.5


def test_fault_hang_then_stop_returns_promptly() -> None:
    srv = DevServer(public_key=PK, secret_key=SK).start()
    srv.set_fault(hang=True)
    outcome: list[Any] = []

    def client() -> None:
        try:
            outcome.append(post(srv, body(pb_span(1, 1))).status_code)
        except httpx.HTTPError as exc:
            outcome.append(type(exc).__name__)

    thread = threading.Thread(target=client)
    thread.start()
    deadline = time.monotonic() + 5
    while srv.request_count == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert outcome == []  # still hanging
    started = time.monotonic()
    srv.close()
    assert time.monotonic() - started < 1.5
    thread.join(5)
    assert outcome and outcome[0] != 200  # dropped, never answered
    assert srv.received_spans() == []


def test_stopped_server_refuses_and_a_new_one_rebinds_the_port() -> None:
    first = DevServer(public_key=PK, secret_key=SK).start()
    port = first.port
    with httpx.Client(timeout=5) as client:  # a pooled keep-alive connection
        assert client.post(first.url + INGEST_PATH, content=body(pb_span(1, 1)),
                           headers=PROTOBUF).status_code == 200  # fmt: skip
        first.stop()
        with pytest.raises(httpx.TransportError):
            client.post(first.url + INGEST_PATH, content=body(pb_span(1, 2)), headers=PROTOBUF)
        with DevServer(port=port, public_key=PK, secret_key=SK) as second:
            assert second.port == port
            response = client.post(second.url + INGEST_PATH, content=body(pb_span(1, 3)),
                                   headers=PROTOBUF)  # fmt: skip
            assert response.status_code == 200
            assert [s["span_id"] for s in second.received_spans()] == [f"{3:016x}"]
    assert [s["span_id"] for s in first.received_spans()] == [f"{1:016x}"]
    first.close()


# -- the command line -------------------------------------------------------------------------


def test_cli_devserver_prints_the_env_and_exits_0_on_sigterm(tmp_path: Any) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "langfuse_mw.devserver", "--port", str(port),
         "--db", str(tmp_path / "cli.db"), "--public-key", PK, "--secret-key", SK],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in range(6)]
        text = "".join(lines)
        assert f"LANGFUSE_BASE_URL=http://127.0.0.1:{port}" in text
        assert f"LANGFUSE_PUBLIC_KEY={PK}" in text and f"LANGFUSE_SECRET_KEY={SK}" in text
        response = httpx.post(f"http://127.0.0.1:{port}{INGEST_PATH}",
                              content=body(pb_span(1, 1)), headers=PROTOBUF)  # fmt: skip
        assert response.status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
        if process.stdout is not None:
            process.stdout.close()


def test_cli_help_lists_devserver(capsys: pytest.CaptureFixture[str]) -> None:
    from langfuse_mw.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "devserver" in capsys.readouterr().out
