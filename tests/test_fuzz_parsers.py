"""Coverage-guided fuzzing (atheris) of the parsers of untrusted text, a few seconds each: the
event normaliser, the playbook parser, the threshold expression parser. Only the project's own
validation errors may escape; no input may take over a second. `make fuzz` runs them longer."""

from __future__ import annotations

import pytest

from forewarn import expr, playbook
from forewarn.errors import PlaybookError

from .fuzz import targets

RUNS = {"events": 30_000, "playbook": 5_000, "expr": 20_000}  # a few seconds each here


@pytest.mark.parametrize("target", targets.TARGETS)
def test_no_input_escapes_the_validation_errors_or_takes_a_second(target: str) -> None:
    code, output = targets.run(target, RUNS[target], seconds=10)
    assert code == 0, output[-6000:]
    assert "Done" in output, output[-6000:]


def test_the_harnesses_see_a_failure_when_there_is_one() -> None:
    """The property the fuzzers check is the one the parsers are held to: a valid input parses,
    and a bad one raises the project's error (a harness that swallowed everything would pass)."""
    one = targets._expr()
    one(b"traits.a / traits.b")
    with pytest.raises(expr.ExpressionError):
        expr.parse("traits.a +")
    with pytest.raises(PlaybookError):
        playbook.parse_playbooks([("p.yaml", "triggers: 5")])
