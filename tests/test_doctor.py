"""langfuse-mw doctor: configuration with sources (secret masked) and a live credential check."""

from __future__ import annotations

import base64
import http.server
import io
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from langfuse_mw.doctor import run


class FakeLangfuse(http.server.BaseHTTPRequestHandler):
    """Answers the OTLP route like Langfuse: 200 {} for the right Basic auth, else 401."""

    expected = "Basic " + base64.b64encode(b"pk-lf-good:sk-lf-good-secret").decode()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        ok = self.path == "/api/public/otel/v1/traces" and (
            self.headers.get("authorization") == self.expected
        )
        body = b"{}" if ok else b'{"message":"Invalid credentials."}'
        self.send_response(200 if ok else 401)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def langfuse_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeLangfuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_doctor_prints_sources_masks_the_secret_and_passes(
    langfuse_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LANGFUSE_PUBLIC_KEY", "pk-lf-good")
    monkeypatch.setenv("LANGFUSE_SECRET_KEY", "sk-lf-good-secret")
    monkeypatch.setenv("LANGFUSE_MW_ENV", "production")
    out = io.StringIO()
    assert run(out, {"base_url": langfuse_url}) == 0
    text = out.getvalue()
    assert "sk-lf-good-secret" not in text
    assert "sk-lf-…et (17 chars)  [env:LANGFUSE_SECRET_KEY]" in text
    assert "base_url" in text and "[argument]" in text
    assert "sample_rate" in text and "0.1  [preset:production]" in text
    assert "OK: " in text and "accepted the credentials (HTTP 200)" in text


def test_doctor_fails_on_wrong_keys_and_names_the_public_key(langfuse_url: str) -> None:
    out = io.StringIO()
    options = {"base_url": langfuse_url, "public_key": "pk-lf-bad", "secret_key": "sk-lf-nope-x"}
    assert run(out, options) == 1
    text = out.getvalue()
    assert "FAIL: " in text and "refused the credentials (HTTP 401)" in text
    assert "pk-lf-bad" in text and "sk-lf-nope-x" not in text


def test_doctor_reports_an_unreachable_host() -> None:
    out = io.StringIO()
    options = {"base_url": "http://127.0.0.1:9", "public_key": "pk", "secret_key": "sk"}
    assert run(out, options) == 1
    assert "unreachable" in out.getvalue()


def test_the_cli_runs_doctor(
    langfuse_url: str, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from langfuse_mw.cli import main

    monkeypatch.setenv("LANGFUSE_BASE_URL", langfuse_url)
    monkeypatch.setenv("LANGFUSE_PUBLIC_KEY", "pk-lf-good")
    monkeypatch.setenv("LANGFUSE_SECRET_KEY", "sk-lf-good-secret")
    assert main(["doctor"]) == 0
    assert "OK: " in capsys.readouterr().out
    monkeypatch.setenv("LANGFUSE_MW_SAMPLE_RATE", "2")
    assert main(["doctor"]) == 2
    assert "sample_rate: expected a finite float between 0.0 and 1.0" in capsys.readouterr().err


def test_doctor_says_when_tracing_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    # The SDK's switch turns tracing off: an OK for the endpoint must not read as "traced".
    monkeypatch.setenv("LANGFUSE_TRACING_ENABLED", "false")
    out = io.StringIO()
    run(out, {"public_key": "pk-lf-1", "secret_key": "sk-lf-1"}, check=False)
    assert "NOTE: tracing is off (enabled=false, env:LANGFUSE_TRACING_ENABLED)" in out.getvalue()
