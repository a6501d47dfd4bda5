"""The OpenAPI document of every route `api` serves, at `/openapi.json`."""

from __future__ import annotations

from typing import Any

import forewarn
from forewarn import ingest


def _op(
    summary: str,
    auth: str | None,
    params: list[dict[str, Any]] | None = None,
    body: bool = False,
    ok: str = "the result",
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {
            "200": {"description": ok, "content": {"application/json": {"schema": {}}}},
            "default": {
                "description": "an error, in the one error shape",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            },
        },
    }
    if auth is not None:
        op["security"] = [{auth: []}]
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    return op


def _param(name: str, where: str = "query", required: bool = False) -> dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "required": required or where == "path",
        "schema": {"type": "string"},
    }


def _openapi() -> dict[str, Any]:
    write, admin = "writeKey", "adminKey"
    paths: dict[str, Any] = {}
    for kind in ingest.SEGMENT_ROUTES:
        paths[f"/v1/{kind}"] = {
            "post": _op(
                f"Segment tracking API: {kind}",
                write,
                body=True,
                ok="committed; rejected events listed with reasons",
            )
        }
    for path in ("/batch/", "/capture/", "/i/v1/analytics/events"):
        paths[path] = {"post": _op("PostHog capture", None, body=True)}
    paths["/api/{project}/envelope/"] = {
        "post": _op(
            "Sentry envelope: error events become `Error` events",
            None,
            [_param("project", "path")],
            body=True,
        )
    }
    paths["/webhooks/tickets/{flavour}"] = {
        "post": _op(
            "Ticket webhook (generic, zendesk or freshdesk)",
            write,
            [_param("flavour", "path"), _param("key")],
            body=True,
        )
    }
    paths["/webhooks/stripe"] = {
        "post": _op(
            "Stripe webhook, verified by `Stripe-Signature`", write, [_param("key")], body=True
        )
    }
    paths["/api/v1/triggers"] = {"get": _op("The triggers of the loaded playbooks", admin)}
    paths["/api/v1/firings"] = {
        "get": _op(
            "Firings, oldest first",
            admin,
            [_param("trigger"), _param("subject"), _param("since"), _param("limit")],
        )
    }
    paths["/api/v1/subjects/{subject}"] = {
        "get": _op(
            "A user or account: traits, trigger states, recent firings",
            admin,
            [_param("subject", "path")],
        )
    }
    paths["/api/v1/subjects/{subject}/why"] = {
        "get": _op(
            "Why a trigger did or did not fire for a subject",
            admin,
            [_param("subject", "path"), _param("trigger", required=True)],
        )
    }
    paths["/api/v1/playbooks/reload"] = {"post": _op("Reload the playbooks from disk", admin)}
    paths["/api/v1/outreach"] = {
        "get": _op(
            "Decided outreach, newest first, with its delivery status",
            admin,
            [_param("subject"), _param("trigger"), _param("status"), _param("limit")],
        )
    }
    paths["/api/v1/reports"] = {
        "get": _op(
            "Per trigger: decisions, outcomes of treated and held-out subjects, precision, recall",
            admin,
            [_param("trigger"), _param("since")],
        )
    }
    paths["/api/v1/backtests"] = {
        "post": _op(
            "Start a backtest of the loaded playbooks over the server's log: body"
            " {since: 30d, triggers?: [...]}",
            admin,
            body=True,
        )
    }
    paths["/api/v1/backtests/{id}"] = {
        "get": _op(
            "A backtest: running, done (with its report) or failed", admin, [_param("id", "path")]
        )
    }
    paths["/api/v1/triggers/overrides"] = {
        "get": _op("Triggers paused or in shadow since the playbooks loaded, and why", admin)
    }
    trig = [_param("trigger", "path")]
    paths["/api/v1/triggers/{trigger}/pause"] = {
        "post": _op("Pause a trigger (or put it in shadow), with a reason", admin, trig, body=True)
    }
    paths["/api/v1/triggers/{trigger}/resume"] = {
        "post": _op("Lift a trigger's pause or shadow", admin, trig, body=True)
    }
    subject = [_param("subject", "path")]
    for verb, what in (
        ("suppress", "Stop all outreach to a subject (an incident, say), until a time or lifted"),
        ("unsuppress", "Lift a subject's suppression"),
        ("unsubscribe", "Unsubscribe a subject from a channel, or from everything"),
        ("resubscribe", "Undo an unsubscribe"),
    ):
        paths[f"/api/v1/subjects/{{subject}}/{verb}"] = {
            "post": _op(what, admin, subject, body=True)
        }
    paths["/api/v1/subjects/{subject}/inbox"] = {
        "get": _op("A subject's in-app inbox and chat openers", admin, [*subject, _param("scope")])
    }
    paths["/api/v1/subjects/{subject}/push-subscriptions"] = {
        "get": _op("A subject's Web Push subscriptions", admin, [*subject, _param("scope")]),
        "post": _op(
            "Register a Web Push subscription (PushSubscription.toJSON()) for a subject",
            admin,
            subject,
            body=True,
        ),
    }
    link = [_param("token", "path")]
    paths["/u/{token}"] = {
        "get": _op("The unsubscribe page: a button that posts; never unsubscribes", None, link),
        "post": _op("One-click unsubscribe (RFC 8058): takes effect at once", None, link),
    }
    paths["/o/{token}"] = {
        "get": _op("An email opened: a 1x1 GIF; records `Message Opened` once", None, link)
    }
    paths["/c/{token}"] = {
        "get": _op("A link clicked: records `Message Clicked`, redirects to its URL", None, link)
    }
    paths["/e/{token}"] = {
        "post": _op(
            "An engagement from the widget or a push service worker: body"
            " `{event: opened|clicked|dismissed|replied}`",
            None,
            link,
            body=True,
        )
    }
    # the dashboard's pages as JSON (docs/dashboard.md): also open to a signed-in session
    since = [_param("since")]
    for path, what, params in (
        ("/overview.json", "Dashboard overview: counts, firings per hour, latest firings", since),
        ("/triggers.json", "Dashboard triggers: status, volume, precision, lift, verdict", since),
        (
            "/triggers/{trigger}.json",
            "Dashboard trigger detail: rates with intervals, firings per day, reasons",
            [*trig, *since],
        ),
        ("/customers.json", "Dashboard: the customers fired for lately", []),
        (
            "/customers/{subject}.json",
            "Dashboard customer timeline; `why` explains a trigger",
            [*subject, _param("why")],
        ),
        (
            "/outreach.json",
            "Dashboard outreach log",
            [_param("trigger"), _param("status"), _param("subject")],
        ),
        ("/outbox.json", "Dashboard outbox and the demo's captured emails", []),
        ("/backtests.json", "Dashboard backtests", []),
        ("/backtests/{id}.json", "Dashboard: one backtest", [_param("id", "path")]),
        ("/settings.json", "Dashboard settings: keys (prefixes), channels, policy", []),
    ):
        paths[path] = {"get": _op(what, admin, params)}
    paths["/healthz"] = {"get": _op("Liveness", None)}
    paths["/metrics"] = {
        "get": {
            "summary": "Prometheus metrics",
            "responses": {"200": {"description": "text exposition"}},
        }
    }
    paths["/openapi.json"] = {"get": _op("This document", None)}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Forewarn", "version": forewarn.__version__},
        "paths": paths,
        "components": {
            "securitySchemes": {
                write: {
                    "type": "http",
                    "scheme": "basic",
                    "description": "the write key as the user name",
                },
                admin: {"type": "http", "scheme": "bearer"},
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["code", "message"],
                            "properties": {
                                "code": {"type": "string"},
                                "message": {"type": "string"},
                            },
                        }
                    },
                }
            },
        },
    }


OPENAPI = _openapi()
