"""The benchmarks still build and drive every variant they compare (they are not run in CI).

Timing them here would flake on shared machines; what can rot silently is a variant that no
longer builds or no longer does what its name says, so each is run for a few requests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks import instructions, server_throughput
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
        for variant in instructions.VARIANTS
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
