"""The benchmarks still build and drive every variant they compare (they are not run in CI).

Timing them here would flake on shared machines; what can rot silently is a variant that no
longer builds or no longer does what its name says, so each is run for a few requests.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any
from uuid import UUID

import pytest
from opentelemetry import trace as otel_trace

from benchmarks import instructions, server_throughput
from benchmarks._common import HAVE_LOGFIRE, NO_LOGFIRE
from tests.servers import ROOT


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, env=full_env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.mark.parametrize("framework", instructions.FRAMEWORKS)
def test_every_instruction_count_variant_runs_requests_and_exits_cleanly(framework: str) -> None:
    # The child is what valgrind counts: it must run the requests and exit 0 without export
    # at exit (os._exit), for every variant; run here without valgrind.
    script = str(ROOT / "benchmarks" / "instructions.py")
    common = ["--framework", framework, "--requests", "3"]
    children = {
        (variant, export): _run([script, "--child", variant, *common, *(["--export"] * export)])
        for variant in instructions.AVAILABLE
        for export in (False, True)
        if export is False or variant in instructions.EXPORTING
    }
    failed = {}
    for key, proc in children.items():
        _, err = proc.communicate(timeout=120)
        if proc.returncode != 0:
            failed[key] = err[-1500:]
    assert failed == {}


def test_instruction_counts_refuse_unknown_variants() -> None:
    proc = _run([str(ROOT / "benchmarks" / "instructions.py"), "--variants", "bare,fast"])
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "unknown variants ['fast']" in err


# The peers measured next to the OpenTelemetry ones in the timed scripts, by script.
# Logfire only where the [bench] extra is installed (make bench); elsewhere the scripts say
# its rows are left out.
TIMED_PEERS = {
    "asgi_overhead.py": ["sentry asgi", *(["logfire asgi"] if HAVE_LOGFIRE else [])],
    "wsgi_overhead.py": ["sentry wsgi", *(["logfire wsgi"] if HAVE_LOGFIRE else [])],
}


@pytest.mark.parametrize("script", sorted(TIMED_PEERS))
def test_the_timed_scripts_measure_sentry_and_logfire_and_their_sampling_holds(
    script: str,
) -> None:
    # A few requests per variant (after the fixed warm-up): every peer gets its rows and
    # ratios, and the traced ones export one transaction or span per request (as many as
    # OpenTelemetry's middleware), the not-sampled ones none.
    sizes = ["--rounds", "1", "--requests", "20"]
    proc = _run([str(ROOT / "benchmarks" / script), *sizes])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    request_path, _, total_cpu = out.partition("total CPU per request")
    for peer in TIMED_PEERS[script]:
        for rows, variants in [
            (request_path, [f"{peer} (traced)", f"{peer} (not sampled)"]),
            (total_cpu, [f"{peer} (traced)"]),
        ]:
            names = {line[:34].rstrip() for line in rows.splitlines()}
            assert set(variants) <= names
        assert f"overhead ratio langfuse_mw / {peer} (traced): " in request_path
        assert f"overhead ratio langfuse_mw / {peer} (traced): " in total_cpu
        assert f"overhead ratio langfuse_mw (not sampled) / {peer} (not sampled): " in out
    otel = re.search(r"(?:spans exported by otel|otel exported) (\d+)", out)
    sent = re.search(r"sentry transactions sent: traced (\d+), not sampled (\d+)", out)
    assert otel is not None and sent is not None, out[-1000:]
    traced = int(otel.group(1))
    assert traced >= 300
    assert [int(n) for n in sent.groups()] == [traced, 0]
    logfire = re.search(r"logfire spans exported: traced (\d+), not sampled (\d+)", out)
    if HAVE_LOGFIRE:
        assert logfire is not None and [int(n) for n in logfire.groups()] == [traced, 0]
    else:
        assert logfire is None and NO_LOGFIRE in out


_ISOLATION = """
import json
import sentry_sdk
from opentelemetry import propagate, trace
from benchmarks import asgi_overhead, wsgi_overhead
from benchmarks._common import HAVE_LOGFIRE
from benchmarks._peers import LogfirePeer, SentryPeer

textmap = propagate.get_global_textmap()
sentry, dropping = SentryPeer(1.0), SentryPeer(0.0)
apps = [asgi_overhead.sentry_app("fastapi"), wsgi_overhead.sentry_app()]
if HAVE_LOGFIRE:
    logfire = LogfirePeer(1.0), LogfirePeer(0.0)
    asgi_overhead.driver(asgi_overhead.logfire_app(logfire[0], "fastapi"), "/items/1")(2)
    wsgi_overhead.driver(wsgi_overhead.logfire_app(logfire[1]), "/items/1")(2)
active = [sentry.bound(lambda n: float(sentry_sdk.get_client() is sentry.client))(0),
          dropping.bound(lambda n: float(sentry_sdk.get_client() is dropping.client))(0)]
