"""Validation of the ids that arrive in request headers, and query redaction (pure functions)."""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from urllib.parse import unquote_plus

__all__ = [
    "MAX_ID_LENGTH",
    "MAX_URL_PART",
    "REDACTED",
    "clean_id",
    "compile_redactor",
    "is_secret_key",
    "is_valid_request_id",
    "new_request_id",
    "query_pairs",
    "redact_query",
    "truncate",
]

# Langfuse's SDK drops propagated user/session ids over 200 characters; we use one bound for all.
MAX_ID_LENGTH = 200
# Paths and query strings are capped in the exported input so a 100 kB URL cannot bloat a span.
MAX_URL_PART = 2048
REDACTED = "[REDACTED]"

_getrandbits = random.getrandbits


# Version 4 and the RFC 4122 variant in 128 random bits.
_UUID4_KEEP = ~(0xF000 << 64) & ~(0xC << 60) & (1 << 128) - 1
_UUID4_SET = (0x4000 << 64) | (0x8 << 60)


def new_request_id() -> str:
    """Return a fresh UUID4-formatted request id.

    ``random`` (reseeded after fork by CPython) rather than ``uuid4()``: ``os.urandom`` releases the
    GIL on every call, which starved the export thread under load in our measurements.
    """
    h = (_getrandbits(128) & _UUID4_KEEP | _UUID4_SET).to_bytes(16).hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def is_valid_request_id(value: str) -> bool:
    """Return True for 1-200 printable ASCII characters without whitespace."""
    return (
        0 < len(value) <= MAX_ID_LENGTH
        and value.isascii()
        and value.isprintable()
        and " " not in value
    )


def clean_id(value: str | None) -> str | None:
    """Return a user or session id if it is 1-200 printable US-ASCII characters, else None."""
    if value is None:
        return None
    if 0 < len(value) <= MAX_ID_LENGTH and value.isascii() and value.isprintable():
        value = value.strip()
        return value or None
    return None


def truncate(text: str, limit: int = MAX_URL_PART) -> str:
    """Cap a string for export, marking the cut."""
    return text if len(text) <= limit else text[:limit] + "...[truncated]"


def compile_redactor(keys: Iterable[str]) -> re.Pattern[str] | None:
    """Compile sensitive query-key fragments into one case-insensitive substring matcher."""
    keys = [key for key in keys if key]
    if not keys:
        return None
    return re.compile("|".join(re.escape(key) for key in keys), re.IGNORECASE)


def is_secret_key(key: str, matcher: re.Pattern[str]) -> bool:
    """True if a raw query key names a secret (percent-decoded first: ``access%5Ftoken``)."""
    return matcher.search(unquote_plus(key) if "%" in key or "+" in key else key) is not None


def redact_query(query: str, matcher: re.Pattern[str] | None) -> str:
    """Replace the values of sensitive keys in a raw query string with ``[REDACTED]``.

    Order and repeated keys are kept; keys are percent-decoded before matching so
    ``access%5Ftoken`` is caught like ``access_token``. ``;`` separates pairs too (older
    servers and other languages split on it), so ``page=1;token=x`` hides the token.
    """
    if not query or matcher is None:
        return truncate(query)
    # With ";" the separators are kept as parts of their own, to rebuild the query as it was.
    parts = _PAIRS.split(query) if ";" in query else query.split("&")
    for index, part in enumerate(parts):
        key, sep, _ = part.partition("=")
        if is_secret_key(key, matcher):
            parts[index] = f"{key}={REDACTED}" if sep else f"{key}"
    return truncate(("" if ";" in query else "&").join(parts))


def query_pairs(query: str) -> list[str]:
    """The ``key=value`` parts of a raw query string, split on ``&`` and ``;``."""
    return _SEPARATORS.split(query) if ";" in query else query.split("&")


# Pairs and their separators (kept, to rebuild the query as it was): "a=1", "&", "b=2", ...
_PAIRS = re.compile(r"([&;])")
_SEPARATORS = re.compile(r"[&;]")
