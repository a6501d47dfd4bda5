"""The JSON Schemas of `/openapi.json`: request bodies, answers and parameter values, each as
the handler really reads or writes it (the document is fuzzed against the server, so a schema
that drifts from its handler fails the build)."""

from __future__ import annotations

from typing import Any

from forewarn import audit, ingest, links, privacy, store_outbox, webhooks

Schema = dict[str, Any]

# ISO 8601 as the server reads it (years 1970 to 9999; a missing zone is UTC)
ISO_TIME: Schema = {
    "type": "string",
    "pattern": r"^(19[7-9][0-9]|[2-9][0-9]{3})-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])"
    r"T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?(Z|[+-](0[0-9]|1[0-3]):00)?$",
    "examples": ["2026-11-23T10:00:00Z"],
}
# integer milliseconds since the epoch, within the same years
EPOCH_MS: Schema = {"type": "integer", "minimum": 0, "maximum": 253_402_300_799_999}
# what the admin API takes: RFC 3339, the zone required
DATE_TIME: Schema = {"type": "string", "format": "date-time", "examples": ["2026-11-23T18:00:00Z"]}
CLIENT_TIME: Schema = {"anyOf": [ISO_TIME, EPOCH_MS, {"type": "null"}]}
DURATION: Schema = {
    "type": "string",
    "pattern": "^0*[1-9][0-9]{0,11}[smhdw]$",
    "description": "a positive whole number and a unit: 30s, 10m, 3h, 7d, 2w",
    "examples": ["30d"],
}
TRIGGER_ID: Schema = {"type": "string", "pattern": "^[a-z0-9-]+$", "examples": ["storage-85"]}
SUBJECT_ID: Schema = {"type": "string", "minLength": 1, "examples": ["u1"]}
TEXT: Schema = {"type": "string", "pattern": r"\S"}  # not blank; kept to 500 characters
SCOPE: Schema = {"type": "string", "enum": list(links.SCOPES), "default": "user"}
STATUS: Schema = {"type": "string", "enum": [*store_outbox.STATUSES, "held_out"]}
AUDIT_ACTION: Schema = {"type": "string", "enum": list(audit.ACTIONS)}
FORGOTTEN_TABLES = privacy.TABLES


def obj(props: dict[str, Schema], required: tuple[str, ...] = (), extra: bool = False) -> Schema:
    """An object with these properties; `extra`: other keys are allowed (and ignored)."""
    out: Schema = {"type": "object", "properties": props, "additionalProperties": extra}
    if required:
        out["required"] = list(required)
    return out


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def array(items: Schema, max_items: int | None = None) -> Schema:
    out: Schema = {"type": "array", "items": items}
    if max_items is not None:
        out["maxItems"] = max_items
    return out


STRING, INT, NUMBER, BOOL = (
    {"type": "string"},
    {"type": "integer"},
    {"type": "number"},
    {"type": "boolean"},
)
ANY_OBJECT: Schema = {"type": "object"}

# --- request bodies -------------------------------------------------------------------------

