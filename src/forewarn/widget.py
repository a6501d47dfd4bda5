"""The widget API: what the in-app script (`/widget.js`) talks to, on behalf of one end user.
Edge.

The snippet in the host page gives the workspace's write key (public), and for a signed-in user
their id and an identity token: a JWT (HS256, with `sub` = the user id and `exp`) that the host's
backend signs with the workspace's identity secret (`forewarn keys identity`). With a valid
token the widget acts as that user; without one, only as the anonymous id it made up, and sees
only what was sent to that anonymous id. The token, never the id the page claims, decides whose
inbox and conversations are read: one user's token cannot read another's.

Events the widget sends go through the same ingest path as a server's Segment batch, with their
user id forced to the token's (or removed, without a token).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol

import jwt
import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from forewarn import clock, ingest, links, store_outbox, store_sqlite
from forewarn.errors import ForewarnError, InputError, NotFoundError
from forewarn.store_sqlite import Append, Key

if TYPE_CHECKING:
    from forewarn.api import Forewarn

STREAM_POLL_S = 0.5  # how often the stream looks for new messages: within 2 s of landing
KEEPALIVE_S = 15.0
MAX_REPLY_CHARS = 2_000
UNANSWERED_TO_ESCALATE = 2
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'self'"
)


class AuthError(ForewarnError):
    status = 401
    code = "unauthorized"


class Answer(Protocol):
    @property
    def text(self) -> str: ...

    @property
    def answered(self) -> bool: ...

    @property
    def escalate(self) -> bool: ...


class Answers(Protocol):
    """The assistant, as the widget uses it."""

    async def answer(
        self,
        question: str,
        *,
        context: Mapping[str, Any] | None = None,
        transcript: Sequence[tuple[str, str]] = ...,
    ) -> Answer: ...


def identity_secret(conn: Any, workspace: int) -> str:
    return store_outbox.secret(conn, f"identity:{workspace}")


def set_identity_secret(conn: Any, workspace: int, secret: str) -> None:
    conn.execute(store_outbox.SET_SECRET, (f"identity:{workspace}", secret))


def identity_setting(value: str | None) -> str | None:
    """`FOREWARN_IDENTITY_SECRET`, checked: None when unset (one is made on first use)."""
    if value and len(value.encode()) < 32:
        raise InputError(
            "FOREWARN_IDENTITY_SECRET is shorter than 32 bytes: HS256 needs at least 32; "
            "leave it unset and Forewarn makes one (forewarn keys identity prints it)"
        )
    return value or None


def read_identity(secret: str, token: str) -> str:
    """The user id a valid identity token vouches for; AuthError otherwise."""
    try:
        claims = jwt.decode(
            token, secret, algorithms=["HS256"], options={"require": ["exp", "sub"]}
        )
    except jwt.ExpiredSignatureError:
        raise AuthError(
            "the identity token has expired: get a fresh one from your backend"
        ) from None
    except jwt.PyJWTError as exc:
        raise AuthError(
            f"the identity token is not valid ({exc}): sign it with the "
            "workspace's identity secret, HS256, with sub and exp"
        ) from None
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise AuthError("the identity token's sub must be the user id")
    return subject


@dataclass(frozen=True)
class Visitor:
    """Who the widget speaks for."""

    key: Key
    subject: str
    signed_in: bool  # a verified user id; otherwise an anonymous id


def routes(
    app: Forewarn,
    assistant: Callable[[], Answers | None],
    run: Callable[..., Awaitable[Any]] | None = None,
) -> list[Route]:
    """`run(fn, *args)` calls a store function with a connection, as `api_outreach.routes`'s
    (a scale-out API process gives `outreach_pg.runner`)."""
    db = app.settings.db
    secrets: dict[int, str] = {}

    def sqlite_run(fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
        def job() -> Any:
            conn = store_sqlite.connect(db)
            try:
                return fn(conn, *args)
            finally:
                conn.close()

        return asyncio.to_thread(job)

    run = run or sqlite_run

    async def visitor(request: Request) -> Visitor:
        q, h = request.query_params, request.headers
        key = app.key(h.get("x-forewarn-key") or q.get("key"))
        if key is None or key.kind != "write":
            raise AuthError(
                "missing or unknown write key: give the widget the workspace's write key"
            )
        token = h.get("authorization", "").removeprefix("Bearer ").strip() or q.get("token")
        if token:
            secret = secrets.get(key.workspace)
            if secret is None:
                secret = secrets[key.workspace] = await run(identity_secret, key.workspace)
            return Visitor(key, read_identity(secret, token), True)
        anonymous = h.get("x-forewarn-anonymous-id") or q.get("anon") or ""
        if not 8 <= len(anonymous) <= 100:
            raise AuthError("without an identity token, give the anonymous id the widget made")
        # in a namespace of its own: an id a page makes up can never name a signed-in user
        return Visitor(key, ANONYMOUS_PREFIX + anonymous, False)

    async def events(request: Request) -> Response:
        who = await visitor(request)
        body = await _body(request)
        batch = body.get("batch")
        if not isinstance(batch, list):
            raise InputError('send {"batch": [...]}: the events as Segment messages')
        batch = [m for m in batch if isinstance(m, dict) and _allowed(m)]
        for message in batch:
            # the token decides who this is, never the page
            message.pop("userId", None)
            message.pop("user_id", None)
            if who.signed_in:
                message["userId"] = who.subject
            else:
                message["anonymousId"] = who.subject
        now = clock.now_ms()
        parsed = ingest.segment(msgspec.json.encode({"batch": batch}), "batch", now)
        return _json(await app.store(who.key, "widget", parsed, now))

    async def inbox(request: Request) -> Response:
        who = await visitor(request)
        rows = await run(store_outbox.inbox, who.key.workspace, "user", who.subject, 50)
        return _json({"messages": [_shown(r) for r in rows]})

    async def stream(request: Request) -> Response:
        who = await visitor(request)
        since = request.query_params.get("since", "0")
        last = int(since) if since.isdigit() else 0

        async def feed() -> AsyncIterator[bytes]:
            nonlocal last
            quiet = 0.0
            yield b"retry: 2000\n\n"
            while not await request.is_disconnected():
                rows = await run(
                    store_outbox.inbox_after, who.key.workspace, "user", who.subject, last
                )
                for row in rows:
                    last = row["id"]
                    data = msgspec.json.encode(_shown(row))
                    yield b"id: %d\nevent: message\ndata: %s\n\n" % (last, data)
                if rows:
                    quiet = 0.0
                else:
                    quiet += STREAM_POLL_S
                    if quiet >= KEEPALIVE_S:
                        quiet = 0.0
                        yield b": keepalive\n\n"
                await asyncio.sleep(STREAM_POLL_S)

        headers = {"cache-control": "no-store", "x-accel-buffering": "no"}
        return StreamingResponse(feed(), media_type="text/event-stream", headers=headers)

    async def conversation(request: Request) -> Response:
        who = await visitor(request)
        found = await _own_conversation(run, who, request)
        messages = await run(store_outbox.conversation_messages, found.id)
        return _json({"id": found.id, "escalated": found.escalated, "messages": messages})

    async def reply(request: Request) -> Response:
        who = await visitor(request)
        found = await _own_conversation(run, who, request)
        body = await _body(request)
        text = body.get("text")
        if set(body) - {"text"}:
            raise InputError('send {"text": "..."} and nothing else: the reply, as plain text')
        if not isinstance(text, str) or not text.strip():
            raise InputError('send {"text": "..."}: the reply, as plain text')
        text = text.strip()[:MAX_REPLY_CHARS]
        now = clock.now_ms()
        ws = who.key.workspace
        await run(store_outbox.add_conversation_message, ws, found.id, "user", text, now)
        sent = links.About(ws, "user", who.subject, found.trigger, "chat", found.key)
        await _record(app, sent, "Message Replied", {"text": text}, f"{found.key}:reply:{now}")
        history = await run(store_outbox.conversation_messages, found.id)
        # the turns before this one, as the assistant reads them
        transcript = [(m["author"].split(":")[0], m["text"]) for m in history[:-1]]
        helper = assistant()
        answer_text, answered, escalate = (
            "Thanks: a teammate will follow up with you here.",
            False,
            True,
        )
        if helper is not None and not found.escalated:
            answer = await helper.answer(text, context=found.context, transcript=transcript)
            answer_text, answered, escalate = answer.text, answer.answered, answer.escalate
        unsure = [m for m in history if m["author"] == "assistant:unsure"]
        if not answered and len(unsure) + 1 >= UNANSWERED_TO_ESCALATE:
            escalate = True
        author = "assistant" if answered else "assistant:unsure"
        if escalate and not found.escalated:
            answer_text = (
                (answer_text + "\n\n" if answered else "")
                + "I have passed this to our support team, with our conversation: they will "
                "get back to you."
            )
            author = "assistant"
        await run(store_outbox.add_conversation_message, ws, found.id, author, answer_text, now)
        escalated = found.escalated
        if escalate and not found.escalated:
            turns = [*transcript, ("user", text), ("assistant", answer_text)]
            escalated = await _escalate(app, run, sent, found.id, turns, now)
        return _json({"text": answer_text, "answered": answered, "escalated": escalated})

    async def script(request: Request) -> Response:
        source = resources.files("forewarn").joinpath("static/widget.js").read_bytes()
        headers = {"cache-control": "public, max-age=300", "x-content-type-options": "nosniff"}
        return Response(source, media_type="text/javascript", headers=headers)

    return [
        Route("/widget.js", script, methods=["GET"]),
        Route("/w/v1/events", events, methods=["POST"]),
        Route("/w/v1/inbox", inbox, methods=["GET"]),
        Route("/w/v1/stream", stream, methods=["GET"]),
        Route("/w/v1/conversations/{id}", conversation, methods=["GET"]),
        Route("/w/v1/conversations/{id}/reply", reply, methods=["POST"]),
    ]


async def _own_conversation(
    run: Callable[..., Awaitable[Any]], who: Visitor, request: Request
) -> store_outbox.Conversation:
    raw = request.path_params["id"]
    found = None
    if raw.isdigit():
        found = await run(
            store_outbox.conversation, who.key.workspace, "user", who.subject, int(raw)
        )
    if found is None:  # someone else's and one that does not exist look the same
        raise NotFoundError(f"no conversation {raw} for this user")
    assert isinstance(found, store_outbox.Conversation)
    return found


async def _record(
    app: Forewarn, sent: links.About, name: str, extra: dict[str, Any], message_id: str
) -> None:
    now = clock.now_ms()
    message = links.event_message(sent, name, now, extra, message_id)
    await app.writer.submit(Append(sent.workspace, "forewarn", now, [message], [message_id], None))


async def _escalate(
    app: Forewarn,
    run: Callable[..., Awaitable[Any]],
    sent: links.About,
    conversation_id: int,
    transcript: list[tuple[str, str]],
    now: int,
) -> bool:
    """Hand the conversation to people: a `Ticket Created` event with the transcript."""
    if not await run(store_outbox.escalate, conversation_id, now):
        return True  # already handed over
    text = "\n".join(f"{author.split(':')[0]}: {line}" for author, line in transcript)
    ticket = {
        "ticket_id": f"chat-{conversation_id}",
        "source": "forewarn-chat",
        "status": "new",
        "priority": "normal",
        "subject": f"Chat escalated from {sent.trigger}",
        "transcript": text[:20_000],
        "escalation": True,
    }
    await _record(app, sent, "Ticket Created", ticket, f"{sent.key}:escalated")
    return True


ANONYMOUS_PREFIX = "anon:"
# what only Forewarn itself (engagement, escalations), a helpdesk or the host's server may say
SERVER_ONLY_EVENTS = frozenset({"Ticket Created", "Ticket Solved"})
SERVER_ONLY_TYPES = frozenset({"alias", "group"})


def _allowed(message: dict[str, Any]) -> bool:
    """Whether a page may send this: not engagement with messages (Forewarn records it), not
    tickets, not identity merges or account memberships (those come from your server)."""
    kind = message.get("type")
    if kind in SERVER_ONLY_TYPES:
        return False
    name = message.get("event")
    return not (
        isinstance(name, str) and (name in SERVER_ONLY_EVENTS or name.startswith("Message "))
    )


def _shown(row: dict[str, Any]) -> dict[str, Any]:
    """An inbox message as the widget gets it: text only (the widget never renders HTML)."""
    return {
        "id": row["id"],
        "kind": row["kind"],
        "trigger": row["trigger"],
        "title": row["title"],
        "text": row["text"],
        "engagement_url": row["engagement_url"],
        "created": row["created_ms"],
        "read": row["read_ms"] is not None,
        "dismissed": row["dismissed_ms"] is not None,
    }


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > 512_000:
        raise InputError("the body is over 500 kB: send fewer events at a time")
    try:
        data = msgspec.json.decode(raw) if raw.strip() else {}
    except msgspec.DecodeError:
        raise InputError("the body is not JSON: send a JSON object") from None
    if not isinstance(data, dict):
        raise InputError("the body must be a JSON object")
    return data


def _json(data: Any) -> Response:
    return Response(
        msgspec.json.encode(data),
        media_type="application/json",
        headers={"cache-control": "no-store", "x-content-type-options": "nosniff"},
    )


class Cors:
    """CORS for the widget's routes (`/w/`), per workspace: an origin is let in when it is on
    the allowlist of the workspace whose write key the request carries (`?key=`, so that a
    preflight, which carries no header values, can be judged too)."""

    def __init__(self, app: Any, origins: Callable[[str | None], Awaitable[frozenset[str]]]):
        self.app = app
        self.origins = origins

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/w/"):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        origin = request.headers.get("origin")
        allowed = origin is not None and origin in await self.origins(
            request.query_params.get("key")
        )
        if scope["method"] == "OPTIONS" and "access-control-request-method" in request.headers:
            headers = {"vary": "Origin"}
            if allowed:
                headers.update(
                    {
                        "access-control-allow-origin": origin or "",
                        "access-control-allow-methods": "GET, POST",
                        "access-control-allow-headers": (
                            "authorization, content-type, x-forewarn-anonymous-id"
                        ),
                        "access-control-max-age": "600",
                    }
                )
            await Response(status_code=204 if allowed else 403, headers=headers)(
                scope, receive, send
            )
            return

        async def send_with_cors(message: Any) -> None:
            if message["type"] == "http.response.start" and allowed:
                headers = list(message.get("headers", []))
                headers.append((b"access-control-allow-origin", (origin or "").encode()))
                headers.append((b"vary", b"Origin"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_cors)


def origins_name(workspace: int) -> str:
    return f"origins:{workspace}"


def set_origins(conn: Any, workspace: int, origins: str) -> None:
    """The workspace's allowlist of web origins for the widget, comma-separated."""
    conn.execute(store_outbox.SET_SECRET, (origins_name(workspace), clean_origins(origins)))


