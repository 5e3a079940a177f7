"""Bad configuration and what doctor checks: typed errors, secrets never shown, deadlines."""

from __future__ import annotations

import http.server
import io
import re
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from langfuse_mw import ConfigError
from langfuse_mw.asgi import LangfuseMiddleware
from langfuse_mw.config import resolve_settings
from langfuse_mw.devserver import DevServer
from langfuse_mw.doctor import run

from .servers import local_receiver

PK, SK = "pk-lf-review", "sk-lf-review-secret-0123456789"


@pytest.fixture
def receiver() -> Iterator[DevServer]:
    yield from local_receiver(PK, SK)


def _serve(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _Quiet(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        return None


class LoginPage(_Quiet):
    """What a proxy or an SSO gateway in front of the wrong host answers: a 200 HTML page."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body = b"<!doctype html><html><body>Sign in</body></html>"
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Trickle(_Quiet):
    """Answers one byte every 0.3 s: every read succeeds, so no per-read timeout fires."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        try:
            for byte in b"HTTP/1.1 200 OK\r\nx-slow: " + b"a" * 200:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.3)
        except OSError:
            pass


@pytest.fixture
def login_page_url() -> Iterator[str]:
    yield from _serve(LoginPage)


@pytest.fixture
def trickle_url() -> Iterator[str]:
    yield from _serve(Trickle)


def _doctor(options: dict[str, object]) -> tuple[int, str]:
    out = io.StringIO()
    code = run(out, options)
    return code, out.getvalue()


# -- doctor ----------------------------------------------------------------------------------


def test_doctor_passes_against_the_local_receiver(receiver: DevServer) -> None:
    code, text = _doctor({"base_url": receiver.url, "public_key": PK, "secret_key": SK})
    assert code == 0, text
    assert "OK: " in text


def test_doctor_fails_when_a_200_html_page_answers(login_page_url: str) -> None:
    code, text = _doctor({"base_url": login_page_url, "public_key": PK, "secret_key": SK})
    assert code == 1
    assert "FAIL: " in text and "not Langfuse" in text
    assert "accepted the credentials" not in text


def test_doctor_has_a_deadline_when_the_endpoint_trickles(trickle_url: str) -> None:
    started = time.monotonic()
    code, text = _doctor(
        {"base_url": trickle_url, "public_key": PK, "secret_key": SK, "export_timeout": 1}
    )
    elapsed = time.monotonic() - started
    assert code == 1
    assert "no answer within 1" in text
    assert elapsed < 3, f"doctor waited {elapsed:.1f}s with export_timeout=1"


def test_doctor_has_a_deadline_when_the_endpoint_hangs() -> None:
    with socket.socket() as sock:  # accepts connections (backlog) and never answers
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        started = time.monotonic()
        code, text = _doctor({"base_url": url, "public_key": PK, "secret_key": SK,
                              "export_timeout": 0.5})  # fmt: skip
        assert code == 1 and "FAIL: " in text
        assert time.monotonic() - started < 2.5


def test_doctor_masks_a_short_secret_that_has_no_langfuse_prefix() -> None:
    # It used to show "hunter…ss": 8 of the 11 characters.
    _, text = _doctor({"secret_key": "hunter2pass"})
    assert "hunter" not in text and "2pass" not in text
    assert "(11 chars)" in text
    _, text = _doctor({"secret_key": "sk-lf-dev"})  # the devserver's: only 'dev' is secret
    assert "dev (" not in text and "ev (" not in text
    assert "sk-lf-… (9 chars)" in text


@pytest.mark.parametrize(
    ("queue_url", "kept"),
    [
        ("redis://:hunter2-redis@redis.internal:6379/0", "redis.internal:6379/0"),
        ("unix:///run/redis.sock?db=0&password=hunter2-redis", "/run/redis.sock?db=0"),
    ],
)
def test_doctor_does_not_print_the_redis_password(queue_url: str, kept: str) -> None:
    out = io.StringIO()
    assert run(out, {"queue_url": queue_url}, check=False) == 0
    text = out.getvalue()
    assert "hunter2-redis" not in text
    assert kept in text


def test_doctor_cli_exits_2_on_a_malformed_port(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from langfuse_mw.cli import main

    monkeypatch.setenv("LANGFUSE_BASE_URL", "http://127.0.0.1:abc")
    monkeypatch.setenv("LANGFUSE_PUBLIC_KEY", PK)
    monkeypatch.setenv("LANGFUSE_SECRET_KEY", SK)
    assert main(["doctor"]) == 2
    assert "base_url" in capsys.readouterr().err


# -- secrets in reprs and errors --------------------------------------------------------------


def test_settings_repr_hides_the_secret_key_and_redis_password() -> None:
    settings = resolve_settings(
        {"secret_key": SK, "queue_url": "rediss://user:hunter2-redis@redis.internal/0"},
        environ={},
    )
    text = repr(settings)
    assert SK not in text and "review-secret" not in text
    assert "hunter2-redis" not in text
    assert "redis.internal" in text  # still useful for debugging


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("base_url", "ftp://user:hunter2-pw@langfuse.internal"),
        ("base_url", "https//user:hunter2-pw@langfuse.internal"),
        ("queue_url", "redis//:hunter2-pw@redis.internal/0"),
        ("queue_url", "http://:hunter2-pw@redis.internal/0"),
    ],
)
def test_config_errors_never_echo_a_password_in_a_url(option: str, value: str) -> None:
    with pytest.raises(ConfigError, match=option) as info:
        resolve_settings({option: value}, environ={})
    assert "hunter2-pw" not in str(info.value)


