"""The documentation in docs/ describes the code as it is.

Everything checked here is read from the code, never from a list kept in this file: the
commands and options of `cli.build_parser()`, the trigger keys and condition kinds of
`forewarn.playbook`, the keys each condition accepts (from the parser's own "allowed:" message),
the defaults the parser applies, the fields of a firing and of its evidence, the decision
reasons of `forewarn.decide`, and the message types of `forewarn.model`. Examples in the docs
are run: YAML playbooks must parse (or fail with the error they claim), JSON events must be
accepted, and every `forewarn ...` command line must parse.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from forewarn import cli, decide, engine, model
from forewarn import playbook as pb
from forewarn.errors import PlaybookError

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = tuple(sorted(p.name for p in DOCS.glob("*.md")))  # every page, index.md links each
MINIMAL_ACTION = "{channel: email, message: hi}"


# --- reading markdown -------------------------------------------------------------------------


def doc(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


@dataclass
class Section:
    level: int
    title: str
    body: str  # everything under the heading, subsections included
    own: str  # up to the first subsection

    def names(self) -> list[str]:
        """The `code` spans of the heading, e.g. ['spike'] for '### `spike`'."""
        return re.findall(r"`([^`]+)`", self.title)


def sections(text: str) -> list[Section]:
    """Every heading with the text under it, up to the next heading of its level or higher.
    Lines inside fenced code blocks are never headings."""
    heads: list[tuple[int, int, str]] = []
    lines = text.splitlines()
    fenced = False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"^(#{1,6}) (.+)$", line)):
            heads.append((i, len(m.group(1)), m.group(2).strip()))
    out = []
    for n, (i, level, title) in enumerate(heads):
        end = next((j for j, lv, _ in heads[n + 1 :] if lv <= level), len(lines))
        first = heads[n + 1][0] if n + 1 < len(heads) else len(lines)
        body, own = lines[i + 1 : end], lines[i + 1 : min(first, end)]
        out.append(Section(level, title, "\n".join(body), "\n".join(own)))
    return out


def section(text: str, title: str) -> Section:
    found = [s for s in sections(text) if s.title == title]
    assert found, f"no section titled {title!r}"
    return found[0]


def kind_section(text: str, name: str, level: int = 3) -> Section | None:
    """The section whose heading's first code span is `name`."""
    for s in sections(text):
        if s.level == level and s.names()[:1] == [name]:
            return s
    return None


def rows(body: str) -> dict[str, list[str]]:
    """Table rows keyed by the first code span of their first cell: {'window': [cells...]}."""
    out: dict[str, list[str]] = {}
    for line in body.splitlines():
        if not line.startswith("|") or re.match(r"^\|[\s|:-]+\|?$", line):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        m = re.match(r"`([^`]+)`", cells[0])
        if m:
            out.setdefault(m.group(1), cells)
    return out


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.M | re.S)


def code_spans(text: str) -> set[str]:
    return set(re.findall(r"`([^`]+)`", text))


# --- reading the code -------------------------------------------------------------------------


def subcommands() -> dict[str, argparse.ArgumentParser]:
    for action in cli.build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("build_parser() has no subcommands")


def long_options(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.Action]]:
    return [
        (opt, action)
        for action in parser._actions
        for opt in action.option_strings
        if opt.startswith("--")
    ]


def playbook_with(when: str, scope: str = "user", extra: str = "") -> str:
    return (
        "triggers:\n"
        "  - id: t\n"
        f"    scope: {scope}\n"
        f"    when: {when}\n"
        f"    action: {MINIMAL_ACTION}\n"
        f"{extra}"
    )


def parse_one(text: str) -> pb.Trigger:
    return pb.parse_playbooks([("t.yaml", text)])[0]


