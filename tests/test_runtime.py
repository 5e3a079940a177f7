"""The process runtime: one per process, private provider, deadlines, pass-through when off."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry import trace as otel_trace

import langfuse_mw
from langfuse_mw import runtime
from langfuse_mw.devserver import DevServer
from tests.servers import local_receiver, wait_for


@pytest.fixture
def black_hole() -> Iterator[str]:
    """A TCP port that accepts connections and never answers (a hung Langfuse)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


@pytest.fixture(autouse=True)
def _fresh_runtime() -> Iterator[None]:
    runtime.shutdown(0.5)
    yield
    runtime.shutdown(0.5)


def test_init_builds_one_runtime_and_warns_on_conflicting_options(
    black_hole: str, caplog: Any
) -> None:
    first = langfuse_mw.init(public_key="pk-1", secret_key="sk-1", base_url=black_hole)
    assert first.enabled
    with caplog.at_level(logging.WARNING, logger="langfuse_mw"):
        assert langfuse_mw.init(public_key="pk-1", secret_key="sk-1", base_url=black_hole) is first
        assert langfuse_mw.init(public_key="pk-2", secret_key="sk-2", base_url=black_hole) is first
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        "langfuse_mw: init() called again with different connection options; keeping the "
        "runtime built first (call shutdown() before re-initialising)"
    ]
    # Private provider: FastAPI's built-in telemetry and other libraries see no global one.
    assert isinstance(otel_trace.get_tracer_provider(), otel_trace.ProxyTracerProvider)


def test_shutdown_returns_within_its_deadline_when_langfuse_hangs(black_hole: str) -> None:
    rt = langfuse_mw.init(
        public_key="pk-hang", secret_key="sk-hang", base_url=black_hole, flush_interval=0.05
    )
    from langfuse import get_client

    client = get_client(public_key="pk-hang")
    for n in range(50):
        with client.start_as_current_observation(name=f"work-{n}"):
            pass
    time.sleep(0.2)  # the export thread is now stuck on the hung POST
    started = time.monotonic()
    lost = langfuse_mw.shutdown(timeout=1.0)
    elapsed = time.monotonic() - started
    assert elapsed <= 1.1
    assert lost == 50
    assert rt.health()["dropped"] == {"shutdown": 50}
    assert langfuse_mw.health()["disabled_reason"] == "not initialised"


def test_missing_credentials_give_a_pass_through_runtime_and_one_warning(caplog: Any) -> None:
    with caplog.at_level(logging.WARNING, logger="langfuse_mw"):
        rt = langfuse_mw.init(secret_key="sk-only")
    assert not rt.enabled
    assert rt.disabled_reason == "LANGFUSE_PUBLIC_KEY not set"
    assert [r.getMessage() for r in caplog.records] == [
        "langfuse_mw: tracing is off (LANGFUSE_PUBLIC_KEY not set); requests are served untouched"
    ]
    assert langfuse_mw.flush(0.1) is True
    assert langfuse_mw.shutdown(0.1) == 0


def test_keys_that_cannot_be_sent_disable_tracing_instead_of_failing_later() -> None:
    rt = langfuse_mw.init(public_key="pk\nbad", secret_key="sk")
    assert rt.disabled_reason == "public_key contains characters that cannot go in an HTTP header"


def test_disabled_by_configuration() -> None:
    rt = langfuse_mw.init(public_key="pk", secret_key="sk", enabled=False)
    assert not rt.enabled
    assert langfuse_mw.health()["enabled"] is False


def test_import_needs_no_web_framework() -> None:
    # Block every framework import; the package and its ASGI middleware must still import.
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"starlette", "fastapi", "flask", "django", "redis", "werkzeug"}:
            raise ImportError("blocked " + name)
sys.meta_path.insert(0, Block())
import langfuse_mw, langfuse_mw.asgi, langfuse_mw.core, langfuse_mw.testing
frameworks = {"starlette", "fastapi", "flask", "django"}
print(sorted(m for m in sys.modules if m.split(".")[0] in frameworks))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


SIGTERM_SCRIPT = """
import sys, time
import langfuse_mw
from langfuse import get_client
langfuse_mw.init(public_key="pk-sig", secret_key="sk-sig", base_url=sys.argv[1],
                 flush_interval=0.05, shutdown_timeout=1.0)
client = get_client(public_key="pk-sig")
for n in range(20):
    with client.start_as_current_observation(name=f"job-{n}"):
        pass
print("ready", flush=True)
time.sleep(60)
"""


def test_sigterm_without_a_handler_flushes_within_the_deadline_then_dies_as_usual(
    black_hole: str,
) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", SIGTERM_SCRIPT, black_hole],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    time.sleep(0.2)
    started = time.monotonic()
    process.terminate()
    _, err = process.communicate(timeout=10)
    elapsed = time.monotonic() - started
    assert process.returncode == -15  # the default action still ends the process
    assert 0.9 <= elapsed <= 1.0 + 1.0, err
    assert "20 spans were not exported" in err


