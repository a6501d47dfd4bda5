"""Ticket and billing webhooks: helpdesk ticket events and Stripe billing events, turned into
Segment-spec messages like the analytics clients' in `ingest` (same `Parsed` result, same limits,
same per-item rejections).

Pure: no clock (time comes in as `received_ms` / `now_ms`), no disk, no network.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from forewarn.errors import EventError, InputError, SignatureError, TooLargeError
from forewarn.ingest import (
    ACCOUNT_KEY,
    MAX_BATCH_BYTES,
    MAX_TEXT,
    Parsed,
    Rejection,
    _accept,
    _check_count,
    _clip,
    _decode,
    _dict,
    _fits,
    _text,
    _time_ms,
    iso,
)
from forewarn.model import MAX_TIME_MS

TICKET_FLAVOURS = ("generic", "zendesk", "freshdesk")
USER_KEY = "user_id"  # the metadata key that names the user (Stripe)

# --- tickets ------------------------------------------------------------------------------------

TICKET_EVENTS = {"created": "Ticket Created", "solved": "Ticket Solved"}


def tickets(body: bytes, flavour: str, received_ms: int) -> Parsed:
    """A helpdesk webhook: `generic` (the shape in docs/ingest.md, one ticket or
    `{"tickets": [...]}`), `zendesk` (an event webhook, `zen:event-type:ticket.*`) or `freshdesk`
    (an automation rule's `{"freshdesk_webhook": {...}}`). Becomes `Ticket Created` and
    `Ticket Solved` track events; other ticket changes are counted as ignored."""
    if flavour not in TICKET_FLAVOURS:
        raise ValueError(f"unknown ticket flavour {flavour!r}: use one of {TICKET_FLAVOURS}")
    data = _decode(body, MAX_BATCH_BYTES, f"{flavour} ticket")
    if type(data) is dict and flavour == "generic" and "tickets" in data:
        data = data["tickets"]
    if type(data) is not dict and type(data) is not list:
        raise InputError(f"the {flavour} ticket body is a JSON object (or a list of them)")
    items = data if type(data) is list else [data]
    _check_count(len(items), "the request")
    out = Parsed()
    read = {"generic": _generic_ticket, "zendesk": _zendesk_ticket, "freshdesk": _freshdesk_ticket}
    received_at = iso(received_ms)
    for index, item in enumerate(items):
        message_id = None
        try:
            if type(item) is not dict:
                raise EventError("not a JSON object: send each ticket as an object")
            found = read[flavour](item)
            if found is None:
                out.ignored += 1
                continue
            msg, client_ms = found
            message_id = _text(msg.get("messageId"))
            _fits(msg)
            _accept(out, msg, client_ms, None, received_ms, received_at)
        except EventError as exc:
            out.rejected.append(Rejection(index, exc.message, message_id))
    return out


def _tags(value: object) -> list[str] | None:
    if type(value) is list:
        return [str(t)[:MAX_TEXT] for t in value if type(t) in (str, int)]
    if type(value) is str:  # Zendesk and Freshdesk placeholders give "a b" or "a, b"
        return [t for t in value.replace(",", " ").split() if t]
    return None


def _ticket(
    name: str,
    source: str,
    ticket_id: str,
    person: tuple[str, str],
    account: str | None,
    details: dict[str, Any],
) -> dict[str, Any]:
    props = {"ticket_id": ticket_id, "source": source}
    props.update((k, v) for k, v in details.items() if v is not None)
    msg: dict[str, Any] = {"type": "track", "event": name, person[0]: person[1]}
    msg["properties"] = props
    if account is not None:
        msg["context"] = {"groupId": account}
    return msg


def _lower(value: object) -> str | None:
    text = _clip(value)
    return text.lower() if text is not None else None


def _generic_ticket(item: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    ticket_id = _text(item.get("id"))
    if ticket_id is None:
        raise EventError("ticket has no 'id': set it to the helpdesk's ticket id")
    event = item.get("event")
    if type(event) is not str or event not in TICKET_EVENTS:
        raise EventError(f'ticket \'event\' is {event!r}: set it to "created" or "solved"')
    user_id, email = _text(item.get("user_id")), _text(item.get("email"))
    if user_id is None and email is None:
        raise EventError("ticket has neither 'user_id' nor 'email': set the requester's id")
    person = ("userId", user_id) if user_id is not None else ("anonymousId", str(email))
    details = {
        "subject": _clip(item.get("subject")),
        "status": _lower(item.get("status")),
        "priority": _lower(item.get("priority")),
        "tags": _tags(item.get("tags")),
        "channel": _lower(item.get("channel")),
    }
    msg = _ticket(
        TICKET_EVENTS[event], "generic", ticket_id, person, _text(item.get(ACCOUNT_KEY)), details
    )
    if (message_id := _text(item.get("message_id"))) is not None:
        msg["messageId"] = message_id
    stamp = item.get("timestamp")
    return msg, None if stamp is None or stamp == "" else _time_ms(stamp, "timestamp")


_ZENDESK = "zen:event-type:ticket."


def _zendesk_ticket(item: dict[str, Any]) -> tuple[dict[str, Any], int | None] | None:
    kind = item.get("type")
    if type(kind) is not str or not kind.startswith(_ZENDESK):
        return None
    action = kind[len(_ZENDESK) :]
    change = _dict(item.get("event"))
    if action == "created":
        name = "Ticket Created"
    elif action == "status_changed":
        now, before = _lower(change.get("current")), _lower(change.get("previous"))
        if now != "solved" and not (now == "closed" and before != "solved"):
            return None  # a solved ticket closing later is the same resolution
        name = "Ticket Solved"
    else:
        return None
    detail = _dict(item.get("detail"))
    ticket_id = _text(detail.get("id"))
    if ticket_id is None:
        raise EventError("Zendesk event has no 'detail.id': send the ticket event unmodified")
    requester = _text(detail.get("requester_id"))
    if requester is None:
        raise EventError(
            "Zendesk event has no 'detail.requester_id': subscribe the webhook to ticket events"
        )
    organization = _text(detail.get("organization_id"))
    details = {
        "subject": _clip(detail.get("subject")),
        "status": _lower(detail.get("status")),
        "priority": _lower(detail.get("priority")),
        "tags": _tags(detail.get("tags")),
        "channel": _lower(_dict(detail.get("via")).get("channel")),
        "zendesk_organization_id": organization if organization != "0" else None,
    }
    # A Zendesk user id is not the product's: it becomes an anonymous id that an alias can join
    person = ("anonymousId", f"zendesk:{requester}")
    msg = _ticket(name, "zendesk", ticket_id, person, None, details)
    if (message_id := _text(item.get("id"))) is not None:
        msg["messageId"] = message_id
    stamp = item.get("time", detail.get("updated_at"))
    return msg, None if stamp is None else _time_ms(stamp, "time")


_FRESHDESK_SOLVED = ("4", "5")  # Freshdesk's status numbers for Resolved and Closed


def _freshdesk_ticket(item: dict[str, Any]) -> tuple[dict[str, Any], int | None] | None:
    ticket = _dict(item.get("freshdesk_webhook")) or item
    trigger = str(ticket.get("triggered_event", "")).replace(" ", "")
    status = _lower(ticket.get("ticket_status"))
    event = ticket.get("event")
    if type(event) is not str or event not in TICKET_EVENTS:
        if "ticket_action:created" in trigger:
            event = "created"
        elif trigger.startswith("{status:"):  # "{status:{from:2,to:4}}", numbers not names
            moves = trigger.replace("{", "").replace("}", "").replace(",", ":").split(":")
            source, target = (moves[2], moves[4]) if len(moves) == 5 else ("", "")
            solved = target in _FRESHDESK_SOLVED and not (source == "4" and target == "5")
            event = "solved" if solved else None
        elif not trigger and status in ("resolved", "closed"):
            event = "solved"
        else:
            event = None
    if event is None:
        return None
    ticket_id = _text(ticket.get("ticket_id"))
    if ticket_id is None:
        raise EventError("Freshdesk webhook has no 'ticket_id': add \"{{ticket.id}}\" to its body")
    external = _text(ticket.get("ticket_contact_unique_external_id"))
    email = _text(ticket.get("ticket_requester_email", ticket.get("requester_email")))
    if external is None and email is None:
        raise EventError(
            'Freshdesk webhook names no requester: add "{{ticket.requester.email}}" '
            "(or the contact's unique external id) to its body"
        )
    person = ("userId", external) if external is not None else ("anonymousId", str(email))
    details = {
        "subject": _clip(ticket.get("ticket_subject")),
        "status": status,
        "priority": _lower(ticket.get("ticket_priority")),
        "tags": _tags(ticket.get("ticket_tags")),
        "channel": _lower(ticket.get("ticket_source")),
        "company": _clip(ticket.get("ticket_company_name")),
    }
    msg = _ticket(
        TICKET_EVENTS[event],
        "freshdesk",
        ticket_id,
        person,
        _text(ticket.get(ACCOUNT_KEY)),
        details,
    )
    return msg, None


# --- Stripe -------------------------------------------------------------------------------------


def verify_stripe_signature(
    body: bytes, signature_header: str | None, secret: str, now_ms: int, tolerance_s: int = 300
) -> None:
    """Check `Stripe-Signature` as Stripe documents it: `t=<unix seconds>,v1=<hex>[,v1=...]`,
    where a v1 is HMAC-SHA256 of `<t>.<body>` keyed with the endpoint's signing secret, compared
    in constant time; the request is refused when `t` is more than `tolerance_s` old."""
    timestamp: int | None = None
    signatures: list[bytes] = []
    for part in (signature_header or "").split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isdigit():
            timestamp = int(value)
        elif name == "v1":
            signatures.append(value.strip().encode("utf-8", "replace"))
    if timestamp is None or not signatures:
        raise SignatureError(
            "Stripe-Signature header is missing or has no 't=' and 'v1=': send Stripe's "
            "webhook requests unmodified"
        )
    signed = str(timestamp).encode() + b"." + body
    expected = hmac.new(secret.encode("utf-8"), signed, hashlib.sha256).hexdigest().encode()
    if not any(hmac.compare_digest(expected, given) for given in signatures):
        raise SignatureError(
            "Stripe-Signature does not match the body: check that the endpoint's signing "
            "secret (whsec_...) is the one configured, and that nothing rewrites the body"
        )
    age_s = now_ms // 1000 - timestamp
    if age_s > tolerance_s:
        raise SignatureError(
            f"Stripe-Signature was made {age_s} s ago, over the {tolerance_s} s tolerance: "
            "a replayed request, or this server's clock is wrong"
        )


# Stripe amounts are in the currency's smallest unit; these currencies have no cents, or 3 digits
_ZERO_DECIMAL = frozenset(
    {"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd"}
    | {"vuv", "xaf", "xof", "xpf"}
)
_THREE_DECIMAL = frozenset(("bhd", "jod", "kwd", "omr", "tnd"))
_STRIPE_PAYMENTS = {"invoice.payment_failed": "Payment Failed", "invoice.paid": "Payment Succeeded"}
_STRIPE_SUBSCRIPTIONS = {
    "customer.subscription.created": "Subscription Created",
    "customer.subscription.updated": "Subscription Updated",
    "customer.subscription.deleted": "Subscription Canceled",
}


def _amount(minor: object, currency: object) -> int | float | None:
    if type(minor) is not int:
        return None
    code = currency.lower() if type(currency) is str else ""
    scale = 1 if code in _ZERO_DECIMAL else 1000 if code in _THREE_DECIMAL else 100
    amount: int = minor
    return amount // scale if amount % scale == 0 else amount / scale


def _seconds_iso(value: object) -> str | None:
    return iso(value * 1000) if type(value) is int and 0 <= value < MAX_TIME_MS // 1000 else None


def _stripe_people(obj: dict[str, Any]) -> tuple[tuple[str, str], str]:
    """The user and the account of a Stripe object: `metadata.user_id` / `metadata.account_id`
    on the object, its subscription (snapshotted on invoices) or an expanded customer; else the
    customer id for both."""
    customer = obj.get("customer")
    parent = _dict(_dict(obj.get("parent")).get("subscription_details"))
    sources = (
        _dict(obj.get("metadata")),
        _dict(parent.get("metadata")),
        _dict(_dict(obj.get("subscription_details")).get("metadata")),
        _dict(_dict(customer).get("metadata")),
    )
    customer_id = _text(_dict(customer).get("id") if type(customer) is dict else customer)
    if customer_id is None:
        raise EventError("Stripe object has no 'customer': Forewarn needs one to find the account")
    account = next((a for s in sources if (a := _text(s.get(ACCOUNT_KEY)))), customer_id)
    user = next((u for s in sources if (u := _text(s.get(USER_KEY)))), None)
    return (("userId", user) if user else ("anonymousId", customer_id)), account


def _first(items: object) -> object:
    return items[0] if type(items) is list and items else None


def _plan(sub: dict[str, Any]) -> str | None:
    item = _dict(_first(_dict(sub.get("items")).get("data")))
    price = _dict(item.get("price")) or _dict(sub.get("plan")) or _dict(item.get("plan"))
    candidates = (
        _dict(sub.get("metadata")).get("plan"),
        _dict(price.get("metadata")).get("plan"),
        price.get("lookup_key"),
        price.get("nickname"),
        price.get("id"),
    )
    return next((p for c in candidates if (p := _text(c))), None)


def _payment(kind: str, invoice: dict[str, Any]) -> dict[str, Any]:
    currency = invoice.get("currency")
    paid = kind == "invoice.paid"
    attempts = invoice.get("attempt_count")
    props = {
        "invoice_id": _text(invoice.get("id")),
        "amount": _amount(invoice.get("amount_paid" if paid else "amount_due"), currency),
        "currency": currency if type(currency) is str else None,
        "attempt_count": attempts if type(attempts) is int else None,
        "billing_reason": _text(invoice.get("billing_reason")),
        "next_payment_attempt": None if paid else _seconds_iso(invoice.get("next_payment_attempt")),
    }
    props = {k: v for k, v in props.items() if v is not None}
    return {"type": "track", "event": _STRIPE_PAYMENTS[kind], "properties": props}


def _subscription(
    kind: str, sub: dict[str, Any], previous: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The group call carrying the account's plan, renewal date and status, and the track."""
    period_end = sub.get("current_period_end")
    if period_end is None:  # API versions from 2025-03-31 keep it on the subscription item
        period_end = _dict(_first(_dict(sub.get("items")).get("data"))).get("current_period_end")
    status = _text(sub.get("status"))
    ending = status in ("canceled", "incomplete_expired") or sub.get("cancel_at_period_end")
    # a renewal that will not happen is cleared, so that no renewal trigger fires for it
    traits: dict[str, Any] = {"renewal_date": None if ending else _seconds_iso(period_end)}
    plan = _plan(sub)
    if plan is not None:
        traits["plan"] = plan
    if status is not None:
        traits["status"] = status
    props: dict[str, Any] = {"subscription_id": _text(sub.get("id")), **traits}
    if "items" in previous or "plan" in previous:
        props["previous_plan"] = _plan(previous)
    if "status" in previous:
        props["previous_status"] = _text(previous.get("status"))
    props = {k: v for k, v in props.items() if v is not None}
    group = {"type": "group", "traits": traits}
    track = {"type": "track", "event": _STRIPE_SUBSCRIPTIONS[kind], "properties": props}
    return group, track


def stripe(
    body: bytes, signature_header: str | None, secret: str, now_ms: int, tolerance_s: int = 300
) -> Parsed:
    """A Stripe webhook, after `verify_stripe_signature`: `invoice.payment_failed` and
    `invoice.paid` become `Payment Failed` / `Payment Succeeded`; `customer.subscription.*` a
    group call with the account's plan, renewal date and status, and a `Subscription ...` track
    event. Other event types are counted as ignored. The time is the event's `created`."""
    if len(body) > MAX_BATCH_BYTES:  # before hashing it
        raise TooLargeError(
            f"Stripe body is {len(body)} bytes, over the {MAX_BATCH_BYTES}-byte limit"
        )
    verify_stripe_signature(body, signature_header, secret, now_ms, tolerance_s)
    event = _decode(body, MAX_BATCH_BYTES, "Stripe")
    if type(event) is not dict:
        raise InputError("Stripe body is not a JSON object: send Stripe's event unmodified")
    out = Parsed()
    kind = event.get("type")
    if type(kind) is not str or (
        kind not in _STRIPE_PAYMENTS and kind not in _STRIPE_SUBSCRIPTIONS
    ):
        out.ignored += 1
        return out
    event_id = _text(event.get("id"))
    try:
        if event_id is None:
            raise EventError("Stripe event has no 'id': send Stripe's event unmodified")
        data = _dict(event.get("data"))
        obj = _dict(data.get("object"))
        (who, person), account = _stripe_people(obj)
        if kind in _STRIPE_PAYMENTS:
            messages = [_payment(kind, obj)]
        else:
            group, track = _subscription(kind, obj, _dict(data.get("previous_attributes")))
            group.update(groupId=account, messageId=f"{event_id}:group")
            messages = [group, track]
        created = event.get("created")
        client_ms = created * 1000 if type(created) is int else None
        for msg in messages:
            msg[who] = person
            msg.setdefault("messageId", event_id)
            if msg["type"] == "track":
                msg["context"] = {"groupId": account}
            _accept(out, msg, client_ms, None, now_ms, iso(now_ms))
    except EventError as exc:
        out.rejected.append(Rejection(0, exc.message, event_id))
    return out
