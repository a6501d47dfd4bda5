"""The dashboard in real headless Chromium (Debian's `chromium`, driven by Playwright) against a
server fed by the simulator: sign in, every page loads with no console error (a CSP violation
is one), a new firing shows on the open overview, pausing a trigger from its button takes
effect on the next firing, and a backtest of the playbooks picked runs from its form.
Screenshots of every page are saved in `test-artifacts/dashboard/`."""

from __future__ import annotations

import time
from email.message import EmailMessage
from typing import Any

import httpx
import pytest

from . import server as srv
from .test_browser import ARTIFACTS, CHROMIUM, XSS, _require_browser
from .world import serve_world

SHOTS = ARTIFACTS / "dashboard"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = tmp_path_factory.mktemp("dashboard-browser")
    maildir = folder / "mail"
    maildir.mkdir()
    mail = EmailMessage()  # as the demo's mail sink writes what it receives
    mail["Subject"] = "Your last payment did not go through"
    mail["From"] = "Forewarn <noreply@example.com>"
    mail["To"] = "owner@acme.example"
    mail.set_content(f"<p>Hello,</p><p>Please update your card.</p>{XSS}", subtype="html")
    (maildir / "0001.eml").write_bytes(bytes(mail))
    server = serve_world(folder, {"FOREWARN_DEMO_MAILDIR": str(maildir)})
    yield server
    srv.stop(server)


def _payment_failed(live: srv.Server, account: str) -> None:
    event = {
        "type": "track",
        "event": "Payment Failed",
        "userId": f"{account}-owner",
        "context": {"groupId": account},
    }
    r = httpx.post(live.url + "/v1/track", json=event, auth=(srv.WRITE_KEY, ""), timeout=10)
    r.raise_for_status()


def test_every_page_loads_clean_and_pausing_a_trigger_takes_effect(live):
    sync_playwright = _require_browser()
    SHOTS.mkdir(parents=True, exist_ok=True)
    customer = live.firings(trigger="payment-failed", limit=1)[0]["subject"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(f"{page.url}: {e}"))
            page.on(
                "console",
                lambda m: errors.append(f"{page.url}: {m.text}") if m.type == "error" else None,
            )

            page.goto(live.url + "/triggers")
            assert "/signin" in page.url  # no session: to the sign-in page, then back
            page.screenshot(path=str(SHOTS / "signin.png"))
            page.fill("input[name=key]", srv.WRITE_KEY)
            page.click("button[type=submit]")
            assert "not an admin key" in page.inner_text("[role=alert]")
            # the refused key is answered 401, which Chromium reports; nothing else may be
            assert len(errors) == 1 and "401" in errors[0], errors
            errors.clear()
            page.fill("input[name=key]", srv.ADMIN_KEY)
            page.click("button[type=submit]")
            page.wait_for_url(live.url + "/triggers")

            pages = {
                "overview": "/",
                "triggers": "/triggers",
                "trigger": "/triggers/payment-failed?since=30d",
                "customers": "/customers",
                "customer": f"/customers/{customer}?why=payment-failed",
                "outreach": "/outreach",
                "outbox": "/outbox",
                "backtests": "/backtests",
                "settings": "/settings",
            }
            for name, path in pages.items():
                response = page.goto(live.url + path)
                assert response is not None and response.status == 200, (name, response)
                page.wait_for_load_state("networkidle")
                page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
            page.goto(live.url + "/outbox")
            email = page.inner_text("article.email")
            assert "Hello,\nPlease update your card." in email and "owner@acme.example" in email
            assert page.query_selector("article.email img") is None
            assert page.evaluate("window.__xss") is None
            page.goto(live.url + "/")
            assert page.wait_for_selector(".chart .uplot canvas", timeout=10_000) is not None
            # a firing shows on the open overview as it happens, without a reload
            before = int(page.inner_text("[data-count=firings]"))
            _payment_failed(live, "acct-live-test")
            page.wait_for_selector(
                "[data-latest] a[href='/customers/acct-live-test']", timeout=20_000
            )
            assert int(page.inner_text("[data-count=firings]")) > before
            page.goto(live.url + "/triggers/payment-failed?since=30d")
            assert page.query_selector("svg.intervals") is not None
            assert page.wait_for_selector(".chart .uplot canvas", timeout=10_000) is not None

            # pause from the triggers page: the button, then the API, then the next firing
            page.goto(live.url + "/triggers")
            page.click("button[data-action=pause][data-trigger=payment-failed]")
            page.wait_for_url(live.url + "/triggers")
            row = page.inner_text("tr[data-trigger=payment-failed]")
            assert "paused" in row and "dashboard" in row
            overrides = live.admin("/api/v1/triggers/overrides")["overrides"]
            assert overrides["payment-failed"]["mode"] == "paused"
            assert overrides["payment-failed"]["by"] == "dashboard"
            _payment_failed(live, "acct-paused-test")
            fired = live.wait_for(
                lambda: live.firings(trigger="payment-failed", subject="acct-paused-test"),
                timeout_s=20,
            )
            assert fired and fired[0]["decision"] == "suppressed"
            assert fired[0]["reason"] == "paused"
            page.screenshot(path=str(SHOTS / "triggers-paused.png"), full_page=True)

            page.click("button[data-action=shadow][data-trigger=payment-failed]")
            page.wait_for_url(live.url + "/triggers")
            assert live.admin("/api/v1/triggers/overrides")["overrides"]["payment-failed"][
                "mode"
            ] == ("shadow")
            page.click("button[data-action=resume][data-trigger=payment-failed]")
            page.wait_for_url(live.url + "/triggers")
            assert "payment-failed" not in live.admin("/api/v1/triggers/overrides")["overrides"]

            # on a trigger's own page, with a reason
            page.goto(live.url + "/triggers/storage-85")
            page.fill("input[name=reason]", "incident INC-42")
            page.click("button[data-action=shadow]")
            page.wait_for_url(live.url + "/triggers/storage-85")
            assert "incident INC-42" in page.inner_text("p.override")
            override = live.admin("/api/v1/triggers/overrides")["overrides"]["storage-85"]
            assert override["mode"] == "shadow" and override["reason"] == "incident INC-42"
            page.click("button[data-action=resume]")
            page.wait_for_url(live.url + "/triggers/storage-85")
            assert "storage-85" not in live.admin("/api/v1/triggers/overrides")["overrides"]

            # a backtest from its form, read when done
            page.goto(live.url + "/backtests")
            page.uncheck("fieldset:has(legend:has-text('errors.yaml')) legend input")
            assert not page.is_checked("input[name='t:error-spike']")
            page.click("form.backtest button[type=submit]")
            page.wait_for_url("**/backtests/*")
            deadline = time.monotonic() + 30
            while "Running" in page.inner_text("main") and time.monotonic() < deadline:
                page.wait_for_timeout(500)
                page.reload()
            assert "events over" in page.inner_text("main")
            ran = page.inner_text("main p.muted")
            assert "payment-failed" in ran and "error-spike" not in ran
            page.screenshot(path=str(SHOTS / "backtest.png"), full_page=True)

            page.click("header form.signout button")
            page.wait_for_url(live.url + "/signin")
            page.goto(live.url + "/triggers")
            assert "/signin" in page.url
            assert not errors, errors
        finally:
            browser.close()
