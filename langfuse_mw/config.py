"""One frozen settings object, resolved once: explicit argument > environment variable > default."""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from .core import RequestInfo

__all__ = ["ConfigError", "Settings", "mask_secret", "redact_url", "resolve_settings"]

Level = Literal["DEBUG", "DEFAULT", "WARNING", "ERROR"]
_LEVELS = ("DEBUG", "DEFAULT", "WARNING", "ERROR")
_ENVIRONMENT = re.compile(r"(?!langfuse)[a-z0-9_-]{1,40}")
# Upper bound of the durations (flush interval, timeouts): longer is a typo, not a deadline.
MAX_SECONDS = 3600.0
# HTTP field names are RFC 9110 tokens; we compare them lower-cased.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")
# Methods are tokens too, compared upper-cased.
_METHOD = re.compile(r"[!#$%&'*+.^_`|~0-9A-Z-]+")
# Route parameters in sample_rules templates, as sampling.py reads them; a brace or angle
# bracket left over is a typo that would silently never match.
_ROUTE_PARAM = re.compile(r"\{[^}:]+:path\}|\{[^}]+\}|<path:[^>]+>|<[^>]+>")

# Paths no preset traces: probes, metrics, API docs, static files.
DEFAULT_EXCLUDE_PATHS = (
    "/health(z|check)?", "/ready(z)?", "/live(z)?", "/ping", "/metrics",
    "/docs(/.*)?", "/redoc", "/openapi.json", "/static/.*", "/favicon.ico",
)  # fmt: skip

# Environment presets (docs/environments.md). Selected by the `preset` option or
# LANGFUSE_MW_ENV, else LANGFUSE_TRACING_ENVIRONMENT when it names one, else development.
PRESETS: dict[str, dict[str, Any]] = {
    "development": {
        "flush_interval": 0.5, "max_batch_size": 128, "sample_rate": 1.0,
        "exclude_paths": DEFAULT_EXCLUDE_PATHS, "log_level": "INFO",
    },
    "staging": {
        "flush_interval": 1.0, "max_batch_size": 256, "sample_rate": 0.5,
        "exclude_paths": DEFAULT_EXCLUDE_PATHS, "log_level": "INFO",
    },
    "production": {
        "flush_interval": 2.0, "max_batch_size": 512, "sample_rate": 0.1,
        "exclude_paths": DEFAULT_EXCLUDE_PATHS, "log_level": "WARNING",
    },
}  # fmt: skip
_PRESET_ALIASES = {
    "dev": "development", "local": "development", "test": "development",
    "stage": "staging", "stg": "staging", "prod": "production",
}  # fmt: skip

DEFAULT_REDACT_QUERY_KEYS = (
    "token", "key", "secret", "password", "passwd", "pwd", "auth", "sig",
    "session", "code", "credential", "jwt",
)  # fmt: skip


class ConfigError(ValueError):
    """An option has a value that is not allowed; the message names the option."""


def mask_secret(secret: str) -> str:
    """The secret key as it may be shown: Langfuse's public ``sk-lf-`` prefix, the last two
    characters of a long key, and the length; never enough of a short key to guess it."""
    prefix = "sk-lf-" if secret.startswith("sk-lf-") else ""
    rest = secret[len(prefix) :]
    tail = rest[-2:] if len(rest) >= 10 else ""
    shown = f"{prefix}…{tail}" if prefix or tail else "********"
    return f"{shown} ({len(secret)} chars)"


def redact_url(url: str) -> str:
    """``url`` with anything before its last ``@`` (user and password) and the value of a
    ``password=`` parameter (redis-py reads one) replaced by ``***``.

    Works on malformed URLs too (``redis//:pw@host``), since those are what errors echo.
    """
    url = _PASSWORD_PARAM.sub(r"\1***", url)
    before, at, after = url.rpartition("@")
    if not at:
        return url
    scheme, slashes, _ = before.partition("//")
    return f"{scheme}{slashes}***@{after}" if slashes else f"***@{after}"


_PASSWORD_PARAM = re.compile(r"(?i)([?&;]password=)[^&;#]*")


