"""Machine instructions per request, counted by valgrind: overhead without the noise.

Wall-clock figures on a shared 2-core machine move by 10-20 % from run to run; the number of
instructions a request executes does not (run to run it moves by ~1 %). Each variant runs in
its own process under ``valgrind --tool=callgrind``, once without requests and once with
``--requests`` of them, after the same warm-up; the difference divided by the requests is the
cost of one request, interpreter, framework and middleware included. Instructions are not
time (cache misses are not counted), so this complements the timed benchmarks, it does not
replace them: use it to compare variants and to see what a change saves.

Variants (Starlette or FastAPI hello world as in ``asgi_overhead.py``, or Flask as in
``wsgi_overhead.py``; in-process): bare, langfuse_mw (100 % traced), langfuse_mw (not sampled),
langfuse_mw (caller did not sample), langfuse_mw (excluded path), floor (dropped-request
minimum: ``benchmarks/floor.py``, the least any middleware that keeps errors and echoes the
request id can do for a request it drops), otel (1 span), otel (not sampled): OpenTelemetry's
ASGI or WSGI middleware; sentry (traced), sentry (not sampled): sentry-sdk's ASGI or WSGI
middleware with ``traces_sample_rate`` 1.0 or 0.0 and no integrations; logfire (traced),
logfire (not sampled): ``logfire.instrument_asgi`` or ``instrument_wsgi`` with sampling head
1.0 or 0.0 (``benchmarks/_peers.py`` says how both are kept from touching other variants; here
every variant is a process of its own anyway).

"request path" leaves every span in its exporter's queue; "with export" also encodes, gzips
and hands them to a local sink (OTLP protobuf; no network) before the count stops.

    python benchmarks/instructions.py [--requests 2000] [--framework starlette|fastapi|flask]
                                      [--variants bare,langfuse_mw,...] [--jobs 2]

Needs valgrind (``apt-get install valgrind``).
"""

from __future__ import annotations

import argparse
import gc
import os
import posix
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import asgi_overhead, wsgi_overhead
from benchmarks._common import (
    HAVE_LOGFIRE,
    NO_LOGFIRE,
    NOT_SAMPLED_PARENT,
    EncodingExporter,
    EncodingSink,
    chosen_variants,
    deferred_processor,
    header,
)
from langfuse_mw import runtime

VARIANTS = [
    "bare",
    "langfuse_mw",
    "langfuse_mw (not sampled)",
    "langfuse_mw (caller did not sample)",
    "langfuse_mw (excluded path)",
    "floor (dropped-request minimum)",
    "otel (1 span)",
    "otel (not sampled)",
    "sentry (traced)",
    "sentry (not sampled)",
    "logfire (traced)",
    "logfire (not sampled)",
]
# Variants whose spans are exported (the others export nothing: "with export" = request path).
EXPORTING = {"langfuse_mw", "otel (1 span)", "sentry (traced)", "logfire (traced)"}
PEERS = [
    ("langfuse_mw", "otel (1 span)"),
    ("langfuse_mw", "sentry (traced)"),
    ("langfuse_mw", "logfire (traced)"),
    ("langfuse_mw (not sampled)", "otel (not sampled)"),
    ("langfuse_mw (not sampled)", "sentry (not sampled)"),
    ("langfuse_mw (not sampled)", "logfire (not sampled)"),
]
# Logfire's rows need the [bench] extra (see benchmarks/_peers.py).
AVAILABLE = [v for v in VARIANTS if HAVE_LOGFIRE or not v.startswith("logfire")]
FRAMEWORKS = ["starlette", "fastapi", "flask"]
WARM_UP = 300


def build(variant: str, framework: str) -> tuple[Callable[[int], float], Callable[[], Any]]:
    """Return (run n requests, export what is queued) for one variant, in this process."""
    flask = framework == "flask"
    if variant == "bare":
        app = wsgi_overhead.make_app() if flask else asgi_overhead.make_app(framework)
        return _driver(framework, app, caller=False), lambda: None
    if variant.startswith("floor"):
        from benchmarks.floor import FloorASGI, FloorWSGI

        if flask:
            app = wsgi_overhead.make_app()
            app.wsgi_app = FloorWSGI(app.wsgi_app)  # type: ignore[method-assign]
        else:
            app = asgi_overhead.make_app(framework)
            app.add_middleware(FloorASGI)
        return _driver(framework, app, caller=False), lambda: None
    if variant.startswith("otel"):
        rate = 0.0 if variant.endswith("(not sampled)") else 1.0
        provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(rate)))
        provider.add_span_processor(deferred_processor(EncodingExporter()))
        app = (
            wsgi_overhead.otel_app(provider)
            if flask
            else asgi_overhead.otel_app(provider, framework)
        )
        return _driver(framework, app, caller=False), provider.force_flush
    if variant.startswith("sentry"):
        from benchmarks._peers import SentryPeer

        sentry = SentryPeer(0.0 if variant.endswith("(not sampled)") else 1.0)
        app = wsgi_overhead.sentry_app() if flask else asgi_overhead.sentry_app(framework)
        return sentry.bound(_driver(framework, app, caller=False)), sentry.flush
    if variant.startswith("logfire"):
        from benchmarks._peers import LogfirePeer

        logfire = LogfirePeer(0.0 if variant.endswith("(not sampled)") else 1.0)
        app = (
            wsgi_overhead.logfire_app(logfire)
            if flask
            else asgi_overhead.logfire_app(logfire, framework)
        )
        return _driver(framework, app, caller=False), logfire.flush
    settings: dict[str, dict[str, Any]] = {
        "langfuse_mw": {},
        "langfuse_mw (not sampled)": {"sample_rate": 0.0},
        "langfuse_mw (caller did not sample)": {"sample_rate": 0.1},
        "langfuse_mw (excluded path)": {"exclude_paths": ["/items/.*"]},
    }
    options = settings[variant]
    if flask:
        app = wsgi_overhead.langfuse_mw_app(EncodingSink(), **options)
    else:
        app = asgi_overhead.langfuse_mw_app(EncodingSink(), framework, **options)
    return _driver(framework, app, caller="caller" in variant), lambda: runtime.flush(30)