CHAINED_SIGTERM_SCRIPT = """
import os, signal, sys, time
def cleanup(signum, frame):  # the app's own handler, installed before the runtime
    print("app handler ran", flush=True)
    if sys.argv[2] == "reraise":  # clean up, then die by the signal as if unhandled
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
    elif sys.argv[2] == "exit":
        sys.exit(3)
    # "return": a graceful server's handler, which only asks the main loop to stop
    global running
    running = False
signal.signal(signal.SIGTERM, cleanup)
import langfuse_mw
from langfuse import get_client
langfuse_mw.init(public_key="pk-lf-e2e", secret_key="sk-lf-e2e", base_url=sys.argv[1],
                 flush_interval=30, shutdown_timeout=1.0)
client = get_client(public_key="pk-lf-e2e")
for n in range(20):
    with client.start_as_current_observation(name=f"job-{n}"):
        pass
running = True
print("ready", flush=True)
deadline = time.monotonic() + 20
while running and time.monotonic() < deadline:
    time.sleep(0.05)
with client.start_as_current_observation(name="after-the-signal"):
    pass
"""


@pytest.fixture
def receiver() -> Iterator[DevServer]:
    yield from local_receiver("pk-lf-e2e", "sk-lf-e2e")


@pytest.mark.parametrize(
    ("app_handler", "code", "spans"),
    [("reraise", -signal.SIGTERM, 20), ("exit", 3, 20), ("return", 0, 21)],
)
def test_sigterm_flushes_then_chains_to_the_handler_that_was_there(
    receiver: DevServer, app_handler: str, code: int, spans: int
) -> None:
    # flush_interval=30: nothing would leave before exit unless the signal flushes it, and a
    # handler that re-raises with the default action ends the process before atexit runs.
    process = subprocess.Popen(
        [sys.executable, "-c", CHAINED_SIGTERM_SCRIPT, receiver.url, app_handler],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    process.terminate()
    out, err = process.communicate(timeout=20)
    assert "app handler ran" in out, err  # chained: the app's handler still runs
    assert process.returncode == code, err
    names = sorted(str(s["name"]) for s in wait_for(receiver, spans))
    assert len(names) == spans, err
    if app_handler == "return":  # the process carried on; what it did after was exported too
        assert "after-the-signal" in names


def test_sigterm_with_a_hung_langfuse_and_a_graceful_handler_waits_one_deadline(
    black_hole: str,
) -> None:
    # The flush at SIGTERM runs out of time: the shutdown at exit does not wait again.
    process = subprocess.Popen(
        [sys.executable, "-c", CHAINED_SIGTERM_SCRIPT, black_hole, "return"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    started = time.monotonic()
    process.terminate()
    _, err = process.communicate(timeout=20)
    elapsed = time.monotonic() - started
    assert process.returncode == 0, err
    assert elapsed <= 1.0 + 1.0, err
    # Said once each: the flush at SIGTERM gave up, and what was lost at exit.
    assert err.count("at SIGTERM, Langfuse took no span within 1.0s") == 1, err
    assert err.count("21 spans were not exported at exit") == 1, err  # and after-the-signal
    assert "since the last report" not in err, err


BUSY_SIGTERM_SCRIPT = """
import signal, sys, threading, time
graceful = threading.Event()
signal.signal(signal.SIGTERM, lambda signum, frame: graceful.set())  # a server's own handler
import langfuse_mw
from langfuse import get_client
langfuse_mw.init(public_key="pk-lf-e2e", secret_key="sk-lf-e2e", base_url=sys.argv[1],
                 shutdown_timeout=2.0)
client = get_client(public_key="pk-lf-e2e")
done = threading.Event()
counts = [0, 0]

def work(slot):  # a threaded server's requests, still arriving while it drains
    while not done.is_set():
        with client.start_as_current_observation(name="work"):
            pass
        counts[slot] += 1
        time.sleep(0.001)

threads = [threading.Thread(target=work, args=(n,)) for n in range(2)]
for thread in threads:
    thread.start()
print("ready", flush=True)
graceful.wait(20)
time.sleep(0.3)  # the graceful drain: in-flight work completes
done.set()
for thread in threads:
    thread.join()
print(sum(counts), flush=True)
"""


def test_sigterm_while_threads_keep_working_loses_nothing_with_a_healthy_langfuse(
    receiver: DevServer,
) -> None:
    # The flush at SIGTERM waits for what was queued when the signal came, not for a queue
    # that other threads keep filling; and a flush that exported was not stalled, so the
    # shutdown at exit keeps its whole deadline for the spans of the drain.
    process = subprocess.Popen(
        [sys.executable, "-c", BUSY_SIGTERM_SCRIPT, receiver.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    process.terminate()
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    created = int(out.strip().splitlines()[-1])
    assert "not exported" not in err, err
    assert len(wait_for(receiver, created)) == created, err


@pytest.mark.parametrize("lock_of", ["failsafe", "runtime", "safe_trace"])
def test_a_fork_while_another_thread_holds_a_lock_leaves_the_child_working(
    lock_of: str,
) -> None:
    # gunicorn forks workers while the master's threads run: a lock held at that moment is
    # copied locked, and the child's first use of it (a bad header counted, a runtime built,
    # a safe_trace failure) would hang forever.
    from langfuse_mw import _failsafe, safe

    breaker = safe._Breaker("test")
    locks: dict[str, Callable[[], Any]] = {
        "failsafe": lambda: _failsafe._lock,
        "runtime": lambda: runtime._lock,
        "safe_trace": lambda: breaker._lock,
    }
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with locks[lock_of]():
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(5)
    pid = os.fork()
    if pid == 0:  # the child: 0 if it can take the lock, 1 if it is stuck
        os._exit(0 if locks[lock_of]().acquire(timeout=2) else 1)
    release.set()
    holder.join()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"the child is stuck on the {lock_of} lock"
