"""Composing the message a firing sends: rendered from the playbook's templates with the
subject's traits, signed links in it, and problems found before going live."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from forewarn import compose, links, store_outbox, store_sqlite
from forewarn.dedup import SeenIds
from forewarn.engine import Firing
from forewarn.errors import PlaybookError
from forewarn.live import LiveEngine
from forewarn.playbook import parse_playbooks
from forewarn.templates import Templates

from .factories import T0_MS, at, identify, track

ROOT = Path(__file__).resolve().parent.parent


def _triggers(text: str, file: str = "p.yaml") -> list[Any]:
    return parse_playbooks([(file, text)])


def _firing(trigger: str, channel: str, scope: str = "user", subject: str = "ann") -> Firing:
    return Firing(trigger, subject, scope, T0_MS, {"condition": "event"}, "send", None, channel)


def test_the_traits_a_template_names_are_kept(tmp_path):
    (tmp_path / "hi.txt").write_text("Hi {{ traits.first_name }} of {{ account['plan name'] }}")
    triggers = _triggers(
        "triggers:\n"
        "  - id: a\n    when: {event: {name: X}}\n    action: {channel: email, template: hi}\n"
        "  - id: b\n    scope: account\n    when: {event: {name: X}}\n"
        "    action: {channel: in_app, message: '{{ traits.seats }}'}\n"
    )
    assert compose.trait_names(triggers, tmp_path) == ({"first_name"}, {"plan name", "seats"})


def test_an_email_carries_its_unsubscribe_link_an_open_pixel_and_tracked_links(tmp_path):
    (tmp_path / "hi.txt").write_text(
        "Subject: Hi {{ traits.first_name }}\n\nGo {{ link('https://x.test/a') }}"
    )
    (tmp_path / "hi.html").write_text("<a href=\"{{ link('https://x.test/a') }}\">go</a>")
    (trigger,) = _triggers(
        "triggers:\n  - id: a\n    when: {event: {name: X}}\n"
        "    action: {channel: email, template: hi, from: 'Help <help@x.test>'}\n"
    )
    composer = compose.Composer(Templates(tmp_path), "https://fw.example.com/", "s3cret")
    m = composer(
        1, trigger, _firing("a", "email"), {"email": "ann@x.test", "first_name": "Ann"}, {}
    )
    assert (m.to, m.title, m.settings) == ("ann@x.test", "Hi Ann", {"from": "Help <help@x.test>"})
    unsubscribe = m.data["unsubscribe_url"]
    assert unsubscribe.startswith("https://fw.example.com/u/")
    assert links.read_token("s3cret", unsubscribe.rsplit("/", 1)[1]) == (1, "user", "ann", "email")
    tracked = m.text.split("Go ", 1)[1]
    sent, url = links.read_click("s3cret", tracked.rsplit("/", 1)[1])
    assert url == "https://x.test/a" and sent.key == store_outbox.idempotency_key(
        1, "a", "user", "ann", T0_MS, "email"
    )
    assert "/o/" in m.html and tracked in m.html
    with pytest.raises(links.LinkError):
        links.read_click("another secret", tracked.rsplit("/", 1)[1])


def test_in_app_gets_an_engagement_link_and_no_address(tmp_path):
    (trigger,) = _triggers(
        "triggers:\n  - id: a\n    description: Stuck?\n    when: {event: {name: X}}\n"
        "    action: {channel: in_app, message: 'Need help, {{ traits.first_name }}?'}\n"
    )
    composer = compose.Composer(Templates(None), "http://127.0.0.1:8750", "k")
    m = composer(1, trigger, _firing("a", "in_app"), {"email": "a@x.test", "first_name": "Ann"}, {})
    assert (m.to, m.title, m.text) == ("", "Stuck?", "Need help, Ann?")
    token = m.data["engagement_url"].rsplit("/", 1)[1]
    assert links.read_engagement("k", token).channel == "in_app"


def test_check_names_every_trigger_whose_message_cannot_render(tmp_path):
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "bad.txt").write_text("{% if %}")
    text = (
        "triggers:\n"
        "  - id: missing\n    when: {event: {name: X}}\n    action: {channel: email, template: gone}\n"
        "  - id: broken\n    when: {event: {name: X}}\n    action: {channel: email, template: bad}\n"
        "  - id: inline\n    when: {event: {name: X}}\n    action: {channel: chat, message: '{{ x'}\n"
    )
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(PlaybookError) as caught:
        compose.check(tmp_path, _triggers(text, str(tmp_path / "p.yaml")))
    found = [(p.trigger, p.line) for p in caught.value.problems]
    assert found == [("missing", 2), ("broken", 5), ("inline", 8)]


def test_the_example_playbooks_have_every_template():
    from forewarn.sources import load_playbooks

    playbooks = ROOT / "examples" / "playbooks"
    compose.check(playbooks, load_playbooks(playbooks))


def test_a_message_that_cannot_be_composed_is_a_dead_letter_not_a_stopped_engine(tmp_path):
    conn = store_sqlite.connect(tmp_path / "f.db")
    store_sqlite.ensure_workspace(conn, "default", 0)
    (trigger,) = _triggers(
        "triggers:\n  - id: a\n    when: {event: {name: X}}\n    action: {channel: email, template: gone}\n"
    )
    composer = compose.Composer(Templates(None), "http://h", "k")
    live = LiveEngine(conn, 1, [trigger], compose=composer)
    for i, msg in enumerate([identify(at(hours=11)), track("X", at(hours=12))]):
        store_sqlite.append_batches(
            conn,
            [store_sqlite.Append(1, "t", T0_MS + i, [msg], [str(msg["messageId"])])],
            SeenIds(),
        )
    live.step(T0_MS + 13 * 3_600_000)
    row = conn.execute("SELECT status, reason, detail FROM outbox").fetchone()
    assert row[:2] == ("dead", "failed") and "gone.txt" in row[2]
    assert live.cursor == 2  # the step went on
