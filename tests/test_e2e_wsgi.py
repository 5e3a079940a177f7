"""Real servers on 127.0.0.1 (gunicorn for Flask and Django, uvicorn for Django ASGI) exporting
real OTLP/HTTP to the local receiver; what it received is what Langfuse would have."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from langfuse_mw.devserver import DevServer
from tests.servers import Server, free_port, local_receiver, wait_for

pytestmark = pytest.mark.e2e

PUBLIC_KEY, SECRET_KEY = "pk-lf-dev", "sk-lf-dev"
META = "langfuse.observation.metadata."


@dataclass(frozen=True)
class Target:
    name: str
    args: tuple[str, ...]  # after `python -m`, with {port} to fill in
    item_route: str

    def __str__(self) -> str:
        return self.name


def _gunicorn(app: str, *extra: str) -> tuple[str, ...]:
    return ("gunicorn", "--workers", "2", "--bind", "127.0.0.1:{port}", "--graceful-timeout",
            "10", *extra, app)  # fmt: skip


FLASK = "/items/<int:item_id>"
DJANGO = "items/<int:item_id>"
TARGETS = [
    Target("flask-gunicorn-sync", _gunicorn("tests.wsgi_apps.e2e_flask:app"), FLASK),
    Target("django-gunicorn-sync", _gunicorn("tests.django_project.wsgi:application"), DJANGO),
    Target(
        "django-gunicorn-gthread-preload",
        _gunicorn(
            "tests.django_project.wsgi:application",
            "--worker-class",
            "gthread",
            "--threads",
            "4",
            "--preload",
        ),
        DJANGO,
    ),
    Target(
        "django-uvicorn-async-views",
        (
            "uvicorn",
            "tests.django_project.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            "{port}",
            "--log-level",
            "warning",
            "--lifespan",
            "off",
        ),
        DJANGO,
    ),
]
ASYNC_URLS = {"django-uvicorn-async-views": "tests.django_project.urls_async"}


@pytest.fixture
def receiver() -> Iterator[DevServer]:
    yield from local_receiver(PUBLIC_KEY, SECRET_KEY)


@pytest.fixture
def start(receiver: DevServer) -> Iterator[object]:
    servers: list[Server] = []

    def starter(target: Target, **env: str) -> Server:
        port = free_port()
        args = [arg.format(port=port) for arg in target.args]
        environment = {
            "LANGFUSE_BASE_URL": receiver.url,
            "LANGFUSE_PUBLIC_KEY": PUBLIC_KEY,
            "LANGFUSE_SECRET_KEY": SECRET_KEY,
            "LANGFUSE_MW_FLUSH_INTERVAL": "0.2",
            **({"DJANGO_URLCONF": ASYNC_URLS[target.name]} if target.name in ASYNC_URLS else {}),
            **env,
        }
        server = Server(args, port, environment)
        servers.append(server)
        server.wait_ready()
        return server

    yield starter
    for server in servers:  # always: killed if still running, log removed
        server.close()


async def burst(url: str, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=20) as client:
        return await asyncio.gather(
            *(
                client.get(f"/items/{i}", headers={"x-user-id": f"user-{i % 7}",
                                                   "x-request-id": f"req-{i}"})
                for i in range(n)
            )
        )  # fmt: skip


@pytest.mark.parametrize("target", TARGETS, ids=str)
def test_each_request_arrives_named_with_user_nesting_and_errors(
    receiver: DevServer, start: object, target: Target
) -> None:
    server = start(target)  # type: ignore[operator]
    responses = asyncio.run(burst(server.url, 20))
    assert [r.headers["x-request-id"] for r in responses] == [f"req-{i}" for i in range(20)]
    with httpx.Client(base_url=server.url, timeout=20) as client:
        assert client.get("/boom").status_code == 500
        stream = client.get("/stream", params={"delay": "0.1"})
        assert stream.text == "data: 0\n\ndata: 1\n\ndata: 2\n\n"
        assert client.get("/no/such/route").status_code == 404
    # 20 items and 20 generations, boom, stream, 404.
    spans = wait_for(receiver, 43)
    by_name: dict[str, list[dict[str, object]]] = {}
    for span in spans:
        by_name.setdefault(str(span["name"]), []).append(span)
    prefix = "/" if target.item_route.startswith("/") else ""
    roots = by_name[f"GET {target.item_route}"]
    assert len(roots) == 20 and len(by_name["llm"]) == 20
    ids = {s["span_id"]: s for s in roots}
    for child in by_name["llm"]:
        parent = ids[child["parent_span_id"]]
        assert child["trace_id"] == parent["trace_id"]
        assert child["attributes"]["user.id"] == parent["attributes"]["user.id"]  # type: ignore[index]
    request_ids = {r["attributes"][META + "requestId"] for r in roots}  # type: ignore[index]
    assert request_ids == {f'"req-{i}"' for i in range(20)}
    (boom,) = by_name[f"GET {prefix}boom"]
    assert boom["attributes"]["langfuse.observation.status_message"] == "RuntimeError: kaboom"  # type: ignore[index]
    assert boom["attributes"]["langfuse.observation.level"] == "ERROR"  # type: ignore[index]
    (streamed,) = by_name[f"GET {prefix}stream"]
    assert int(streamed["end_time_unix_nano"]) - int(streamed["start_time_unix_nano"]) >= 3e8  # type: ignore[call-overload]
    assert len(by_name["GET <unmatched>"]) == 1


@pytest.mark.parametrize("target", TARGETS, ids=str)
def test_sigterm_right_after_the_requests_loses_no_span(
    receiver: DevServer, start: object, target: Target
) -> None:
    # A 30 s export interval: only the exit path can deliver these in time.
    server = start(target, LANGFUSE_MW_FLUSH_INTERVAL="30")  # type: ignore[operator]
    responses = asyncio.run(burst(server.url, 100))
    assert all(r.status_code == 200 for r in responses)
    code, seconds = server.terminate()
    output = server.output()
    # uvicorn re-raises the SIGTERM it handled once it has shut down: -15 is its clean exit.
    assert code in ((0, -15) if "uvicorn" in target.name else (0,)), output
    assert seconds < 8, output
    spans = receiver.received_spans()
    roots = [s for s in spans if s["name"] == f"GET {target.item_route}"]
    children = [s for s in spans if s["name"] == "llm"]
    assert (len(roots), len(children)) == (100, 100), output