def clean_origins(origins: str) -> str:
    return ",".join(o.strip().rstrip("/") for o in origins.split(",") if o.strip())


def get_origins(conn: Any, workspace: int) -> frozenset[str]:
    row = conn.execute(store_outbox.SECRET, (origins_name(workspace),)).fetchone()
    return origins_of(row[0] if row else "")


def origins_of(value: str) -> frozenset[str]:
    return frozenset(o for o in value.split(",") if o)


DEMO_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Helpdesk Cloud — demo</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/static/demo.css"></head>
<body>
<header><b>Helpdesk Cloud</b><nav>
<a data-nav href="/demo/">Dashboard</a>
<a data-nav href="/demo/kb/settings">Knowledge base settings</a>
<a data-nav href="/demo/search">Search</a></nav></header>
<main>
<section data-route="/"><h1>Dashboard</h1><div class="cards">
<div class="card"><h3>Open tickets</h3><p>14</p></div>
<div class="card"><h3>Articles</h3><p>126</p></div>
<div class="card"><h3>Searches today</h3><p>2,311</p></div></div></section>
<section data-route="/kb/settings" hidden><h1>Knowledge base settings</h1>
<label for="domain">Custom domain</label><input id="domain" placeholder="help.example.com">
<label for="visibility">Default article visibility</label>
<select id="visibility"><option>Public</option><option>Signed-in users</option></select>
<label for="synonyms">Search synonyms</label><input id="synonyms" placeholder="invoice, bill">
</section>
<section data-route="/search" hidden><h1>Search</h1>
<form id="search"><input id="q" placeholder="Search articles" aria-label="Search articles">
<button>Search</button></form><p id="results"></p></section>
</main>
<script src="/static/demo.js"></script>
<script src="/widget.js" data-key="{key}" data-user="{user}" data-token="{token}"
 data-path-prefix="/demo" data-heartbeat="{heartbeat}"></script>
