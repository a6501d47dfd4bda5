"""Ticket and billing webhooks: Zendesk, Freshdesk and generic ticket payloads and signed Stripe
events become valid Segment-spec messages; signatures are verified as Stripe documents them.
Payloads follow the providers' documented examples."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forewarn import engine, model
from forewarn.errors import ForewarnError, InputError, SignatureError, TooLargeError
from forewarn.ingest import MAX_BATCH_BYTES, Parsed, iso
from forewarn.runner import Runner
from forewarn.sources import load_playbooks
from forewarn.webhooks import stripe, tickets, verify_stripe_signature

ROOT = Path(__file__).resolve().parent.parent
T0 = model.parse_time_ms("2026-11-23T10:00:00Z")


def body(data: Any) -> bytes:
    return json.dumps(data).encode()


def valid(parsed: Parsed) -> None:
    assert len(parsed.messages) == len(parsed.events)
    for message, event in zip(parsed.messages, parsed.events, strict=True):
        assert model.event_from_dict(json.loads(json.dumps(message))) == event


# --- Zendesk --------------------------------------------------------------------------------------

# Zendesk event webhooks (developer.zendesk.com, "Ticket events"): one event per request
ZENDESK_CREATED: dict[str, Any] = {
    "type": "zen:event-type:ticket.created",
    "account_id": 22129848,
    "id": "01HNX9E8K3V4Q2M7T6R5W1Y0ZA",
    "time": "2026-11-23T09:12:07Z",
    "zendesk_event_version": "2022-11-06",
    "subject": "zen:ticket:5158",
    "detail": {
        "actor_id": "20978392",
        "assignee_id": None,
        "brand_id": "360001",
        "created_at": "2026-11-23T09:12:07Z",
        "description": "The export never finishes",
        "external_id": None,
        "form_id": "360002",
        "group_id": "98738",
        "id": "5158",
        "is_public": True,
        "organization_id": "10002",
        "priority": "HIGH",
        "requester_id": "20978392",
        "status": "NEW",
        "subject": "Cannot export my reports",
        "submitter_id": "20978392",
        "tags": ["export", "enterprise"],
        "type": "PROBLEM",
        "updated_at": "2026-11-23T09:12:07Z",
        "via": {"channel": "web_form"},
    },
    "event": {},
}


def zendesk_status(current: str, previous: str, event_id: str) -> dict[str, Any]:
    changed = copy.deepcopy(ZENDESK_CREATED)
    changed.update(type="zen:event-type:ticket.status_changed", id=event_id)
    changed["time"] = "2026-11-23T16:45:20.987654321Z"
    changed["detail"].update(status=current, updated_at="2026-11-23T16:45:20Z")
    changed["event"] = {"current": current, "previous": previous}
    return changed


def test_zendesk_created_and_solved_become_ticket_events():
    solved = zendesk_status("SOLVED", "OPEN", "01HNXSOLVED")
    for sent, name, at in (
        (ZENDESK_CREATED, "Ticket Created", "2026-11-23T09:12:07.000Z"),
        (solved, "Ticket Solved", "2026-11-23T16:45:20.987Z"),
    ):
        parsed = tickets(body(sent), "zendesk", T0)
        valid(parsed)
        (message,) = parsed.messages
        assert message["event"] == name and message["timestamp"] == at
        assert message["anonymousId"] == "zendesk:20978392" and "userId" not in message
        assert message["messageId"] == sent["id"]
        assert "context" not in message  # the user's own accounts count it, see docs/ingest.md
        assert message["properties"] == {
            "ticket_id": "5158",
            "source": "zendesk",
            "subject": "Cannot export my reports",
            "status": sent["detail"]["status"].lower(),
            "priority": "high",
            "tags": ["export", "enterprise"],
            "channel": "web_form",
            "zendesk_organization_id": "10002",
        }


@pytest.mark.parametrize(
    ("current", "previous", "solved"),
    [
        ("SOLVED", "OPEN", True),
        ("CLOSED", "OPEN", True),
        ("CLOSED", "SOLVED", False),  # closing a solved ticket is the same resolution
        ("PENDING", "OPEN", False),
        ("OPEN", "SOLVED", False),
    ],
)
def test_zendesk_status_changes(current, previous, solved):
    parsed = tickets(body(zendesk_status(current, previous, "e1")), "zendesk", T0)
    assert len(parsed.messages) == solved and parsed.ignored == (not solved)


def test_other_zendesk_events_are_ignored_and_broken_ones_rejected():
    comment = {**ZENDESK_CREATED, "type": "zen:event-type:ticket.comment_added"}
    user = {"type": "zen:event-type:user.created", "detail": {"id": "1"}}
    orphan = copy.deepcopy(ZENDESK_CREATED)
    del orphan["detail"]["requester_id"]
    parsed = tickets(body([comment, user, orphan]), "zendesk", T0)
    assert parsed.ignored == 2 and [r.index for r in parsed.rejected] == [2]
    assert "no 'detail.requester_id'" in parsed.rejected[0].reason


# --- Freshdesk ------------------------------------------------------------------------------------

# An automation rule's "Trigger webhook" with JSON content (as Freshdesk's own docs and the
# integrations built on it show it): placeholders filled in, status changes as numbers.
FRESHDESK_CREATED: dict[str, Any] = {
    "freshdesk_webhook": {
        "triggered_event": "{ticket_action:created}",
        "ticket_id": "11",
        "ticket_url": "https://acme.freshdesk.com/helpdesk/tickets/11",
        "ticket_type": "Incident",
        "ticket_subject": "Reports page is blank",
        "ticket_description": "<div>Nothing loads since this morning.</div>",
        "ticket_status": "Open",
        "ticket_priority": "High",
        "ticket_source": "Email",
        "ticket_tags": "reports, blank-page",
        "ticket_requester_name": "Bob",
        "ticket_requester_email": "bob@initech.com",
        "ticket_company_name": "Initech",
    }
}


def freshdesk(**changes: Any) -> dict[str, Any]:
    return {"freshdesk_webhook": {**FRESHDESK_CREATED["freshdesk_webhook"], **changes}}


def test_freshdesk_created_and_resolved_become_ticket_events():
    resolved = freshdesk(triggered_event="{status:{from:2,to:4}}", ticket_status="Resolved")
    parsed = tickets(body([FRESHDESK_CREATED, resolved]), "freshdesk", T0)
    valid(parsed)
    created, solved = parsed.messages
    assert (created["event"], solved["event"]) == ("Ticket Created", "Ticket Solved")
    assert created["anonymousId"] == "bob@initech.com"
    assert created["timestamp"] == iso(T0)  # Freshdesk sends no time: the moment of receipt
    assert created["properties"] == {
        "ticket_id": "11",
        "source": "freshdesk",
        "subject": "Reports page is blank",
        "status": "open",
        "priority": "high",
        "tags": ["reports", "blank-page"],
        "channel": "email",
        "company": "Initech",
    }
    assert created["messageId"] != solved["messageId"]


@pytest.mark.parametrize(
    ("trigger", "solved"),
    [
        ("{status:{from:2,to:4}}", True),
        ("{status:{from:3,to:5}}", True),
        ("{status:{from:4,to:5}}", False),  # closing a resolved ticket
        ("{status:{from:2,to:3}}", False),
        ("{priority:{from:1,to:4}}", False),
        ("{note_type:private}", False),
    ],
)
def test_freshdesk_status_changes(trigger, solved):
    parsed = tickets(body(freshdesk(triggered_event=trigger)), "freshdesk", T0)
    assert len(parsed.messages) == solved and parsed.ignored == (not solved)


def test_freshdesk_contact_external_id_and_account_id_name_the_product_ids():
    sent = freshdesk(ticket_contact_unique_external_id="u-42", account_id="initech")
    (event,) = tickets(body(sent), "freshdesk", T0).events
    assert (event.user_id, event.account_id) == ("u-42", "initech")
    nobody = freshdesk(ticket_requester_email="")
    assert "names no requester" in tickets(body(nobody), "freshdesk", T0).rejected[0].reason


# --- generic --------------------------------------------------------------------------------------

GENERIC: dict[str, Any] = {
    "id": "T-1042",
    "event": "created",
    "user_id": "ada@acme",
    "account_id": "acme",
    "subject": "Export keeps timing out",
    "status": "open",
    "priority": "urgent",
    "tags": ["export", "billing"],
    "channel": "chat",
    "timestamp": "2026-11-23T09:30:00Z",
}


def test_the_generic_shape_one_or_many():
    solved = {**GENERIC, "event": "solved", "status": "solved", "timestamp": 1795431600000}
    templated = {**GENERIC, "user_id": "", "email": "ada@acme.io", "tags": "a b", "timestamp": ""}
    parsed = tickets(body({"tickets": [GENERIC, solved, templated]}), "generic", T0)
    valid(parsed)
    created, done, from_template = parsed.events
    assert (created.name, created.user_id, created.account_id) == (
        "Ticket Created",
        "ada@acme",
        "acme",
    )
    assert created.properties["tags"] == ["export", "billing"]
    assert created.timestamp_ms == model.parse_time_ms("2026-11-23T09:30:00Z")
    assert (done.name, done.timestamp_ms) == ("Ticket Solved", 1795431600000)
    assert from_template.anonymous_id == "ada@acme.io" and from_template.timestamp_ms == T0
    assert from_template.properties["tags"] == ["a", "b"]
    single = tickets(body({**GENERIC, "message_id": "hd-1"}), "generic", T0)
    assert single.messages[0]["messageId"] == "hd-1"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"id": None}, "ticket has no 'id'"),
        ({"event": "reopened"}, 'set it to "created" or "solved"'),
        ({"event": ["created"]}, 'set it to "created" or "solved"'),
        ({"user_id": None}, "neither 'user_id' nor 'email'"),
        ({"timestamp": "tomorrow"}, "timestamp 'tomorrow' is not ISO 8601"),
    ],
)
def test_a_bad_generic_ticket_is_rejected_alone(change, reason):
    parsed = tickets(body([GENERIC, {**GENERIC, **change}]), "generic", T0)
    assert len(parsed.messages) == 1 and parsed.rejected[0].index == 1
    assert reason in parsed.rejected[0].reason


def test_a_ticket_message_is_held_to_the_event_limit():
    many_tags = {**GENERIC, "tags": [f"tag-{i:03d}-" + "x" * 90 for i in range(400)]}
    parsed = tickets(body([GENERIC, many_tags]), "generic", T0)
    assert len(parsed.messages) == 1
    assert (
        "over the 32768-byte limit: send shorter ids, tags and texts" in parsed.rejected[0].reason
    )


def test_ticket_bodies_that_cannot_be_used():
    with pytest.raises(InputError):
        tickets(b"<xml/>", "generic", T0)
    with pytest.raises(TooLargeError):
        tickets(b" " * (MAX_BATCH_BYTES + 1), "zendesk", T0)
    with pytest.raises(ValueError):
        tickets(b"{}", "jira", T0)


# --- Stripe ---------------------------------------------------------------------------------------

SECRET = "whsec_test_4eC39HqLyjWDarjtT1zdp7dc"
NOW_S = 1795428060  # a minute after the events below were created

# Built from Stripe's documented Event and Invoice objects (API version 2025-03-31.basil)
INVOICE: dict[str, Any] = {
    "id": "in_1MtHbELkdIwHu7ixl4OzzPMv",
    "object": "invoice",
    "account_country": "US",
    "amount_due": 49000,
    "amount_paid": 0,
    "amount_remaining": 49000,
    "attempt_count": 1,
    "attempted": True,
    "billing_reason": "subscription_cycle",
    "collection_method": "charge_automatically",
    "created": 1795427900,
    "currency": "usd",
    "customer": "cus_NeZwdNtLEOXuvB",
    "customer_email": "billing@acme.io",
    "hosted_invoice_url": "https://invoice.stripe.com/i/acct_1M2JTkLkdIwHu7ix/test_YWNjdF8x",
    "livemode": False,
    "metadata": {},
    "next_payment_attempt": 1795687200,
    "parent": {
        "type": "subscription_details",
        "quote_details": None,
        "subscription_details": {
            "metadata": {"account_id": "acme"},
            "subscription": "sub_1MowQVLkdIwHu7ixeRlqHVzs",
        },
    },
    "status": "open",
}

SUBSCRIPTION: dict[str, Any] = {
    "id": "sub_1MowQVLkdIwHu7ixeRlqHVzs",
    "object": "subscription",
    "billing_cycle_anchor": 1793000000,
    "cancel_at_period_end": False,
    "canceled_at": None,
    "collection_method": "charge_automatically",
    "created": 1793000000,
    "currency": "usd",
    "customer": "cus_NeZwdNtLEOXuvB",
    "items": {
        "object": "list",
        "data": [
            {
                "id": "si_NcLYdDxLHxlFo7",
                "object": "subscription_item",
                "current_period_end": 1798020000,
                "current_period_start": 1795428000,
                "price": {
                    "id": "price_1MowQULkdIwHu7ixraBm864M",
                    "object": "price",
                    "currency": "usd",
                    "lookup_key": "business_monthly",
                    "metadata": {},
                    "nickname": "Business",
                    "product": "prod_NWjs8kKbJWmuuc",
                    "unit_amount": 99000,
                },
                "quantity": 1,
            }
        ],
    },
    "metadata": {"account_id": "acme"},
    "status": "active",
}


def stripe_event(kind: str, obj: dict[str, Any], **data: Any) -> dict[str, Any]:
    return {
        "id": "evt_1NG8Du2eZvKYlo2CUI79vXWy",
        "object": "event",
        "api_version": "2025-03-31.basil",
        "created": 1795428000,
        "data": {"object": obj, **data},
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": kind,
    }


def sign(payload: bytes, t: int = NOW_S - 1, secret: str = SECRET) -> str:
    signed = f"{t}.".encode() + payload
    v1 = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={t},v1={v1},v0=6ffbb59b2300aae63f272406069a9788598b792a944a07aba816edb039989a39"


def signed(event: dict[str, Any]) -> Parsed:
    payload = body(event)
    return stripe(payload, sign(payload), SECRET, NOW_S * 1000)


def test_a_failed_payment_becomes_payment_failed_for_the_account():
    parsed = signed(stripe_event("invoice.payment_failed", INVOICE))
    valid(parsed)
    (message,) = parsed.messages
    assert message["event"] == "Payment Failed"
    assert message["anonymousId"] == "cus_NeZwdNtLEOXuvB"
    assert message["context"] == {"groupId": "acme"}  # from the subscription's metadata
    assert message["messageId"] == "evt_1NG8Du2eZvKYlo2CUI79vXWy"
    assert message["timestamp"] == "2026-11-23T10:00:00.000Z"  # the event's `created`
    assert message["properties"] == {
        "invoice_id": "in_1MtHbELkdIwHu7ixl4OzzPMv",
        "amount": 490,
        "currency": "usd",
        "attempt_count": 1,
        "billing_reason": "subscription_cycle",
        "next_payment_attempt": "2026-11-26T10:00:00.000Z",
    }


def test_a_paid_invoice_and_the_account_rule():
    paid = {**INVOICE, "amount_paid": 49050, "amount_due": 49050, "status": "paid", "parent": None}
    (message,) = signed(stripe_event("invoice.paid", paid)).messages
    assert message["event"] == "Payment Succeeded" and message["properties"]["amount"] == 490.5
    assert message["context"] == {"groupId": "cus_NeZwdNtLEOXuvB"}  # no metadata: the customer
    with_user = {**paid, "metadata": {"account_id": "initech", "user_id": "u-7"}, "currency": "jpy"}
    (event,) = signed(stripe_event("invoice.paid", with_user)).events
    assert (event.user_id, event.account_id, event.properties["amount"]) == (
        "u-7",
        "initech",
        49050,
    )
    expanded = {**paid, "customer": {"id": "cus_X", "metadata": {"account_id": "hooli"}}}
    assert signed(stripe_event("invoice.paid", expanded)).events[0].account_id == "hooli"


def test_the_event_names_are_the_example_playbooks():
    book = yaml.safe_load((ROOT / "examples" / "playbooks" / "account.yaml").read_text())
    trigger = next(t for t in book["triggers"] if t["id"] == "payment-failed")
    assert trigger["when"]["event"]["name"] == "Payment Failed"
    assert trigger["goal"]["event"] == "Payment Succeeded"


def test_a_stripe_payment_failure_fires_the_example_playbook():
    triggers = load_playbooks(ROOT / "examples" / "playbooks" / "account.yaml")
    runner = Runner(engine.State(engine.Playbook(triggers)), lateness_ms=0)
    firings = runner.push_many(signed(stripe_event("invoice.payment_failed", INVOICE)).events)
    assert [(f.trigger, f.subject) for f in firings] == [("payment-failed", "acme")]


def test_a_subscription_update_sets_the_account_traits_and_tracks_the_change():
    previous = {"items": {"data": [{"price": {"lookup_key": "pro_monthly"}}]}}
    parsed = signed(
        stripe_event("customer.subscription.updated", SUBSCRIPTION, previous_attributes=previous)
    )
    valid(parsed)
    group, track = parsed.messages
    assert group["type"] == "group" and group["groupId"] == "acme"
    assert group["traits"] == {
        "renewal_date": "2026-12-23T10:00:00.000Z",  # the item's current_period_end
        "plan": "business_monthly",
        "status": "active",
    }
    assert group["messageId"] == "evt_1NG8Du2eZvKYlo2CUI79vXWy:group"
    assert track["event"] == "Subscription Updated" and track["context"] == {"groupId": "acme"}
    assert track["properties"] == {
        "subscription_id": "sub_1MowQVLkdIwHu7ixeRlqHVzs",
        "renewal_date": "2026-12-23T10:00:00.000Z",
        "plan": "business_monthly",
        "status": "active",
        "previous_plan": "pro_monthly",
    }


def test_a_canceled_subscription_clears_the_renewal_date():
    older_api = {**SUBSCRIPTION, "current_period_end": 1798020000, "status": "canceled"}
    (group, track) = signed(stripe_event("customer.subscription.deleted", older_api)).messages
    assert group["traits"]["renewal_date"] is None and group["traits"]["status"] == "canceled"
    assert track["event"] == "Subscription Canceled"
    ending = {**SUBSCRIPTION, "cancel_at_period_end": True}
    (group, _) = signed(stripe_event("customer.subscription.updated", ending)).messages
    assert group["traits"]["renewal_date"] is None


def test_other_stripe_events_are_ignored_and_a_customerless_one_rejected():
    ignored = signed(stripe_event("charge.succeeded", {"id": "ch_1", "customer": "cus_1"}))
    assert ignored.ignored == 1 and not ignored.messages
    orphan = signed(stripe_event("invoice.paid", {**INVOICE, "customer": None}))
    assert "no 'customer'" in orphan.rejected[0].reason
    far = signed({**stripe_event("invoice.paid", INVOICE), "created": 10**15})
    assert "is outside 1970..9999" in far.rejected[0].reason


def test_several_v1_signatures_pass_if_one_matches():
    payload = body(stripe_event("invoice.paid", INVOICE))
    t = NOW_S - 10
    good = sign(payload, t).split(",")[1]
    header = f"t={t},v1={'0' * 64},{good}"  # during a secret rotation Stripe signs with both
    verify_stripe_signature(payload, header, SECRET, NOW_S * 1000)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "missing or has no 't=' and 'v1='"),
        ("v1=abc", "missing or has no 't=' and 'v1='"),
        (f"t={NOW_S},v0=abc", "missing or has no 't=' and 'v1='"),
        (f"t={NOW_S},v1={'0' * 64}", "does not match the body"),
        (f"t={NOW_S},v1=é", "does not match the body"),
    ],
)
def test_a_bad_signature_is_refused_with_the_reason(header, reason):
    with pytest.raises(SignatureError) as caught:
        stripe(b"{}", header, SECRET, NOW_S * 1000)
    assert reason in caught.value.message
    assert caught.value.status == 400 and caught.value.code == "invalid_signature"


def test_a_signature_made_with_another_secret_or_for_another_body_fails():
    payload = body(stripe_event("invoice.paid", INVOICE))
    with pytest.raises(SignatureError):
        stripe(payload, sign(payload, secret="whsec_other"), SECRET, NOW_S * 1000)
    with pytest.raises(SignatureError):
        stripe(payload + b" ", sign(payload), SECRET, NOW_S * 1000)


def test_the_signature_timestamp_tolerance_holds_at_its_boundary():
    payload = body(stripe_event("invoice.paid", INVOICE))
    assert signed(stripe_event("invoice.paid", INVOICE)).messages
    stripe(payload, sign(payload, NOW_S - 300), SECRET, NOW_S * 1000)  # exactly 300 s: accepted
    with pytest.raises(SignatureError) as caught:
        stripe(payload, sign(payload, NOW_S - 301), SECRET, NOW_S * 1000)
    assert "made 301 s ago, over the 300 s tolerance" in caught.value.message
    stripe(payload, sign(payload, NOW_S - 3600), SECRET, NOW_S * 1000, tolerance_s=3600)


def test_a_stripe_body_over_the_limit_is_a_413_before_any_hashing():
    with pytest.raises(TooLargeError):
        stripe(b" " * (MAX_BATCH_BYTES + 1), None, SECRET, NOW_S * 1000)


# --- robustness -----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_no_payload_crashes_the_webhooks(value):
    data = body(value)
    for flavour in ("generic", "zendesk", "freshdesk"):
        with contextlib.suppress(ForewarnError):
            tickets(data, flavour, T0)
    with contextlib.suppress(ForewarnError):
        stripe(data, sign(data), SECRET, NOW_S * 1000)
