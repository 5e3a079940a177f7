"""The local spool: batches Langfuse cannot take survive a restart and are replayed in order."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from langfuse_mw.config import resolve_settings
from langfuse_mw.devserver import DevServer
from langfuse_mw.export import ExportQueue
from langfuse_mw.queue.spool import SpoolSender
from langfuse_mw.runtime import http_sender
from tests.queue_support import (
    PUBLIC_KEY,
    SECRET_KEY,
    size_limited_receiver,
    span,
    unencodable,
    wait_until,
)
from tests.servers import ROOT, free_port

# One service process: traces `count` observations named work-<first..>, then exits through
# shutdown(); with `drain`, it first waits until the spool is empty.
SERVICE = """
import json, sys, time
import langfuse_mw
from langfuse import get_client

base_url, spool_dir, first, count, drain = sys.argv[1:6]
rt = langfuse_mw.init(
    public_key="pk-lf-dev", secret_key="sk-lf-dev", base_url=base_url, spool_dir=spool_dir,
    flush_interval=0.05, max_batch_size=20,
)
client = get_client(public_key="pk-lf-dev")
for n in range(int(first), int(first) + int(count)):
    with client.start_as_current_observation(name=f"work-{n}"):
        pass
rt.flush(5)
deadline = time.monotonic() + 20
while drain == "1" and rt.health()["durable"]["spool_files"] and time.monotonic() < deadline:
    time.sleep(0.02)
health = rt.health()
langfuse_mw.shutdown(5)
print(json.dumps(health))
"""


def run_service(
    base_url: str, spool: Path, first: int, count: int, drain: bool
) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LANGFUSE", "OTEL_"))}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            SERVICE,
            base_url,
            str(spool),
            str(first),
            str(count),
            str(int(drain)),
        ],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    health: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return health


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    return tmp_path / "spool"


def test_receiver_down_process_restarted_receiver_up_everything_arrives_in_order(
    spool: Path,
) -> None:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    first = run_service(base_url, spool, 0, 150, drain=False)  # Langfuse is down
    durable = first["durable"]
    assert isinstance(durable, dict)
    assert durable["spooled_batches"] >= 1 and durable["spool_files"] >= 1
    assert first["dropped"] == {} and first["exported"] == 150  # on disk, nothing lost
    files = sorted(os.listdir(spool))
    assert all(name.endswith(".otlp.gz") for name in files if not name.startswith("."))

    receiver = DevServer(port=port).start()  # Langfuse is back; the service restarts
    try:
        second = run_service(base_url, spool, 150, 30, drain=True)
        names = [s["name"] for s in receiver.received_spans()]
    finally:
        receiver.close()
    assert sorted(names, key=lambda n: int(n.split("-")[1])) == names  # replayed in order
    assert names == [f"work-{n}" for n in range(180)]
    durable = second["durable"]
    assert isinstance(durable, dict)
    assert durable["spool_files"] == 0 and durable["replayed_batches"] >= 1
    assert not [name for name in os.listdir(spool) if not name.startswith(".")]


def make_spool(spool: Path, base_url: str, **options: object) -> SpoolSender:
    settings = resolve_settings({"base_url": base_url, "compression": "none"}, environ={})
    http = http_sender(settings, PUBLIC_KEY, SECRET_KEY)
    sender = SpoolSender(http, spool, backoff_base=0.05, backoff_cap=0.2, **options)  # type: ignore[arg-type]
    return sender


@pytest.fixture
def receiver() -> Iterator[DevServer]:
    server = DevServer().start()
    yield server
    server.close()


def test_spool_is_capped_and_drops_are_counted(spool: Path) -> None:
    sender = make_spool(spool, f"http://127.0.0.1:{free_port()}", max_bytes=2000)
    queue = ExportQueue(sender, flush_interval=0.02, max_batch_size=5)
    try:
        for n in range(1, 101):
            queue.emit(span(n))
        assert queue.flush(5)
        stats = queue.stats()
        spool_stats = sender.stats()
    finally:
        queue.shutdown(1)
    assert spool_stats["spool_bytes"] <= 2000
    assert stats["dropped"]["spool_full"] > 0
    assert stats["exported"] + stats["dropped"]["spool_full"] == 100
    assert spool_stats["spool_files"] == spool_stats["spooled_batches"]


def test_a_batch_langfuse_rejects_is_dropped_and_the_rest_replayed(
    spool: Path, receiver: DevServer
) -> None:
    spool.mkdir()
    (spool / "0000000000000000001-1-000000-1.otlp").write_bytes(b"\xff\xff not protobuf")
    sender = make_spool(spool, receiver.url, max_bytes=1 << 20)
    try:
        assert sender.send([span(5)], 5).ok  # spooled behind the file already there
        wait_until(lambda: sender.stats()["spool_files"] == 0, 10, "the spool to drain")
        assert [s["span_id"] for s in receiver.received_spans()] == [f"{5:016x}"]
        assert sender.stats()["dropped"] == {"rejected": 1}
    finally:
        sender.close()


def test_bad_credentials_keep_the_spool_for_the_next_start(spool: Path) -> None:
    receiver = DevServer(secret_key="sk-lf-other").start()
    sender = make_spool(spool, receiver.url, max_bytes=1 << 20)
    try:
        receiver.set_fault(status=503)
        assert sender.send([span(1)], 5).ok  # spooled
        receiver.clear_fault()
        wait_until(lambda: sender.stats()["replay"] == "stopped", 10, "replay to stop on 401")
        assert sender.stats()["spool_files"] == 1
    finally:
        sender.close()
        receiver.close()


def test_a_span_that_cannot_be_encoded_is_left_out_and_the_rest_delivered(
    spool: Path, receiver: DevServer
) -> None:
    sender = make_spool(spool, receiver.url, max_bytes=1 << 20)
    try:
        outcome = sender.send([span(1), unencodable(2), span(3)], 5)
        assert outcome.ok and outcome.unencodable == (1,), outcome
        assert "TypeError" in (outcome.unencodable_error or "")
        assert [s["span_id"] for s in receiver.received_spans()] == [f"{1:016x}", f"{3:016x}"]
        assert sender.send([unencodable(4)], 5).drop_reason == "encoding"
    finally:
        sender.close()


@pytest.mark.parametrize("suffix", [".otlp", ".otlp.gz"])
def test_a_spooled_batch_too_large_for_langfuse_is_split_not_dropped(
    spool: Path, suffix: str
) -> None:
    # As on the live path, a 413 halves the batch until each part is taken; the halves keep
    # the batch's place in the replay order.
    settings = resolve_settings({"base_url": "http://127.0.0.1:9", "compression": "none"}, {})
    encode = http_sender(settings, PUBLIC_KEY, SECRET_KEY).encode
    body = encode([span(n) for n in range(1, 9)])
    half = encode([span(n) for n in range(1, 5)])  # what Langfuse takes (its proxy, here)
    spool.mkdir()
    first = body if suffix == ".otlp" else gzip.compress(body)
    (spool / f"0000000000000000001-1-000000-8{suffix}").write_bytes(first)
    (spool / "0000000000000000002-1-000000-1.otlp").write_bytes(encode([span(9)]))
    with size_limited_receiver(len(half)) as (url, received):
        sender = make_spool(spool, url, max_bytes=1 << 20)
        try:
            wait_until(lambda: sender.stats()["spool_files"] == 0, 10, "the spool to drain")
            assert received == list(range(1, 10))  # all of them, in order
            assert sender.stats()["dropped"] == {}
            assert os.listdir(spool) == [".replay.lock"]
        finally:
            sender.close()
