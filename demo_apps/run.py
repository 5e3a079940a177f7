"""The three-service demo: receiver, gateway (FastAPI) → inventory (Flask) → pricing (Django).

python -m demo_apps.run          # run, print a trace tree, stop everything
python -m demo_apps.run --keep   # ...and keep running to click through the viewer
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from langfuse_mw.devserver import DevServer

ROOT = Path(__file__).resolve().parent.parent
KEYS = {"LANGFUSE_PUBLIC_KEY": "pk-lf-demo", "LANGFUSE_SECRET_KEY": "sk-lf-demo"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(name: str, args: list[str], port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    # The child keeps its own copy of the log's descriptor; ours can close at once.
    with open(ROOT / f".demo-{name}.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", *args], cwd=ROOT, env={**os.environ, **env},
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{name} exited; see .demo-{name}.log")
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)  # excluded: untraced
            return process
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit(f"{name} did not start; see .demo-{name}.log")


def tree(trace: dict[str, Any]) -> list[str]:
    """Indented lines, one per observation, children under parents, in start order."""
    observations = sorted(trace["observations"], key=lambda o: o["startTime"])
    children: dict[str | None, list[dict[str, Any]]] = {}
    ids = {o["id"] for o in observations}
    for obs in observations:
        parent = obs.get("parentObservationId")
        children.setdefault(parent if parent in ids else None, []).append(obs)
    lines: list[str] = []

    def walk(parent: str | None, depth: int) -> None:
        for obs in children.get(parent, []):
            level = "" if obs.get("level") in (None, "DEFAULT") else f"  [{obs['level']}]"
            lines.append(f"{'  ' * depth}- {obs['name']}{level}")
            walk(obs["id"], depth + 1)

    walk(None, 0)
    return lines


def start_services(base_url: str) -> tuple[str, list[subprocess.Popen[bytes]]]:
    """Start pricing, inventory and gateway exporting to ``base_url``; the gateway's URL.

    If one fails to start, those already started are stopped before the error propagates.
    """
    ports = {name: free_port() for name in ("gateway", "inventory", "pricing")}
    env = {
        **KEYS,
        "LANGFUSE_BASE_URL": base_url,
        "LANGFUSE_MW_FLUSH_INTERVAL": "0.2",
        "PYTHONPATH": str(ROOT),
        "INVENTORY_URL": f"http://127.0.0.1:{ports['inventory']}",
        "PRICING_URL": f"http://127.0.0.1:{ports['pricing']}",
        "DJANGO_SETTINGS_MODULE": "demo_apps.pricing.settings",
    }
    commands = {
        "pricing": ["gunicorn", "demo_apps.pricing.wsgi", "-b", f"127.0.0.1:{ports['pricing']}"],
        "inventory": ["gunicorn", "demo_apps.inventory:app", "-b",
                      f"127.0.0.1:{ports['inventory']}"],
        "gateway": ["uvicorn", "demo_apps.gateway:app", "--port", str(ports["gateway"]),
                    "--log-level", "warning"],
    }  # fmt: skip
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for name, command in commands.items():
            processes.append(start(name, command, ports[name], env))
    except BaseException:
        stop_services(processes)
        raise
    return f"http://127.0.0.1:{ports['gateway']}", processes


def stop_services(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every process, as a deployment would, and wait for them."""
    for process in reversed(processes):
        process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep everything running")
    args = parser.parse_args()

    receiver = DevServer(host="127.0.0.1", port=0, db=":memory:",
                         public_key=KEYS["LANGFUSE_PUBLIC_KEY"],
                         secret_key=KEYS["LANGFUSE_SECRET_KEY"])  # fmt: skip
    receiver.start()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        gateway, processes = start_services(receiver.url)
        print(f"receiver and viewer: {receiver.url}")
        sessions = ["sess-a", "sess-a", "sess-b", "sess-b"]
        for n, item in enumerate([3, 5, 8, 0]):  # item 0: pricing fails, so does the request
            headers = {"x-user-id": f"user-{n % 2 + 1}", "x-session-id": sessions[n]}
            response = httpx.get(f"{gateway}/checkout/{item}", headers=headers, timeout=10)
            print(f"GET /checkout/{item} -> {response.status_code}  "
                  f"x-request-id {response.headers.get('x-request-id')}")  # fmt: skip
        trace = wait_for_trace(receiver.url, min_observations=6)
        print(f"\ntrace {trace['id']}  name {trace['name']!r}  user {trace.get('userId')}  "
              f"session {trace.get('sessionId')}")  # fmt: skip
        for line in tree(trace):
            print(line)
        print(f"\nopen {receiver.url}/trace/{trace['id']} to see it in the viewer")
        if args.keep:
            print("running; Ctrl-C to stop")
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        return 0
    finally:
        stop_services(processes)
        receiver.stop()


def wait_for_trace(base: str, min_observations: int, timeout: float = 20.0) -> dict[str, Any]:
    """The first successful checkout's trace, once all three services' spans arrived."""
    auth = (KEYS["LANGFUSE_PUBLIC_KEY"], KEYS["LANGFUSE_SECRET_KEY"])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listing = httpx.get(f"{base}/api/public/traces", params={"limit": 50}, auth=auth).json()
        for summary in listing["data"]:
            if summary.get("name") != "GET /checkout/{item_id}":
                continue
            trace: dict[str, Any] = httpx.get(
                f"{base}/api/public/traces/{summary['id']}", auth=auth
            ).json()
            if len(trace["observations"]) >= min_observations:
                return trace
        time.sleep(0.3)
    raise SystemExit("the demo's traces did not arrive at the receiver in time")


if __name__ == "__main__":
    sys.exit(main())
