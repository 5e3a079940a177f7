"""``langfuse-mw doctor``: the effective configuration, where each value came from, and a live
check that Langfuse accepts the credentials."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any, TextIO

import httpx

from .config import Settings, resolve_settings

__all__ = ["check_endpoint", "describe", "run"]

_HIDDEN = {"secret_key"}


def _show(name: str, value: Any) -> str:
    if value is None:
        return "-"
    if name in _HIDDEN:
        text = str(value)
        return f"{text[:6]}…{text[-2:]} ({len(text)} chars)" if len(text) > 8 else "********"
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
    try:
        response = httpx.post(url, content=b"", headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        return False, f"{url} unreachable: {type(exc).__name__}: {exc}"
    status = response.status_code
    if 200 <= status < 300:
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
    if not check:
        return 0
    ok, message = check_endpoint(settings, timeout=settings.export_timeout)
    out.write(f"\n{'OK' if ok else 'FAIL'}: {message}\n")
    return 0 if ok else 1