def allowed_keys(text: str, what: str) -> list[str] | None:
    """The keys the parser lists as allowed when given an unknown key 'zzz' in `what`; None when
    `what` takes no fixed keys."""
    try:
        pb.parse_playbooks([("t.yaml", text)])
    except PlaybookError as exc:
        m = re.search(rf"unknown key 'zzz' in {re.escape(what)}; allowed: (.*)$", exc.message)
        if m is None:
            return None
        found = re.findall(r'"([^"]+)"|\b([a-z_]+)\b', m.group(1))
        return [q or w for q, w in found if (q or w) not in ("and", "one", "of")]
    return None


def firing_and_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[dict[str, Any], str]:
    """One real firing as `forewarn replay` prints it, and the table's header line."""
    book = tmp_path / "p.yaml"
    book.write_text(playbook_with("{event: {name: X}}"), encoding="utf-8")
    events = tmp_path / "e.jsonl"
    line = {"type": "track", "userId": "u", "event": "X", "timestamp": "2026-01-01T00:00:00Z"}
    events.write_text(json.dumps(line) + "\n", encoding="utf-8")
    args = ["replay", "--playbooks", str(book), "--events", str(events)]
    assert cli.main(args) == 0
    firing = json.loads(capsys.readouterr().out.splitlines()[0])
    assert cli.main([*args, "--format", "table"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    return firing, header


# --- the pages --------------------------------------------------------------------------------


def test_every_page_exists_and_the_index_links_them():
    index = doc("index.md")
    for name in PAGES:
        assert (DOCS / name).is_file(), f"docs/{name} is missing"
        if name != "index.md":
            assert f"]({name})" in index, f"docs/index.md does not link {name}"


def _slug(title: str) -> str:
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def test_links_between_pages_resolve():
    anchors = {name: {_slug(s.title) for s in sections(doc(name))} for name in PAGES}
    for name in PAGES:
        for target in re.findall(r"\]\(([^)]+)\)", doc(name)):
            if target.startswith(("http://", "https://")):
                continue
            page, _, anchor = target.partition("#")
            page = page or name
            assert page in anchors, f"{name}: link to missing page {target}"
            if anchor:
                assert anchor in anchors[page], f"{name}: link to missing heading {target}"


# --- the command line -------------------------------------------------------------------------


def test_every_command_and_long_option_is_in_cli_md():
    text = doc("cli.md")
    for opt, _ in long_options(cli.build_parser()):
        assert f"`{opt}`" in text, f"cli.md does not mention {opt}"
    for name, parser in subcommands().items():
        assert f"| `forewarn {name}` |" in text, f"cli.md's command table lacks {name}"
        body = section(text, f"`forewarn {name}`").body
        table = {key.split()[0]: cells for key, cells in rows(body).items()}
        for opt, action in long_options(parser):
            if isinstance(action, argparse._HelpAction):
                continue
            assert opt in table, f"cli.md: no row for {name} {opt}"
            cells = table[opt]
            default = action.default
            if action.required:
                assert cells[1] == "required", f"cli.md: {name} {opt} is required"
            elif default not in (None, False, argparse.SUPPRESS):
                assert f"`{default}`" in cells[1], f"cli.md: {name} {opt} defaults to {default}"
            for choice in action.choices or ():
                assert str(choice) in " ".join(cells), f"cli.md: {name} {opt} allows {choice}"
        for action in parser._actions:
            if not action.option_strings:
                shown = {f"`{action.dest}`", f"`{action.metavar or action.dest.upper()}`"}
                assert any(s in c[0] for c in table.values() for s in shown), (
                    f"cli.md: no row for the {name} argument {action.dest}"
                )


def test_replay_output_is_described(tmp_path, capsys):
    firing, header = firing_and_table(tmp_path, capsys)
    text = doc("cli.md")
    fields = rows(section(text, "JSON lines").body)
    assert sorted(fields) == sorted(firing), "cli.md's JSON line fields differ from replay's"
    for example in blocks(text, "json"):
        assert sorted(json.loads(example)) == sorted(firing), "cli.md's example line is stale"
    table = section(text, "Table").body
    assert sorted(rows(table)) == sorted(header.split()), "cli.md's table columns differ"
    for example in blocks(table, "text"):
        assert example.splitlines()[0].split() == header.split(), "cli.md's example table"


def test_command_lines_in_the_docs_parse():
    parser = cli.build_parser()
    sources = [doc(name) for name in PAGES] + [(ROOT / "README.md").read_text(encoding="utf-8")]
    seen = 0
    for text in sources:
        for block in blocks(text, "sh"):
            for line in block.splitlines():
                for part in line.split("|"):
                    argv = shlex.split(part, comments=True)
                    if argv and argv[0].endswith("forewarn"):
                        parser.parse_args(argv[1:])  # exits (SystemExit) if it does not parse
                        seen += 1
    assert seen, "no forewarn command lines found in the docs"


# --- decisions --------------------------------------------------------------------------------


def test_every_decision_and_reason_is_described():
    body = section(doc("concepts.md"), "Decisions").body
    table = rows(body)
    for decision in (decide.SEND, decide.HELD_OUT, decide.SUPPRESSED):
        assert decision in table, f"concepts.md: decision {decision} is not described"
    for reason in decide.REASONS:
        assert reason in table, f"concepts.md: suppression reason {reason} is not described"
    cli_reason = rows(section(doc("cli.md"), "JSON lines").body)["reason"][1]
    for reason in decide.REASONS:
        assert f"`{reason}`" in cli_reason, f"cli.md: reason {reason} missing from the field"


# --- the playbook language --------------------------------------------------------------------


def test_every_trigger_key_is_in_the_reference():
    table = rows(section(doc("playbooks.md"), "Trigger keys").own)
    for key in pb._TRIGGER_KEYS:
        assert key in table, f"playbooks.md: trigger key {key} has no row"
    for key in table:
        assert key in pb._TRIGGER_KEYS, f"playbooks.md documents {key}, which the parser rejects"
    for key, values in (("scope", pb.SCOPES), ("mode", pb.MODES)):
        for value in values:
            assert f"`{value}`" in " ".join(table[key]), f"playbooks.md: {key} allows {value}"
    channel = rows(section(doc("playbooks.md"), "Action").body)["channel"]
    for value in pb.CHANNELS:
        assert f"`{value}`" in " ".join(channel), f"playbooks.md: channel allows {value}"


def test_every_duration_unit_is_listed():
    table = rows(section(doc("playbooks.md"), "Durations").body)
    assert sorted(table) == sorted(pb.UNITS_MS)


def test_every_condition_kind_has_a_section():
    text = doc("playbooks.md")
    conditions = section(text, "Conditions").body
    for kind in pb.CONDITION_KINDS:
        assert kind_section(text, kind), f"playbooks.md has no '### `{kind}`' section"
    for s in sections(conditions):
        if s.level == 3 and s.names():
            for name in s.names():
                assert name in pb.CONDITION_KINDS, (
                    f"playbooks.md documents a condition '{name}' the parser does not know"
                )


def test_every_key_the_parser_accepts_is_documented():
    text = doc("playbooks.md")
    checks: list[tuple[str, str, Section]] = [
        (
            "action",
            playbook_with("{ever: {name: X}}").replace(MINIMAL_ACTION, "{zzz: 1}"),
            section(text, "Action"),
        ),
        (
            "goal",
            playbook_with("{ever: {name: X}}", extra="    goal: {zzz: 1}\n"),
            section(text, "Goal and failure"),
        ),
    ]
    for kind in pb.CONDITION_KINDS:
        found = kind_section(text, kind)
        assert found is not None
        checks.append((kind, playbook_with(f"{{{kind}: {{zzz: 1}}}}"), found))
    for what, playbook_text, s in checks:
        keys = allowed_keys(playbook_text, what)
        if what in ("action", "goal"):  # these always have fixed keys: the message still parses
            assert keys, f"could not read the allowed keys of '{what}' from the parser's error"
        first_cells = " ".join(cells[0] for cells in rows(s.own).values())
        for key in keys or ():
            assert f"`{key}`" in first_cells or f'`"{key}"`' in first_cells, (
                f"playbooks.md: '{what}' accepts '{key}', which has no row in its section"
            )


PLACEHOLDERS = {"text": '"X"', "duration": "1d", "glob": '"/x*"', "trait name": "created_at"}


def _check_defaults(table: dict[str, list[str]], parsed: object, where: str) -> None:
    for key, cells in table.items():
        default = re.fullmatch(r"`([^`]+)`", cells[2])
        if default is None:
            continue
        attr = key if hasattr(parsed, key) else f"{key}_ms"
        actual = getattr(parsed, attr)
        if attr.endswith("_ms"):
            expected: Any = pb.parse_duration(default.group(1))
        else:
            expected = yaml.safe_load(default.group(1))
        assert actual == expected, f"playbooks.md: {where} {key} defaults to {actual!r}"


def test_documented_defaults_are_the_parsers():
    text = doc("playbooks.md")
    trigger = parse_one(playbook_with("{ever: {name: X}}").replace("    scope: user\n", ""))
    _check_defaults(rows(section(text, "Trigger keys").own), trigger, "trigger")
    for kind in pb.CONDITION_KINDS:
        found = kind_section(text, kind)
        assert found is not None
        table = rows(found.body)
        if not any(re.fullmatch(r"`[^`]+`", cells[2]) for cells in table.values()):
            continue
        required = []
        for key, cells in table.items():
            if cells[2] == "required":
                assert cells[1] in PLACEHOLDERS, f"no placeholder for a {cells[1]} in the test"
                required.append(f"{key}: {PLACEHOLDERS[cells[1]]}")
        cond = parse_one(playbook_with(f"{{{kind}: {{{', '.join(required)}}}}}")).when
        _check_defaults(table, cond, kind)


def _playbook_examples() -> list[tuple[str, str]]:
    return [
        (name, block)
        for name in PAGES
        for block in blocks(doc(name), "yaml")
        if re.search(r"^triggers:", block, flags=re.M)
    ]


def test_playbook_examples_parse_or_fail_as_documented():
    examples = _playbook_examples()
    assert any(name == "playbooks.md" for name, _ in examples)
    for name, block in examples:
        claimed = re.match(r"# error: (.+)\n", block)
        if claimed is None:
            try:
                pb.parse_playbooks([(name, block)])
            except PlaybookError as exc:
                pytest.fail(f"an example in docs/{name} does not parse:\n{exc.message}")
        else:
            with pytest.raises(PlaybookError) as caught:
                pb.parse_playbooks([(name, block)])
            assert claimed.group(1) in caught.value.message


def _evidence_fields(text: str, kind: str) -> set[str]:
    found = kind_section(text, kind)
    assert found is not None
    m = re.search(r"^Evidence: (.*?)(?:\n\n|\Z)", found.body, flags=re.M | re.S)
    if m is None:  # the evidence sentence may close a paragraph
        m = re.search(r"Evidence: (.*?)(?:\n\n|\Z)", found.body, flags=re.S)
    assert m is not None, f"playbooks.md: the {kind} section has no 'Evidence:' sentence"
    same = re.match(r"as for `([^`]+)`", m.group(1))
    return _evidence_fields(text, same.group(1)) if same else code_spans(m.group(1))


def test_evidence_fields_are_documented():
    """Every field a condition puts in a firing's evidence is named in its section's 'Evidence:'
    sentence; checked on the evidence of every example playbook in playbooks.md."""
    text = doc("playbooks.md")
    seen: set[str] = set()

    def walk(node: dict[str, Any], in_group: bool) -> None:
        kind = node["condition"]
        seen.add(kind)
        emitted = set(node) - {"condition"} - ({"true"} if in_group else set())
        missing = emitted - _evidence_fields(text, kind)
        assert not missing, f"playbooks.md: {kind} evidence lacks {sorted(missing)}"
        for part in node.get("of", []):
            walk(part, True)

    for name, block in _playbook_examples():
        if name != "playbooks.md" or block.startswith("# error:"):
            continue
        for trigger in pb.parse_playbooks([(name, block)]):
            state = engine.State(engine.Playbook([trigger]))
            state.subjects(trigger.scope == "account")["s"] = engine.Subject(0)
            walk(engine.explain(state, trigger.id, "s", 0)["evidence"], False)
    unseen = set(pb.CONDITION_KINDS) - seen
    assert not unseen, f"playbooks.md has no example playbook using {sorted(unseen)}"


# --- events -----------------------------------------------------------------------------------


def test_every_message_type_has_a_section_and_valid_example():
    text = doc("events.md")
    for kind in model.KINDS:
        found = kind_section(text, kind)
        assert found is not None, f"events.md has no '### `{kind}`' section"
        examples = blocks(found.body, "json")
        assert examples, f"events.md: the {kind} section has no example"
        for example in examples:
            assert model.event_from_dict(json.loads(example)).kind == kind


def test_every_json_block_in_the_docs_is_json():
    for name in PAGES:
        for block in blocks(doc(name), "json"):
            json.loads(block)


# --- the README quickstart --------------------------------------------------------------------


def _make_variables(makefile: str) -> dict[str, str]:
    found = re.findall(r"^([A-Z_]+)\s*[:?]?=\s*(.*)$", makefile, flags=re.M)
    return {name: value.strip() for name, value in found}


def _expand(text: str, variables: dict[str, str]) -> str:
    for _ in range(10):
        text = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), ""), text)
    return text


