"""Throughput and p99 over uvicorn (1 worker) driven by wrk: bare vs langfuse_mw vs OTel ASGI.

Every tracing variant exports for real, over HTTP, to a local sink that answers 200 (so the
export thread's encoding, compression and POSTs compete with the requests, as in production).
Variants alternate round by round; medians are printed with ratios to bare. "not sampled" is
every request dropped by the sampler (sample_rate=0 / TraceIdRatioBased(0)); "no echo" also
turns off the x-request-id response header; "excluded" is a path the middleware skips.

    python benchmarks/server_throughput.py [--rounds 3] [--seconds 5] [--connections 32]
                                           [--variants bare,langfuse_mw excluded,...]
"""

from __future__ import annotations

import argparse
import http.server
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from benchmarks._common import chosen_variants

ROOT = Path(__file__).resolve().parent.parent

VARIANTS = [
    "bare",
    "langfuse_mw 100%",
    "langfuse_mw 10%",
    "langfuse_mw not sampled",
    "langfuse_mw not sampled (no echo)",
    "langfuse_mw excluded",
    "otel",
    "otel not sampled",
]


class _Sink(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve(variant: str, sink: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "BENCH_VARIANT": variant,
        "LANGFUSE_BASE_URL": sink,
        "LANGFUSE_PUBLIC_KEY": "pk-lf-bench",
        "LANGFUSE_SECRET_KEY": "sk-lf-bench",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "benchmarks.server_app:app", "--port", str(port),
         "--log-level", "error", "--no-access-log"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/items/1"
    for _ in range(200):
        try:
            httpx.get(url, timeout=1)
            return process, url
        except httpx.HTTPError:
            time.sleep(0.05)
    raise RuntimeError(f"{variant} did not start")


def wrk(url: str, seconds: int, connections: int) -> tuple[float, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    assert p99 is not None
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[p99.group(2)]
    return rps, float(p99.group(1)) * scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated, from: " + "; ".join(VARIANTS),
    )
    args = parser.parse_args()
    variants = chosen_variants(parser, args.variants, VARIANTS)

    sink = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    sink_url = f"http://127.0.0.1:{sink.server_address[1]}"
    print("# uvicorn (1 worker) + wrk, hello world, export to a local HTTP sink")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, rounds={args.rounds}, "
          f"{args.seconds}s each, {args.connections} connections\n")  # fmt: skip
    results: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for variant in variants:
            process, url = serve(variant, sink_url)
            try:
                wrk(url, 1, args.connections)  # warm-up
                results[variant].append(wrk(url, args.seconds, args.connections))
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(10)
    base_rps = statistics.median(r for r, _ in results["bare"])
    base_p99 = statistics.median(p for _, p in results["bare"])
    print(f"{'variant':<34}{'req/s':>10}{'x bare':>8}{'p99 ms':>10}{'x bare':>8}")
    for variant, runs in results.items():
        rps = statistics.median(r for r, _ in runs)
        p99 = statistics.median(p for _, p in runs)
        print(f"{variant:<34}{rps:>10.0f}{rps / base_rps:>8.2f}{p99:>10.2f}{p99 / base_p99:>8.2f}")
    sink.shutdown()


if __name__ == "__main__":
    main()
