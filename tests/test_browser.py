"""The widget in real headless Chromium (Debian's `chromium`, driven by Playwright): staying on
the knowledge-base settings page opens the chat with its opener, a reply is answered, dismiss is
recorded, and an XSS payload in a trait stays text. A screenshot of the open chat is saved in
`test-artifacts/`."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from forewarn import store_sqlite

from . import server as srv

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
XSS = '<img src=x onerror="window.__xss = 1">'
PLAYBOOK = """
triggers:
  - id: settings-dwell
    when:
      dwell: {page: "/kb/settings*", for: 3s, unless: [Search Performed]}
    action:
      channel: chat
      message: "Hi {{ traits.first_name }}, looking for something in settings? I can help."
"""


def _require_browser() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None  # type: ignore[assignment]
    if sync_playwright is None or not Path(CHROMIUM).exists():
        message = f"needs Playwright and Chromium at {CHROMIUM} (make test installs them)"
        if os.environ.get("FOREWARN_REQUIRE_SERVICES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return sync_playwright


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Any:
    env = {
        "FOREWARN_PRIORITY_WINDOW": "0",
        "FOREWARN_QUIET_HOURS": "off",
        "FOREWARN_FREQUENCY_CAPS": "off",
        "FOREWARN_KB": str(ROOT / "examples" / "kb"),
    }
    server = srv.serve_playbook(tmp_path_factory.mktemp("browser"), PLAYBOOK, env)
    yield server
    srv.stop(server)


def _events(db: Path, name: str) -> list[dict[str, Any]]:
    conn = sqlite3.connect(db)
    try:
        found = []
        for (raw,) in conn.execute("SELECT messages FROM batches"):
            found += [m for m in store_sqlite.decode_messages(raw) if m.get("event") == name]
        return found
    finally:
        conn.close()


def test_dwelling_on_settings_opens_the_chat_and_it_answers(live):
    sync_playwright = _require_browser()
    # the demo user's traits carry an XSS payload: it must show as text
    import httpx

    r = httpx.post(
        live.url + "/v1/identify",
        json={"userId": "demo-user", "traits": {"first_name": XSS}},
        auth=(srv.WRITE_KEY, ""),
        timeout=10,
    )
    assert r.status_code == 200
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(live.url + "/demo/?heartbeat=1")
            page.click("text=Knowledge base settings")  # a route change, no reload
            assert page.url.endswith("/demo/kb/settings")
            opener = page.wait_for_selector(".fw-chat .fw-msg", timeout=20_000)
            assert opener is not None
            text = opener.inner_text()
            assert "looking for something in settings" in text
            assert XSS in text  # the payload shows as text ...
            assert page.evaluate("window.__xss") is None  # ... and never ran
            assert page.query_selector(".fw-chat img") is None
            page.fill(".fw-chat input", "How do I set up a custom domain?")
            page.click(".fw-chat button[type=submit]")
            page.wait_for_function(
                "() => document.querySelector('#forewarn-widget').shadowRoot"
                ".querySelectorAll('.fw-msg[data-author=assistant]').length >= 2",
                timeout=15_000,
            )
            answers = page.query_selector_all(".fw-msg[data-author=assistant]")
            reply = answers[-1].inner_text()
            assert "help.example.com" in reply, reply
            page.screenshot(path=str(ARTIFACTS / "chat-open.png"))
            with page.context.expect_page() as opened:  # a link in the answer: a new tab
                page.click(".fw-msg[data-author=assistant] >> nth=-1 >> a")
            opened.value.close()
            assert live.wait_for(lambda: _events(live.db, "Message Clicked"), timeout_s=10)
            page.click(".fw-chat .fw-close")
            assert live.wait_for(lambda: _events(live.db, "Message Dismissed"), timeout_s=10)
            assert not errors, errors
        finally:
            browser.close()
    views = _page_paths(live.db)
    assert "/" in views and "/kb/settings" in views  # the route change was a page view
    assert _events(live.db, "Message Replied")
    assert live.wait_for(lambda: _events(live.db, "Active Time"), timeout_s=10)


def _page_paths(db: Path) -> list[str]:
    conn = sqlite3.connect(db)
    try:
        paths = []
        for (raw,) in conn.execute("SELECT messages FROM batches"):
            paths += [
                m["properties"]["path"]
                for m in store_sqlite.decode_messages(raw)
                if m.get("type") == "page"
            ]
        return paths
    finally:
        conn.close()
