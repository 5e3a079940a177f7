"""The durable export path under faults: outages, failovers, unreadable and stale spool files."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from langfuse_mw import runtime
from langfuse_mw.config import resolve_settings
from langfuse_mw.devserver import DevServer
from langfuse_mw.export import HttpSender
from langfuse_mw.queue._redis import connect
from langfuse_mw.queue.forwarder import Forwarder, ForwarderOptions
from langfuse_mw.queue.producer import RedisSender
from langfuse_mw.queue.spool import SpoolSender
from tests.queue_support import (
    PUBLIC_KEY,
    SECRET_KEY,
    STREAM,
    RedisServer,
    produce,
    span,
    span_ids,
    wait_until,
)
from tests.servers import free_port


@pytest.fixture
def receiver() -> Iterator[DevServer]:
    server = DevServer().start()
    yield server
    server.close()


def forwarder(
    server: RedisServer, base_url: str, consumer: str, url: str = "", **options: Any
) -> Forwarder:
    settings = resolve_settings(
        {"public_key": PUBLIC_KEY, "secret_key": SECRET_KEY, "base_url": base_url}, environ={}
    )
    opts = ForwarderOptions(
        stream=STREAM,
        consumer=consumer,
        public_key=PUBLIC_KEY,
        backoff_base=0.05,
        backoff_cap=0.2,
        block=0.1,
        stats_interval=0.2,
        **options,
    )
    client = connect(url or server.url, 5.0)
    sender = runtime.http_sender(settings, PUBLIC_KEY, SECRET_KEY)
    server.on_close(client.close)
    server.on_close(sender.close)
    return Forwarder(client, sender, opts)


# -- forwarder: batches read ahead of the one being retried ----------------------------------


def test_an_outage_does_not_let_another_forwarder_steal_the_batches_read_ahead(
    redis_server: RedisServer, receiver: DevServer
) -> None:
    # docs/enterprise.md: "each batch goes to one of them" and "a long outage does not make the
    # others steal it". Forwarder A reads 8 batches and retries the first one through an
    # outage longer than claim_idle; the 7 behind it must not be taken over by B and posted
    # twice once Langfuse is back.
    client = redis_server.client()
    expected = produce(client, 8)
    receiver.set_fault(status=503)
    a = forwarder(redis_server, receiver.url, "a", claim_idle=0.6, read_count=8)
    b = forwarder(redis_server, receiver.url, "b", claim_idle=0.6, read_count=8)
    threads = [threading.Thread(target=f.run) for f in (a, b)]
    threads[0].start()
    wait_until(lambda: receiver.request_count >= 1, 5, "A's first POST")
    threads[1].start()
    time.sleep(2.5)  # the outage outlasts claim_idle several times over
    receiver.clear_fault()
    try:
        wait_until(lambda: client.xlen(STREAM) == 0, 10, "the stream to drain")
        time.sleep(0.5)  # anything still in flight lands
    finally:
        for f in (a, b):
            f.stop.set()
        for thread in threads:
            thread.join(5)
    received = Counter(span_ids(receiver))
    assert set(received) == expected
    assert [s for s, n in received.items() if n > 1] == []  # not one batch posted twice
    assert a.stats()["forwarded"] + b.stats()["forwarded"] == 8


# -- spool ---------------------------------------------------------------------------------


def make_spool(spool: Path, base_url: str, **options: Any) -> SpoolSender:
    settings = resolve_settings({"base_url": base_url, "compression": "none"}, environ={})
    http = runtime.http_sender(settings, PUBLIC_KEY, SECRET_KEY)
    return SpoolSender(http, spool, backoff_base=0.05, backoff_cap=0.2, **options)


def test_one_unreadable_spool_file_does_not_block_the_replay(
    tmp_path: Path, receiver: DevServer
) -> None:
    # A spool entry that cannot be read (here a directory; in production a file another user
    # wrote with mode 600, or an I/O error) sorts first: the files behind it must still flow.
    spool = tmp_path / "spool"
    (spool / "0000000000000000001-1-000000-4.otlp").mkdir(parents=True)
    sender = make_spool(spool, receiver.url, max_bytes=1 << 20)
    try:
        assert sender.send([span(5)], 5).ok  # spooled behind the unreadable one
        wait_until(lambda: span_ids(receiver) == [f"{5:016x}"], 5, "the readable batch")
        wait_until(lambda: sender.stats()["spool_files"] == 0, 5, "the spool to be empty")
        assert sender.stats()["dropped"] == {"spool_error": 4}  # counted, with its spans
    finally:
        sender.close()


def test_a_temporary_file_left_by_a_crash_mid_write_is_removed(
    tmp_path: Path, receiver: DevServer
) -> None:
    # A worker killed (OOM, SIGKILL) between creating its .tmp- file and renaming it leaves
    # the file behind; it is never replayed and not counted in spool_max_bytes, so without
    # cleanup a crash-looping worker fills the disk.
    spool = tmp_path / "spool"
    spool.mkdir()
    stale = spool / ".tmp-0000000000000000001-4242-000000-1.otlp.gz"
    stale.write_bytes(b"\x1f\x8b half a batch")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    fresh = spool / ".tmp-0000000000000000002-4243-000000-1.otlp.gz"  # a live writer's
    fresh.write_bytes(b"\x1f\x8b being written")
    sender = make_spool(spool, receiver.url, max_bytes=1 << 20)
    try:
        assert not stale.exists()
        assert fresh.exists()
    finally:
        sender.close()


# -- Redis failover behind one address (managed Redis: the DNS name moves to the replica) ----


class SwitchingProxy:
    """A TCP proxy on 127.0.0.1: each new connection goes to the current ``target`` port.

    Open connections stay where they are, as after a managed Redis failover that moved the
    endpoint's DNS name to the promoted replica.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()
        for sock in self._sockets:
            sock.close()