</body></html>
"""


def demo_routes(app: Forewarn, write_key: str | None, user: str = "demo-user") -> list[Route]:
    """`/demo/`: a small app that looks like a SaaS product, the widget installed, signed in
    as `user` with a token the server signs itself. It needs the write key the server was
    started with (FOREWARN_WRITE_KEY)."""
    import html

    async def demo(request: Request) -> Response:
        if not write_key:
            return Response(
                "The demo needs the server started with FOREWARN_WRITE_KEY set.",
                status_code=503,
                media_type="text/plain",
            )
        key = app.key(write_key)
        if key is None:
            raise NotFoundError("the write key the server was started with is unknown")
        db = app.settings.db

        def sign() -> str:
            conn = store_sqlite.connect(db)
            try:
                secret = identity_secret(conn, key.workspace)
            finally:
                conn.close()
            claims = {"sub": user, "exp": int(clock.now_ms() / 1000) + 3600}
            return jwt.encode(claims, secret, algorithm="HS256")

        token = await asyncio.to_thread(sign)
        heartbeat = request.query_params.get("heartbeat", "15")
        page = DEMO_PAGE
        for name, value in (
            ("key", write_key),
            ("user", user),
            ("token", token),
            ("heartbeat", heartbeat if heartbeat.isdigit() else "15"),
        ):
            page = page.replace("{" + name + "}", html.escape(value))
        return Response(page, media_type="text/html", headers={"content-security-policy": CSP})

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        types = {"demo.js": "text/javascript", "demo.css": "text/css"}
        if name not in types:
            raise NotFoundError(f"no static file {name}")
        source = resources.files("forewarn").joinpath(f"static/{name}").read_bytes()
        return Response(source, media_type=types[name])

    return [
        Route("/demo", demo, methods=["GET"]),
        Route("/demo/{rest:path}", demo, methods=["GET"]),
        Route("/static/{name}", static, methods=["GET"]),
    ]
