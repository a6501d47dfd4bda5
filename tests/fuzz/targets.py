"""Coverage-guided fuzzing (atheris) of what reads untrusted text: the event normaliser (every
ingest parser and the event decoder), the playbook parser and the threshold expression parser.

The property: any input is either accepted or refused with the project's own validation error
(`ForewarnError`, and `ExpressionError` from the expression parser); nothing else may escape, and
no input may take over a second (libFuzzer's `-timeout=1` turns a slow input into a failure).

    python -m tests.fuzz.targets TARGET [libFuzzer flags...] [corpus folders...]
    python -m tests.fuzz.targets --all SECONDS      # each target in turn (`make fuzz`)

`run(target, runs, seconds)` does that in a subprocess (atheris owns the process it fuzzes in)
with a seed corpus made from the examples, and returns the exit code and output.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ("events", "playbook", "expr")
NOW_MS = 1_795_000_000_000


def _events() -> Callable[[bytes], None]:
    from forewarn import ingest, model, webhooks
    from forewarn.errors import ForewarnError

    def one(data: bytes) -> None:
        if not data:
            return
        choice, body = data[0] % 8, data[1:]
        try:
            if choice == 0:
                ingest.segment(body, "batch", NOW_MS)
            elif choice == 1:
                ingest.segment(body, ingest.SEGMENT_ROUTES[len(body) % 7], NOW_MS)
            elif choice == 2:
                ingest.posthog(body, NOW_MS, sent_at=None)
            elif choice == 3:
                ingest.sentry_envelope(body, NOW_MS)
            elif choice == 4:
                webhooks.tickets(body, webhooks.TICKET_FLAVOURS[len(body) % 3], NOW_MS)
            elif choice == 5:
                model.decode_event(body)
            elif choice == 6:
                ingest.sentry_key(body.decode("utf-8", "replace"), body.decode("latin-1"))
            else:
                webhooks.stripe(body, "t=1,v1=00", "whsec_x", NOW_MS)
        except ForewarnError:
            pass

    return one


def _playbook() -> Callable[[bytes], None]:
    from forewarn import playbook
    from forewarn.errors import PlaybookError

    def one(data: bytes) -> None:
        text = data.decode("utf-8", "replace")
        with contextlib.suppress(PlaybookError):
            playbook.parse_playbooks([("fuzz.yaml", text)])

    return one


def _expr() -> Callable[[bytes], None]:
    from forewarn import expr

    values = {"a": 3, "b": 0, "c": 1e308, "d": -2.5, "e": "text", "f": None, "g": 10**400}

    def lookup(root: str, path: tuple[str, ...]) -> object:
        return values.get(path[-1], {"x": 1})

    def one(data: bytes) -> None:
        try:
            parsed = expr.parse(data.decode("utf-8", "replace"))
        except expr.ExpressionError:
            return
        parsed.evaluate(lookup)

    return one


def _broken(kind: str) -> Callable[[bytes], None]:
    """Targets that fail on their seed, to show the runner reports what a real one would."""

    def one(data: bytes) -> None:
        if data.startswith(b"seed"):
            if kind == "crash":
                raise RuntimeError("a crash the fuzzer must report")
            time.sleep(3)

    return one


def _seeds(target: str, folder: Path) -> None:
    """A few valid inputs for the fuzzer to start from."""
    if target == "playbook":
        for i, path in enumerate(sorted((ROOT / "examples" / "playbooks").glob("*.yaml"))):
            (folder / f"seed{i}").write_bytes(path.read_bytes())
    elif target == "expr":
        for i, text in enumerate(
            ["traits.used / traits.limit", "-(properties.a + 2) * 3e2", "account.x.y - .5"]
        ):
            (folder / f"seed{i}").write_text(text)
    elif target.startswith("broken"):
        (folder / "seed").write_bytes(b"seed")
    else:
        for i, path in enumerate(sorted((ROOT / "examples" / "events").glob("*.jsonl"))[:3]):
            line = path.read_text().splitlines()[0].encode()
            (folder / f"seed{i}").write_bytes(b"\x05" + line)
            (folder / f"batch{i}").write_bytes(b"\x00" + b'{"batch": [' + line + b"]}")


def _words(target: str) -> list[str]:
    """The words of each input language, read from the code, for the fuzzer's dictionary."""
    from forewarn import expr, ingest, model, playbook

    if target == "playbook":
        return [
            "triggers:", "- id: t", "when:", "action:", "channel: email", "message: hi",
            *(f"{kind}:" for kind in playbook.CONDITION_KINDS),
            *playbook.COMPARATORS, "7d", "10m", "0s", "name: E", "where:", "within:", "for:",
            "window:", "baseline:", "value:", "traits.a / traits.b", "{", "}", "[", "]", "&a", "*a",
        ]  # fmt: skip
    if target.startswith("broken"):
        return []
    if target == "expr":
        return [*(f"{root}.x" for root in expr.ROOTS), "(", ")", "1e308", ".5", "-", "/"]
    return [
        *model.KINDS, *ingest.SEGMENT_ROUTES, '"type"', '"userId"', '"anonymousId"',
        '"groupId"', '"event"', '"timestamp"', '"sentAt"', '"messageId"', '"batch"',
        '"properties"', '"traits"', '"context"', '"api_key"', '"distinct_id"', '"$groups"',
        '"exception"', '"event_id"', '"tickets"', '"detail"', '"freshdesk_webhook"',
        "2026-11-23T10:00:00Z", "9999-12-31T23:59:59Z", "1e400", "null", "\n",
    ]  # fmt: skip


