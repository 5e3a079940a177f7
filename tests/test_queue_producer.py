"""The producer side: options, the optional redis dependency, XADD bounded by MAXLEN ~."""

from __future__ import annotations

import subprocess
import sys

import pytest

from langfuse_mw.config import ConfigError, resolve_settings
from langfuse_mw.export import HttpSender
from langfuse_mw.queue.producer import RedisSender
from tests.queue_support import PUBLIC_KEY, STREAM, RedisServer, span, unencodable
from tests.servers import ROOT


def test_queue_options_come_from_the_environment() -> None:
    settings = resolve_settings(
        environ={
            "LANGFUSE_MW_QUEUE_URL": "redis://cache:6379/2",
            "LANGFUSE_MW_QUEUE_STREAM": "tenant-a:spans",
            "LANGFUSE_MW_QUEUE_MAXLEN": "5000",
        }
    )
    assert (settings.queue_url, settings.queue_stream, settings.queue_maxlen) == (
        "redis://cache:6379/2",
        "tenant-a:spans",
        5000,
    )
    assert settings.sources["queue_url"] == "env:LANGFUSE_MW_QUEUE_URL"
    spool = resolve_settings({"spool_dir": "~/spool", "spool_max_bytes": 1024}, environ={})
    assert spool.spool_dir is not None and not spool.spool_dir.startswith("~")
    assert spool.spool_max_bytes == 1024


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"queue_url": "http://cache:6379"}, "queue_url: expected a Redis URL"),
        ({"queue_url": "redis://"}, "queue_url: expected a Redis URL"),
        ({"queue_stream": "has space"}, "queue_stream: expected a Redis key"),
        ({"queue_maxlen": 0}, "queue_maxlen: expected a finite int >= 1"),
        ({"spool_max_bytes": "lots"}, "spool_max_bytes: expected an int"),
        (
            {"queue_url": "redis://cache", "spool_dir": "/tmp/spool"},
            "queue_url (argument) and spool_dir (argument): choose one",
        ),
    ],
)
def test_bad_queue_options_fail_at_start_up_naming_the_option(
    options: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_settings(options, environ={})


def test_env_var_errors_name_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"\(from \$LANGFUSE_MW_QUEUE_URL\)"):
        resolve_settings(environ={"LANGFUSE_MW_QUEUE_URL": "cache:6379"})


def test_without_redis_the_package_imports_and_queue_mode_names_the_extra() -> None:
    code = """
import sys
sys.modules["redis"] = None  # as if redis-py were not installed
import langfuse_mw, langfuse_mw.queue, langfuse_mw.queue.spool
try:
    langfuse_mw.init(public_key="pk-lf-x", queue_url="redis://127.0.0.1:1/0")
except ImportError as exc:
    print(exc)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert 'pip install "langfuse-mw[redis]"' in done.stdout


def test_each_batch_is_one_entry_and_maxlen_bounds_the_stream(redis_server: RedisServer) -> None:
    encoder = HttpSender("http://127.0.0.1:9", {})
    sender = RedisSender(
        redis_server.url, STREAM, maxlen=100, encoder=encoder, public_key=PUBLIC_KEY
    )
    try:
        for n in range(1, 1001):
            assert sender.send([span(n), span(n + 5000)], 1.0).ok
        client = redis_server.client()
        # "~": Redis trims whole nodes (100 entries by default), never below maxlen.
        assert 100 <= client.xlen(STREAM) < 300
        [(_, fields)] = client.xrevrange(STREAM, count=1)
        assert fields[b"body"][:2] == b"\x1f\x8b" and fields[b"enc"] == b"gzip"
        assert (fields[b"spans"], fields[b"pk"], fields[b"v"]) == (b"2", PUBLIC_KEY.encode(), b"1")
        assert sender.stats()["batches_added"] == 1000
        redis_server.stop()
        outcome = sender.send([span(1)], 1.0)
        assert outcome.retry and not outcome.ok and "ConnectionError" in (outcome.error or "")
        assert sender.stats()["failed_writes"] == 1
    finally:
        sender.close()


def test_a_span_that_cannot_be_encoded_is_left_out_of_the_entry(
    redis_server: RedisServer,
) -> None:
    encoder = HttpSender("http://127.0.0.1:9", {})
    sender = RedisSender(redis_server.url, STREAM, maxlen=100, encoder=encoder,
                         public_key=PUBLIC_KEY)  # fmt: skip
    try:
        outcome = sender.send([span(1), unencodable(2), span(3)], 1.0)
        assert outcome.ok and outcome.unencodable == (1,), outcome
        [(_, fields)] = redis_server.client().xrevrange(STREAM, count=1)
        assert fields[b"spans"] == b"2"
        assert sender.stats()["spans_added"] == 2
        assert sender.send([unencodable(4)], 1.0).drop_reason == "encoding"
    finally:
        sender.close()
