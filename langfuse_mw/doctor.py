"""``langfuse-mw doctor``: the effective configuration, where each value came from, and a live
check that Langfuse accepts the credentials."""

from __future__ import annotations

import base64
import threading
from collections.abc import Mapping
from typing import Any, TextIO

import httpx

from .config import Settings, mask_secret, redact_url, resolve_settings

__all__ = ["check_endpoint", "describe", "run"]

_HIDDEN = {"secret_key"}


def _show(name: str, value: Any) -> str:
    if value is None:
        return "-"
    if name in _HIDDEN:
        return mask_secret(str(value))
    if name == "queue_url":  # redis://:password@host
        return redact_url(str(value))
    if callable(value):
        return getattr(value, "__qualname__", repr(value))
    if isinstance(value, tuple | frozenset):
        return ", ".join(str(v) for v in value) or "(none)"
    return str(value)


def describe(settings: Settings) -> list[tuple[str, str, str]]:
    """(option, value as shown, source) for every option; the secret key is masked."""
    rows = []
    for name in sorted(settings.sources):
        rows.append((name, _show(name, getattr(settings, name)), settings.sources[name]))
    return rows


def check_endpoint(settings: Settings, timeout: float = 5.0) -> tuple[bool, str]:
    """POST an empty OTLP batch, as Langfuse's ingestion accepts, and interpret the answer."""
    if not (settings.public_key and settings.secret_key):
        return False, "LANGFUSE_PUBLIC_KEY and LANGFUSE_SECRET_KEY must both be set"
    url = f"{settings.base_url}/api/public/otel/v1/traces"
    auth = base64.b64encode(f"{settings.public_key}:{settings.secret_key}".encode()).decode()
    headers = {
        "Authorization": f"Basic {auth}",
        "Content-Type": "application/x-protobuf",
        "x-langfuse-ingestion-version": "4",
    }
    answer = _post_within(url, headers, timeout)
    if answer is None:
        return False, f"{url} gave no answer within {timeout:g} s (export_timeout)"
    if isinstance(answer, Exception):
        return False, f"{url} unreachable: {type(answer).__name__}: {answer}"
    response = answer
    status = response.status_code
    if 200 <= status < 300:
        # Langfuse answers in JSON (`{}` for an empty batch). A 200 HTML page is a proxy, a
        # login page or another app: it accepted nothing and checked no credentials.
        if not _is_json_object(response):
            kind = response.headers.get("content-type", "no content type")
            return False, (
                f"{url} answered HTTP {status} with {kind}, not Langfuse's JSON: "
                f"this is not Langfuse; check LANGFUSE_BASE_URL"
            )
        return True, f"{url} accepted the credentials (HTTP {status})"
    if status in (401, 403):
        return False, (
            f"{url} refused the credentials (HTTP {status}): check the keys and that they belong "
            f"to this host (public key {settings.public_key})"
        )
    if 300 <= status < 400:
        where = response.headers.get("location", "?")
        return False, f"{url} redirects to {where} (HTTP {status}): fix LANGFUSE_BASE_URL"
    return False, f"{url} answered HTTP {status}: {response.text[:200]!r}"


def _post_within(
    url: str, headers: Mapping[str, str], timeout: float
) -> httpx.Response | Exception | None:
    """POST an empty body; the response, the error, or None when ``timeout`` passed first.

    httpx's timeout bounds each read, not the request: an endpoint sending a byte every few
    seconds (or a slow DNS lookup) would keep the doctor waiting without end. The request
    runs in a daemon thread that is abandoned at the deadline.
    """
    result: list[httpx.Response | Exception] = []

    def post() -> None:
        try:
            result.append(httpx.post(url, content=b"", headers=headers, timeout=timeout))
        except Exception as exc:  # httpx.HTTPError, httpx.InvalidURL, ...
            result.append(exc)

    thread = threading.Thread(target=post, name="langfuse-mw-doctor", daemon=True)
    thread.start()
    thread.join(timeout)
    return result[0] if result else None


def _is_json_object(response: httpx.Response) -> bool:
    try:
        return isinstance(response.json(), dict)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return False


def run(
    out: TextIO,
    options: Mapping[str, Any] | None = None,
    *,
    check: bool = True,
) -> int:
    """Print the configuration and the endpoint check; 0 when Langfuse accepts the keys."""
    settings = resolve_settings(options)
    rows = describe(settings)
    width = max(len(name) for name, _, _ in rows)
    out.write("langfuse_mw configuration (argument > env var > preset > default)\n")
    for name, value, source in rows:
        out.write(f"  {name:<{width}}  {value}  [{source}]\n")
    if not settings.enabled:
        out.write(
            f"\nNOTE: tracing is off (enabled=false, {settings.sources.get('enabled')}): "
            "requests pass through untraced, whatever the check below says\n"
        )
    if not check:
        return 0
    ok, message = check_endpoint(settings, timeout=settings.export_timeout)
    out.write(f"\n{'OK' if ok else 'FAIL'}: {message}\n")
    return 0 if ok else 1