def _driver(framework: str, app: Any, *, caller: bool) -> Callable[[int], float]:
    # The benchmarks' own drivers; ``caller`` sends a traceparent that did not sample.
    path = "/items/1"
    if framework == "flask":
        environ = {"HTTP_TRACEPARENT": NOT_SAMPLED_PARENT} if caller else None
        return wsgi_overhead.driver(app, path, environ)
    headers = [(b"traceparent", NOT_SAMPLED_PARENT.encode())] if caller else None
    return asgi_overhead.driver(app, path, headers)


def child(variant: str, framework: str, requests: int, export: bool) -> None:
    """Warm up, then run ``requests`` requests (the process that valgrind counts)."""
    run, flush = build(variant, framework)
    run(WARM_UP)
    flush()
    gc.collect()
    run(requests)
    if export:
        flush()
    # No exit handlers: they would export what the request-path run left queued. Nor
    # os._exit: once logfire is imported (pydantic loads it as a plugin wherever it is
    # installed) that is logfire's, which flushes its exporters first.
    sys.stdout.flush()
    posix._exit(0)


def count(variant: str, framework: str, requests: int, export: bool) -> int:
    """Instructions the process executed (callgrind's total) for one child run."""
    command = [
        "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
        sys.executable, os.path.abspath(__file__), "--child", variant,
        "--framework", framework, "--requests", str(requests),
    ]  # fmt: skip
    if export:
        command.append("--export")
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # the same dict layouts in every run
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"{variant}: valgrind failed\n{done.stderr[-2000:]}")
    return int(found.group(1))


def per_request(variant: str, framework: str, requests: int, export: bool) -> float:
    """Instructions of one request: (with requests - without) / requests."""
    without = count(variant, framework, 0, export)
    return (count(variant, framework, requests, export) - without) / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--framework", default="starlette", choices=FRAMEWORKS)
    parser.add_argument("--variants", default=",".join(AVAILABLE))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="valgrinds at once")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--export", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.framework, args.requests, args.export)
        return

    variants = chosen_variants(parser, args.variants, AVAILABLE)
    if not HAVE_LOGFIRE:
        print(NO_LOGFIRE)
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (apt-get install valgrind)")

    packages = {
        "flask": ["flask", "werkzeug", "opentelemetry-instrumentation-wsgi"],
        "fastapi": ["fastapi", "starlette", "opentelemetry-instrumentation-asgi"],
        "starlette": ["starlette", "opentelemetry-instrumentation-asgi"],
    }[args.framework]
    header(
        f"Instructions per request under valgrind ({args.framework} hello world, in-process)",
        ["langfuse-mw", "opentelemetry-sdk", *packages, "sentry-sdk", "logfire"],
    )
    print(f"{args.requests} requests per variant after {WARM_UP} to warm up\n")
    jobs = [(v, False) for v in variants] + [(v, True) for v in variants if v in EXPORTING]

    def measured(job: tuple[str, bool]) -> float:
        return per_request(job[0], args.framework, args.requests, job[1])

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # a job runs its two counts in turn
        counted = dict(zip(jobs, pool.map(measured, jobs), strict=True))
    base = counted[("bare", False)]
    print(f"{'variant':<38}{'request path':>14}{'overhead':>11}{'x bare':>8}{'with export':>13}")
    for variant in variants:
        path = counted[(variant, False)]
        total = counted.get((variant, True), path)
        print(
            f"{variant:<38}{path:>14,.0f}{path - base:>+11,.0f}{path / base:>8.2f}"
            f"{total - base:>+13,.0f}"
        )
    print()
    for ours, peer in PEERS:
        if ours in variants and peer in variants:
            mine, theirs = counted[(ours, False)] - base, counted[(peer, False)] - base
            if theirs > 0:
                print(f"overhead ratio {ours} / {peer}: {mine / theirs:.2f}")
    if "langfuse_mw (excluded path)" in variants and "langfuse_mw (not sampled)" in variants:
        excluded = counted[("langfuse_mw (excluded path)", False)] - base
        dropped = counted[("langfuse_mw (not sampled)", False)] - base
        print(f"over bare: not sampled {dropped:+,.0f} instructions, excluded {excluded:+,.0f}")
        floor = counted.get(("floor (dropped-request minimum)", False))
        if floor is not None and floor > base:
            print(
                f"the floor (what any dropped request must do) {floor - base:+,.0f}: "
                f"not sampled / floor {dropped / (floor - base):.2f}, "
                f"floor / excluded {(floor - base) / max(excluded, 1):.1f}"
            )


if __name__ == "__main__":
    main()
