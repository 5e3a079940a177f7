"""A real uvicorn process exporting real OTLP/HTTP to the local receiver on 127.0.0.1."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from langfuse_mw.devserver import DevServer
from tests.servers import Server, free_port, local_receiver, wait_for

pytestmark = pytest.mark.e2e

KEYS = {"LANGFUSE_PUBLIC_KEY": "pk-lf-e2e", "LANGFUSE_SECRET_KEY": "sk-lf-e2e"}


@pytest.fixture
def receiver() -> Iterator[DevServer]:
    yield from local_receiver("pk-lf-e2e", "sk-lf-e2e")


def uvicorn(base_url: str, workers: int = 1, **env: str) -> Server:
    port = free_port()
    server = Server(
        ["uvicorn", "tests.e2e_asgi_app:app", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning", "--workers", str(workers)],
        port,
        {**KEYS, "LANGFUSE_BASE_URL": base_url, **env},
    )  # fmt: skip
    server.wait_ready()
    return server


async def burst(url: str, n: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=20)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=10) as client:
        return await asyncio.gather(
            *(
                client.get(
                    f"/items/{i}",
                    headers={"x-user-id": f"user-{i % 7}", "x-request-id": f"req-{i}"},
                )
                for i in range(n)
            )
        )


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_right_after_a_burst_loses_no_span(receiver: DevServer, workers: int) -> None:
    # A long export interval: only the shutdown path can deliver these in time.
    server = uvicorn(receiver.url, workers, LANGFUSE_MW_FLUSH_INTERVAL="30")
    try:
        responses = asyncio.run(burst(server.url, 200))
        assert all(r.status_code == 200 for r in responses)
        code, _ = server.terminate()
        # uvicorn shuts down gracefully, then re-raises SIGTERM with its default action.
        assert code in (0, -signal.SIGTERM), server.output()
    finally:
        server.close()
    spans = wait_for(receiver, 400)
    roots = [s for s in spans if s["name"] == "GET /items/{item_id}"]
    children = [s for s in spans if s["name"] == "llm"]
    assert len(roots) == 200 and len(children) == 200
    by_id = {s["span_id"]: s for s in roots}
    for child in children:
        parent = by_id[child["parent_span_id"]]
        assert child["trace_id"] == parent["trace_id"]
        assert child["attributes"]["user.id"] == parent["attributes"]["user.id"]
    request_ids = {r["attributes"]["langfuse.observation.metadata.requestId"] for r in roots}
    assert request_ids == {f'"req-{i}"' for i in range(200)}
    assert receiver.request_count <= 5  # batched, not one POST per span


def test_sigterm_with_a_hung_langfuse_exits_within_the_deadline() -> None:
    black_hole = socket.socket()
    black_hole.bind(("127.0.0.1", 0))
    black_hole.listen(64)
    url = f"http://127.0.0.1:{black_hole.getsockname()[1]}"
    server = uvicorn(url, LANGFUSE_MW_FLUSH_INTERVAL="0.1", LANGFUSE_MW_SHUTDOWN_TIMEOUT="2")
    try:
        responses = asyncio.run(burst(server.url, 50))
        assert all(r.status_code == 200 for r in responses)
        code, seconds = server.terminate()
        output = server.output()
    finally:
        server.close()
        black_hole.close()
    assert code in (0, -signal.SIGTERM), output
    assert seconds <= 2 + 1, output
    assert "spans were not exported" in output


def test_requests_are_served_the_same_when_langfuse_refuses_connections() -> None:
    server = uvicorn(f"http://127.0.0.1:{free_port()}", LANGFUSE_MW_FLUSH_INTERVAL="0.1")
    try:
        responses = asyncio.run(burst(server.url, 100))
        assert [r.status_code for r in responses] == [200] * 100
        assert all(r.headers["x-request-id"] == f"req-{i}" for i, r in enumerate(responses))
    finally:
        server.terminate()
        server.close()


def test_an_unhandled_exception_under_uvicorn_is_starlettes_500_with_the_request_id(
    receiver: DevServer,
) -> None:
    # RELIABILITY case 17 with the one-line install (add_middleware): the 500 that
    # ServerErrorMiddleware answers carries the request id, for every request and the first.
    server = uvicorn(receiver.url, LANGFUSE_MW_FLUSH_INTERVAL="0.1")
    try:
        # A connection each: uvicorn closes the connection when the app raised.
        url = f"{server.url}/boom"
        responses = [httpx.get(url, headers={"x-request-id": f"err-{i}"}) for i in (1, 2)]
        generated = httpx.get(url)
        server.terminate()
    finally:
        server.close()
    for i, response in enumerate(responses, 1):
        assert (response.status_code, response.text) == (500, "Internal Server Error")
        assert response.headers.get_list("x-request-id") == [f"err-{i}"]
    generated_id = generated.headers["x-request-id"]
    roots = [s for s in wait_for(receiver, 3) if s["name"] == "GET /boom"]
    assert sorted(r["attributes"]["langfuse.observation.metadata.requestId"] for r in roots) == (
        sorted([f'"{generated_id}"', '"err-1"', '"err-2"'])  # an id starting with f sorts last
    )
    assert all(r["attributes"]["langfuse.observation.level"] == "ERROR" for r in roots)


def test_a_bad_option_given_to_add_middleware_is_logged_when_uvicorn_starts() -> None:
    # Starlette builds its middleware at the first event, the lifespan startup, and uvicorn's
    # default --lifespan auto reports a failure there as "lifespan unsupported": the error
    # must still be in the server's output at start-up, not only at the first request.
    port = free_port()
    server = Server(
        ["uvicorn", "tests.e2e_bad_option_app:app", "--host", "127.0.0.1", "--port", str(port)],
        port,
        KEYS,
    )
    try:
        deadline = time.monotonic() + 30
        while "Application startup complete" not in server.output():
            assert time.monotonic() < deadline and server.process.poll() is None, server.output()
            time.sleep(0.1)
        assert "langfuse_mw: LangfuseMiddleware cannot start: sample_rate" in server.output()
    finally:
        server.close()
