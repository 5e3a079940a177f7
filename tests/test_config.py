"""Settings: precedence, parsing, and errors that name the option."""

from __future__ import annotations

import re

import pytest

from langfuse_mw import ConfigError, init
from langfuse_mw.config import resolve_settings


def test_defaults_need_nothing() -> None:
    settings = resolve_settings({}, environ={})
    assert settings.base_url == "https://cloud.langfuse.com"
    assert settings.request_id_header == "x-request-id"
    assert settings.exclude_methods == frozenset({"OPTIONS"})
    assert settings.shutdown_timeout == 2.0
    assert settings.sources["base_url"] == "default"


def test_argument_beats_mw_env_beats_langfuse_env() -> None:
    environ = {
        "LANGFUSE_HOST": "http://from-langfuse-host:3000",
        "LANGFUSE_MW_BASE_URL": "http://from-mw-env:3000/",
        "LANGFUSE_PUBLIC_KEY": "pk-env",
        "LANGFUSE_MW_FLUSH_INTERVAL": "0.5",
    }
    settings = resolve_settings({"public_key": "pk-arg"}, environ=environ)
    assert settings.public_key == "pk-arg"
    assert settings.sources["public_key"] == "argument"
    assert settings.base_url == "http://from-mw-env:3000"  # trailing slash dropped
    assert settings.sources["base_url"] == "env:LANGFUSE_MW_BASE_URL"
    assert settings.flush_interval == 0.5
    del environ["LANGFUSE_MW_BASE_URL"]
    assert resolve_settings({}, environ=environ).base_url == "http://from-langfuse-host:3000"
    environ["LANGFUSE_BASE_URL"] = "https://base-url.example"
    # LANGFUSE_BASE_URL is the SDK's preferred name, LANGFUSE_HOST its legacy one.
    assert resolve_settings({}, environ=environ).base_url == "https://base-url.example"


def test_env_lists_and_booleans() -> None:
    settings = resolve_settings(
        {},
        environ={
            "LANGFUSE_MW_EXCLUDE_PATHS": "/health, /metrics/.*",
            "LANGFUSE_MW_EXCLUDE_METHODS": "options,head",
            "LANGFUSE_MW_CAPTURE_CLIENT_IP": "yes",
            "LANGFUSE_MW_USER_ID_HEADER": "X-Auth-User",
        },
    )
    assert settings.exclude_paths == ("/health", "/metrics/.*")
    assert settings.exclude_methods == frozenset({"OPTIONS", "HEAD"})
    assert settings.capture_client_ip is True
    assert settings.user_id_header == "x-auth-user"


def test_langfuse_tracing_enabled_false_turns_us_off() -> None:
    assert resolve_settings({}, environ={"LANGFUSE_TRACING_ENABLED": "false"}).enabled is False
    assert resolve_settings(
        {"enabled": True}, environ={"LANGFUSE_TRACING_ENABLED": "false"}
    ).enabled


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"base_url": "cloud.langfuse.com"}, "base_url: expected an http(s) URL"),
        ({"base_url": "https://pk:sk-secret@cloud.langfuse.com"}, "base_url: credentials in"),
        ({"environment": "Production!"}, "environment: 'Production!' is not allowed"),
        ({"environment": "langfuse-prod"}, "not starting with 'langfuse'"),
        ({"flush_interval": "soon"}, "flush_interval: expected a float"),
        ({"max_queue_size": 0}, "max_queue_size: expected a finite int >= 1"),
        ({"max_queue_size": "1e400"}, "max_queue_size: expected an int"),
        # NaN passes every comparison; an infinite deadline is none.
        ({"flush_interval": "nan"}, "flush_interval: expected a finite float between 0.01"),
        ({"shutdown_timeout": float("inf")}, "shutdown_timeout: expected a finite float"),
        ({"export_timeout": 7200}, "export_timeout: expected a finite float between 0.01 and 3600"),
        ({"sample_rate": "nan"}, "sample_rate: expected a finite float between 0.0 and 1.0"),
        ({"slow_threshold": "inf"}, "slow_threshold: expected a finite float >= 0.0"),
        ({"sample_rules": {"/a": float("nan")}}, "sample_rules: expected a finite float"),
        ({"max_queue_size": True}, "max_queue_size"),
        ({"compression": "br"}, "compression: expected 'gzip' or 'none'"),
        (
            {"exclude_paths": ["/ok", "(unclosed"]},
            "exclude_paths: '(unclosed' is not a valid regex",
        ),
        ({"level_4xx": "LOUD"}, "level_4xx: expected one of DEBUG, DEFAULT, WARNING, ERROR"),
        ({"request_id_header": "bad header"}, "request_id_header: 'bad header' is not a valid"),
        ({"user_id_from": "not callable"}, "user_id_from: expected a callable"),
        ({"enabled": "maybe"}, "enabled: expected a boolean"),
    ],
)
def test_invalid_values_raise_config_error_naming_the_option(
    options: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        resolve_settings(options, environ={})
    assert isinstance(info.value, ValueError)


def test_invalid_env_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"from \$LANGFUSE_MW_SHUTDOWN_TIMEOUT"):
        resolve_settings({}, environ={"LANGFUSE_MW_SHUTDOWN_TIMEOUT": "-1"})


def test_unknown_option_suggests_the_right_name() -> None:
    with pytest.raises(
        TypeError, match="unknown option 'exclude_path' \\(did you mean 'exclude_paths'"
    ):
        resolve_settings({"exclude_path": ["/x"]}, environ={})


def test_init_rejects_bad_options_at_start_up() -> None:
    with pytest.raises(ConfigError, match="export_timeout"):
        init(export_timeout="never")


def test_settings_are_frozen() -> None:
    settings = resolve_settings({}, environ={})
    with pytest.raises(AttributeError):
        settings.base_url = "http://x"  # type: ignore[misc]
