"""What may leave the chat assistant: no link to a host outside an allowlist, whatever the
knowledge base, the event data or a language model wrote. Pure.

Text is first normalised the way a reader's eye and a browser would read it (NFKC, so
full-width letters become ASCII; invisible and bidirectional control characters dropped;
ideographic full stops and defanged dots such as '[.]' read as dots). Then every link-like
thing is judged: a URL with any scheme (also 'hxxp://', 'javascript:', 'http:evil'), a
scheme-less '//host', an e-mail address, a markdown link, and a bare domain such as
'www.x.com' or 'x.com/login'. A link is kept only if it is http(s) (or bare) and its host is an
allowed host or a subdomain of one; a host with user information ('@'), a backslash, an IP
address or non-ASCII letters (look-alikes) never is. Whatever is not kept becomes
"[link removed]".
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from urllib.parse import unquote

REMOVED = "[link removed]"

_INVISIBLE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e"
    "\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0]"
)
_DEFANGED_DOT = re.compile(r"\s?[\[({]\s?(?:\.|dot)\s?[\])}]\s?", re.I)
_MARKDOWN_LINK = re.compile(
    r"!?\[([^\]\n]{0,500})\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'][^\"'\n]*[\"'])?\s*\)"
)
_LINK = re.compile(
    r"""
      (?P<email>(?:mailto:)?[\w.+-]+@(?P<mailhost>[^\W_][\w-]*(?:\.[\w-]+)+))
    | (?P<url>
        (?: \b[a-z][a-z0-9+.\-]{0,15}:[/\\]{2}        # any scheme with slashes: hxxp://, ftp://
          | \b(?:https?|hxxps?|ftps?|wss?|javascript|vbscript|data|file|blob|intent|tel|sms):[/\\]?
          | (?<![\w:/\\])[/\\]{2}(?=[^\W_])            # //host, \\host
        )
        [^\s<>"'`]+ )
    | (?P<bare>
        (?<![\w@./\\-])(?:[^\W_][\w-]{0,62}\.)+(?P<tld>[^\W\d_]{2,63})(?![\w-])
        (?P<port>:\d{1,5})? (?P<path>[/?#][^\s<>"'`]*)? )
    """,
    re.I | re.X,
)
# Bare names with these endings are taken for file names ("export.csv"), not domains, unless
# they carry a path or a port. (Not .zip or .mov: those are real top-level domains used for
# phishing.)
FILE_EXTENSIONS = frozenset(
    [
        "md",
        "txt",
        "csv",
        "tsv",
        "json",
        "pdf",
        "png",
        "jpg",
        "jpeg",
        "gif",
        "svg",
        "webp",
        "html",
        "htm",
        "xml",
        "yaml",
        "yml",
        "js",
        "ts",
        "css",
        "py",
        "log",
        "gz",
        "tar",
        "docx",
        "xlsx",
        "pptx",
        "doc",
        "xls",
        "ppt",
    ]
)
_HOST = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*")


def normalise(text: str) -> str:
    """The text as it reads: compatibility forms folded, invisible characters dropped."""
    text = unicodedata.normalize("NFKC", _INVISIBLE.sub("", text))
    return _DEFANGED_DOT.sub(".", text.replace("\u3002", "."))


def host_of(link: str) -> str | None:
    """The host a web link (or a bare domain) leads to, lower case; None for anything that is
    not plainly an http(s) link to a named host."""
    if "\\" in link:
        return None
    scheme = re.match(r"([a-z][a-z0-9+.\-]*):", link, re.I)
    if scheme and not (scheme.group(1).isdigit() or "." in scheme.group(1)):
        if scheme.group(1).lower() not in ("http", "https"):
            return None
        link = link[scheme.end() :]
    authority = re.split(r"[/?#]", link.lstrip("/"), maxsplit=1)[0]
    if "@" in authority:
        return None
    host = unquote(re.sub(r":\d*$", "", authority)).lower().rstrip(".")
    if not _HOST.fullmatch(host) or re.fullmatch(r"[\d.]+", host):
        return None  # empty, non-ASCII (look-alikes), IPv6 or IPv4
    return host


def _allowed(host: str | None, allowed: frozenset[str]) -> bool:
    return host is not None and any(host == a or host.endswith("." + a) for a in allowed)


def hosts_of(hosts: Iterable[str]) -> frozenset[str]:
    """Hosts as given ('help.example.com', or a URL on it), normalised."""
    return frozenset(h for h in (host_of(x.strip()) for x in hosts if x.strip()) if h)


def guard_links(text: str, allowed_hosts: Iterable[str]) -> str:
    """`text` with every link whose host is not allowed (nor a subdomain of an allowed host)
    replaced by "[link removed]". Markdown links become "text (url)" and are judged the same."""
    allowed = hosts_of(allowed_hosts)
    text = _MARKDOWN_LINK.sub(_unmark, normalise(text))

    def judge(match: re.Match[str]) -> str:
        found = match.group(0)
        link, tail = _trim(found)
        if match.group("email"):
            return found if _allowed(host_of(match.group("mailhost")), allowed) else REMOVED
        if match.group("bare"):
            bare = not (match.group("path") or match.group("port"))
            if bare and match.group("tld") in FILE_EXTENSIONS:
                return found
        return (link if _allowed(host_of(link), allowed) else REMOVED) + tail

    return _LINK.sub(judge, text)


def _unmark(match: re.Match[str]) -> str:
    label, url = match.group(1).strip(), match.group(2)
    return url if not label or label == url else f"{label} ({url})"


def _trim(link: str) -> tuple[str, str]:
    """A link without the punctuation that ends the sentence around it."""
    end = len(link)
    while end:
        c = link[end - 1]
        opener = {")": "(", "]": "[", "}": "{"}.get(c)
        if c in ".,;:!?*_~'\"" or (opener and link.count(opener, 0, end) < link.count(c, 0, end)):
            end -= 1
        else:
            break
    return link[:end], link[end:]