# A batch item may be anything: a bad one is listed in `rejected`, never sinks its batch.
SEGMENT_BATCH = obj(
    {
        "batch": array({}, ingest.MAX_BATCH_EVENTS),
        "sentAt": CLIENT_TIME,
        "writeKey": nullable(STRING),
        "context": nullable(ANY_OBJECT),
    },
    ("batch",),
    extra=True,
)
SEGMENT_MESSAGE: Schema = {
    "type": "object",
    "description": "one Segment message; its problems are listed in `rejected`",
}
POSTHOG_BODY: Schema = {
    "anyOf": [
        array({}, ingest.MAX_BATCH_EVENTS),
        obj(
            {
                "batch": nullable(array({}, ingest.MAX_BATCH_EVENTS)),
                "api_key": {},
                "token": {},
                "sent_at": CLIENT_TIME,
            },
            extra=True,
        ),
    ],
    "description": "`{api_key, batch: [events]}`, a bare list of events, or one event; the"
    " write key is `api_key` (or `token`, or each event's `properties.token`)",
}
SENTRY_ENVELOPE: Schema = {
    "type": "string",
    "description": "a Sentry envelope: a JSON header line, then item headers and payloads",
}
TICKETS_BODY: Schema = {
    "type": ["object", "array"],
    "maxItems": ingest.MAX_BATCH_EVENTS,
    "description": "one ticket, a list of them, or `{tickets: [...]}` (generic); the"
    " helpdesk's own event otherwise",
}
STRIPE_EVENT: Schema = {
    "type": "object",
    "description": "Stripe's event, unmodified: its signature is checked, then `type` decides"
    " what it becomes (other types are counted as ignored); a problem with its fields is"
    " listed in `rejected`",
}
# the outreach routes' text, which holds no NUL character (PostgreSQL cannot store one)
NO_NUL = r"^[^\u0000]*$"
PLAIN: Schema = {"type": "string", "pattern": NO_NUL}
REASON: Schema = {"type": "string", "pattern": r"^[^\u0000]*[^\s\u0000][^\u0000]*$"}  # not blank
PAUSE = obj({"mode": {"enum": list(store_outbox.OVERRIDE_MODES)}, "reason": REASON})
SUPPRESS = obj({"scope": SCOPE, "reason": REASON, "until": DATE_TIME})
SCOPE_ONLY = obj({"scope": SCOPE})
CONSENT = obj({"scope": SCOPE, "channel": {"enum": list(links.CHANNELS), "default": "*"}})
BACKTEST = obj({"since": DURATION, "triggers": array(TRIGGER_ID)})
PUSH_SUBSCRIPTION = obj(
    {
        "scope": SCOPE,
        "endpoint": {"type": "string", "pattern": r"^https://[^\u0000]*$", "maxLength": 2000},
        "expirationTime": nullable(NUMBER),
        "keys": obj(
            {
                "p256dh": {"type": "string", "pattern": NO_NUL, "minLength": 1, "maxLength": 200},
                "auth": {"type": "string", "pattern": NO_NUL, "minLength": 1, "maxLength": 200},
            },
            ("p256dh", "auth"),
        ),
    },
    ("endpoint", "keys"),
)
ENGAGEMENT = obj(
    {
        "event": {"enum": ["opened", "clicked", "dismissed", "replied"]},
        "url": PLAIN,
        "text": PLAIN,
    },
    ("event",),
)

WIDGET_EVENTS = obj(
    {"batch": array({})},
    ("batch",),
    extra=True,
)
REPLY = obj({"text": TEXT}, ("text",))

# --- answers --------------------------------------------------------------------------------

