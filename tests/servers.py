"""Start and stop real server processes on 127.0.0.1 for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from langfuse_mw.devserver import DevServer

ROOT = Path(__file__).resolve().parent.parent


def local_receiver(public_key: str, secret_key: str) -> Iterator[DevServer]:
    """A receiver on 127.0.0.1 with an in-memory store, for a fixture to ``yield from``."""
    server = DevServer(
        host="127.0.0.1", port=0, db=":memory:", public_key=public_key, secret_key=secret_key
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A server process (uvicorn, gunicorn, ...) started with ``python -m``."""

    def __init__(self, args: Sequence[str], port: int, env: dict[str, str]) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = ROOT / f".e2e-{port}.log"
        self._log_file = self.log.open("wb")
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
        self.process = subprocess.Popen(
            [sys.executable, "-m", *args],
            cwd=ROOT,
            env=full_env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, path: str = "/hello", timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.output()}")
            try:
                httpx.get(self.url + path, timeout=1.0)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.output()}")

    def terminate(self, timeout: float = 15.0) -> tuple[int, float]:
        """SIGTERM; return (exit code, seconds until it exited)."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        return code, time.monotonic() - started

    def output(self) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")[-4000:]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self._log_file.close()
        self.log.unlink(missing_ok=True)


def wait_for(receiver: Any, count: int, timeout: float = 15.0) -> list[dict[str, object]]:
    """The receiver's spans once ``count`` arrived (readiness probes aside), or at the deadline.

    A server's last export can still be in the receiver's hands when the server has exited
    (its shutdown deadline passed while waiting for the reply, on a loaded machine).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        spans: list[dict[str, object]] = receiver.received_spans()
        # Readiness probes (/hello) vary in number: they do not count.
        if sum(not str(s["name"]).endswith("hello") for s in spans) >= count:
            return spans
        time.sleep(0.1)
    return list(receiver.received_spans())
