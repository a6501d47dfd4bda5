"""The threshold expression: arithmetic, precedence, missing values and parse errors."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forewarn.expr import ExpressionError, dig, parse

VALUES: dict[str, dict[str, Any]] = {
    "traits": {
        "used": 85,
        "limit": 100,
        "zero": 0,
        "plan": "pro",
        "flag": True,
        "nested": {"n": 4},
    },
    "properties": {"ms": 1500.5},
    "account": {"seats": 10},
}


def lookup(root: str, path: tuple[str, ...]) -> Any:
    return dig(VALUES[root], path)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("traits.used / traits.limit", 0.85),
        ("1 + 2 * 3", 7.0),
        ("(1 + 2) * 3", 9.0),
        ("10 - 4 - 3", 3.0),
        ("12 / 3 / 2", 2.0),
        ("-traits.used + 100", 15.0),
        ("--2", 2.0),
        ("properties.ms / 1000", 1.5005),
        ("account.seats * 2", 20.0),
        ("traits.nested.n * .5", 2.0),
        ("1e3 / 4", 250.0),
    ],
)
def test_arithmetic(source, expected):
    assert parse(source).evaluate(lookup) == pytest.approx(expected)


@pytest.mark.parametrize(
    "source",
    ["traits.used / traits.zero", "traits.missing + 1", "traits.plan * 2", "traits.flag + 1"],
)
def test_missing_non_numeric_or_division_by_zero_is_no_value(source):
    assert parse(source).evaluate(lookup) is None


def test_names_are_reported():
    e = parse("traits.used / account.seats + properties.ms")
    assert e.names == (("traits", ("used",)), ("account", ("seats",)), ("properties", ("ms",)))


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("", "empty"),
        ("traits.a +", "ends too early"),
        ("(traits.a", "missing ')'"),
        ("traits.a )", "unexpected ')'"),
        ("traits.a traits.b", "unexpected 'traits.b'"),
        ("os.system", "unknown name 'os.system'"),
        ("traits", "unknown name 'traits'"),
        ("traits.a ** 2", "unexpected '*'"),
        ("traits.a % 2", "unexpected '%'"),
        ("__import__('os')", "unexpected"),
        ("__import__", "unknown name '__import__'"),
        ("traits.a; 1", "unexpected ';'"),
    ],
)
def test_parse_errors_say_what_is_allowed(source, message):
    with pytest.raises(ExpressionError) as caught:
        parse(source)
    assert message in str(caught.value)


@given(st.text(max_size=40))
def test_any_text_parses_or_raises_expression_error(text):
    try:
        e = parse(text)
    except ExpressionError:
        return
    e.evaluate(lookup)


@given(st.integers(-1000, 1000), st.integers(-1000, 1000), st.integers(-1000, 1000).filter(bool))
def test_matches_python_arithmetic(a, b, c):
    assert parse(f"{a} + {b} * ({a} - {b}) / {c}".replace("+ -", "- ")).evaluate(
        lookup
    ) == pytest.approx(a + b * (a - b) / c)
