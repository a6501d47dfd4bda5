"""The web dashboard at `/`, for support and success teams: server-rendered pages (Jinja2,
autoescaped, templates in `forewarn/pages/`), a little JavaScript for live counts and charts
(uPlot, vendored in `forewarn/static/`), and a strict Content-Security-Policy. Edge.

Every page is made from one dict (`dashboard_pages` loads it, from `dashboard_data` and
`dashboard_more`); the same path ending in `.json`, or asked for with `Accept:
application/json`, answers that dict: its JSON twin. Pages need a session (`dashboard_auth`:
sign in with an admin key); twins also take the admin key as `Authorization: Bearer`. Forms
post with the session's CSRF token and answer with a redirect.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, urlsplit

import jinja2
import msgspec
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from forewarn import (
    api_outreach,
    clock,
    dashboard_auth,
    dashboard_more,
    dashboard_pages,
    store_outbox,
    store_sqlite,
)
from forewarn.api_outreach import Run
from forewarn.dashboard_auth import Viewer
from forewarn.dashboard_store import call
from forewarn.errors import ForewarnError, InputError, NotFoundError, TooLargeError
from forewarn.playbook import parse_duration

if TYPE_CHECKING:
    from forewarn.api import Forewarn

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none';"
    " object-src 'none'"
)
HEADERS = {
    "content-security-policy": CSP,
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}
ASSETS = {
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
    "uplot.min.js": "text/javascript",
    "uplot.min.css": "text/css",
}
MAX_FORM_BYTES = 64 * 1024
NAV = (
    ("/", "Overview"),
    ("/triggers", "Triggers"),
    ("/customers", "Customers"),
    ("/backtests", "Backtests"),
    ("/outreach", "Outreach"),
    ("/outbox", "Outbox"),
    ("/settings", "Settings"),
)


class SignInNeeded(ForewarnError):
    status = 401
    code = "unauthorized"


class StaleForm(ForewarnError):
    status = 403
    code = "forbidden"


class KeyKept(ForewarnError):
    """A key that must not be revoked now (the last admin key, a key from the environment)."""

    status = 409
    code = "conflict"


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The dashboard's own templates (trusted, shipped with the package), autoescaped: a value
    from an event is always text on the page."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("forewarn", "pages"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["pct"] = _pct
    env.filters["segment"] = lambda v: quote(str(v), safe="")  # an id as one path segment
    return env


def _pct(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    return f"{float(value) * 100:.{digits}f}%"


def _wants_json(request: Request) -> bool:
    if request.url.path.endswith(".json"):
        return True
    accept = request.headers.get("accept", "")
    return "application/json" in accept and "text/html" not in accept


def _json(data: Any, status: int = 200) -> Response:
    return Response(
        msgspec.json.encode(data),
        status_code=status,
        media_type="application/json",
        headers={"cache-control": "no-store"},
    )


def _safe_next(target: str | None) -> str:
    """Where to go after a form: a path on this server, never another site."""
    # browsers drop tabs and newlines from URLs and read a backslash as a slash: "/\t/x" and
    # "/\\x" would lead to another host, so anything but a plain path goes home
    if not target or not _PLAIN_PATH.fullmatch(target):
        return "/"
    return target


Handler = Callable[[Request], Awaitable[Response]]
PageData = Callable[["Forewarn", Request, Viewer, Any], dict[str, Any]]


def routes(app: Forewarn, run: Run | None = None) -> list[Route]:
    """The pages; `run(fn, *args)` calls `fn` with a connection to the store (by default the
    embedded one; a scale-out API process gives `dashboard_pg.runner`)."""
    store: Run = run or api_outreach.sqlite_run(app.settings.db)

    def with_conn(fn: Callable[[Any], Any]) -> Awaitable[Any]:
        return store(fn)

    def viewer_of(conn: Any, request: Request) -> Viewer | None:
        value = request.cookies.get(dashboard_auth.COOKIE)
        now_s = clock.now_ms() // 1000
        return dashboard_auth.read(conn, dashboard_auth.secret(conn), value, now_s)

    async def who(request: Request) -> Viewer | None:
        if request.headers.get("authorization"):  # a script with the admin key: twins only
            key = app.admin_key(request)
            return Viewer(key.workspace, 0, key.prefix, "")
        found: Viewer | None = await with_conn(lambda conn: viewer_of(conn, request))
        return found

    def render(
        request: Request, name: str, data: dict[str, Any], viewer: Viewer | None
    ) -> Response:
        page = (
            environment()
            .get_template(name)
            .render(
                d=data,
                nav=NAV,
                path=request.url.path,
                query=request.url.query,
                viewer=viewer,
                csrf=viewer.csrf if viewer else "",
            )
        )
        return Response(page, media_type="text/html; charset=utf-8", headers=HEADERS)

    def friendly(handler: Handler) -> Handler:
        """A refusal or a mistake shown as a page to people, in the one JSON error shape to
        scripts."""

        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except ForewarnError as exc:
                if _wants_json(request):
                    raise
                data = {"title": _TITLES.get(exc.status, "Error"), "message": exc.message}
                data["back"] = "/signin" if exc.status == 401 else "/"
                response = render(request, "error.html", data, None)
                response.status_code = exc.status
                return response

        return run

    def page(template: str, load: PageData) -> Handler:
        @friendly
        async def handler(request: Request) -> Response:
            as_json = _wants_json(request)
            viewer = await who(request)
            if viewer is None:
                if as_json:
                    raise SignInNeeded(
                        "sign in first (POST /signin) or send `Authorization: Bearer <admin key>`"
                    )
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse(f"/signin?next={quote(target)}", status_code=303)
            data = await with_conn(lambda conn: load(app, request, viewer, conn))
            if as_json:
                return _json(data)
            return render(request, template, data, viewer)

        return handler

    # --- forms ---

    async def form(request: Request) -> dict[str, str]:
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_FORM_BYTES:
                raise TooLargeError(f"the form is over {MAX_FORM_BYTES} bytes")
        try:
            fields = parse_qs(raw.decode(), keep_blank_values=True, max_num_fields=200)
        except (UnicodeDecodeError, ValueError):
            raise InputError("the form could not be read: send it from the dashboard") from None
        return {k: v[-1] for k, v in fields.items()}

    def same_origin(request: Request) -> bool:
        """Whether a form came from this server's own pages (browsers send Origin with every
        POST; behind a proxy that ends TLS, the page's origin is FOREWARN_PUBLIC_URL's)."""
        origin = request.headers.get("origin")
        if origin is None:
            return True  # an old browser or a script: the CSRF token still has to match
        own = f"{request.url.scheme}://{request.url.netloc}"
        return origin == own or (origin != "" and origin == _public_origin())

    async def checked(request: Request) -> tuple[Viewer, dict[str, str]]:
        """The session and the fields of a form posted from the dashboard; anything else is
        refused: no session, a wrong or missing CSRF token, another site's origin."""
        fields = await form(request)
        viewer = await with_conn(lambda conn: viewer_of(conn, request))
        if viewer is None:
            raise SignInNeeded("your session has ended: sign in again at /signin")
        if not same_origin(request) or not dashboard_auth.same(viewer.csrf, fields.get("csrf")):
            raise StaleForm(
                "this form is stale or came from another site: reload the page and try again"
            )
        return viewer, fields

    @friendly
    async def signin(request: Request) -> Response:
        if request.method == "GET":
            target = _safe_next(request.query_params.get("next"))
            if await with_conn(lambda conn: viewer_of(conn, request)) is not None:
                return RedirectResponse(target, status_code=303)  # signed in already
            token = dashboard_auth.new_token()
            data = {"next": target, "error": None}
            response = render(request, "signin.html", {**data, "token": token}, None)
            _cookie(request, response, dashboard_auth.SIGNIN_COOKIE, token, 3600)
            return response
        fields = await form(request)
        target = _safe_next(fields.get("next"))
        expected = request.cookies.get(dashboard_auth.SIGNIN_COOKIE, "")
        if not same_origin(request) or not dashboard_auth.same(expected, fields.get("token")):
            raise StaleForm("the sign-in form is stale: reload /signin and try again")
        key = fields.get("key", "").strip()

        def find(conn: Any) -> tuple[str, str] | None:
            found = dashboard_auth.admin_key_id(conn, key) if key else None
            if found is None:
                return None
            key_id, workspace, _ = found
            return dashboard_auth.issue(
                dashboard_auth.secret(conn), key_id, workspace, clock.now_ms() // 1000
            )

        issued = await with_conn(find)
        if issued is None:
            token = dashboard_auth.new_token()
            data = {
                "next": target,
                "token": token,
                "error": "That is not an admin key of this server. Paste the admin key"
                " (it starts with fw_ak_); a write key cannot sign in.",
            }
            response = render(request, "signin.html", data, None)
            response.status_code = 401
            _cookie(request, response, dashboard_auth.SIGNIN_COOKIE, token, 3600)
            return response
        response = RedirectResponse(target, status_code=303)
        _cookie(request, response, dashboard_auth.COOKIE, issued[0], dashboard_auth.SESSION_S)
        response.delete_cookie(dashboard_auth.SIGNIN_COOKIE, path="/")
        return response

    @friendly
    async def signout(request: Request) -> Response:
        await checked(request)
        response = RedirectResponse("/signin", status_code=303)
        response.delete_cookie(dashboard_auth.COOKIE, path="/")
        return response

    @friendly
    async def trigger_action(request: Request) -> Response:
        viewer, fields = await checked(request)
        trigger = dashboard_pages.trigger_named(app, request)
        action = request.path_params["action"]
        if action not in ACTIONS:
            raise NotFoundError(f"no action '{action}': give one of {', '.join(ACTIONS)}")
        reason = (fields.get("reason") or "").strip()[:500]
        now = clock.now_ms()
        by = viewer.actor

        def write(conn: Any) -> None:
            if action == "resume":
                call(store_outbox.resume_trigger, conn, viewer.workspace, trigger.id, by, now)
                return
            mode = "paused" if action == "pause" else "shadow"
            said = reason or f"{mode} by hand"
            call(
                store_outbox.override_trigger,
                conn,
                viewer.workspace,
                trigger.id,
                mode,
                said,
                "dashboard",
                now,
                by,
            )

        await with_conn(write)
        return RedirectResponse(_safe_next(fields.get("next")), status_code=303)

    @friendly
    async def start_backtest(request: Request) -> Response:
        viewer, fields = await checked(request)
        since = fields.get("since") or "30d"
        try:
            span = parse_duration(since)
        except ValueError as exc:
            raise InputError(f"period {since!r}: {exc}; e.g. 30d") from None
        chosen = [t for t in app.engines.triggers if fields.get(f"t:{t.id}")]
        if not chosen:
            raise InputError("pick at least one trigger to backtest")
        now = clock.now_ms()
        span = min(span, now)  # longer than the epoch: the whole log
        job = await api_outreach.start_backtest(
            store, viewer.workspace, chosen, since, now - span, now
        )
        return RedirectResponse(f"/backtests/{job}", status_code=303)

    @friendly
    async def create_key(request: Request) -> Response:
        viewer, fields = await checked(request)
        kind = fields.get("kind", "")
        if kind not in store_sqlite.KEY_KINDS:
            raise InputError(f"kind {kind!r}: give one of {', '.join(store_sqlite.KEY_KINDS)}")
        name = (fields.get("name") or "").strip()[:100]
        if not name:
            raise InputError("give the key a name, e.g. 'support dashboard' or 'mobile app'")
        if name == store_sqlite.ENV_KEY_NAME:
            raise InputError(f"'{name}' names the keys set in the environment: choose another")

        def make(conn: Any) -> dict[str, Any]:
            now = clock.now_ms()
            token = call(
                store_sqlite.add_key, conn, viewer.workspace, kind, now, None, name, viewer.actor
            )
            data = dashboard_more.settings_view(conn, viewer.workspace)
            return {**data, "created": {"kind": kind, "name": name, "token": token}}

        data = await with_conn(make)  # the key is shown in this answer only: never again
        return render(request, "settings.html", data, viewer)

    @friendly
    async def revoke_key(request: Request) -> Response:
        viewer, _ = await checked(request)
        raw = request.path_params["id"]
        key_id = int(raw) if raw.isdigit() else -1
        refused = await with_conn(
            lambda conn: dashboard_auth.revoke(
                conn, viewer.workspace, key_id, clock.now_ms(), viewer.actor
            )
        )
        if refused is not None:
            raise KeyKept(refused)
        app.forget_keys()
        return RedirectResponse("/settings", status_code=303)

    @friendly
    async def customers_search(request: Request) -> Response:
        wanted = request.query_params.get("id", "").strip()
        if wanted and not _wants_json(request):
            if await who(request) is None:
                return RedirectResponse("/signin?next=/customers", status_code=303)
            return RedirectResponse(f"/customers/{quote(wanted, safe='')}", status_code=303)
        return await page("customers.html", dashboard_pages.customers)(request)

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in ASSETS:
            raise NotFoundError(f"no asset {name}")
        body = resources.files("forewarn").joinpath(f"static/{name}").read_bytes()
        return Response(
            body,
            media_type=ASSETS[name],
            headers={"cache-control": "public, max-age=3600", "x-content-type-options": "nosniff"},
        )

    overview_page = page("overview.html", dashboard_pages.overview)
    triggers_page = page("triggers.html", dashboard_pages.triggers)
    trigger_page = page("trigger.html", dashboard_pages.trigger)
    customer_page = page("customer.html", dashboard_pages.customer)
    outreach_page = page("outreach.html", dashboard_pages.outreach)
    outbox_page = page("outbox.html", dashboard_pages.outbox)
    backtests_page = page("backtests.html", dashboard_pages.backtests)
    backtest_page = page("backtest.html", dashboard_pages.backtest)
    settings_page = page("settings.html", dashboard_pages.settings)
    return [
        Route("/", overview_page, methods=["GET"]),
        Route("/overview.json", overview_page, methods=["GET"]),
        Route("/signin", signin, methods=["GET", "POST"]),
        Route("/signout", signout, methods=["POST"]),
        Route("/triggers", triggers_page, methods=["GET"]),
        Route("/triggers.json", triggers_page, methods=["GET"]),
        Route("/triggers/{trigger}", trigger_page, methods=["GET"]),
        Route("/triggers/{trigger}/{action}", trigger_action, methods=["POST"]),
        Route("/customers", customers_search, methods=["GET"]),
        Route("/customers.json", customers_search, methods=["GET"]),
        Route("/customers/{subject:path}", customer_page, methods=["GET"]),
        Route("/outreach", outreach_page, methods=["GET"]),
        Route("/outreach.json", outreach_page, methods=["GET"]),
        Route("/outbox", outbox_page, methods=["GET"]),
        Route("/outbox.json", outbox_page, methods=["GET"]),
        Route("/backtests", backtests_page, methods=["GET"]),
        Route("/backtests.json", backtests_page, methods=["GET"]),
        Route("/backtests", start_backtest, methods=["POST"]),
        Route("/backtests/{id}", backtest_page, methods=["GET"]),
        Route("/settings", settings_page, methods=["GET"]),
        Route("/settings.json", settings_page, methods=["GET"]),
        Route("/settings/keys", create_key, methods=["POST"]),
        Route("/settings/keys/{id}/revoke", revoke_key, methods=["POST"]),
        Route("/assets/{name}", asset, methods=["GET"]),
    ]


ACTIONS = ("pause", "shadow", "resume")
_PLAIN_PATH = re.compile(r"/(?:[^/\\\s\x00-\x1f\x7f][^\\\s\x00-\x1f\x7f]*)?")
_TITLES = {
    400: "Not understood",
    401: "Sign in",
    403: "Refused",
    404: "Not found",
    409: "Not done",
    413: "Too large",
}


def _public_origin() -> str:
    from forewarn import settings

    parts = urlsplit(settings.env("PUBLIC_URL") or "")
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else ""


def _cookie(request: Request, response: Response, name: str, value: str, max_age: int) -> None:
    from forewarn import settings

    secure = request.url.scheme == "https" or (settings.env("PUBLIC_URL") or "").startswith(
        "https:"
    )
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/",
        httponly=True,
        samesite="strict",
        secure=secure,
    )
