"""Compose: the message a decided firing sends, rendered when it is decided. Edge.

The text comes from the trigger's template (files in `templates/` beside the playbooks) or its
inline `message`, rendered in the Jinja2 sandbox with the subject's traits, its account's, the
firing's evidence and, for email, the unsubscribe link. The rendered message is stored in the
outbox row, so every retry sends the same thing.

Only the traits that some trigger or the policy reads are kept by the engine; the traits a
template names (`traits.first_name`, `account.plan`) are kept for it too (`trait_names`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from forewarn import links, store_outbox
from forewarn.engine import Firing
from forewarn.errors import PlaybookError, Problem
from forewarn.playbook import Trigger
from forewarn.templates import Templates

TEMPLATES_DIR = "templates"
CUSTOMER_CHANNELS = ("email", "in_app", "push", "chat")
_NAMED = re.compile(r"\b(traits|account)\s*(?:\.\s*([A-Za-z_]\w*)|\[\s*['\"]([^'\"]+)['\"]\s*\])")


def templates_dir(playbooks: str | Path) -> Path:
    """`templates/` beside the playbooks: in the folder, or beside the one file."""
    path = Path(playbooks)
    return (path if path.is_dir() else path.parent) / TEMPLATES_DIR


def trait_names(triggers: Iterable[Trigger], directory: Path | None) -> tuple[set[str], set[str]]:
    """The traits (user, account) that the triggers' messages name."""
    user: set[str] = set()
    account: set[str] = set()
    for t in triggers:
        texts = [t.action.message or "", t.action.title or ""]
        if t.action.template and directory is not None:
            for suffix in (".txt", ".html"):
                file = directory / f"{t.action.template}{suffix}"
                if file.is_file():
                    texts.append(file.read_text(encoding="utf-8", errors="replace"))
        for text in texts:
            for root, dotted, quoted in _NAMED.findall(text):
                name = dotted or quoted
                # `traits` of an account trigger are the account's own
                if root == "account" or t.scope == "account":
                    account.add(name)
                else:
                    user.add(name)
    return user, account


class Composer:
    """Renders a decided firing into its outbox message."""

    def __init__(self, templates: Templates, public_url: str, secret: str) -> None:
        self.templates = templates
        self.public_url = public_url
        self.secret = secret

    def __call__(
        self,
        workspace: int,
        trigger: Trigger,
        firing: Firing,
        own: dict[str, Any],
        account: dict[str, Any],
    ) -> store_outbox.Message:
        channel = firing.channel
        traits = own if own is account else {**account, **own}
        key = store_outbox.idempotency_key(
            workspace, firing.trigger, firing.scope, firing.subject, firing.at_ms, channel
        )
        sent = links.About(workspace, firing.scope, firing.subject, firing.trigger, channel, key)
        base = self.public_url.rstrip("/")
        unsubscribe = ""
        if channel == "email":
            token = links.unsubscribe_token(
                self.secret, workspace, firing.scope, firing.subject, "email"
            )
            unsubscribe = links.unsubscribe_url(base, token)
        engagement = f"{base}/e/{links.engagement_token(self.secret, sent)}"

        def link(url: object) -> str:
            """A link that records `Message Clicked`, then goes to `url`."""
            if not isinstance(url, str) or not url.startswith(("https://", "http://")):
                return str(url)
            return f"{base}/c/{links.click_token(self.secret, sent, url)}"

        context = {
            "traits": own,
            "account": account,
            "evidence": firing.evidence,
            "trigger": {"id": trigger.id, "description": trigger.description},
            "subject": firing.subject,
            "unsubscribe_url": unsubscribe,
            "link": link,
        }
        title = trigger.action.title
        if title is None and trigger.action.message is not None and trigger.description:
            title = trigger.description  # better than the first line of an inline message
        rendered = self.templates.render(
            trigger.action.template, trigger.action.message, context, title=title
        )
        title = rendered.title or trigger.description or trigger.id
        data: dict[str, Any] = {"evidence": firing.evidence, "traits": traits}
        html = rendered.html
        if channel == "email":
            data["unsubscribe_url"] = unsubscribe
            if html:  # the open pixel
                pixel = f"{base}/o/{links.engagement_token(self.secret, sent)}"
                html += f'<img src="{pixel}" width="1" height="1" alt="">'
        elif channel != "webhook":
            data["engagement_url"] = engagement
        return store_outbox.Message(
            to=str(traits.get("email") or "") if channel == "email" else "",
            title=title,
            text=rendered.text,
            html=html,
            data=data,
            settings=dict(trigger.action.settings),
        )


def for_playbooks(
    conn: Any, playbooks: str | Path | None, triggers: list[Trigger]
) -> tuple[Composer, tuple[tuple[str, ...], tuple[str, ...]]]:
    """The composer for these playbooks (their `templates/`), and the traits it needs kept."""
    from forewarn import settings
    from forewarn.links import SECRET_NAME

    directory = templates_dir(playbooks) if playbooks is not None else None
    if directory is not None and not directory.is_dir():
        directory = None
    composer = Composer(
        Templates(directory),
        settings.env("PUBLIC_URL") or "",
        store_outbox.secret(conn, SECRET_NAME),
    )
    user, account = trait_names(triggers, directory)
    return composer, (tuple(sorted(user)), tuple(sorted(account)))


def check(playbooks: str | Path, triggers: list[Trigger]) -> None:
    """Every trigger's message renders: its template files exist and parse, its inline text
    and title parse. Raises PlaybookError naming each trigger that does not."""
    directory = templates_dir(playbooks)
    templates = Templates(directory if directory.is_dir() else None)
    problems = []
    for t in triggers:
        names = [t.action.template] if t.action.template else []
        texts = [x for x in (t.action.message, t.action.title) if x]
        for message in templates.check(names, texts):
            problems.append(Problem(t.file, t.line, t.id, message))
    if problems:
        raise PlaybookError(problems)
