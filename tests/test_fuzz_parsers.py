"""Coverage-guided fuzzing (atheris) of the parsers of untrusted text, a few seconds each: the
event normaliser, the playbook parser, the threshold expression parser. Only the project's own
validation errors may escape; no input may take over a second. `make fuzz` runs them longer."""

from __future__ import annotations

import pytest

from .fuzz import targets

RUNS = {"events": 60_000, "playbook": 8_000, "expr": 30_000}  # a few seconds each here


@pytest.mark.parametrize("target", targets.TARGETS)
def test_no_input_escapes_the_validation_errors_or_takes_a_second(target: str) -> None:
    code, output = targets.run(target, RUNS[target], seconds=6)
    assert code == 0, output[-6000:]
    assert "Done" in output, output[-6000:]


@pytest.mark.parametrize(("kind", "said"), [("crash", "RuntimeError"), ("slow", "timeout")])
def test_a_crash_or_a_slow_input_fails_the_run(kind: str, said: str) -> None:
    """The runner reports what the fuzzers exist to find (a harness that swallowed every
    failure, or a timeout that never fired, would make the runs above pass for nothing)."""
    code, output = targets.run(f"broken-{kind}", 10, seconds=10)
    assert code != 0, output[-3000:]
    assert said in output, output[-3000:]