print(json.dumps({
    "client while bound": active,
    "client after": sentry_sdk.get_client().is_active(),
    "global tracer provider": type(trace.get_tracer_provider()).__module__,
    "same propagator": propagate.get_global_textmap() is textmap,
}))
"""


def test_the_peers_leave_the_process_to_the_other_variants() -> None:
    # Sentry's client is global only while its variant runs; Logfire sets no global tracer
    # provider (FastAPI's own telemetry would start with one) and keeps the propagator.
    proc = _run(["-c", _ISOLATION])
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert json.loads(out.strip().splitlines()[-1]) == {
        "client while bound": [1.0, 1.0],
        "client after": False,
        "global tracer provider": "opentelemetry.trace",  # OpenTelemetry's default proxy
        "same propagator": True,
    }


# What each server variant must install: middleware class and options (an OpenTelemetry
# provider is described by its sampler).
SERVER_VARIANTS = {
    "bare": [],
    "langfuse_mw 100%": [["LangfuseMiddleware", {"sample_rate": 1.0}]],
    "langfuse_mw 10%": [["LangfuseMiddleware", {"sample_rate": 0.1}]],
    "langfuse_mw not sampled": [["LangfuseMiddleware", {"sample_rate": 0.0}]],
    "langfuse_mw not sampled (no echo)": [
        ["LangfuseMiddleware", {"sample_rate": 0.0, "echo_request_id": False}]
    ],
    "langfuse_mw excluded": [
        ["LangfuseMiddleware", {"sample_rate": 1.0, "exclude_paths": ["/items/.*"]}]
    ],
    "otel": [["OpenTelemetryMiddleware", "ParentBased{root:TraceIdRatioBased{1.0}"]],
    "otel not sampled": [["OpenTelemetryMiddleware", "ParentBased{root:TraceIdRatioBased{0.0}"]],
}
_DESCRIBE = """
import json, benchmarks.server_app as s
def describe(m):
    provider = m.kwargs.get("tracer_provider")
    if provider is not None:
        return [m.cls.__name__, provider.sampler.get_description().split(",")[0]]
    return [m.cls.__name__, m.kwargs]
print(json.dumps([describe(m) for m in s.build().user_middleware]))
"""


def test_the_server_variants_are_the_ones_checked_here() -> None:
    assert sorted(server_throughput.VARIANTS) == sorted(SERVER_VARIANTS)


@pytest.mark.parametrize("variant", server_throughput.VARIANTS)
def test_every_server_variant_installs_the_middleware_it_names(variant: str) -> None:
    env = {
        "BENCH_VARIANT": variant,
        "LANGFUSE_BASE_URL": "http://127.0.0.1:9",
        "LANGFUSE_PUBLIC_KEY": "pk-lf-test",
        "LANGFUSE_SECRET_KEY": "sk-lf-test",
    }
    proc = _run(["-c", _DESCRIBE], env)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == SERVER_VARIANTS[variant]


@pytest.mark.anyio
async def test_the_floor_does_what_a_dropped_request_must_and_nothing_it_need_not() -> None:
    # The ruler the dropped request is measured against: it must echo the id (fresh when
    # none came), make a non-sampled span current for the handler, and notice a failure.
    from flask import Flask, abort

    from benchmarks.floor import FloorASGI, FloorWSGI
    from tests.asgi_driver import call

    seen: list[otel_trace.SpanContext] = []

    async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(otel_trace.get_current_span().get_span_context())
        status = 500 if scope["path"] == "/fail" else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    floor = FloorASGI(asgi_app)
    fresh = await call(floor, "/")
    sent = await call(floor, "/fail", headers=[(b"x-request-id", b"req-1")])
    assert (fresh.status, sent.status) == (200, 500)
    assert UUID(fresh.header(b"x-request-id").decode()).version == 4  # type: ignore[union-attr]
    assert sent.header(b"x-request-id") == b"req-1"
    assert floor.kept == 1
    assert len(seen) == 2 and all(c.is_valid and not c.trace_flags.sampled for c in seen)
    assert seen[0].trace_id != seen[1].trace_id

    flask = Flask("floor")
    flask.add_url_rule(
        "/", "ok", lambda: (seen.append(otel_trace.get_current_span().get_span_context()), "ok")[1]
    )
    flask.add_url_rule("/fail", "fail", lambda: abort(500))
    wsgi = FloorWSGI(flask.wsgi_app)
    flask.wsgi_app = wsgi  # type: ignore[method-assign]
    client = flask.test_client()
    response = client.get("/", headers={"x-request-id": "req-2"})
    assert response.headers["x-request-id"] == "req-2"
    assert client.get("/fail").status_code == 500
    assert wsgi.kept == 1
    assert seen[-1].is_valid and not seen[-1].trace_flags.sampled
