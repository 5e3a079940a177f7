"""Sentry and Logfire as peers of the benchmarks: each its own, none patching the other variants.

Sentry: a ``sentry_sdk.Client`` per sampling decision (``traces_sample_rate`` 1.0 or 0.0),
``default_integrations=False`` and ``auto_enabling_integrations=False`` (its Starlette, Flask
and logging integrations patch classes for every app in the process), wrapped around the app
explicitly (``SentryAsgiMiddleware``, ``SentryWsgiMiddleware``). ``sentry_sdk.init`` is
``Client(...)`` made the global scope's client for good; two of them cannot be live at once, so
each is made the process's client only while its variant's requests run, and nothing else
in the process calls Sentry. ``release`` is set, as a deployed service has it (Sentry reads it
from git otherwise): requests are then counted in release-health sessions, Sentry's default.

Logfire: ``logfire.configure(local=True, ...)``, a configuration of its own per sampling
decision; ``local`` sets no global tracer, meter or logger provider (a global tracer provider
would also turn on FastAPI's own telemetry for every variant). ``distributed_tracing=True``
leaves the global propagator as it is: the default wraps it to warn about incoming trace
context, and OpenTelemetry's middleware extracts through it. What Logfire still changes for
the whole process: importing it replaces ``os._exit`` with one that flushes its exporters
(pydantic imports it as a plugin once it is installed, so every process of its venv has it;
see ``instructions.py``), and configuring it wraps ``ThreadPoolExecutor.submit`` to carry the
context, which no variant calls on a request. That is why it is in the ``bench`` extra, which
``make bench`` installs in a venv of its own (``.venv-bench``), not in the one tests run in.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import sentry_sdk
from sentry_sdk.envelope import Envelope
from sentry_sdk.transport import HttpTransport

from benchmarks._common import EncodingExporter, deferred_processor

if TYPE_CHECKING:
    from logfire import Logfire
    from sentry_sdk.consts import EndpointType

# Nothing listens there; the transport below never sends.
SENTRY_DSN = "https://public@127.0.0.1:9/1"


class HoldingTransport(HttpTransport):
    """Sentry's HTTP transport with the network left out, holding envelopes until flushed.

    Sentry's worker thread prepares each envelope (rate limits, client report, JSON, gzip -9
    without brotli) and POSTs it. Here the same preparation runs when the client is flushed,
    between rounds like every exporter of the benchmarks, and the body is dropped. ``sent``
    counts the items prepared, by type (``transaction``, ``sessions``, ``client_report``).
    """

    def __init__(self, options: dict[str, Any]) -> None:
        super().__init__(options)
        self.held: list[Envelope] = []
        self.sent: Counter[str] = Counter()

    def capture_envelope(self, envelope: Envelope) -> None:
        self.held.append(envelope)

    def flush(self, timeout: float, callback: Any = None) -> None:
        self._flush_client_reports(force=True)  # as HttpTransport.flush
        held, self.held = self.held, []
        for envelope in held:  # as HttpTransport's worker, for each envelope
            self._send_envelope(envelope)
            self._flush_client_reports()

    def _send_request(
        self,
        body: bytes,
        headers: dict[str, str],
        endpoint_type: EndpointType,
        envelope: Envelope | None = None,
    ) -> None:
        self._update_headers(headers)  # the auth header, the last step before the POST
        for item in envelope.items if envelope is not None else ():
            self.sent[item.type or "?"] += 1


class SentryPeer:
    """One Sentry client, the process's client only while ``bound`` runs."""

    def __init__(self, traces_sample_rate: float) -> None:
        self.client = sentry_sdk.Client(
            dsn=SENTRY_DSN,
            traces_sample_rate=traces_sample_rate,
            default_integrations=False,
            auto_enabling_integrations=False,
            transport=HoldingTransport,
            release="bench",
        )

    @property
    def transport(self) -> HoldingTransport:
        transport = self.client.transport
        assert isinstance(transport, HoldingTransport)
        return transport

    def bound(self, run: Callable[[int], float]) -> Callable[[int], float]:
        """``run`` with this client installed as ``sentry_sdk.init`` would, and removed after."""

        def run_with_client(n: int) -> float:
            scope = sentry_sdk.get_global_scope()
            scope.set_client(self.client)
            try:
                return run(n)
            finally:
                scope.set_client(None)

        return run_with_client

    def flush(self) -> None:
        self.client.flush(timeout=30)


class LogfirePeer:
    """A local Logfire configuration exporting through the peers' encoding sink."""

    def __init__(self, head: float) -> None:
        import logfire

        self.exporter = EncodingExporter()
        self.logfire: Logfire = logfire.configure(
            local=True,
            send_to_logfire=False,
            console=False,
            additional_span_processors=[deferred_processor(self.exporter)],
            sampling=logfire.SamplingOptions(head=head),
            distributed_tracing=True,
        )

    def flush(self) -> None:
        self.logfire.force_flush(timeout_millis=30_000)


def print_counts(
    sentry: tuple[SentryPeer, SentryPeer], logfire: tuple[LogfirePeer | None, LogfirePeer | None]
) -> None:
    """What the peers sent, traced and not sampled (the second of each pair): the check that
    their sampling held (one per request traced, none dropped)."""
    print(
        f"sentry transactions sent: traced {sentry[0].transport.sent['transaction']}, not "
        f"sampled {sentry[1].transport.sent['transaction']}"
    )
    traced, dropping = logfire
    if traced is not None and dropping is not None:
        dropping.flush()
        print(
            f"logfire spans exported: traced {traced.exporter.spans}, not sampled "
            f"{dropping.exporter.spans}"
        )