def _recipe(makefile: str, target: str) -> list[str]:
    m = re.search(rf"^{target}:.*\n((?:\t.*\n?)*)", makefile, flags=re.M)
    assert m, f"the Makefile has no '{target}' target"
    return [line.strip() for line in m.group(1).splitlines()]


def test_readme_quickstart_lines_exist():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = [line.strip() for block in blocks(readme, "sh") for line in block.splitlines()]
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for target in ("run", "test"):
        assert any(line.startswith(f"make {target}") for line in lines), (
            f"README.md lost its 'make {target}' line"
        )
        _recipe(makefile, target)


def test_make_run_commands_succeed(monkeypatch, capsys):
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    variables = _make_variables(makefile)
    monkeypatch.chdir(ROOT)
    ran = 0
    served = False
    for line in _recipe(makefile, "run"):
        argv = shlex.split(_expand(line, variables).split("|")[0])
        while argv and (argv[0] == "env" or re.match(r"^[A-Z_]+=", argv[0])):
            argv = argv[1:]  # the environment given to the command
        if argv and argv[0].endswith("/forewarn") and argv[1] in ("serve", "demo"):
            args = cli.build_parser().parse_args(argv[1:])  # it runs until stopped: parse only
            assert Path(args.playbooks or "examples/playbooks").exists()
            served = True
        elif argv and argv[0].endswith("/forewarn"):
            assert cli.main(argv[1:]) == 0, f"'make run' fails at: {line}"
            ran += 1
    assert ran, "the 'run' target runs no forewarn command"
    assert served, "the 'run' target does not start the server"
    out = capsys.readouterr().out
    assert "triggers valid" in out


def test_every_setting_is_in_deployment_md_with_its_default():
    from forewarn import settings

    table = rows(doc("deployment.md"))
    for name, default in settings.SETTINGS.items():
        variable = settings.PREFIX + name
        assert variable in table, f"deployment.md has no row for {variable}"
        shown = table[variable][1]
        assert (f"`{default}`" in shown) if default else shown == "none", (
            f"deployment.md: {variable} defaults to {default or 'nothing'}"
        )


def test_the_code_reads_no_setting_that_is_not_listed():
    from forewarn import settings

    used = set()
    for path in (ROOT / "src" / "forewarn").glob("*.py"):
        used.update(re.findall(r"FOREWARN_([A-Z_]+)", path.read_text(encoding="utf-8")))
    assert used <= set(settings.SETTINGS), sorted(used - set(settings.SETTINGS))