@dataclass(frozen=True, slots=True)
class Settings:
    """Every option of langfuse_mw, resolved once at start-up (see docs/configuration.md)."""

    # Connection and runtime (one per process).
    preset: str = "development"
    public_key: str | None = None
    secret_key: str | None = None
    base_url: str = "https://cloud.langfuse.com"
    environment: str | None = None
    release: str | None = None
    enabled: bool = True
    flush_interval: float = 1.0
    max_batch_size: int = 512
    max_queue_size: int = 8192
    export_timeout: float = 5.0
    shutdown_timeout: float = 2.0
    compression: Literal["gzip", "none"] = "gzip"
    tracer_provider: Any = None
    max_queue_bytes: int = 64 * 1024 * 1024
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"
    # Durable export (docs/enterprise.md): a Redis stream drained by `langfuse-mw forward`,
    # or a local spool directory for batches Langfuse could not take.
    queue_url: str | None = None
    queue_stream: str = "langfuse-mw:spans"
    queue_maxlen: int = 10_000
    spool_dir: str | None = None
    spool_max_bytes: int = 256 * 1024 * 1024

    # Per request.
    request_id_header: str = "x-request-id"
    user_id_header: str = "x-user-id"
    session_id_header: str = "x-session-id"
    echo_request_id: bool = True
    request_id_validator: Callable[[str], bool] | None = None
    user_id_from: Callable[[RequestInfo], str | None] | None = None
    session_id_from: Callable[[RequestInfo], str | None] | None = None
    exclude_paths: tuple[str, ...] = ()
    exclude_methods: frozenset[str] = frozenset({"OPTIONS"})
    redact_query_keys: tuple[str, ...] = DEFAULT_REDACT_QUERY_KEYS
    capture_client_ip: bool = False
    level_4xx: Level = "WARNING"
    trust_incoming: Literal["continue", "link", "ignore"] = "continue"
    trusted_networks: tuple[str, ...] = ()
    propagate_to: tuple[str, ...] = ("internal",)
    sample_rate: float = 1.0
    sample_rules: tuple[tuple[str, float], ...] = ()
    slow_threshold: float = 5.0
    health_path: str | None = None

    # Where each value came from ("argument", "env:NAME", "default"); for `doctor` and logs.
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __repr__(self) -> str:
        # Settings end up in log lines, tracebacks with locals and error trackers: never the
        # secret key or a Redis password.
        shown = []
        for option in dataclasses.fields(self):
            if not option.repr:
                continue
            value = getattr(self, option.name)
            if option.name == "secret_key" and value is not None:
                value = mask_secret(value)
            elif option.name == "queue_url" and value is not None:
                value = redact_url(value)
            shown.append(f"{option.name}={value!r}")
        return f"Settings({', '.join(shown)})"

    def runtime_key(self) -> tuple[Any, ...]:
        """Return the options that shape the process-wide runtime (not per-request behaviour)."""
        return tuple(getattr(self, name) for name in RUNTIME_OPTIONS)


RUNTIME_OPTIONS = (
    "public_key", "secret_key", "base_url", "environment", "release", "enabled",
    "flush_interval", "max_batch_size", "max_queue_size", "export_timeout",
    "shutdown_timeout", "compression", "tracer_provider", "max_queue_bytes", "log_level",
    "queue_url", "queue_stream", "queue_maxlen", "spool_dir", "spool_max_bytes",
)  # fmt: skip

_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(Settings) if f.name != "sources")
_CALLABLE_OPTIONS = ("request_id_validator", "user_id_from", "session_id_from", "tracer_provider")
# Options that also read the Langfuse SDK's own variables, so one set of env vars serves both.
_SDK_ENV = {
    "public_key": ("LANGFUSE_PUBLIC_KEY",),
    "secret_key": ("LANGFUSE_SECRET_KEY",),
    "base_url": ("LANGFUSE_BASE_URL", "LANGFUSE_HOST"),
    "environment": ("LANGFUSE_TRACING_ENVIRONMENT",),
    "release": ("LANGFUSE_RELEASE",),
    # The SDK's switch turns us off too, so one variable disables all tracing; like every
    # SDK variable it comes after ours (LANGFUSE_MW_ENABLED=true wins), and it is read as the
    # SDK reads it (_SDK_SWITCH).
    "enabled": ("LANGFUSE_TRACING_ENABLED",),
}


_SDK_SWITCH = "LANGFUSE_TRACING_ENABLED"


def _env_names(name: str) -> tuple[str, ...]:
    if name == "preset":
        return ("LANGFUSE_MW_ENV",)
    return (f"LANGFUSE_MW_{name.upper()}", *_SDK_ENV.get(name, ()))


def _parse_bool(name: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}: expected a boolean (true/false/1/0/yes/no/on/off), got {raw!r}")


