"""The threshold expression: safe arithmetic over traits and event properties.

    expr   := term (("+" | "-") term)*
    term   := unary (("*" | "/") unary)*
    unary  := "-" unary | atom
    atom   := NUMBER | NAME | "(" expr ")"
    NAME   := ("traits" | "properties" | "account") "." key ("." key)*

Parsed by hand into a tree of closures; nothing is ever passed to `eval`. Evaluation returns None
when a name is missing or not a number, or on division by zero: the condition is then false.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

ROOTS = ("traits", "properties", "account")
MAX_TOKENS = 200  # keeps parsing and evaluation far from Python's recursion limit

Lookup = Callable[[str, tuple[str, ...]], Any]
Compiled = Callable[[Lookup], float | None]

_TOKEN = re.compile(
    r"\s*(?:(?P<num>\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)"
    r"|(?P<op>[-+*/()]))"
)


class ExpressionError(ValueError):
    """The expression does not parse; the message says where and what is allowed."""


class Expression:
    """A parsed expression: `evaluate(lookup)` and the names it reads."""

    __slots__ = ("_fn", "names", "source")

    def __init__(self, source: str, fn: Compiled, names: tuple[tuple[str, tuple[str, ...]], ...]):
        self.source = source
        self._fn = fn
        self.names = names

    def evaluate(self, lookup: Lookup) -> float | None:
        return self._fn(lookup)

    def __repr__(self) -> str:  # by its text: the playbooks' fingerprint is the same everywhere
        return f"Expression({self.source!r})"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return float(value)
    except OverflowError:  # an integer too large for a float
        return None


def parse(source: str) -> Expression:
    tokens: list[tuple[str, str, int]] = []
    pos = 0
    text = source.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            bad = text[pos:].lstrip()[:1]
            raise ExpressionError(
                f"unexpected {bad!r} at position {pos + 1} in {source!r}: use numbers, "
                "traits.NAME, properties.NAME, account.NAME, + - * / and parentheses"
            )
        kind = m.lastgroup or ""
        tokens.append((kind, m.group(kind), m.start(kind) + 1))
        pos = m.end()
    if not tokens:
        raise ExpressionError("the expression is empty: write e.g. traits.used / traits.limit")
    if len(tokens) > MAX_TOKENS:
        raise ExpressionError(
            f"the expression has {len(tokens)} parts; at most {MAX_TOKENS} are allowed"
        )
    names: list[tuple[str, tuple[str, ...]]] = []
    index = 0

    def peek() -> tuple[str, str, int] | None:
        return tokens[index] if index < len(tokens) else None

    def take() -> tuple[str, str, int]:
        nonlocal index
        tok = tokens[index]
        index += 1
        return tok

    def expr() -> Compiled:
        left = term()
        while (tok := peek()) is not None and tok[1] in ("+", "-"):
            take()
            left = _binary(tok[1], left, term())
        return left

    def term() -> Compiled:
        left = unary()
        while (tok := peek()) is not None and tok[1] in ("*", "/"):
            take()
            left = _binary(tok[1], left, unary())
        return left

    def unary() -> Compiled:
        tok = peek()
        if tok is not None and tok[1] == "-":
            take()
            inner = unary()

            def neg(lookup: Lookup) -> float | None:
                v = inner(lookup)
                return None if v is None else -v

            return neg
        return atom()

    def atom() -> Compiled:
        tok = peek()
        if tok is None:
            raise ExpressionError(f"{source!r} ends too early: a number or a name is missing")
        kind, value, at = take()
        if kind == "num":
            number = float(value)
            return lambda lookup: number
        if kind == "name":
            root, _, rest = value.partition(".")
            if root not in ROOTS or not rest:
                raise ExpressionError(
                    f"unknown name {value!r} at position {at} in {source!r}: names start with "
                    "traits., properties. or account."
                )
            path = tuple(rest.split("."))
            names.append((root, path))

            def read(lookup: Lookup) -> float | None:
                return _number(lookup(root, path))

            return read
        if value == "(":
            inner = expr()
            close = peek()
            if close is None or close[1] != ")":
                raise ExpressionError(f"missing ')' for the '(' at position {at} in {source!r}")
            take()
            return inner
        raise ExpressionError(
            f"unexpected {value!r} at position {at} in {source!r}: a number or a name belongs here"
        )

    fn = expr()
    if index < len(tokens):
        _, value, at = tokens[index]
        raise ExpressionError(
            f"unexpected {value!r} at position {at} in {source!r}: an operator "
            "(+ - * /) or the end belongs here"
        )
    return Expression(source, fn, tuple(names))


def _binary(op: str, left: Compiled, right: Compiled) -> Compiled:
    if op == "+":

        def add(lookup: Lookup) -> float | None:
            a, b = left(lookup), right(lookup)
            return None if a is None or b is None else a + b

        return add
    if op == "-":

        def sub(lookup: Lookup) -> float | None:
            a, b = left(lookup), right(lookup)
            return None if a is None or b is None else a - b

        return sub
    if op == "*":

        def mul(lookup: Lookup) -> float | None:
            a, b = left(lookup), right(lookup)
            return None if a is None or b is None else a * b

        return mul

    def div(lookup: Lookup) -> float | None:
        a, b = left(lookup), right(lookup)
        return None if a is None or b is None or b == 0 else a / b

    return div


def dig(data: Mapping[str, Any] | None, path: tuple[str, ...]) -> Any:
    """Read a dotted path from nested mappings; None when any step is missing."""
    value: Any = data
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value
