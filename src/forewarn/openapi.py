"""The OpenAPI document of every route `api` serves, at `/openapi.json`.

One helper per kind of operation (`_ingest`, `_admin`, `_link`, `_open`); each says what it takes
(typed parameters, the request body's schema) and what it answers (the 200's schema, and the one
error shape otherwise). Schemas live in `openapi_schemas`. Links tell a client (and the fuzzer)
which answer supplies another operation's parameters.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import forewarn
from forewarn import ingest
from forewarn import openapi_schemas as s

Op = dict[str, Any]

WRITE, WRITE_QUERY, ADMIN = "writeKey", "writeKeyQuery", "adminKey"
SENTRY, SENTRY_QUERY = "sentryAuth", "sentryKey"
ANONYMOUS, IDENTITY = "widgetAnonymousId", "widgetIdentity"
ERRORS = {
    "400": "the request is not valid: the message says what to change",
    "401": "no key, or an unknown one",
    "403": "the wrong kind of key",
    "404": "no such route or object",
    "405": "the method is not allowed on this path",
    "413": "the body is over a size or count limit",
    "429": "over the workspace's rate limit: retry after `Retry-After` seconds",
}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": s.ref("Error")}}}


def _operation(
    summary: str,
    answer: s.Schema | None,
    params: list[dict[str, Any]] | None = None,
    body: s.Schema | None = None,
    body_required: bool = False,
    media: str = "application/json",
    errors: tuple[str, ...] = ("400", "404", "405"),
) -> Op:
    op: Op = {"summary": summary, "responses": {}}
    if answer is not None:
        op["responses"]["200"] = {
            "description": "the result",
            "content": {"application/json": {"schema": answer}},
        }
    for status in errors:
        op["responses"][status] = _error(ERRORS[status])
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = {"required": body_required, "content": {media: {"schema": body}}}
    return op


def _param(
    name: str, schema: s.Schema, where: str = "query", required: bool = False, about: str = ""
) -> dict[str, Any]:
    out = {"name": name, "in": where, "required": required or where == "path", "schema": schema}
    if about:
        out["description"] = about
    return out


def _ingest(
    summary: str,
    body: s.Schema,
    security: list[dict[str, list[str]]] | None,
    params: list[dict[str, Any]] | None = None,
    media: str = "application/json",
    answer: s.Schema | None = None,
) -> Op:
    """An ingest route: committed before it answers; bad events listed, never sinking a batch."""
    op = _operation(
        summary,
        answer or s.ref("Ingested"),
        params,
        body,
        body_required=True,
        media=media,
        errors=("400", "401", "403", "404", "405", "413", "429"),
    )
    if security is not None:
        op["security"] = security
    return op


def _admin(
    summary: str,
    answer: str,
    params: list[dict[str, Any]] | None = None,
    body: s.Schema | None = None,
    links: dict[str, Any] | None = None,
) -> Op:
    """An admin API route: the admin key as a bearer token, answers about its workspace only."""
    op = _operation(
        summary, s.ref(answer), params, body, errors=("400", "401", "403", "404", "405")
    )
    op["security"] = [{ADMIN: []}]
    if links:
        op["responses"]["200"]["links"] = links
    return op


def _link(
    summary: str,
    answer: s.Schema | None,
    body: s.Schema | None = None,
    other: tuple[str, str, str] | None = None,
) -> Op:
    """A signed link from a message: the token in the path is the credential. `other`: the
    (status, description, media type) it answers with instead of JSON."""
    op = _operation(summary, answer, [_param("token", TOKEN, "path")], body, body is not None)
    op["security"] = []
    if other is not None:
        status, description, media = other
        op["responses"][status] = {"description": description, "content": {media: {}}}
        if status != "200":
            op["responses"][status].pop("content")
    return op


def _open(summary: str, answer: s.Schema) -> Op:
    op = _operation(summary, answer, errors=("405",))
    op["security"] = []
    return op


def _follow(operation: str, **parameters: str) -> dict[str, Any]:
    """An OpenAPI link: these parameters of `operation` come from this answer."""
    return {"operationId": operation, "parameters": parameters}


TOKEN: s.Schema = {"type": "string", "minLength": 1}
SUBJECT = _param("subject", s.SUBJECT_ID, "path")
TRIGGER = _param("trigger", s.TRIGGER_ID, "path")
SCOPE = _param("scope", s.SCOPE, about="whose: a user (default) or an account")
LIMIT = {"type": "integer", "minimum": 1, "maximum": 10_000}


def _subject_links(subject: str) -> dict[str, Any]:
    return {
        "subject": _follow("getSubject", subject=subject),
        "inbox": _follow("getInbox", subject=subject),
    }


def paths() -> dict[str, Any]:
    write: list[dict[str, list[str]]] = [{WRITE: []}, {WRITE_QUERY: []}]
    out: dict[str, Any] = {}
    for kind in ingest.SEGMENT_ROUTES:
        body = s.SEGMENT_BATCH if kind == "batch" else s.SEGMENT_MESSAGE
        out[f"/v1/{kind}"] = {
            "post": _ingest(
                f"Segment tracking API: {kind}; the write key as the Basic-auth user name (or"
                " `writeKey` in the body)",
                body,
                [{WRITE: []}],
            )
        }
    for path, answer in (
        ("/batch/", None),
        ("/capture/", None),
        ("/i/v1/analytics/events", s.POSTHOG_V1),
    ):
        out[path] = {
            "post": _ingest(
                "PostHog capture; the write key as `api_key` in the body",
                s.POSTHOG_BODY,
                None,
                answer=answer,
            )
        }
    out["/api/{project}/envelope/"] = {
        "post": _ingest(
            "Sentry envelope: error events become `Error` events; the write key is the DSN's",
            s.SENTRY_ENVELOPE,
            [{SENTRY: []}, {SENTRY_QUERY: []}],
            [_param("project", {"type": "string", "pattern": "^[0-9]+$"}, "path")],
            media="application/x-sentry-envelope",
        )
    }
    out["/webhooks/tickets/{flavour}"] = {
        "post": _ingest(
            "Ticket webhook (generic, zendesk or freshdesk)",
            s.TICKETS_BODY,
            write,
            [_param("flavour", {"enum": s.TICKET_FLAVOURS}, "path")],
        )
    }
    signature = _param(
        "Stripe-Signature",
        {"type": "string", "minLength": 1},
        "header",
        required=True,
        about="Stripe's signature of the body with the endpoint's signing secret",
    )
    out["/webhooks/stripe"] = {
        "post": _ingest(
            "Stripe webhook, verified by `Stripe-Signature`", s.STRIPE_EVENT, write, [signature]
        )
    }
    out.update(admin_paths())
    link_paths(out)
    widget_paths(out)
    dashboard_paths(out)
    out["/healthz"] = {"get": _open("Liveness", s.ref("Health"))}
    out["/metrics"] = {
        "get": {
            "summary": "Prometheus metrics",
            "security": [],
            "responses": {
                "200": {"description": "text exposition", "content": {"text/plain": {}}},
                "405": _error(ERRORS["405"]),
            },
        }
    }
    out["/openapi.json"] = {"get": _open("This document", {"type": "object"})}
    return out


def admin_paths() -> dict[str, Any]:
    out: dict[str, Any] = {}
    firings_links = {
        **_subject_links("$response.body#/firings/0/subject"),
        "pause": _follow("pauseTrigger", trigger="$response.body#/firings/0/trigger"),
    }
    out["/api/v1/triggers"] = {
        "get": _admin(
            "The triggers of the loaded playbooks",
            "Triggers",
            links={
                "pause": _follow("pauseTrigger", trigger="$response.body#/triggers/0/id"),
                "resume": _follow("resumeTrigger", trigger="$response.body#/triggers/0/id"),
                "firings": _follow("getFirings", trigger="$response.body#/triggers/0/id"),
            },
        )
    }
    out["/api/v1/firings"] = {
        "get": _admin(
            "Firings, oldest first",
            "Firings",
            [
                _param("trigger", s.STRING, about="only this trigger's"),
                _param("subject", s.STRING, about="only this subject's"),
                _param("since", s.DATE_TIME, about="firings at or after this time"),
                _param("limit", {**LIMIT, "default": 1000}),
            ],
            links=firings_links,
        )
    }
    out["/api/v1/subjects/{subject}"] = {
        "get": _admin(
            "A user or account: traits, trigger states, recent firings", "Subject", [SUBJECT]
        ),
        "delete": _admin(
            "Forget a person (user id or anonymous id): remove everything kept about them and"
            " refuse their events from now on",
            "Forgotten",
            [SUBJECT],
        ),
    }
    out["/api/v1/audit"] = {
        "get": _admin(
            "The workspace's audit log of admin actions, newest first",
            "Audit",
            [
                _param("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}),
                _param(
                    "before",
                    {"type": "integer", "minimum": 1, "maximum": 2**63 - 1},
                    about="only rows before this id, to page back",
                ),
                _param("action", s.AUDIT_ACTION),
            ],
        )
    }
    out["/api/v1/subjects/{subject}/why"] = {
        "get": _admin(
            "Why a trigger did or did not fire for a subject",
            "Why",
            [SUBJECT, _param("trigger", s.TRIGGER_ID, required=True)],
        )
    }
    out["/api/v1/playbooks/reload"] = {"post": _admin("Reload the playbooks from disk", "Reloaded")}
    out["/api/v1/outreach"] = {
        "get": _admin(
            "Decided outreach, newest first, with its delivery status",
            "Outreach",
            [
                _param("subject", s.STRING, about="only this subject's"),
                _param("trigger", s.STRING, about="only this trigger's"),
                _param("status", s.STATUS),
                _param("limit", {**LIMIT, "default": 100}),
            ],
        )
    }
    out["/api/v1/reports"] = {
        "get": _admin(
            "Per trigger: decisions, outcomes of treated and held-out subjects, precision, recall",
            "Report",
            [_param("trigger", s.TRIGGER_ID), _param("since", {**s.DURATION, "default": "30d"})],
        )
    }
    out["/api/v1/backtests"] = {
        "post": _admin(
            "Start a backtest of the loaded playbooks over the server's log",
            "Backtest",
            body=s.BACKTEST,
            links={"read": _follow("getBacktest", id="$response.body#/id")},
        )
    }
    out["/api/v1/backtests/{id}"] = {
        "get": _admin(
            "A backtest: running, done (with its report) or failed",
            "Backtest",
            [_param("id", {"type": "integer", "minimum": 1}, "path")],
        )
    }
    out["/api/v1/triggers/overrides"] = {
        "get": _admin(
            "Triggers paused or in shadow since the playbooks loaded, and why", "Overrides"
        )
    }
    resume = _follow("resumeTrigger", trigger="$response.body#/trigger")
    out["/api/v1/triggers/{trigger}/pause"] = {
        "post": _admin(
            "Pause a trigger (or put it in shadow), with a reason",
            "Override",
            [TRIGGER],
            s.PAUSE,
            links={"resume": resume},
        )
    }
    out["/api/v1/triggers/{trigger}/resume"] = {
        "post": _admin("Lift a trigger's pause or shadow", "Override", [TRIGGER])
    }
    by_subject = _subject_links("$response.body#/subject")
    for verb, what, body, answer in (
        (
            "suppress",
            "Stop all outreach to a subject (an incident, say), until a time or lifted",
            s.SUPPRESS,
            "Suppression",
        ),
        ("unsuppress", "Lift a subject's suppression", s.SCOPE_ONLY, "Suppression"),
        (
            "unsubscribe",
            "Unsubscribe a subject from a channel, or from everything",
            s.CONSENT,
            "Consent",
        ),
        ("resubscribe", "Undo an unsubscribe", s.CONSENT, "Consent"),
    ):
        out[f"/api/v1/subjects/{{subject}}/{verb}"] = {
            "post": _admin(what, answer, [SUBJECT], body, links=by_subject)
        }
    out["/api/v1/subjects/{subject}/inbox"] = {
        "get": _admin("A subject's in-app inbox and chat openers", "Inbox", [SUBJECT, SCOPE])
    }
    out["/api/v1/subjects/{subject}/push-subscriptions"] = {
        "get": _admin("A subject's Web Push subscriptions", "PushSubscriptions", [SUBJECT, SCOPE]),
        "post": _admin(
            "Register a Web Push subscription (PushSubscription.toJSON()) for a subject",
            "Subscribed",
            [SUBJECT],
            s.PUSH_SUBSCRIPTION,
        ),
    }
    # the one admin body with required fields: an empty one is refused
    out["/api/v1/subjects/{subject}/push-subscriptions"]["post"]["requestBody"]["required"] = True
    ids = {
        ("/api/v1/triggers", "get"): "getTriggers",
        ("/api/v1/firings", "get"): "getFirings",
        ("/api/v1/subjects/{subject}", "get"): "getSubject",
        ("/api/v1/subjects/{subject}/inbox", "get"): "getInbox",
        ("/api/v1/backtests/{id}", "get"): "getBacktest",
        ("/api/v1/triggers/{trigger}/pause", "post"): "pauseTrigger",
        ("/api/v1/triggers/{trigger}/resume", "post"): "resumeTrigger",
    }
    for (path, method), op_id in ids.items():
        out[path][method]["operationId"] = op_id
    return out


def link_paths(out: dict[str, Any]) -> None:
    page = ("200", "an HTML page", "text/html")
    out["/u/{token}"] = {
        "get": _link(
            "The unsubscribe page: a button that posts; never unsubscribes", None, other=page
        ),
        "post": _link("One-click unsubscribe (RFC 8058): takes effect at once", None, other=page),
    }
    out["/o/{token}"] = {
        "get": _link(
            "An email opened: a 1x1 GIF; records `Message Opened` once",
            None,
            other=("200", "a 1x1 GIF", "image/gif"),
        )
    }
    out["/c/{token}"] = {
        "get": _link(
            "A link clicked: records `Message Clicked`, redirects to its URL",
            None,
            other=("302", "to the link's URL", ""),
        )
    }
    out["/e/{token}"] = {
        "post": _link(
            "An engagement from the widget or a push service worker",
            s.ref("Recorded"),
            s.ENGAGEMENT,
        )
    }


def widget_paths(out: dict[str, Any]) -> None:
    """The in-app widget's API: the workspace's (public) write key, and who the visitor is:
    a signed identity token, or the anonymous id the widget made up."""
    security: list[dict[str, list[str]]] = [
        {WRITE_QUERY: [], ANONYMOUS: []},
        {WRITE_QUERY: [], IDENTITY: []},
    ]

    def widget(summary: str, answer: str, params: Any = None, body: Any = None) -> Op:
        op = _operation(summary, s.ref(answer), params, body, errors=("400", "401", "404", "405"))
        op["security"] = security
        return op

    conversation = _param("id", {"type": "integer", "minimum": 1}, "path")
    out["/w/v1/events"] = {
        "post": widget(
            "Events from the widget: the visitor's, whatever the page claims",
            "Ingested",
            body=s.WIDGET_EVENTS,
        )
    }
    out["/w/v1/events"]["post"]["requestBody"]["required"] = True
    out["/w/v1/inbox"] = {"get": widget("The visitor's in-app messages", "WidgetInbox")}
    stream = widget(
        "The visitor's new in-app messages as server-sent events (`event: message`)",
        "WidgetInbox",
        [_param("since", {"type": "integer", "minimum": 0}, about="the last message id seen")],
    )
    stream["responses"]["200"] = {"description": "a stream", "content": {"text/event-stream": {}}}
    out["/w/v1/stream"] = {"get": stream}
    out["/w/v1/conversations/{id}"] = {
        "get": widget("A chat conversation of the visitor's", "Conversation", [conversation])
    }
    out["/w/v1/conversations/{id}/reply"] = {
        "post": widget(
            "The visitor's reply; answers the assistant's", "Answer", [conversation], s.REPLY
        )
    }
    out["/w/v1/conversations/{id}/reply"]["post"]["requestBody"]["required"] = True
    out["/widget.js"] = {"get": _open("The widget's script", {"type": "string"})}
    out["/widget.js"]["get"]["responses"]["200"]["content"] = {"text/javascript": {}}


def dashboard_paths(out: dict[str, Any]) -> None:
    """The dashboard's JSON twins: each page's data, from the same query as the page (with the
    admin key as a bearer token, or the dashboard's session)."""

    # the pages' filter forms send an empty field for "any": so do the twins
    def blank_or(schema: s.Schema) -> s.Schema:
        return {"anyOf": [schema, {"const": ""}]}

    since = [_param("since", blank_or(s.DURATION), about="the period, e.g. 7d (the default)")]
    trigger = _param("trigger", s.TRIGGER_ID, "path")
    subject = _param("subject", s.SUBJECT_ID, "path")
    for path, what, params in (
        ("/overview.json", "Dashboard overview: counts, firings per hour, latest firings", since),
        ("/triggers.json", "Dashboard triggers: status, volume, precision, lift, verdict", since),
        (
            "/triggers/{trigger}.json",
            "Dashboard trigger detail: rates with intervals, firings per day, reasons",
            [trigger, *since],
        ),
        ("/customers.json", "Dashboard: the customers fired for lately", []),
        (
            "/customers/{subject}.json",
            "Dashboard customer timeline; `why` explains a trigger",
            [subject, _param("why", blank_or(s.TRIGGER_ID))],
        ),
        (
            "/outreach.json",
            "Dashboard outreach log",
            [
                _param("trigger", {"type": "string"}),  # a filter: any text, blank for all
                _param("status", blank_or(s.STATUS)),
                _param("subject", {"type": "string"}),
            ],
        ),
        ("/outbox.json", "Dashboard outbox and the demo's captured emails", []),
        ("/backtests.json", "Dashboard backtests", []),
        (
            "/backtests/{id}.json",
            "Dashboard: one backtest",
            [_param("id", {"type": "integer", "minimum": 1}, "path")],
        ),
        ("/settings.json", "Dashboard settings: keys (prefixes), channels, policy", []),
    ):
        out[path] = {"get": _admin(what, "DashboardPage", params)}


def _components() -> dict[str, Any]:
    schemas: dict[str, Any] = {
        "Error": s.ERROR,
        "Ingested": s.INGESTED,
        "Firing": s.FIRING,
        "Trigger": s.TRIGGER,
        "DashboardPage": {"type": "object", "description": "the page's data, as it renders"},
        **s.ANSWERS,
    }
    return {
        "securitySchemes": {
            WRITE: {
                "type": "http",
                "scheme": "basic",
                "description": "the write key as the user name, no password",
            },
            WRITE_QUERY: {"type": "apiKey", "in": "query", "name": "key"},
            SENTRY: {
                "type": "apiKey",
                "in": "header",
                "name": "X-Sentry-Auth",
                "description": "`Sentry sentry_key=<write key>, ...` as Sentry SDKs send it",
            },
            SENTRY_QUERY: {"type": "apiKey", "in": "query", "name": "sentry_key"},
            ADMIN: {"type": "http", "scheme": "bearer", "description": "an admin key"},
            ANONYMOUS: {
                "type": "apiKey",
                "in": "query",
                "name": "anon",
                "description": "the anonymous id the widget made (8 to 100 characters)",
            },
            IDENTITY: {
                "type": "apiKey",
                "in": "query",
                "name": "token",
                "description": "the visitor's identity token: a JWT (HS256) the host's backend"
                " signs with the workspace's identity secret",
            },
        },
        "schemas": schemas,
    }


def _openapi() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "Forewarn", "version": forewarn.__version__},
        "paths": paths(),
        "components": _components(),
    }


OPENAPI = _openapi()


def subset(served: Iterable[tuple[str, str]], about: str) -> dict[str, Any]:
    """The document of a process that serves only these operations, (path, method) (the
    scale-out API process): the others are left out, and so are the links to them."""
    keep = set(served)
    doc = copy.deepcopy(OPENAPI)
    doc["info"]["description"] = about
    paths: dict[str, Any] = {}
    for path, operations in doc["paths"].items():
        kept = {m: op for m, op in operations.items() if (path, m) in keep}
        if kept:
            paths[path] = kept
    ids = {op.get("operationId") for ops in paths.values() for op in ops.values()}
    for ops in paths.values():
        for op in ops.values():
            answer = op["responses"].get("200", {})
            links = {
                n: link for n, link in answer.get("links", {}).items() if link["operationId"] in ids
            }
            if links:
                answer["links"] = links
            else:
                answer.pop("links", None)
    doc["paths"] = paths
    return doc
