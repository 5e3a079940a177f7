"""Shared pieces of the benchmarks: sinks that encode like a real export, timing, the table."""

from __future__ import annotations

import argparse
import gc
import gzip
import importlib.util
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from langfuse_mw.export import HttpSender, Item, Outcome

# Logfire is in the "bench" extra only (make bench builds .venv-bench with it): where it is not
# installed its rows are left out, and the scripts say so. (Checked without importing it, or
# Sentry: a variant's process holds only what that variant uses.)
HAVE_LOGFIRE = importlib.util.find_spec("logfire") is not None
NO_LOGFIRE = (
    "logfire is not installed here: its rows are left out "
    "(make bench measures it, in .venv-bench with the [bench] extra)"
)


class EncodingSink:
    """A langfuse_mw Sender that encodes and gzips each batch as for Langfuse, then drops it.

    The background cost of encoding is real; only the network is left out, for every variant.
    """

    def __init__(self) -> None:
        self.spans = 0
        self._encoder = HttpSender("http://127.0.0.1:9", {})

    def send(self, spans: Sequence[Item], timeout: float) -> Outcome:
        self._encoder.encode(spans)
        self.spans += len(spans)
        return Outcome(ok=True)

    def reset(self) -> None:
        return None

    def close(self) -> None:
        return None


class EncodingExporter(SpanExporter):
    """The same sink as an OpenTelemetry exporter, for the peers."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        gzip.compress(encode_spans(spans).SerializeToString(), compresslevel=5)
        self.spans += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def versions(*names: str) -> str:
    """Installed versions of the named distributions, for the report header."""
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} (missing)")
    return ", ".join(found)


def header(title: str, packages: Sequence[str]) -> None:
    """Print what ran where."""
    print(f"# {title}")
    print(f"python {platform.python_version()} on {platform.machine()}, {platform.system()}")
    print(versions(*packages))
    print()


def run_rounds(
    variants: dict[str, Callable[[int], float]],
    *,
    rounds: int,
    requests: int,
    settle: Callable[[], Any] = lambda: None,
) -> dict[str, list[float]]:
    """Alternate the variants round by round; each call returns seconds for ``requests``.

    ``settle`` runs before each measurement so one variant's background export does not
    land in the next variant's time.
    """
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            settle()
            gc.collect()
            samples[name].append(run(requests) / requests * 1e6)
    return samples


def chosen_variants(parser: argparse.ArgumentParser, text: str, known: Sequence[str]) -> list[str]:
    """The comma-separated variants of ``--variants``, in order; ``bare`` is required."""
    variants = [v.strip() for v in text.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(known))
    if unknown or "bare" not in variants:
        parser.error(f"unknown variants {unknown} (bare is required: ratios are against it)")
    return variants


def table(
    samples: dict[str, list[float]],
    baseline: str,
    peers: Sequence[str] = (),
    pairs: Sequence[tuple[str, str]] = (),
) -> None:
    """Print median and min-max per variant, overhead over the baseline and ratios.

    Every langfuse_mw variant is compared with every one of ``peers``, and each ``(ours,
    peer)`` of ``pairs`` with each other (a peer measured for one case only, e.g. not sampled).
    """
    base = statistics.median(samples[baseline])
    medians = {name: statistics.median(values) for name, values in samples.items()}
    print(f"{'variant':<34}{'median us/req':>14}{'min-max':>18}{'overhead':>11}{'x bare':>8}")
    for name, values in samples.items():
        median = medians[name]
        spread = f"{min(values):.1f}-{max(values):.1f}"
        print(f"{name:<34}{median:>14.1f}{spread:>18}{median - base:>+11.1f}{median / base:>8.2f}")
    ours = [n for n in samples if n.startswith("langfuse_mw")]
    compared = [(name, peer) for name in ours for peer in peers] + [
        (name, peer) for name, peer in pairs if name in samples and peer in samples
    ]
    for name, peer in compared:
        mine, theirs = medians[name] - base, medians[peer] - base
        if theirs > 0:
            print(f"overhead ratio {name} / {peer}: {mine / theirs:.2f}")
    print()


def cpu_seconds() -> float:
    """Process CPU time, all threads (so background export is counted)."""
    return time.process_time()


def note(text: str) -> None:
    print(text, file=sys.stdout)


def noop(*args: Any) -> None:
    return None


# Every exporter holds a whole round and exports only when flushed between rounds, so the
# request-path table times the request's thread alone (a batch exported mid-round would land
# in whichever request held the GIL). The total-CPU table flushes inside the measurement.
ROUND_CAPACITY = 1_000_000
# A caller that continued its trace without sampling it (W3C trace flags 00).
NOT_SAMPLED_PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
os.environ.setdefault("OTEL_BSP_MAX_QUEUE_SIZE", str(ROUND_CAPACITY))  # the naive client's


def install_runtime(sender: Any) -> None:
    """Make the process runtime export through ``sender`` (once; later calls keep it)."""
    from langfuse_mw import runtime
    from langfuse_mw.config import resolve_settings

    if runtime.current() is None:
        settings = resolve_settings(
            {
                "public_key": "pk-lf-bench", "secret_key": "sk-lf-bench", "base_url": "http://x",
                "preset": "production", "sample_rate": 1.0, "max_queue_size": ROUND_CAPACITY,
                "max_batch_size": ROUND_CAPACITY, "flush_interval": 3600.0,
            }
        )  # fmt: skip
        with runtime._lock:
            runtime._install(runtime.Runtime(settings, sender=sender))


def deferred_processor(exporter: SpanExporter) -> BatchSpanProcessor:
    """An OpenTelemetry batch processor that exports when flushed (like our runtime above)."""
    return BatchSpanProcessor(
        exporter,
        max_queue_size=ROUND_CAPACITY,
        max_export_batch_size=ROUND_CAPACITY,
        schedule_delay_millis=3_600_000,
    )


def with_cpu(run: Callable[[int], float], flush: Callable[[], Any]) -> Callable[[int], float]:
    """``run`` measured in process CPU seconds, its export (``flush``) included."""

    def measured(n: int) -> float:
        flush()
        before = cpu_seconds()
        run(n)
        flush()
        return cpu_seconds() - before

    return measured


def measure(
    title: str,
    variants: dict[str, Callable[[int], float]],
    flushes: dict[str, Callable[[], Any]],
    *,
    rounds: int,
    requests: int,
    peers: Sequence[str],
    pairs: Sequence[tuple[str, str]] = (),
) -> None:
    """Print both tables for ``variants`` (one has to be ``bare``); ``peers``/``pairs`` as in table.

    ``flushes`` exports what each tracing variant holds: between rounds for the request path,
    inside the measurement for total CPU.
    """

    def settle() -> None:
        for flush in flushes.values():
            flush()

    for run in variants.values():  # warm up imports, caches, threads
        run(300)
    settle()

    print(f"## {title}request path (wall time on the request's thread; export between rounds)")
    samples = run_rounds(variants, rounds=rounds, requests=requests, settle=settle)
    table(samples, "bare", peers=peers, pairs=pairs)

    print(f"## {title}total CPU per request, background export included")
    cpu_variants = {
        "bare": with_cpu(variants["bare"], lambda: None),
        **{name: with_cpu(variants[name], flush) for name, flush in flushes.items()},
    }
    cpu = run_rounds(cpu_variants, rounds=max(3, rounds // 2), requests=requests)
    table(cpu, "bare", peers=peers, pairs=pairs)