@pytest.fixture
def failover() -> Iterator[tuple[RedisServer, RedisServer, SwitchingProxy]]:
    primary, replica = RedisServer().start(), RedisServer().start()
    proxy = SwitchingProxy(primary.port)
    yield primary, replica, proxy
    proxy.close()
    primary.close()
    replica.close()


def fail_over(primary: RedisServer, replica: RedisServer, proxy: SwitchingProxy) -> None:
    # The old primary becomes a read-only replica of the new one; the address moves.
    replica.client().replicaof("NO", "ONE")
    primary.client().replicaof("127.0.0.1", str(replica.port))
    proxy.target = replica.port


def test_producer_reconnects_after_a_failover_instead_of_writing_to_a_replica_forever(
    failover: tuple[RedisServer, RedisServer, SwitchingProxy],
) -> None:
    primary, replica, proxy = failover
    url = f"redis://127.0.0.1:{proxy.port}/0"
    encoder = HttpSender("http://127.0.0.1:9", {})
    sender = RedisSender(url, STREAM, maxlen=100, encoder=encoder, public_key=PUBLIC_KEY)
    try:
        assert sender.send([span(1)], 1.0).ok
        fail_over(primary, replica, proxy)
        outcomes = [sender.send([span(n)], 1.0) for n in range(2, 5)]  # ExportQueue's retries
        assert outcomes[-1].ok, outcomes
        assert replica.client().xlen(STREAM) >= 2
    finally:
        sender.close()


def test_forwarder_reconnects_after_a_failover_instead_of_failing_forever(
    failover: tuple[RedisServer, RedisServer, SwitchingProxy], receiver: DevServer
) -> None:
    primary, replica, proxy = failover
    f = forwarder(primary, receiver.url, "f", url=f"redis://127.0.0.1:{proxy.port}/0")
    receiver.set_fault(status=503)  # the forwarder holds a batch when the failover happens
    produce(primary.client(), 1)
    thread = threading.Thread(target=f.run)
    thread.start()
    try:
        wait_until(lambda: receiver.request_count >= 1, 5, "the first POST")
        fail_over(primary, replica, proxy)
        expected = produce(replica.client(), 3, first=100)
        receiver.clear_fault()
        wait_until(lambda: expected <= set(span_ids(receiver)), 5, "after the failover")
    finally:
        f.stop.set()
        thread.join(5)


# -- forwarder: the group's consumers ----------------------------------------------------------


def consumer_names(client: Any) -> set[str]:
    return {c["name"].decode() for c in client.xinfo_consumers(STREAM, "langfuse-mw")}


def test_a_forwarder_that_stops_cleanly_leaves_the_group_unless_it_holds_batches(
    redis_server: RedisServer, receiver: DevServer
) -> None:
    # The default consumer name is <hostname>-<pid>: every restart is a new consumer. One
    # that stopped with nothing pending must not stay counted in --stats' "consumers".
    client = redis_server.client()
    expected = produce(client, 5)
    for n in range(3):  # three restarts of one forwarder
        forwarder(redis_server, receiver.url, f"host-{n}").run(drain=True)
    assert set(span_ids(receiver)) == expected
    assert consumer_names(client) == set()

    # One that hands batches back on stop keeps them (deleting it would drop them).
    produce(client, 4, first=100)
    receiver.set_fault(status=503)
    holder = forwarder(redis_server, receiver.url, "holder", read_count=4)
    thread = threading.Thread(target=holder.run)
    thread.start()
    wait_until(lambda: receiver.request_count >= len(expected) + 1, 5, "a batch in hand")
    holder.stop.set()
    thread.join(5)
    assert consumer_names(client) == {"holder"}
    assert client.xpending(STREAM, "langfuse-mw")["pending"] == 4