def _parse_number(
    name: str, raw: Any, kind: type[int] | type[float], minimum: float,
    maximum: float = math.inf,
) -> Any:  # fmt: skip
    article = "an" if kind is int else "a"
    try:
        value = kind(raw)
        # int(1.5) is 1: a fractional size is a mistake, not a request to round down.
        if kind is int and isinstance(raw, float) and value != raw:
            raise ValueError(raw)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{name}: expected {article} {kind.__name__}, got {raw!r}") from None
    # NaN passes every comparison (an export thread waiting NaN seconds spins), and an
    # infinite deadline is none.
    finite = kind is int or math.isfinite(value)
    if isinstance(raw, bool) or not finite or not minimum <= value <= maximum:
        bound = f"between {minimum} and {maximum}" if maximum < math.inf else f">= {minimum}"
        raise ConfigError(f"{name}: expected a finite {kind.__name__} {bound}, got {raw!r}")
    return value


def _parse_list(name: str, raw: Any) -> tuple[str, ...]:
    if isinstance(raw, str):
        items: Iterable[Any] = (part.strip() for part in raw.split(","))
    elif isinstance(raw, Iterable):
        items = raw
    else:
        raise ConfigError(f"{name}: expected a list of strings or a comma-separated string")
    out = tuple(item for item in items if item != "")
    if not all(isinstance(item, str) for item in out):
        raise ConfigError(f"{name}: expected strings only, got {raw!r}")
    return out


def _parse_header(name: str, raw: Any) -> str:
    if not isinstance(raw, str):  # str(None) would be the header "none"
        raise ConfigError(f"{name}: expected a header name, got {raw!r}")
    value = raw.strip().lower()
    if not _HEADER_NAME.fullmatch(value):
        raise ConfigError(f"{name}: {raw!r} is not a valid HTTP header name")
    return value


def _parse_optional_text(name: str, raw: Any) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise ConfigError(f"{name}: expected a string, got {type(raw).__name__}")
    return raw.strip() or None


def _parse_rules(raw: Any) -> tuple[tuple[str, float], ...]:
    # {"/search/{q}": 0.01} or "/search/{q}=0.01,/checkout=1"
    if isinstance(raw, str):
        pairs = []
        for item in _parse_list("sample_rules", raw):
            route, sep, rate = item.rpartition("=")
            if not sep:
                raise ConfigError(f"sample_rules: expected route=rate, got {item!r}")
            pairs.append((route.strip(), rate.strip()))
    elif isinstance(raw, Mapping):
        pairs = list(raw.items())
    else:
        raise ConfigError("sample_rules: expected a mapping of route template to rate")
    rules = []
    for route, rate in pairs:
        value = _parse_number("sample_rules", rate, float, 0.0)
        if not isinstance(route, str) or not route.startswith(("/", "re:")) or value > 1:
            raise ConfigError(
                f"sample_rules: expected a route template (or re:regex) and a rate in [0, 1], "
                f"got {route!r}: {rate!r}"
            )
        _check_route(route)
        rules.append((route, float(value)))
    return tuple(rules)


def _check_route(route: str) -> None:
    # The sampler compiles these when the middleware is built: a bad one must fail here, as a
    # ConfigError naming the option, not later as re.error (or never match at all).
    if route.startswith("re:"):
        try:
            re.compile(route[3:])
        except re.error as exc:
            raise ConfigError(f"sample_rules: {route!r} is not a valid regex ({exc})") from None
    elif any(c in _ROUTE_PARAM.sub("", route) for c in "{}<>"):
        raise ConfigError(
            f"sample_rules: {route!r} is not a valid route template (unbalanced {{}} or <>; "
            "parameters are written {name}, {name:int}, <int:name> or {rest:path})"
        )


def _parse_exclude_paths(raw: Any) -> tuple[str, ...]:
    patterns = _parse_list("exclude_paths", raw)
    # The core matches all patterns as one regex, each wrapped in (?:...): a pattern valid on
    # its own can fail there (global flags such as (?i) not at the start, a group name used
    # twice) and would raise re.error when the middleware is built.
    for pattern in patterns:
        try:
            re.compile(f"(?:{pattern})")
        except re.error as exc:
            hint = "; use a scoped flag such as (?i:...)" if "global flags" in str(exc) else ""
            raise ConfigError(
                f"exclude_paths: {pattern!r} is not a valid regex ({exc}){hint}"
            ) from None
    try:
        re.compile("|".join(f"(?:{pattern})" for pattern in patterns))
    except re.error as exc:
        raise ConfigError(
            f"exclude_paths: the patterns cannot be combined into one regex ({exc})"
        ) from None
    return patterns


