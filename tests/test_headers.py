"""Id validation, request id generation and query redaction, including property-based checks."""

from __future__ import annotations

import re
import string

from hypothesis import given
from hypothesis import strategies as st

from langfuse_mw.config import DEFAULT_REDACT_QUERY_KEYS
from langfuse_mw.headers import (
    REDACTED,
    clean_id,
    compile_redactor,
    is_valid_request_id,
    new_request_id,
    redact_query,
)

SAFE = set(string.ascii_letters + string.digits + string.punctuation)
REDACTOR = compile_redactor(DEFAULT_REDACT_QUERY_KEYS)


def test_new_request_ids_are_uuid4_shaped_and_unique() -> None:
    ids = {new_request_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    pattern = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
    assert all(pattern.fullmatch(i) for i in ids)


@given(st.text(max_size=300))
def test_accepted_request_ids_are_always_safe_to_echo(value: str) -> None:
    if is_valid_request_id(value):
        assert 1 <= len(value) <= 200
        assert set(value) <= SAFE  # printable ASCII, no whitespace, no CR/LF/NUL


@given(st.text(alphabet=sorted(SAFE), min_size=1, max_size=200))
def test_printable_ascii_request_ids_are_kept(value: str) -> None:
    assert is_valid_request_id(value)


@given(st.text(max_size=300))
def test_clean_ids_are_printable_ascii_and_bounded(value: str) -> None:
    cleaned = clean_id(value)
    if cleaned is not None:
        assert 1 <= len(cleaned) <= 200
        assert cleaned.isascii() and cleaned.isprintable()
        assert cleaned == cleaned.strip()


def test_clean_id_examples() -> None:
    assert clean_id("user 42") == "user 42"
    assert clean_id("  padded ") == "padded"
    assert clean_id("x" * 201) is None
    assert clean_id("caf\u00e9") is None
    assert clean_id("a\r\nb") is None
    assert clean_id("") is None


keys = st.sampled_from(["token", "access_token", "API_KEY", "password", "sig", "code", "Session"])
values = st.text(alphabet=string.ascii_letters + string.digits + "-_.~%", min_size=1, max_size=20)
plain = st.sampled_from(["page", "q", "limit", "sort"])


@given(st.lists(st.tuples(st.one_of(keys, plain), values), max_size=8), st.sampled_from("&;"))
def test_no_value_of_a_sensitive_key_survives_redaction(
    pairs: list[tuple[str, str]], separator: str
) -> None:
    # "&" and ";" alike: a pair after a ";" is a pair to servers that split on it.
    query = separator.join(f"{k}={v}" for k, v in pairs)
    redacted = redact_query(query, REDACTOR)
    out = [part.partition("=") for part in redacted.split(separator)] if redacted else []
    assert [k for k, _, _ in out] == [k for k, _ in pairs]  # order and repeats kept
    for (key, value), (_, _, got) in zip(pairs, out, strict=True):
        if REDACTOR is not None and REDACTOR.search(key):
            assert got == REDACTED
        else:
            assert got == value


def test_redaction_decodes_keys_and_keeps_bare_keys() -> None:
    assert redact_query("access%5Ftoken=x&page=2&flag", REDACTOR) == (
        f"access%5Ftoken={REDACTED}&page=2&flag"
    )
    assert redact_query("q=" + "a" * 5000, REDACTOR).endswith("...[truncated]")
    assert redact_query("token=a", None) == "token=a"
    # Mixed separators are kept as they came.
    assert redact_query("page=1;password=x&q=a;b", REDACTOR) == (
        f"page=1;password={REDACTED}&q=a;b"
    )
