"""The knowledge base behind the chat assistant: help-center articles split into passages and
searched with BM25. Edge (reads a folder once, at load); searching is pure.

    folder of *.md  ->  articles (title, url)  ->  passages (a section or a few paragraphs)
                    ->  terms (lower case, no punctuation or stop words, light stemming)
                    ->  BM25 index  ->  search(question, hint=words of the page and evidence)
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import yaml

from forewarn.errors import InputError

MIN_WORDS = 60  # a passage grows paragraph by paragraph up to this size ...
MAX_WORDS = 150  # ... and no further
HINT_WEIGHT = 0.3  # a hint word counts for this much of a question word
K1, B = 1.2, 0.75  # the usual BM25 constants

STOP_WORDS = frozenset(
    """
    a about above after again against all am an and any are aren't as at be because been
    before being below between both but by can can't cannot could couldn't did didn't do does
    doesn't doing don't down during each few for from further had hadn't has hasn't have
    haven't having he her here hers herself him himself his how i i'd i'll i'm i've if in into
    is isn't it it's its itself just let's me might more most must my myself no nor not now of
    off on once only or other ought our ours ourselves out over own please same shall she
    should shouldn't so some such than that that's the their theirs them themselves then there
    there's these they this those through to too under until up very want was wasn't way we
    were weren't what what's when where which while who whom why will with won't would
    wouldn't you you'd you'll you're you've your yours yourself yourselves
    """.split()  # noqa: SIM905 (a word list reads best as text)
)
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")


def _stem(word: str) -> str:
    """Strip a plural, -ing, -ed or -ly and a final e, so 'exports', 'exported' and 'exporting'
    meet at 'export', and 'invite', 'invites' and 'inviting' at 'invit'."""
    if len(word) <= 3 or not word.isalpha():
        return word
    for suffix, keep in (("ies", "y"), ("sses", "ss"), ("ss", "ss"), ("us", "us"), ("is", "is")):
        if word.endswith(suffix):
            word = word[: -len(suffix)] + keep
            break
    else:
        if word.endswith("s"):
            word = word[:-1]
    for suffix in ("ing", "ed", "ly"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            if word[-1] == word[-2] and word[-1] not in "lsz":  # setting -> sett -> set
                word = word[:-1]
            break
    if len(word) > 4 and word.endswith("e"):
        word = word[:-1]
    return word


def terms(text: str) -> list[str]:
    """The searchable words of a text, in order."""
    text = unicodedata.normalize("NFKC", text).lower().replace("’", "'")
    out = []
    for word in _WORD.findall(text):
        if word not in STOP_WORDS and (len(word) > 1 or word.isdigit()):
            out.append(_stem(word.removesuffix("'s")))
    return out


class Passage(NamedTuple):
    article: str  # the article's title
    url: str
    text: str  # plain text: markdown emphasis and code marks removed, links as "text (url)"
    score: float  # BM25, comparable within one knowledge base only


class _BM25:
    """Okapi BM25 over term lists; a query is a weight per term."""

    def __init__(self, docs: Sequence[Sequence[str]]) -> None:
        self.tf = [Counter(doc) for doc in docs]
        self.length = [len(doc) for doc in docs]
        self.average = sum(self.length) / len(docs) if docs else 1.0
        self.postings: dict[str, list[int]] = defaultdict(list)
        for i, counts in enumerate(self.tf):
            for term in counts:
                self.postings[term].append(i)
        n = len(docs)
        self.idf = {
            t: math.log(1 + (n - len(p) + 0.5) / (len(p) + 0.5)) for t, p in self.postings.items()
        }

    def scores(self, query: Mapping[str, float]) -> dict[int, float]:
        out: dict[int, float] = defaultdict(float)
        for term, weight in query.items():
            idf = self.idf.get(term, 0.0)
            for i in self.postings.get(term, ()):
                tf = self.tf[i][term]
                norm = tf + K1 * (1 - B + B * self.length[i] / (self.average or 1.0))
                out[i] += weight * idf * tf * (K1 + 1) / norm
        return out


@dataclass(frozen=True)
class _Chunk:
    article: str
    url: str
    heading: str
    text: str


class KnowledgeBase:
    """Articles split into passages, searchable. Build it with `load`."""

    def __init__(self, chunks: Sequence[_Chunk], articles: int) -> None:
        self._chunks = tuple(chunks)
        self._articles = articles
        self._index = _BM25([terms(f"{c.article}\n{c.heading}\n{c.text}") for c in self._chunks])

    @classmethod
    def load(cls, folder: Path, base_url: str = "") -> KnowledgeBase:
        """Every *.md file below `folder` (hidden ones aside) is an article. Its title is its first
        '# ' heading (else its file name); its url is `url:` in a leading '---' front-matter block,
        else `base_url` joined to its path relative to `folder` without '.md'."""
        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(
                f"the knowledge-base folder {folder} does not exist or is not a folder; "
                "point it at a folder of markdown articles"
            )
        chunks: list[_Chunk] = []
        files = sorted(p for p in folder.rglob("*.md") if not _hidden(p.relative_to(folder)))
        for path in files:
            relative = path.relative_to(folder).with_suffix("").as_posix()
            try:
                source = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise InputError(
                    f"{path}: cannot be read as UTF-8 text ({e}); fix or remove it"
                ) from None
            meta, body = _front_matter(source, path)
            url = str(meta.get("url") or "").strip()
            if not url:
                url = f"{base_url.rstrip('/')}/{relative}" if base_url else relative
            title, body = _title(body, path.stem)
            keywords = meta.get("keywords") or ""
            if isinstance(keywords, list):
                keywords = ", ".join(str(k) for k in keywords)
            for heading, text in _sections(body):
                for part in _chunk(text):
                    chunks.append(_Chunk(title, url, f"{heading}\n{keywords}".strip(), part))
        return cls(chunks, len(files))

    def __len__(self) -> int:
        """The number of articles."""
        return self._articles

    @property
    def passages(self) -> tuple[Passage, ...]:
        return tuple(Passage(c.article, c.url, c.text, 0.0) for c in self._chunks)

    def urls(self) -> set[str]:
        return {c.url for c in self._chunks}

    def covers(self, query: str) -> bool:
        """Whether one passage holds every searchable word of `query`."""
        asked = set(terms(query))
        postings = [set(self._index.postings.get(t, ())) for t in asked]
        return bool(postings) and bool(set.intersection(*postings))

    def search(
        self, query: str, k: int = 3, *, hint: str = "", hint_weight: float = HINT_WEIGHT
    ) -> list[Passage]:
        """The k best passages for `query`, best first. Words of `hint` (the page the user is on,
        why the chat opened) count at `hint_weight`: they only reorder passages that share a word
        with the query, unless the query has no searchable word at all ("how do I fix this?"
        keeps 'fix'; "what now?" keeps nothing and is answered from the hint alone)."""
        asked = terms(query)
        weights = dict.fromkeys(terms(hint), hint_weight)
        weights.update(dict.fromkeys(asked, 1.0))
        scores = self._index.scores(weights)
        if asked:
            matching = set().union(*(self._index.postings.get(t, ()) for t in asked))
            scores = {i: s for i, s in scores.items() if i in matching}
        best = sorted(scores.items(), key=lambda item: (-item[1], item[0]))[:k]
        return [Passage(c.article, c.url, c.text, s) for i, s in best for c in (self._chunks[i],)]


# --- reading markdown -------------------------------------------------------------------------


def _hidden(relative: Path) -> bool:
    return any(part.startswith((".", "_")) for part in relative.parts)


def _front_matter(source: str, path: Path) -> tuple[dict[str, object], str]:
    lines = source.lstrip("\ufeff").splitlines()
    if not lines or lines[0].strip() != "---":
        return {}, source
    for end in range(1, len(lines)):
        if lines[end].strip() in ("---", "..."):
            break
    else:
        raise InputError(f"{path}: the front matter opened by '---' is never closed; add '---'")
    try:
        meta = yaml.safe_load("\n".join(lines[1:end])) or {}
    except yaml.YAMLError as e:
        raise InputError(f"{path}: the front matter is not valid YAML: {e}") from None
    if not isinstance(meta, dict):
        raise InputError(f"{path}: the front matter must be a mapping such as 'url: https://...'")
    return meta, "\n".join(lines[end + 1 :])


def _title(body: str, stem: str) -> tuple[str, str]:
    lines = body.splitlines()
    fenced = False
    for i, line in enumerate(lines):
        fenced ^= line.startswith("```")
        if not fenced and line.startswith("# "):
            return _plain(line[2:].strip()), "\n".join(lines[:i] + lines[i + 1 :])
    return re.sub(r"[-_]+", " ", stem).strip().capitalize() or stem, body


def _sections(body: str) -> list[tuple[str, str]]:
    """(heading, text) for the text before the first '##' heading and under each one; a section
    shorter than MIN_WORDS joins the next one (an article's lead-in joins its first section)."""
    found: list[tuple[str, list[str]]] = [("", [])]
    fenced = False
    for line in body.splitlines():
        fenced ^= line.startswith("```")
        if not fenced and re.match(r"#{2,6} ", line):
            found.append((_plain(line.lstrip("#").strip()), []))
        else:
            found[-1][1].append(line)
    out: list[tuple[str, str]] = []
    for heading, lines in found:
        text = "\n".join(lines)
        if not text.strip():
            continue
        size = len(out[-1][1].split()) if out else MIN_WORDS
        if size < MIN_WORDS and size + len(text.split()) <= MAX_WORDS:
            before, earlier = out.pop()
            heading, text = f"{before}\n{heading}".strip(), f"{earlier}\n\n{text}"
        out.append((heading, text))
    return out


def _chunk(text: str) -> list[str]:
    """Paragraphs gathered into passages of MIN_WORDS to MAX_WORDS words where they allow it."""
    paragraphs = [_unwrap(_plain(p)) for p in re.split(r"\n\s*\n", text) if p.strip()]
    pieces = [s for p in paragraphs for s in _split_long(p)]
    out: list[str] = []
    size = 0
    for piece in pieces:
        words = len(piece.split())
        if out and size < MIN_WORDS and size + words <= MAX_WORDS:
            out[-1] += "\n\n" + piece
            size += words
        else:
            out.append(piece)
            size = words
    if len(out) > 1 and size < MIN_WORDS // 2 and len(out[-2].split()) + size <= MAX_WORDS:
        last = out.pop()  # no stub of a passage at the end of a section
        out[-1] += "\n\n" + last
    return out


def _split_long(paragraph: str) -> list[str]:
    if len(paragraph.split()) <= MAX_WORDS:
        return [paragraph]
    out, current = [], ""
    for sentence in re.split(r"(?<=[.!?])\s+", paragraph):
        if current and len((current + " " + sentence).split()) > MAX_WORDS:
            out.append(current)
            current = sentence
        else:
            current = f"{current} {sentence}".strip()
    return [*out, current] if current else out


def _unwrap(paragraph: str) -> str:
    """Join a paragraph's hard-wrapped lines; list items keep their own lines."""
    return re.sub(r"\s*\n\s*(?![-*+] |\d+[.)] )", " ", paragraph)


def _plain(markdown: str) -> str:
    """Markdown as the plain text a chat shows: no emphasis or code marks, links as text (url)."""
    text = re.sub(r"<!--.*?-->", "", markdown, flags=re.S)
    text = re.sub(r"^```.*$", "", text, flags=re.M)
    text = re.sub(r"!?\[([^\]\n]*)\]\(\s*<?([^)\s>]*)>?[^)]*\)", _link_text, text)
    text = re.sub(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1", r"\2", text, flags=re.S)
    text = re.sub(r"(?<![\w*])\*(?=\S)([^*\n]+?)(?<=\S)\*(?![\w*])", r"\1", text)
    text = text.replace("`", "")
    return text.strip()


def _link_text(match: re.Match[str]) -> str:
    label, url = match.group(1).strip(), match.group(2)
    return url if not label or label == url else f"{label} ({url})"