def _parse_base_url(raw: Any) -> str:
    if not isinstance(raw, str):
        raise ConfigError(f"base_url: expected an http(s) URL, got {type(raw).__name__}")
    # Errors show the URL without its user and password (a URL with credentials is refused).
    shown = redact_url(raw)
    url = raw.strip().rstrip("/")
    parts = urlsplit(url)
    if "@" in parts.netloc:
        # Never echoed: it would put a password in the error and in every export log line.
        raise ConfigError(
            "base_url: credentials in the URL are not used; give the keys as public_key "
            "and secret_key (LANGFUSE_PUBLIC_KEY, LANGFUSE_SECRET_KEY)"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"base_url: expected an http(s) URL such as https://cloud.langfuse.com, got {shown!r}"
        )
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not 0-65535
    except ValueError:
        raise ConfigError(f"base_url: {shown!r} has an invalid port") from None
    # The OTLP path is appended to the URL: a query or fragment would end up in front of it,
    # and whitespace would only fail at the first export.
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise ConfigError(f"base_url: {shown!r} must not have a query or fragment")
    if any(c.isspace() or not c.isprintable() for c in url):
        raise ConfigError(f"base_url: {shown!r} contains whitespace or control characters")
    if "/api/public" in parts.path:
        raise ConfigError(
            f"base_url: {shown!r} is an API path; give Langfuse's base URL "
            "(such as https://cloud.langfuse.com), the OTLP path is added to it"
        )
    return url


def _parse(name: str, raw: Any) -> Any:
    """Turn an argument or an env var string into the option's type, or raise ConfigError."""
    if name in ("public_key", "secret_key", "release"):
        return _parse_optional_text(name, raw)
    if name == "base_url":
        return _parse_base_url(raw)
    if name == "environment":
        env = _parse_optional_text(name, raw)
        if env is not None and not _ENVIRONMENT.fullmatch(env):
            raise ConfigError(
                f"environment: {raw!r} is not allowed; Langfuse accepts 1-40 characters of "
                "[a-z0-9_-] not starting with 'langfuse'"
            )
        return env
    if name in ("enabled", "echo_request_id", "capture_client_ip"):
        return _parse_bool(name, raw)
    if name in ("flush_interval", "export_timeout", "shutdown_timeout"):
        return float(_parse_number(name, raw, float, 0.01, MAX_SECONDS))
    if name in (
        "max_batch_size", "max_queue_size", "max_queue_bytes", "queue_maxlen", "spool_max_bytes"
    ):  # fmt: skip
        return _parse_number(name, raw, int, 1)
    if name == "queue_url":
        queue_url = _parse_optional_text(name, raw)
        parts = urlsplit(queue_url or "")
        if queue_url is not None and not (
            parts.scheme == "unix" or (parts.scheme in ("redis", "rediss") and parts.hostname)
        ):
            raise ConfigError(
                "queue_url: expected a Redis URL such as redis://host:6379/0 "
                f"(redis://, rediss:// or unix://), got {redact_url(queue_url)!r}"
            )
        return queue_url
    if name == "queue_stream":
        stream = raw.strip() if isinstance(raw, str) else ""
        if not stream or len(stream) > 200 or not stream.isprintable() or " " in stream:
            raise ConfigError(
                f"queue_stream: expected a Redis key of 1-200 printable characters, got {raw!r}"
            )
        return stream
    if name == "spool_dir":
        path = _parse_optional_text(name, raw)
        return None if path is None else os.path.expanduser(path)
    if name == "preset":
        preset = str(raw).strip().lower()
        preset = _PRESET_ALIASES.get(preset, preset)
        if preset not in PRESETS:
            raise ConfigError(
                f"preset: expected one of {', '.join(PRESETS)} (or dev/stage/prod), got {raw!r}"
            )
        return preset
    if name == "sample_rate":
        return float(_parse_number(name, raw, float, 0.0, 1.0))
    if name == "sample_rules":
        return _parse_rules(raw)
    if name == "slow_threshold":
        return float(_parse_number(name, raw, float, 0.0))
    if name == "health_path":
        path = _parse_optional_text(name, raw)
        if path is not None and not path.startswith("/"):
            raise ConfigError(f"health_path: expected a path starting with '/', got {raw!r}")
        return path
    if name == "log_level":
        level = str(raw).strip().upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"log_level: expected DEBUG, INFO, WARNING or ERROR, got {raw!r}")
        return level
    if name == "compression":
        value = str(raw).strip().lower()
        if value not in ("gzip", "none"):
            raise ConfigError(f"compression: expected 'gzip' or 'none', got {raw!r}")
        return value
    if name.endswith("_header"):
        return _parse_header(name, raw)
    if name == "exclude_paths":
        return _parse_exclude_paths(raw)
    if name == "exclude_methods":
        methods = frozenset(method.upper() for method in _parse_list(name, raw))
        for method in methods:
            if not _METHOD.fullmatch(method):  # it would never match a request
                raise ConfigError(f"{name}: {method!r} is not an HTTP method such as GET")
        return methods
    if name == "redact_query_keys":
        return tuple(key.lower() for key in _parse_list(name, raw))
    if name == "trust_incoming":
        mode = str(raw).strip().lower()
        if mode not in ("continue", "link", "ignore"):
            raise ConfigError(
                f"trust_incoming: expected 'continue', 'link' or 'ignore', got {raw!r}"
            )
        return mode
    if name == "trusted_networks":
        networks = _parse_list(name, raw)
        for network in networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ConfigError(
                    f"trusted_networks: {network!r} is not an IP network such as 10.0.0.0/8"
                ) from None
        return networks
    if name == "propagate_to":
        targets = _parse_list(name, raw)
        for target in targets:
            if target.startswith("re:"):
                try:
                    re.compile(target[3:])
                except re.error as exc:
                    raise ConfigError(
                        f"propagate_to: {target!r} is not a valid regex ({exc})"
                    ) from None
        return targets
    if name == "level_4xx":
        level = str(raw).strip().upper()
        if level not in _LEVELS:
            raise ConfigError(f"level_4xx: expected one of {', '.join(_LEVELS)}, got {raw!r}")
        return level
    if name in _CALLABLE_OPTIONS:
        if raw is not None and name != "tracer_provider" and not callable(raw):
            raise ConfigError(f"{name}: expected a callable, got {type(raw).__name__}")
        return raw
    raise AssertionError(name)  # pragma: no cover - every option is listed above