ERROR = obj(
    {
        "error": obj(
            {"code": STRING, "message": STRING, "problems": array(ANY_OBJECT)},
            ("code", "message"),
        )
    },
    ("error",),
)
REJECTED = array(obj({"index": INT, "reason": STRING}, ("index", "reason")))
INGESTED = obj(
    {
        "success": BOOL,
        "accepted": INT,
        "duplicates": INT,
        "rejected": REJECTED,
        "flagged": array(INT),
        "status": INT,
        "id": nullable(STRING),
    },
    ("success", "accepted", "duplicates", "rejected", "flagged"),
)
POSTHOG_V1 = {"type": "object"}
FIRING = obj(
    {
        "trigger": STRING,
        "subject": STRING,
        "scope": SCOPE,
        "at": STRING,
        "evidence": {},
        "decision": STRING,
        "reason": nullable(STRING),
        "channel": nullable(STRING),
        "send_at": nullable(STRING),
    },
    ("trigger", "subject", "scope", "at", "evidence", "decision", "reason", "channel"),
)
TRIGGER = obj(
    {
        "id": TRIGGER_ID,
        "scope": SCOPE,
        "mode": STRING,
        "channel": STRING,
        "priority": NUMBER,
        "holdout": NUMBER,
        "description": nullable(STRING),
        "summary": STRING,
    },
    ("id", "scope", "mode", "channel"),
)
ANSWERS: dict[str, Schema] = {
    "Triggers": obj({"triggers": array(ref("Trigger"))}, ("triggers",)),
    "Firings": obj({"firings": array(ref("Firing"))}, ("firings",)),
    "Subject": obj(
        {
            "id": STRING,
            "as": array(ANY_OBJECT),
            "events": array(ANY_OBJECT),
            "firings": array(ref("Firing")),
        },
        ("id", "as", "events", "firings"),
    ),
    "Why": ANY_OBJECT,
    "Reloaded": obj({"reloaded": BOOL, "triggers": array(STRING)}, ("reloaded", "triggers")),
    "Outreach": obj({"outreach": array(ANY_OBJECT)}, ("outreach",)),
    "Report": ANY_OBJECT,
    "Backtest": obj(
        {
            "id": INT,
            "status": {"enum": ["running", "done", "failed"]},
            "since": STRING,
            "triggers": array(STRING),
            "created": STRING,
            "done": STRING,
            "result": ANY_OBJECT,
        },
        ("id", "status"),
    ),
    "Overrides": obj({"overrides": {"type": "object"}}, ("overrides",)),
    "Override": obj(
        {"trigger": STRING, "mode": nullable(STRING), "reason": STRING, "resumed": BOOL},
        ("trigger", "mode"),
    ),
    "Suppression": obj(
        {
            "subject": STRING,
            "scope": SCOPE,
            "suppressed": BOOL,
            "stopped": INT,
            "lifted": BOOL,
        },
        ("subject", "scope", "suppressed"),
    ),
    "Consent": obj(
        {"subject": STRING, "channel": STRING, "unsubscribed": BOOL, "stopped": INT},
        ("subject", "channel", "unsubscribed"),
    ),
    "Inbox": obj(
        {"subject": STRING, "scope": SCOPE, "messages": array(ANY_OBJECT)},
        ("subject", "scope", "messages"),
    ),
    "PushSubscriptions": obj(
        {"subject": STRING, "scope": SCOPE, "subscriptions": array(ANY_OBJECT)},
        ("subject", "scope", "subscriptions"),
    ),
    "Subscribed": obj(
        {"subject": STRING, "scope": SCOPE, "subscribed": BOOL}, ("subject", "scope", "subscribed")
    ),
    "Recorded": obj({"recorded": STRING}, ("recorded",)),
    "Forgotten": obj(
        {
            "forgotten": BOOL,
            "hash": STRING,
            "events": INT,
            "batches": INT,
            "checkpointed": BOOL,
            **{table: INT for table in FORGOTTEN_TABLES},
            # the scale-out mode's: partitions dropped, their events queued to rebuild them, and
            # the dead letters holding the person
            "partitions": INT,
            "requeued": INT,
            "dead_letters": INT,
        },
        ("forgotten", "hash", "events", "batches", "checkpointed", *FORGOTTEN_TABLES),
    ),
    "Audit": obj(
        {
            "audit": array(
                obj(
                    {
                        "id": INT,
                        "at": STRING,
                        "actor": STRING,
                        "action": AUDIT_ACTION,
                        "target": STRING,
                        "detail": ANY_OBJECT,
                    },
                    ("id", "at", "actor", "action", "target", "detail"),
                )
            )
        },
        ("audit",),
    ),
    "Health": obj({"ok": BOOL}, ("ok",)),
    "WidgetInbox": obj({"messages": array(ANY_OBJECT)}, ("messages",)),
    "Conversation": obj(
        {"id": INT, "escalated": BOOL, "messages": array(ANY_OBJECT)},
        ("id", "escalated", "messages"),
    ),
    "Answer": obj(
        {"text": STRING, "answered": BOOL, "escalated": BOOL}, ("text", "answered", "escalated")
    ),
}
TICKET_FLAVOURS = list(webhooks.TICKET_FLAVOURS)
