"""Templates: files and inline messages rendered in Jinja's sandbox; HTML escaped and cleaned."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from forewarn.errors import ForewarnError
from forewarn.templates import Rendered, TemplateError, Templates, context


def folder(tmp_path: Path, **files: str) -> Templates:
    """Templates over a directory holding these files: folder(tmp_path, welcome_txt="...")."""
    for name, text in files.items():
        stem, _, ext = name.rpartition("_")
        (tmp_path / f"{stem}.{ext}").write_text(text, encoding="utf-8")
    return Templates(tmp_path)


def ctx(**traits: Any) -> dict[str, Any]:
    return context(
        subject="u1",
        trigger_id="storage-85",
        trigger_description="Approaching the storage limit",
        traits={"name": "Ada", "storage_used": 87, **traits},
        account={"name": "Acme", "plan": "pro"},
        evidence={"value": 0.87, "threshold": 0.85},
        unsubscribe_url="https://fw.example.com/u/abc",
    )


STORAGE_TXT = """\
Subject: {{ traits.name }}, your {{ account.plan }} plan is {{ (evidence.value * 100) | round | int }}% full

Hi {{ traits.name }},

{{ account.name }} has used {{ traits.storage_used }} GB ({{ trigger.description }}).
Stop these emails: {{ unsubscribe_url }}
"""
STORAGE_HTML = """\
<p>Hi {{ traits.name }},</p>
<p><b>{{ account.name }}</b> is at {{ evidence.value }} ({{ trigger.id }}, {{ subject }}).</p>
<p><a href="{{ unsubscribe_url }}">Unsubscribe</a></p>
"""


def test_a_template_file_gives_title_text_and_html(tmp_path):
    templates = folder(tmp_path, storage_txt=STORAGE_TXT, storage_html=STORAGE_HTML)
    rendered = templates.render("storage", None, ctx())
    assert rendered.title == "Ada, your pro plan is 87% full"
    assert rendered.text == (
        "Hi Ada,\n\nAcme has used 87 GB (Approaching the storage limit).\n"
        "Stop these emails: https://fw.example.com/u/abc"
    )
    assert "<b>Acme</b> is at 0.87 (storage-85, u1)" in rendered.html
    assert 'href="https://fw.example.com/u/abc"' in rendered.html


def test_without_an_html_file_there_is_no_html_and_without_a_subject_the_first_line(tmp_path):
    templates = folder(tmp_path, plain_txt="Hi {{ traits.name }}, a quick note.\nMore.")
    assert templates.render("plain", None, ctx()) == Rendered(
        "Hi Ada, a quick note.", "Hi Ada, a quick note.\nMore.", ""
    )


@pytest.mark.parametrize(
    ("source", "title", "text"),
    [
        ("Subject: Hi {{ traits.name }}\r\n\r\nBody", "Hi Ada", "Body"),
        ("subject:Hi\n \nBody\n", "Hi", "Body"),
        ("Subject: Hi\nBody", "Subject: Hi", "Subject: Hi\nBody"),  # no blank line: all body
        ("Body\nSubject: Hi\n\nmore", "Body", "Body\nSubject: Hi\n\nmore"),
    ],
)
def test_only_a_subject_line_opening_the_file_and_a_blank_line_make_the_title(
    tmp_path, source, title, text
):
    rendered = folder(tmp_path, note_txt=source).render("note", None, ctx())
    assert (rendered.title, rendered.text) == (title, text)


def test_an_inline_message_is_a_template_too_and_its_first_line_the_title():
    templates = Templates(None)
    message = "{{ traits.name }}, " + "x" * 200 + "\nsecond line"
    rendered = templates.render(None, message, ctx())
    assert rendered.text == message.replace("{{ traits.name }}", "Ada")
    assert rendered.html == ""
    assert len(rendered.title) == 120 and rendered.title.startswith("Ada, xxx")
    assert rendered.title.endswith("…")


def test_a_title_setting_wins_and_is_rendered(tmp_path):
    templates = folder(tmp_path, storage_txt=STORAGE_TXT)
    by_setting = templates.render("storage", None, ctx(), title="For {{ account.name }}")
    assert by_setting.title == "For Acme"
    assert by_setting.text.startswith("Hi Ada,")  # the Subject line is still not body
    assert templates.render(None, "hello", ctx(), title="Note\nfor you").title == "Note for you"


def test_missing_variables_render_empty(tmp_path):
    rendered = Templates(None).render(
        None, "[{{ nothing }}][{{ traits.missing }}][{{ account.owner.email }}]", ctx()
    )
    assert rendered.text == "[][][]"


def test_a_trait_never_breaks_the_title_into_lines(tmp_path):
    values = ctx(name="Ada\r\nBcc: x")
    templates = folder(tmp_path, note_txt="Subject: Hi {{ traits.name }}\n\nbody")
    assert templates.render("note", None, values).title == "Hi Ada Bcc: x"
    assert (
        templates.render(None, "x", values, title="Hi {{ traits.name }}").title == "Hi Ada Bcc: x"
    )
    assert templates.render(None, "Hi {{ traits.name }}", values).title == "Hi Ada"


# --- escaping, sanitising, the sandbox --------------------------------------------------------


def test_html_escapes_traits_and_the_text_keeps_them_as_they_are(tmp_path):
    templates = folder(
        tmp_path, note_txt="Hi {{ traits.name }}", note_html="<p>Hi {{ traits.name }}</p>"
    )
    rendered = templates.render("note", None, ctx(name="<script>alert(1)</script>"))
    assert "<script" not in rendered.html
    assert rendered.html == "<p>Hi &lt;script&gt;alert(1)&lt;/script&gt;</p>"
    assert rendered.text == "Hi <script>alert(1)</script>"


def test_html_is_cleaned_of_what_a_browser_would_run(tmp_path):
    page = (
        '<p onclick="steal()">Hi</p><script>alert(1)</script>'
        '<a href="javascript:steal()">x</a><img src="https://x.example/p.png" onerror="steal()">'
        "{{ traits.raw | safe }}"
    )
    templates = folder(tmp_path, page_txt="Hi", page_html=page)
    html = templates.render(
        "page", None, ctx(raw="<iframe src='https://evil.example'></iframe>")
    ).html
    for unsafe in ("onclick", "<script", "alert", "javascript:", "onerror", "<iframe"):
        assert unsafe not in html
    assert "<p>Hi</p>" in html and 'src="https://x.example/p.png"' in html


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__ }}",
        "{{ traits.__class__.__init__.__globals__ }}",
        "{{ traits['__class__'] }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{% set _ = traits.update({'name': 'Eve'}) %}{{ traits.name }}",
        "{{ traits.pop('name') }}",
    ],
)
def test_reaching_past_the_sandbox_is_a_template_error(source, tmp_path):
    values = ctx()
    with pytest.raises(TemplateError, match="unsafe") as caught:
        Templates(None).render(None, source, values)
    assert caught.value.message.startswith("the inline message: unsafe: access to attribute")
    assert values["traits"]["name"] == "Ada"  # nothing was changed either
    assert isinstance(caught.value, ForewarnError) and caught.value.code == "invalid_template"
    templates = folder(tmp_path, evil_txt="Hi\n" + source)
    with pytest.raises(TemplateError, match=r"^template 'evil\.txt': unsafe: "):
        templates.render("evil", None, ctx())


def test_a_runtime_failure_names_the_template():
    with pytest.raises(TemplateError, match=r"^the inline message failed: division by zero"):
        Templates(None).render(None, "{{ 1 / 0 }}", ctx())


# --- errors and check -------------------------------------------------------------------------


def test_a_syntax_error_names_file_and_line(tmp_path):
    templates = folder(tmp_path, broken_txt="Subject: hi\n\nline 3\n{{ traits.name }\nline 5")
    with pytest.raises(TemplateError) as caught:
        templates.render("broken", None, ctx())
    assert caught.value.message.startswith(f"{tmp_path / 'broken.txt'}:4: unexpected '}}'")
    html_broken = folder(tmp_path, ok_txt="fine", ok_html="<p>\n{{ traits.name }</p>")
    with pytest.raises(TemplateError, match=r"ok\.html:2: "):
        html_broken.render("ok", None, ctx())


def test_a_syntax_error_in_an_inline_message_names_the_line():
    with pytest.raises(
        TemplateError, match=r"^inline message 'Hi {{ traits.name':2: unexpected end"
    ):
        Templates(None).render(None, "Hi\n{{ traits.name", ctx())


def test_a_missing_template_and_a_missing_directory(tmp_path):
    with pytest.raises(TemplateError, match=r"template 'gone.txt': no file gone.txt in "):
        Templates(tmp_path).render("gone", None, ctx())
    with pytest.raises(TemplateError, match="no template directory is configured"):
        Templates(None).render("gone", None, ctx())
    with pytest.raises(TemplateError, match="exactly one of 'template' or 'message'"):
        Templates(tmp_path).render(None, None, ctx())
    with pytest.raises(TemplateError, match=r"no file ../secret.txt|no file"):
        Templates(tmp_path / "sub").render("../secret", None, ctx())


def test_check_lists_every_problem_and_nothing_when_all_is_well(tmp_path):
    templates = folder(
        tmp_path,
        good_txt=STORAGE_TXT,
        good_html=STORAGE_HTML,
        bad_txt="fine",
        bad_html="<p>{% for x in %}</p>",
    )
    assert templates.check(["good", "good"], ["Hi {{ traits.name }}"]) == []
    problems = templates.check(["good", "missing", "bad"], ["Hi {{ x", "fine"])
    assert len(problems) == 3
    missing, bad, inline = problems
    assert missing.startswith("template 'missing.txt': no file missing.txt")
    assert bad.startswith(f"{tmp_path / 'bad.html'}:1: ")
    assert inline.startswith("inline message 'Hi {{ x':1: ")
    assert Templates(None).check(["good"]) == [
        "template 'good.txt': no template directory is configured; "
        "set one, or give the trigger an inline 'message'"
    ]


def test_compiled_templates_are_cached_until_the_file_changes(tmp_path):
    templates = folder(tmp_path, note_txt="one")
    first = templates._file("note.txt")
    assert templates._file("note.txt") is first
    path = tmp_path / "note.txt"
    path.write_text("two", encoding="utf-8")
    os.utime(path, (path.stat().st_atime, path.stat().st_mtime + 10))
    assert templates.render("note", None, ctx()).text == "two"
    assert templates._inline("Hi {{ x }}") is templates._inline("Hi {{ x }}")