def _select_preset(options: Mapping[str, Any], environ: Mapping[str, str]) -> tuple[str, str]:
    if "preset" in options:
        return _parse("preset", options["preset"]), "argument"
    raw = environ.get("LANGFUSE_MW_ENV", "").strip()
    if raw:
        try:
            return _parse("preset", raw), "env:LANGFUSE_MW_ENV"
        except ConfigError as exc:
            raise ConfigError(f"{exc} (from $LANGFUSE_MW_ENV)") from None
    tracing_env = environ.get("LANGFUSE_TRACING_ENVIRONMENT", "").strip().lower()
    name = _PRESET_ALIASES.get(tracing_env, tracing_env)
    if name in PRESETS:
        return name, "env:LANGFUSE_TRACING_ENVIRONMENT"
    return "development", "default"


def resolve_settings(
    options: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Build Settings: explicit options, then ``LANGFUSE_MW_*``/Langfuse env vars, then defaults.

    Unknown option names raise TypeError; invalid values raise ConfigError (a ValueError).
    """
    options = dict(options or {})
    environ = os.environ if environ is None else environ
    unknown = sorted(set(options) - set(_OPTION_NAMES))
    if unknown:
        hints = [difflib.get_close_matches(name, _OPTION_NAMES, n=1) for name in unknown]
        detail = ", ".join(
            f"{name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
            for name, hint in zip(unknown, hints, strict=True)
        )
        raise TypeError(f"langfuse_mw: unknown option {detail}")

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    preset, preset_source = _select_preset(options, environ)
    preset_values = PRESETS[preset]
    values["preset"], sources["preset"] = preset, preset_source
    for name in _OPTION_NAMES:
        if name == "preset":
            continue
        if name in options:
            values[name] = _parse(name, options[name])
            sources[name] = "argument"
            continue
        if name in _CALLABLE_OPTIONS:
            continue
        for env_name in _env_names(name):
            raw = environ.get(env_name)
            if raw is not None and raw.strip() != "":
                try:
                    if env_name == _SDK_SWITCH:
                        # Only "false" turns the SDK off, anything else leaves it on: our
                        # requests are traced exactly when its generations are.
                        values[name] = raw.strip().lower() != "false"
                    else:
                        values[name] = _parse(name, raw)
                except ConfigError as exc:
                    raise ConfigError(f"{exc} (from ${env_name})") from None
                sources[name] = f"env:{env_name}"
                break
        else:
            if name in preset_values:
                values[name] = preset_values[name]
                sources[name] = f"preset:{preset}"
            elif name == "environment" and preset_source != "default":
                # The environment a preset was chosen by is the one Langfuse shows.
                values[name] = preset
                sources[name] = f"preset:{preset}"
            else:
                sources[name] = "default"
    if values.get("queue_url") and values.get("spool_dir"):
        raise ConfigError(
            f"queue_url ({sources['queue_url']}) and spool_dir ({sources['spool_dir']}): "
            "choose one durable export mode, not both"
        )
    return Settings(**values, sources=sources)