# -- base_url --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:abc",
        "https://cloud.langfuse.com:99999",
        "https://cloud langfuse.com",
        "https://cloud.langfuse.com?project=x",
        "https://cloud.langfuse.com#settings",
        "https://cloud.langfuse.com/api/public/otel",
        "https://cloud.langfuse.com/api/public/otel/v1/traces",
    ],
)
def test_malformed_base_url_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match="base_url"):
        resolve_settings({"base_url": url}, environ={})


def test_base_url_under_a_path_prefix_is_kept() -> None:
    settings = resolve_settings({"base_url": "https://tools.example.com/langfuse/"}, environ={})
    assert settings.base_url == "https://tools.example.com/langfuse"


# -- LANGFUSE_TRACING_ENABLED ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "enabled"),
    [("false", False), (" FALSE ", False), ("0", True), ("no", True), ("disabled", True)],
)
def test_langfuse_tracing_enabled_is_read_as_the_sdk_reads_it(raw: str, enabled: bool) -> None:
    # The SDK turns itself off for "false" only: we follow, so requests are traced exactly
    # when the handler's generations are.
    settings = resolve_settings({}, environ={"LANGFUSE_TRACING_ENABLED": raw})
    assert settings.enabled is enabled
    assert settings.sources["enabled"] == "env:LANGFUSE_TRACING_ENABLED"


def test_langfuse_mw_enabled_beats_the_sdk_variable_as_documented() -> None:
    # docs: explicit argument > LANGFUSE_MW_<OPTION> > the Langfuse SDK's own variable.
    settings = resolve_settings(
        {}, environ={"LANGFUSE_MW_ENABLED": "true", "LANGFUSE_TRACING_ENABLED": "false"}
    )
    assert settings.enabled is True
    assert settings.sources["enabled"] == "env:LANGFUSE_MW_ENABLED"


# -- regexes and route templates -------------------------------------------------------------


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ({"re:/search/(unclosed": 0.5}, "sample_rules: 're:/search/(unclosed' is not a valid"),
        ("re:/a(b=0.5", "sample_rules: 're:/a(b' is not a valid"),
        ({"/items/{item_id": 0.5}, "sample_rules: '/items/{item_id' is not a valid"),
        ({"/items/<int:item_id": 0.5}, "sample_rules: '/items/<int:item_id' is not a valid"),
    ],
)
def test_bad_sample_rules_are_a_config_error(rules: object, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_settings({"sample_rules": rules}, environ={})


def test_bad_sample_rule_regex_does_not_escape_as_re_error_from_the_middleware() -> None:
    async def app(scope: object, receive: object, send: object) -> None:
        return None

    with pytest.raises(ConfigError, match="sample_rules"):
        LangfuseMiddleware(app, sample_rules={"re:(x": 0.5})


@pytest.mark.parametrize(
    "patterns",
    [["(?i)/admin"], ["/a", "(?i)/admin"], ["(?P<id>/a)", "(?P<id>/b)"]],
)
def test_exclude_paths_that_cannot_be_combined_are_a_config_error(patterns: list[str]) -> None:
    with pytest.raises(ConfigError, match="exclude_paths"):
        resolve_settings({"exclude_paths": patterns}, environ={})

    async def app(scope: object, receive: object, send: object) -> None:
        return None

    with pytest.raises(ConfigError, match="exclude_paths"):
        LangfuseMiddleware(app, exclude_paths=patterns)


def test_scoped_inline_flags_in_exclude_paths_work() -> None:
    settings = resolve_settings({"exclude_paths": ["/a", "(?i:/admin)"]}, environ={})
    assert settings.exclude_paths == ("/a", "(?i:/admin)")


# -- numbers and types -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["max_batch_size", "max_queue_size", "spool_max_bytes"])
def test_a_fractional_size_is_refused_not_truncated(name: str) -> None:
    with pytest.raises(ConfigError, match=f"{name}: expected an int"):
        resolve_settings({name: 1.5}, environ={})
    assert getattr(resolve_settings({name: 2.0}, environ={}), name) == 2


@pytest.mark.parametrize(
    "name", ["request_id_header", "user_id_header", "session_id_header", "queue_stream"]
)
def test_none_for_a_name_option_is_refused_not_turned_into_the_text_none(name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        resolve_settings({name: None}, environ={})


def test_exclude_methods_must_be_http_methods() -> None:
    with pytest.raises(ConfigError, match="exclude_methods: 'G ET'"):
        resolve_settings({"exclude_methods": ["G ET"]}, environ={})
    assert resolve_settings({"exclude_methods": "options, head"}, environ={}).exclude_methods == {
        "OPTIONS",
        "HEAD",
    }