def run(target: str, runs: int, seconds: int) -> tuple[int, str]:
    """Fuzz `target` for at most `runs` inputs or `seconds`; returns (exit code, output)."""
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        _seeds(target, corpus)
        words = Path(tmp) / "words.dict"
        words.write_text("".join(f"{_quote(w)}\n" for w in _words(target)))
        dictionary = [f"-dict={words}"] if _words(target) else []
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.fuzz.targets",
                target,
                f"-runs={runs}",
                f"-max_total_time={seconds}",
                "-timeout=1",
                "-rss_limit_mb=2048",
                "-seed=1",
                *dictionary,
                str(corpus),
            ],
            cwd=tmp,
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=seconds + 120,
        )
    return done.returncode, done.stdout + done.stderr


def _quote(word: str) -> str:
    """A libFuzzer dictionary entry: quoted, quotes, backslashes and control bytes escaped."""
    escaped = (f"\\x{ord(c):02x}" if c in '"\\' or not c.isprintable() else c for c in word)
    return '"' + "".join(escaped) + '"'


def fuzz_all(seconds: int) -> int:
    """Each target for `seconds` (what `make fuzz` runs); prints each outcome, returns 1 if
    any failed."""
    failed = 0
    for target in TARGETS:
        code, output = run(target, 2**31 - 1, seconds)
        lines = output.splitlines()
        last = [x for x in lines if (x[1:2].isdigit() and x[0] == "#") or x.startswith("Done")][-2:]
        print(f"{target}: {'ok' if code == 0 else 'FAILED'}", *last, sep="\n  ", flush=True)
        if code != 0:
            print(output[-8000:])
            failed = 1
    return failed


def main() -> None:
    if sys.argv[1] == "--all":
        raise SystemExit(fuzz_all(int(sys.argv[2])))
    import atheris

    target = sys.argv[1]
    if target not in (*TARGETS, "broken-crash", "broken-slow"):
        raise SystemExit(f"unknown target {target!r}: give one of {', '.join(TARGETS)}")
    if target in TARGETS:  # coverage from the parsers' own code (the libraries are not)
        import msgspec  # noqa: F401
        import yaml  # noqa: F401

        with atheris.instrument_imports():
            import forewarn.expr
            import forewarn.ingest
            import forewarn.model
            import forewarn.playbook
            import forewarn.webhooks  # noqa: F401
    makers = {"events": _events, "playbook": _playbook, "expr": _expr}
    one = makers[target]() if target in makers else _broken(target.split("-")[1])
    atheris.Setup([sys.argv[0], *sys.argv[2:]], one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
