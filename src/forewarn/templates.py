"""Templates: the words of an outreach message, from a trigger's template files or its inline
text. Edge (reads files).

    action: {template: NAME}    <directory>/NAME.txt   the text, required; a first line
                                                       "Subject: …" and a blank line give the title
                                <directory>/NAME.html  the HTML, optional
    action: {message: "text"}   the text; the title is its first line

Both are Jinja templates run in Jinja's sandbox (no attribute starting with `_`, no changing the
values given), so a playbook author can write `{{ traits.name }}` but never reach Python's
internals. A variable that is missing renders as nothing. HTML is autoescaped, then cleaned with
nh3, so a trait like `<script>` shows as text and nothing unsafe reaches a browser.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NoReturn

import jinja2
import msgspec
import nh3
from jinja2.environment import TemplateModule
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from forewarn.errors import ForewarnError

TITLE_LIMIT = 120  # characters of the first line that make a title
SUBJECT = "forewarn_subject"  # the variable a "Subject: …" line becomes


class TemplateError(ForewarnError):
    """A template is missing, does not parse, or tried something the sandbox forbids."""

    code = "invalid_template"


class Rendered(msgspec.Struct, frozen=True):
    title: str
    text: str
    html: str  # "" when there is no HTML template


def context(
    *,
    subject: str,
    trigger_id: str,
    trigger_description: str = "",
    traits: Mapping[str, Any] | None = None,
    account: Mapping[str, Any] | None = None,
    evidence: Mapping[str, Any] | None = None,
    unsubscribe_url: str = "",
) -> dict[str, Any]:
    """The variables a template sees, by the names the docs give them."""
    return {
        "subject": subject,
        "trigger": {"id": trigger_id, "description": trigger_description},
        "traits": dict(traits or {}),
        "account": dict(account or {}),
        "evidence": dict(evidence or {}),
        "unsubscribe_url": unsubscribe_url,
    }


class _Loader(jinja2.FileSystemLoader):
    def get_source(
        self, environment: jinja2.Environment, template: str
    ) -> tuple[str, str, Callable[[], bool]]:
        source, filename, uptodate = super().get_source(environment, template)
        if template.endswith(".txt"):
            source = _subject_as_variable(source)
        return source, filename, uptodate


class _Sandbox(ImmutableSandboxedEnvironment):
    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        # Jinja returns an undefined value that only fails when used further; say so at once
        raise SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__!r} value is not allowed"
        )


class Templates:
    """Renders a trigger's message; compiled templates are cached (files until they change)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._env = _Sandbox(
            loader=_Loader(directory) if directory is not None else None,
            autoescape=jinja2.select_autoescape(["html"], default_for_string=False),
            undefined=jinja2.ChainableUndefined,  # `traits.plan.name` is empty, not an error
        )
        self._inline = functools.lru_cache(maxsize=512)(self._compile_inline)

    def render(
        self,
        template: str | None,
        message: str | None,
        context: Mapping[str, Any],
        *,
        title: str | None = None,
    ) -> Rendered:
        """The message of a trigger whose action names a `template` or gives a `message`.
        `title`, a per-trigger setting, is a template too and wins over the Subject line."""
        if (template is None) == (message is None):
            raise TemplateError("an action needs exactly one of 'template' or 'message'")
        html = ""
        if template is not None:
            done = _run(self._file(f"{template}.txt"), context, f"template '{template}.txt'")
            page = self._optional(f"{template}.html")
            if page is not None:
                html = nh3.clean(str(_run(page, context, f"template '{template}.html'")))
        else:
            assert message is not None
            done = _run(self._inline(message), context, "the inline message")
        text, subject_line = str(done), str(getattr(done, SUBJECT, ""))
        if title is not None:
            subject_line = str(_run(self._inline(title), context, "the title setting"))
        return Rendered(_one_line(subject_line) or _first_line(text), text, html)

    def check(self, names: Iterable[str], messages: Iterable[str] = ()) -> list[str]:
        """What is wrong with these templates (by name) and inline messages: missing files,
        syntax errors. Empty when all is well."""
        problems: list[str] = []
        for name in dict.fromkeys(names):
            try:
                self._file(f"{name}.txt")
                self._optional(f"{name}.html")
            except TemplateError as exc:
                problems.append(exc.message)
        for text in dict.fromkeys(messages):
            try:
                self._inline(text)
            except TemplateError as exc:
                problems.append(exc.message)
        return problems

    def _file(self, name: str) -> jinja2.Template:
        try:
            return self._get(name)
        except jinja2.TemplateNotFound as exc:
            raise self._not_found(name, exc) from None

    def _optional(self, name: str) -> jinja2.Template | None:
        try:
            return self._get(name)
        except jinja2.TemplateNotFound as exc:
            if exc.name == name:
                return None
            raise self._not_found(name, exc) from None  # it includes a file that is not there

    def _get(self, name: str) -> jinja2.Template:
        if self.directory is None:
            raise TemplateError(
                f"template {name!r}: no template directory is configured; "
                "set one, or give the trigger an inline 'message'"
            )
        try:
            return self._env.get_template(name)  # compiled once, again when the file changes
        except jinja2.TemplateSyntaxError as exc:
            _syntax(exc, exc.filename or name)

    def _not_found(self, name: str, exc: jinja2.TemplateNotFound) -> TemplateError:
        return TemplateError(f"template {name!r}: no file {exc.name} in {self.directory}")

    def _compile_inline(self, source: str) -> jinja2.Template:
        try:
            return self._env.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            _syntax(exc, f"inline message {_one_line(source)[:40]!r}")


def _syntax(exc: jinja2.TemplateSyntaxError, where: str) -> NoReturn:
    raise TemplateError(f"{where}:{exc.lineno}: {exc.message}") from None


def _run(template: jinja2.Template, context: Mapping[str, Any], where: str) -> TemplateModule:
    """The rendered template: str() of it is the text; its top-level `set`s are attributes."""
    try:
        return template.make_module(dict(context))
    except SecurityError as exc:
        raise TemplateError(f"{where}: unsafe: {exc}") from None
    except jinja2.TemplateSyntaxError as exc:  # an included file that does not parse
        _syntax(exc, exc.filename or where)
    except (jinja2.TemplateError, ArithmeticError, LookupError, TypeError, ValueError) as exc:
        raise TemplateError(f"{where} failed: {exc}") from None


def _subject_as_variable(source: str) -> str:
    """'Subject: …' and a blank line opening a file become a variable (and no output); a
    comment keeps the line numbers of what follows."""
    m = re.match(r"subject:(.*)\r?\n[ \t]*\r?\n", source, flags=re.IGNORECASE)
    if m is None:
        return source
    head = f"{{% set {SUBJECT} %}}{m.group(1)}{{% endset %}}{{#\n\n#}}"
    return head + source[m.end() :]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _first_line(text: str) -> str:
    line = _one_line(next((ln for ln in text.splitlines() if ln.strip()), ""))
    return line if len(line) <= TITLE_LIMIT else line[: TITLE_LIMIT - 1].rstrip() + "…"
