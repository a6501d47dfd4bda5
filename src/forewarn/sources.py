"""Reading playbooks and recorded events from disk (an edge: the core never touches files)."""

from __future__ import annotations

import gc
import gzip
import sys
import zlib
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import IO

import msgspec

from forewarn.errors import EventError, InputError
from forewarn.model import (
    MAX_TIME_MS,
    Event,
    decode_event,
    decode_message,
    from_message,
    order_key,
)
from forewarn.playbook import Trigger, parse_playbooks

PLAYBOOK_SUFFIXES = (".yaml", ".yml")
CHUNK = 4_096  # events decoded at a time by `stream_events`


def playbook_files(path: str | Path) -> list[Path]:
    root = Path(path)
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.suffix in PLAYBOOK_SUFFIXES and p.is_file())
        if not files:
            raise InputError(f"no playbooks in {root}: add .yaml files with a 'triggers:' list")
        return files
    if root.is_file():
        return [root]
    raise InputError(f"playbook path {root} does not exist: give a .yaml file or a folder of them")


def load_playbooks(path: str | Path) -> list[Trigger]:
    """Parse a playbook file or every .yaml/.yml file below a folder."""
    sources = []
    for file in playbook_files(path):
        try:
            sources.append((str(file), file.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read playbook {file}: {exc}") from None
    return parse_playbooks(sources)


@dataclass
class Rejected:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: skipped: {self.reason}"


@dataclass
class EventBatch:
    events: list[Event] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    lines: int = 0
    duplicates: int = 0  # messages whose messageId was seen before: clients resend on retry
    in_order: bool = True  # already in `order_key` order as read
    after_until: int = 0  # events after the time asked for: not kept


def iter_lines(
    path: str | Path, progress: Callable[[int], None] | None = None
) -> Generator[bytes, None, None]:
    """The lines of a JSONL file, gzip or plain; `progress` gets compressed bytes read."""
    file = Path(path)
    if str(path) == "-":
        yield from sys.stdin.buffer
        return
    if not file.is_file():
        raise InputError(f"events file {file} does not exist: give a JSONL file (gzip accepted)")
    try:
        raw = file.open("rb")
    except OSError as exc:
        raise InputError(f"cannot read events file {file}: {exc}") from None
    with raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
        stream: IO[bytes] = gzip.GzipFile(fileobj=raw) if gzipped else raw  # type: ignore[assignment]
        raw.seek(0)
        try:
            if progress is None:
                yield from stream  # no per-line Python work: a replay reads millions
            else:
                for n, line in enumerate(stream):
                    if n % 65536 == 0:
                        progress(raw.tell())
                    yield line
        except (OSError, EOFError, zlib.error) as exc:
            raise InputError(f"events file {file} is damaged: {exc}") from None


def event_files(path: str | Path) -> list[Path]:
    """A JSONL file, or every .jsonl / .jsonl.gz file below a folder, in name order."""
    root = Path(path)
    if root.is_dir():
        files = sorted(
            p for p in root.rglob("*") if p.is_file() and p.name.endswith((".jsonl", ".jsonl.gz"))
        )
        if not files:
            raise InputError(f"no .jsonl or .jsonl.gz files in {root}")
        return files
    return [root]


def read_events(
    path: str | Path,
    progress: Callable[[int], None] | None = None,
    until_ms: int | None = None,
) -> EventBatch:
    """Decode every line of a file (or folder of files, or - for stdin); invalid lines are kept
    as `rejected` with the reason, never fatal; a repeated messageId is counted, not replayed,
    as are events after `until_ms`. Sorted by `model.order_key`, stable."""
    batch = EventBatch()
    events = batch.events
    collecting = gc.isenabled()
    gc.disable()  # decoding makes millions of objects and no reference cycles
    try:
        for chunk in _decoded(batch, path, progress, until_ms, strict=False):
            events.extend(chunk)
    finally:
        if collecting:
            gc.enable()
    if not batch.in_order:
        events.sort(key=order_key)
    return batch


class OutOfOrder(Exception):
    """`stream_events` met an event earlier than one it had already given."""


def stream_events(
    path: str | Path,
    batch: EventBatch,
    progress: Callable[[int], None] | None = None,
    until_ms: int | None = None,
) -> Iterator[Event]:
    """What `read_events` gives, for files in time order (as recorded streams mostly are), as
    they are decoded, so that a replay holds none of them: `batch` counts lines, rejects and
    repeats but keeps no events. Raises `OutOfOrder` at the first event earlier than one
    before it; the caller then starts again with `read_events`, which sorts."""
    return chain.from_iterable(_decoded(batch, path, progress, until_ms, strict=True))


def _decoded(
    batch: EventBatch,
    path: str | Path,
    progress: Callable[[int], None] | None,
    until_ms: int | None,
    strict: bool,
) -> Generator[list[Event], None, None]:
    """Lists of `CHUNK` events (decoding a stretch of them, then applying it, runs faster than
    taking turns at each event): each valid event not seen before and not after `until_ms`,
    in file order but for the
    events of one moment, which come in `order_key` order (as sorting the whole file would put
    them: who-is-who first, else file order). At the first event earlier than one before it,
    raises `OutOfOrder` if `strict`, else clears `batch.in_order`; the events after it are then
    still given, so that they can be sorted."""
    files: list[str | Path] = ["-"] if str(path) == "-" else list(event_files(path))
    seen: set[str] = set()
    # one copy of each event name: a million events then hold a few dozen name strings
    names: dict[str, str] = {}
    intern = names.setdefault
    until = MAX_TIME_MS if until_ms is None else until_ms
    decode = decode_message
    # the last event read is given once the next moment starts; `ties`: its moment's others
    held: Event | None = None
    ties: list[Event] | None = None
    at = -1
    out: list[Event] = []
    for file in files:
        n = 0
        lines = iter_lines(file, progress)
        try:
            for line in lines:
                n += 1
                if len(line) < 8 and not line.strip():
                    continue  # a blank line (no message is this short)
                try:
                    try:
                        event = from_message(decode(line))  # decode_event, without its call
                    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
                        event = decode_event(line)  # once more, to say what was wrong
                except EventError as exc:
                    batch.rejected.append(Rejected(str(file), n, exc.message))
                    continue
                message_id = event.message_id
                if message_id:
                    if message_id in seen:
                        batch.duplicates += 1
                        continue
                    seen.add(message_id)
                t = event.timestamp_ms
                if t > until:
                    batch.after_until += 1
                    continue
                name = event.name
                event.name = intern(name, name)
                if t == at:
                    if ties is None:
                        ties = [held] if held is not None else []
                    ties.append(event)
                    continue
                if t < at:
                    if strict:
                        raise OutOfOrder(f"{file}:{n}: an event at {t} ms after one at {at} ms")
                    batch.in_order = False
                if ties is not None:
                    ties.sort(key=order_key)
                    out += ties
                    ties = None
                elif held is not None:
                    out.append(held)
                held, at = event, t
                if len(out) >= CHUNK:
                    yield out
                    out = []
        finally:
            lines.close()
        batch.lines += n
    if ties is not None:
        ties.sort(key=order_key)
        out += ties
    elif held is not None:
        out.append(held)
    yield out
