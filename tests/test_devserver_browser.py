"""The devserver's viewer in a real headless Chromium (Debian's package, driven by playwright).

Skipped locally when Chromium or playwright is missing; under CI (``CI`` set) that fails instead.
"""

from __future__ import annotations

import base64
import os
import shutil
from collections.abc import Iterator
from typing import Any, NoReturn

import httpx
import pytest

from langfuse_mw.devserver import INGEST_PATH, DevServer

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
PK, SK = "pk-lf-browser", "sk-lf-browser"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
ROOT_ID, CHILD_ID, OTHER_ROOT = "00f067aa0ba902b7", "53995c3f42cd8ad8", "1111111111111111"
START = 1_700_000_000_000_000_000


def _missing(what: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required under CI (see .ci/run)")
    pytest.skip(f"{what} is not installed")


@pytest.fixture
def browser_page() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package (pip install playwright)")
    if not os.path.exists(CHROMIUM):
        _missing("Chromium (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            yield page
        finally:
            browser.close()


def _span(span_id: str, name: str, parent: str | None, offset_ms: int, duration_ms: int,
          trace: str = TRACE, **attributes: str) -> dict[str, Any]:  # fmt: skip
    return {
        "traceId": trace,
        "spanId": span_id,
        **({"parentSpanId": parent} if parent else {}),
        "name": name,
        "startTimeUnixNano": str(START + offset_ms * 1_000_000),
        "endTimeUnixNano": str(START + (offset_ms + duration_ms) * 1_000_000),
        "attributes": [
            {"key": k.replace("__", "."), "value": {"stringValue": v}}
            for k, v in attributes.items()
        ],
    }


@pytest.fixture
def server() -> Iterator[DevServer]:
    with DevServer(public_key=PK, secret_key=SK) as srv:
        spans = [
            _span(ROOT_ID, "GET /items/{item_id}", None, 0, 120,
                  user__id="user-1", session__id="sess-1",
                  langfuse__observation__input='{"method": "GET", "path": "/items/7"}',
                  langfuse__observation__output='{"statusCode": 200}'),
            _span(CHILD_ID, "llm <b>call</b>", ROOT_ID, 20, 60,
                  user__id="user-1", langfuse__observation__level="WARNING",
                  langfuse__observation__output='"<img src=x onerror=window.pwned=1>"'),
            _span(OTHER_ROOT, "<script>window.pwned=1</script>", None, 500, 10,
                  trace="f" * 32, user__id="user-2", session__id="sess-2"),
        ]  # fmt: skip
        payload = {"resourceSpans": [{"scopeSpans": [{"scope": {"name": "langfuse-sdk"},
                                                      "spans": spans}]}]}  # fmt: skip
        auth = base64.b64encode(f"{PK}:{SK}".encode()).decode()
        response = httpx.post(srv.url + INGEST_PATH, json=payload,
                              headers={"Authorization": f"Basic {auth}"})  # fmt: skip
        assert response.status_code == 200, response.text
        yield srv


def test_list_then_trace_tree(browser_page: Any, server: DevServer) -> None:
    page = browser_page
    page.goto(server.url + "/")
    rows = page.locator("tr.trace-row")
    assert rows.count() == 2
    # Untrusted names are shown as text, never run.
    assert page.get_by_text("<script>window.pwned=1</script>").is_visible()
    assert page.evaluate("typeof window.pwned") == "undefined"

    page.goto(server.url + "/?userId=user-1")
    assert page.locator("tr.trace-row").count() == 1
    page.locator("a.trace-link", has_text="GET /items/{item_id}").click()
    page.wait_for_url(f"**/trace/{TRACE}")

    root = page.locator(f'li.obs[data-observation-id="{ROOT_ID}"]')
    child = root.locator(f'li.obs[data-observation-id="{CHILD_ID}"]')  # nested under the root
    assert root.get_attribute("data-depth") == "0"
    assert child.get_attribute("data-depth") == "1"
    assert child.locator(".obs-name").first.inner_text() == "llm <b>call</b>"
    assert child.locator(".level-WARNING").first.is_visible()
    bar = child.locator(".bar").first.get_attribute("style") or ""
    assert "left:16.67%" in bar and "width:50.00%" in bar  # 20 ms in, 60 of 120 ms

    # Details open on click: input/output of the observation.
    child.locator("summary").first.click()
    assert child.get_by_text("<img src=x onerror=window.pwned=1>").first.is_visible()
    assert page.evaluate("typeof window.pwned") == "undefined"
    # The trace's input is the root observation's.
    assert page.locator("#trace-io").get_by_text('"path": "/items/7"').is_visible()

    if os.environ.get("DEVSERVER_SCREENSHOT"):  # to look at the page by hand
        page.screenshot(path=os.environ["DEVSERVER_SCREENSHOT"], full_page=True)

    page.goto(server.url + "/?sessionId=sess-2")
    assert page.locator("tr.trace-row").count() == 1
